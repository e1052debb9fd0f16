"""A tiny seeded training setup shared by the train tests, and a script form for the subprocess (SIGKILL) test.

As a script: ``python tests/train/tiny.py OUT [--resume] [--slow SECONDS] [--fsdp] [--die-after K]`` trains the tiny
float model with a checkpoint after every step; ``--slow`` sleeps after each logged step so a test can kill it
mid-run. Under torchrun (``python -m torch.distributed.run --nproc-per-node 2 tests/train/tiny.py ...``) the processes
train it together, by DDP or with ``--fsdp`` by FSDP2; ``--die-after K`` makes rank 0 SIGKILL itself as it logs step
K + 1, so that step K's checkpoint is the latest. Either way in the environment of ``conftest.child_env``: tests/ on
PYTHONPATH, and PYTHONSAFEPATH=1 so that ``conftest`` is tests/conftest.py, not this folder's.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

from gptqlora.config import TrainConfig
from gptqlora.data.gsm8k import GSM8KCoTDataset
from gptqlora.lora import inject_lora_layers

ENTRIES = [
    {"question": "Tom has 2 apples and buys 2 more. How many?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"},
    {"question": "A box holds 3 pens. How many in 2 boxes?", "answer": "3 * 2 = <<3*2=6>>6\n#### 6"},
    {"question": "Sam had 9 coins and lost 4. How many left?",  # a longer answer: micro-batches differ in labels
     "answer": "He had 9 coins and lost 4 of them, so 9 - 4 = <<9-4=5>>5 are left.\n#### 5"},
    {"question": "Ann reads 5 pages a day. Pages in 2 days?", "answer": "5 * 2 = <<5*2=10>>10\n#### 10"},
    {"question": "8 birds sit; 3 fly off. How many stay?", "answer": "8 - 3 = <<8-3=5>>5\n#### 5"},
    {"question": "Jo has 7 cards, gets 1. How many now?", "answer": "7 + 1 = <<7+1=8>>8\n#### 8"},
    {"question": "Lee bakes 4 pies, eats 1. Pies left?", "answer": "4 - 1 = <<4-1=3>>3\n#### 3"},
    {"question": "Mia runs 3 km twice. Total km?", "answer": "3 * 2 = <<3*2=6>>6\n#### 6"},
]
MAX_LENGTH = 96


def tiny_data(n_train: int = 6, n_eval: int = 2):
    """(tokenizer, train dataset, held-out eval dataset) from the fake GSM8K entries, plain prompts."""
    tok = make_tiny_tokenizer(chat_template=False)
    train = GSM8KCoTDataset(ENTRIES[:n_train], tok, style="plain", max_length=MAX_LENGTH)
    held_out = GSM8KCoTDataset(ENTRIES[n_train:n_train + n_eval], tok, style="plain", max_length=MAX_LENGTH)
    return tok, train, held_out


def tiny_lora_model(seed: int = 0, r: int = 4, dropout: float = 0.1, targets: str = "all"):
    """The seeded tiny LLaMA with LoRA on ``targets``; its LoRA init draws from a seeded RNG too."""
    model = make_tiny_llama(seed=seed)
    torch.manual_seed(seed + 1)
    inject_lora_layers(model, targets, r=r, alpha=2.0 * r, dropout=dropout)
    return model


def tiny_config(out: str | Path, **overrides) -> TrainConfig:
    """A few fast steps: checkpoints every 2, eval every 3, no gradient checkpointing, fp32."""
    kw = dict(out=str(out), max_steps=6, batch_size=2, grad_accum=1, lr=1e-2, warmup_steps=1, min_lr_ratio=0.1,
              max_length=MAX_LENGTH, eval_every=3, save_every=2, log_every=1, gradient_checkpointing=False,
              bf16=False)
    return TrainConfig(**(kw | overrides))


SCRIPT_SEED = 3


def script_config(out: str | Path, resume: bool = False, fsdp: bool = False) -> TrainConfig:
    """The script's run: 8 steps of 2 micro-batches (steps straddle epochs of 3), a checkpoint after each."""
    return tiny_config(out, max_steps=8, grad_accum=2, save_every=1, eval_every=4, resume=resume, fsdp=fsdp)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--slow", type=float, default=0.0, help="seconds to sleep after each train step")
    parser.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP")
    parser.add_argument("--die-after", type=int, help="rank 0 SIGKILLs itself as it logs the step after this one")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the tests do: same kernels, and polite on a shared machine
    from gptqlora import distributed
    from gptqlora.train import train_lora

    def on_metrics(record: dict) -> None:  # called on rank 0 only
        if "loss" in record:
            time.sleep(args.slow)
            if args.die_after is not None and record["step"] == args.die_after + 1:
                os.kill(os.getpid(), signal.SIGKILL)

    tok, train, held_out = tiny_data()
    model = tiny_lora_model()
    try:
        train_lora(model, tok, train, held_out, script_config(args.out, args.resume, args.fsdp), seed=SCRIPT_SEED,
                   progress=False, on_metrics=on_metrics, base_model_name_or_path="tiny-llama")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
    from gptqlora import distributed  # noqa: E402

    distributed.exit_process(0)  # as the CLI's torchrun workers leave
