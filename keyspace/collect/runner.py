"""`collect`: run a model over token windows and stream its pre/post-RoPE keys (and, with
`--capture keys,queries`, its queries' moments) into a run folder.

Crash safety: windows are processed in chunks of `shard_windows`. After each chunk the kept
key shards, then this rank's moments, then this rank's progress file are written atomically;
the progress file is the commit point. `--resume` restarts after the last committed chunk,
so a killed run resumes without duplicating or dropping a window. Data-parallel under
torchrun: rank r takes windows r, r+W, ...; rank 0 merges the moments when all ranks are done.

Repair: `--resume` first verifies every committed file by sha256, also on a complete run. A
missing or damaged shard has its chunk's windows recomputed (keys only: the chunk's moments are
committed); a damaged progress or moments file restarts that rank; then rank 0 merges again.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from keyspace import __version__
from keyspace.collect.capture import capture_keys
from keyspace.collect.checkpoint import (
    Dist,
    FolderLock,
    RankState,
    commit_chunk,
    final_problems,
    load_progress,
    write_progress,
)
from keyspace.collect.chunks import (
    ChunkBuffer,
    WindowLayout,
    keep_mask,
    require_kinds,
    write_shards,
    zero_moments,
)
from keyspace.collect.config import CAPTURES, CollectConfig, window_label
from keyspace.collect.corpora import load_corpus, tokenize_windows
from keyspace.errors import FileSystemError, Interrupted, KeyspaceError
from keyspace.models.arch import arch_spec, head_geometry
from keyspace.models.loading import load_model
from keyspace.models.placement import input_device, placed_map
from keyspace.runfolder.progress import rank_chunks
from keyspace.runfolder.store import (
    MANIFEST,
    MOMENTS,
    STATE_COMPLETE,
    STATE_PARTIAL,
    RunFolder,
    check_writable,
    is_lock_file,
    progress_path,
    resume_command,
    run_capture,
    save_moments,
    unverified_manifest,
    write_manifest,
)

# Fields that must match for --resume to continue a run.
RESUME_FIELDS = (
    "model.identity",
    "dataset.source",
    "dataset.corpus_sha256",
    "window",
    "num_windows",
    "window_counts",
    "keep_keys",
    "dtype",
    "world_size",
    "shard_windows",
)


@dataclass
class CollectResult:
    out: Path
    state: str
    windows: int
    tokens: int
    seconds: float
    model_identity: str
    shards: int
    resumed_windows: int = 0
    extra: dict = field(default_factory=dict)
    resumed_tokens: int = 0
    repairs: list[str] = field(default_factory=list)  # what --resume found damaged and recomputed
    window_note: str = ""  # the auto --window fell back to its first length on a short corpus

    @property
    def tokens_per_second(self) -> float:
        return (self.tokens - self.resumed_tokens) / max(self.seconds, 1e-9)


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


def _check_out_folder(cfg: CollectConfig) -> tuple[dict | None, str | None]:
    """(the existing manifest (resume) or None (new run), the repair made); refuse anything else.

    With --resume, a damaged or deleted manifest is rebuilt from the copy in rank 0's progress;
    the repair says so (collect prints it as a `Repaired:` line).
    """
    repair = None
    if (cfg.out / MANIFEST).exists() or progress_path(cfg.out, 0).is_file():
        try:
            existing = RunFolder.open(cfg.out).manifest.to_json()
        except KeyspaceError as err:
            existing = unverified_manifest(cfg.out)  # rebuilt by finalizing again
            if not cfg.resume or existing is None:
                raise
            repair = f"{err.message.rstrip('.')}; rebuilt from the copy kept with the progress."
        if not cfg.resume:
            raise KeyspaceError(
                f"{cfg.out} already holds a run (state={existing.get('state')}).",
                "Pass --resume to continue it, or choose another --out.",
            )
        return existing, repair
    leftovers = [p for p in cfg.out.iterdir() if not is_lock_file(p)] if cfg.out.is_dir() else []
    if leftovers:
        raise KeyspaceError(
            f"{cfg.out} is not empty and holds no keyspace run.",
            "Choose a new or empty --out folder.",
        )
    return None, None


def _check_resume(existing: dict, fresh: dict) -> None:
    if _get(existing, "model.identity") != _get(fresh, "model.identity"):
        raise KeyspaceError(
            f"the run in {fresh['out']} was collected from a different model ({existing['model'].get('spec')}).",
            "Use the same --model to resume, or choose another --out.",
        )
    if run_capture(existing) != tuple(fresh["capture"]):
        raise KeyspaceError(
            f"cannot resume: the run captured {','.join(run_capture(existing))}, not {','.join(fresh['capture'])}.",
            f"Resume with --capture {','.join(run_capture(existing))}, or collect into a new --out.",
        )
    diffs = [f for f in RESUME_FIELDS if _get(existing, f) != _get(fresh, f)]
    if diffs:
        detail = ", ".join(f"{f}: {_get(existing, f)!r} vs {_get(fresh, f)!r}" for f in diffs)
        hint = "Resume with the original arguments."
        recorded = existing.get("max_tokens", fresh["max_tokens"])
        if recorded != fresh["max_tokens"]:  # e.g. a run made before --max-tokens' default changed
            hint = f"Resume with the original arguments: --max-tokens {recorded or 'all'}."
        raise KeyspaceError(f"cannot resume: the arguments differ from the run's ({detail}).", hint)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KeyspaceError(
            "--device cuda was asked for but no CUDA GPU is visible.", "Use --device cpu."
        )
    return device


def _stopped(cfg: CollectConfig, err: FileSystemError | None = None) -> tuple[str, str]:
    """(what happened to the run, how to go on) after Ctrl-C or a failed write."""
    try:
        run = RunFolder.open(cfg.out)
        if run.is_complete:
            return f"the run in {cfg.out} is unchanged and complete", ""
        manifest = run.manifest.to_json()
    except KeyspaceError:
        manifest = unverified_manifest(cfg.out)
    if manifest is None:
        return f"nothing was committed to {cfg.out}", "Run the same command again."
    go_on = f"resume with `{resume_command(manifest, cfg.out)}`; committed chunks are kept."
    first = "Fix the cause"
    if err is not None and err.no_space:
        first = "Free some space"
    elif err is not None and err.code == errno.EISDIR:
        first = "Remove the folder that stands where a file should be"
    if err is None:
        return "the run stays partial and resumable", go_on[0].upper() + go_on[1:]
    return "the run stays partial and resumable", f"{first}, then {go_on}"


def _placement_options(cfg: CollectConfig) -> dict:
    """The --device-map, --max-memory and --offload-folder the user gave, as given, for the
    resume command to repeat; {} without them (such a run's manifest is unchanged)."""
    given = {
        "device_map": cfg.device_map,
        "max_memory": cfg.max_memory,
        "offload_folder": None if cfg.offload_folder is None else str(cfg.offload_folder),
    }
    given = {name: value for name, value in given.items() if value is not None}
    return {"placement_options": given} if given else {}


def _base_manifest(cfg: CollectConfig, loaded: Any, tw: Any, dist: Dist, device: str) -> dict:
    config = loaded.model.config
    heads, kv_heads, head_dim = head_geometry(config)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    n_windows = sum(tw.counts)
    # Several --window lengths: "window" is their label "1024+8192", plus the windows of each.
    counts = {"window_counts": list(tw.counts)} if len(tw.counts) > 1 else {}
    return {
        "format": "keyspace-run/1",
        "keyspace_version": __version__,
        "out": str(cfg.out),
        "state": STATE_PARTIAL,
        "model": {**loaded.info, "architecture": config.model_type},
        "dtype": cfg.dtype,
        "device": device,
        "device_map": placed_map(loaded.model, cfg.placement),
        **_placement_options(cfg),
        "dataset": {
            "spec": cfg.dataset,
            "split": cfg.split if cfg.dataset == "wikitext" else None,
            "source": tw.source,
            "corpus_sha256": tw.corpus_sha256,
            "corpus_tokens": tw.corpus_tokens,
            "bos": tw.bos,
        },
        "window": window_label(tw.lengths),
        "num_windows": n_windows,
        **counts,
        "max_tokens": cfg.max_tokens,
        "tokens": sum(n * length for n, length in zip(tw.counts, tw.lengths, strict=True)),
        "num_layers": config.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "rotary": {
            "theta": rope.get("rope_theta", getattr(config, "rope_theta", None)),
            "type": rope.get("rope_type", "default"),
            "partial_rotary_factor": partial,
            "rotary_dim": int(head_dim * partial),
        },
        "keep_keys": cfg.keep_keys,
        "capture": list(cfg.capture),
        "shard_windows": cfg.shard_windows,
        "world_size": dist.world,
        "shards": [],
        "moments": None,
    }


def _finalize(cfg: CollectConfig, manifest: dict, dist: Dist, shape: tuple[int, int, int]) -> dict:
    """Rank 0: merge every rank's verified moments, list every shard, mark the run complete."""
    merged = zero_moments(cfg.capture, shape)
    shards = []
    for rank in range(dist.world):
        total = len(rank_chunks(manifest["num_windows"], rank, dist.world, cfg.shard_windows))
        state = load_progress(cfg.out, rank, shape, total)
        if not state.clean or state.progress["chunks_done"] != total:
            raise KeyspaceError(
                f"rank {rank}'s progress in {cfg.out} changed while it was being merged ({'; '.join(state.notes)}).",
                f"Resume again with `{resume_command(manifest, cfg.out)}`.",
            )
        require_kinds(state.moments, cfg.capture, f"rank {rank}'s progress in {cfg.out}")
        merged = {k: merged[k].merge(state.moments[k]) for k in merged}
        shards += state.progress["shards"]
    expected = manifest["tokens"]
    if int(merged["pre"].count[0]) != expected:
        raise KeyspaceError(
            f"merged moments cover {int(merged['pre'].count[0])} tokens, expected {expected}.",
            f"Resume again with `{resume_command(manifest, cfg.out)}`.",
        )
    manifest = {
        **manifest,
        "shards": sorted(shards, key=lambda s: (s["kind"], s["layer"], s["rank"], s["index"])),
        "moments": {"path": MOMENTS, "sha256": save_moments(cfg.out / MOMENTS, merged)},
        "state": STATE_COMPLETE,
    }
    write_manifest(cfg.out, manifest)
    return manifest


# (windows done, windows total, tokens done), for this rank
ProgressFn = Callable[[int, int, int], None]


def collect(cfg: CollectConfig, on_progress: ProgressFn | None = None) -> CollectResult:
    """Collect keys per CollectConfig into cfg.out; see the module docstring for crash safety.

    Ctrl-C raises `Interrupted` and a failed write a `FileSystemError`, each saying how to resume.
    """
    dist = Dist.from_env()
    existing, repair = _check_out_folder(cfg)
    if cfg.capture is None:  # a new run records both; a resumed one what it recorded
        cfg = replace(cfg, capture=run_capture(existing) if existing is not None else CAPTURES)
    check_writable(cfg.out)
    try:
        try:
            with FolderLock(cfg.out, dist.rank):
                result = _collect(cfg, existing, dist, on_progress)
                result.repairs[:0] = [repair] if repair else []
                return result
        except OSError as err:  # one that escaped the write boundary (a read, a lock)
            raise FileSystemError(err.filename or cfg.out, err) from None
    except KeyboardInterrupt:
        what, hint = _stopped(cfg)
        raise Interrupted(f"collect stopped; {what}.", hint) from None
    except FileSystemError as err:
        if (cfg.out / MANIFEST).exists():
            what, err.hint = _stopped(cfg, err)
            err.message = f"{err.message} {what[0].upper()}{what[1:]}."
        raise


def short_corpus_note(cfg: CollectConfig, tw: Any) -> str:
    """The line collect prints when the auto --window fell back to its first length."""
    lengths, first = cfg.window_lengths, cfg.window_lengths[0]
    return (
        f"Note: the corpus gives {tw.corpus_tokens} tokens, fewer than one window of each of"
        f" {window_label(lengths)} (at least {len(lengths) * max(lengths)} tokens), so every"
        f" window has {first} tokens; the query-aware basis from them can lose long-range"
        f" retrieval past {first} tokens. Give more text for the default mixed windows."
    )


def _collect(
    cfg: CollectConfig, existing: dict | None, dist: Dist, on_progress: ProgressFn | None
) -> CollectResult:
    placement = cfg.placement and cfg.placement.with_scratch(cfg.out)  # scratch offload: in the run
    device = _resolve_device(cfg.device) if placement is None else None
    corpus = load_corpus(cfg.dataset, cfg.split)  # before the model: bad data fails fast
    loaded = load_model(cfg.model, cfg.dtype, device, placement)
    device = device or str(input_device(loaded.model))
    arch_spec(loaded.model.config)  # an unsupported architecture fails before anything is written
    tw = tokenize_windows(
        corpus,
        loaded.tokenizer,
        cfg.window_lengths,
        cfg.max_tokens,
        short_corpus_fallback=cfg.window_auto,
    )
    note = short_corpus_note(cfg, tw) if tw.fell_back else ""
    if tw.fell_back:  # the manifest records what was cut, and a resume reads it back
        cfg = replace(cfg, window=cfg.window_lengths[0], window_note=note)
    manifest = _base_manifest(cfg, loaded, tw, dist, device)
    if existing is not None:
        _check_resume(existing, manifest)
    shape = (manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"])
    n_windows = manifest["num_windows"]
    totals = [
        len(rank_chunks(n_windows, r, dist.world, cfg.shard_windows)) for r in range(dist.world)
    ]
    states = [load_progress(cfg.out, r, shape, totals[r]) for r in range(dist.world)]
    dist.barrier()  # every rank has read every rank's files before any rank writes
    repairs: list[str] = []
    if existing is not None and existing["state"] == STATE_COMPLETE:
        repairs = final_problems(cfg.out, existing, states, totals)
        if not repairs:
            return _result(cfg, existing, 0.0, n_windows, existing["tokens"])
    else:
        repairs = [note for state in states for note in state.notes]
    if dist.rank == 0:  # partial until _finalize: a repair in progress is not a complete run
        write_manifest(cfg.out, manifest)
    started = time.perf_counter()
    layout = WindowLayout(tw.groups)
    done_before, tokens_before = _run_chunks(
        cfg, loaded.model, layout, manifest, dist, states[dist.rank], on_progress
    )
    dist.barrier()
    if dist.rank == 0:
        manifest = _finalize(cfg, manifest, dist, shape)
    dist.barrier()
    result = _result(cfg, manifest, time.perf_counter() - started, done_before, tokens_before)
    result.repairs, result.window_note = repairs, note
    return result


def _result(
    cfg: CollectConfig, manifest: dict, seconds: float, resumed: int, resumed_tokens: int
) -> CollectResult:
    return CollectResult(
        out=cfg.out,
        state=manifest["state"],
        windows=manifest["num_windows"],
        tokens=manifest["tokens"],
        seconds=seconds,
        model_identity=manifest["model"]["identity"],
        shards=len(manifest["shards"]),
        resumed_windows=resumed,
        extra={"window": manifest["window"]},
        resumed_tokens=resumed_tokens,
    )


def _run_chunks(
    cfg: CollectConfig,
    model: Any,
    windows: WindowLayout,
    manifest: dict,
    dist: Dist,
    state: RankState,
    on_progress: ProgressFn | None,
) -> tuple[int, int]:
    """Recompute this rank's damaged chunks, then process its remaining ones; returns how many of
    its windows (and of their tokens) were already done."""
    shape = (manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"])
    chunks = rank_chunks(len(windows), dist.rank, dist.world, cfg.shard_windows)
    progress, moments = state.progress, state.moments
    progress["manifest"] = {k: v for k, v in manifest.items() if k not in ("shards", "moments")}
    if progress["chunks_done"]:
        require_kinds(moments, cfg.capture, f"rank {dist.rank}'s progress in {cfg.out}")
    for kind, zeros in zero_moments(cfg.capture, shape).items():
        moments.setdefault(kind, zeros)  # a fresh rank's state holds the key kinds only
    keep = keep_mask(cfg.keep_keys, windows.total_tokens)
    device = input_device(model)  # under a device map: where the embeddings run
    for chunk_index in state.redo:  # the chunk's moments are committed: recompute its keys only
        buffer = ChunkBuffer(zero_moments(cfg.capture, shape), keep, windows.offsets)
        _forward(model, windows, chunks[chunk_index], buffer, cfg, device)
        kept = [s for s in progress["shards"] if s["index"] != chunk_index]
        progress["shards"] = kept + write_shards(cfg.out, buffer, dist.rank, chunk_index)
        write_progress(cfg.out, dist.rank, progress)
    committed = [w for c in chunks[: progress["chunks_done"]] for w in c]
    done_before, tokens_before = len(committed), windows.tokens_of(committed)
    done = [done_before, tokens_before]
    total = sum(len(c) for c in chunks)

    def tick(window_ids: list[int]) -> None:
        done[0] += len(window_ids)
        done[1] += windows.tokens_of(window_ids)
        if on_progress:
            on_progress(done[0], total, done[1])

    tick([])
    for chunk_index in range(progress["chunks_done"], len(chunks)):
        buffer = ChunkBuffer(moments, keep, windows.offsets)
        _forward(model, windows, chunks[chunk_index], buffer, cfg, device, tick)
        progress["shards"] += write_shards(cfg.out, buffer, dist.rank, chunk_index)
        progress["chunks_done"] = chunk_index + 1
        commit_chunk(cfg.out, dist.rank, progress, moments)
    return done_before, tokens_before


def _forward(
    model: Any,
    windows: WindowLayout,
    chunk: list[int],
    buffer: ChunkBuffer,
    cfg: CollectConfig,
    device: Any,
    tick: Callable[[list[int]], None] | None = None,
) -> None:
    """Run the model over one chunk's windows (batches of --batch-size, each of one window
    length), capturing into `buffer`."""
    on_queries = buffer.on_queries if "queries" in cfg.capture else None
    with torch.inference_mode(), capture_keys(model, buffer.on_keys, on_queries):
        for ids, tokens in windows.batches(chunk, cfg.batch_size):
            buffer.window_ids = torch.tensor(ids)
            model(tokens.to(device), use_cache=False)
            if tick:
                tick(ids)
