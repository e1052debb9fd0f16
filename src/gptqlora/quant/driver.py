"""The layer-by-layer driver: quantize a LLaMA-family model's decoder blocks in place.

Sequential: block i is calibrated on the outputs of blocks < i already quantized, and only one block's activations
are held at a time. Inside a block, true-sequential order runs the block once, stage by stage:

    x ─ norm1 ─> [q, k, v] ─ attention ─> o ─(+x)─> h ─ norm2 ─> [gate, up] ─ act(gate)*up ─> down ─(+h)─> out

each stage's Hessian is collected from the outputs of the stages before it, already quantized, so every linear is
evaluated once (not once per stage, as a hook-and-rerun driver does). Linears that share an input (q/k/v, gate/up)
share a Hessian and are solved in one call with their rows stacked, which is exactly equivalent and 2-3x cheaper.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from gptqlora.config import QuantConfig
from gptqlora.quant.gptq import HessianAccumulator, gptq_solve
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


def _get(block: nn.Module, name: str) -> nn.Module:
    return block.get_submodule(name)


def _set(block: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent), child, module)


def quantize_linears(block: nn.Module, names: Sequence[str], H: Tensor | None, config: QuantConfig
                     ) -> dict[str, float]:
    """Quantize linears of ``block`` that share one input (and so one Hessian) and swap in QuantizedLinear layers.

    Args:
        names: block-relative names, e.g. ("self_attn.k_proj", "self_attn.v_proj").
        H: their Hessian [K, K]; None for round-to-nearest.
    Returns:
        GPTQ loss per name (the stacked solve's loss is split in proportion to rows).
    """
    linears = [_get(block, n) for n in names]
    W = torch.cat([lin.weight.detach() for lin in linears], dim=0)  # [sum N, K]
    if config.method == "rtn" or H is None:
        result = rtn_quantize(W, config.bits, config.group_size, config.sym)
    else:
        result = gptq_solve(W, H.to(W.device), bits=config.bits, group_size=config.group_size, sym=config.sym,
                            act_order=config.act_order, static_groups=config.static_groups,
                            damp_percent=config.damp_percent, block_size=config.block_size)
    losses, start = {}, 0
    for name, lin in zip(names, linears):
        rows = slice(start, start + lin.out_features)
        part = QuantResult(result.codes[rows], result.scales[:, rows], result.zeros[:, rows], result.g_idx)
        q = QuantizedLinear.from_result(part, config.bits, config.group_size, bias=lin.bias).to(lin.weight.device)
        q.set_cache(True)  # the block's remaining calibration passes reuse it; released when the block is done
        _set(block, name, q)
        losses[name] = result.loss * lin.out_features / W.shape[0]
        start += lin.out_features
    return losses


class _CaptureInput(nn.Module):
    """Stands in for o_proj while attention runs: records the input, returns zeros of the right width."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x)
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _hessian(chunks: Sequence[Tensor], device: torch.device, product_dtype: torch.dtype) -> Tensor:
    acc = HessianAccumulator(chunks[0].shape[-1], device, product_dtype)
    for c in chunks:
        acc.add(c)
    return acc.hessian()


def _quantize_stage(block: nn.Module, stage: Sequence[str], targets: Sequence[str], inputs: Sequence[Tensor],
                    config: QuantConfig) -> dict[str, float]:
    names = [n for n in stage if n in targets]
    if not names:
        return {}
    H = _hessian(inputs, inputs[0].device, calib_dtype(config, inputs[0].device)) if config.method == "gptq" else None
    return quantize_linears(block, names, H, config)


@torch.no_grad()
def quantize_block(block: nn.Module, xs: Sequence[Tensor], rope: tuple[Tensor, Tensor], mask: Tensor | None,
                   targets: Sequence[str], config: QuantConfig) -> tuple[list[Tensor], dict[str, float]]:
    """Quantize one decoder block in true-sequential order and return its outputs for the next block.

    Args:
        xs: the block's input hidden states, in chunks of [b, T, D].
        rope: (cos, sin) position embeddings for one chunk; mask: attention mask for one chunk (None = causal SDPA).
    Returns:
        (outputs in the same chunks, GPTQ loss per linear).
    """
    losses: dict[str, float] = {}
    attn, mlp = block.self_attn, block.mlp
    n1 = [block.input_layernorm(x) for x in xs]
    losses |= _quantize_stage(block, STAGES[0], targets, n1, config)

    capture = _CaptureInput(attn.o_proj.out_features)
    o_proj, attn.o_proj = attn.o_proj, capture
    try:
        for n in n1:
            attn(hidden_states=n, position_embeddings=_fit(rope, n), attention_mask=_fit_mask(mask, n))
    finally:
        attn.o_proj = o_proj
    del n1
    o_in = capture.inputs
    losses |= _quantize_stage(block, STAGES[1], targets, o_in, config)
    hs = [x + attn.o_proj(a) for x, a in zip(xs, o_in)]
    del o_in

    n2 = [block.post_attention_layernorm(h) for h in hs]
    losses |= _quantize_stage(block, STAGES[2], targets, n2, config)
    acts = [mlp.act_fn(mlp.gate_proj(n)) * mlp.up_proj(n) for n in n2]
    del n2
    losses |= _quantize_stage(block, STAGES[3], targets, acts, config)
    outs = [h + mlp.down_proj(a) for h, a in zip(hs, acts)]
    return outs, losses


@torch.no_grad()
def _block_forward(block: nn.Module, xs: Sequence[Tensor], rope: tuple[Tensor, Tensor], mask: Tensor | None,
                   hooks: dict[str, HessianAccumulator] | None = None) -> list[Tensor]:
    """Plain forward of a block over chunks, optionally accumulating the inputs of some linears (one-pass GPTQ)."""
    handles = []
    for name, acc in (hooks or {}).items():
        handles.append(_get(block, name).register_forward_pre_hook(lambda m, args, acc=acc: acc.add(args[0])))
    try:
        out = []
        for x in xs:
            y = block(x, position_embeddings=_fit(rope, x), attention_mask=_fit_mask(mask, x))
            out.append(y[0] if isinstance(y, tuple) else y)
        return out
    finally:
        for h in handles:
            h.remove()


def release_caches(module: nn.Module) -> None:
    """Drop the dequantized weights kept while a block was being calibrated."""
    for m in module.modules():
        if isinstance(m, QuantizedLinear):
            m.set_cache(False)


def calib_dtype(config: QuantConfig, device: torch.device) -> torch.dtype:
    """The precision of calibration passes: config.calib_dtype, with 'auto' = bf16 where it runs natively."""
    from gptqlora.hardware import resolve_bf16

    if config.calib_dtype == "auto":
        return torch.bfloat16 if resolve_bf16(None, device) else torch.float32
    return getattr(torch, config.calib_dtype)


def _calib_context(config: QuantConfig, device: torch.device, model_dtype: torch.dtype):
    """Autocast to bf16 for the calibration passes of a float32 model when bf16 calibration is chosen."""
    use = calib_dtype(config, device) == torch.bfloat16 and model_dtype != torch.bfloat16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def _fit(rope: tuple[Tensor, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    return rope[0][: x.shape[0]], rope[1][: x.shape[0]]


def _fit_mask(mask: Tensor | None, x: Tensor) -> Tensor | None:
    return None if mask is None else mask[: x.shape[0]]


def _causal_mask(model: nn.Module, x: Tensor) -> Tensor | None:
    """The mask the model itself would build for full, unpadded windows (None for SDPA's causal fast path)."""
    from transformers.masking_utils import create_causal_mask

    position_ids = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
    return create_causal_mask(config=model.config, inputs_embeds=x, attention_mask=None, cache=None,
                              position_ids=position_ids)


@torch.no_grad()
def quantize_model_weights(model: nn.Module, calibration: Tensor | None, config: QuantConfig,
                           chunk_size: int = 8, progress: bool = True,
                           on_block: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """Quantize the target linears of every decoder block, in place, block by block.

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
    """
    layers = decoder_layers(model)
    targets = config.target_names
    losses: dict[str, float] = {}
    bar = tqdm(range(len(layers)), desc=f"{config.method} {config.bits}-bit", disable=not progress, unit="block")
    if config.method == "rtn":
        for i in bar:
            block_losses = quantize_linears_all(layers[i], targets, config)
            release_caches(layers[i])
            losses |= {f"model.layers.{i}.{k}": v for k, v in block_losses.items()}
        return losses
    if calibration is None or calibration.ndim != 2:
        raise ValueError("GPTQ needs calibration token ids of shape [n_samples, seqlen]")

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ids = calibration.to(device)
    inner = model.model
    xs = [inner.embed_tokens(c).to(dtype) for c in ids.split(chunk_size)]  # chunks of [b, T, D]
    position_ids = torch.arange(ids.shape[1], device=device)[None].expand(xs[0].shape[0], -1)
    rope = inner.rotary_emb(xs[0], position_ids)
    mask = _causal_mask(model, xs[0])
    for i in bar:
        start = time.perf_counter()
        block = layers[i]
        with _calib_context(config, device, dtype):
            if config.true_sequential:
                xs, block_losses = quantize_block(block, xs, rope, mask, targets, config)
            else:
                block_losses = _one_pass_block(block, xs, rope, mask, targets, config)
                xs = _block_forward(block, xs, rope, mask)
        xs = [x.to(dtype) for x in xs]  # the residual stream between blocks stays in the model's dtype
        release_caches(block)
        for name, loss in block_losses.items():
            log.info("block %d %s: GPTQ loss %.4f", i, name, loss)
        losses |= {f"model.layers.{i}.{k}": v for k, v in block_losses.items()}
        bar.set_postfix(loss=f"{sum(block_losses.values()):.3f}", secs=f"{time.perf_counter() - start:.1f}")
        if on_block is not None:
            on_block(i, block_losses)
    return losses


def _one_pass_block(block: nn.Module, xs: Sequence[Tensor], rope: tuple[Tensor, Tensor], mask: Tensor | None,
                    targets: Sequence[str], config: QuantConfig) -> dict[str, float]:
    """Without true-sequential: every linear's Hessian comes from one pass of the block with float weights."""
    accs: dict[str, HessianAccumulator] = {}
    for stage in STAGES:
        names = [n for n in stage if n in targets]
        if names:  # linears of one stage see the same input: hook the first, share its Hessian
            accs[names[0]] = HessianAccumulator(_get(block, names[0]).in_features, xs[0].device,
                                                calib_dtype(config, xs[0].device))
    _block_forward(block, xs, rope, mask, hooks=accs)
    losses: dict[str, float] = {}
    for stage in STAGES:
        names = [n for n in stage if n in targets]
        if names:
            losses |= quantize_linears(block, names, accs[names[0]].hessian(), config)
    return losses


def quantize_linears_all(block: nn.Module, targets: Sequence[str], config: QuantConfig) -> dict[str, float]:
    """Round-to-nearest for every target of a block (no calibration, no Hessian)."""
    losses: dict[str, float] = {}
    for stage in STAGES:
        names = [n for n in stage if n in targets]
        if names:
            losses |= quantize_linears(block, names, None, config)
    return losses
