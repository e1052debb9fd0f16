"""Which kernel runs a QuantizedLinear call: what each backend supports, and ``auto``'s choice per device, dtype and M.

A backend is a module of functions over its own repacked *state* (built once per layer, dtype and device from the
GPTQ v1 buffers, which stay the layer's checkpoint form):

    repack(weight: GPTQWeight, dtype) -> state          the backend's layout, made at first use
    matmul(x [M, K], state, w=None) -> y [M, N]          y = x @ W (W [K, N]; bias is the layer's business)
    matmul_t(dy [M, N], state, w=None) -> dx [M, K]      the input gradient dy @ W^T (backends that train)
    dense_weight(state) -> w                             (optional) a fresh dense weight in the backend's own K order,
                                                         kept by autograd between a checkpoint's recompute and its
                                                         backward and handed back to matmul/matmul_t as ``w``
    unsupported(facts, device) -> str | None             (optional) shape limits beyond the table below

and a row in ``BACKENDS`` saying what it supports. ``select_backend`` is the one place that chooses; only
``QuantizedLinear`` calls it (its forward, and ``trace_kernels`` for the calls of a compiled step, before tracing).
A preference the layer cannot use (a bit width, dtype, device or shape the backend does not support, or a gradient
it cannot compute) falls back to ``dequant``, the reference, with a warning: never to
another answer.

``auto``'s crossovers, measured on this machine (AMD EPYC Zen 5 with AVX512-BF16, torch 2.13 CPU, 2026-11-28) with

    python benchmarks/bench_kernels.py --threads 1 --clock cpu --shapes 7b,smol --m 1,8,16,32,64,128 \
        --configs torch-bf16,int4-aten,dequant-gemm --dtypes bf16

(per-call CPU time of one thread: the 2 shared cores were busy with other work, load average 4-8, which made
wall-clock timings with 2 threads meaningless) and the full ``bench_kernels.py --threads 1 --clock cpu``:
    CPU, 4-bit, bf16 input, M <= 64: ``int4-aten``. At M = 1 it is 3.9-4.4x a dense bf16 matmul at the 7B shapes
        (1.7-3.1x at SmolLM2's); its time grows linearly with M (~0.18 ms per row at 4096x4096) while dequant-gemm's
        is a fixed dequantization (~10 ms there) plus a GEMM, so dequant-gemm wins from M = 128 at every shape
        (7B 4096x4096: 11.4 vs 16.0 ms at M = 64, 23.0 vs 20.1 ms at M = 128; SmolLM2 576x576: 0.25 vs 0.31 ms,
        0.50 vs 0.39 ms).
    CPU, bf16, M > 64, training (the input gradient is needed: int4-aten has no backward), bits 2 and 8, and fp32 at
        every M: ``dequant-gemm``. torch's int4 kernel takes fp32 and fp16 input but runs them 50-130x slower than
        bf16 (slower than a dense matmul), and auto never changes the compute dtype behind the caller's back: a model
        that wants the fast decode path runs in bf16. 3-bit: ``dequant``.
    CUDA (not measured yet: no GPU figure exists, see benchmarks/gpu_check.sh): 4-bit bf16 with M <= 16 on sm80+
        ``int4-aten`` (tinygemm), else ``triton`` where it is installed, else ``dequant-gemm``.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import Tensor

from gptqlora.errors import UsageError
from gptqlora.quant.pack import unpack_qzeros

# auto on the CPU: the largest M (rows of x) for which the int4 kernel beats dequant-gemm (see the docstring).
CPU_INT4_MAX_M = 64
# auto on CUDA: the largest M given to tinygemm (unmeasured; tinygemm is a decode kernel).
CUDA_INT4_MAX_M = 16

_F32, _BF16, _F16 = torch.float32, torch.bfloat16, torch.float16
_FLOATS = frozenset({_F32, _BF16, _F16})
_ANY_FLOAT = _FLOATS | {torch.float64}


@dataclass(frozen=True)
class LayerFacts:
    """What a backend needs to know about a layer's codes to say whether it can run them (hashable, no tensors).

    in_features, out_features: K and N. bits, group_size: the grid (group_size already K when it was -1).
    act_order: g_idx is not ``k // group_size`` (desc_act checkpoints).
    sym: every zero point is 2^(bits-1).
    sortable: after a stable sort of K by g_idx, group r holds exactly columns [r*g, (r+1)*g) (the last group may be
        shorter): what backends that need contiguous groups require of an act-order layer.
    """

    in_features: int
    out_features: int
    bits: int
    group_size: int
    act_order: bool
    sym: bool
    sortable: bool


def layer_facts(qzeros: Tensor, g_idx: Tensor, bits: int, group_size: int, in_features: int, out_features: int
                ) -> LayerFacts:
    """The :class:`LayerFacts` of a layer's buffers (reads qzeros and g_idx once; a device sync on CUDA)."""
    k, g = in_features, group_size
    n_groups = -(-k // g)
    sequential = torch.equal(g_idx.long(), torch.arange(k, device=g_idx.device) // g)
    zeros = unpack_qzeros(qzeros, bits, out_features)  # [G, N]
    sym = bool((zeros == 1 << (bits - 1)).all())
    expected = torch.full((n_groups,), g, dtype=torch.long, device=g_idx.device)
    expected[-1] = k - g * (n_groups - 1)
    in_range = bool(((g_idx >= 0) & (g_idx < n_groups)).all())
    sortable = in_range and torch.equal(torch.bincount(g_idx.long(), minlength=n_groups), expected)
    return LayerFacts(k, out_features, bits, g, not sequential, sym, sortable)


@dataclass(frozen=True)
class GPTQWeight:
    """A layer's GPTQ v1 buffers, by reference (nothing copied), and their facts.

    qweight int32 [K*b/32, N]; qzeros int32 [G, N*b/32] (v1: zero - 1); scales fp16 [G, N]; g_idx int32 [K].
    """

    qweight: Tensor
    qzeros: Tensor
    scales: Tensor
    g_idx: Tensor
    facts: LayerFacts


@dataclass(frozen=True)
class Backend:
    """One row of the support table. ``module`` implements it (imported at first use, so triton loads only there).

    dtypes: per device type ("*": any device), the input dtypes it computes in (as a matmul in that dtype would).
    group_sizes: None for any. act_order: handles a permuted g_idx. asym: any zero point, not only 2^(bits-1).
    backward: computes the input gradient. needs: a package that must be importable.
    traceable: its ``matmul`` is torch operators on its state only, so ``torch.compile`` traces it into the graph of
    a compiled inference step (inductor calls the operator directly) instead of the opaque per-layer call
    (``gptqlora.quant.linear.trace_kernels``).
    """

    name: str
    module: str
    dtypes: dict[str, frozenset[torch.dtype]]
    bits: frozenset[int]
    group_sizes: frozenset[int] | None = None
    act_order: bool = True
    asym: bool = True
    backward: bool = True
    needs: str | None = None
    traceable: bool = False
    doc: str = field(default="", compare=False)


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("dequant", "gptqlora.quant.kernels.dequant", {"*": _ANY_FLOAT},
            frozenset({2, 3, 4, 8}),
            doc="the reference: unpack and dequantize the whole weight in plain torch ops, then one matmul"),
    Backend("dequant-gemm", "gptqlora.quant.kernels.dequant_gemm", {"cpu": _FLOATS, "cuda": _FLOATS},
            frozenset({2, 4, 8}),
            doc="dequantize byte planes straight into a reused buffer (one write per weight), then one GEMM"),
    Backend("int4-aten", "gptqlora.quant.kernels.int4_aten", {"cpu": _FLOATS, "cuda": frozenset({_BF16})},
            frozenset({4}), group_sizes=frozenset({32, 64, 128, 256}), backward=False, traceable=True,
            doc="torch's int4 weight-only kernels (_weight_int4pack_mm_for_cpu / tinygemm on CUDA)"),
    Backend("triton", "gptqlora.quant.kernels.triton_gptq", {"cuda": _FLOATS, "cpu": _FLOATS},
            frozenset({2, 4, 8}), needs="triton",
            doc="fused dequant-matmul and its transpose in Triton (CUDA; CPU only under TRITON_INTERPRET=1)"),
    Backend("dense", "gptqlora.quant.kernels.dense", {"*": _ANY_FLOAT}, frozenset({2, 3, 4, 8}), traceable=True,
            doc="the dequantized weight kept per layer (fast, but the 4-bit memory saving is gone)"),
)}


# --kernel's names: 'auto', then one per backend row above. The command line reads them for --kernel's choices, so a
# wrong name is refused while parsing, before any model loads; a library caller gets check_kernel's error.
KERNELS = ("auto", *BACKENDS)


def check_kernel(name: str) -> str:
    """``name`` if it is a known kernel preference, else a UsageError listing them."""
    if name not in KERNELS:
        raise UsageError(f"unknown kernel {name!r}: choose one of {', '.join(KERNELS)}")
    return name


_IMPLEMENTATIONS: dict[str, ModuleType] = {}


def implementation(name: str) -> ModuleType:
    """The module implementing backend ``name`` (imported on first use)."""
    impl = _IMPLEMENTATIONS.get(name)
    if impl is None:
        impl = _IMPLEMENTATIONS[name] = importlib.import_module(BACKENDS[name].module)
    return impl


def unsupported_reason(name: str, facts: LayerFacts, device: torch.device, dtype: torch.dtype,
                       needs_grad: bool) -> str | None:
    """Why backend ``name`` cannot run this call, or None when it can."""
    b = BACKENDS[name]
    dtypes = b.dtypes.get(device.type, b.dtypes.get("*"))
    if dtypes is None:
        return f"it does not run on {device.type}"
    if dtype not in dtypes:
        return f"it does not compute in {dtype} on {device.type}"
    if facts.bits not in b.bits:
        return f"it has no {facts.bits}-bit kernel"
    if b.group_sizes is not None and facts.group_size not in b.group_sizes:
        return f"group size {facts.group_size} is not one of {sorted(b.group_sizes)}"
    if facts.act_order and not b.act_order:
        return "it does not handle act-order (a permuted g_idx)"
    if not facts.sym and not b.asym:
        return "it handles symmetric zero points only"
    if needs_grad and not b.backward:
        return "it computes no input gradient (training)"
    if b.needs is not None and importlib.util.find_spec(b.needs) is None:
        return f"{b.needs} is not installed"
    check = getattr(implementation(name), "unsupported", None)
    return check(facts, device) if check is not None else None


def auto_order(device: torch.device, dtype: torch.dtype, bits: int, m: int, needs_grad: bool) -> tuple[str, ...]:
    """``auto``'s candidates, fastest first (the crossovers are in this module's docstring); dequant always works."""
    if device.type == "cpu":
        if not needs_grad and bits == 4 and dtype == _BF16 and m <= CPU_INT4_MAX_M:
            return ("int4-aten", "dequant-gemm", "dequant")
        return ("dequant-gemm", "dequant")
    if device.type == "cuda":
        if not needs_grad and bits == 4 and m <= CUDA_INT4_MAX_M:
            return ("int4-aten", "triton", "dequant-gemm", "dequant")
        return ("triton", "dequant-gemm", "dequant")
    return ("dequant",)


def select_backend(preference: str, facts: LayerFacts, device: torch.device, dtype: torch.dtype, m: int,
                   needs_grad: bool) -> str:
    """The backend that runs one call: the layer's preference when it can, auto's fastest candidate, else dequant.

    Args:
        preference: a name in ``KERNELS`` ('auto' by default; see ``set_kernel``).
        facts: the layer's :class:`LayerFacts`.
        device, dtype: of the input x (the compute dtype).
        m: rows of x (tokens in the call).
        needs_grad: the input gradient is needed (training).
    Returns:
        A backend name (a key of ``BACKENDS``). An explicit preference that cannot run gives 'dequant' and a
        UserWarning saying why.
    Raises:
        UsageError: an unknown preference.
    """
    name, reason = _select(preference, facts, device, dtype, m, needs_grad)
    if reason is not None:
        warnings.warn(f"kernel {preference!r} cannot run a {facts.bits}-bit {facts.in_features}x{facts.out_features} "
                      f"layer (group {facts.group_size}) in {dtype} on {device.type}: {reason}; using 'dequant'",
                      stacklevel=2)
    return name


def _select(preference: str, facts: LayerFacts, device: torch.device, dtype: torch.dtype, m: int,
            needs_grad: bool) -> tuple[str, str | None]:
    """(backend, why the preference was not taken or None). Not memoised here: each layer remembers its choices."""
    if preference == "auto":
        for name in auto_order(device, dtype, facts.bits, m, needs_grad):
            if unsupported_reason(name, facts, device, dtype, needs_grad) is None:
                return name, None
        return "dequant", None
    check_kernel(preference)
    reason = unsupported_reason(preference, facts, device, dtype, needs_grad)
    return (preference, None) if reason is None else ("dequant", reason)
