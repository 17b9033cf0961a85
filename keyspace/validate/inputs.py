"""validate's inputs: the run folder, its calibration and ranks, checked against the model."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from keyspace.errors import KeyspaceError
from keyspace.loki import K_MODES
from keyspace.loki.api import DEFAULT_K
from keyspace.loki.from_run import key_scales
from keyspace.runfolder.analysis import (
    analyze_hint,
    collect_again,
    queries_hint,
    read_calibration,
    read_ranks,
)
from keyspace.runfolder.store import RunFolder, calibration_path
from keyspace.tasks import load_haystack, make_prompts
from keyspace.validate.config import ValidateConfig
from keyspace.validate.grid import (
    DChoice,
    Keep,
    keeps,
    parse_d,
    parse_k,
    parse_methods,
    parse_names,
    parse_tasks,
    ranks_at,
    with_selects,
)


@dataclass
class Inputs:
    """Everything `run_validate` needs, already checked."""

    run: RunFolder
    components: torch.Tensor  # (layers, kv_heads, D, D) for the chosen rotary kind
    ranks: dict | None
    ds: list[DChoice]
    ks: list[float]
    k_modes: list[str]
    methods: list[str]
    group_select: bool = False
    tasks: tuple[str, ...] = ()  # `--tasks`, "default" expanded; empty: no task stage
    bases: tuple[str, ...] = ("key",)  # `--basis`
    # the query-aware pair (key transform A, query transform B = A^-T), each (layers, kv_heads, D, D)
    score_transforms: tuple[torch.Tensor, torch.Tensor] | None = None
    # basis -> sigma per coordinate of its keys, (layers, kv_heads, D): `key_scales`
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    budgets: list[int] = field(default_factory=list)  # `--budget`: tokens kept per step

    @property
    def keeps(self) -> list[Keep]:
        """Every budget of the grid: the fractions `ks`, then the token `budgets`."""
        return keeps(self.ks, self.budgets)

    @property
    def head_dim(self) -> int:
        return int(self.components.shape[-1])

    def transforms(self, basis: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(key transform, query transform) of `basis`; None as query transform: the same (orthonormal)."""
        if basis != "query-aware":
            return self.components, None
        if self.score_transforms is None:
            raise ValueError("these inputs were opened without the query-aware basis")
        return self.score_transforms

    def key_scale(self, basis: str | None) -> torch.Tensor:
        """sigma per coordinate of `basis`'s keys, (layers, kv_heads, D), for loki-adaptive."""
        if basis not in self.scales:
            raise ValueError(f"these inputs were opened without the {basis} basis' key scales")
        return self.scales[basis]


def open_inputs(config: ValidateConfig) -> Inputs:
    """Open the run, its calibration and ranks; parse the grid. Raises KeyspaceError on bad input."""
    methods = with_selects(parse_methods(config.methods), config.selects)
    k_modes = parse_names(config.k_modes, K_MODES, "--k-mode")
    budgets = list(getattr(config, "budgets", []))
    # --k defaults to 0.125 unless --budget alone is given: then only the token budgets run
    ks = parse_k(config.k) if config.k is not None else ([] if budgets else [DEFAULT_K])
    tasks = tuple(parse_tasks(config.tasks))
    run = RunFolder.open(config.run).require_complete()
    ranks = read_ranks(run.path)  # verified by its checksum
    calibration = read_calibration(run.path, ranks)  # verified against the ranks record
    hint = analyze_hint(run.path)
    if ranks.get("moments_sha256") != run.moments_sha256:
        raise KeyspaceError(
            f"the analysis in {run.path} was computed from other moments than the run holds now.",
            hint,
        )
    if calibration.model_identity and calibration.model_identity != run.model_identity:
        raise KeyspaceError(
            f"{calibration_path(run.path)} was calibrated on {calibration.model_identity}, but the run's model is {run.model_identity}.",
            hint,
        )
    if config.rotary not in calibration.components:
        raise KeyspaceError(f"{calibration_path(run.path)} has no {config.rotary} basis.", hint)
    components = calibration.components[config.rotary]
    ds = parse_d(config.d, components.shape[-1], tuple(components.shape[:2]), ranks, config.rotary)
    group_select = config.gqa_select == "group"
    inputs = Inputs(run, components, ranks, ds, ks, k_modes, methods, group_select, tasks)
    inputs.bases = config.bases
    inputs.budgets = budgets
    if "query-aware" in config.bases:
        inputs.score_transforms = query_aware_transforms(calibration, config.rotary, run)
        inputs.ds = [with_score_dims(d, ranks, config.rotary) for d in ds]
    inputs.scales = key_scales(calibration, config.rotary, config.bases)
    return inputs


def query_aware_transforms(calibration, kind: str, run: RunFolder) -> tuple[torch.Tensor, ...]:
    """The calibration's query-aware pair for `kind` keys: (A, B = A^-T), each (layers, kv_heads, D, D).

    A run collected without queries has none: one KeyspaceError whose hint re-collects it."""
    if not calibration.has_queries:
        return calibration.score_transforms(kind, queries_hint(run.path))
    return calibration.score_transforms(kind, analyze_hint(run.path))


def with_score_dims(d: DChoice, ranks: dict, kind: str) -> DChoice:
    """auto:τ under the query-aware basis takes d per head from the score spectrum's rank@τ."""
    if not d.label.startswith("auto:"):
        return d
    score_ranks = ranks_at(ranks, kind, float(d.label[5:]), "score_rank_at")
    return replace(d, score_dims=score_ranks.clamp(min=1))


def check_lengths(model, lengths: tuple[int, ...], flag: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    for length in lengths:
        if limit is not None and length > limit:
            raise KeyspaceError(
                f"{flag} {length} exceeds the model's limit of {limit} tokens.",
                f"Use lengths up to {limit}.",
            )


def check_task_lengths(model, tokenizer, tasks: tuple[str, ...], config: ValidateConfig) -> None:
    """Before any work: every task length fits the model and holds each task's fixed text."""
    if not tasks:
        return
    check_lengths(model, config.task_lengths, "--task-lengths")
    haystack = load_haystack(config.task_haystack, tokenizer)
    for task in tasks:
        for length in config.task_lengths:
            try:
                make_prompts(task, tokenizer, length, 1, haystack=haystack)
            except ValueError as err:
                raise KeyspaceError(
                    f"--task-lengths {length} is too short for {task} ({err}).",
                    f"Use longer --task-lengths, or leave {task} out of --tasks.",
                ) from None


def calibration_window(inputs: Inputs) -> int | str:
    """The run's collect window as its manifest records it, for validate.json: an int, or the
    lengths joined by + ("1024+8192") for a run of several --window lengths."""
    manifest = inputs.run.manifest
    return manifest.window if manifest.window_counts is None else manifest.window_label


def calibration_window_note(inputs: Inputs, config: ValidateConfig) -> str | None:
    """A note when the query-aware basis meets prompts longer than the calibration's windows.

    Its whitening is fitted on queries at positions below the collect window; on SmolLM2 it lost
    every UUID needle at 8192 tokens when calibrated on 1024-token windows, and matched dense at
    4096 and 8192 tokens when calibrated on 1024- and 8192-token windows mixed in one run
    (docs/notes/adaptive-loki.md), so the note asks for the run's shortest length mixed with the
    longest prompt's. The key basis did not gain from longer windows there, so only the
    query-aware basis gets the note."""
    if "query-aware" not in inputs.bases or not {"loki", "loki-adaptive"} & set(inputs.methods):
        return None
    window = inputs.run.window  # the longest of a run of several window lengths
    lengths = (config.task_lengths if inputs.tasks else ()) + tuple(config.passkey_lengths)
    longest = max(lengths, default=0)
    if longest <= window:
        return None
    lengths = (min(inputs.run.manifest.lengths), longest)
    out = f"{inputs.run.path}-w{lengths[0]}+{longest}"
    again = collect_again(inputs.run.manifest, out, window=lengths)
    label = inputs.run.manifest.window_label
    return (
        f"Note: the query-aware basis was calibrated on {label}-token windows and the longest"
        f" prompt here has {longest} tokens; it can lose long-range retrieval there. To calibrate"
        f" for both lengths in one run: {again}, and validate that run."
    )


def check_model(model, identity: str, inputs: Inputs) -> None:
    """The loaded model must be the one calibrated: same weights and same attention shapes."""
    run = inputs.run
    if identity != run.model_identity:
        raise KeyspaceError(
            f"the model loaded from {run.manifest.model_spec!r} is {identity}, but the run and its calibration are of {run.model_identity}.",
            "Validate with the model the run was collected from, or collect and analyze a new run.",
        )
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    expected = (config.num_hidden_layers, config.num_key_value_heads, head_dim, head_dim)
    if tuple(inputs.components.shape) != expected:
        raise KeyspaceError(
            f"calibration shape {tuple(inputs.components.shape)} does not fit the model {expected}.",
            analyze_hint(run.path),
        )
