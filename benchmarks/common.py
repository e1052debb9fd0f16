"""Helpers shared by the benchmark scripts: clean per-configuration processes, peak memory, tables, the JSON line.

A benchmark compares configurations side by side in one run. Each configuration runs in a fresh child process,
``python <script> <same flags> --one NAME``, so its peak memory and timings are its own (no allocator state, caches
or threads left over from another configuration). The child prints its figures as one JSON object on the last line
of its stdout (its progress and warnings go to stderr, which passes through); the parent collects them, prints a
Markdown table and ends with one JSON line holding every figure.

Peak memory is measured over a window: the child calls ``MemoryWindow(device)`` once its model is set up (loaded,
quantized, adapted), which records the setup's peak RSS, hands freed heap memory back to the OS (glibc
``malloc_trim``), then resets the peak RSS (Linux ``/proc/self/clear_refs``, which ``getrusage(RUSAGE_SELF).ru_maxrss``
follows) and CUDA's peak allocation. ``window.report()`` then gives the peak of the measured phase alone. Without the
trim and the reset a 4-bit configuration would report what loading its float model before quantizing it cost, not
what training or decoding on the 4-bit model costs.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gptqlora.config import DEFAULT_MODEL
from gptqlora.targets import ATTN_TARGETS
from gptqlora.hardware import release_free_heap

MiB = 2 ** 20
# The adapted modules in the training and generation benchmarks: q/k/v/o, as short names (PEFT's spelling).
LORA_TARGETS = tuple(name.rsplit(".", 1)[1] for name in ATTN_TARGETS)


# ---------------------------------------------------------------------------------------------- memory and time

def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB: ``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MiB if sys.platform == "darwin" else peak / 1024  # macOS reports bytes


def current_rss_mb() -> float | None:
    """Resident set size now in MiB, from ``/proc/self/statm``; None where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except OSError:
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MiB


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@torch.no_grad()
def materialize(model: torch.nn.Module) -> None:
    """Copy every parameter and buffer into memory of its own, in place (tied weights stay tied).

    ``from_pretrained`` leaves weights in a memory map of the safetensors file, paged in as they are read and kept
    resident (as file pages, counted in RSS) while any tensor from the file lives: a model quantized in-process keeps
    its float checkpoint's pages mapped through the embedding, and a float model's pages come in during the first
    measured pass. Called on every configuration's model after setup, so that RSS compares the models as held.
    """
    for t in [*model.parameters(), *model.buffers()]:
        t.data = t.data.clone()
    gc.collect()


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used so far, all its threads together.

    Next to a wall time it tells waiting from working: on a busy machine a step's wall time grows while its CPU time
    stays (with one thread), and OpenMP threads that spin while a peer is preempted add CPU time (with several).
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a timer read after it covers the work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryWindow:
    """Peak memory from now on, apart from the setup before it.

    Args:
        device: the model's device; on CUDA the peak allocation (``torch.cuda.max_memory_allocated``) is reset too.
    """

    def __init__(self, device: torch.device) -> None:
        gc.collect()
        self.device = device
        self.setup_peak_rss_mb = peak_rss_mb()
        self.heap_trimmed = release_free_heap()
        self.rss_reset = reset_peak_rss()
        self.start_rss_mb = current_rss_mb()
        if device.type == "cuda":
            sync(device)
            self.setup_cuda_peak_mb = torch.cuda.max_memory_allocated(device) / MiB
            torch.cuda.reset_peak_memory_stats(device)
            self.start_cuda_mb = torch.cuda.memory_allocated(device) / MiB

    def report(self) -> dict[str, Any]:
        """``peak_rss_mb`` of the window (of the whole process when ``rss_peak_reset`` is False), the RSS at its start,
        the setup's peak, and on CUDA the same three for allocated device memory."""
        out: dict[str, Any] = {"peak_rss_mb": peak_rss_mb(), "start_rss_mb": self.start_rss_mb,
                               "setup_peak_rss_mb": self.setup_peak_rss_mb, "rss_peak_reset": self.rss_reset,
                               "heap_trimmed": self.heap_trimmed}
        if self.device.type == "cuda":
            sync(self.device)
            out |= {"cuda_peak_mb": torch.cuda.max_memory_allocated(self.device) / MiB,
                    "cuda_start_mb": self.start_cuda_mb, "setup_cuda_peak_mb": self.setup_cuda_peak_mb}
        return out


def timing_summary(seconds: Sequence[float]) -> dict[str, float]:
    """Mean, median, min and max of per-step wall times."""
    return {"mean_s": statistics.fmean(seconds), "median_s": statistics.median(seconds),
            "min_s": min(seconds), "max_s": max(seconds)}


def tensor_bytes(tensors) -> int:
    """Bytes held by tensors, each storage counted once (tied weights are one tensor)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (packed buffers for quantized layers), shared ones once."""
    return tensor_bytes([*model.parameters(), *model.buffers()])


# ---------------------------------------------------------------------------------------------- arguments

def add_common_args(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """Flags every benchmark has: the configurations, the child switch, threads, model, device and dtype."""
    parser.add_argument("--configs", "--rows", default=",".join(names),
                        help="Comma list of configurations to compare, in this order.")
    parser.add_argument("--one", choices=names, default=None,
                        help="Run one configuration in this process and print its JSON (what the parent runs in each "
                             "child; useful alone for debugging).")
    parser.add_argument("--quick", action="store_true",
                        help="A tiny smoke run; flags given explicitly still win over its values.")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="Model alias or path, as for gptqlora.models.load_model.")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    parser.add_argument("--dtype", default="auto", help="Model dtype: auto (bf16 on CUDA, fp32 on CPU), float32, "
                                                        "bfloat16.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads in each child (default: torch's choice, the physical cores).")
    parser.add_argument("--data", default=None, help="GSM8K directory or hub id (default $GSM8K_DIR, else the hub).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for LoRA initialisation and dropout.")


def parse_args(parser: argparse.ArgumentParser, quick: dict[str, Any], argv: Sequence[str] | None = None
               ) -> argparse.Namespace:
    """Parse ``argv``; with ``--quick`` the values in ``quick`` become the defaults, so explicit flags still win."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if parser.parse_known_args(argv)[0].quick:
        parser.set_defaults(**quick)
    return parser.parse_args(argv)


def config_names(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """The configurations asked for with ``--configs``, checked against the known ones."""
    chosen = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in names]
    if unknown or not chosen:
        raise SystemExit(f"--configs {args.configs!r}: unknown or empty ({unknown}); choose from {', '.join(names)}")
    return chosen


def setup_child(args: argparse.Namespace) -> None:
    """Seed and set the thread count in a child, before it builds anything."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)


# ---------------------------------------------------------------------------------------------- processes

def run_child(script: str | os.PathLike, name: str, argv: Sequence[str]) -> dict[str, Any]:
    """Run ``python script *argv --one name`` in a fresh process and return the JSON of its last stdout line.

    Returns:
        The child's figures, plus ``child_wall_s`` (the whole child, setup included). A child that fails, or whose
        last line is not JSON, gives ``{"error": ...}`` so the other configurations still run; the parent reports it.
    """
    cmd = [sys.executable, str(Path(script).resolve()), *argv, "--one", name]
    print(f"[bench] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr (progress, tracebacks) passes through
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0:
        return {"error": f"child exited with code {proc.returncode} (its traceback is above on stderr)",
                "child_wall_s": wall}
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError as e:
        return {"error": f"the child's last stdout line is not JSON ({e}): {lines[-1][:200]!r}", "child_wall_s": wall}
    if not isinstance(result, dict):
        return {"error": f"the child printed no JSON object (last line: {lines[-1][:200] if lines else ''!r})",
                "child_wall_s": wall}
    return result | {"child_wall_s": wall}


def run_children(script: str | os.PathLike, names: Sequence[str], argv: Sequence[str] | None = None
                 ) -> dict[str, dict[str, Any]]:
    """Run each configuration in its own fresh child, one after the other, with this process's flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return {name: run_child(script, name, argv) for name in names}


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``uptime``'s), from ``/proc/loadavg``; None where there is none.

    Recorded before and after a run: on a machine shared with other work, a load above the free cores means the
    figures were taken on a busy machine.
    """
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


def environment() -> dict[str, Any]:
    """Versions and hardware, for the record."""
    import transformers

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = None
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
    return env


# ---------------------------------------------------------------------------------------------- output

def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value)


def memory_columns(phase: str) -> tuple[tuple[str, str, str], ...]:
    """The memory columns every benchmark table shows, the measured phase named (e.g. "train", "decode")."""
    return (("peak_rss_mb", f"peak RSS MiB ({phase})", ".0f"),
            ("setup_peak_rss_mb", "peak RSS MiB (setup)", ".0f"),
            ("cuda_peak_mb", "CUDA peak MiB", ".0f"),
            ("linear_weight_mb", "block linear weights MiB", ".1f"))


def markdown_table(rows: dict[str, dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table with one row per configuration.

    Args:
        rows: configuration name -> its figures (a row with ``error`` or ``skipped`` shows it in its first column).
        columns: (key in the figures, header, format spec such as ``".2f"`` or ``""``).
    """
    header = ["config", *(h for _, h, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, figures in rows.items():
        if "error" in figures:
            cells = [f"FAILED: {figures['error']}", *("" for _ in columns[1:])]
        elif "skipped" in figures:  # a configuration this machine cannot run, with why
            cells = [f"skipped: {figures['skipped']}", *("" for _ in columns[1:])]
        else:
            cells = [_cell(figures.get(key), fmt) for key, _, fmt in columns]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """NaN and infinities become None (JSON has no spelling for them); containers are walked."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def emit_json(obj: dict[str, Any]) -> None:
    """Print ``obj`` as one JSON line (``json.dumps`` writes no newlines) and flush: the last line of the output."""
    print(json.dumps(_json_safe(obj), allow_nan=False), flush=True)


def finish(results: dict[str, dict[str, Any]], summary: dict[str, Any]) -> int:
    """Print the final JSON line and return the exit status: 1 when a configuration failed, else 0."""
    emit_json(summary)
    failed = [name for name, r in results.items() if "error" in r]
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
