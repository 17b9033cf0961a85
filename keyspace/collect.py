"""`collect`: run a model over token windows and stream its pre/post-RoPE keys into a run folder.

Crash safety: windows are processed in chunks of `shard_windows`. After each chunk the kept
key shards, then this rank's moments, then this rank's progress file are written atomically;
the progress file is the commit point. `--resume` restarts after the last committed chunk,
so a killed run resumes without duplicating or dropping a window. Data-parallel under
torchrun: rank r takes windows r, r+W, ...; rank 0 merges the moments when all ranks are done.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from keyspace import __version__
from keyspace.capture import arch_spec, capture_keys, head_geometry
from keyspace.checkpoint import Dist, FolderLock, commit_chunk, load_progress
from keyspace.collect_config import CollectConfig
from keyspace.data import load_corpus, tokenize_windows
from keyspace.errors import KeyspaceError
from keyspace.models import load_model
from keyspace.store import (
    KINDS,
    MANIFEST,
    MOMENTS,
    STATE_COMPLETE,
    STATE_PARTIAL,
    Moments,
    RunFolder,
    atomic_path,
    save_moments,
    sha256_file,
    shard_name,
    write_json_atomic,
)

SAMPLE_SEED = 0
# Fields that must match for --resume to continue a run.
RESUME_FIELDS = (
    "model.identity",
    "dataset.source",
    "dataset.corpus_sha256",
    "window",
    "num_windows",
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

    @property
    def tokens_per_second(self) -> float:
        return (self.tokens - self.resumed_windows * self.extra.get("window", 0)) / max(
            self.seconds, 1e-9
        )


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


def _check_out_folder(cfg: CollectConfig) -> dict | None:
    """Return the existing manifest (resume) or None (new run); refuse anything else."""
    manifest = cfg.out / MANIFEST
    if manifest.is_file():
        existing = RunFolder.open(cfg.out).manifest
        if not cfg.resume:
            raise KeyspaceError(
                f"{cfg.out} already holds a run (state={existing.get('state')}).",
                "Pass --resume to continue it, or choose another --out.",
            )
        return existing
    leftovers = (
        [p for p in cfg.out.iterdir() if not p.name.startswith(".lock")] if cfg.out.is_dir() else []
    )
    if leftovers:
        raise KeyspaceError(
            f"{cfg.out} is not empty and holds no keyspace run.",
            "Choose a new or empty --out folder.",
        )
    return None


def _check_resume(existing: dict, fresh: dict) -> None:
    if _get(existing, "model.identity") != _get(fresh, "model.identity"):
        raise KeyspaceError(
            f"the run in {fresh['out']} was collected from a different model ({existing['model'].get('spec')}).",
            "Use the same --model to resume, or choose another --out.",
        )
    diffs = [f for f in RESUME_FIELDS if _get(existing, f) != _get(fresh, f)]
    if diffs:
        detail = ", ".join(f"{f}: {_get(existing, f)!r} vs {_get(fresh, f)!r}" for f in diffs)
        raise KeyspaceError(
            f"cannot resume: the arguments differ from the run's ({detail}).",
            "Resume with the original arguments.",
        )


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KeyspaceError(
            "--device cuda was asked for but no CUDA GPU is visible.", "Use --device cpu."
        )
    return device


def _keep_mask(keep_keys: str, total_tokens: int) -> torch.Tensor:
    """Which global token indices (window * window_len + position) keep their keys."""
    if keep_keys == "all":
        return torch.ones(total_tokens, dtype=torch.bool)
    mask = torch.zeros(total_tokens, dtype=torch.bool)
    if keep_keys != "none":
        generator = torch.Generator().manual_seed(SAMPLE_SEED)
        mask[torch.randperm(total_tokens, generator=generator)[: int(keep_keys)]] = True
    return mask


class ChunkBuffer:
    """Accumulates one chunk's moments updates and kept keys from the capture callback."""

    def __init__(self, moments: dict[str, Moments], keep: torch.Tensor, window: int):
        self.moments, self.keep, self.window = moments, keep, window
        self.kept: dict[tuple[str, int], list[tuple[torch.Tensor, ...]]] = {}
        self.window_ids: torch.Tensor = torch.empty(0, dtype=torch.long)

    def on_keys(self, kind: str, layer: int, keys: torch.Tensor) -> None:
        # keys: (B, T, Hkv, D) for the windows in self.window_ids
        keys = keys.detach().cpu()
        for b, w in enumerate(self.window_ids.tolist()):
            self.moments[kind].add_keys(layer, keys[b])
            mask = self.keep[w * self.window : (w + 1) * self.window]
            if mask.any():
                positions = mask.nonzero().squeeze(1)
                entry = (keys[b][positions].clone(), positions, torch.full_like(positions, w))
                self.kept.setdefault((kind, layer), []).append(entry)


def _write_shards(cfg: CollectConfig, buffer: ChunkBuffer, rank: int, chunk: int) -> list[dict]:
    from safetensors.torch import save_file

    shards = []
    for (kind, layer), entries in sorted(buffer.kept.items()):
        keys, positions, windows = (torch.cat(parts) for parts in zip(*entries, strict=True))
        rel = shard_name(kind, layer, rank, chunk)
        with atomic_path(cfg.out / rel) as tmp:
            save_file(
                {"keys": keys.contiguous(), "positions": positions, "windows": windows}, str(tmp)
            )
        shards.append(
            {
                "kind": kind,
                "layer": layer,
                "index": chunk,
                "rank": rank,
                "path": rel,
                "tokens": int(keys.shape[0]),
                "sha256": sha256_file(cfg.out / rel),
            }
        )
    return shards


def _disk_error(err: OSError, out: Path) -> KeyspaceError:
    what = (
        "the disk is full"
        if err.errno == errno.ENOSPC
        else f"a write failed ({err.strerror or err})"
    )
    return KeyspaceError(
        f"{what} while writing {out}; the run stays partial and resumable.",
        "Free space, then rerun the same command with --resume.",
    )


def _base_manifest(cfg: CollectConfig, loaded: Any, tw: Any, dist: Dist, device: str) -> dict:
    config = loaded.model.config
    heads, kv_heads, head_dim = head_geometry(config)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    n_windows, window = tw.windows.shape
    return {
        "format": "keyspace-run/1",
        "keyspace_version": __version__,
        "out": str(cfg.out),
        "state": STATE_PARTIAL,
        "model": {**loaded.info, "architecture": config.model_type},
        "dtype": cfg.dtype,
        "device": device,
        "dataset": {
            "spec": cfg.dataset,
            "split": cfg.split if cfg.dataset == "wikitext" else None,
            "source": tw.source,
            "corpus_sha256": tw.corpus_sha256,
            "corpus_tokens": tw.corpus_tokens,
            "bos": tw.bos,
        },
        "window": window,
        "num_windows": n_windows,
        "max_tokens": cfg.max_tokens,
        "tokens": n_windows * window,
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
        "shard_windows": cfg.shard_windows,
        "world_size": dist.world,
        "shards": [],
        "moments": None,
    }


def _finalize(cfg: CollectConfig, manifest: dict, dist: Dist, shape: tuple[int, int, int]) -> dict:
    """Rank 0: merge every rank's moments, list every shard, mark the run complete."""
    merged = {k: Moments.zeros(*shape) for k in KINDS}
    shards = []
    for rank in range(dist.world):
        progress, moments = load_progress(cfg.out, rank, shape)
        merged = {k: merged[k].merge(moments[k]) for k in KINDS}
        shards += progress["shards"]
    expected = manifest["num_windows"] * manifest["window"]
    if int(merged["pre"].count[0]) != expected:
        raise KeyspaceError(
            f"merged moments cover {int(merged['pre'].count[0])} tokens, expected {expected}.",
            "Rerun with --resume.",
        )
    save_moments(cfg.out / MOMENTS, merged)
    manifest = {
        **manifest,
        "shards": sorted(shards, key=lambda s: (s["kind"], s["layer"], s["rank"], s["index"])),
    }
    manifest["moments"] = {"path": MOMENTS, "sha256": sha256_file(cfg.out / MOMENTS)}
    manifest["state"] = STATE_COMPLETE
    write_json_atomic(cfg.out / MANIFEST, manifest)
    return manifest


ProgressFn = Callable[[int, int], None]  # (windows done, windows total) for this rank


def collect(cfg: CollectConfig, on_progress: ProgressFn | None = None) -> CollectResult:
    """Collect keys per CollectConfig into cfg.out; see the module docstring for crash safety."""
    dist = Dist.from_env()
    existing = _check_out_folder(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    with FolderLock(cfg.out, dist.rank):
        device = _resolve_device(cfg.device)
        corpus = load_corpus(cfg.dataset, cfg.split)  # before the model: bad data fails fast
        loaded = load_model(cfg.model, cfg.dtype, device)
        arch_spec(
            loaded.model.config
        )  # an unsupported architecture fails before anything is written
        tw = tokenize_windows(corpus, loaded.tokenizer, cfg.window, cfg.max_tokens)
        manifest = _base_manifest(cfg, loaded, tw, dist, device)
        if existing is not None:
            _check_resume(existing, manifest)
            if existing["state"] == STATE_COMPLETE:
                return _result(cfg, existing, 0.0, existing["num_windows"])
        elif dist.rank == 0:
            write_json_atomic(cfg.out / MANIFEST, manifest)
        started = time.perf_counter()
        try:
            done_before = _run_chunks(cfg, loaded.model, tw.windows, manifest, dist, on_progress)
            dist.barrier()
            if dist.rank == 0:
                manifest = _finalize(
                    cfg,
                    manifest,
                    dist,
                    (manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"]),
                )
        except OSError as err:
            raise _disk_error(err, cfg.out) from None
        dist.barrier()
    return _result(cfg, manifest, time.perf_counter() - started, done_before)


def _result(cfg: CollectConfig, manifest: dict, seconds: float, resumed: int) -> CollectResult:
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
    )


def _run_chunks(
    cfg: CollectConfig,
    model: Any,
    windows: torch.Tensor,
    manifest: dict,
    dist: Dist,
    on_progress: ProgressFn | None,
) -> int:
    """Process this rank's remaining chunks; returns how many of its windows were already done."""
    shape = (manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"])
    mine = list(range(dist.rank, windows.shape[0], dist.world))
    chunks = [mine[i : i + cfg.shard_windows] for i in range(0, len(mine), cfg.shard_windows)]
    progress, moments = load_progress(cfg.out, dist.rank, shape)
    keep = _keep_mask(cfg.keep_keys, windows.numel())
    done_before = sum(len(c) for c in chunks[: progress["chunks_done"]])
    done = done_before
    device = next(model.parameters()).device
    if on_progress:
        on_progress(done, len(mine))
    for chunk_index in range(progress["chunks_done"], len(chunks)):
        buffer = ChunkBuffer(moments, keep, windows.shape[1])
        with torch.inference_mode(), capture_keys(model, buffer.on_keys):
            chunk = chunks[chunk_index]
            for start in range(0, len(chunk), cfg.batch_size):
                buffer.window_ids = torch.tensor(chunk[start : start + cfg.batch_size])
                model(windows[buffer.window_ids].to(device), use_cache=False)
                done += len(buffer.window_ids)
                if on_progress:
                    on_progress(done, len(mine))
        progress["shards"] += _write_shards(cfg, buffer, dist.rank, chunk_index)
        progress["chunks_done"] = chunk_index + 1
        commit_chunk(cfg.out, dist.rank, progress, moments)
    return done_before
