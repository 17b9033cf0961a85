"""`keyspace bench`: time the Loki decode kernels against dense SDPA on this machine's GPU."""

from __future__ import annotations

from pathlib import Path

import typer

from keyspace.cli.common import handle_errors, print_json, stderr
from keyspace.errors import KeyspaceError

# Shapes of the aliases keyspace knows, so the bench needs no download: (Hq, Hkv, head_dim).
KNOWN_SHAPES = {"smollm2-135m": (9, 3, 64)}
DEFAULT_POINTS = ((32, 1 / 8), (32, 1 / 4), (16, 1 / 8), (64, 1 / 4))


def model_shapes(spec: str) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of an alias or a local folder holding config.json."""
    if spec in KNOWN_SHAPES:
        return KNOWN_SHAPES[spec]
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise KeyspaceError(
            f"cannot read attention shapes for model {spec!r}.",
            f"Pass an alias ({', '.join(KNOWN_SHAPES)}) or a folder with config.json, "
            "or give --heads, --kv-heads and --head-dim.",
        )
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    config = getattr(config, "text_config", None) or config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


@handle_errors
def command(
    model: str = typer.Option(None, help="Alias or local folder with config.json: its heads."),
    batch: int = typer.Option(16, help="Sequences per decode step."),
    heads: int = typer.Option(None, help="Query heads (default 32, or the model's)."),
    kv_heads: list[int] = typer.Option(None, help="KV heads; repeat for several (default 32, 8)."),
    head_dim: int = typer.Option(None, help="Head dimension (default 128, or the model's)."),
    seq: list[int] = typer.Option(None, help="Cache lengths; repeat (default 4096 16384 32768)."),
    d: list[int] = typer.Option(None, help="Low-rank dims; with --k, every (d, k) pair."),
    k: list[float] = typer.Option(None, help="Kept fraction in (0, 1]; with --d."),
    dtype: str = typer.Option("float16", help="float16, bfloat16 or float32."),
    per_head: bool = typer.Option(True, help="Under GQA also time per-query-head selection."),
    check: bool = typer.Option(True, help="Check the kernels against the fp32 oracle first."),
    out: Path = typer.Option(None, help="Folder for bench_decode.json and bench_decode.md."),
    json_output: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
) -> None:
    """Time one Loki decode step (scores, top-k, sparse attention) against dense SDPA."""
    model_heads = model_shapes(model) if model else (32, None, 128)
    q_heads = heads or model_heads[0]
    dim = head_dim or model_heads[2]
    kv = tuple(kv_heads) if kv_heads else ((model_heads[1],) if model else (32, 8))
    if bool(d) != bool(k):
        raise KeyspaceError("--d and --k go together.", "Give both, e.g. --d 32 --k 0.125.")
    if d:
        points = tuple((dd, kk) for dd in d for kk in k)
    else:  # the defaults assume head_dim 128: keep the ones that fit a smaller head
        points = tuple(p for p in DEFAULT_POINTS if p[0] <= dim) or ((max(1, dim // 4), 1 / 8),)

    from keyspace.kernels.bench import BenchConfig

    try:
        config = BenchConfig(
            batch=batch,
            q_heads=q_heads,
            kv_heads=kv,
            head_dim=dim,
            seqs=tuple(seq) if seq else (4096, 16384, 32768),
            points=points,
            dtype=dtype,
            per_head_under_gqa=per_head,
        )
    except ValueError as err:
        raise KeyspaceError(str(err), "See `keyspace bench --help`.") from None

    import torch

    if not torch.cuda.is_available():
        raise KeyspaceError(
            "keyspace bench needs a CUDA GPU, and torch sees none on this machine.",
            "Run it on a machine with an NVIDIA GPU; the kernels' CPU tests run with `make test`.",
        )
    from keyspace.kernels.bench import check_correctness, markdown_table, run_sweep

    if check:
        for row in check_correctness((dtype,)):
            stderr.print(f"check {row['dtype']} {row['case']}: rel err {row['rel_err']:.1e}")
    result = run_sweep(config, log=stderr.print)
    if out:
        import json

        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_decode.json").write_text(json.dumps(result, indent=2, default=str))
        (out / "bench_decode.md").write_text(markdown_table(result["rows"]) + "\n")
    if json_output:
        print_json(result)
    else:
        print(markdown_table(result["rows"]))
