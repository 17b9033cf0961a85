"""Kernel tuning: one frozen dataclass whose defaults are the tuned launch parameters.

Every launcher takes `settings: KernelSettings = DEFAULT_SETTINGS` and reads its tuning from it;
no module global of keyspace.kernels is tunable. Build a variant with
`dataclasses.replace(DEFAULT_SETTINGS, select_method="radix")`. The defaults were measured on an
H100 and an H200 (docs/notes/kernel-attempts.md has how). Limits that are facts of the hardware
or of a kernel's data layout, not tuning, stay constants of their kernel file.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

SELECT_METHODS = ("auto", "bisect", "radix", "sampled")
ADAPTIVE_CHOICES = ("kernel", "torch")
PIPELINE_MODES = ("capture", "always", "never")
# The register bisection packs two counts into one int32 (16 bits each): no row may pass 2**15.
BISECT_MAX_ROW = 32768
# The chunked scans count in 16 bits as well.
CHUNK_LIMIT = 1 << 16

# Fields a kernel uses as a block size (tl.arange), a warp count, or doubles towards a limit.
_POWERS_OF_TWO = (
    "scores_block_s",
    "scores_num_warps",
    "adaptive_block_s",
    "adaptive_block_r",
    "adaptive_num_warps",
    "bisect_elems_per_thread",
    "bisect_elems_short",
    "bisect_short_row",
    "bisect_max_warps",
    "radix_chunk",
    "radix_warps",
    "bracket_sample",
    "bracket_sample_per_bin",
    "bracket_sample_row_max",
    "bracket_sample_max",
    "bracket_tile",
    "bracket_warps",
    "bracket_pass_warps",
    "cand_chunk",
    "cand_warps",
    "attention_block_n",
    "attention_num_warps",
)
_MAY_BE_ZERO = ("attention_splits", "pipeline_min_sets")


@dataclass(frozen=True)
class KernelSettings:
    """Launch parameters of the decode kernels. Validated on construction; immutable."""

    # Low-rank scores (scores.py): one program scores a tile of tokens of one (batch, KV head).
    scores_block_s: int = 256  # tokens per program
    scores_dot_tile_bytes: int = 128 * 1024  # shared memory cap of the per-head dot's k_low tile
    scores_num_warps: int = 4
    scores_evict_first: bool = True  # k_low is read once: let L2 keep the scores for the select
    scores_tile_major: bool = True  # consecutive programs take consecutive tiles of one head

    # Adaptive low-rank scores (adaptive.py): r chosen coordinates of a coordinate-major store;
    # also takes scores_evict_first and scores_tile_major.
    adaptive_block_s: int = 1024  # tokens per program (H100 sweep, docs/notes/kernel-attempts.md)
    adaptive_block_r: int = 32  # chosen coordinates per inner step (a tl.dot K of at least 16)
    adaptive_num_warps: int = 4
    adaptive_choice: str = "kernel"  # the score kernel ranks the r coordinates; "torch": before it

    # Top-k selection (select.py): which exact method, by row length.
    select_method: str = "auto"  # "auto" picks by row length; the others force one method
    bisect_auto_max: int = 16384  # "auto" bisects rows up to this length, longer are sampled
    sampled_min_len: int = 2048  # shorter rows never take the sampled bracket (radix instead)
    # Register bisection: the whole row in registers, searched for the k-th key.
    bisect_elems_per_thread: int = 32  # scores per thread, which sets the program's warps
    bisect_elems_short: int = 16  # ... for rows up to bisect_short_row
    bisect_short_row: int = 4096
    bisect_max_warps: int = 32
    bisect_guess: bool = True  # probe guessed thresholds (normal quantile, regula falsi) first
    bisect_guess_steps: int = 48  # most guessed probes before plain halving
    # Radix select: 8-bit histogram passes over the row.
    radix_chunk: int = 4096  # scores per pass step
    radix_bits: int = 8  # bits per histogram pass
    radix_warps: int = 8
    # Sampled bracket: a sample's histogram brackets the k-th, the whole GPU sorts rows against it.
    bracket_sample: int = 2048  # sample size; doubled while the bracket would hold too many
    bracket_sample_per_bin: int = 8  # sample scores per histogram bin
    bracket_sample_row_max: int = 4096  # ... doubled up to this for the candidates to fit registers
    bracket_sample_max: int = 8192  # ... and up to this only for them to fit the scratch
    bracket_tile: int = 1024  # scores per program of the bracket pass
    bracket_warps: int = 4
    bracket_pass_warps: int = 4
    cand_cap: int = 8192  # most candidates kept per row; more falls back to the radix select
    cand_chunk: int = 1024  # scores per radix step over the candidates
    cand_bisect: bool = True  # select among the candidates by register bisection, not radix
    cand_bisect_row: int = 4096  # longest candidate list bisected in registers
    cand_warps: int = 8

    # Sparse attention (attention.py): split-K over each index set, online softmax.
    attention_block_n: int = 64  # selected rows per inner step
    attention_num_warps: int = 4
    attention_num_stages: int = 2
    attention_programs_per_sm: int = 2  # split-K aims at this many programs per SM
    attention_splits: int = 0  # a fixed split count; 0 picks one from the SM count
    attention_fuse_reduce: bool = True  # the last split of a set merges the partials, no launch

    # The decode step (decode.py).
    reuse_low_scores: bool = True  # per-head attention reads the score pass's q_low·k_low
    pipeline: str = "capture"  # two half-batches on two streams: "capture", "always", "never"
    pipeline_min_sets: int = 256  # ... only with at least this many index sets (B·Hsel)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = bool if f.type == "bool" else int if f.type == "int" else str
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"KernelSettings.{f.name} must be {kind.__name__}, got {value!r}")
            if kind is int and value < (0 if f.name in _MAY_BE_ZERO else 1):
                raise ValueError(f"KernelSettings.{f.name} must be positive, got {value}")
        for name in _POWERS_OF_TWO:
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"KernelSettings.{name} must be a power of two, got {value}")
        if self.select_method not in SELECT_METHODS:
            raise ValueError(
                f"KernelSettings.select_method must be one of {SELECT_METHODS}, "
                f"got {self.select_method!r}"
            )
        if self.adaptive_choice not in ADAPTIVE_CHOICES:
            raise ValueError(
                f"KernelSettings.adaptive_choice must be one of {ADAPTIVE_CHOICES}, "
                f"got {self.adaptive_choice!r}"
            )
        if self.pipeline not in PIPELINE_MODES:
            raise ValueError(
                f"KernelSettings.pipeline must be one of {PIPELINE_MODES}, got {self.pipeline!r}"
            )
        self._check_limits()

    def _check_limits(self) -> None:
        """Bounds that the kernels' layouts impose (tl.dot sizes, 16-bit packed counts)."""
        checks = [
            (self.radix_bits in (1, 2, 4, 8), "radix_bits must be 1, 2, 4 or 8"),
            (self.scores_block_s >= 16, "scores_block_s must be at least 16 (tl.dot)"),
            (self.adaptive_block_s >= 16, "adaptive_block_s must be at least 16 (tl.dot)"),
            (self.adaptive_block_r >= 16, "adaptive_block_r must be at least 16 (tl.dot)"),
            (self.attention_block_n >= 16, "attention_block_n must be at least 16 (tl.dot)"),
            (self.radix_chunk < CHUNK_LIMIT, f"radix_chunk must be below {CHUNK_LIMIT}"),
            (self.cand_chunk < CHUNK_LIMIT, f"cand_chunk must be below {CHUNK_LIMIT}"),
            (
                self.bisect_auto_max <= BISECT_MAX_ROW,
                f"bisect_auto_max must be <= {BISECT_MAX_ROW}",
            ),
            (
                self.cand_bisect_row <= BISECT_MAX_ROW,
                f"cand_bisect_row must be <= {BISECT_MAX_ROW}",
            ),
            (
                self.bracket_sample_per_bin
                < self.bracket_sample
                <= self.bracket_sample_row_max
                <= self.bracket_sample_max,
                "need bracket_sample_per_bin < bracket_sample <= bracket_sample_row_max"
                " <= bracket_sample_max",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"KernelSettings: {message}")


DEFAULT_SETTINGS = KernelSettings()
