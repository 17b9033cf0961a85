"""`keyspace validate`: does Loki keep the model's accuracy at a given d and k, and why.

Stages, each a plain function returning data:
  open_inputs   run folder + calibration + ranks, checked against the model being validated
  sweep_points  the (method, d, k, k_mode) grid, without duplicates for methods that ignore d or k
  run_validate  perplexity for every point, recall vs rank@90, decode check, passkey, byte ceilings
The JSON written from `ValidateResult.to_json()` is documented in docs/validate.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from keyspace.errors import KeyspaceError
from keyspace.loki.grid import (
    RANKS_FILE,
    DChoice,
    SweepPoint,
    parse_d,
    parse_k,
    parse_names,
    ranks_at,
    sweep_points,
)
from keyspace.loki.masked import K_MODES
from keyspace.loki.results import ResultRow, ValidateResult, spearman, speed_ceilings
from keyspace.loki.selection import METHODS

CALIBRATION_FILE = "calibration.safetensors"
RECALL_THRESHOLD = 0.9  # recall is correlated with each head's rank at 90% explained variance
Log = Callable[[str], None]


@dataclass
class ValidateConfig:
    """What to validate. `d`, `k`, `methods`, `k_modes` are the CLI's comma lists, parsed by `open_inputs`."""

    run: Path
    d: str | None = None  # None: half of head_dim
    k: str = "0.125"
    k_modes: str = "window"
    rotary: str = "post"
    methods: str = ",".join(METHODS)
    dataset: str | None = None  # None: WikiText-2 test, else pydoc
    split: str = "test"
    max_tokens: int = 2048
    window: int = 1024
    recall_windows: int = 1
    decode_prompts: int = 2
    decode_tokens: int = 16
    decode_prompt_tokens: int = 128
    passkey_lengths: tuple[int, ...] = ()
    passkey_count: int = 2
    gqa_select: str = "head"  # loki under GQA: one token set per query head, or per KV-head group
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.run = Path(self.run)
        if self.gqa_select not in ("head", "group"):
            raise KeyspaceError(
                f"--gqa-select must be head or group, got {self.gqa_select!r}.",
                "Use head (one token set per query head, as in the paper) or group.",
            )
        if self.rotary not in ("pre", "post"):
            raise KeyspaceError(
                f"--rotary must be pre or post, got {self.rotary!r}.",
                "Use --rotary post (default) or --rotary pre.",
            )
        for name in (
            "max_tokens",
            "window",
            "passkey_count",
            "decode_tokens",
            "decode_prompt_tokens",
        ):
            if getattr(self, name) < 1:
                raise KeyspaceError(
                    f"--{name.replace('_', '-')} must be positive.", "Give a positive integer."
                )
        for name in ("recall_windows", "decode_prompts"):
            if getattr(self, name) < 0:
                raise KeyspaceError(
                    f"--{name.replace('_', '-')} must be 0 or more.", "Use 0 to skip."
                )
        if self.window < 2:
            raise KeyspaceError("--window must be at least 2.", "Try --window 1024.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise KeyspaceError(
                f"--device {self.device}: no CUDA device is visible.", "Use --device cpu."
            )


@dataclass
class Inputs:
    """Everything `run_validate` needs, already checked."""

    run: object  # keyspace.store.RunFolder
    components: torch.Tensor  # (layers, kv_heads, D, D) for the chosen rotary kind
    ranks: dict | None
    ds: list[DChoice]
    ks: list[float]
    k_modes: list[str]
    methods: list[str]
    group_select: bool = False

    @property
    def head_dim(self) -> int:
        return int(self.components.shape[-1])


def open_inputs(config: ValidateConfig) -> Inputs:
    """Open the run, its calibration and ranks; parse the grid. Raises KeyspaceError on bad input."""
    import json

    from keyspace.calibration import load_calibration
    from keyspace.store import RunFolder

    methods = parse_names(config.methods, tuple(METHODS), "--methods")
    k_modes = parse_names(config.k_modes, K_MODES, "--k-mode")
    ks = parse_k(config.k)
    run = RunFolder.open(config.run).require_complete()
    cal_path = run.path / CALIBRATION_FILE
    if not cal_path.is_file():
        raise KeyspaceError(
            f"run {run.path} has no {CALIBRATION_FILE}.",
            f"Run `keyspace analyze {run.path}` first.",
        )
    calibration = load_calibration(cal_path)
    if calibration.model_identity and calibration.model_identity != run.model_identity:
        raise KeyspaceError(
            f"{cal_path} was calibrated on {calibration.model_identity}, but the run's model is {run.model_identity}.",
            f"Re-run `keyspace analyze {run.path}` so the calibration matches the run.",
        )
    if config.rotary not in calibration.components:
        raise KeyspaceError(
            f"{cal_path} has no {config.rotary} basis.", f"Re-run `keyspace analyze {run.path}`."
        )
    components = calibration.components[config.rotary]
    ranks_path = run.path / RANKS_FILE
    ranks = json.loads(ranks_path.read_text()) if ranks_path.is_file() else None
    ds = parse_d(config.d, components.shape[-1], tuple(components.shape[:2]), ranks, config.rotary)
    return Inputs(run, components, ranks, ds, ks, k_modes, methods, config.gqa_select == "group")


def check_passkey_lengths(model, lengths: tuple[int, ...]) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    for length in lengths:
        if limit is not None and length > limit:
            raise KeyspaceError(
                f"--passkey-lengths {length} exceeds the model's limit of {limit} tokens.",
                f"Use lengths up to {limit}.",
            )


def check_model(model, identity: str, inputs: Inputs) -> None:
    """The loaded model must be the one calibrated: same weights and same attention shapes."""
    run = inputs.run
    if identity != run.model_identity:
        raise KeyspaceError(
            f"the model loaded from {run.manifest['model']['spec']!r} is {identity}, but the run and its calibration are of {run.model_identity}.",
            "Validate with the model the run was collected from, or collect and analyze a new run.",
        )
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    expected = (config.num_hidden_layers, config.num_key_value_heads, head_dim, head_dim)
    if tuple(inputs.components.shape) != expected:
        raise KeyspaceError(
            f"calibration shape {tuple(inputs.components.shape)} does not fit the model {expected}.",
            f"Re-run `keyspace analyze {run.path}`.",
        )


def settings_for(point: SweepPoint, inputs: Inputs):
    from keyspace.loki.masked import SparseSettings

    spec = METHODS[point.method]
    return SparseSettings(
        point.method,
        k=point.k if point.k is not None else 1.0,
        k_mode=point.k_mode or "window",
        dims=point.d.dims if point.d is not None else None,
        basis=inputs.components if spec.uses_basis else None,
        group_select=inputs.group_select and point.method == "loki",
    )


def measure_perplexity(
    model, windows: torch.Tensor, point: SweepPoint, inputs: Inputs, log: Log
) -> ResultRow:
    from keyspace.loki.evaluate import perplexity
    from keyspace.loki.selection import kv_bytes_fraction

    label = f"{point.method} d={point.d.label if point.d else '-'} k={point.k or '-'} {point.k_mode or ''}"
    result = perplexity(model, windows, settings_for(point, inputs))
    log(f"{label}: ppl {result.ppl:.3f} ({result.seconds:.0f} s)")
    d_mean = point.d.mean if point.d else None
    return ResultRow(
        point.method,
        point.d.value if point.d else None,
        d_mean,
        point.k,
        point.k_mode,
        result.ppl,
        result.nll,
        result.tokens,
        result.predicted_tokens,
        kv_bytes_fraction(point.method, d_mean, point.k, inputs.head_dim),
        result.seconds,
    )


def recall_entry(
    model, windows: torch.Tensor, d: DChoice, k: float, k_mode: str, inputs: Inputs, kind: str
) -> dict:
    """Loki's recall per (layer, query head) at one (d, k), and its link to each head's rank@90."""
    from keyspace.loki.evaluate import loki_recall
    from keyspace.loki.masked import SparseSettings

    recall = loki_recall(
        model,
        windows,
        SparseSettings("loki", k, k_mode, d.dims, inputs.components, inputs.group_select),
    )
    groups = recall.mass.shape[1] // d.dims.shape[1]
    relative = recall.mass / recall.exact_mass.clamp(min=1e-12)  # Loki's mass / the best possible
    entry = {
        "d": d.value,
        "k": k,
        "k_mode": k_mode,
        "rows": recall.rows,
        "topk_recall": recall.topk.tolist(),
        "mass_recall": recall.mass.tolist(),
        "exact_topk_mass": recall.exact_mass.tolist(),
        "relative_mass_recall": relative.tolist(),
        "per_layer": {
            "topk_recall": recall.topk.mean(1).tolist(),
            "mass_recall": recall.mass.mean(1).tolist(),
            "exact_topk_mass": recall.exact_mass.mean(1).tolist(),
            "relative_mass_recall": relative.mean(1).tolist(),
        },
        "rank_kind": kind,
        "rank_threshold": RECALL_THRESHOLD,
        "rank": None,
        "spearman_rank_vs_topk": None,
        "spearman_rank_vs_mass": None,
        "spearman_rank_vs_relative_mass": None,
    }
    try:
        rank = ranks_at(inputs.ranks, kind, RECALL_THRESHOLD).repeat_interleave(
            groups, dim=1
        )  # [L, Hq]
    except KeyspaceError:
        return entry
    entry.update(
        rank=rank.tolist(),
        spearman_rank_vs_topk=spearman(rank, recall.topk),
        spearman_rank_vs_mass=spearman(rank, recall.mass),
        spearman_rank_vs_relative_mass=spearman(rank, relative),
    )
    return entry


def default_dataset(log: Log) -> str:
    """WikiText-2 when it can be found (hub or local copy), else the embedded pydoc corpus."""
    from keyspace.data import load_corpus

    try:
        load_corpus("wikitext", "test")
        return "wikitext"
    except KeyspaceError as err:
        log(f"WikiText-2 not available ({err.message}); evaluating on pydoc.")
        return "pydoc"


def run_validate(config: ValidateConfig, log: Log = lambda _: None) -> ValidateResult:
    """Open, load, check, then measure every sweep point on the same windows."""
    from keyspace import __version__
    from keyspace.data import load_token_windows
    from keyspace.loki.stages import decode_entries, decode_prompts, measured_speed, passkey_entries
    from keyspace.models import load_model

    inputs = open_inputs(config)
    loaded = load_model(
        inputs.run.manifest["model"]["spec"], dtype=config.dtype, device=config.device
    )
    check_model(loaded.model, loaded.identity, inputs)
    check_passkey_lengths(loaded.model, config.passkey_lengths)
    dataset = config.dataset or default_dataset(log)
    windows = load_token_windows(
        dataset, loaded.tokenizer, config.window, config.max_tokens, config.split
    )
    if (
        config.decode_prompts and "loki" in inputs.methods
    ):  # fail now, not after the perplexity passes
        decode_prompts(windows, config.decode_prompts, config.decode_prompt_tokens)
    log(
        f"evaluating on {windows.shape[0]} windows of {windows.shape[1]} tokens from {dataset} ({config.split})"
    )
    rows = [
        measure_perplexity(loaded.model, windows, p, inputs, log)
        for p in sweep_points(inputs.methods, inputs.ds, inputs.ks, inputs.k_modes)
    ]
    sample = windows[: config.recall_windows]
    recall = [
        recall_entry(loaded.model, sample, d, k, inputs.k_modes[0], inputs, config.rotary)
        for d in inputs.ds
        for k in inputs.ks
        if "loki" in inputs.methods and config.recall_windows > 0
    ]
    decode = decode_entries(loaded.model, windows, inputs, config, log)
    passkey = passkey_entries(loaded.model, loaded.tokenizer, inputs, config, log)
    header = {
        "keyspace_version": __version__,
        "run": str(inputs.run.path),
        "model": {"spec": inputs.run.manifest["model"]["spec"], "identity": loaded.identity},
        "dataset": {
            "spec": dataset,
            "split": config.split,
            "window": config.window,
            "windows": int(windows.shape[0]),
        },
        "rotary": config.rotary,
        "gqa_select": config.gqa_select,
        "head_dim": inputs.head_dim,
        "k_modes": inputs.k_modes,
        "grid": {"d": [d.value for d in inputs.ds], "k": inputs.ks, "methods": inputs.methods},
        "device": config.device,
        "dtype": config.dtype,
    }
    result = ValidateResult(header, rows, recall, decode, passkey)
    result.speed = speed_ceilings(rows)
    result.speed["measured"] = measured_speed(loaded.model, inputs, config, log)
    return result
