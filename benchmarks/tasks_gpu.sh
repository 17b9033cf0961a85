#!/usr/bin/env bash
# The issue-17 task table on one CUDA GPU with the real SmolLM2-135M-Instruct weights.
#
# The device tool sends at most 64 MiB per call and the GGUF is 98 MB, so it travels in two halves
# (split -b 49181216 -d <gguf> gguf.part) over two calls to a warm machine; /tmp survives between
# calls while the machine stays warm. Stages, one per call:
#   part1 DIR [smoke]    keep DIR/gguf.part00 in /tmp/parts; with `smoke`, also smoke-test the task
#                        path on a random-init twin (about 190 s)
#   prepare DIR [extra collect flags]   join DIR/gguf.part01 to it, check the sha256, collect +
#                        analyze on WikiText-2 valid (1024-token windows unless e.g. --window 8192)
#   tasks OUT LENGTHS HAYSTACK TASKS [extra validate flags]   50 prompts per cell into $OUT/OUT;
#                        a flag given again (--methods, --d, --k, ...) replaces the grid's;
#                        RUN=/tmp/run-mixed takes another calibration run
#   mixed [extra collect flags]   a second calibration run, /tmp/run-mixed, from 1024- and
#                        8192-token windows (16384 tokens of each)
#   ppl OUT [extra validate flags]   perplexity on 16 windows of 1024 tokens of WikiText-2 test,
#                        row and window modes, the issue-23 grid, into $OUT/OUT
# Needs: .whl (the gguf wheel), .gpu/wt/{valid,test}.txt (WikiText-2), .gpu/smol-tok (tokenizer+config).
# Set-up here, once (.gpu/ and .whl/ are in .git/info/exclude; carry them by name):
#   mkdir -p .gpu/p1 .gpu/p2 .gpu/wt .whl && cp ../shared/data/wikitext-2/*.txt .gpu/wt/
#   split -b 49181216 -d ~/.cache/keyspace/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/gguf.part
#   mv /tmp/gguf.part00 .gpu/p1/ && mv /tmp/gguf.part01 .gpu/p2/
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl gguf==0.19.0
#   .venv/bin/python -c "from keyspace.models.loading import load_model; m = load_model('smollm2-135m'); \
#     m.tokenizer.save_pretrained('.gpu/smol-tok'); m.model.config.save_pretrained('.gpu/smol-tok')"
# Then, back to back (the machine stays warm 30 s after a call):
#   run(carry=[.gpu/p1, .whl, .gpu/smol-tok, .gpu/wt]):  bash benchmarks/tasks_gpu.sh part1 .gpu/p1 smoke
#   run(carry=[.gpu/p2, .whl, .gpu/smol-tok, .gpu/wt]):  bash benchmarks/tasks_gpu.sh prepare .gpu/p2 && \
#       bash benchmarks/tasks_gpu.sh tasks t8192 8192 filler niah-word,niah-uuid,mv-niah
set -u -o pipefail
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
export PYTHONUNBUFFERED=1 KEYSPACE_HOME=/tmp/ks KEYSPACE_WIKITEXT_DIR=$PWD/.gpu/wt
mkdir -p /tmp/site
python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/gguf-*.whl
for pair in typer:typer rich:rich seaborn:seaborn markdown_it:markdown_it_py mdurl:mdurl shellingham:shellingham; do
  python3 -c "import ${pair%%:*}" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/${pair##*:}-*.whl
done
export PYTHONPATH=$PWD:/tmp/site
ks() { python3 -m keyspace "$@"; }
GRID=(--d 16,32 --k 0.125,0.25 --basis key,query-aware --methods loki,full,exact-topk,sparq,h2o,streaming)

case "$1" in
part1)
  mkdir -p /tmp/parts && cp "$2"/gguf.part00 /tmp/parts/ && ls -l /tmp/parts
  [ "${3:-}" = smoke ] || exit 0
  python3 - <<'PY'
import torch
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.from_pretrained(".gpu/smol-tok")
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config).save_pretrained("/tmp/smol")
import glob, shutil
for f in glob.glob(".gpu/smol-tok/*"):
    if "tokenizer" in f or f.endswith(".jinja"):
        shutil.copy(f, "/tmp/smol/")
PY
  ks collect --model /tmp/smol --dataset "$KEYSPACE_WIKITEXT_DIR/valid.txt" --out /tmp/smoke --max-tokens 4096 --device cuda 2>&1 | tail -2
  ks analyze /tmp/smoke 2>&1 | tail -2
  ks validate --run /tmp/smoke "${GRID[@]}" --tasks niah,mv-niah --task-lengths 1024,8192 --task-count 2 --task-batch 2 \
    --max-tokens 1024 --recall-windows 0 --decode-prompts 0 --no-speed --device cuda --out "$OUT/smoke" 2>&1 | tail -45
  ;;
prepare)
  mkdir -p $KEYSPACE_HOME/models/smollm2-135m
  gguf=$KEYSPACE_HOME/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
  cat /tmp/parts/gguf.part00 "$2"/gguf.part01 > $gguf.tmp || exit 1
  echo "$GGUF_SHA256  $gguf.tmp" | sha256sum -c || exit 1
  mv $gguf.tmp $gguf
  shift 2
  ks collect --model smollm2-135m --dataset "$KEYSPACE_WIKITEXT_DIR/valid.txt" --out /tmp/run --max-tokens 16384 --device cuda "$@" 2>&1 | tail -3
  ks analyze /tmp/run 2>&1 | tail -3
  ;;
mixed)
  shift 1
  ks collect --model smollm2-135m --dataset "$KEYSPACE_WIKITEXT_DIR/valid.txt" --out /tmp/run-mixed \
    --window 1024,8192 --max-tokens 32768 --device cuda "$@" 2>&1 | tail -3
  ks analyze /tmp/run-mixed 2>&1 | tail -3
  ;;
ppl)
  out=$2; shift 2
  mkdir -p "$OUT"
  ks validate --run "${RUN:-/tmp/run}" --methods full,exact-topk,sparq,loki --select fixed,adaptive \
    --basis key,query-aware --d 16,32 --k 0.0625,0.125 --k-mode row,window --max-tokens 16384 \
    --window 1024 --recall-windows 0 --decode-prompts 0 --no-speed --device cuda \
    --out "$OUT/$out" "$@" 2>&1 | tee "$OUT/$out.log" | tail -60
  ;;
tasks)
  out=$2 lengths=$3 haystack=$4 tasks=$5; shift 5
  mkdir -p "$OUT"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  ks validate --run "${RUN:-/tmp/run}" "${GRID[@]}" --tasks "$tasks" --task-lengths "$lengths" --task-haystack "$haystack" \
    --task-count 50 --task-batch 50 --max-tokens 1024 --recall-windows 0 --decode-prompts 0 --no-speed \
    --device cuda --out "$OUT/$out" "$@" 2>&1 | tee "$OUT/$out.log" | tail -100  # a cut-off call still returns its log
  ;;
esac
