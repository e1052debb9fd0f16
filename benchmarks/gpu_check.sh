#!/usr/bin/env bash
# GPU readiness check (issue 8, part 6), meant to finish in under 5 minutes on one lent CUDA machine:
#   1. the `gpu`-marked tests (every CUDA backend against the exact product, forward and input gradient);
#   2. benchmarks/bench_kernels.py on CUDA at Llama-2-7B's shapes, M = 1, 16, 512, bf16;
#   3. a tiny end-to-end run through the CLI on the device: quantize (GPTQ 4-bit) a small random LLaMA built here
#      (byte-level tokenizer; the embedded model's 0.5 GB cache cannot travel to an offline machine), fine-tune it
#      for 5 steps, evaluate 8 GSM8K test questions; accuracy means nothing here, that every stage runs does;
#      and, where a vLLM environment is there (GPU_CHECK_VLLM_PYTHON, else python3 when it imports vllm, else
#      .venv-vllm/bin/python), the same evaluation with --engine vllm (its stage is "skipped" otherwise);
#   4. one JSON line on stdout, last: {"check": "gpu", ...} with the test outcome, the benchmark's JSON and the
#      end-to-end stages' exit codes, seconds, and the eval summary's kernels.
# GSM8K comes from $GSM8K_DIR, else ../shared/data/gsm8k, else runs/gpu_data/gsm8k (copy it there and carry it).
#
#     bash benchmarks/gpu_check.sh                      # from the repository root of a fresh checkout
#     GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 GPU_CHECK_PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#                                                       # dry run of the script itself on the CPU
#
# Assumptions, written down because the GPU machine is not the CPU development machine:
# - python3 (>= 3.11) there already holds a CUDA build of torch (and triton, for the triton backend). Its version may
#   differ from the CPU pin (torch 2.13.0), so nothing here installs torch: the venv is made with
#   --system-site-packages (under runs/, which git ignores) and `python3 -m pip install -e .[dev]` finds torch
#   already satisfied.
# - The machine may be offline (the lent machines here are). Then that install fails, and the script falls back to
#   `pip install --no-deps --no-build-isolation -e .` and, failing that, to PYTHONPATH=src; the tests and the
#   benchmark need only torch, transformers, tokenizers and pytest, which such images hold.
# - Outputs (logs and JSON) go to $OUT when it is set (the lent machine's return folder), else to runs/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE="${GPU_CHECK_DEVICE:-cuda}"
OUT_DIR="${OUT:-runs/gpu_check}"
mkdir -p "$OUT_DIR"
START=$(date +%s)

HAS_CUDA="import torch, sys; sys.exit(not torch.cuda.is_available())"
if [ "$DEVICE" = cuda ] && ! "${GPU_CHECK_PYTHON:-python3}" -c "$HAS_CUDA" 2>/dev/null; then
    echo "gpu_check: python3's torch sees no CUDA device (set GPU_CHECK_DEVICE=cpu for a dry run)" >&2
    exit 2
fi

# ---------------------------------------------------------------------------------------------- environment
VENV=runs/gpu_check/venv  # under runs/, which git ignores
PIP_OFFLINE_SAFE=(--retries 0 --timeout 10)  # an offline machine fails fast instead of retrying for minutes
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then  # an environment that is ready (the dry run uses the CPU venv)
    PY="$GPU_CHECK_PYTHON"
    INSTALL="given interpreter $PY + PYTHONPATH=src"
elif python3 -m venv --system-site-packages "$VENV" >/dev/null 2>&1; then
    PY="$VENV/bin/python"
    if "$PY" -m pip install -q "${PIP_OFFLINE_SAFE[@]}" -e ".[dev]" >"$OUT_DIR/pip.log" 2>&1; then
        INSTALL="pip install -e .[dev]"
    elif "$PY" -m pip install -q "${PIP_OFFLINE_SAFE[@]}" --no-deps --no-build-isolation -e . \
            >>"$OUT_DIR/pip.log" 2>&1; then
        INSTALL="pip install --no-deps -e . (offline)"
    else
        INSTALL="PYTHONPATH=src (offline, no editable install)"
    fi
else
    PY=python3
    INSTALL="PYTHONPATH=src (no venv)"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
VERSIONS=$("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')
echo "gpu_check: $VERSIONS; $INSTALL" >&2

# ---------------------------------------------------------------------------------------------- 1. gpu tests
# Only the kernel and layer tests: other test modules need packages (datasets, gguf, peft) a GPU image may lack.
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/quant/kernels tests/quant/test_linear.py \
    --junitxml="$OUT_DIR/gpu_tests.xml" >"$OUT_DIR/gpu_tests.log" 2>&1
TESTS_RC=$?
tail -n 15 "$OUT_DIR/gpu_tests.log" >&2

# ---------------------------------------------------------------------------------------------- 2. kernels
BENCH_ARGS=(--device "$DEVICE" --shapes 7b --m 1,16,512 --dtypes bf16 --threads 4 --min-time 0.1)
if [ -n "${GPU_CHECK_QUICK:-}" ]; then
    BENCH_ARGS=(--device "$DEVICE" --shapes smol --m 1,16 --dtypes bf16 --threads 2 --quick
                --configs torch-bf16,dequant-gemm,int4-aten)
fi
timeout 240 "$PY" benchmarks/bench_kernels.py "${BENCH_ARGS[@]}" \
    >"$OUT_DIR/bench_kernels.log" 2>"$OUT_DIR/bench_kernels.err"
BENCH_RC=$?
sed -n '/^## /,$p' "$OUT_DIR/bench_kernels.log" | grep -v '^{' >&2
tail -n 1 "$OUT_DIR/bench_kernels.log" >"$OUT_DIR/bench_kernels.json"

# ---------------------------------------------------------------------------------------------- 3. end to end
for d in "${GSM8K_DIR:-}" ../shared/data/gsm8k runs/gpu_data/gsm8k; do
    if [ -n "$d" ] && [ -f "$d/test.jsonl" ]; then export GSM8K_DIR="$d"; break; fi
done
E2E="$OUT_DIR/e2e"
rm -rf "$E2E" && mkdir -p "$E2E"
"$PY" - "$E2E/tiny" <<'PYEOF' >"$E2E/build.log" 2>&1
import sys
sys.path.insert(0, "tests")
from conftest import make_tiny_llama, make_tiny_tokenizer  # offline: a byte-level tokenizer built in memory
make_tiny_llama(num_layers=4, hidden=256, intermediate=512).save_pretrained(sys.argv[1])
make_tiny_tokenizer().save_pretrained(sys.argv[1])
PYEOF
CLI=("$PY" -m gptqlora.cli)
stage() {  # stage NAME ARGS...: run one CLI stage, log it, record "NAME rc seconds"
    local name=$1; shift
    local t0=$(date +%s%N)
    timeout "${STAGE_TIMEOUT:-120}" "${CLI[@]}" "$@" >"$E2E/$name.log" 2>&1
    local rc=$?
    echo "$name $rc $(( ($(date +%s%N) - t0) / 1000000 ))" >>"$E2E/stages.txt"  # milliseconds
    tail -n 3 "$E2E/$name.log" >&2
}
stage quantize quantize --model "$E2E/tiny" --device "$DEVICE" --out "$E2E/quantized" --group-size 32 \
    --calib-samples 8 --calib-seqlen 64
stage finetune finetune --quantized "$E2E/quantized" --device "$DEVICE" --out "$E2E/finetune" --max-steps 5 \
    --train-limit 40 --eval-holdout 4 --batch-size 2 --max-length 128
stage eval eval --quantized "$E2E/quantized" --adapter "$E2E/finetune/lora_adapter" --device "$DEVICE" \
    --limit 8 --max-new-tokens 32 --batch-size 8 --output-dir "$E2E/eval"
VLLM_PY="${GPU_CHECK_VLLM_PYTHON:-}"
if [ -z "$VLLM_PY" ] && python3 -c "import vllm" >/dev/null 2>&1; then VLLM_PY=$(command -v python3); fi
if [ -z "$VLLM_PY" ] && [ -x .venv-vllm/bin/python ]; then VLLM_PY=.venv-vllm/bin/python; fi
if [ -n "$VLLM_PY" ]; then  # vLLM's server start takes a minute or two
    STAGE_TIMEOUT=400 stage eval_vllm eval --quantized "$E2E/quantized" --adapter "$E2E/finetune/lora_adapter" \
        --device "$DEVICE" --limit 8 --max-new-tokens 32 --batch-size 8 --output-dir "$E2E/eval_vllm" \
        --engine vllm --vllm-python "$VLLM_PY"
else
    echo "eval_vllm skipped: no vLLM environment on this machine" >>"$E2E/skipped.txt"
fi

# ---------------------------------------------------------------------------------------------- 4. one JSON line
"$PY" - "$OUT_DIR" "$TESTS_RC" "$BENCH_RC" "$START" "$INSTALL" <<'EOF'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path

import torch

out, install = Path(sys.argv[1]), sys.argv[5]
tests_rc, bench_rc, start = (int(v) for v in sys.argv[2:5])

tests = {"exit_code": tests_rc}
try:
    suite = ET.parse(out / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests |= {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except (OSError, ET.ParseError, AttributeError) as e:
    tests["report_error"] = str(e)
try:
    bench = json.loads((out / "bench_kernels.json").read_text())
except (OSError, ValueError) as e:
    bench = {"error": f"no JSON from bench_kernels ({e}); see bench_kernels.err"}
e2e: dict = {}
try:
    for line in (out / "e2e" / "stages.txt").read_text().splitlines():
        name, rc, ms = line.split()
        e2e[name] = {"exit_code": int(rc), "seconds": round(int(ms) / 1000, 1)}
    summary = json.loads((out / "e2e" / "eval" / "summary.json").read_text())
    e2e["eval"] |= {"n": summary["n"], "kernels": summary.get("kernels"), "dtype": summary["provenance"]["dtype"]}
except (OSError, ValueError, KeyError) as e:
    e2e["report_error"] = str(e)
if (out / "e2e" / "skipped.txt").is_file():
    e2e["eval_vllm"] = {"skipped": (out / "e2e" / "skipped.txt").read_text().strip()}
elif "eval_vllm" in e2e:
    try:
        summary = json.loads((out / "e2e" / "eval_vllm" / "summary.json").read_text())
        e2e["eval_vllm"] |= {"n": summary["n"], "engine": summary["provenance"].get("engine"),
                             "accuracy": summary["greedy"]["accuracy"]}
    except (OSError, ValueError, KeyError) as e:
        e2e["eval_vllm"]["report_error"] = str(e)
e2e_ok = [e2e.get(s, {}).get("exit_code") for s in ("quantize", "finetune", "eval")] == [0, 0, 0]
print(json.dumps({"check": "gpu", "ok": tests_rc == 0 and bench_rc == 0 and e2e_ok, "install": install,
                  "torch": torch.__version__, "cuda": torch.version.cuda,
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                  "gpu_tests": tests, "bench_kernels_exit": bench_rc, "bench_kernels": bench, "end_to_end": e2e,
                  "wall_s": round(time.time() - start, 1)}))
EOF
