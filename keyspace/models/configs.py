"""Named model shapes with random weights: `--model config:llama3-70b` for collect and validate,
`--config` for the benchmarks. The GPU host has no model hub; speed and the dispatch path do not
depend on the weights.

A random-init model is drawn per module from a seed: `torch.manual_seed(seed + i)` before the
i-th module with parameters is initialized, on the device it lives on. So the same spec gives the
same weights on every run whose modules are drawn on the same device types (CPU and CUDA draw
different numbers); the identity names those device types, and validate refuses a run whose
identity differs.
"""

from __future__ import annotations

from typing import Any

from keyspace.errors import KeyspaceError

# Each alias's architecture, so its shapes (or a random-init twin) need no download.
ALIAS_CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "rope_theta": 1e5,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    },
}


def alias_config(name: str) -> Any:
    """The transformers `PretrainedConfig` of an alias, built without downloading its weights."""
    from transformers import AutoConfig

    if name not in ALIAS_CONFIGS:
        raise KeyspaceError(f"unknown model alias {name!r}.", f"Known: {', '.join(ALIAS_CONFIGS)}.")
    settings = dict(ALIAS_CONFIGS[name])
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


CONFIG_PREFIX = "config:"
RANDOM_SEED = 0
_LLAMA = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "head_dim": 128,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}
# Real shapes, random weights. The aliases' shapes (smollm2-135m) come from ALIAS_CONFIGS.
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        **_LLAMA,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
    },
    "llama2-7b": {
        **_LLAMA,
        "intermediate_size": 11008,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "rope_theta": 10000.0,
    },
    "llama3-70b": {
        **_LLAMA,
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "intermediate_size": 28672,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
    },
}
CONFIG_NAMES = (*MODEL_CONFIGS, *ALIAS_CONFIGS)


def named_config(name: str) -> Any:
    """The transformers config of a named shape."""
    from transformers import AutoConfig

    if name in ALIAS_CONFIGS:
        return alias_config(name)
    if name not in MODEL_CONFIGS:
        raise KeyspaceError(
            f"unknown model shape {name!r}.", f"Known shapes: {', '.join(CONFIG_NAMES)}."
        )
    settings = dict(MODEL_CONFIGS[name])
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


def _module_devices(model: Any, device_map: dict) -> dict[str, str]:
    """The device each module's own parameters are drawn on: its map entry's (longest prefix),
    "cpu" for the CPU and the disk, "cuda:N" for GPU N."""
    placed = {}
    for name, _ in model.named_modules():
        owner = max(
            (k for k in device_map if k == "" or name == k or name.startswith(k + ".")),
            key=len,
            default=None,
        )
        if owner is None:
            continue
        device = device_map[owner]
        placed[name] = f"cuda:{device}" if isinstance(device, int) else device
        if placed[name] == "disk":
            placed[name] = "cpu"
    return placed


def draw_weights(model: Any, devices: dict[str, str], seed: int) -> None:
    """Materialize every module of a model built on the meta device, on its device, seeded per
    module; then tie the weights the config ties."""
    import torch

    for index, (name, module) in enumerate(model.named_modules()):
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        module.to_empty(device=devices.get(name, "cpu"), recurse=False)
        torch.manual_seed(seed + index)
        model._init_weights(module)
    model.tie_weights()


def random_model(name: str, dtype: Any, device: str, placement: Any = None) -> tuple[Any, str]:
    """(a random-init model of a named shape, its identity), on `device` or spread by the
    `Placement`: built on the meta device, each module drawn where the map puts it, then
    dispatched by accelerate (no full copy on the CPU first)."""
    from accelerate import dispatch_model, init_empty_weights
    from transformers import AutoModelForCausalLM

    from keyspace.models.placement import offload_folder, remove_with, strategy_map

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(named_config(name), dtype=dtype)
    if placement is None:
        device_map = {"": device}
    elif isinstance(placement.device_map, dict):
        device_map = placement.device_map
    else:
        device_map = strategy_map(model, placement, dtype)
    devices = _module_devices(model, device_map)
    draw_weights(model, devices, RANDOM_SEED)
    if placement is None:
        model.to(device)
    else:
        folder, cleanup = offload_folder(placement)
        remove_with(model, cleanup)
        model = dispatch_model(model, device_map, offload_dir=folder)
        model.hf_device_map = device_map
    kinds = "+".join(sorted({d.split(":")[0] for d in devices.values()}))
    return model.eval(), f"random:{name}:seed={RANDOM_SEED}:drawn-on={kinds}"


def random_tokenizer() -> Any:
    """A byte-level tokenizer that needs no files (ids below 259 fit every shape's vocabulary)."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer(extra_ids=0)
