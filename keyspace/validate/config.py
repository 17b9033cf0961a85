"""`ValidateConfig`: every validate option, declared once.

Each field's metadata carries its CLI flag and help, so `keyspace validate` is built from these
fields (keyspace.cli.options) rather than repeating them. No torch import at module level:
the CLI reads this module at start-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from keyspace.errors import KeyspaceError
from keyspace.models.placement import placement_from_options
from keyspace.options import (
    ABSURD,
    device_map_option,
    max_memory_option,
    offload_folder_option,
    option,
    parse_int_fields,
    parse_int_list,
    parse_positive_ints,
)

Log = Callable[[str], None]
# `keyspace.tasks.HAYSTACKS`, spelled out for the same reason (tests check they agree).
TASK_HAYSTACKS = ("filler", "wikitext", "pydoc")
# Above this (16M tokens) a `--budget` is a typo; `keyspace bench --budget` takes the same bound.
MAX_BUDGET = 1 << 24
# Loki's bases: "key" = PCA of the keys (the paper; transforms A = B orthonormal), "query-aware" =
# the score basis A = Uᵀ S_q^½, B = A⁻ᵀ (docs/validate.md).
BASES = ("key", "query-aware")
# Loki's coordinate choice (`Loki(select=...)`): "fixed" runs method loki, "adaptive" loki-adaptive.
SELECTS = ("fixed", "adaptive")


@dataclass
class ValidateConfig:
    """What to validate. `d`, `k`, `methods`, `k_modes` are comma lists, parsed into the grid."""

    run: Path = option(
        "--run", "Run folder with calibration (from `keyspace analyze`).", ..., short="-r"
    )
    d: str | None = option(
        "--d", "Low-rank dims: 32, 16,32,64, or auto:0.9 (per head rank). Default: head_dim/2."
    )
    k: str | None = option(
        "--k",
        "Fractions of context kept, in (0, 1]: 0.125 or 0.125,0.25. Default: 0.125, none when"
        " only --budget is given.",
    )
    budget: str | None = option(
        "--budget",
        "Tokens kept per step, min(budget, context): 2048 or 512,2048; beside --k, rows for each.",
    )
    k_modes: str = option("--k-mode", "Budget protocol: window, row, or window,row.", "window")
    gqa_select: str = option(
        "--gqa-select",
        "Loki under GQA: one token set per query head (paper) or per KV-head group.",
        "head",
    )
    rotary: str = option("--rotary", "Which calibrated basis: post- or pre-RoPE keys.", "post")
    basis: str = option(
        "--basis",
        "Loki's basis: key (PCA of keys, the paper), query-aware (scores as queries see them), or key,query-aware.",
        "key",
    )
    select: str = option(
        "--select",
        "Loki's coordinates: fixed (the first d, the paper), adaptive (r = d chosen per step from"
        " the query: the loki-adaptive rows), or fixed,adaptive (both, at the same d, k, basis).",
        "fixed",
    )
    methods: str = option(
        "--methods",
        "Comma list of methods (loki, loki-adaptive, sparq, ...; a wrong name lists them all), and"
        " default for every method of the default grid.",
        "default",
    )
    dataset: str | None = option(
        "--dataset", "wikitext, pydoc, a .txt file or folder. Default: WikiText-2 test, else pydoc."
    )
    split: str = option("--split", "Split for wikitext.", "test")
    max_tokens: int = option(
        "--max-tokens", "Evaluation tokens (whole windows) per method.", 2048, bounds=(1, ABSURD)
    )
    window: int = option("--window", "Tokens per evaluation window.", 1024, bounds=(2, 1 << 20))
    recall_windows: int = option(
        "--recall-windows",
        "Windows used for the recall-vs-rank study (0: skip).",
        1,
        bounds=(0, 1 << 20),
    )
    decode_prompts: int = option(
        "--decode-prompts", "Prompts for the real-decoding check (0: skip).", 2, bounds=(0, 1 << 20)
    )
    decode_prompt_tokens: int = option(
        "--decode-prompt-tokens", "Tokens per decode prompt.", 128, bounds=(1, 1 << 20)
    )
    decode_tokens: int = option(
        "--decode-tokens", "Greedy tokens generated per prompt.", 16, bounds=(1, 1 << 20)
    )
    passkey_lengths: tuple[int, ...] = option(
        "--passkey-lengths",
        "Passkey prompt lengths, e.g. 2048,8192 (empty: skip).",
        (),
        cli_type=str,
    )
    passkey_count: int = option(
        "--passkey-count",
        "Passkey prompts per length (depths spread evenly).",
        2,
        bounds=(1, 1 << 20),
    )
    tasks: str = option(
        "--tasks",
        "Long-context tasks: a comma list (niah,mv-niah,...) or default (empty: skip).",
        "",
    )
    task_lengths: tuple[int, ...] = option(
        "--task-lengths",
        "Task prompt lengths in tokens, answer included.",
        (2048, 4096),
        cli_type=str,
    )
    task_count: int = option(
        "--task-count", "Prompts per task and length.", 10, bounds=(1, 1 << 20)
    )
    task_batch: int = option(
        "--task-batch",
        "Task prompts decoded together (a cell's prompts share one length).",
        8,
        bounds=(1, 1 << 16),
    )
    task_haystack: str = option(
        "--task-haystack",
        "Text the needles hide in: filler, wikitext, pydoc or a .txt path.",
        "filler",
    )
    device: str | None = option("--device", "cpu (the default) or cuda. Not with --device-map.")
    device_map: str | None = device_map_option()
    max_memory: str | None = max_memory_option()
    offload_folder: Path | None = offload_folder_option()
    dtype: str = option("--dtype", "float32, float16 or bfloat16.", "float32")
    speed: bool = option(
        "--speed/--no-speed", "On CUDA, also time the kernels and the decode loop.", True
    )

    def __post_init__(self) -> None:
        self.run = Path(self.run)
        parse_int_fields(self)
        self.passkey_lengths = parse_positive_ints(
            self.passkey_lengths, "--passkey-lengths", 1 << 24
        )
        self.task_lengths = parse_positive_ints(self.task_lengths, "--task-lengths", 1 << 24)
        budgets = (
            () if self.budget is None else parse_int_list(self.budget, "--budget", 1, MAX_BUDGET)
        )
        self.budgets = sorted(set(budgets))
        self._check_tasks()
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
        if not self.bases or any(name not in BASES for name in self.bases):
            raise KeyspaceError(
                f"--basis must be key, query-aware or both, got {self.basis!r}.",
                "Use --basis key (default, the paper), query-aware, or key,query-aware.",
            )
        if not self.selects or any(name not in SELECTS for name in self.selects):
            raise KeyspaceError(
                f"--select must be fixed, adaptive or both, got {self.select!r}.",
                "Use --select fixed (default, the paper), adaptive, or fixed,adaptive.",
            )
        self.placement = placement_from_options(
            self.device, self.device_map, self.max_memory, self.offload_folder
        )
        if self.placement is None:
            self.device = self.device or "cpu"
            self._check_device()
        else:  # no single device: the CUDA-graph speed stages, which need one, are skipped
            self.device = "device-map"

    def _check_tasks(self) -> None:
        if self.tasks.strip() and not self.task_lengths:
            raise KeyspaceError("--task-lengths is empty.", "Example: --task-lengths 2048,4096.")
        if self.task_haystack not in TASK_HAYSTACKS and not Path(self.task_haystack).exists():
            raise KeyspaceError(
                f"--task-haystack {self.task_haystack!r} is not {', '.join(TASK_HAYSTACKS)} or an existing path.",
                "Use --task-haystack filler, wikitext or pydoc, or give a .txt file or folder.",
            )

    @property
    def selects(self) -> tuple[str, ...]:
        """`--select` as names, each once, in the order given."""
        return tuple(dict.fromkeys(p.strip() for p in self.select.split(",") if p.strip()))

    @property
    def bases(self) -> tuple[str, ...]:
        """`--basis` as names, each once, in the order given."""
        return tuple(dict.fromkeys(p.strip() for p in self.basis.split(",") if p.strip()))

    def _check_device(self) -> None:
        if not self.device.startswith("cuda"):
            if self.device != "cpu":
                raise KeyspaceError(f"--device {self.device!r} is unknown.", "Use cpu or cuda.")
            return
        import torch

        if not torch.cuda.is_available():
            raise KeyspaceError(
                f"--device {self.device}: no CUDA device is visible.", "Use --device cpu."
            )
