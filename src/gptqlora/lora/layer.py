"""LoRA by composition: one ``LoRALinear`` wraps a float ``nn.Linear`` or a ``QuantizedLinear`` alike.

The wrapped layer computes ``base(x) + B(A(dropout(x))) * scale`` with ``A`` [r, in] initialised
kaiming-uniform (a = sqrt(5)) and ``B`` [out, r] initialised to zero, so a fresh adapter changes nothing.
``scale`` is ``alpha / r``, or ``alpha / sqrt(r)`` with rank-stabilised LoRA. The helpers below inject the
wrappers into a model, select the trainable parameters, export the PEFT-format state dict and merge.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gptqlora.config import parse_targets
from gptqlora.errors import UsageError

# PEFT stores adapter tensors under the Hugging Face module name with this prefix (PeftModel -> LoraModel -> model).
PEFT_PREFIX = "base_model.model."
# A module name inside a decoder block, e.g. "model.layers.3.mlp.up_proj".
_BLOCK_RE = re.compile(r"(?:.*\.)?layers\.(\d+)\..+")


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` can carry LoRA: a float ``nn.Linear`` or a quantized linear.

    A quantized linear is recognised by duck typing (``in_features``, ``out_features`` and a
    ``dequantize_weight`` method), so this module need not import the quantization package.
    """
    if isinstance(module, nn.Linear):
        return True
    return (hasattr(module, "in_features") and hasattr(module, "out_features")
            and callable(getattr(module, "dequantize_weight", None)))


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    Args:
        base: the layer to adapt (``nn.Linear`` or a quantized linear); frozen in place.
        r: rank of the update.
        alpha: scaling numerator; the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` if ``use_rslora``).
        dropout: dropout probability on the LoRA input only (the base sees the undropped ``x``).
        use_rslora: rank-stabilised scaling.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if not is_linear(base):
            raise TypeError(f"LoRALinear needs an nn.Linear or a quantized linear, got {type(base).__name__}")
        if isinstance(base, LoRALinear):
            raise TypeError("this layer already has LoRA; wrapping it twice would stack two adapters")
        if r <= 0:
            raise ValueError(f"LoRA rank r={r} must be positive")
        if not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout={dropout} must be in [0, 1)")
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.r, self.alpha, self.dropout_p, self.use_rslora = r, float(alpha), float(dropout), use_rslora
        self.scale = self.alpha / (math.sqrt(r) if use_rslora else r)
        for p in base.parameters():
            p.requires_grad_(False)

        # LoRA parameters live on the base's device but always in fp32: the optimizer updates them in full
        # precision, and the forward casts them to the activation dtype.
        device = next(iter([*base.parameters(), *base.buffers()]), torch.empty(0)).device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)  # [r, in]
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)  # [out, r]
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A kaiming-uniform (a = sqrt(5)), B zero: the wrapped layer starts equal to its base."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + B(A(dropout(x))) * scale``; x [..., in] -> [..., out]."""
        out = self.base(x)
        A, B = self.lora_A.weight, self.lora_B.weight
        if not torch.is_autocast_enabled(x.device.type):
            # Without autocast, run the branch in the activation dtype (e.g. bf16) rather than upcasting x:
            # the casts are differentiable, so gradients still reach the fp32 parameters.
            A, B = A.to(x.dtype), B.to(x.dtype)
        lora = F.linear(F.linear(self.lora_dropout(x), A), B)  # [..., r] -> [..., out]
        return out + (lora * self.scale).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update the adapter adds to the base weight, ``B @ A * scale`` in fp32: [out, in]."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, dropout={self.dropout_p}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every ``LoRALinear`` in ``model``, keyed by its module name (e.g. ``model.layers.0.self_attn.q_proj``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def get_adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA parameters only, keyed by parameter path (``...q_proj.lora_A.weight``)."""
    params = {}
    for name, m in lora_modules(model).items():
        params[f"{name}.lora_A.weight"] = m.lora_A.weight
        params[f"{name}.lora_B.weight"] = m.lora_B.weight
    return params


def set_trainable_params(model: nn.Module, names: Iterable[str]) -> None:
    """Make exactly the parameters named in ``names`` trainable and freeze every other one.

    Raises:
        KeyError: for a name that is not a parameter of ``model`` (a typo would otherwise train nothing).
    """
    wanted = set(names)
    params = dict(model.named_parameters())
    unknown = wanted - params.keys()
    if unknown:
        raise KeyError(f"not parameters of the model: {sorted(unknown)[:5]}")
    for name, p in params.items():
        p.requires_grad_(name in wanted)


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze everything but the LoRA parameters."""
    set_trainable_params(model, get_adapter_params(model).keys())


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter as PEFT stores it: ``base_model.model.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r].

    Tensors are detached, contiguous fp32 copies on the CPU, ready for safetensors.
    """
    return {PEFT_PREFIX + name: p.detach().to("cpu", torch.float32).contiguous().clone()
            for name, p in get_adapter_params(model).items()}


def _describe_linears(names: Sequence[str]) -> str:
    """Layer 0's linear names (standing for every block) plus those outside the blocks, and the total count."""
    shown = [n for n in names if (m := _BLOCK_RE.fullmatch(n)) is None or m.group(1) == "0"]
    n_blocks = len({m.group(1) for n in names if (m := _BLOCK_RE.fullmatch(n))})
    more = f" (names in layer 0 repeat in all {n_blocks} layers)" if n_blocks > 1 else ""
    return f"{len(names)} linear layers{more}: {', '.join(shown) or 'none'}"


def _select_targets(names: Sequence[str], targets: str | Sequence[str]) -> list[str]:
    """The names among ``names`` (full module names) that ``targets`` selects; see ``inject_lora_layers``.

    The spec is read by ``gptqlora.config.parse_targets``, the grammar quantization targets use too.
    """
    parsed = parse_targets(targets)
    if isinstance(parsed, re.Pattern):
        return [n for n in names if parsed.fullmatch(n)]
    if targets == "all":  # every linear inside a decoder block (whatever the architecture names it), never lm_head
        return [n for n in names if _BLOCK_RE.fullmatch(n)]
    # An explicit name that matches nothing is almost always a typo: report it rather than adapt less than asked.
    unmatched = [s for s in parsed if not any(n == s or n.endswith("." + s) for n in names)]
    if unmatched and len(unmatched) < len(parsed):
        raise UsageError(f"LoRA targets {unmatched} match no linear layer; the model has {_describe_linears(names)}")
    return [n for n in names if any(n == s or n.endswith("." + s) for s in parsed)]


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the modules that can carry LoRA, plus those already wrapped (but not the linears inside a wrapper)."""
    wrapped = lora_modules(model)
    return [n for n, m in model.named_modules()
            if (is_linear(m) or n in wrapped) and not any(n.startswith(w + ".") for w in wrapped)]


def find_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Full names of the linears of ``model`` that ``targets`` selects (see ``inject_lora_layers``).

    Raises:
        ValueError: if nothing is selected, or an explicitly named target matches nothing; the message lists
            the model's linear layers.
    """
    names = linear_layer_names(model)
    chosen = _select_targets(names, targets)
    if not chosen:
        raise UsageError(f"LoRA targets {targets!r} match no linear layer; the model has {_describe_linears(names)}")
    return chosen


def inject_lora_layers(model: nn.Module, targets: str | Sequence[str] = "attn", r: int = 16, alpha: float = 32.0,
                       dropout: float = 0.05, use_rslora: bool = False) -> list[nn.Parameter]:
    """Wrap the target linears of ``model`` in ``LoRALinear``, in place, and make only LoRA trainable.

    Args:
        model: a Hugging Face causal LM (or any module tree).
        targets: ``"attn"`` (q/k/v/o), ``"mlp"``, ``"all"`` (every linear inside a decoder block, never lm_head),
            a comma string or list of names matched as suffixes of full module names (``"q_proj,v_proj"``,
            ``"self_attn.q_proj"``), or ``"re:<regex>"`` matched with ``re.fullmatch`` against full module names.
        r, alpha, dropout, use_rslora: see ``LoRALinear``.
    Returns:
        The trainable LoRA parameters (A then B of each adapted layer, in module order).
    Raises:
        ValueError: if the targets select no linear layer, a named target matches nothing, or a target is
            already a ``LoRALinear``.
    """
    chosen = find_targets(model, targets)
    again = [n for n in chosen if isinstance(model.get_submodule(n), LoRALinear)]
    if again:
        raise ValueError(f"{again[0]} (and {len(again) - 1} more) already have LoRA: load or merge the existing "
                         "adapter instead of injecting a second one")
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout, use_rslora))
    mark_only_lora_trainable(model)
    return list(get_adapter_params(model).values())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its float base (``W += B @ A * scale``, summed in fp32) and unwrap it, in place.

    Returns:
        ``model``, now free of ``LoRALinear``.
    Raises:
        ValueError: if any adapted layer is quantized; nothing is changed then. Merging into a quantized base
            needs re-quantization: use ``gptqlora merge``.
    """
    modules = lora_modules(model)
    quantized = [n for n, m in modules.items() if not isinstance(m.base, nn.Linear)]
    if quantized:
        raise ValueError(f"cannot merge LoRA into quantized layers ({quantized[0]} and {len(quantized) - 1} more) in "
                         "place: use `gptqlora merge`, which dequantizes, merges and re-quantizes")
    with torch.no_grad():
        for name, m in modules.items():
            W = m.base.weight  # [out, in]
            W.copy_((W.float() + m.delta_weight().to(W.device)).to(W.dtype))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, m.base)
    return model
