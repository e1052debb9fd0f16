"""The layer-by-layer driver: quantize a LLaMA-family model's decoder blocks, one block at a time.

Sequential: block i is calibrated on the outputs of blocks < i already quantized. Inside a block, true-sequential
order runs the block stage by stage:

    x ─ norm1 ─> [q, k, v] ─ attention ─> o ─(+x)─> h ─ norm2 ─> [gate, up] ─ act(gate)*up ─> down ─(+h)─> out

each stage's Hessian is collected from the outputs of the stages before it, already quantized. Linears that share an
input (q/k/v, gate/up) share a Hessian and are solved in one call with their rows stacked, which is exactly equivalent
and 2-3x cheaper.

Memory: blocks come from a source and go to a sink (``quantize_blocks``). For a model in memory the source is its own
layers (``quantize_model_weights``); for a checkpoint larger than memory,
``gptqlora.quant.streamed.quantize_streamed`` loads each block from safetensors when its turn comes and writes it
out when done. Calibration activations stay where they are given (the CPU, when streaming) and go to the block's
device one chunk at a time; each Hessian is accumulated chunk by chunk and scaled in place, so a block holds its
input, one residual-stream-sized list and one Hessian, never every stage's input. The dequantized ('dense') weights
that quantized linears keep for the block's remaining passes are freed as soon as no pass needs them (attention's once
the residual stream is formed, gate/up's while down_proj is solved), and the solver works in the float weights the
block gives up (``_take_weights``): no copy of W beside them.

The stage-by-stage computation is LLaMA's block written out by hand: ``check_staged_forward`` compares it with the
block's own forward on the first chunk of every block and refuses a block that computes something else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gptqlora.config import QuantConfig
from gptqlora.errors import UsageError
from gptqlora.hardware import release_free_heap
from gptqlora.quant.gptq import HessianAccumulator, HessianSource, gptq_solve, handover
from gptqlora.quant.grid import QuantResult, rtn_quantize
from gptqlora.quant.linear import QuantizedLinear

log = logging.getLogger(__name__)

# Stages of a LLaMA block in true-sequential order; linears in one stage share their input.
STAGES: tuple[tuple[str, ...], ...] = (
    ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"),
    ("self_attn.o_proj",),
    ("mlp.up_proj", "mlp.gate_proj"),
    ("mlp.down_proj",),
)
# (rtol, atol) per compute dtype for staged vs forward, element by element: torch.testing.assert_close's defaults.
_FORWARD_TOLERANCE = {torch.float32: (1.3e-6, 1e-5), torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}

Rope = tuple[Tensor, Tensor]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a LLaMA-family causal LM, checked to have the structure the driver relies on."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no model.layers: only LLaMA-family causal LMs are supported")
    need = ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")
    missing = [n for n in need if not hasattr(layers[0], n)]
    if missing:
        raise ValueError(f"decoder block {type(layers[0]).__name__} lacks {missing}: only LLaMA-family blocks are "
                         "supported")
    return layers


def quantize_linears(block: nn.Module, names: Sequence[str], H: HessianSource | None, config: QuantConfig
                     ) -> dict[str, float]:
    """Quantize linears of ``block`` that share one input (and so one Hessian) and swap in QuantizedLinear layers.

    Args:
        names: block-relative names, e.g. ("self_attn.k_proj", "self_attn.v_proj").
        H: their Hessian [K, K], or a function handing it over to the solver (``gptq.handover``); None for
            round-to-nearest.
    Returns:
        GPTQ loss per name (the stacked solve's loss is split in proportion to rows).
    """
    W, kept = _take_weights(block, names)
    if config.method == "rtn" or H is None:
        result = rtn_quantize(W, config.bits, config.group_size, config.sym)
    else:
        result = gptq_solve(W, H, bits=config.bits, group_size=config.group_size, sym=config.sym,
                            act_order=config.act_order, static_groups=config.static_groups,
                            group_aware=config.group_aware, damp_percent=config.damp_percent,
                            block_size=config.block_size, overwrite_W=True)
    del W
    if result.damp is not None and result.damp > config.damp_percent:
        log.warning("%s: the damped Hessian did not factor; GPTQ used damping %g instead of %g (calibrate on more or "
                    "more varied samples)", ", ".join(names), result.damp, config.damp_percent)
    losses, start = {}, 0
    for name, (out_features, bias, device) in zip(names, kept):
        rows = slice(start, start + out_features)
        part = QuantResult(result.codes[rows], result.scales[:, rows], result.zeros[:, rows], result.g_idx)
        q = QuantizedLinear.from_result(part, config.bits, config.group_size, bias=bias).to(device)
        q.set_kernel("dense")  # the block's remaining calibration passes reuse its weight; released when it is done
        block.set_submodule(name, q)
        losses[name] = result.loss * out_features / result.codes.shape[0]
        start += out_features
    del result
    release_free_heap()  # the solve's and packing's freed temporaries, before the next stage allocates its own
    return losses


def _take_weights(block: nn.Module, names: Sequence[str]) -> tuple[Tensor, list[tuple[int, Tensor | None, torch.device]]]:
    """Take the float linears ``names`` out of ``block`` (each leaves a ``_Quantizing`` in its place): their weights
    with rows stacked, W [sum N, K], which no one else holds (the solver may work in it), and each one's (rows,
    bias, device).

    One linear's weight is taken as it is (a copy would hold down_proj's weights twice). Stacked rows are copied in
    one linear at a time, each linear leaving the block as soon as its rows are in: the copy never coexists with
    all of them (q/k/v of 7B: 64 MiB above the linears instead of 192).
    """
    first = block.get_submodule(names[0]).weight
    n_rows = sum(block.get_submodule(n).out_features for n in names)
    W = first.detach() if len(names) == 1 else first.new_empty(n_rows, first.shape[1])  # pages filled as copied in
    del first
    kept, start = [], 0
    for name in names:
        lin = block.get_submodule(name)
        if len(names) > 1:
            W[start:start + lin.out_features] = lin.weight.detach()
        kept.append((lin.out_features, lin.bias, lin.weight.device))
        start += lin.out_features
        block.set_submodule(name, _Quantizing())
        del lin  # its weight is freed here: W holds its rows
    return W, kept


class _Quantizing(nn.Module):
    """Holds a linear's place while its weights are being quantized; a block left with one cannot run by mistake."""

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("this linear's quantization did not finish: the model is incomplete")


class _CaptureInput(nn.Module):
    """Stands in for o_proj while attention runs: records the input, returns zeros of the right width."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x)
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _attention_input(attn: nn.Module, n1: Tensor, rope: Rope, mask: Tensor | None) -> Tensor:
    """o_proj's input for normalised hidden states n1 [b, T, D]: the attention heads, concatenated [b, T, H*d]."""
    capture = _CaptureInput(attn.o_proj.out_features)
    o_proj, attn.o_proj = attn.o_proj, capture
    try:
        attn(hidden_states=n1, position_embeddings=_fit(rope, n1), attention_mask=_fit_mask(mask, n1))
    finally:
        attn.o_proj = o_proj
    return capture.inputs[0]


def _mlp_input(mlp: nn.Module, n2: Tensor) -> Tensor:
    """down_proj's input for normalised hidden states n2 [b, T, D]: act(gate(n2)) * up(n2), [b, T, I]."""
    return mlp.act_fn(mlp.gate_proj(n2)) * mlp.up_proj(n2)


def staged_forward(block: nn.Module, x: Tensor, rope: Rope, mask: Tensor | None) -> Tensor:
    """The block's output for x [b, T, D] computed stage by stage, exactly as ``quantize_block`` computes it."""
    attn, mlp = block.self_attn, block.mlp
    h = x + attn.o_proj(_attention_input(attn, block.input_layernorm(x), rope, mask))
    return h + mlp.down_proj(_mlp_input(mlp, block.post_attention_layernorm(h)))


def _block_device(block: nn.Module) -> torch.device:
    return block.input_layernorm.weight.device


@torch.no_grad()
def check_staged_forward(block: nn.Module, x: Tensor, rope: Rope, mask: Tensor | None, index: int = 0) -> float:
    """Refuse a block whose own forward is not the LLaMA computation the driver calibrates with.

    Args:
        x: one chunk of the block's input [b, T, D] (any device; it is moved to the block's).
        index: the block's index, for the message.
    Returns:
        max |staged - forward| on the chunk (0.0 for a LLaMA block: the two run the same operations).
    Raises:
        UsageError: when an element differs by more than the compute dtype's tolerance (``torch.testing``'s
            defaults: |staged - forward| <= atol + rtol * |forward|), or is not finite.
    """
    x = x.to(_block_device(block))
    ours = staged_forward(block, x, rope, mask).float()
    theirs = _block_forward(block, [x], rope, mask)[0].float()
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    rtol, atol = _FORWARD_TOLERANCE.get(dtype, _FORWARD_TOLERANCE[torch.bfloat16])
    diff = (ours - theirs).abs().max().item()
    if not torch.isclose(ours, theirs, rtol=rtol, atol=atol).all():
        raise UsageError(f"decoder block {index} ({type(block).__name__}) does not compute what the driver's staged "
                         f"LLaMA block computes (max |difference| {diff:.3g} on the first calibration chunk, beyond "
                         f"{str(dtype).removeprefix('torch.')} tolerance rtol={rtol:g}, atol={atol:g}): "
                         "true-sequential GPTQ would calibrate its layers on wrong inputs. Use --no-true-sequential (hooks on the "
                         "block's own forward) or --method rtn for this model")
    return diff


def _hessian(inputs: Iterable[Tensor], device: torch.device) -> Tensor:
    """H from inputs produced one chunk at a time (each chunk is dropped once added), in the accumulator's memory."""
    acc: HessianAccumulator | None = None
    for x in inputs:
        if acc is None:
            acc = HessianAccumulator(x.shape[-1], device)
        acc.add(x)
    if acc is None:
        raise ValueError("no calibration chunks")
    return acc.finish()


def _drop_dense(block: nn.Module, names: Iterable[str]) -> None:
    """Free the dequantized weights the 'dense' kernel keeps for these (quantized) linears; a later pass that needs
    one makes it again, with the same values."""
    for name in names:
        layer = block.get_submodule(name)
        if isinstance(layer, QuantizedLinear):
            layer.set_kernel("auto")
            layer.set_kernel("dense")


@torch.no_grad()
def quantize_block(block: nn.Module, xs: Sequence[Tensor], rope: Rope, mask: Tensor | None,
                   targets: Sequence[str], config: QuantConfig) -> tuple[list[Tensor], dict[str, float]]:
    """Quantize one decoder block in true-sequential order and return its outputs for the next block.

    Each stage's input is produced chunk by chunk from the block input (``xs``, moved to the block's device one chunk
    at a time) and the stages before it, already quantized; only o_proj's input and then the residual stream ``h``
    are kept between stages, on the device ``xs`` live on.

    Args:
        xs: the block's input hidden states, in chunks of [b, T, D].
        rope: (cos, sin) position embeddings for one chunk; mask: attention mask for one chunk (None = causal SDPA).
    Returns:
        (outputs in the same chunks, on the same device as ``xs``; GPTQ loss per linear).
    """
    device = _block_device(block)
    attn, mlp = block.self_attn, block.mlp
    losses: dict[str, float] = {}

    def solve(stage: int, inputs: Callable[[], Iterable[Tensor]], then_drop: Sequence[str] = ()) -> None:
        """Accumulate the stage's Hessian from ``inputs()``, free the dense weights ``then_drop``, solve.

        The Hessian is handed over to the solver, which factors it in its own memory (down_proj's is the block's
        largest buffer); a retry with more damping, which needs it again, recomputes it from ``inputs()``.
        """
        names = [n for n in STAGES[stage] if n in targets]
        if names:  # a stage without targets is not even run
            H = None
            if config.method == "gptq":
                H = handover(_hessian(inputs(), device), lambda: _hessian(inputs(), device))
            _drop_dense(block, then_drop)
            losses.update(quantize_linears(block, names, H, config))

    def norm2(h: Tensor) -> Tensor:
        return block.post_attention_layernorm(h.to(device))

    solve(0, lambda: (block.input_layernorm(x.to(device)) for x in xs))
    o_in = [_attention_input(attn, block.input_layernorm(x.to(device)), rope, mask).to(x.device) for x in xs]
    solve(1, lambda: (a.to(device) for a in o_in))
    hs = []
    for j, x in enumerate(xs):
        hs.append((x.to(device) + attn.o_proj(o_in[j].to(device))).to(x.device))
        o_in[j] = None  # type: ignore[call-overload]  # freed as the residual stream replaces it
    _drop_dense(block, STAGES[0] + STAGES[1])  # attention is done with
    solve(2, lambda: (norm2(h) for h in hs))
    # down_proj's Hessian [I, I] is the block's largest: gate/up's dense weights do not wait beside its solve (the
    # output pass below makes them again).
    solve(3, lambda: (_mlp_input(mlp, norm2(h)) for h in hs), then_drop=STAGES[2])
    outs = []
    for j, h in enumerate(hs):
        outs.append((h.to(device) + mlp.down_proj(_mlp_input(mlp, norm2(h)))).to(h.device))
        hs[j] = None  # type: ignore[call-overload]
    return outs, losses


@torch.no_grad()
def _block_forward(block: nn.Module, xs: Sequence[Tensor], rope: Rope, mask: Tensor | None,
                   hooks: dict[str, HessianAccumulator] | None = None) -> list[Tensor]:
    """Plain forward of a block over chunks (each moved to the block's device and back), optionally accumulating the
    inputs of some linears (one-pass GPTQ)."""
    device = _block_device(block)
    handles = []
    for name, acc in (hooks or {}).items():
        handles.append(block.get_submodule(name).register_forward_pre_hook(lambda m, args, acc=acc: acc.add(args[0])))
    try:
        out = []
        for x in xs:
            xd = x.to(device)
            y = block(xd, position_embeddings=_fit(rope, xd), attention_mask=_fit_mask(mask, xd))
            out.append((y[0] if isinstance(y, tuple) else y).to(x.device))
        return out
    finally:
        for h in handles:
            h.remove()


def release_caches(module: nn.Module) -> None:
    """Drop the dequantized weights kept while a block was being calibrated."""
    for m in module.modules():
        if isinstance(m, QuantizedLinear):
            m.set_kernel("auto")


def calib_dtype(config: QuantConfig, device: torch.device) -> torch.dtype:
    """The precision of calibration passes: config.calib_dtype, with 'auto' = bf16 where it runs natively."""
    from gptqlora.hardware import resolve_bf16

    if config.calib_dtype == "auto":
        return torch.bfloat16 if resolve_bf16(None, device) else torch.float32
    return getattr(torch, config.calib_dtype)


def _calib_context(config: QuantConfig, device: torch.device, model_dtype: torch.dtype):
    """Autocast to bf16 for the calibration passes of a float32 model when bf16 calibration is chosen.

    Without autocast's cast cache: it would keep a bf16 copy of every float weight the block's passes touch (weights
    require grad) until the block is done, half a block's weights more, for casts that cost little next to the matmul.
    """
    use = calib_dtype(config, device) == torch.bfloat16 and model_dtype != torch.bfloat16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use, cache_enabled=False)


def _fit(rope: Rope, x: Tensor) -> Rope:
    return rope[0][: x.shape[0]], rope[1][: x.shape[0]]


def _fit_mask(mask: Tensor | None, x: Tensor) -> Tensor | None:
    return None if mask is None else mask[: x.shape[0]]


def _causal_mask(model_config, x: Tensor) -> Tensor | None:
    """The mask the model itself would build for full, unpadded windows (None for SDPA's causal fast path)."""
    from transformers.masking_utils import create_causal_mask

    position_ids = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
    return create_causal_mask(config=model_config, inputs_embeds=x, attention_mask=None, cache=None,
                              position_ids=position_ids)


def calibration_inputs(embed: Callable[[Tensor], Tensor], rotary: nn.Module, model_config, ids: Tensor,
                       chunk_size: int, dtype: torch.dtype, device: torch.device | str
                       ) -> tuple[list[Tensor], Rope, Tensor | None]:
    """The first block's inputs, in chunks, and what every block's attention needs.

    Args:
        embed: token ids -> embeddings (the model's embedding, or a lookup in its weight).
        rotary: the model's rotary embedding module, on ``device``.
        ids: token ids [n_samples, seqlen] (full windows, no padding); the chunks live on its device.
    Returns:
        (chunks of [b, T, D] in ``dtype``, (cos, sin) for one chunk, the attention mask for one chunk); the last two
        on ``device``.
    """
    xs = [embed(c).to(dtype) for c in ids.split(chunk_size)]
    return (xs, *position_inputs(rotary, model_config, xs[0].to(device)))


def position_inputs(rotary: nn.Module, model_config, x: Tensor) -> tuple[Rope, Tensor | None]:
    """(cos, sin) and the attention mask for chunks shaped like x [b, T, D] (full windows), on x's device."""
    position_ids = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
    return rotary(x, position_ids), _causal_mask(model_config, x)


@torch.no_grad()
def quantize_blocks(n_blocks: int, load_block: Callable[[int], nn.Module], xs: list[Tensor] | None,
                    rope: Rope | None, mask: Tensor | None, config: QuantConfig, start: int = 0,
                    on_block: Callable[[int, nn.Module, dict[str, float], list[Tensor] | None], None] | None = None,
                    progress: bool = True) -> dict[str, float]:
    """The sequential loop: quantize blocks ``start``..``n_blocks - 1``, each fed the previous one's outputs.

    Args:
        load_block: the source, i -> block i with float weights on the device it is to be calibrated on.
        xs: block ``start``'s input in chunks [b, T, D] (see ``calibration_inputs``); None for RTN. The list is
            updated in place to each block's outputs, so the caller's reference never pins an earlier block's.
        on_block: the sink, called with (i, the quantized block, its GPTQ losses, block i+1's inputs or None) when
            block i is done; the driver keeps no reference to the block afterwards.
    Returns:
        GPTQ loss per full module name (``model.layers.3.self_attn.q_proj``) of the blocks quantized here.
    Raises:
        UsageError: a block whose forward is not the staged LLaMA computation (true-sequential GPTQ only).
    """
    targets = config.target_names
    losses: dict[str, float] = {}
    bar = tqdm(range(start, n_blocks), desc=f"{config.method} {config.bits}-bit", disable=not progress,
               unit="block", initial=start, total=n_blocks)
    for i in bar:
        begin = time.perf_counter()
        block = load_block(i)
        if config.method == "rtn":
            block_losses = quantize_linears_all(block, targets, config)
        else:
            device, dtype = _block_device(block), xs[0].dtype
            with _calib_context(config, device, dtype):
                if config.true_sequential:
                    check_staged_forward(block, xs[0], rope, mask, i)
                    outs, block_losses = quantize_block(block, xs, rope, mask, targets, config)
                else:
                    block_losses = _one_pass_block(block, xs, rope, mask, targets, config)
                    outs = _block_forward(block, xs, rope, mask)
            # In place, so that no caller keeps an earlier block's activations alive; the residual stream between
            # blocks stays in the model's dtype.
            xs[:] = [x.to(dtype) for x in outs]
            del outs
        release_caches(block)
        for name, loss in block_losses.items():
            log.info("block %d %s: GPTQ loss %.4f", i, name, loss)
        losses |= {f"model.layers.{i}.{k}": v for k, v in block_losses.items()}
        bar.set_postfix(loss=f"{sum(block_losses.values()):.3f}", secs=f"{time.perf_counter() - begin:.1f}")
        if on_block is not None:
            on_block(i, block, block_losses, xs)
        del block
        release_free_heap()  # glibc keeps a block's freed temporaries resident otherwise: the peak grew with depth
    return losses


@torch.no_grad()
def quantize_model_weights(model: nn.Module, calibration: Tensor | None, config: QuantConfig,
                           chunk_size: int = 8, progress: bool = True,
                           on_block: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """Quantize the target linears of every decoder block of a model held in memory, in place, block by block.

    Args:
        model: a LLaMA-family causal LM (float weights).
        calibration: token ids [n_samples, seqlen] (full windows, no padding); unused (may be None) for RTN.
        config: the quantization options; ``config.target_names`` says which block linears.
        chunk_size: calibration sequences per forward chunk (bounds activation memory).
        progress: show a progress bar over blocks.
        on_block: called with (block index, losses) after each block.
    Returns:
        GPTQ loss per full module name (``model.layers.3.self_attn.q_proj``), also logged.
    Raises:
        ValueError: for a model that is not LLaMA-shaped, or GPTQ without calibration data.
        UsageError: a block whose forward is not the staged LLaMA computation (true-sequential GPTQ only).
    """
    layers = decoder_layers(model)
    xs = rope = mask = None
    if config.method == "gptq":
        if calibration is None or calibration.ndim != 2:
            raise ValueError("GPTQ needs calibration token ids of shape [n_samples, seqlen]")
        param = next(model.parameters())
        inner = model.model
        xs, rope, mask = calibration_inputs(inner.embed_tokens, inner.rotary_emb, model.config,
                                            calibration.to(param.device), chunk_size, param.dtype, param.device)

    def sink(i: int, block: nn.Module, block_losses: dict[str, float], _: list[Tensor] | None) -> None:
        if on_block is not None:
            on_block(i, block_losses)

    return quantize_blocks(len(layers), layers.__getitem__, xs, rope, mask, config, on_block=sink,
                           progress=progress)


def _one_pass_block(block: nn.Module, xs: Sequence[Tensor], rope: Rope, mask: Tensor | None,
                    targets: Sequence[str], config: QuantConfig) -> dict[str, float]:
    """Without true-sequential: every linear's Hessian comes from one pass of the block with float weights."""
    device = _block_device(block)
    accs: dict[str, HessianAccumulator] = {}
    for stage in STAGES:
        names = [n for n in stage if n in targets]
        if names:  # linears of one stage see the same input: hook the first, share its Hessian
            accs[names[0]] = HessianAccumulator(block.get_submodule(names[0]).in_features, device)
    _block_forward(block, xs, rope, mask, hooks=accs)
    losses: dict[str, float] = {}
    for stage in STAGES:
        names = [n for n in stage if n in targets]
        if names:
            losses |= quantize_linears(block, names, accs.pop(names[0]).finish(), config)
    return losses


def quantize_linears_all(block: nn.Module, targets: Sequence[str], config: QuantConfig) -> dict[str, float]:
    """Round-to-nearest for every target of a block (no calibration, no Hessian)."""
    losses: dict[str, float] = {}
    for stage in STAGES:
        names = [n for n in stage if n in targets]
        if names:
            losses |= quantize_linears(block, names, None, config)
    return losses
