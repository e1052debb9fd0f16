"""The verifier: a causal LM (a quantized base with its own LoRA) and a scalar value head on its last hidden state.

``values = head(final_norm(h))``: one logit per token, [B, T]. Trained so that every solution token predicts
whether its solution ends correct, the value at the last solution token scores the whole solution. The head is
initialised to zero, so a fresh verifier scores every solution 0.5 (logit 0) and the LoRA starts at the base.

Input: the zero-shot prompt of the question (``gptqlora.data.gsm8k.build_prompt``, no exemplars, whatever prompt the
generator had) followed by the solution text as generated. The same encoding serves training and scoring.

A verifier directory holds the LoRA in PEFT's format (``adapter_config.json``, ``adapter_model.safetensors``,
``gptqlora_base.json``), the head in ``value_head.safetensors`` (``weight`` [1, H], ``bias`` [1]) and
``verifier_config.json`` (its base record, prompt style, token budget, and how it was trained).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gptqlora.data.gsm8k import build_prompt, encode_texts
from gptqlora.errors import InputNotFoundError, UsageError
from gptqlora.files import read_json_object
from gptqlora.quant.weights import check_directory_files

HEAD_FILE, CONFIG_FILE = "value_head.safetensors", "verifier_config.json"
FORMAT = "gptqlora-verifier"
VERSION = 1


class VerifierModel(nn.Module):
    """A causal LM (LLaMA family: ``lm.model`` is the decoder, ``lm.lm_head`` the output layer) plus a value head.

    Args:
        lm: the language model, usually a quantized base with LoRA injected; not copied.
        head: an ``nn.Linear(hidden, 1)``; a zero-initialised fp32 one when None.
    """

    def __init__(self, lm: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size
        device = next(lm.parameters()).device
        if head is None:
            head = nn.Linear(hidden, 1, device=device, dtype=torch.float32)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.head = head

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Value logits [B, T] (fp32) and the final hidden states [B, T, H] (for the LM loss, ``lm.lm_head``)."""
        hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask,
                               use_cache=False).last_hidden_state  # [B, T, H], after the final norm
        values = self.head(hidden.float()).squeeze(-1)  # [B, T]
        return values, hidden


def verifier_prompt(question: str, style: str, tokenizer) -> str:
    """The text a solution is appended to: the question's zero-shot prompt (the generator's exemplars left out)."""
    return build_prompt(question, style, tokenizer)


def encode_solution(tokenizer, question: str, solution: str, style: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + solution and the index of the first solution token.

    Prompt and solution are tokenized as one text (the boundary tokenizes as in running text); the first
    ``len(prompt ids)`` positions are the prompt. Beyond ``max_length`` the oldest tokens go, so the end of the
    solution (its answer, where it is scored) always stays. A solution of no tokens is scored at the prompt's last
    token: its first solution index is then the last position.

    Returns:
        (ids, start): ``ids[start:]`` are the solution tokens (at least one position).
    """
    prompt = verifier_prompt(question, style, tokenizer)
    prompt_ids, full_ids = encode_texts(tokenizer, [prompt, prompt + solution], style)
    start = min(len(prompt_ids), len(full_ids) - 1)
    cut = max(0, len(full_ids) - max_length)
    return full_ids[cut:], max(0, start - cut)


def pad_batch(encoded: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad encoded solutions: ``input_ids`` and ``attention_mask`` [B, T], ``solution_mask`` [B, T] (bool, the
    solution tokens) and ``last`` [B] (the index of each row's last token, where the solution is scored)."""
    T = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(encoded), T), dtype=torch.long)  # [B, T]
    solution_mask = torch.zeros((len(encoded), T), dtype=torch.bool)  # [B, T]
    for row, (ids, start) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
        solution_mask[row, start:len(ids)] = True
    last = attention_mask.sum(-1) - 1  # [B]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "solution_mask": solution_mask, "last": last}


# ---------------------------------------------------------------------------------------------- files

def verifier_config(base: dict[str, Any], style: str, max_length: int, hidden_size: int,
                    training: dict[str, Any] | None = None) -> dict[str, Any]:
    """``verifier_config.json``: what the verifier scores with (base, prompt style, token budget), how it was made."""
    return {"format": FORMAT, "version": VERSION, "base": base, "style": style, "max_length": max_length,
            "hidden_size": hidden_size, "training": training or {}}


def save_verifier(model: VerifierModel, out_dir: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Write the verifier's LoRA (PEFT format, its base recorded beside it), head and config into ``out_dir``.

    The caller stages the directory (``gptqlora.files.staged_dir``), so a verifier appears whole or not at all.
    """
    from gptqlora.lora.adapter import save_adapter

    out = Path(out_dir)
    save_adapter(model.lm, out, base_model_name_or_path=config["base"]["path"], base=config["base"])
    head = {"weight": model.head.weight.detach().to("cpu", torch.float32).contiguous(),  # [1, H]
            "bias": model.head.bias.detach().to("cpu", torch.float32).contiguous()}  # [1]
    save_file(head, str(out / HEAD_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return out


def read_verifier_config(verifier_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check a verifier directory's config (and that its files are there) before anything loads.

    Raises:
        InputNotFoundError: a missing directory or file.
        UsageError: a config that is not a gptqlora verifier's, or of an unknown version; a file that leads out of
            the directory or is not a regular file (``gptqlora.quant.weights.check_directory_files``).
    """
    d = Path(verifier_dir).expanduser()
    missing = [n for n in (CONFIG_FILE, HEAD_FILE, "adapter_config.json", "adapter_model.safetensors")
               if not (d / n).is_file()]
    if missing:
        where = "" if d.is_dir() else " (the directory does not exist)"
        raise InputNotFoundError(f"{d} is not a verifier directory{where}: missing {', '.join(missing)}; train one "
                                 "with `gptqlora train-verifier`")
    check_directory_files(d)  # a verifier's files are read only from inside it
    config = read_json_object(d / CONFIG_FILE)
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise UsageError(f"{d / CONFIG_FILE} is not a version-{VERSION} gptqlora verifier config (format "
                         f"{config.get('format')!r}, version {config.get('version')!r}): train it again")
    for key in ("base", "style", "max_length", "hidden_size"):
        if config.get(key) is None:
            raise UsageError(f"{d / CONFIG_FILE}: the field {key!r} is missing; train the verifier again")
    if not isinstance(config["base"], dict):  # a base record, compared field by field with the base it loads onto
        raise UsageError(f"{d / CONFIG_FILE}: 'base' is {type(config['base']).__name__}, not a base record (a JSON "
                         "object); train the verifier again")
    return config


def load_head(verifier_dir: str | os.PathLike, hidden_size: int, device: torch.device | str) -> nn.Linear:
    """The value head from ``value_head.safetensors`` (never a pickle), checked for shape and finiteness.

    Raises:
        UsageError: a damaged file, other keys or shapes, or non-finite values.
    """
    path = Path(verifier_dir) / HEAD_FILE
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UsageError(f"cannot read {path}: the file is truncated or corrupt ({e}); train the verifier again") \
            from e
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    if shapes != {"weight": (1, hidden_size), "bias": (1,)}:
        raise UsageError(f"{path} holds {shapes}, not a value head for hidden size {hidden_size} (weight [1, "
                         f"{hidden_size}], bias [1]): it belongs to another base model")
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise UsageError(f"{path} holds NaN or infinite values: the training diverged; train the verifier again")
    head = nn.Linear(hidden_size, 1, device=device, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(tensors["weight"])
        head.bias.copy_(tensors["bias"])
    return head
