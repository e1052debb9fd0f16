"""Quantized models as Hugging Face directories in the GPTQ v1 format: save, load, and quantize straight to one.

A directory holds ``config.json`` (with ``quantization_config``), ``quantize_config.json`` (the same block), the
weights (``model.safetensors``, or Hugging Face shards ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json`` once they exceed ``max_shard_size``) and the tokenizer files. Quantized linears store
qweight/qzeros/scales/g_idx (+bias); everything else keeps its plain tensors in the model's dtype. Nothing is ever
unpickled.

Two ways to make one, with the same bytes on the same inputs: ``save_quantized`` writes a model quantized in memory;
``gptqlora.quant.streamed.quantize_streamed`` quantizes a float checkpoint block by block, never holding more than
one decoder block's float weights, and can resume after a crash. ``load_quantized`` builds the model on the meta
device and assigns the tensors it reads, so no float copy of the weights is ever made.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from gptqlora.config import DTYPES, QuantConfig
from gptqlora.errors import InputNotFoundError, UsageError
from gptqlora.files import read_json_object, staged_dir
from gptqlora.quant.driver import STAGES, decoder_layers
from gptqlora.quant.linear import QuantizedLinear
from gptqlora.quant.stream import DEFAULT_MAX_SHARD_SIZE, SafetensorsSource, write_tensors
from gptqlora.quant.weights import INDEX_FILE, SINGLE_FILE, check_directory_files, weight_files
from gptqlora.targets import ALL_TARGETS, ATTN_TARGETS

QUANT_BUFFERS = ("qweight", "qzeros", "scales", "g_idx", "bias")
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


def gptq_config_dict(config: QuantConfig) -> dict:
    """The ``quantization_config`` block transformers/GPTQModel/vLLM read (format "gptq", v1)."""
    targets = config.target_names
    block = {
        "quant_method": "gptq",
        "bits": config.bits,
        "group_size": config.group_size,
        # desc_act tells loaders that g_idx is a permutation: not with static groups, whose g_idx stays k // g so
        # that every kernel's fast path applies. The solver's column order itself is "act_order" (ours; loaders
        # ignore keys they do not know).
        "desc_act": config.act_order and not config.static_groups,
        "act_order": config.act_order,
        "act_group_aware": config.group_aware,  # gptqmodel's name for group-aware reordering
        "sym": config.sym,
        "true_sequential": config.true_sequential,
        "damp_percent": config.damp_percent,
        "static_groups": config.static_groups,
        "format": "gptq",
        "checkpoint_format": "gptq",
        "lm_head": False,
    }
    if tuple(targets) != ALL_TARGETS:
        # Partly quantized: list the quantized modules stage by stage, and give GPTQModel a negative rule for the rest.
        block["modules_in_block_to_quantize"] = [[n for n in stage if n in targets] for stage in STAGES
                                                 if any(n in targets for n in stage)]
        if tuple(targets) == ATTN_TARGETS:
            block["dynamic"] = {"-:.*\\.mlp\\..*": {}}
        else:
            skipped = [n.replace(".", "\\.") for n in ALL_TARGETS if n not in targets]
            block["dynamic"] = {"-:.*\\.(" + "|".join(skipped) + ")$": {}}
    return block


def quant_config_from_dict(block: dict, where: str = "quantization_config") -> QuantConfig:
    """Rebuild our QuantConfig from a ``quantization_config`` block (ours or another tool's v1 gptq).

    Raises:
        UsageError: a block that is not GPTQ v1, lacks ``bits`` or ``group_size``, or holds unsupported values;
            the message names ``where`` the block came from.
    """
    if not isinstance(block, dict):
        raise UsageError(f"{where} must be a JSON object, not {type(block).__name__}")
    if block.get("quant_method") != "gptq":
        raise UsageError(f"{where}: quant_method {block.get('quant_method')!r} is not 'gptq': this loader reads GPTQ "
                         "checkpoints")
    fmt = block.get("checkpoint_format", block.get("format", "gptq"))
    if fmt != "gptq":
        raise UsageError(f"{where}: checkpoint_format {fmt!r} is not supported: only GPTQ v1 ('gptq') is read")
    missing = [k for k in ("bits", "group_size") if not isinstance(block.get(k), int) or isinstance(block[k], bool)]
    if missing:
        raise UsageError(f"{where}: {' and '.join(missing)} missing or not an integer; a GPTQ config needs both")
    if "modules_in_block_to_quantize" in block:
        targets = ",".join(n for stage in block["modules_in_block_to_quantize"] for n in stage)
    else:
        targets = "all"
    act_order = bool(block.get("act_order", block.get("desc_act", False)))
    try:
        return QuantConfig(bits=block["bits"], group_size=block["group_size"], sym=bool(block.get("sym", True)),
                           act_order=act_order, group_aware=bool(block.get("act_group_aware", False)) and not act_order,
                           static_groups=bool(block.get("static_groups", False)),
                           damp_percent=float(block.get("damp_percent", 0.01)),
                           true_sequential=bool(block.get("true_sequential", True)), targets=targets)
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None


# Fields of the quantization block that shape the weights: quantize_config.json and config.json must agree on them.
_AGREEING_FIELDS = ("quant_method", "bits", "group_size", "desc_act", "sym", "static_groups",
                    "modules_in_block_to_quantize", "checkpoint_format")




def check_architecture(config: dict, where: str | os.PathLike) -> None:
    """Refuse a config.json whose model transformers cannot build from its own code, before anything is loaded.

    Such a config names code in the model's repository (``auto_map``), which transformers would run only with
    ``trust_remote_code``: gptqlora never runs a model's own code, and quantizes the LLaMA-family architectures
    transformers ships.

    Raises:
        UsageError: ``model_type`` missing, or one this transformers does not know (with ``auto_map`` or without),
            naming ``where``.
    """
    from transformers import CONFIG_MAPPING, __version__

    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return
    supported = "only LLaMA-family architectures that transformers ships (model_type 'llama', ...) are supported"
    if "auto_map" in config:
        raise UsageError(f"{where}: model_type {model_type!r} needs code from the model's repository (auto_map), "
                         f"which gptqlora never runs; {supported}")
    if model_type is None:
        raise UsageError(f"{where} has no model_type: it does not describe a transformers model; {supported}")
    raise UsageError(f"{where}: model_type {model_type!r} is not an architecture transformers {__version__} knows; "
                     f"{supported} (a newer model may need a newer transformers)")


def read_quantized_config(path: str | os.PathLike) -> tuple[dict, QuantConfig]:
    """Read and check a GPTQ directory's configuration without loading any weight.

    Returns:
        (config.json as a dict, the QuantConfig its ``quantization_config`` describes).
    Raises:
        InputNotFoundError: no config.json, or neither model.safetensors nor model.safetensors.index.json.
        UsageError: JSON that is not an object, an architecture transformers does not ship (``check_architecture``),
            a missing or bad quantization block, an unknown ``dtype``, a quantize_config.json that disagrees with
            config.json (naming both files and the field), or files that fail ``weights.check_directory_files``' or
            ``weights.weight_files``' checks (a link or an index entry leading outside the directory, a file that is
            not safetensors).
    """
    path = Path(path)
    if not (path / "config.json").is_file() or weight_files(path) is None:
        raise InputNotFoundError(f"{path} is not a quantized model directory: expected config.json and "
                                 f"{SINGLE_FILE} (or {INDEX_FILE} with its shards); write one with "
                                 "`gptqlora quantize --out DIR`")
    check_directory_files(path)  # the weights were checked by their index entries; the rest by name
    raw = read_json_object(path / "config.json")
    check_architecture(raw, path / "config.json")
    block = raw.get("quantization_config")
    qconfig = quant_config_from_dict(block, f"{path / 'config.json'} quantization_config")
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise UsageError(f"{path / 'config.json'}: dtype {dtype!r} is unknown: use {', '.join(DTYPES)}")
    side = path / "quantize_config.json"
    if side.is_file():
        other = read_json_object(side)
        for key in _AGREEING_FIELDS:
            if key in other and other[key] != block.get(key):
                raise UsageError(f"{side} and {path / 'config.json'} disagree on {key} ({other[key]!r} vs "
                                 f"{block.get(key)!r}): the two describe the same weights; fix the wrong one")
    return raw, qconfig


# ---------------------------------------------------------------------------------------------- model skeletons

def float_skeleton(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM with every weight on the meta device (no memory), from a config or a model directory.

    Only the rotary embedding is real: its buffers are computed from the config, never loaded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, (str, os.PathLike)):
        config = AutoConfig.from_pretrained(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is not None:
        inner.rotary_emb = type(rotary)(config=model.config)
    return model


def quantized_skeleton(config, qconfig: QuantConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``float_skeleton`` with the target linears of every block replaced by (meta) QuantizedLinear layers."""
    model = float_skeleton(config, dtype)
    for block in decoder_layers(model):
        for name in qconfig.target_names:
            lin = block.get_submodule(name)
            block.set_submodule(name, QuantizedLinear(lin.in_features, lin.out_features, qconfig.bits,
                                                      qconfig.group_size, bias=lin.bias is not None, device="meta"))
    return model


def saved_state(model: nn.Module) -> dict[str, Tensor]:
    """What a checkpoint stores: the state dict without a tied lm_head (safetensors refuses shared storage)."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def tensor_units(names: Sequence[str]) -> list[list[str]]:
    """Tensor names grouped as written: everything outside the blocks (embeddings, norm, head), then each block."""
    blocks: dict[int, list[str]] = {}
    outside = []
    for name in names:
        match = _LAYER_KEY.match(name)
        if match is None:
            outside.append(name)
        else:
            blocks.setdefault(int(match[1]), []).append(name)
    return [outside] + [blocks[i] for i in sorted(blocks)]


def write_configs(directory: Path, model_config, config: QuantConfig, dtype: torch.dtype, extra: dict | None) -> None:
    """Write config.json (the model's config with its ``quantization_config`` and ``dtype``) and quantize_config.json
    (the same block, with ``extra`` under ``"gptqlora"``) into ``directory``."""
    block = gptq_config_dict(config)
    cfg = model_config.to_dict()
    cfg["quantization_config"] = block
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (directory / "quantize_config.json").write_text(json.dumps(block | {"gptqlora": extra or {}}, indent=2))


# ---------------------------------------------------------------------------------------------- save and load

def save_quantized(model: nn.Module, tokenizer, out_dir: str | os.PathLike, config: QuantConfig,
                   extra: dict | None = None, overwrite: bool = False,
                   max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write ``model`` (with QuantizedLinear layers) and ``tokenizer`` to ``out_dir`` in the GPTQ v1 format.

    The directory is written next to its destination and renamed into place (``gptqlora.files.staged_dir``), so a
    crash leaves no partial directory and an existing one is never left half-overwritten.

    Args:
        extra: recorded under ``"gptqlora"`` in quantize_config.json (method, calibration, losses...).
        overwrite: replace an existing ``out_dir``; without it an existing one is refused.
        max_shard_size: bytes (or "5GB") per weights file; a model that fits one is written as model.safetensors.
    Returns:
        The directory.
    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is false.
    """
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        state = {k: v.detach().contiguous() for k, v in saved_state(model).items()}
        write_tensors(tmp, [{n: state[n] for n in unit} for unit in tensor_units(list(state))], max_shard_size)
        write_configs(tmp, model.config, config, next(model.parameters()).dtype, extra)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def is_quantized_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a config.json whose ``quantization_config`` says GPTQ (nothing else is checked)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    block = read_json_object(cfg).get("quantization_config")
    return isinstance(block, dict) and block.get("quant_method") == "gptq"


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a GPTQ v1 directory (ours, or another tool's with the same layout) as a model with QuantizedLinear layers.

    The model is built on the meta device and each tensor read (memory-mapped) is checked, moved to ``device`` and
    assigned, so loading holds no second copy of the weights. Reads one model.safetensors or the shards of an index.

    Returns:
        (model, tokenizer, QuantConfig).
    Raises:
        InputNotFoundError: no config.json or weights.
        UsageError: a bad config (see ``read_quantized_config``), a shape or dtype that does not match what the
            config describes, a truncated file, or non-finite scales.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    raw, qconfig = read_quantized_config(path)
    weights = SafetensorsSource(path)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = quantized_skeleton(config, qconfig, getattr(torch, raw.get("dtype") or raw.get("torch_dtype") or "float32"))
    expected = saved_state(model)
    missing = sorted(set(expected) - set(weights.names))
    unexpected = sorted(set(weights.names) - set(expected))
    if missing or unexpected:
        raise UsageError(f"{weights.path} does not match its config: missing {missing[:4]}"
                         f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                         f"{'...' if len(unexpected) > 4 else ''}")

    def checked(key: str, t: Tensor) -> Tensor:
        want = expected[key]
        if t.shape != want.shape:
            raise UsageError(f"{weights.path}: {key} has shape {tuple(t.shape)} but the config implies "
                             f"{tuple(want.shape)} (bits={qconfig.bits}, group_size={qconfig.group_size})")
        if key.endswith(("qweight", "qzeros", "g_idx")) and t.dtype != torch.int32:
            raise UsageError(f"{weights.path}: {key} is {t.dtype}, the GPTQ format stores int32")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UsageError(f"{weights.path}: {key} holds NaN or infinite values; the checkpoint is damaged: "
                             "quantize again")
        return t.to(device=device, dtype=want.dtype)

    state = weights.load(sorted(expected), checked)
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.to(device)  # the rotary embedding's computed buffers; every loaded tensor is there already
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UsageError(f"{path}: {left[:4]} were neither stored nor computed: this model type is not supported")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer, qconfig
