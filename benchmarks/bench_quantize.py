"""Quantization benchmark on the embedded SmolLM2-135M: float vs RTN vs GPTQ's column orders (vs gptqmodel).

Each configuration runs in a fresh subprocess (clean peak memory and timing) on the same calibration windows
(GSM8K train, ``--calib-samples`` x ``--calib-seqlen`` tokens) and is scored by teacher-forced perplexity of the
first ``--ppl-limit`` GSM8K test solutions. Rows are ``<method>-<all|attn>`` (see METHODS: ``gptq`` is QuantConfig's
defaults, ``gptq-plain`` the solver before issue 9). With ``--gptqmodel-python`` (a Python whose environment has
gptqmodel) the yardstick quantizes the same windows with gptqmodel's defaults, and our loader reads its checkpoint.
The row ``layer-7b-down`` measures the solver alone: peak RSS and time of solving and packing one Llama-2-7B
down_proj (K = 11008). The rows ``bnb-nf4`` and ``torchao-nf4`` are QLoRA's 4-bit base, the yardsticks of
``bench_train.py`` built by its own functions: every block linear in NF4 (blocks of 64, the absmax double-quantized;
bitsandbytes' ``Linear4bit`` and torchao's ``NF4Tensor``), computing in the model's dtype as the other rows do; each
is skipped with a note when its package (the ``yardsticks`` extra) is missing. Their "RTN gap closed" is against
``rtn-all``.

    python benchmarks/bench_quantize.py [--configs float,gptq-all,...] [--damp-percent 0.05] [--calib-calculator]
    python benchmarks/bench_quantize.py --configs layer-7b-down
    python benchmarks/bench_quantize.py --configs float,rtn-all,gptq-all,bnb-nf4,torchao-nf4 --ppl-limit 100

Prints a Markdown table, then the figures as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_common_args, config_names, cpu_seconds, current_rss_mb, environment,  # noqa: E402
                    finish, markdown_table, materialize, parse_args, peak_rss_mb, reset_peak_rss, run_child,
                    setup_child)

# QuantConfig fields per method; "gptq" is QuantConfig's defaults. --damp-percent overrides every row's damping but
# gptq-plain's, which is the solver as it was before issue 9 (columns in their natural order, damping 0.01).
METHODS = {
    "rtn": dict(method="rtn"),
    "gptq": dict(method="gptq"),
    "gptq-plain": dict(method="gptq", act_order=False, static_groups=False, group_aware=False, damp_percent=0.01),
    "gptq-gar": dict(method="gptq", act_order=False, static_groups=False, group_aware=True),  # g_idx = k // g
    "gptq-act": dict(method="gptq", act_order=True, static_groups=False),  # desc_act: g_idx permuted
    "gptq-actstatic": dict(method="gptq", act_order=True, static_groups=True),  # act-order, grids up front
}
# NF4 of every block linear, QLoRA's grid, built as bench_train's yardsticks are (blocks of 64): row -> its package.
NF4_ROWS = {"bnb-nf4": "bitsandbytes", "torchao-nf4": "torchao"}
NAMES = (["float"] + [f"{m}-{t}" for t in ("all", "attn") for m in METHODS] + list(NF4_ROWS)
         + ["gptqmodel-all", "layer-7b-down"])
DEFAULT_CONFIGS = (["float"] + [f"{m}-{t}" for t in ("all", "attn") for m in ("rtn", "gptq", "gptq-plain", "gptq-act")]
                   + list(NF4_ROWS))

GPTQMODEL_SCRIPT = r"""
import json, os, sys, time
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # gptqmodel 7.7 needs >= 2 CPU workers on a 2-core host
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer
from gptqmodel import GPTQModel, QuantizeConfig
model_dir, calib_file, out, group_size, dtype = sys.argv[1:6]
ids = load_file(calib_file)["input_ids"]
calibration = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
# gptqmodel 7.7's defaults, spelled out: group-aware reordering, damping 0.05.
config = QuantizeConfig(bits=4, group_size=int(group_size), sym=True, desc_act=False, damp_percent=0.05,
                        act_group_aware=True)
model = GPTQModel.load(model_dir, config, device="cpu", dtype=getattr(torch, dtype))
start = time.perf_counter()
model.quantize(calibration, batch_size=1, tokenizer=AutoTokenizer.from_pretrained(model_dir))
seconds = time.perf_counter() - start
model.save(out)
print("GPTQMODEL_RESULT " + json.dumps({"seconds": seconds}))
"""


def child(args: argparse.Namespace) -> dict:
    """One configuration: load, (quantize), score. Returns its row."""
    import torch
    from safetensors.torch import load_file

    from bench_train import block_weight_bytes
    from gptqlora.workflows.base import weight_bytes
    from gptqlora.config import QuantConfig
    from gptqlora.eval.perplexity import gsm8k_answer_loss
    from gptqlora.models import embedded_model_dir, load_model
    from gptqlora.quant.checkpoint import load_quantized
    from gptqlora.quant.driver import quantize_model_weights

    setup_child(args)
    name = args.one
    if name == "layer-7b-down":
        return layer_memory(args)
    calib = load_file(args.calib_file)["input_ids"]
    row: dict = {}
    if name == "gptqmodel-all":
        if not args.gptqmodel_python:
            raise SystemExit("gptqmodel-all needs --gptqmodel-python (a Python whose environment has gptqmodel)")
        out = Path(args.workdir) / name
        proc = subprocess.run([args.gptqmodel_python, "-c", GPTQMODEL_SCRIPT, str(embedded_model_dir()),
                               args.calib_file, str(out), str(args.group_size), args.gptqmodel_dtype],
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("GPTQMODEL_RESULT ")), None)
        if line is None:
            raise RuntimeError(f"gptqmodel failed:\n{proc.stderr[-3000:]}")
        row["quantize_s"] = json.loads(line.split(" ", 1)[1])["seconds"]
        model, tokenizer, _ = load_quantized(out)  # our loader reads gptqmodel's GPTQ v1 checkpoint
        model.float()
    else:
        model, tokenizer = load_model(args.model)
        materialize(model)  # copy out of the file's memory map so RSS is the model as held
        row["weight_bytes_before"] = weight_bytes(model)
        if name in NF4_ROWS:
            from bench_train import to_bnb_nf4, to_torchao_nf4

            # NF4 computing in the model's dtype, as our rows do: the rows then differ by their 4-bit grids alone.
            reset_peak_rss()
            start = time.perf_counter()
            to_bnb_nf4(model, next(model.parameters()).dtype) if name == "bnb-nf4" else to_torchao_nf4(model)
            row["quantize_s"] = time.perf_counter() - start
            row["peak_rss_mb_quantize"] = peak_rss_mb()
        elif name != "float":
            method, targets = name.rsplit("-", 1)
            fields = METHODS[method]
            if args.damp_percent is not None and method != "gptq-plain":
                fields = fields | {"damp_percent": args.damp_percent}
            config = QuantConfig(bits=4, group_size=args.group_size, targets=targets, calib_dtype=args.calib_dtype,
                                 **fields)
            row["solver"] = {k: getattr(config, k) for k in ("act_order", "group_aware", "static_groups",
                                                               "damp_percent")}
            reset_peak_rss()
            start = time.perf_counter()
            quantize_model_weights(model, calib if config.method == "gptq" else None, config, progress=False)
            row["quantize_s"] = time.perf_counter() - start
            row["peak_rss_mb_quantize"] = peak_rss_mb()
    row["weight_bytes_after"] = block_weight_bytes(model)  # weight_bytes, NF4's statistics counted too
    with torch.no_grad():
        result = gsm8k_answer_loss(model, tokenizer, source=args.data, split="test", limit=args.ppl_limit,
                                   batch_size=8, max_length=512)
    return row | {"perplexity": result["perplexity"], "answer_tokens": result["tokens"]}


def layer_memory(args: argparse.Namespace) -> dict:
    """Peak RSS of solving and packing one Llama-2-7B down_proj ([4096, 11008], K = 11008) with random weights.

    The Hessian is a random positive definite matrix (rank 64 plus the identity, cheap to build); W and H exist before
    the measured window, which covers ``gptq_solve`` and then ``pack_qweight``/``pack_qzeros``, each from a reset peak.
    """
    import torch

    from gptqlora.config import QuantConfig
    from gptqlora.quant.gptq import gptq_solve
    from gptqlora.quant.pack import pack_qweight, pack_qzeros

    n, k = 4096, 11008
    g = torch.Generator().manual_seed(args.seed)
    W = torch.randn(n, k, generator=g) * 0.02  # [N, K]
    B = torch.randn(k, 64, generator=g)
    H = B @ B.T  # [K, K]
    H.diagonal().add_(1.0)
    del B
    config = QuantConfig(group_size=128, **({} if args.damp_percent is None else {"damp_percent": args.damp_percent}))
    reset_peak_rss()
    rss_before = current_rss_mb()
    start, cpu_start = time.perf_counter(), cpu_seconds()
    res = gptq_solve(W, H, bits=4, group_size=128, act_order=config.act_order, static_groups=config.static_groups,
                     group_aware=config.group_aware, damp_percent=config.damp_percent)
    solve_s, solve_cpu_s = time.perf_counter() - start, cpu_seconds() - cpu_start
    peak_solve = peak_rss_mb()
    codes, zeros = res.codes, res.zeros
    del res
    reset_peak_rss()
    rss_pack = current_rss_mb()
    pack_qweight(codes, 4), pack_qzeros(zeros, 4)
    return {"rss_before_solve_mb": rss_before, "peak_rss_mb_solve": peak_solve,
            "solve_extra_mb": peak_solve - rss_before,
            "solve_s": solve_s, "solve_cpu_s": solve_cpu_s, "pack_extra_mb": peak_rss_mb() - rss_pack,
            "hessian_mb": k * k * 4 / 2**20, "weight_mb": n * k * 4 / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, NAMES)
    parser.set_defaults(configs=",".join(DEFAULT_CONFIGS))
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--calib-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--calib-calculator", action="store_true",
                        help="keep GSM8K's <<48/2=24>> calculator annotations in the calibration text")
    parser.add_argument("--damp-percent", type=float, default=None,
                        help="damping for every GPTQ row but gptq-plain (default: QuantConfig's)")
    parser.add_argument("--ppl-limit", type=int, default=200, help="GSM8K test solutions scored")
    parser.add_argument("--gptqmodel-python", default=None,
                        help="Python of an environment with gptqmodel; adds the gptqmodel-all row")
    parser.add_argument("--gptqmodel-dtype", default="bfloat16")
    parser.add_argument("--calib-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parse_args(parser, quick={"calib_samples": 8, "calib_seqlen": 128, "ppl_limit": 8,
                                     "configs": "float,rtn-attn,gptq-attn"})
    args.data = args.data or os.environ.get("GSM8K_DIR") or "openai/gsm8k"
    if args.one:
        print(json.dumps(child(args)), flush=True)
        return 0

    from safetensors.torch import save_file

    from gptqlora.data.calibration import calibration_tokens
    from gptqlora.models import load_model

    names = config_names(args, NAMES)
    if args.gptqmodel_python and "gptqmodel-all" not in names:
        names.append("gptqmodel-all")
    _, tokenizer = load_model(args.model)
    calib = calibration_tokens(tokenizer, args.calib_samples, args.calib_seqlen, source=args.data, seed=args.seed,
                               keep_calculator=args.calib_calculator)
    with tempfile.TemporaryDirectory() as workdir:
        calib_file = str(Path(workdir) / "calib.safetensors")
        save_file({"input_ids": calib.contiguous()}, calib_file)
        argv = sys.argv[1:] + ["--calib-file", calib_file, "--workdir", workdir]
        rows = {name: ({"skipped": f"{NF4_ROWS[name]} is not installed (make yardsticks)"}
                       if name in NF4_ROWS and importlib.util.find_spec(NF4_ROWS[name]) is None
                       else run_child(__file__, name, argv)) for name in names}

    float_ppl = rows.get("float", {}).get("perplexity")
    for name, r in rows.items():
        if float_ppl is None or "perplexity" not in r or name == "float":
            continue
        r["ppl_increase"] = r["perplexity"] - float_ppl
        rtn = rows.get("rtn-" + ("all" if name in NF4_ROWS else name.rsplit("-", 1)[1]), {})
        if "perplexity" in rtn and rtn["perplexity"] > float_ppl and not name.startswith("rtn-"):
            r["gap_closed_vs_rtn"] = 1 - r["ppl_increase"] / (rtn["perplexity"] - float_ppl)
    print(markdown_table(rows, [("perplexity", "perplexity", ".4f"), ("ppl_increase", "increase over float", "+.4f"),
                                ("gap_closed_vs_rtn", "RTN gap closed", ".1%"), ("quantize_s", "quantize s", ".1f"),
                                ("peak_rss_mb_quantize", "peak RSS MiB (quantize)", ".0f"),
                                ("weight_bytes_before", "block weight bytes before", ""),
                                ("weight_bytes_after", "after", ""), ("solve_s", "7B down_proj solve s", ".1f"),
                                ("solve_extra_mb", "its peak RSS over W and H, MiB", ".0f"),
                                ("pack_extra_mb", "packing's, MiB", ".0f")]))
    return finish(rows, {"benchmark": "quantize", "calib": [args.calib_samples, args.calib_seqlen],
                         "calib_calculator": args.calib_calculator, "damp_percent": args.damp_percent,
                         "group_size": args.group_size, "calib_dtype": args.calib_dtype, "ppl_limit": args.ppl_limit,
                         "environment": environment(), "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
