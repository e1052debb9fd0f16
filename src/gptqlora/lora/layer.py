"""LoRA by composition: one ``LoRALinear`` wraps a float ``nn.Linear`` or a ``QuantizedLinear`` alike.

The wrapped layer computes ``base(x) + scale * B(A(dropout(x)))`` with ``A`` [r, in] initialised
kaiming-uniform (a = sqrt(5)) and ``B`` [out, r] initialised to zero, so a fresh adapter changes nothing.
``scale`` is ``alpha / r``, or ``alpha / sqrt(r)`` with rank-stabilised LoRA. Layers that read one input tensor
(q, k and v of an attention block; gate and up of an MLP) share one dropout mask of it and one matmul by their
stacked A (``SharedInput``). The helpers below inject the wrappers into a model, select the trainable parameters,
export the PEFT-format state dict and merge.
"""

from __future__ import annotations

import math
import re
import weakref
from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptqlora.distributed import full_tensor
from gptqlora.errors import UsageError
from gptqlora.targets import parse_targets

# PEFT stores adapter tensors under the Hugging Face module name with this prefix (PeftModel -> LoraModel -> model).
PEFT_PREFIX = "base_model.model."
# A module name inside a decoder block, e.g. "model.layers.3.mlp.up_proj".
_BLOCK_RE = re.compile(r"(?:.*\.)?layers\.(\d+)\..+")
# Sibling linears that Hugging Face decoder blocks call on the very same tensor: their LoRA shares one dropout
# mask and one A matmul (``SharedInput``). The tensor is checked at run time, so a model that feeds them apart
# (cross-attention) still gets each layer's own input.
SHARED_INPUT_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


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
        dropout: dropout probability on the LoRA input only (the base sees the undropped ``x``); layers that read
            one tensor share one mask of it (``SharedInput``, set up by ``inject_lora_layers``).
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
        # precision, and the forward casts them to the compute dtype.
        device = next(iter([*base.parameters(), *base.buffers()]), torch.empty(0)).device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)  # [r, in]
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)  # [out, r]
        self.shared = SharedInput([self])  # a plain attribute, not a submodule: the state dict is A and B alone
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A kaiming-uniform (a = sqrt(5)), B zero: the wrapped layer starts equal to its base."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        """``base(x) + scale * B(A(dropout(x)))``; x [..., in] -> [..., out]."""
        out = self.base(x)  # [..., out]
        h, gain = self.shared.down(self, x)  # A(keep * x) [..., r]; gain 1 / (1 - p) if dropped, else 1
        # One addmm adds scale * gain * h @ B^T to the base output: no pass of its own for the scale or the sum.
        y = torch.addmm(out.reshape(-1, self.out_features), h.reshape(-1, self.r).to(out.dtype),
                        self.lora_B.weight.to(out.dtype).t(), alpha=self.scale * gain)  # [M, out]
        return y.view(out.shape)

    def delta_weight(self) -> Tensor:
        """The update the adapter adds to the base weight, ``B @ A * scale`` in fp32: [out, in]."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, dropout={self.dropout_p}"


class SharedInput:
    """``A(dropout(x))`` of LoRA layers that read the same tensor ``x``: one dropout mask, one matmul.

    The first member called with ``x`` draws the mask, casts ``x`` to the compute dtype (autocast's, else x's) and
    multiplies by the members' A stacked [sum r, in]; each member then takes its slice [..., r]. The result is
    kept only until every member has taken its slice, so nothing outlives the members' calls in one forward, and
    under gradient checkpointing the recompute draws the same mask again (torch's checkpoint restores the RNG
    state). A member called with another tensor, or a second time, starts a new round. A layer alone is a group
    of one and keeps nothing.

    Dropout zeroes each input element with probability p; inverted dropout's 1 / (1 - p) is returned as ``gain``
    for the member to fold into its scale (the same by linearity, and no pass over ``x``).

    Args:
        members: LoRALinear layers with equal ``in_features``, ``dropout_p`` and device.
    """

    def __init__(self, members: Sequence[LoRALinear]) -> None:
        self.members = list(members)
        self.p = self.members[0].dropout_p
        self._x: weakref.ref | None = None  # the input of the round in progress (a weak reference: never kept alive)
        self._training = False  # the mode the round was computed in
        self._h: tuple[Tensor, ...] = ()  # each member's A(dropout(x)) [..., r], views of one [..., sum r]
        self._waiting: set[int] = set()  # members that have not taken their slice yet

    def down(self, member: LoRALinear, x: Tensor) -> tuple[Tensor, float]:
        """``member``'s ``A(keep * x)`` [..., r] and the dropout gain (1 / (1 - p) if dropped, else 1)."""
        i = next((j for j, m in enumerate(self.members) if m is member), None)
        if i is None:  # a shallow copy of the layer (nn.DataParallel's replicas) still points at the original group
            raise RuntimeError("this LoRA layer is not a member of its SharedInput (a shallow copy?): call "
                               "gptqlora.lora.layer.share_inputs(model) on the model that holds it")
        same_round = (i in self._waiting and self._training == member.training and self._x is not None
                      and self._x() is x)
        if not same_round:
            self._h, self._training = self._project(x, member.training), member.training
            self._x, self._waiting = weakref.ref(x), set(range(len(self.members)))
        h = self._h[i]
        self._waiting.discard(i)
        if not self._waiting:  # every member has its slice: forget the round
            self._x, self._h = None, ()
        dropped = self._training and self.p > 0
        return h, 1 / (1 - self.p) if dropped else 1.0

    def _project(self, x: Tensor, training: bool) -> tuple[Tensor, ...]:
        """Every member's ``A(keep * x)`` [..., r], views of one [..., sum r]."""
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x = x.to(dtype)  # [..., in]; cast once for every member (autocast would cast it again per matmul)
        if training and self.p > 0:
            drop = torch.empty_like(x, dtype=torch.bool).bernoulli_(self.p)  # [..., in]; a serial kernel on the CPU
            x = torch.where(drop, 0, x)  # one pass forward and one backward (masked_fill takes two: clone, fill)
        weights = [m.lora_A.weight for m in self.members]
        A = torch.cat(weights) if len(weights) > 1 else weights[0]  # [sum r, in]
        h = F.linear(x, A.to(dtype))  # [..., sum r]
        return h.split([m.r for m in self.members], dim=-1) if len(weights) > 1 else (h,)

    def __getstate__(self) -> dict:  # pickling (torch.save of a whole model) drops a round in progress
        return {**self.__dict__, "_x": None, "_h": (), "_waiting": set()}


def share_inputs(model: nn.Module) -> None:
    """Group the model's LoRA layers that read one tensor (``SHARED_INPUT_NAMES`` under one parent) by a common
    ``SharedInput``; every other LoRA layer gets one of its own. Layers whose ``in_features``, dropout or device
    differ are left apart."""
    siblings: dict[str, dict[str, LoRALinear]] = defaultdict(dict)
    for name, m in lora_modules(model).items():
        m.shared = SharedInput([m])
        parent, _, child = name.rpartition(".")
        siblings[parent][child] = m
    for children in siblings.values():
        for names in SHARED_INPUT_NAMES:
            group = [children[n] for n in names if n in children]
            if len(group) > 1 and len({(m.in_features, m.dropout_p, m.lora_A.weight.device) for m in group}) == 1:
                shared = SharedInput(group)
                for m in group:
                    m.shared = shared


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

    Tensors are detached, contiguous fp32 copies on the CPU, ready for safetensors. The parameters of an FSDP-sharded
    model are gathered whole, which is a collective: every rank of the job must call it.
    """
    return {PEFT_PREFIX + name: full_tensor(p.detach()).to("cpu", torch.float32).contiguous().clone()
            for name, p in get_adapter_params(model).items()}


def _describe_linears(names: Sequence[str]) -> str:
    """Layer 0's linear names (standing for every block) plus those outside the blocks, and the total count."""
    shown = [n for n in names if (m := _BLOCK_RE.fullmatch(n)) is None or m.group(1) == "0"]
    n_blocks = len({m.group(1) for n in names if (m := _BLOCK_RE.fullmatch(n))})
    more = f" (names in layer 0 repeat in all {n_blocks} layers)" if n_blocks > 1 else ""
    return f"{len(names)} linear layers{more}: {', '.join(shown) or 'none'}"


def _select_targets(names: Sequence[str], targets: str | Sequence[str], where: str) -> list[str]:
    """The names among ``names`` (full module names) that ``targets`` selects; see ``inject_lora_layers``.

    The spec is read by ``gptqlora.targets.parse_targets``, the grammar quantization targets use too; it refuses a
    regex whose matching could hang before the regex meets any name.
    """
    parsed = parse_targets(targets, where)
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


def find_targets(model: nn.Module, targets: str | Sequence[str], where: str = "--lora-targets") -> list[str]:
    """Full names of the linears of ``model`` that ``targets`` selects (see ``inject_lora_layers``).

    Args:
        model: the model whose linears are searched.
        targets: the spec, as ``inject_lora_layers`` takes it.
        where: where the spec came from (an option, an adapter's config file), named in errors.
    Raises:
        UsageError: if nothing is selected, or an explicitly named target matches nothing (the message lists the
            model's linear layers); a regex that is invalid or could take too long to match
            (``gptqlora.targets.check_target_regex``).
    """
    names = linear_layer_names(model)
    chosen = _select_targets(names, targets, where)
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
    share_inputs(model)
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
