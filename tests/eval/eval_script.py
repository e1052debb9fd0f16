"""A tiny seeded GSM8K evaluation shared by the resume tests, and a script form for the subprocess (SIGKILL) test.

As a script, with tests/ on PYTHONPATH (``conftest.child_env``): ``python tests/eval/eval_script.py OUT [--samples K]
[--slow SECONDS]`` evaluates the seeded tiny LLaMA on six made-up questions in batches of two; ``--slow`` sleeps after
each logged question so a test can kill it mid-run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

from gptqlora.config import EvalConfig

ENTRIES = [
    {"question": "Tom has 2 apples and buys 2 more. How many?", "answer": "2 + 2 = 4\n#### 4"},
    {"question": "A box holds 3 pens. How many in 2 boxes?", "answer": "3 * 2 = 6\n#### 6"},
    {"question": "Sam had 9 coins and lost 4. How many left?", "answer": "9 - 4 = 5\n#### 5"},
    {"question": "Ann reads 5 pages a day. Pages in 2 days?", "answer": "5 * 2 = 10\n#### 10"},
    {"question": "8 birds sit; 3 fly off. How many stay?", "answer": "8 - 3 = 5\n#### 5"},
    {"question": "Jo has 7 cards, gets 1. How many now?", "answer": "7 + 1 = 8\n#### 8"},
]
BATCH = 2
SEED = 11
PROVENANCE = {"model": "tiny-llama (seed 0)", "adapter": None}


def script_config(samples: int = 0, **overrides) -> EvalConfig:
    """Batches of two, a short budget (a random model never writes an answer line, so it always runs to it)."""
    kw = dict(eval_batch_size=BATCH, max_new_tokens=12, samples=samples)
    kw |= dict(temperature=1.0, top_p=0.9) if samples else {}
    return EvalConfig(**(kw | overrides))


def run_eval(out: str | Path | None, samples: int = 0, resume: bool = False,
             log: Callable[[str], Any] = lambda line: None, provenance: dict | None = None,
             entries: list[dict] = ENTRIES, **overrides) -> dict:
    """Evaluate the seeded tiny LLaMA on ``entries`` with plain prompts into ``out``; overrides go to the config."""
    from gptqlora.eval.gsm8k_eval import evaluate_gsm8k

    return evaluate_gsm8k(make_tiny_llama(), make_tiny_tokenizer(), entries, script_config(samples, **overrides),
                          style="plain", out_dir=out, log=log, seed=SEED, split="test", resume=resume,
                          provenance=PROVENANCE if provenance is None else provenance)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--samples", type=int, default=0)
    parser.add_argument("--slow", type=float, default=0.0, help="seconds to sleep after each logged question")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the tests do: same kernels, so the same generations
    run_eval(args.out, args.samples, log=lambda line: time.sleep(args.slow))


if __name__ == "__main__":
    main()
    from gptqlora import distributed  # noqa: E402

    distributed.exit_process(0)  # as the CLI's torchrun workers leave
