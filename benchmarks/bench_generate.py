"""Greedy decoding speed: our batched loop on the 4-bit + LoRA model, against transformers' generate on the float one.

    python benchmarks/bench_generate.py            # 32 GSM8K test prompts, batches of 8, 128 new tokens, 4 rows
    python benchmarks/bench_generate.py --quick    # smoke run (2 prompts x 16 new tokens)

Rows (each in its own fresh process; see ``common.py``):
    hf-float               ``model.generate(do_sample=False)`` on the float model: left padding by the tokenizer
                           (``padding_side='left'``), attention_mask, max_new_tokens, pad_token_id = eos.
    hf-float-fp32          the same in float32 whatever ``--dtype`` says: the yardstick as transformers runs it on a
                           CPU by default.
    ours-float             ``gptqlora.eval.generate.generate`` (greedy) on the float model: against hf-float it
                           measures the decoding loop alone.
    ours-4bit-lora         the same on the 4-bit model: every block linear round-to-nearest quantized (4-bit, group
                           size 64; the layer and kernel are those of a GPTQ model) with LoRA r=16 on q/k/v/o, its B
                           drawn from N(0, 0.01^2) so the adapter changes the output (``--lora-b-std 0`` keeps B = 0):
                           against ours-float it measures what the 4-bit layers (dequantizing every weight at every
                           step) and the LoRA branches cost.
    ours-4bit-lora-cached  the same with ``set_kernel(model, 'dense')``: each dense weight
                           is dequantized once and kept (its memory is reported as cache MiB), so the 4-bit memory
                           saving is traded for speed.

``--synthetic-blocks N`` replaces the model with a LLaMA of N decoder blocks of Llama-2-7B's shapes (hidden 4096, MLP
11008, 32 heads), random weights, and the embedded model's tokenizer and vocabulary (49,152): the per-step work of a
big model's blocks, where reading the weights, not Python, bounds decoding. Its text is noise; the rows still decode
the same number of steps (random weights rarely emit eos).

Same for every row: the first N GSM8K test questions as chat prompts
(``gptqlora.data.gsm8k.build_prompt(question, "chat", tokenizer)``), encoded without added special tokens (the chat
template writes its own), batched alike (our ``generate`` sorts prompts longest first and cuts batches in that order;
the HF row is given the same batches), the same token budget, the model's dtype (``--dtype``; no autocast), and a stop
at eos only: our loop's GSM8K stop rule (end after a finished ``#### <n>`` line) is off unless
``--stop-after-answer-line``, since ``model.generate`` has no such rule. Before the timed run each row decodes the
first batch for a few tokens (warmup; for the cached row this also fills the cache, so the timed run is its steady
state).

Tokens counted: generated tokens per sequence before eos (eos excluded). The HF row counts its output ids exactly;
our ``generate`` returns text, so our rows count the tokens of the returned text re-tokenized (without special
tokens). The parent checks that count where our text equals the HF row's text: ``retok_diff`` is the summed
difference of the counts on those prompts (0 when re-tokenizing reproduces the generated ids' count), and
``same_as_hf`` counts the prompts whose text equals hf-float's (greedy decoding of the same float model should give
the same text; the 4-bit rows differ by design).

Reported per row: generated tokens per second over the whole timed run (prefill included), its seconds, the tokens,
the decode steps (per batch, the longest sequence's tokens plus its eos step, at most the budget) and milliseconds per
decode step (which does not depend on how soon the other sequences stop), peak RSS over warmup + timed run (and on
CUDA the peak allocation), the peak of the setup before it (loading, quantizing), the block linears' weight bytes and,
for the cached row, the bytes of the dequantized-weight cache. As in ``bench_train.py``, the weights are copied out of
the checkpoint's memory map and the peak is reset after setup (``common.MemoryWindow``), and ``--threads`` keeps a
shared machine from slowing the runs erratically.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import common
from gptqlora.config import EvalConfig, LoRAConfig, QuantConfig

LORA, QUANT = LoRAConfig(), QuantConfig()  # the library's defaults: LoRA r=16, alpha=32; group size 64
ROWS = ("hf-float", "hf-float-fp32", "ours-float", "ours-4bit-lora", "ours-4bit-lora-cached")
LORA_TARGETS = common.LORA_TARGETS
QUICK = {"prompts": 2, "max_new_tokens": 16, "warmup_new_tokens": 2}

COLUMNS = (  # (key, header, format)
    ("dtype", "dtype", ""),
    ("tokens_per_s", "tokens/s", ".1f"),
    ("seconds", "seconds", ".2f"),
    ("tokens", "tokens", "d"),
    ("decode_steps", "decode steps", "d"),
    ("ms_per_step", "ms/decode step", ".1f"),
    *common.memory_columns("decode"),
    ("cache_mb", "cache MiB", ".1f"),
    ("same_as_hf", "same text as hf-float", ""),
    ("retok_diff", "retok diff", ""),
    ("kernels", "kernels", ""),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_common_args(parser, ROWS)
    parser.add_argument("--prompts", type=int, default=32, help="The first N GSM8K test questions.")
    parser.add_argument("--batch-size", type=int, default=EvalConfig().eval_batch_size, help="Prompts per batch.")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="Token budget per prompt.")
    parser.add_argument("--warmup-new-tokens", type=int, default=4,
                        help="Untimed warmup: the first batch decoded for this many tokens.")
    parser.add_argument("--r", type=int, default=LORA.r, help="LoRA rank (4-bit rows).")
    parser.add_argument("--alpha", type=float, default=LORA.alpha, help="LoRA alpha (4-bit rows).")
    parser.add_argument("--lora-b-std", type=float, default=0.01,
                        help="Std of the random LoRA B (seeded by --seed); 0 keeps B = 0 (the adapter adds nothing).")
    parser.add_argument("--group-size", type=int, default=QUANT.group_size, help="Group size of the 4-bit base.")
    parser.add_argument("--prompt-style", default="chat", choices=("plain", "chat"), help="GSM8K prompt format.")
    parser.add_argument("--synthetic-blocks", type=int, default=0,
                        help="Use a random LLaMA of this many Llama-2-7B-shaped blocks instead of --model (0: off).")
    parser.add_argument("--stop-after-answer-line", action="store_true",
                        help="Our rows also stop after a finished '#### <n>' line (the eval default; HF cannot).")
    return parser


# ---------------------------------------------------------------------------------------------- setup

def build_model(name: str, args: argparse.Namespace) -> tuple[nn.Module, object, dict]:
    """The row's model in eval mode, its tokenizer, and facts (quantize seconds, weight bytes)."""
    from gptqlora.workflows.base import weight_bytes
    from gptqlora.models import load_model

    dtype = "float32" if name.endswith("-fp32") else args.dtype
    if args.synthetic_blocks:
        model, tokenizer = synthetic_llama(args.synthetic_blocks, dtype, args.device, args.model)
    else:
        model, tokenizer = load_model(args.model, dtype, args.device, inference=True)
    facts: dict = {"quantize_s": None}
    if "4bit" in name:
        from gptqlora.lora.layer import inject_lora_layers, lora_modules
        from gptqlora.quant.driver import quantize_model_weights
        from gptqlora.quant.linear import set_kernel

        start = time.perf_counter()
        quantize_model_weights(model, None, QuantConfig(method="rtn", bits=4, group_size=args.group_size,
                                                        targets="all"), progress=False)
        facts["quantize_s"] = time.perf_counter() - start
        facts["linear_weight_mb"] = weight_bytes(model) / common.MiB
        inject_lora_layers(model, ",".join(LORA_TARGETS), r=args.r, alpha=args.alpha, dropout=0.0)
        g = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for m in lora_modules(model).values():  # B [out, r]: a non-zero adapter, so its branch does real work
                B = m.lora_B.weight
                B.copy_(torch.randn(B.shape, generator=g) * args.lora_b_std)
        if name.endswith("-cached"):
            set_kernel(model, "dense")
    else:
        facts["linear_weight_mb"] = weight_bytes(model) / common.MiB
    common.materialize(model)  # every row's weights held the same way (see common.materialize)
    return model.eval(), tokenizer, facts


def synthetic_llama(blocks: int, dtype: str, device: str, tokenizer_source: str) -> tuple[nn.Module, object]:
    """A random LLaMA with ``blocks`` Llama-2-7B-shaped decoder blocks and ``tokenizer_source``'s tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gptqlora.models import model_input_path, resolve_device, resolve_dtype

    tokenizer = AutoTokenizer.from_pretrained(model_input_path(tokenizer_source) or tokenizer_source)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         num_hidden_layers=blocks, vocab_size=len(tokenizer), max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device, inference=True)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch_dtype)  # seeded by setup_child: every row gets the same weights
    return model, tokenizer


def gsm8k_prompts(tokenizer, n: int, style: str, source: str | None) -> list[str]:
    from gptqlora.data.gsm8k import build_prompt, load_gsm8k

    entries = load_gsm8k("test", source)[:n]
    return [build_prompt(e["question"], style, tokenizer) for e in entries]


def batches_like_ours(tokenizer, prompts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Prompt indices per batch as our ``generate`` forms them: sorted by token length, longest first (stable)."""
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------------------------- decoding

def hf_generate(model: nn.Module, tokenizer, prompts: Sequence[str], batches: Sequence[Sequence[int]],
                max_new_tokens: int) -> list[list[int]]:
    """``model.generate(do_sample=False)`` batch by batch; the generated ids per prompt, cut before the first eos."""
    from gptqlora.eval.generate import eos_token_ids

    eos = eos_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    out: list[list[int]] = [[] for _ in prompts]
    for idx in batches:
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
        ids = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        for i, row in zip(idx, ids[:, enc["input_ids"].shape[1]:].tolist()):  # [B, new]
            out[i] = row[:next((j for j, t in enumerate(row) if t in eos), len(row))]
    return out


def decode_steps(counts: Sequence[int], batches: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    """Forward passes of the decoding loops: per batch, its longest sequence plus the step that drew its eos."""
    return sum(min(max(counts[i] for i in idx) + 1, max_new_tokens) for idx in batches)


def text_digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def run_one(name: str, args: argparse.Namespace) -> dict:
    """Warm up, then decode every prompt once with one row's model and decoder; its figures."""
    from gptqlora.eval.generate import generate
    from gptqlora.quant.linear import QuantizedLinear, kernels_used

    common.setup_child(args)
    model, tokenizer, facts = build_model(name, args)
    prompts = gsm8k_prompts(tokenizer, args.prompts, args.prompt_style, args.data)
    batches = batches_like_ours(tokenizer, prompts, args.batch_size)
    device = next(model.parameters()).device
    facts["model_mb"] = common.model_bytes(model) / common.MiB

    if name.startswith("hf"):
        def decode(texts: Sequence[str], max_new: int) -> tuple[list[str], list[int] | None]:
            ids = hf_generate(model, tokenizer, texts, batches_like_ours(tokenizer, texts, args.batch_size), max_new)
            return [tokenizer.decode(x, skip_special_tokens=True) for x in ids], [len(x) for x in ids]
    else:
        def decode(texts: Sequence[str], max_new: int) -> tuple[list[str], list[int] | None]:
            out = generate(model, tokenizer, list(texts), max_new_tokens=max_new, batch_size=args.batch_size,
                           stop_after_answer_line=args.stop_after_answer_line)
            return out, None  # counted after the timer, by re-tokenizing

    window = common.MemoryWindow(device)
    decode([prompts[i] for i in batches[0]], args.warmup_new_tokens)
    common.sync(device)
    start = time.perf_counter()
    texts, counts = decode(prompts, args.max_new_tokens)
    common.sync(device)
    seconds = time.perf_counter() - start
    memory = window.report()
    if counts is None:
        counts = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    steps = decode_steps(counts, batches, args.max_new_tokens)
    cache = [m._cache for m in model.modules() if isinstance(m, QuantizedLinear) and m._cache is not None]
    return {"config": name, "seconds": seconds, "tokens": sum(counts), "tokens_per_s": sum(counts) / seconds,
            "decode_steps": steps, "ms_per_step": 1e3 * seconds / steps, "prompts": len(prompts),
            "counts": counts, "counted_by": "ids" if name.startswith("hf") else "re-tokenized text",
            "text_sha1": [text_digest(t) for t in texts],
            "cache_mb": common.tensor_bytes(cache) / common.MiB if "4bit" in name else None,
            **facts, **memory, "device": str(device), "dtype": str(next(model.parameters()).dtype),
            "kernels": kernels_used(model) or None, "threads": torch.get_num_threads()}


def compare_with_hf(results: dict[str, dict]) -> None:
    """Add ``same_as_hf`` (prompts whose text equals hf-float's) and ``retok_diff`` (count check) to our rows."""
    hf = results.get("hf-float")
    if hf is None or "error" in hf:
        return
    for name, r in results.items():
        if name == "hf-float" or "error" in r:
            continue
        same = [i for i, (a, b) in enumerate(zip(r["text_sha1"], hf["text_sha1"])) if a == b]
        r["same_as_hf"] = f"{len(same)}/{len(hf['text_sha1'])}"
        r["retok_diff"] = sum(abs(r["counts"][i] - hf["counts"][i]) for i in same)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = common.parse_args(build_parser(), QUICK, argv)
    if args.one is not None:
        common.emit_json(run_one(args.one, args))
        return 0
    names = common.config_names(args, ROWS)
    load_before, started = common.load_average(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results = common.run_children(Path(__file__), names, argv)
    load_after = common.load_average()
    compare_with_hf(results)
    print(f"## Greedy decoding: {args.prompts} GSM8K test prompts ({args.prompt_style}), batches of {args.batch_size}, "
          f"up to {args.max_new_tokens} new tokens, stop at eos"
          f"{' or after the answer line (ours)' if args.stop_after_answer_line else ''}; started {started}, "
          f"load average before {load_before}, after {load_after}\n")
    print(common.markdown_table(results, COLUMNS))
    print()
    settings = {k: v for k, v in vars(args).items() if k != "one"}
    return common.finish(results, {"benchmark": "generate", "settings": settings, "started": started,
                                   "load_before": load_before, "load_after": load_after,
                                   "environment": common.environment(), "results": results})


if __name__ == "__main__":
    raise SystemExit(main())
