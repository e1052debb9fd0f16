"""Training speed and memory of LoRA over our 4-bit base, over the float base, and of PEFT's LoRA over the float base.

    python benchmarks/bench_train.py                       # all three, side by side, ~10 timed steps each
    python benchmarks/bench_train.py --quick               # smoke run (1 warmup + 2 timed steps)
    python benchmarks/bench_train.py --profile ours-4bit   # where the time of one configuration goes
    python benchmarks/bench_train.py --interleave --configs ours-float,peft-float   # a ratio on a busy machine

Configurations (each in its own fresh process; see ``common.py``):
    ours-4bit   our LoRALinear (gptqlora.lora.layer.inject_lora_layers) over QuantizedLinear layers: every block
                linear of the float model round-to-nearest quantized in the child (4-bit, group size 64). RTN only
                decides the codes; the layer and its dequantize-and-matmul kernel are the ones a GPTQ model runs.
    ours-float  our LoRALinear over the float model.
    peft-float  peft.get_peft_model with LoraConfig(r, lora_alpha, lora_dropout, q/k/v/o, bias="none") over it.

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
and the median of the per-step ratios to the last configuration (the yardstick), not memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

import common
from gptqlora.config import LoRAConfig, QuantConfig, TrainConfig

# The library's defaults (LoRA r=16, alpha=32, dropout 0.05; batch 2 x 256; lr 2e-4; group size 64) are the
# benchmark's defaults, written once in gptqlora.config.
LORA, TRAIN, QUANT = LoRAConfig(), TrainConfig(), QuantConfig()
CONFIGS = ("ours-4bit", "ours-float", "peft-float")
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
    from gptqlora.workflows.base import weight_bytes
    from gptqlora.models import load_model

    model, tokenizer = load_model(args.model, args.dtype, args.device)
    facts: dict = {"quantize_s": None}
    if name == "ours-4bit":
        from gptqlora.quant.driver import quantize_model_weights

        start = time.perf_counter()
        quantize_model_weights(model, None, QuantConfig(method="rtn", bits=4, group_size=args.group_size,
                                                        targets="all"), progress=False)
        facts["quantize_s"] = time.perf_counter() - start
    common.materialize(model)  # before any wrapper, so every configuration's weights are held the same way
    facts["linear_weight_mb"] = weight_bytes(model) / common.MiB  # measured before LoRA adds its own linears
    hf_model = model
    if name.startswith("ours"):
        from gptqlora.lora.layer import inject_lora_layers

        inject_lora_layers(model, ",".join(LORA_TARGETS), r=args.r, alpha=args.alpha, dropout=args.dropout)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                                 target_modules=list(LORA_TARGETS), bias="none",
                                                 task_type="CAUSAL_LM"))
    return model, hf_model, tokenizer, facts


class Trainer:
    """One configuration's training step: autocast, label NLL / label tokens, backward, clip, AdamW."""

    def __init__(self, model: nn.Module, hf_model: nn.Module, args: argparse.Namespace) -> None:
        from gptqlora.train.loop import _enable_checkpointing

        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr)
        self.bf16 = args.bf16
        if args.checkpointing:
            _enable_checkpointing(hf_model)  # the training loop's own call, on the HF model inside any wrapper
        model.train()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimizer step on one batch; returns the mean label NLL."""
        from gptqlora.data.gsm8k import IGNORE_INDEX
        from gptqlora.loss import label_nll

        batch = {k: v.to(self.device) for k, v in batch.items()}  # [B, T] each
        n_labels = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
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
    facts |= {"model_mb": common.model_bytes(model) / common.MiB,
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return Trainer(model, hf_model, args), batches, facts


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
        trainers[name] = Trainer(model, hf_model, args)
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
                   "step_s": wall[name], "step_cpu_s": cpu[name]} for name in names}


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
        common.emit_json(profile_one(args.profile, args))
        return 0
    names = common.config_names(args, CONFIGS)
    load_before, started = common.load_average(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if args.interleave:
        results, columns = run_interleaved(names, args), INTERLEAVED_COLUMNS
    else:
        results, columns = common.run_children(Path(__file__), names, argv), COLUMNS
    load_after = common.load_average()
    print(f"## LoRA training: {args.batch_size} x {args.seq_len} tokens per step, {args.steps} timed steps after "
          f"{args.warmup_steps} warmup, r={args.r}, bf16 autocast {'on' if args.bf16 else 'off'}, checkpointing "
          f"{'on' if args.checkpointing else 'off'}, threads {args.threads or torch.get_num_threads()}"
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
