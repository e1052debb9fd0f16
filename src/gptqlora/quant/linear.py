"""QuantizedLinear: a drop-in ``nn.Linear`` replacement holding only packed GPTQ v1 buffers.

Buffers (names and layouts are the checkpoint's, and its state_dict): qweight int32 [K*b/32, N], qzeros int32
[G, N*b/32], scales fp16 [G, N], g_idx int32 [K], bias fp16 [N] or absent. They never change dtype: ``model.to(bf16)``,
``.half()``, ``.float()`` move them between devices only (``_apply``), so an fp16 scale such as 1.0009765625 is never
rounded to bf16; the output is computed in the input's dtype.

Forward is the one place that picks a kernel (``trace_kernels`` asks the same question for a compiled step's calls,
before tracing): it asks ``kernels.registry.select_backend`` for the backend that runs this
call (device, dtype, M = rows of x, whether the input gradient is needed, the layer's preference ``kernel``, 'auto' by
default; ``set_kernel(model, name)`` below sets it for a whole model). At first use the layer repacks its buffers
into that backend's layout (kept per backend and dtype, never saved, dropped when buffers are loaded or moved).

Backward: the layer is frozen, so its weight needs no gradient, but the input does. Backends that dequantize compute
it from a weight dequantized again in backward, so no dense copy lives between forward and backward; under
``torch.utils.checkpoint`` (non-reentrant) the weight dequantized during the recompute is kept for the backward that
follows it, at most one per layer and only until then, so a checkpointed step dequantizes each weight twice, not three
times (forward, recompute). Inside ``dequantize_once()`` (a training step, when memory allows) each layer's first
dense weight of the step is kept until the step ends and serves every later forward, recompute and backward: once
per step, for the memory of a dense copy of the quantized layers. The triton backend reads the packed codes in
backward too.

Under ``torch.compile`` the layer is one opaque call, ``torch.ops.gptqlora.quantized_linear(x, key, needs_grad)``
(``key`` names the layer in a table of live layers): the compiler traces neither the kernel choice nor the
backends' Python, and the call runs this same forward, so compiled and eager pick the same kernel. Its backward is
``torch.ops.gptqlora.quantized_linear_t``, the backend's ``matmul_t``. That call costs Python on every step (on
SmolLM2-135M at batch 1, about as much as the kernels it runs), so a compiled inference step prepared with
``trace_kernels`` (the compiled decoder does) calls a *traceable* backend's kernel directly: the kernel is still the
one ``select_backend`` picks for that call, chosen before tracing, and the compiler sees only its torch operator.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from gptqlora.errors import UsageError
from gptqlora.hardware import release_free_heap
from gptqlora.quant.grid import QuantResult, num_groups
from gptqlora.quant.kernels import dequant
from gptqlora.quant.kernels.dense import DenseState
from gptqlora.quant.kernels.registry import (BACKENDS, GPTQWeight, LayerFacts, check_kernel, implementation,
                                             layer_facts, select_backend)
from gptqlora.quant.pack import pack_qweight, pack_qzeros

_MAX_DISPATCH = 64  # remembered (preference, device, dtype, M, grad) choices per layer


def _under_checkpoint() -> bool:
    """Whether saved tensors now go through torch.utils.checkpoint's hooks (its forward or its recompute).

    Under them a tensor saved in the first forward is dropped at once and the one saved in the recompute lives until
    its backward, so saving the dense weight costs no memory across the step. Other saved-tensor hooks (such as
    ``save_on_cpu``) would keep it: then nothing is saved.
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    return hooks is not None and getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint"


# The dense weights of the current ``dequantize_once`` step, by id of the backend state they were made from (the
# state is kept beside its weight, so an id is never reused while the step lasts); None outside such a step.
_STEP_WEIGHTS: dict[int, tuple[Any, Tensor]] | None = None


@contextlib.contextmanager
def dequantize_once() -> Iterator[None]:
    """While active, each quantized layer dequantizes its weight once: the dense weight made at the layer's first
    call that needs an input gradient is kept, and every later forward, checkpoint recompute and backward inside the
    context reuses it (the same values: only the work is saved). Everything kept is dropped on exit.

    For one training step, grad accumulation included. It holds a dense copy of every quantized layer the step runs
    (their weights in the compute dtype) from the forward to the step's end, so the caller decides whether memory
    allows it (``gptqlora.train.run``). Backends without ``dense_weight`` (triton) are not affected. Not reentrant.
    """
    global _STEP_WEIGHTS
    if _STEP_WEIGHTS is not None:
        raise RuntimeError("dequantize_once() is already active")
    _STEP_WEIGHTS = {}
    try:
        yield
    finally:
        _STEP_WEIGHTS = None


def _step_weight(impl: ModuleType, state: Any) -> Tensor | None:
    """The dense weight kept for this state in the current ``dequantize_once`` step (made now if it is the first
    call), or None outside one or for a backend that makes no dense weight."""
    dense_weight = getattr(impl, "dense_weight", None)
    if _STEP_WEIGHTS is None or dense_weight is None:
        return None
    hit = _STEP_WEIGHTS.get(id(state))
    if hit is None:
        with torch.no_grad():
            hit = _STEP_WEIGHTS[id(state)] = (state, dense_weight(state))
    return hit[1]


class _QuantMatmul(torch.autograd.Function):
    """y = x @ W through a backend; the input gradient through the same backend's ``matmul_t``."""

    @staticmethod
    def forward(ctx, x: Tensor, impl: ModuleType, state: Any) -> Tensor:  # type: ignore[override]
        ctx.impl, ctx.state = impl, state
        w = _step_weight(impl, state)  # kept for the whole step: saving it costs nothing more
        if w is None:
            dense_weight = getattr(impl, "dense_weight", None)
            if dense_weight is None or not _under_checkpoint():
                ctx.kept = False
                return impl.matmul(x, state)
            w = dense_weight(state)
        ctx.kept = True
        ctx.save_for_backward(w)
        return impl.matmul(x, state, w)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        w = ctx.saved_tensors[0] if ctx.kept else None
        return ctx.impl.matmul_t(grad_out, ctx.state, w), None, None


# Live layers by key, for the compiled call (a key is never reused: a copy of a layer gets a new one).
_LAYERS: weakref.WeakValueDictionary[int, "QuantizedLinear"] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def _register(layer: "QuantizedLinear") -> None:
    layer._op_key = next(_KEYS)
    _LAYERS[layer._op_key] = layer


@torch.library.custom_op("gptqlora::quantized_linear", mutates_args=())
def _quantized_linear_op(x: Tensor, key: int, needs_grad: bool) -> Tensor:
    """Layer ``key``'s output for x [..., K], computed by its eager forward (the kernel it picks for x)."""
    layer = _LAYERS[key]
    with torch.no_grad():  # the gradient is the op's backward below: the kernel runs for inference or training
        return layer._compute(x, needs_grad)


@_quantized_linear_op.register_fake
def _(x: Tensor, key: int, needs_grad: bool) -> Tensor:
    return x.new_empty(*x.shape[:-1], _LAYERS[key].out_features)


@torch.library.custom_op("gptqlora::quantized_linear_t", mutates_args=())
def _quantized_linear_t_op(grad_out: Tensor, key: int) -> Tensor:
    """The input gradient grad_out [..., N] @ W^T of layer ``key`` (its backend's ``matmul_t``)."""
    layer = _LAYERS[key]
    g2 = grad_out.reshape(-1, layer.out_features)  # [M, N]
    name, state = layer._backend(g2, True)
    impl = implementation(name)
    return impl.matmul_t(g2, state, _step_weight(impl, state)).view(*grad_out.shape[:-1], layer.in_features)


@_quantized_linear_t_op.register_fake
def _(grad_out: Tensor, key: int) -> Tensor:
    return grad_out.new_empty(*grad_out.shape[:-1], _LAYERS[key].in_features)


def _setup_context(ctx, inputs, output) -> None:
    ctx.key = inputs[1]


def _backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:
    return torch.ops.gptqlora.quantized_linear_t(grad_out.contiguous(), ctx.key), None, None


_quantized_linear_op.register_autograd(_backward, setup_context=_setup_context)


class QuantizedLinear(nn.Module):
    """A frozen linear layer stored as GPTQ v1 packed codes.

    Args:
        in_features, out_features: as nn.Linear (K, N).
        bits, group_size: the grid the codes were made on (group_size -1 = K).
        bias: whether a bias buffer exists.

    ``kernel`` is the layer's preference (see ``gptqlora.quant.kernels.registry``), ``last_kernel`` the backend that ran its
    latest call. Layouts are rebuilt after ``load_state_dict`` and moves; code that edits the buffers in place after a
    first call must call ``_forget_layouts()``.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"bits={bits} is not supported: use 2, 3, 4 or 8")
        if in_features * bits % 32 or out_features * bits % 32:
            raise ValueError(f"a {bits}-bit QuantizedLinear needs in and out features that fill int32 words "
                             f"(got {in_features} x {out_features})")
        self.in_features, self.out_features = in_features, out_features
        self.bits = bits
        self.group_size = in_features if group_size == -1 else group_size
        n_groups = num_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features * bits // 32, dtype=torch.int32,
                                                   device=device))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.arange(in_features, dtype=torch.int32, device=device) // self.group_size)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device))
        else:
            self.bias = None
        self.kernel = "auto"  # the kernel preference (see gptqlora.quant.kernels.registry)
        self.last_kernel: str | None = None  # the backend that ran the latest call
        self.kernels_seen: set[str] = set()  # the backends that ran since the preference was last set
        self._forget_layouts()
        _register(self)

    @classmethod
    def from_result(cls, result: QuantResult, bits: int, group_size: int, bias: Tensor | None = None
                    ) -> "QuantizedLinear":
        """Pack a solver's result (codes [N, K], scales/zeros [G, N], g_idx [K]) into a new layer."""
        n, k = result.codes.shape
        layer = cls(k, n, bits, group_size, bias=bias is not None, device=result.codes.device)
        layer.qweight.copy_(pack_qweight(result.codes, bits))
        layer.qzeros.copy_(pack_qzeros(result.zeros, bits))
        layer.scales.copy_(result.scales.half())
        layer.g_idx.copy_(result.g_idx)
        if bias is not None:
            layer.bias = bias.detach().to(torch.float16).clone()
        return layer

    # ------------------------------------------------------------------------------------ layouts and dispatch

    def _forget_layouts(self) -> None:
        """Drop every repacked layout and remembered choice (after buffers are loaded, moved or re-preferred)."""
        self._facts: LayerFacts | None = None
        self._layouts: dict[tuple[str, torch.dtype], Any] = {}
        self._dispatch: dict[tuple, tuple[str, Any]] = {}
        # (rows, dtype, device) -> (backend module, layout): the inference calls a compiled step makes directly
        # (``trace_kernels``). Read by key while tracing, so dynamo guards on that key only: adding one recompiles
        # nothing.
        self._traced: dict[tuple[int, torch.dtype, torch.device], tuple[ModuleType, Any]] = {}

    @property
    def facts(self) -> LayerFacts:
        """What backends need to know about the codes (act-order, symmetric, ...), computed once per load."""
        if self._facts is None:
            self._facts = layer_facts(self.qzeros, self.g_idx, self.bits, self.group_size, self.in_features,
                                      self.out_features)
        return self._facts

    def gptq_weight(self) -> GPTQWeight:
        """The checkpoint buffers (by reference) and their facts, as backends take them."""
        return GPTQWeight(self.qweight, self.qzeros, self.scales, self.g_idx, self.facts)

    def _layout(self, name: str, dtype: torch.dtype) -> Any:
        state = self._layouts.get((name, dtype))
        if state is None:
            # Normal tensors even when first called under inference_mode (generation), so that training can use them.
            with torch.no_grad(), torch.inference_mode(False):
                state = self._layouts[(name, dtype)] = implementation(name).repack(self.gptq_weight(), dtype)
            if self.qweight.device.type == "cpu":
                release_free_heap()  # the repack's temporaries would otherwise stay resident (see its docstring)
        return state

    def _backend(self, x: Tensor, needs_grad: bool) -> tuple[str, Any]:
        """(backend name, its layout of this layer) for a call on x [M, K]."""
        return self._backend_for(x.device, x.dtype, x.shape[0], needs_grad)

    def _backend_for(self, device: torch.device, dtype: torch.dtype, m: int, needs_grad: bool) -> tuple[str, Any]:
        """(backend name, its layout of this layer) for a call on M rows in ``dtype`` on ``device``."""
        key = (self.kernel, device, dtype, m, needs_grad)
        hit = self._dispatch.get(key)
        if hit is None:
            name = select_backend(self.kernel, self.facts, device, dtype, m, needs_grad)
            hit = (name, self._layout(name, dtype))
            if len(self._dispatch) >= _MAX_DISPATCH:
                self._dispatch.clear()
            self._dispatch[key] = hit
        return hit

    def set_kernel(self, name: str) -> None:
        """Prefer kernel ``name`` (one of ``gptqlora.quant.kernels.registry.KERNELS``); layouts of the old choice are dropped."""
        check_kernel(name)
        self.kernels_seen.clear()
        self.last_kernel = None  # so that the next call records its backend in kernels_seen
        if name != self.kernel:
            self.kernel = name
            self._layouts.clear()
            self._dispatch.clear()
            self._traced.clear()

    # ------------------------------------------------------------------------------------ torch.nn.Module hooks

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles carry the checkpoint buffers only; layouts are rebuilt at first use.
        state = self.__dict__.copy()
        state.update(_facts=None, _layouts={}, _dispatch={}, _traced={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        _register(self)  # a copy is a layer of its own

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self._forget_layouts()

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """Move buffers as ``fn`` does, but keep their dtypes: int32 codes and fp16 scales stay as stored."""

        def move_only(t: Tensor) -> Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(device=moved.device)

        result = super()._apply(move_only, recurse)
        self._forget_layouts()
        return result

    # ------------------------------------------------------------------------------------ compute

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense weight [N, K] in nn.Linear layout (the reference dequantization)."""
        return dequant.dense_weight(dequant.repack(self.gptq_weight(), dtype)).T.contiguous()

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):  # compute in autocast's dtype, with our own kernels
            x = x.to(torch.get_autocast_dtype(x.device.type))
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        if torch.compiler.is_compiling():  # one opaque call, or a traceable kernel chosen before (module docstring)
            x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # [M, K]
            traced = None if needs_grad else self._traced.get((x2.shape[0], x.dtype, x.device))
            if traced is not None:
                impl, state = traced
                return self._finish(impl.matmul(x2, state), x)
            return torch.ops.gptqlora.quantized_linear(x, self._op_key, needs_grad)
        return self._compute(x, needs_grad)

    def _compute(self, x: Tensor, needs_grad: bool) -> Tensor:
        """y = x @ W (+ bias) for x [..., K] through the backend picked for this call."""
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # [M, K]
        name, state = self._backend(x2, needs_grad)
        if self.last_kernel != name:  # nn.Module.__setattr__ is slow enough to matter in decoding
            self.last_kernel = name
            self.kernels_seen.add(name)
        impl = implementation(name)
        if needs_grad and torch.is_grad_enabled():
            y = _QuantMatmul.apply(x2, impl, state)
        else:  # the compiled op's forward passes needs_grad under no_grad: a dequantize_once step's weight serves it
            y = impl.matmul(x2, state, _step_weight(impl, state) if needs_grad else None)
        return self._finish(y, x)

    def _finish(self, y: Tensor, x: Tensor) -> Tensor:
        """The layer's output from the kernel's y [M, N] for input x [..., K]: plus the bias, in x's leading shape."""
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    @property
    def _cache(self) -> Tensor | None:
        """The kept dequantized weight [N, K] of the 'dense' kernel, if one was made (for tests and benchmarks)."""
        return next((s.weight for s in self._layouts.values() if isinstance(s, DenseState)), None)

    @property
    def sequential_groups(self) -> bool:
        """True when g_idx is k // group_size (no act-order)."""
        return not self.facts.act_order

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, kernel={self.kernel!r}")


# ---------------------------------------------------------------------------------------------- whole models

def check_quantized(model: nn.Module) -> int:
    """Count the model's ``QuantizedLinear`` layers (those wrapped by LoRA included).

    Returns:
        The count, > 0.
    Raises:
        UsageError: when the model holds none, i.e. a float model was given where a quantized one was asked for.
    """
    n = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    if n == 0:
        raise UsageError(f"the model ({type(model).__name__}) holds no QuantizedLinear layers: pass a directory "
                         "written by `gptqlora quantize` (or leave out --quantized to evaluate a float model)")
    return n


def dense_copy_bytes(model: nn.Module) -> int:
    """The most memory dense copies of all of ``model``'s quantized layers can take (4 bytes per weight, the widest
    dtype a backend dequantizes a half-precision layer in): what ``dequantize_once`` keeps in a step."""
    return sum(4 * m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))


def trace_kernels(model: nn.Module, device: torch.device, dtype: torch.dtype, rows: int) -> int:
    """Prepare the model's quantized layers for a compiled inference step whose calls have x of ``rows`` rows in
    ``dtype`` on ``device``: each layer picks its backend for that call now, as its eager forward would
    (``select_backend``), and builds the layout; where the backend is traceable, the compiled step will call its
    kernel directly instead of the opaque op. Calls of other shapes, and calls that need a gradient, stay opaque.

    Returns:
        The number of layers whose compiled inference calls of that shape are traced.
    """
    traced = 0
    for layer in model.modules():
        if not isinstance(layer, QuantizedLinear):
            continue
        name, state = layer._backend_for(device, dtype, rows, False)
        if BACKENDS[name].traceable:
            layer._traced.setdefault((rows, dtype, device), (implementation(name), state))
            layer.kernels_seen.add(name)  # what the compiled calls will run (they record nothing themselves)
            traced += 1
    return traced


def set_kernel(model: nn.Module, name: str) -> int:
    """Set every QuantizedLinear's kernel preference in ``model``; layers drop layouts they no longer need.

    Args:
        name: one of ``gptqlora.quant.kernels.registry.KERNELS``; a layer a backend cannot run falls back to ``dequant`` (with a
            warning).
    Returns:
        The number of QuantizedLinear layers set.
    Raises:
        UsageError: an unknown name.
    """
    check_kernel(name)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for layer in layers:
        layer.set_kernel(name)
    return len(layers)


def kernels_used(model: nn.Module) -> dict[str, int]:
    """How many QuantizedLinear layers of ``model`` ran each backend since their kernel was last set (for run
    summaries: a decode uses one backend for the prompt and another per new token, so a layer can count twice).

    Returns:
        Backend name -> layer count, plus ``"none"`` for layers not called since; empty when there are no such layers.
    """
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            for key in sorted(m.kernels_seen) or ["none"]:
                counts[key] = counts.get(key, 0) + 1
    return counts
