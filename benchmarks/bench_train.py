"""Training speed and memory of LoRA over our 4-bit and float bases, beside PEFT's LoRA and QLoRA as users run it.

    python benchmarks/bench_train.py                       # all five, side by side, ~10 timed steps each
    python benchmarks/bench_train.py --quick               # smoke run (1 warmup + 2 timed steps)
    python benchmarks/bench_train.py --profile ours-4bit   # where the time of one configuration goes
    python benchmarks/bench_train.py --interleave --configs ours-float,peft-float   # a ratio on a busy machine

Configurations (each in its own fresh process; see ``common.py``):
    ours-4bit   our LoRALinear (gptqlora.lora.layer.inject_lora_layers) over QuantizedLinear layers: every block
                linear of the float model round-to-nearest quantized in the child (4-bit, group size 64). RTN only
                decides the codes; the layer and its dequantize-and-matmul kernel are the ones a GPTQ model runs.
    ours-float  our LoRALinear over the float model.
    peft-float  peft.get_peft_model with LoraConfig(r, lora_alpha, lora_dropout, q/k/v/o, bias="none") over it.
    peft-bnb-nf4  QLoRA as users run it: every block linear of the float model swapped for bitsandbytes' Linear4bit
                (NF4, blocks of 64, double-quantized absmax, computing in bf16 under --bf16), then the same
                get_peft_model call as peft-float. These are the layers transformers builds from
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
                quantized from the float model in memory (``to_bnb_nf4``) so every configuration loads alike;
                prepare_model_for_kbit_training is left out: what it does (float non-quantized weights, only LoRA
                trainable, checkpointing) the rules below already do, for all.
    torchao-nf4 torchtune's QLoRA recipe: every block linear's weight as torchao's NF4Tensor (``to_nf4``, blocks of 64,
                scalers quantized in blocks of 256, or of 64 where the count of blocks does not divide by 256, as in
                this model's 576-wide attention layers) applied by ``linear_nf4`` as torchtune's FrozenNF4Linear does,
                and on q/k/v/o torchtune's LoRALinear forward over it (``NF4LoRALinear``, written here: torchtune is
                not a dependency).
    The last two need the ``yardsticks`` extra (``make yardsticks``); without their package they are skipped with a
    note, not failed.

Ours run the training loop's step decisions: ``--dequantize-once`` (each quantized weight dequantized once per step:
off by default as in the loop; ``auto`` when the dense copies fit, ``gptqlora.train.run.resolve_dequantize_once``),
``--checkpoint-every`` (one block in K checkpointed; 1, every block, by default as in the loop) and
``--compile-blocks`` (off by default, as in the loop). ``--uncheckpointed`` names configurations that run without
activation checkpointing at all, while the others keep it.

Identical for all: LoRA r=16, alpha=32, dropout 0.05 on q/k/v/o; bf16 autocast (``torch.autocast(device, bf16)``,
the weights stay in the model's dtype); activation checkpointing switched on by the same call the training loop
makes (``gptqlora.train.loop._enable_checkpointing``: non-reentrant); the loss of the training loop
(``label_nll``: summed NLL of the label tokens, divided by their count); AdamW (lr 2e-4) on the trainable
parameters with gradient clipping at 1.0, as ``train_lora`` does; and the very same batches.

Batches: GSM8K train examples as ``GSM8KCoTDataset(max_length=256)`` builds them (chat prompt, solution, eos; loss on
the solution), keeping, in file order, only those that fill all 256 tokens (about one in nine is that long and is
cut at 256). So every batch is exactly 2 x 256 real tokens with no padding, and tokens/s counts real tokens. When a
run needs more batches than there are long examples, the batches repeat.

Reported per configuration: seconds per optimizer step (mean, median, min, max) over the timed steps after the warmup
steps, tokens/s (batch x length / mean step time), the loss of the first and last step (the first is the same for
both float configurations: B = 0, so LoRA changes nothing yet), peak RSS over warmup + timed steps (and on CUDA the
peak allocation), the RSS at their start and the peak of the setup before them (loading, quantizing), the bytes of
the block linears' weights as stored, of all parameters and buffers, and the trainable parameters. Before the
measured steps every configuration's weights are copied out of the checkpoint's memory map and the peak is reset
(``common.MemoryWindow``, ``common.materialize``), so the peak RSS compares the models as held, not their loading.

On a machine whose cores are shared with other work, pass ``--threads`` (e.g. 1): with more OpenMP threads than free
cores every small op waits for a preempted thread and steps slow down erratically, by several times. Each step's CPU
time (``common.cpu_seconds``) is recorded beside its wall time, and the load average before and after the run.
``--interleave`` builds the configurations in one process instead and alternates them step by step (the order
reversed every other step), so the load of a shared machine falls on all alike; it reports each one's median step
and the median of the per-step ratios to the last configuration (the yardstick), not memory; configurations skipped
for a missing package are left out of it, so the yardstick is the last one that runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

import common
from gptqlora.config import AUTO_ON_OFF, LoRAConfig, QuantConfig, TrainConfig

# The library's defaults (LoRA r=16, alpha=32, dropout 0.05; batch 2 x 256; lr 2e-4; group size 64) are the
# benchmark's defaults, written once in gptqlora.config.
LORA, TRAIN, QUANT = LoRAConfig(), TrainConfig(), QuantConfig()
CONFIGS = ("ours-4bit", "ours-float", "peft-float", "peft-bnb-nf4", "torchao-nf4")
# Each yardstick's own package (the ``yardsticks`` extra); without it the configuration is skipped, not failed.
YARDSTICK_PACKAGES = {"peft-bnb-nf4": "bitsandbytes", "torchao-nf4": "torchao"}
# QLoRA's NF4 block (bitsandbytes' default, torchtune's to_nf4 default) and torchtune's scaler block.
NF4_BLOCK_SIZE, NF4_SCALER_BLOCK_SIZE = 64, 256
LORA_TARGETS = common.LORA_TARGETS
QUICK = {"warmup_steps": 1, "steps": 2, "profile_steps": 1}

COLUMNS = (  # (key, header, format)
    ("step_s_mean", "s/step mean", ".3f"),
    ("step_s_median", "s/step median", ".3f"),
    ("step_cpu_s_median", "CPU s/step median", ".3f"),
    ("tokens_per_s", "tokens/s", ".1f"),
    *common.memory_columns("train"),
    ("model_mb", "params+buffers MiB", ".1f"),
    ("trainable_params", "trainable params", ","),
    ("loss_first", "loss step 1", ".4f"),
    ("loss_last", "loss last", ".4f"),
)


INTERLEAVED_COLUMNS = (
    ("step_s_median", "s/step median", ".3f"),
    ("step_cpu_s_median", "CPU s/step median", ".3f"),
    ("ratio_median", "step / last config's (median)", ".3f"),
    ("cpu_ratio_median", "CPU / last config's (median)", ".3f"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(parser, CONFIGS)
    parser.add_argument("--batch-size", type=int, default=TRAIN.batch_size, help="Sequences per step.")
    parser.add_argument("--seq-len", type=int, default=TRAIN.max_length,
                        help="Tokens per sequence (GSM8KCoTDataset max_length).")
    parser.add_argument("--warmup-steps", type=int, default=2,
                        help="Untimed steps first (allocations, optimizer state).")
    parser.add_argument("--steps", type=int, default=10, help="Timed optimizer steps.")
    parser.add_argument("--r", type=int, default=LORA.r, help="LoRA rank.")
    parser.add_argument("--alpha", type=float, default=LORA.alpha, help="LoRA alpha.")
    parser.add_argument("--dropout", type=float, default=LORA.dropout, help="LoRA dropout.")
    parser.add_argument("--lr", type=float, default=TRAIN.lr, help="AdamW learning rate.")
    parser.add_argument("--group-size", type=int, default=QUANT.group_size,
                        help="Group size of the 4-bit base (ours-4bit).")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast.")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="Activation (gradient) checkpointing, for every configuration alike.")
    parser.add_argument("--uncheckpointed", default="",
                        help="Comma list of configurations that run without activation checkpointing while the "
                             "others keep it (the training loop's --no-gradient-checkpointing): e.g. ours-4bit, "
                             "whose 4-bit weights leave room for the activations, against PEFT over float.")
    parser.add_argument("--dequantize-once", default=TRAIN.dequantize_once, choices=AUTO_ON_OFF,
                        help="ours-*: keep each quantized weight dense for the step (the training loop's option).")
    parser.add_argument("--checkpoint-every", type=int, default=TRAIN.checkpoint_every,
                        help="ours-*: checkpoint one decoder block in this many (the training loop's option).")
    parser.add_argument("--compile-blocks", action="store_true",
                        help="ours-*: compile each decoder block, as the training loop's --compile-blocks does.")
    parser.add_argument("--prompt-style", default="chat", choices=("plain", "chat"), help="GSM8K prompt format.")
    parser.add_argument("--profile", choices=CONFIGS, default=None,
                        help="Instead of comparing: profile this configuration here with torch.profiler and print "
                             "the top ops by self CPU time.")
    parser.add_argument("--profile-steps", type=int, default=3, help="Steps profiled (after the warmup steps).")
    parser.add_argument("--profile-rows", type=int, default=30, help="Ops listed in the profile table.")
    parser.add_argument("--interleave", action="store_true",
                        help="Build the configurations in this one process and alternate their steps: ratios that "
                             "hold on a busy machine (no memory figures).")
    return parser


# ---------------------------------------------------------------------------------------------- NF4 yardsticks

def missing_yardstick(name: str) -> str | None:
    """Why configuration ``name`` cannot run here, in one line (its package is not installed); None when it can."""
    package = YARDSTICK_PACKAGES.get(name)
    if package is None or importlib.util.find_spec(package) is not None:
        return None
    return f"{package} is not installed (make yardsticks)"


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(full name, layer) of every plain ``nn.Linear`` inside the decoder blocks (never lm_head)."""
    return [(name, m) for name, m in model.named_modules()
            if name.startswith("model.layers.") and type(m) is nn.Linear]


@torch.no_grad()
def to_bnb_nf4(model: nn.Module, compute_dtype: torch.dtype, block_size: int = NF4_BLOCK_SIZE) -> None:
    """Swap every block linear of ``model`` for bitsandbytes' ``Linear4bit``, in place: QLoRA's layer.

    NF4 codes in blocks of ``block_size``, their absmax quantized again (double quantization, QLoRA's default), the
    matmul in ``compute_dtype``. bitsandbytes quantizes each weight as ``from_pretrained`` with
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`` does; here
    from the float model in memory, so that the yardstick loads through the same ``load_model`` as the others.
    """
    import bitsandbytes as bnb

    for name, linear in block_linears(model):
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")  # meta: no float weight allocated only to be replaced
        weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, blocksize=block_size,
                                   compress_statistics=True, quant_type="nf4", module=layer)
        layer.weight = weight._quantize(linear.weight.device)  # [N * K / 2, 1] uint8 codes + weight.quant_state
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        model.set_submodule(name, layer)


def _torchao_nf4():
    """torchao's ``(to_nf4, linear_nf4)``: under ``torchao.quantization`` in 0.18, ``torchao.dtypes`` in older ones."""
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
    except ImportError:
        from torchao.dtypes.nf4tensor import linear_nf4, to_nf4
    return to_nf4, linear_nf4


class FrozenNF4Linear(nn.Module):
    """torchtune's ``FrozenNF4Linear``: a frozen weight held as torchao's ``NF4Tensor``, applied by ``linear_nf4``
    (which dequantizes it to the input's dtype in forward and again in backward).

    Args:
        linear: the float layer (no bias: LLaMA blocks have none, nor does torchtune's layer).
        block_size, scaler_block_size: ``to_nf4``'s; the scaler block falls to the largest power of two that
            divides the number of blocks (``to_nf4`` asserts it divides; a 576 x 576 weight has 5,184 blocks of 64,
            which 256 does not divide, 64 does).
    """

    def __init__(self, linear: nn.Linear, block_size: int = NF4_BLOCK_SIZE,
                 scaler_block_size: int = NF4_SCALER_BLOCK_SIZE) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("FrozenNF4Linear takes a linear without bias, as torchtune's does")
        to_nf4, self._linear_nf4 = _torchao_nf4()
        n_blocks = linear.weight.numel() // block_size
        scaler_block_size = math.gcd(scaler_block_size, n_blocks)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(to_nf4(linear.weight.detach(), block_size, scaler_block_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return self._linear_nf4(x, self.weight)


class NF4LoRALinear(nn.Module):
    """torchtune's ``LoRALinear(quantize_base=True)`` forward, over a ``FrozenNF4Linear`` by composition:
    ``base(x) + (alpha / r) * lora_b(lora_a(dropout(x)))``, lora_a Kaiming-uniform and lora_b zero as torchtune's."""

    def __init__(self, base: FrozenNF4Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base, self.scaling = base, alpha / r
        self.dropout = nn.Dropout(dropout)
        self.lora_a = nn.Linear(base.in_features, r, bias=False)  # [r, in]
        self.lora_b = nn.Linear(r, base.out_features, bias=False)  # [out, r]
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return self.base(x) + self.scaling * self.lora_b(self.lora_a(self.dropout(x)))


def to_torchao_nf4(model: nn.Module) -> None:
    """Swap every block linear of ``model`` for a ``FrozenNF4Linear``, in place: torchtune's QLoRA base."""
    for name, linear in block_linears(model):
        model.set_submodule(name, FrozenNF4Linear(linear))


def add_nf4_lora(model: nn.Module, targets: tuple[str, ...], r: int, alpha: float, dropout: float) -> None:
    """Wrap the ``FrozenNF4Linear`` layers named ``*.<target>`` in ``NF4LoRALinear`` and make only LoRA trainable."""
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = [name for name, m in model.named_modules()
              if isinstance(m, FrozenNF4Linear) and name.rsplit(".", 1)[-1] in targets]
    for name in chosen:
        model.set_submodule(name, NF4LoRALinear(model.get_submodule(name), r, alpha, dropout))


def stored_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``t``: a torchao ``NF4Tensor``'s codes and scalers, a bitsandbytes
    ``Params4bit``'s codes and its quantization state (absmax, and when double-quantized their own absmax and
    code book), else ``t`` itself."""
    if hasattr(t, "__tensor_flatten__"):  # a wrapper subclass (NF4Tensor): its storage is its inner tensors'
        names, _ = t.__tensor_flatten__()
        return [inner for n in names for inner in stored_tensors(getattr(t, n))]
    state = getattr(t, "quant_state", None)
    if state is None:
        return [t]
    nested = [state.offset, state.state2.absmax, state.state2.code] if state.nested else []
    return [t, state.absmax, state.code, *nested]


def held_bytes(tensors) -> int:
    """Bytes that hold ``tensors`` (``common.tensor_bytes`` over each one's ``stored_tensors``)."""
    return common.tensor_bytes([inner for t in tensors for inner in stored_tensors(t)])


def block_weight_bytes(model: nn.Module) -> int:
    """Bytes of the decoder blocks' linear weights as stored: packed buffers for ours, NF4 codes and statistics for
    the yardsticks, float weights otherwise. Called before LoRA is added, so LoRA's own weights are not counted."""
    from gptqlora.quant.linear import QuantizedLinear

    tensors = []
    for m in model.model.layers.modules():
        if isinstance(m, QuantizedLinear):
            tensors += list(m.buffers())
        elif isinstance(m, (nn.Linear, FrozenNF4Linear)):  # bitsandbytes' Linear4bit is an nn.Linear
            tensors += list(m.parameters(recurse=False))
    return held_bytes(tensors)


# ---------------------------------------------------------------------------------------------- setup

def long_batches(tokenizer, n_batches: int, batch_size: int, seq_len: int, style: str, source: str | None
                 ) -> list[dict[str, torch.Tensor]]:
    """``n_batches`` batches of ``batch_size`` GSM8K train examples that each fill exactly ``seq_len`` tokens.

    Returns:
        Batches of ``input_ids``, ``attention_mask`` (all ones) and ``labels``, each [batch_size, seq_len];
        they repeat when the train split has fewer long examples than asked for.
    """
    from gptqlora.data.gsm8k import GSM8KCoTDataset, collate, load_gsm8k

    entries = load_gsm8k("train", source)
    need, picked = n_batches * batch_size, []
    for start in range(0, len(entries), 512):  # tokenize in chunks until enough long examples are found
        ds = GSM8KCoTDataset(entries[start:start + 512], tokenizer, style=style, max_length=seq_len)
        picked += [item for item in (ds[i] for i in range(len(ds))) if len(item["input_ids"]) == seq_len]
        if len(picked) >= need:
            break
    if len(picked) < batch_size:
        raise ValueError(f"GSM8K train has only {len(picked)} examples of {seq_len} tokens or more: lower --seq-len")
    picked = picked[:len(picked) - len(picked) % batch_size]
    batches = [collate(picked[i:i + batch_size], pad_id=tokenizer.eos_token_id)
               for i in range(0, len(picked), batch_size)]
    return [batches[i % len(batches)] for i in range(n_batches)]


def build_model(name: str, args: argparse.Namespace) -> tuple[nn.Module, nn.Module, object, dict]:
    """The model of one configuration with LoRA on q/k/v/o and only LoRA trainable.

    Returns:
        (model to call, the Hugging Face model inside it, tokenizer, facts: quantize seconds, weight bytes).
    """
    from gptqlora.models import load_model

    model, tokenizer = load_model(args.model, args.dtype, args.device)
    facts: dict = {"quantize_s": None}
    if name in YARDSTICK_PACKAGES:  # before the swap: NF4Tensor.clone dequantizes and quantizes again (default blocks)
        common.materialize(model)
    start = time.perf_counter()
    if name == "ours-4bit":
        from gptqlora.quant.driver import quantize_model_weights

        quantize_model_weights(model, None, QuantConfig(method="rtn", bits=4, group_size=args.group_size,
                                                        targets="all"), progress=False)
    elif name == "peft-bnb-nf4":  # bitsandbytes computes in its own dtype: bf16 where the others autocast to it
        to_bnb_nf4(model, torch.bfloat16 if args.bf16 else next(model.parameters()).dtype)
    elif name == "torchao-nf4":
        to_torchao_nf4(model)
    if name in ("ours-4bit", *YARDSTICK_PACKAGES):
        facts["quantize_s"] = time.perf_counter() - start
    if name not in YARDSTICK_PACKAGES:  # before any wrapper, so every configuration's weights are held the same way
        common.materialize(model)
    facts["linear_weight_mb"] = block_weight_bytes(model) / common.MiB  # before LoRA adds its own linears
    hf_model = model
    if name.startswith("ours"):
        from gptqlora.lora.layer import inject_lora_layers

        inject_lora_layers(model, ",".join(LORA_TARGETS), r=args.r, alpha=args.alpha, dropout=args.dropout)
    elif name == "torchao-nf4":
        add_nf4_lora(model, LORA_TARGETS, r=args.r, alpha=args.alpha, dropout=args.dropout)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                                 target_modules=list(LORA_TARGETS), bias="none",
                                                 task_type="CAUSAL_LM"))
    return model, hf_model, tokenizer, facts


def uncheckpointed(args: argparse.Namespace) -> set[str]:
    """The configurations ``--uncheckpointed`` names, checked against the known ones."""
    names = {n.strip() for n in args.uncheckpointed.split(",") if n.strip()}
    unknown = names - set(CONFIGS)
    if unknown:
        raise SystemExit(f"--uncheckpointed {args.uncheckpointed!r}: unknown {sorted(unknown)}; choose from "
                         f"{', '.join(CONFIGS)}")
    return names


class Trainer:
    """One configuration's training step: autocast, label NLL / label tokens, backward, clip, AdamW."""

    def __init__(self, name: str, model: nn.Module, hf_model: nn.Module, args: argparse.Namespace) -> None:
        from gptqlora.quant.linear import dequantize_once
        from gptqlora.train.loop import _compile_blocks, _enable_checkpointing
        from gptqlora.train.run import resolve_dequantize_once

        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr)
        self.bf16 = args.bf16
        ours = name.startswith("ours")
        # The training loop's own decisions and calls, on the HF model inside any wrapper
        self.dequantize_once = ours and resolve_dequantize_once(args.dequantize_once, model, self.device)
        self.step_weights = dequantize_once if self.dequantize_once else nullcontext
        self.compiled = ours and args.compile_blocks
        self.checkpointing = args.checkpointing and name not in uncheckpointed(args)
        self.checkpoint_every = args.checkpoint_every if ours and self.checkpointing else 1
        if self.compiled:
            _compile_blocks(hf_model, self.checkpointing, self.checkpoint_every)
        elif self.checkpointing:
            _enable_checkpointing(hf_model, self.checkpoint_every)
        model.train()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimizer step on one batch; returns the mean label NLL."""
        from gptqlora.data.gsm8k import IGNORE_INDEX
        from gptqlora.loss import label_nll

        batch = {k: v.to(self.device) for k, v in batch.items()}  # [B, T] each
        n_labels = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        with self.step_weights():
            with torch.profiler.record_function("train/forward+loss"), self.autocast():
                nll = label_nll(self.model, batch)
            with torch.profiler.record_function("train/backward"):
                (nll / n_labels).backward()
        with torch.profiler.record_function("train/clip+adamw"):
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return nll.item() / n_labels


def setup(name: str, args: argparse.Namespace, n_batches: int):
    common.setup_child(args)
    model, hf_model, tokenizer, facts = build_model(name, args)
    batches = long_batches(tokenizer, n_batches, args.batch_size, args.seq_len, args.prompt_style, args.data)
    facts |= {"model_mb": held_bytes([*model.parameters(), *model.buffers()]) / common.MiB,
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return Trainer(name, model, hf_model, args), batches, facts


# ---------------------------------------------------------------------------------------------- runs

def run_one(name: str, args: argparse.Namespace) -> dict:
    """Warmup steps, then timed steps, of one configuration in this process; its figures."""
    trainer, batches, facts = setup(name, args, args.warmup_steps + args.steps)
    window = common.MemoryWindow(trainer.device)
    load_start = common.load_average()
    losses, seconds, cpu = [], [], []
    for i, batch in enumerate(batches):
        wall_s, cpu_s, loss = timed_step(trainer, batch)
        losses.append(loss)
        if i >= args.warmup_steps:
            seconds.append(wall_s)
            cpu.append(cpu_s)
    timing = common.timing_summary(seconds)
    tokens_per_step = args.batch_size * args.seq_len
    return {"config": name, **{f"step_s_{k[:-2]}": v for k, v in timing.items()},
            "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_step / timing["mean_s"],
            "steps": len(seconds), "step_s": seconds, "step_cpu_s": cpu, "step_cpu_s_median": statistics.median(cpu),
            "loss_first": losses[0], "loss_last": losses[-1], **facts, **window.report(), "bf16": trainer.bf16,
            "dequantize_once": trainer.dequantize_once, "compiled": trainer.compiled,
            "checkpointing": trainer.checkpointing, "checkpoint_every": trainer.checkpoint_every,
            "device": str(trainer.device), "threads": torch.get_num_threads(), "load_start": load_start,
            "load_end": common.load_average()}


def timed_step(trainer: Trainer, batch: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process, loss) of one optimizer step."""
    common.sync(trainer.device)
    start, cpu_start = time.perf_counter(), common.cpu_seconds()
    loss = trainer.step(batch)
    common.sync(trainer.device)
    return time.perf_counter() - start, common.cpu_seconds() - cpu_start, loss


def run_interleaved(names: list[str], args: argparse.Namespace) -> dict:
    """Every configuration in this process on the same batches, alternating step by step; medians and ratios."""
    common.setup_child(args)
    trainers, batches = {}, None
    for name in names:
        torch.manual_seed(args.seed)  # each model's LoRA init as in its own process
        model, hf_model, tokenizer, _ = build_model(name, args)
        if batches is None:
            batches = long_batches(tokenizer, args.warmup_steps + args.steps, args.batch_size, args.seq_len,
                                   args.prompt_style, args.data)
        trainers[name] = Trainer(name, model, hf_model, args)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for i, batch in enumerate(batches):
        for name in (names if i % 2 == 0 else names[::-1]):
            wall_s, cpu_s, _ = timed_step(trainers[name], batch)
            if i >= args.warmup_steps:
                wall[name].append(wall_s)
                cpu[name].append(cpu_s)
    ref = names[-1]
    return {name: {"config": name, "step_s_median": statistics.median(wall[name]),
                   "step_cpu_s_median": statistics.median(cpu[name]),
                   "ratio_median": statistics.median(a / b for a, b in zip(wall[name], wall[ref])),
                   "cpu_ratio_median": statistics.median(a / b for a, b in zip(cpu[name], cpu[ref])),
                   "step_s": wall[name], "step_cpu_s": cpu[name], "dequantize_once": trainers[name].dequantize_once,
                   "compiled": trainers[name].compiled, "checkpointing": trainers[name].checkpointing,
                   "checkpoint_every": trainers[name].checkpoint_every}
            for name in names}


def profile_one(name: str, args: argparse.Namespace) -> dict:
    """Profile ``--profile-steps`` steps of one configuration after its warmup; print the top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    trainer, batches, _ = setup(name, args, args.warmup_steps + args.profile_steps)
    for batch in batches[:args.warmup_steps]:
        trainer.step(batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for batch in batches[args.warmup_steps:]:
            trainer.step(batch)
        common.sync(trainer.device)
    events = prof.key_averages()
    print(f"## torch.profiler: {name}, {args.profile_steps} steps of {args.batch_size} x {args.seq_len} tokens, "
          f"top {args.profile_rows} ops by self CPU time\n")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
    if trainer.device.type == "cuda":
        print(events.table(sort_by="self_device_time_total", row_limit=args.profile_rows))
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    phases = {e.key: e.cpu_time_total / 1e3 / args.profile_steps for e in events if e.key.startswith("train/")}
    print("\nper step, ms (CPU time of the whole phase):", ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    return {"benchmark": "train-profile", "config": name, "profile_steps": args.profile_steps,
            "phase_ms_per_step": phases,
            "top_ops": [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count,
                         "self_cpu_share": e.self_cpu_time_total / total_self}
                        for e in ops[:args.profile_rows]]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = common.parse_args(build_parser(), QUICK, argv)
    if args.one is not None:
        common.emit_json(run_one(args.one, args))
        return 0
    if args.profile is not None:
        if note := missing_yardstick(args.profile):
            raise SystemExit(f"--profile {args.profile}: {note}")
        common.emit_json(profile_one(args.profile, args))
        return 0
    names = common.config_names(args, CONFIGS)
    uncheckpointed(args)  # a wrong name is refused before any model loads
    skipped = {n: {"config": n, "skipped": note} for n in names if (note := missing_yardstick(n))}
    runnable = [n for n in names if n not in skipped]
    for name, row in skipped.items():
        print(f"[bench] {name} skipped: {row['skipped']}", file=sys.stderr)
    load_before, started = common.load_average(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if not runnable:
        results, columns = {}, COLUMNS
    elif args.interleave:
        results, columns = run_interleaved(runnable, args), INTERLEAVED_COLUMNS
    else:
        results, columns = common.run_children(Path(__file__), runnable, argv), COLUMNS
    results = {n: results.get(n) or skipped[n] for n in names}  # in the order asked for, skipped ones noted
    load_after = common.load_average()
    print(f"## LoRA training: {args.batch_size} x {args.seq_len} tokens per step, {args.steps} timed steps after "
          f"{args.warmup_steps} warmup, r={args.r}, bf16 autocast {'on' if args.bf16 else 'off'}, checkpointing "
          f"{'on' if args.checkpointing else 'off'}"
          f"{f' (off for {args.uncheckpointed})' if args.checkpointing and args.uncheckpointed else ''}, "
          f"threads {args.threads or torch.get_num_threads()}"
          f"{', interleaved in one process' if args.interleave else ''}; started {started}, load average before "
          f"{load_before}, after {load_after}\n")
    print(common.markdown_table(results, columns))
    print()
    settings = {k: v for k, v in vars(args).items() if k not in ("one", "profile", "profile_steps", "profile_rows")}
    return common.finish(results, {"benchmark": "train", "settings": settings, "started": started,
                                   "load_before": load_before, "load_after": load_after,
                                   "environment": common.environment(), "results": results})


if __name__ == "__main__":
    raise SystemExit(main())
