"""`run_validate`: load the run's model, check it against the calibration, then run every stage
on the same token windows. The JSON written from `ValidateResult.to_json()` is documented in
docs/validate.md.
"""

from __future__ import annotations

from pathlib import Path

from keyspace import __version__
from keyspace.collect.corpora import load_corpus, load_token_windows
from keyspace.errors import KeyspaceError
from keyspace.models.loading import load_model
from keyspace.models.placement import placed_map
from keyspace.runfolder.store import check_writable, validate_dir
from keyspace.validate.config import Log, ValidateConfig
from keyspace.validate.grid import sweep_points
from keyspace.validate.inputs import (
    Inputs,
    calibration_window,
    calibration_window_note,
    check_lengths,
    check_model,
    check_task_lengths,
    open_inputs,
)
from keyspace.validate.results import ValidateResult, speed_ceilings, write_outputs
from keyspace.validate.stages import (
    TASK_SEED,
    decode_entries,
    decode_prompts,
    measure_perplexity,
    measured_decode,
    measured_speed,
    passkey_entries,
    recall_entry,
    task_entries,
)


def default_dataset(log: Log) -> str:
    """WikiText-2 when it can be found (hub or local copy), else the embedded pydoc corpus."""
    try:
        load_corpus("wikitext", "test")
        return "wikitext"
    except KeyspaceError as err:
        log(f"WikiText-2 not available ({err.message}); evaluating on pydoc.")
        return "pydoc"


def task_setup(inputs: Inputs, config: ValidateConfig) -> dict | None:
    """How the `tasks` rows were made; None when no task ran."""
    if not inputs.tasks:
        return None
    return {
        "tasks": list(inputs.tasks),
        "lengths": list(config.task_lengths),
        "count": config.task_count,
        "haystack": config.task_haystack,
        "seed": TASK_SEED,
        "batch": config.task_batch,
    }


def validate_into(
    config: ValidateConfig, out: Path | None, log: Log = lambda _: None
) -> tuple[dict, list[Path]]:
    """What `keyspace validate` does: open the run's inputs, check the output folder (default
    <run>/validate) is writable before any work, run, then write validate.json and the report."""
    inputs = open_inputs(config)
    run = inputs.run.path  # the default folder lies inside the run: no link on the way to it
    out = check_writable(out) if out else check_writable(validate_dir(run), root=run)
    doc = run_validate(config, log, inputs).to_json()
    return doc, write_outputs(doc, out)


def run_validate(
    config: ValidateConfig, log: Log = lambda _: None, inputs: Inputs | None = None
) -> ValidateResult:
    """Open, load, check, then measure every sweep point on the same windows."""
    inputs = inputs or open_inputs(config)
    note = calibration_window_note(inputs, config)
    if note:
        log(note)
    # with --device-map and no --offload-folder, disk weights go to a scratch folder in the
    # system's temp folder (the run may be read-only), removed when the model is freed
    loaded = load_model(
        inputs.run.manifest.model_spec, config.dtype, config.device, config.placement
    )
    check_model(loaded.model, loaded.identity, inputs)
    check_lengths(loaded.model, config.passkey_lengths, "--passkey-lengths")
    check_task_lengths(loaded.model, loaded.tokenizer, inputs.tasks, config)
    dataset = config.dataset or default_dataset(log)
    windows = load_token_windows(
        dataset, loaded.tokenizer, config.window, config.max_tokens, config.split
    )
    if (
        config.decode_prompts and "loki" in inputs.methods
    ):  # fail now, not after the perplexity passes
        decode_prompts(windows, config.decode_prompts, config.decode_prompt_tokens)
    log(
        f"evaluating on {windows.shape[0]} window{'s' * (windows.shape[0] != 1)} of"
        f" {windows.shape[1]} tokens from {dataset} ({config.split})"
    )
    rows = [
        measure_perplexity(loaded.model, windows, p, inputs, log)
        for p in sweep_points(
            inputs.methods, inputs.ds, inputs.ks, inputs.k_modes, inputs.bases, inputs.budgets
        )
    ]
    sample = windows[: config.recall_windows]
    recall = [
        recall_entry(loaded.model, sample, d, keep, inputs.k_modes[0], inputs, config.rotary, basis)
        for basis in inputs.bases
        for d in inputs.ds
        for keep in inputs.keeps
        if "loki" in inputs.methods and config.recall_windows > 0
    ]
    decode = decode_entries(loaded.model, windows, inputs, config, log)
    passkey = passkey_entries(loaded.model, loaded.tokenizer, inputs, config, log)
    tasks = task_entries(loaded.model, loaded.tokenizer, inputs, config, log)
    header = {
        "keyspace_version": __version__,
        "run": str(inputs.run.path),
        "model": {"spec": inputs.run.manifest.model_spec, "identity": loaded.identity},
        "dataset": {
            "spec": dataset,
            "split": config.split,
            "window": config.window,
            "windows": int(windows.shape[0]),
        },
        "calibration_window": calibration_window(inputs),
        "rotary": config.rotary,
        "basis": list(inputs.bases),
        "gqa_select": config.gqa_select,
        "head_dim": inputs.head_dim,
        "k_modes": inputs.k_modes,
        "grid": {
            "d": [d.value for d in inputs.ds],
            "k": inputs.ks,
            "k_budget": inputs.budgets,
            "methods": inputs.methods,
        },
        "device": config.device,
        "device_map": placed_map(loaded.model, config.placement),
        "dtype": config.dtype,
        "task_setup": task_setup(inputs, config),
    }
    result = ValidateResult(header, rows, recall, decode, passkey, tasks=tasks)
    result.speed = speed_ceilings(rows)
    if config.speed:
        result.speed["measured"] = measured_speed(loaded.model, inputs, config, log)
        result.speed["decode"] = measured_decode(loaded.model, inputs, config, log)
    else:
        result.speed["measured"] = result.speed["decode"] = None
    return result
