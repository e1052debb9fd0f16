"""The model's forward per decoding step: eager over a growing cache, or compiled over a static one.

:func:`gptqlora.eval.generate.generate_batch` owns the loop (sampling, stops, budgets); what it asks of a decoder is

    logits() -> [B, V]            the next-token logits of every row (the prompt's last position at first)
    drop(rows: list[int])         rows that have finished: their logits are never read again
    advance(token [B], active [B]) feed each row its new token; rows not ``active`` are masked out from now on

:class:`EagerDecode` is the reference: a ``DynamicCache`` and an attention mask that grows a column per step, so no
shape repeats and nothing is compiled. It computes only the rows still running: a batch runs until its longest row
ends and a step's time grows with its rows (SmolLM2-135M in float32 on one CPU thread: 80 ms at 1 row, 250 ms at
16), so a finished row is dropped from the cache and the inputs (one copy of the cache, about what a step's append
costs) and its logits are zeros from then on (16 GSM8K chat prompts in one batch, budget 256, 6 rows running to it:
50 -> 59 tokens/s, the same texts). :class:`CompiledDecode` follows gpt-fast's recipe on the same Hugging
Face model: a ``StaticCache`` preallocated for the prompt plus the budget, an attention mask of that fixed length
written a column per step, and the one-token step compiled with ``torch.compile`` (inductor's C++ backend on a CPU;
CUDA graphs through ``mode="reduce-overhead"`` on a GPU). The prompt (prefill) runs eagerly into the static cache. A
quantized layer runs the kernel eager decoding would pick for the step's rows: chosen before tracing
(``gptqlora.quant.linear.trace_kernels``), it is called directly from the graph where the backend is traceable
(int4-aten) and through the layer's opaque op otherwise. On a CPU, a one-row step's matmuls (LoRA's products, the
head) and its attention over the cache are written as fused loops (:func:`compiled_step`). Its shapes are static, so
it keeps finished rows, fed pad under a 0 mask.

Shapes are bucketed so a run compiles a few: the rows up to a power of two (extra rows repeat the first prompt and
are never read), the cache length up to a multiple of :data:`CACHE_BUCKET` (within the model's context). Each new
shape compiles once per process (:data:`COMPILE_STATS` keeps the seconds, reported apart from decoding);
inductor's on-disk cache makes a later process's compile of the same shapes shorter.

Compiled and eager decoding give the same tokens up to floating-point reassociation: in float32 on a tiny model
they are equal (tested); in bf16 a near tie can flip.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, StaticCache

from gptqlora.config import COMPILE_CHOICES
from gptqlora.quant.linear import trace_kernels

log = logging.getLogger(__name__)

# The static cache's length is the prompt plus the budget rounded up to a multiple of this (at most the context).
CACHE_BUCKET = 256
# "auto" compiles a job that decodes at least this many steps (batches x budget, samples included) in batches of at
# most COMPILE_MAX_ROWS rows. Measured on SmolLM2-135M in float32, one thread, on an AVX2 CPU without native bf16
# (2 busy cores, 2026-12-07):
# compiling took 100-145 s the first time (30 s from inductor's on-disk cache), and a step's CPU time went from 80 to
# 65 ms at batch 1, 132 to 126 ms at batch 4, but 248 to 368 ms at batch 16 (the static cache's attention and its
# update cost more than the Python they save).
COMPILE_MIN_STEPS = 4096
COMPILE_MAX_ROWS = 2


def use_compiled(setting: str, steps: int, rows: int) -> bool:
    """Whether a job compiles its decode step: ``on``, ``off``, or ``auto``: at least :data:`COMPILE_MIN_STEPS`
    steps in batches of at most :data:`COMPILE_MAX_ROWS` rows (where compiling paid, see above).

    Args:
        setting: ``auto``, ``on`` or ``off`` (``--compile``).
        steps: the decoding steps the job will run (batches x budget).
        rows: rows per decoding batch.
    Raises:
        ValueError: an unknown setting.
    """
    if setting not in COMPILE_CHOICES:
        raise ValueError(f"compile={setting!r}: use one of {', '.join(COMPILE_CHOICES)}")
    return setting == "on" or (setting == "auto" and steps >= COMPILE_MIN_STEPS and rows <= COMPILE_MAX_ROWS)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, so a left-padded prompt is rotated as if unpadded: [B, L] -> [B, L]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_kwarg(model: torch.nn.Module) -> str:
    # transformers >= 5.x names the cache argument `cache` (`past_key_values` is deprecated); older ones do not.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@contextlib.contextmanager
def contiguous_head_input(model: torch.nn.Module) -> Iterator[None]:
    """While active, the output head gets a contiguous input.

    With ``logits_to_keep=1`` the head sees the last position of the hidden states, a strided view. torch 2.13's CPU
    bf16 ``linear`` on a strided input with a frozen weight (``requires_grad=False``: every weight of a LoRA model)
    converts the whole weight per call: SmolLM2's head took 81 ms and 108 MiB instead of 1.9 ms at prefill, a
    49152 x 4096 head 15 s. ``.contiguous()`` is not enough: at batch 1 the [1, 1, H] slice counts as contiguous
    while keeping the prompt's stride, so the input is copied into fresh memory (B x H elements: nothing).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return

    def fresh_input(_module, args):
        return (torch.empty_like(args[0], memory_format=torch.contiguous_format).copy_(args[0]), *args[1:])

    handle = head.register_forward_pre_hook(fresh_input)
    try:
        yield
    finally:
        handle.remove()


class EagerDecode:
    """The reference decoder: a ``DynamicCache`` and an attention mask [R, L + steps] that grows a column per step,
    over the R rows of the batch not dropped yet (see the module's docstring for why rows are dropped).

    Args:
        model: a causal LM taking input_ids, attention_mask, position_ids and a cache; returns ``.logits``.
        input_ids, attention_mask: the left-padded prompts [B, L], on the model's device.
    """

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.model, self.input_ids, self.attention_mask = model, input_ids, attention_mask
        self.position_ids = position_ids_from_mask(attention_mask)  # [R, L]
        self.kv_cache = DynamicCache(config=model.config)
        self.cache = {cache_kwarg(model): self.kv_cache}  # under the model's name for it
        self.batch = len(input_ids)
        self.rows = list(range(self.batch))  # the batch rows computed, in order (R of them)
        self.index = torch.arange(self.batch, device=input_ids.device)  # [R]: the same, on the device

    def logits(self) -> torch.Tensor:
        """The next-token logits [B, V] of every row of the batch; zeros for the rows dropped."""
        with contiguous_head_input(self.model):
            logits = self.model(input_ids=self.input_ids, attention_mask=self.attention_mask,
                                position_ids=self.position_ids, use_cache=True, logits_to_keep=1,
                                **self.cache).logits[:, -1]  # [R, V]
        if len(self.rows) == self.batch:
            return logits
        return logits.new_zeros(self.batch, logits.shape[-1]).index_copy_(0, self.index, logits)  # [B, V]

    def drop(self, rows: list[int]) -> None:
        """Stop computing these batch rows: select the others in the cache and the inputs (on a GPU, uploading
        their places is one sync per call that drops a row)."""
        gone = set(rows)
        keep = [j for j, row in enumerate(self.rows) if row not in gone]  # places among the R rows computed
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[j] for j in keep]
        keep = torch.tensor(keep, device=self.index.device)  # [R']
        self.index = self.index[keep]  # [R']
        self.kv_cache.batch_select_indices(keep)  # every layer's keys and values: [R', heads, length, head_dim]
        self.input_ids, self.attention_mask, self.position_ids = (
            t[keep] for t in (self.input_ids, self.attention_mask, self.position_ids))  # [R', ...]

    def advance(self, token: torch.Tensor, active: torch.Tensor) -> None:
        # The new token's position is the count of real tokens before it; rows not active are masked out.
        self.position_ids = self.attention_mask.sum(-1, keepdim=True)  # [R, 1]
        column = active[self.index, None].long()  # [R, 1]
        self.attention_mask = torch.cat([self.attention_mask, column], dim=-1)  # [R, L + step + 1]
        self.input_ids = token[self.index, None]  # [R, 1]


def bucket_rows(rows: int) -> int:
    """The compiled batch for ``rows`` rows: the next power of two."""
    return 1 << max(0, rows - 1).bit_length()


def bucket_length(length: int, context: int | None) -> int:
    """The static cache's length for ``length`` positions: up to a multiple of :data:`CACHE_BUCKET`, within
    ``context`` (never below ``length``)."""
    rounded = math.ceil(length / CACHE_BUCKET) * CACHE_BUCKET
    return max(length, min(rounded, context)) if context is not None else rounded


@dataclass
class CompileStats:
    """Seconds spent on the first call of each compiled shape (compiling, then one step), per (rows, length)."""

    seconds: dict[tuple[int, int], float] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


COMPILE_STATS = CompileStats()


def _decode_step(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, cache_position: torch.Tensor, cache: dict) -> torch.Tensor:
    """One token per row through ``model`` over its static cache: [B, 1] ids -> [B, V] logits."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 cache_position=cache_position, use_cache=True, logits_to_keep=1, **cache).logits[:, -1]


def one_query_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of one query per row over the cache, as products and sums in float32 (or wider) that inductor
    compiles into the step's own loops (grouped-query heads read their shared key/value head; no copy). Anything else
    (a longer query, dropout, a sliding window or soft-capping) goes to transformers' sdpa, which the prompt uses.

    Shapes as transformers' attention functions: query [B, H, 1, D], key/value [B, Hkv, S, D], a boolean mask
    [B, 1, 1, S] (True: attend) or None -> ([B, 1, H, D], None)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    rows, heads, length, dim = query.shape
    if length != 1 or dropout or kwargs.get("sliding_window") or kwargs.get("softcap"):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    groups, wide = heads // key.shape[1], torch.promote_types(query.dtype, torch.float32)
    q = query.view(rows, key.shape[1], groups, 1, dim).to(wide)  # [B, Hkv, G, 1, D]
    scores = (q * key[:, :, None].to(wide)).sum(-1) * (dim ** -0.5 if scaling is None else scaling)  # [B, Hkv, G, S]
    if attention_mask is not None:
        mask = attention_mask[..., :key.shape[2]].reshape(rows, 1, 1, -1)  # [B, 1, 1, S]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = scores.softmax(-1)[..., None]  # [B, Hkv, G, S, 1]
    out = (weights * value[:, :, None].to(wide)).sum(-2)  # [B, Hkv, G, D]
    return out.to(query.dtype).reshape(rows, 1, heads, dim), None


def _insert(graph: torch.fx.Graph, op, *args) -> torch.fx.Node:
    """A node ``op(*args)`` at the graph's insertion point, with its fake value (what later passes read)."""
    node = graph.call_function(op, args)
    node.meta["val"] = op(*(a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args))
    return node


def _one_row_matmuls(graph: torch.fx.Graph) -> None:
    """Rewrite, in place, what inductor's ``decompose_mm_pass`` (torch 2.13) gets wrong or slow at one row:

    - ``addmm(input, a, b, beta=, alpha=)`` with a scale other than 1 becomes ``beta * input + alpha * mm(a, b)``:
      the pass rewrites a one-row addmm as products and sums and drops its scales (LoRA adds ``scale * B(A x)``
      with one addmm's alpha);
    - a one-row ``mm(x, W.t())`` over a contiguous weight wider than its 2048 (the output head) becomes the float32
      sum over each row of W times x, which inductor compiles to one pass over W (SmolLM2's head, 49,152 x 576 bf16,
      two AVX-512 threads: 1.7 against 4.1 ms; Llama's 4096 wide: 14.6 against 21.3 ms)."""
    aten, cast = torch.ops.aten, torch.ops.prims.convert_element_type.default
    for node in graph.find_nodes(op="call_function", target=aten.addmm.default):
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        if alpha != 1 or beta != 1:
            bias, a, b = node.args
            with graph.inserting_before(node):
                product = _insert(graph, aten.mul.Tensor, _insert(graph, aten.mm.default, a, b), alpha)
                node.replace_all_uses_with(_insert(graph, aten.add.Tensor,
                                                   _insert(graph, aten.mul.Tensor, bias, beta), product))
            graph.erase_node(node)
    for node in graph.find_nodes(op="call_function", target=aten.mm.default):
        x, w_t = node.args
        (rows, k), (_, n) = x.meta["val"].shape, w_t.meta["val"].shape
        if rows == 1 and max(k, n) > 2048 and w_t.meta["val"].stride() == (1, k):
            with graph.inserting_before(node):
                weight = _insert(graph, aten.permute.default, w_t, [1, 0])  # [N, K], contiguous
                wide = torch.promote_types(x.meta["val"].dtype, torch.float32)  # the sums' dtype
                products = _insert(graph, aten.mul.Tensor, _insert(graph, cast, weight, wide),
                                   _insert(graph, cast, x, wide))  # [N, K] * [1, K]
                sums = _insert(graph, aten.sum.dim_IntList, products, [-1])  # [N]
                node.replace_all_uses_with(_insert(graph, cast, _insert(graph, aten.unsqueeze.default, sums, 0),
                                                   x.meta["val"].dtype))  # [1, N]
            graph.erase_node(node)


def cpu_step_options() -> dict:
    """Inductor's options for the CPU step: :func:`_one_row_matmuls` as a pre-pass (its uuid keys inductor's on-disk
    cache), then ``decompose_mm_pass``. torch._inductor is imported here, when a step first compiles."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class OneRowMatmuls(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            _one_row_matmuls(graph)

        def uuid(self) -> str:
            return "gptqlora.eval.decode._one_row_matmuls/1"
    return {"post_grad_custom_pre_pass": OneRowMatmuls(), "post_grad_fusion_options": {"decompose_mm_pass": {}}}


# The attention implementation the CPU step runs under (registered with transformers, with sdpa's masks).
ONE_QUERY_ATTENTION = "gptqlora_one_query"


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """``model`` runs attention ``name`` (a name transformers' attention and mask interfaces know) inside."""
    before = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = before


@functools.cache
def compiled_step(device_type: str):
    """The compiled :func:`_decode_step` for a device type (one per process: dynamo keeps a graph per model and
    shape, guarded, so a second model or shape compiles its own).

    On a GPU: CUDA graphs. On a CPU a step of one row is a few hundred small calls, and the smallest cost most
    (SmolLM2-135M, 4-bit + LoRA, bf16, two AVX-512 threads, 2026-12-08, profiled): a LoRA rank-16 product took 20-50
    us as a oneDNN matmul and the sdpa kernel about 200 us a layer over a 256-position cache, together 10 of the
    step's 36 ms, and the head's matmul 4.6 ms. So inductor's ``decompose_mm_pass`` writes one-row matmuls up to
    2048 wide as products and sums that it fuses, after :func:`_one_row_matmuls` (which also takes the head),
    attention runs :func:`one_query_attention`, and a batch's later steps check only the guards that tell cached
    graphs apart (:meth:`CompiledDecode.advance`): 19 ms a step.
    """
    if device_type == "cuda":
        return torch.compile(_decode_step, dynamic=False, mode="reduce-overhead")
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ONE_QUERY_ATTENTION, one_query_attention)
    AttentionMaskInterface.register(ONE_QUERY_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    step = torch.compile(_decode_step, dynamic=False, options=cpu_step_options())

    def cpu_step(model: torch.nn.Module, *args) -> torch.Tensor:
        with attention_implementation(model, ONE_QUERY_ATTENTION):
            return step(model, *args)
    return cpu_step


class CompiledDecode:
    """The compiled decoder: a static cache of ``bucket_length(L + budget)`` positions for ``bucket_rows(B)`` rows.

    Args:
        model, input_ids, attention_mask: as :class:`EagerDecode`.
        max_new_tokens: the most steps any row runs (the loop's length).
        pad_id: fed to the bucket's extra rows after the prompt.
        context: the model's context (:func:`gptqlora.eval.generate.context_length`), or None.
    """

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int, pad_id: int, context: int | None):
        rows, length = input_ids.shape
        self.model, self.rows, self.pad_id = model, rows, pad_id
        extra = bucket_rows(rows) - rows  # rows that repeat the first prompt: a mask with real tokens, never read
        input_ids = torch.cat([input_ids, input_ids[:1].expand(extra, -1)])  # [Bb, L]
        attention_mask = torch.cat([attention_mask, attention_mask[:1].expand(extra, -1)])  # [Bb, L]
        size = bucket_length(length + max_new_tokens, context)
        self.mask = attention_mask.new_zeros(len(input_ids), size)  # [Bb, S]: written a column per step
        self.mask[:, :length] = attention_mask
        self.cache = {cache_kwarg(model): StaticCache(config=model.config, max_cache_len=size)}
        self.at = length  # the cache position of the next token
        self.positions = attention_mask.sum(-1, keepdim=True)  # [Bb, 1]: the next token's position per row
        self.shape = (len(input_ids), size)
        self.step = compiled_step(input_ids.device.type)
        # The step's quantized layers see one token per row, in the hidden states' dtype (the embeddings')
        trace_kernels(model, input_ids.device, model.get_input_embeddings().weight.dtype, len(input_ids))
        self.stepped = False  # a batch's first step is where anything (re)compiles: its shapes and guards stay
        with contiguous_head_input(model):  # the prompt, eagerly
            self._logits = model(input_ids=input_ids, attention_mask=self.mask,
                                 position_ids=position_ids_from_mask(attention_mask),
                                 cache_position=torch.arange(length, device=input_ids.device), use_cache=True,
                                 logits_to_keep=1, **self.cache).logits[:, -1]  # [Bb, V]

    def logits(self) -> torch.Tensor:
        return self._logits[:self.rows]

    def drop(self, rows: list[int]) -> None:
        """Nothing: finished rows stay, fed pad under a 0 mask, since the compiled step's shapes are static."""

    def advance(self, token: torch.Tensor, active: torch.Tensor) -> None:
        extra = self.shape[0] - self.rows
        token = torch.cat([token, token.new_full((extra,), self.pad_id)])[:, None]  # [Bb, 1]
        self.mask[:, self.at] = torch.cat([active, active.new_zeros(extra)])
        args = (self.model, token, self.mask, self.positions, torch.tensor([self.at], device=token.device), self.cache)
        if self.stepped:  # the inputs of the batch's first step again, by construction: its guards passed
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):  # only those that tell graphs apart
                self._logits = self.step(*args)
        else:
            self.stepped = True
            start = time.perf_counter()
            with torch._dynamo.config.patch(recompile_limit=64):  # a graph per bucket and model, not per call
                self._logits = self.step(*args)
            if self.shape not in COMPILE_STATS.seconds:
                COMPILE_STATS.seconds[self.shape] = time.perf_counter() - start
                log.info("compiled the decode step for %d rows x %d positions in %.1f s", *self.shape,
                         COMPILE_STATS.seconds[self.shape])
        self.positions = self.positions + self.mask[:, self.at:self.at + 1]  # rows masked out keep their position
        self.at += 1
