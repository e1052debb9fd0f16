"""Quantized matmul kernels side by side: every backend against dense bf16 and fp32 matmuls, at SmolLM2-135M's and
Llama-2-7B's linear shapes, for M = 1, 16 and 512 rows.

    python benchmarks/bench_kernels.py --threads 2                 # everything, on the CPU (about 10 minutes)
    python benchmarks/bench_kernels.py --quick                     # smoke run (one small shape, M = 1 and 16)
    python benchmarks/bench_kernels.py --threads 2 --shapes 7b --m 1,2,4,8,16,32 --configs int4-aten,dequant-gemm
                                                                   # auto's M crossover on the CPU
    python benchmarks/bench_kernels.py --device cuda --shapes 7b   # on a GPU (see benchmarks/gpu_check.sh)

Configurations (each in its own fresh process; see ``common.py``):
    torch-bf16, torch-fp32   ``F.linear`` on the dense weight of the same codes in that dtype, as a float model runs.
    dequant, dequant-gemm, int4-aten, triton, dense
                             a ``QuantizedLinear`` with ``set_kernel(name)``, called in each of ``--dtypes`` (bf16 and
                             fp32 by default). Where the backend cannot run a layer (it would fall back to dequant) the
                             cell is n/a and the reason is in the JSON.
Shapes (in x out): SmolLM2-135M q 576x576, k/v 576x192, gate/up 576x1536, down 1536x576 with groups 128 and 64
(576 = 4 x 128 + 64: a ragged last group at 128); Llama-2-7B 4096x4096, 4096x11008, 11008x4096 with group 128.
Codes: random, ``--bits`` (4), asymmetric zero points, fp16 scales, no act-order, seeded.

Timing: each cell is timed after warmup calls (which also repack the layer), as the median of at least
``--min-iters`` calls and ``--min-time`` seconds. Consecutive calls go to different copies of the layer, enough
copies that their weights add up to ``--rotate-mib`` (256 MiB; at most 512 copies), so that M = 1 reads come from
memory rather than from the last-level cache, as in a decoding model whose layers never fit in it (a cell whose call
takes over 10 ms uses one copy: the cache cannot matter there; one over 1 s is timed three times only).
Reported per cell: ms per call (median; the minimum is in the JSON), speedup against torch-bf16 at the same shape
and M, max |y - reference| with the reference the ``dequant`` backend in fp32 on the same codes and the same
(dtype-rounded) input, and at M = 1 the GB/s of weight bytes read (the bytes as that row stores the weight: packed
codes + scales + zeros, or the dense matrix) against this machine's memory bandwidth, measured first (a copy of a
512 MiB tensor, read + write).
The load average (``uptime``) before and after the run is in the JSON: on a shared machine, a load above the free
cores means the figures are pessimistic and noisy.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import common

DENSE = ("torch-bf16", "torch-fp32")
BACKENDS = ("dequant", "dequant-gemm", "int4-aten", "triton", "dense")
CONFIGS = DENSE + BACKENDS
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
# (name, in K, out N, group sizes)
SHAPES = {
    "smol": (("q", 576, 576, (128, 64)), ("k/v", 576, 192, (128, 64)), ("gate/up", 576, 1536, (128, 64)),
             ("down", 1536, 576, (128, 64))),
    "7b": (("q/k/v/o", 4096, 4096, (128,)), ("gate/up", 4096, 11008, (128,)), ("down", 11008, 4096, (128,))),
}
QUICK = {"shapes": "smol", "m": "1,16", "min_time": 0.05, "min_iters": 3, "rotate_mib": 16}
MAX_COPIES = 512


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="Comma list of rows to compare, in this order.")
    parser.add_argument("--one", choices=CONFIGS, default=None, help="Run one configuration in this process.")
    parser.add_argument("--quick", action="store_true", help="A tiny smoke run; explicit flags still win.")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda.")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every process.")
    parser.add_argument("--shapes", default="smol,7b", help="Comma list of shape sets: smol, 7b.")
    parser.add_argument("--m", default="1,16,512", help="Comma list of M (rows of x: tokens per call).")
    parser.add_argument("--dtypes", default="bf16,fp32", help="Compute dtypes of the quantized backends.")
    parser.add_argument("--bits", type=int, default=4, help="Code width of the random layers.")
    parser.add_argument("--min-time", type=float, default=0.3, help="Seconds of timed calls per cell, at least.")
    parser.add_argument("--min-iters", type=int, default=5, help="Timed calls per cell, at least.")
    parser.add_argument("--max-iters", type=int, default=1000, help="Timed calls per cell, at most.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed calls per cell (after one call per copy).")
    parser.add_argument("--rotate-mib", type=float, default=256.0,
                        help="Copies of each layer are made until their weights add up to this (at most 512).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random codes and inputs.")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time per call; cpu: this process's CPU time per call "
                             "(time.process_time), which preemption by other work does not inflate: a fair "
                             "comparison on a busy machine, meaningful with --threads 1 (idle threads spin).")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="Which per-call time the tables show (both are in the JSON); on a busy machine the "
                             "minimum is the less disturbed figure.")
    return parser


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cells(args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    """(shape name, K, N, group size) of every layer to measure."""
    out = []
    for key in csv(args.shapes):
        if key not in SHAPES:
            raise SystemExit(f"--shapes {args.shapes!r}: {key!r} is unknown; choose from {', '.join(SHAPES)}")
        out += [(name, k, n, g) for name, k, n, groups in SHAPES[key] for g in groups]
    return out


# ---------------------------------------------------------------------------------------------- measuring

def memory_bandwidth_gbps(device: torch.device, mib: int = 512, repeats: int = 5) -> float:
    """Copy bandwidth (bytes read + bytes written per second, best of ``repeats``) of a ``mib`` MiB tensor."""
    src = torch.ones(mib * common.MiB // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(repeats + 1):  # the first copy pays the page faults
        common.sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        common.sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def time_calls(fns: list, x: torch.Tensor, args: argparse.Namespace, device: torch.device) -> list[float]:
    """Seconds of each timed call, each call on the next of ``fns`` (copies of one layer), after warmup.

    A call slower than 10 ms is not measurably helped by the cache (it holds ~1 ms of memory traffic), so such cells
    use one copy: warming up hundreds of slow copies would take minutes. A call slower than 1 s is timed three times.
    """
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    fns[0](x)  # first use repacks
    probes = []
    for _ in range(3):  # the least disturbed of three (a busy machine preempts some calls)
        common.sync(device)
        start = clock()
        fns[0](x)
        common.sync(device)
        probes.append(clock() - start)
    if min(probes) > 1.0:  # a slow path (the int4 kernel in fp32 at M = 512 takes ~30 s): these three calls will do
        return probes
    if min(probes) > 0.01:
        fns = fns[:1]
    for f in fns[1:]:  # first use repacks each copy
        f(x)
    for i in range(args.warmup):
        fns[i % len(fns)](x)
    seconds: list[float] = []
    begin, i = time.perf_counter(), 0
    while len(seconds) < args.max_iters and (len(seconds) < args.min_iters or time.perf_counter() - begin
                                             < args.min_time):
        f = fns[i % len(fns)]
        i += 1
        common.sync(device)
        start = clock()
        f(x)
        common.sync(device)
        seconds.append(clock() - start)
    return seconds


def random_layer(k: int, n: int, bits: int, group_size: int, seed: int, device: torch.device):
    """A QuantizedLinear of random codes (asymmetric zeros, fp16 scales of a trained layer's magnitude)."""
    from gptqlora.quant.grid import QuantResult
    from gptqlora.quant.linear import QuantizedLinear

    gen = torch.Generator().manual_seed(seed)
    n_groups = -(-k // group_size)
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n_groups, n, generator=gen) * 0.004 + 0.001).half().float()
    zeros = torch.randint(1, maxq + 2, (n_groups, n), generator=gen).float()
    g_idx = (torch.arange(k) // group_size).to(torch.int32)
    return QuantizedLinear.from_result(QuantResult(codes, scales, zeros, g_idx), bits, group_size).to(device)


def copies_of(layer, n_copies: int):
    """Independent copies (own buffers) of a QuantizedLinear, so that calls on them read different memory."""
    import copy

    return [layer] + [copy.deepcopy(layer) for _ in range(n_copies - 1)]


def run_one(name: str, args: argparse.Namespace) -> dict:
    """Every cell of one configuration, in this process."""
    from gptqlora.quant.kernels.registry import unsupported_reason

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtypes = [DTYPES[d] for d in csv(args.dtypes)]
    rows = []
    for shape, k, n, g in cells(args):
        base = random_layer(k, n, args.bits, g, args.seed, device)
        w_ref = base.dequantize_weight(torch.float32)  # [N, K]: the reference's weight
        packed_bytes = sum(b.numel() * b.element_size() for b in base.buffers())
        for dtype in ([torch.bfloat16] if name == "torch-bf16" else [torch.float32] if name == "torch-fp32"
                      else dtypes):
            label = {"shape": shape, "k": k, "n": n, "group_size": g, "dtype": str(dtype).removeprefix("torch."),
                     "config": name}
            with torch.no_grad():
                if name in DENSE:
                    weight_bytes = k * n * dtype.itemsize
                    w = w_ref.to(dtype)
                    n_copies = max(1, min(MAX_COPIES, math.ceil(args.rotate_mib * common.MiB / weight_bytes)))
                    fns = [(lambda x, wc=wc: F.linear(x, wc)) for wc in [w] + [w.clone() for _ in range(n_copies - 1)]]
                    ran = name
                else:
                    reason = unsupported_reason(name, base.facts, device, dtype, needs_grad=False)
                    if reason is not None:
                        rows += [label | {"m": m, "ms": None, "unsupported": reason} for m in ms_of(args)]
                        continue
                    base.set_kernel(name)
                    weight_bytes = packed_bytes + (k * n * dtype.itemsize if name == "dense" else 0)
                    n_copies = max(1, min(MAX_COPIES, math.ceil(args.rotate_mib * common.MiB / weight_bytes)))
                    layers = copies_of(base, n_copies)
                    fns = layers
                    ran = name
                for m in ms_of(args):
                    x = torch.randn(m, k, generator=torch.Generator().manual_seed(args.seed + m)).to(device, dtype)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        y = fns[0](x)
                    if name not in DENSE:
                        ran = layers[0].last_kernel
                    diff = (y.float() - F.linear(x.float(), w_ref)).abs().max().item()
                    times = time_calls(fns, x, args, device)
                    seconds = statistics.median(times)
                    rows.append(label | {"m": m, "ms": seconds * 1e3, "min_ms": min(times) * 1e3, "calls": len(times),
                                         "max_abs_diff": diff, "ran": ran, "weight_bytes": weight_bytes,
                                         "weight_gbps": weight_bytes / seconds / 1e9})
                    print(f"[bench] {name} {shape} {k}x{n} g{g} {label['dtype']} M={m}: median {seconds * 1e3:.3f} "
                          f"min {min(times) * 1e3:.3f} ms (diff {diff:.2e}, ran {ran}, {len(times)} calls)",
                          file=sys.stderr, flush=True)
                del fns
                if name not in DENSE:
                    del layers
                    base.set_kernel("auto")
    return {"config": name, "device": str(device), "threads": torch.get_num_threads(), "rows": rows}


def ms_of(args: argparse.Namespace) -> list[int]:
    return [int(m) for m in csv(args.m)]


# ---------------------------------------------------------------------------------------------- report

def tables(results: dict[str, dict], bandwidth: float, stat: str = "median") -> str:
    """Markdown: per dtype, ms per call (``stat``) and speedup against torch-bf16; max |diff|; GB/s at M = 1."""
    ms_key = "ms" if stat == "median" else "min_ms"
    cells_by_key: dict[tuple, dict[str, dict]] = {}
    for name, result in results.items():
        for row in result.get("rows", []):
            dtype = "dense" if name in DENSE else row["dtype"]
            key = (dtype, row["shape"], row["k"], row["n"], row["group_size"], row["m"])
            cells_by_key.setdefault(key, {})[name] = row
    baseline = {(s, k, n, g, m): r["torch-bf16"].get(ms_key) for (d, s, k, n, g, m), r in cells_by_key.items()
                if d == "dense" and "torch-bf16" in r}
    names = list(results)
    out = []
    for dtype in sorted({key[0] for key in cells_by_key if key[0] != "dense"}):
        time_rows, diff_rows, bw_rows = {}, {}, {}
        for key, by_name in cells_by_key.items():
            if key[0] != dtype:
                continue
            _, shape, k, n, g, m = key
            label = f"{shape} {k}x{n} g{g} M={m}"
            dense = cells_by_key.get(("dense", shape, k, n, g, m), {})
            row_cells = dense | by_name
            base_ms = baseline.get((shape, k, n, g, m))
            time_rows[label] = {c: _time_cell(row_cells.get(c), base_ms, ms_key) for c in names}
            diff_rows[label] = {c: _fmt(row_cells.get(c), "max_abs_diff", ".1e") for c in names}
            if m == 1:
                bw_rows[label] = {c: _gbps_cell(row_cells.get(c), ms_key) for c in names}
        columns = [(c, c, "") for c in names]
        out += [f"### {dtype}: ms per call, {stat} (speedup against torch-bf16)\n",
                common.markdown_table(time_rows, columns),
                f"\n### {dtype}: max |y - reference (dequant, fp32)|\n", common.markdown_table(diff_rows, columns)]
        if bw_rows:
            out += [f"\n### {dtype}, M = 1: GB/s of weight bytes read (memory bandwidth measured: {bandwidth:.1f} "
                    f"GB/s)\n", common.markdown_table(bw_rows, columns)]
        out.append("")
    return "\n".join(out)


def _fmt(row: dict | None, key: str, fmt: str) -> str:
    if row is None:
        return ""
    if row.get(key) is None:
        return "n/a"
    return format(row[key], fmt)


def _time_cell(row: dict | None, base_ms: float | None, ms_key: str) -> str:
    if row is None:
        return ""
    if row.get(ms_key) is None:
        return "n/a"
    cell = f"{row[ms_key]:.3f}"
    return cell + (f" ({base_ms / row[ms_key]:.2f}x)" if base_ms else "")


def _gbps_cell(row: dict | None, ms_key: str) -> str:
    if row is None:
        return ""
    if row.get(ms_key) is None:
        return "n/a"
    return f"{row['weight_bytes'] / row[ms_key] / 1e6:.1f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = common.parse_args(build_parser(), QUICK, argv)
    if args.one is not None:
        common.emit_json(run_one(args.one, args))
        return 0
    names = common.config_names(args, CONFIGS)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    load_before = common.load_average()
    bandwidth = memory_bandwidth_gbps(device)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results = common.run_children(Path(__file__), names, argv)
    load_after = common.load_average()
    print(f"## Quantized matmul kernels: {args.bits}-bit, {device}, {args.threads} threads, {args.clock} clock, "
          f"started {started}; "
          f"load average before {load_before}, after {load_after}\n")
    print(tables(results, bandwidth, args.stat))
    settings = {k: v for k, v in vars(args).items() if k != "one"}
    return common.finish(results, {"benchmark": "kernels", "settings": settings, "started": started,
                                   "memory_bandwidth_gbps": bandwidth, "load_before": load_before,
                                   "load_after": load_after, "environment": common.environment(),
                                   "results": results})


if __name__ == "__main__":
    raise SystemExit(main())
