"""Streamed quantization at Llama-2-7B block shapes: peak memory must not grow with depth; what 7B and 70B would take.

    python benchmarks/bench_quantize_scale.py                 # rtn and gptq on 2, 4 and 8 blocks (~20 min, 2 cores)
    python benchmarks/bench_quantize_scale.py --quick         # tiny shapes: a smoke run of the script

A synthetic LLaMA with Llama-2-7B blocks (hidden 4096, MLP 11008, 32 heads, random weights of std 0.02, fp16 as
Llama-2's checkpoint, a small vocabulary so that the embeddings stay modest) is written once with safetensors' own
``save_file``, one shard per block plus one for the embeddings, norm and head, and a ``model.safetensors.index.json``.
The 2- and 4-block models are views of the 8-block one (their own config and index over the same shard files).

Each configuration runs in a fresh process (``common.run_child``): ``gptqlora.quant.streamed.quantize_streamed`` from
the sharded source to a sharded output, every block linear 4-bit, group size 128, on the CPU in float32 (what
``--dtype auto`` picks on a CPU), GPTQ calibrated on ``--calib-samples`` x ``--calib-seqlen`` random tokens. Measured:
peak RSS over the quantization alone (``common.MemoryWindow`` resets it after the imports; its start is the bare
interpreter with torch and transformers, reported apart), wall seconds per block (the first block also reads and
writes the embeddings), and the whole run.

Targets (issue 9): peak RSS does not grow with the number of blocks (8 blocks <= 1.2 x the 2-block peak) and stays
within 1.5 x (one block's float weights + the calibration activations + the embeddings). The JSON's
``extrapolation`` scales the measured figures to Llama-2-7B (32 blocks) and a 70B (80 blocks, hidden 8192, MLP 28672,
8 KV heads) with the formulas it states; GPU figures there are estimates, not measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import common

NAMES = [f"{m}-{n}" for m in ("rtn", "gptq") for n in (2, 4, 8)]
QUICK = {"hidden": 256, "intermediate": 688, "heads": 4, "kv_heads": 4, "vocab": 512, "calib_seqlen": 32}
MiB = common.MiB
SHAPES_70B = {"hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8, "vocab": 32000, "blocks": 80}
SHAPES_7B = {"hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32, "vocab": 32000, "blocks": 32}


def block_linears(s: dict) -> dict[str, tuple[int, int]]:
    """(out N, in K) of each linear of a LLaMA block."""
    d, i, kv = s["hidden"], s["intermediate"], s["hidden"] // s["heads"] * s["kv_heads"]
    return {"q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d), "gate": (i, d), "up": (i, d), "down": (d, i)}


def block_params(s: dict) -> int:
    return sum(n * k for n, k in block_linears(s).values()) + 2 * s["hidden"]


def solve_work(s: dict) -> float:
    """GPTQ solver work of one block, in units of N*K^2 + K^3 summed over its stages (stacked rows share K)."""
    lin = block_linears(s)
    stages = [("q", "k", "v"), ("o",), ("gate", "up"), ("down",)]
    work = 0.0
    for stage in stages:
        k = lin[stage[0]][1]
        work += sum(lin[n][0] for n in stage) * k * k + k ** 3
    return work


def forward_flops_per_token(s: dict) -> float:
    """Linear-layer flops per calibration token in one block, with the driver's passes (gate/up twice)."""
    lin = block_linears(s)
    macs = sum(n * k for name, (n, k) in lin.items() if name in "qkvo") + 2 * 2 * lin["up"][0] * lin["up"][1]
    return 2.0 * (macs + lin["down"][0] * lin["down"][1])


# ---------------------------------------------------------------------------------------------- the source

def write_source(root: Path, args: argparse.Namespace, blocks: tuple[int, ...]) -> dict[int, Path]:
    """The synthetic fp16 checkpoint with max(blocks) blocks (reused when already in ``root``), and a view of it per
    block count: a directory with its own config.json and index, and links to the shards it uses."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    full = root / "shards"
    full.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    d, v = args.hidden, args.vocab

    def shard(file: str, seed: int, make) -> None:
        if not (full / file).is_file():  # each shard its own seed: the same bytes whether made now or earlier
            save_file(make(torch.Generator().manual_seed(seed)), str(full / file), metadata={"format": "pt"})
        with safe_open(full / file, "pt") as f:
            weight_map.update(dict.fromkeys(f.keys(), file))

    def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).half()

    shard("model-outside.safetensors", 0, lambda g: {
        "model.embed_tokens.weight": randn(g, v, d), "model.norm.weight": torch.ones(d, dtype=torch.float16),
        "lm_head.weight": randn(g, v, d)})
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    for i in range(max(blocks)):
        p = f"model.layers.{i}."
        shard(f"model-block-{i:05d}.safetensors", 1 + i, lambda g, p=p: {
            p + "input_layernorm.weight": torch.ones(d, dtype=torch.float16),
            p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.float16),
            **{p + names[short] + ".weight": randn(g, n, k) for short, (n, k) in block_linears(vars(args)).items()}})
    views = {}
    for n in blocks:
        view = root / f"blocks-{n}"
        view.mkdir(exist_ok=True)
        LlamaConfig(vocab_size=v, hidden_size=d, intermediate_size=args.intermediate, num_hidden_layers=n,
                    num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=4096,
                    rms_norm_eps=1e-5, tie_word_embeddings=False).save_pretrained(view)
        keep = {k: f for k, f in weight_map.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < n}
        for f in set(keep.values()):
            if not (view / f).exists():
                os.symlink(full / f, view / f)
        (view / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}))
        views[n] = view
    return views


# ---------------------------------------------------------------------------------------------- one configuration

def child(args: argparse.Namespace) -> dict:
    from gptqlora.config import QuantConfig
    from gptqlora.models import resolve_device, resolve_dtype
    from gptqlora.quant.checkpoint import float_skeleton
    from gptqlora.quant.streamed import quantize_streamed

    common.setup_child(args)
    method, n = args.one.split("-")
    device = torch.device(resolve_device(args.device))
    dtype = resolve_dtype(args.dtype, device.type)
    config = QuantConfig(method=method, bits=4, group_size=args.group_size, targets="all",
                         calib_dtype=args.calib_dtype)
    ids = torch.randint(0, args.vocab, (args.calib_samples, args.calib_seqlen),
                        generator=torch.Generator().manual_seed(0))
    out = Path(args.workdir) / f"out-{args.one}"
    source = Path(args.workdir) / f"blocks-{n}"
    float_skeleton(source)  # imports the model code before the window: its start is the interpreter with everything
    stamps: list[float] = []
    window = common.MemoryWindow(device)
    start = time.perf_counter()
    report = quantize_streamed(source, out, config, ids if method == "gptq" else None,
                               dtype=dtype, device=device, max_shard_size=args.max_shard_size, overwrite=True,
                               progress=False, on_block=lambda i, _: stamps.append(time.perf_counter()))
    seconds = time.perf_counter() - start
    memory = window.report()
    out_bytes = sum(p.stat().st_size for p in out.iterdir())
    shutil.rmtree(out)
    block_s = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    return memory | {"seconds": seconds, "block_s": block_s, "first_block_s": block_s[0],
                     "block_s_steady": sum(block_s[1:]) / max(len(block_s) - 1, 1), "shards": report["shards"],
                     "out_mb": out_bytes / MiB, "peak_above_start_mb": memory["peak_rss_mb"] - memory["start_rss_mb"],
                     "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------- the run

def matmul_gflops(dtype: torch.dtype, seconds: float = 3.0) -> float:
    """This CPU's throughput on a calibration-shaped matmul ([1024, 4096] x [4096, 11008]) under the same threads."""
    a, b = torch.randn(1024, 4096).to(dtype), torch.randn(4096, 11008).to(dtype)
    a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return n * 2 * 1024 * 4096 * 11008 / (time.perf_counter() - start) / 1e9


def mem_available_mb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def extrapolate(rows: dict, args: argparse.Namespace, gflops: float) -> dict:
    """7B and 70B from the measured per-block figures (same code, same CPU), with the scaling stated."""
    ours = vars(args)
    gptq, rtn = rows.get("gptq-8", {}), rows.get("rtn-8", {})
    out = {"assumptions": (
        "per-block seconds scale with GPTQ solver work (sum of N*K^2 + K^3 per stage) for GPTQ and with parameters "
        "for RTN; calibration forward time = linear flops per token (driver passes: q/k/v/o once, gate/up twice, "
        "down once) x tokens / measured bf16 matmul throughput; memory = measured peak above start x (block "
        "parameters ratio), plus activations (2 residual-stream copies of samples x seqlen x hidden in the model "
        "dtype) and the embeddings (read alone, before the blocks). GPU: H200 bf16 ~700 TFLOP/s achievable on "
        "calibration matmuls; the solver's column loop is launch-bound (~25 us per column incl. lazy updates)."),
        "cpu_bf16_matmul_gflops": gflops}
    for name, s in (("llama2-7b", SHAPES_7B), ("70b", SHAPES_70B)):
        p_ratio = block_params(s) / block_params(ours)
        w_ratio = solve_work(s) / solve_work(ours)
        tokens = 128 * 512  # the CLI's default calibration (128 x 512)
        fwd_s = forward_flops_per_token(s) * tokens / (gflops * 1e9)
        est = {"blocks": s["blocks"], "block_params_m": block_params(s) / 1e6,
               "block_fp32_mb": block_params(s) * 4 / MiB, "block_bf16_mb": block_params(s) * 2 / MiB,
               "embeddings_bf16_mb": 2 * s["vocab"] * s["hidden"] * 2 / MiB,
               "activations_128x512_bf16_mb": 2 * tokens * s["hidden"] * 2 / MiB,
               "down_proj_hessian_mb": s["intermediate"] ** 2 * 4 / MiB}
        if "block_s_steady" in rtn:
            est["rtn_cpu_hours"] = rtn["block_s_steady"] * p_ratio * s["blocks"] / 3600
        if "block_s_steady" in gptq:
            solve_s = gptq["block_s_steady"] * w_ratio  # the bench's calibration is small: ~all solver time
            est["gptq_cpu_solve_s_per_block"] = solve_s
            est["gptq_cpu_forward_s_per_block_128x512"] = fwd_s
            est["gptq_cpu_hours_128x512"] = (solve_s + fwd_s) * s["blocks"] / 3600
            est["gptq_cpu_peak_rss_gb_est"] = (gptq["peak_above_start_mb"] * p_ratio
                                               + est["activations_128x512_bf16_mb"] * 2) / 1024
            cols = 3 * s["hidden"] + s["intermediate"]  # columns the solver walks: q/k/v, o, gate/up, down
            gpu_block_s = cols * 25e-6 + solve_work(s) / 50e12 + forward_flops_per_token(s) * tokens / 700e12
            est["gptq_h200_minutes_est"] = gpu_block_s * s["blocks"] / 60
            est["gptq_gpu_memory_gb_est"] = (block_params(s) * 2 + 5 * s["intermediate"] ** 2 * 4
                                             + 2 * 8 * 512 * s["hidden"] * 4) / 2 ** 30
        out[name] = est
    return out


def _without_workdir(argv: list[str]) -> list[str]:
    """The arguments less ``--workdir DIR`` / ``--workdir=DIR`` (the children get the directory actually used)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--workdir":
            skip = True
        elif not a.startswith("--workdir="):
            out.append(a)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser, NAMES)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=2048, help="Small, so the embeddings stay modest.")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=128)
    parser.add_argument("--calib-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--max-shard-size", default="500MB")
    parser.add_argument("--workdir", default=None, help="Where the synthetic source goes (default: a temporary "
                                                         "directory, deleted at the end).")
    args = common.parse_args(parser, QUICK)
    if args.one:
        common.emit_json(child(args))
        return 0

    names = common.config_names(args, NAMES)
    blocks = tuple(sorted({int(n.split("-")[1]) for n in names}))
    started, load_before, free_before = time.strftime("%Y-%m-%d %H:%M:%S %Z"), common.load_average(), mem_available_mb()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-quantize-scale-"))
    try:
        write_source(workdir, args, blocks)
        argv = _without_workdir(sys.argv[1:]) + ["--workdir", str(workdir)]
        rows = {name: common.run_child(__file__, name, argv) for name in names}
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    gflops = matmul_gflops(torch.bfloat16)
    dtype_bytes = 4 if args.dtype in ("auto", "float32") else 2  # auto is float32 on the CPU
    yard = {"block_weights_mb": block_params(vars(args)) * dtype_bytes / MiB,
            "activations_mb": args.calib_samples * args.calib_seqlen * args.hidden * dtype_bytes / MiB,
            "embeddings_mb": 2 * args.vocab * args.hidden * dtype_bytes / MiB}
    yard["yardstick_mb"] = sum(yard.values())
    targets = {}
    for method in ("rtn", "gptq"):
        r2, r8 = rows.get(f"{method}-2", {}), rows.get(f"{method}-8", {})
        if "peak_rss_mb" in r2 and "peak_rss_mb" in r8:
            targets[method] = {
                "peak_8_over_2": r8["peak_rss_mb"] / r2["peak_rss_mb"],
                "peak_above_start_8_over_2": r8["peak_above_start_mb"] / r2["peak_above_start_mb"],
                "peak_over_yardstick": r8["peak_rss_mb"] / yard["yardstick_mb"],
                "peak_above_start_over_yardstick": r8["peak_above_start_mb"] / yard["yardstick_mb"]}
            targets[method]["flat_ok"] = targets[method]["peak_8_over_2"] <= 1.2
            targets[method]["within_1_5x_ok"] = targets[method]["peak_above_start_over_yardstick"] <= 1.5
    print(common.markdown_table(rows, [("peak_rss_mb", "peak RSS MiB", ".0f"),
                                       ("peak_above_start_mb", "above start MiB", ".0f"),
                                       ("start_rss_mb", "start MiB", ".0f"),
                                       ("block_s_steady", "s/block", ".1f"), ("first_block_s", "first block s", ".1f"),
                                       ("seconds", "total s", ".1f"), ("shards", "shards", ""),
                                       ("out_mb", "output MiB", ".0f")]))
    return common.finish(rows, {
        "benchmark": "quantize_scale", "started": started, "uptime_before": uptime, "load_before": load_before,
        "load_after": common.load_average(), "mem_available_mb_before": free_before,
        "mem_available_mb_after": mem_available_mb(),
        "shapes": {k: getattr(args, k) for k in ("hidden", "intermediate", "heads", "kv_heads", "vocab")},
        "calib": [args.calib_samples, args.calib_seqlen], "group_size": args.group_size, "yardstick": yard,
        "targets": targets, "extrapolation": extrapolate(rows, args, gflops),
        "environment": common.environment(), "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
