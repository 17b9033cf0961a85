"""validate's inputs: the run folder, its calibration and ranks, checked against the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keyspace.analyze import analyze_hint, read_calibration, read_ranks
from keyspace.errors import KeyspaceError
from keyspace.loki import K_MODES, METHODS
from keyspace.store import RunFolder, calibration_path
from keyspace.validate.config import ValidateConfig
from keyspace.validate.grid import DChoice, parse_d, parse_k, parse_names


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

    @property
    def head_dim(self) -> int:
        return int(self.components.shape[-1])


def open_inputs(config: ValidateConfig) -> Inputs:
    """Open the run, its calibration and ranks; parse the grid. Raises KeyspaceError on bad input."""
    methods = parse_names(config.methods, tuple(METHODS), "--methods")
    k_modes = parse_names(config.k_modes, K_MODES, "--k-mode")
    ks = parse_k(config.k)
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
            analyze_hint(run.path),
        )
