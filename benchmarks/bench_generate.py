"""Greedy decoding speed: our batched loop on the 4-bit + LoRA model, against transformers' generate on the float one,
llama.cpp on the GGUF it came from, and vLLM serving either.

    python benchmarks/bench_generate.py            # 32 GSM8K test prompts, batches of 8, 128 new tokens, every row
    python benchmarks/bench_generate.py --quick    # smoke run (2 prompts x 16 new tokens)
    python benchmarks/bench_generate.py --rows hf-float,ours-float,vllm-float --threads 2   # some rows
    python benchmarks/bench_generate.py --interleave --rows hf-float,ours-4bit-lora-compiled   # ratios, one process

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
    ours-float-compiled, ours-4bit-lora-compiled
                           ours-float and ours-4bit-lora decoding with the compiled step over a static KV cache
                           (``generate(compiled=True)``, ``gptqlora.eval.decode``): the warmup compiles the first
                           batch's shape; a shape first met in the timed run compiles there, and those seconds are
                           taken out of the timed run and reported as ``compile_s`` (all compiling in the child).
    ours-float-lora        ours-float with the adapter of ours-4bit-lora (the same r, alpha, targets and seeded B) on
                           the float model: the yardstick of vllm-float-lora.
    llamacpp               llama-cpp-python (``Llama.generate``, greedy) on the GGUF the embedded model ships (its
                           block linears Q4_1, its embedding and tied head Q8_0; our float model is these weights
                           dequantized), or ``--gguf``: what users run on a CPU. Batch 1 only (see below).
    vllm-float             the float model served by vLLM (``gptqlora.eval.vllm``: its OpenAI-compatible server,
                           started from the vLLM environment ``make vllm-env`` builds) in the float rows' dtype.
    vllm-float-lora        the same, with ours-float-lora's adapter saved as a PEFT adapter
                           (``gptqlora.lora.adapter.save_adapter``) and served as the server's LoRA module.
    vllm-4bit              ours-4bit-lora's 4-bit base saved as a GPTQ checkpoint (``save_quantized``) and served in
                           bfloat16 (vLLM's GPTQ layers refuse float32; ``--dtype float16`` serves it in float16).
    vllm-4bit-lora         the same with ours-4bit-lora's adapter as the LoRA module.

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

The llamacpp row is optional: where ``llama_cpp`` is not importable (``pip install llama-cpp-python``), there is no
GGUF (``--model`` not an embedded alias and no ``--gguf``; ``--synthetic-blocks``), or ``--batch-size`` is not 1
(llama-cpp-python's ``Llama`` holds one sequence; batching needs llama.cpp's low-level batch API), it is reported as
skipped with the reason. It loads the GGUF with ``n_threads = n_threads_batch = --threads`` (torch's count without it),
a context of the longest prompt plus the budget, ``n_batch=512`` and ``use_mmap=False`` (the weights read into memory
of its own, as ``common.materialize`` holds the other rows'), and is given our tokenizer's ids of the same prompts
(``same_prompt_ids``: the prompts whose ids llama.cpp's own tokenizer reproduces). Each prompt starts from an empty KV
cache (``Llama.generate`` would otherwise reuse the previous prompt's common prefix, the chat template's system
prompt, and skip a prefill the other rows compute); tokens are drawn by llama.cpp's greedy sampler (``temp=0``, no
repeat penalty) until one of our eos ids or the budget, counted as ids, and their text decoded by our tokenizer for
``same_as_hf``. Its weights are quantized, and llama.cpp quantizes the activations of a Q4_1 matmul to 8 bits, so its
text may differ from hf-float's. Memory and timing are measured as for the other rows (the process also holds torch
and our tokenizer, as theirs do); ``linear_weight_mb`` counts the GGUF's block linears as stored.

The vLLM rows are optional: where the vLLM environment is missing, or vLLM cannot serve the row's model on this machine
(``gptqlora.eval.vllm.check_servable``: its CPU build runs GPTQ only on an AVX-512 CPU, say), the row is reported as
skipped with the one-line reason, checked before anything is quantized, and the other rows run. Each starts a server of
its own in its child (launch to a healthy ``/health`` is ``server_startup_s``, not in the timed run; on a CPU it
includes compiling the float model with inductor, while with LoRA enabled vLLM runs eagerly) and sends the same prompts
as token ids (the server does not re-tokenize them), greedy, with the same budget, the eos ids as ``stop_token_ids`` and
no other stop (``--stop-after-answer-line`` adds ours). Batches are ours: a batch's requests are sent at once, one
thread each (the server batches them), and the batch is waited for before the next, so ``--batch-size 1`` sends one
request at a time and 16 sends 16 together (``batch_s``: each batch's seconds). The warmup (a batch decoded for a few
tokens, untimed; ``warmup_s``) takes vLLM's first-request costs out of the timed run; its prompts are the questions
after the timed ones, since vLLM's prefix cache (on, as served) would skip the prefill of a prompt it has seen (a prefix
shared with earlier prompts, such as the chat template's, may still be reused from it, as in serving). Tokens are
counted as in our rows (the text re-tokenized); decode steps and ms per step use the same formula, as if a batch's
requests joined the server's running batch at the same step (their HTTP requests arrive within milliseconds).
``same_as_ours`` counts the prompts whose text equals the ``ours-`` row's of the same model.

``--threads N`` gives the server's worker N unbound OpenMP threads (``VLLM_CPU_OMP_THREADS_BIND=nobind`` and
``OMP_NUM_THREADS=N``: what ``torch.set_num_threads(N)`` gives our rows); without it vLLM binds its own (``auto``: a
core per physical core, less one kept for its scheduler). A CPU server's KV cache is ``--vllm-kv-cache-gib``. Memory:
the server's processes (API server, engine core, worker) are not the child, so a vLLM row's ``peak_rss_mb`` is the peak
of their summed VmRSS (``/proc/PID/status`` of the server and every descendant, sampled every 0.1 s over warmup + timed
run; a page two of them map counts twice) and ``setup_peak_rss_mb`` the sum of each one's own peak (VmHWM) when the
server is ready (an upper bound of its startup's peak); ``end_pss_mb`` is their summed PSS after the timed run
(``/proc/PID/smaps_rollup``: a shared page split between its processes, so counted once), and ``server_cpu_s`` their CPU
time over the timed run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import common
from gptqlora.config import EvalConfig, LoRAConfig, QuantConfig

LORA, QUANT = LoRAConfig(), QuantConfig()  # the library's defaults: LoRA r=16, alpha=32; group size 64
VLLM_ROWS = ("vllm-float", "vllm-float-lora", "vllm-4bit", "vllm-4bit-lora")
ROWS = ("hf-float", "hf-float-fp32", "ours-float", "ours-4bit-lora", "ours-4bit-lora-cached", "ours-float-lora",
        "ours-float-compiled", "ours-4bit-lora-compiled", "llamacpp", *VLLM_ROWS)
# The block linears of a llama.cpp LLaMA GGUF (its names for q/k/v/o and the MLP's gate/up/down).
GGUF_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
LORA_TARGETS = common.LORA_TARGETS
QUICK = {"prompts": 2, "max_new_tokens": 16, "warmup_new_tokens": 2}
# Rows that decode in another engine or process: not in --interleave.
SEPARATE_ROWS = ("llamacpp", *VLLM_ROWS)
INTERLEAVED_COLUMNS = (
    ("tokens_per_s", "tokens/s", ".1f"),
    ("ms_per_step", "ms/decode step", ".1f"),
    ("ratio_median", "ms/step / first row's (median over batches)", ".3f"),
    ("compile_s", "compile s", ".1f"),
)

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
    ("same_as_ours", "same text as ours", ""),
    ("server_startup_s", "server startup s", ".1f"),
    ("compile_s", "compile s", ".1f"),
    ("retok_diff", "retok diff", ""),
    ("same_prompt_ids", "llama.cpp tokenizer = ours", ""),
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
    parser.add_argument("--r", type=int, default=LORA.r, help="LoRA rank (-lora rows).")
    parser.add_argument("--alpha", type=float, default=LORA.alpha, help="LoRA alpha (-lora rows).")
    parser.add_argument("--lora-b-std", type=float, default=0.01,
                        help="Std of the random LoRA B (seeded by --seed); 0 keeps B = 0 (the adapter adds nothing).")
    parser.add_argument("--group-size", type=int, default=QUANT.group_size, help="Group size of the 4-bit base.")
    parser.add_argument("--prompt-style", default="chat", choices=("plain", "chat"), help="GSM8K prompt format.")
    parser.add_argument("--synthetic-blocks", type=int, default=0,
                        help="Use a random LLaMA of this many Llama-2-7B-shaped blocks instead of --model (0: off).")
    parser.add_argument("--stop-after-answer-line", action="store_true",
                        help="Our rows also stop after a finished '#### <n>' line (the eval default; HF cannot).")
    parser.add_argument("--gguf", default=None,
                        help="GGUF file of the llamacpp row (default: the embedded model's, whose weights dequantized "
                             "are the float rows' model).")
    parser.add_argument("--interleave", action="store_true",
                        help="Build the rows in this one process and alternate them batch by batch on the same "
                             "prompts (the order reversed every other batch), so a busy or erratic machine slows all "
                             "alike: each row's ms per step and the median of its per-batch ratio to the first "
                             "row's (no memory figures; not the llama.cpp or vLLM rows).")
    parser.add_argument("--vllm-kv-cache-gib", type=int, default=1,
                        help="KV cache of a vLLM server on a CPU (VLLM_CPU_KVCACHE_SPACE, GiB).")
    return parser


# ---------------------------------------------------------------------------------------------- setup

def rtn_config(args: argparse.Namespace) -> QuantConfig:
    """The 4-bit rows' quantization: every block linear round-to-nearest, 4-bit, ``--group-size``."""
    return QuantConfig(method="rtn", bits=4, group_size=args.group_size, targets="all")


def base_model(name: str, args: argparse.Namespace) -> tuple[nn.Module, object, dict]:
    """The row's model before any adapter (float, or quantized for a ``4bit`` row), its tokenizer, and facts
    (quantize seconds, the block linears' weight bytes)."""
    from gptqlora.workflows.base import weight_bytes
    from gptqlora.models import load_model

    dtype = "float32" if name.endswith("-fp32") else args.dtype
    if args.synthetic_blocks:
        model, tokenizer = synthetic_llama(args.synthetic_blocks, dtype, args.device, args.model)
    else:
        model, tokenizer = load_model(args.model, dtype, args.device, inference=True)
    facts: dict = {"quantize_s": None}
    if "4bit" in name:
        from gptqlora.quant.driver import quantize_model_weights

        start = time.perf_counter()
        quantize_model_weights(model, None, rtn_config(args), progress=False)
        facts["quantize_s"] = time.perf_counter() - start
    facts["linear_weight_mb"] = weight_bytes(model) / common.MiB
    return model, tokenizer, facts


def add_lora(model: nn.Module, args: argparse.Namespace) -> None:
    """LoRA on q/k/v/o (``--r``, ``--alpha``), its B drawn from N(0, ``--lora-b-std``^2) seeded by ``--seed``, so the
    adapter changes the output (B = 0 with ``--lora-b-std 0``)."""
    from gptqlora.lora.layer import inject_lora_layers, lora_modules

    inject_lora_layers(model, ",".join(LORA_TARGETS), r=args.r, alpha=args.alpha, dropout=0.0)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for m in lora_modules(model).values():  # B [out, r]: a non-zero adapter, so its branch does real work
            B = m.lora_B.weight
            B.copy_(torch.randn(B.shape, generator=g) * args.lora_b_std)


def build_model(name: str, args: argparse.Namespace) -> tuple[nn.Module, object, dict]:
    """The row's model in eval mode, its tokenizer, and facts (``base_model``'s)."""
    from gptqlora.quant.linear import set_kernel

    model, tokenizer, facts = base_model(name, args)
    if "lora" in name:
        add_lora(model, args)
    if name.endswith("-cached"):
        set_kernel(model, "dense")
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


def row_decoder(name: str, model: nn.Module, tokenizer, args: argparse.Namespace):
    """The row's ``decode(texts, max_new) -> (texts, token counts or None)``: transformers' generate for ``hf``
    rows, else our loop (compiled for ``-compiled`` rows); None counts are counted after the timer, by re-tokenizing."""
    from gptqlora.eval.generate import generate

    if name.startswith("hf"):
        def decode(texts: Sequence[str], max_new: int) -> tuple[list[str], list[int] | None]:
            ids = hf_generate(model, tokenizer, texts, batches_like_ours(tokenizer, texts, args.batch_size), max_new)
            return [tokenizer.decode(x, skip_special_tokens=True) for x in ids], [len(x) for x in ids]
    else:
        def decode(texts: Sequence[str], max_new: int) -> tuple[list[str], list[int] | None]:
            out = generate(model, tokenizer, list(texts), max_new_tokens=max_new, batch_size=args.batch_size,
                           stop_after_answer_line=args.stop_after_answer_line, compiled=name.endswith("-compiled"))
            return out, None
    return decode


def run_interleaved(names: list[str], args: argparse.Namespace) -> dict:
    """Every row in this process, alternating batch by batch on the same prompts; per row its tokens/s and ms per
    decode step over all batches, and the median over batches of its ms per step against the first row's."""
    from gptqlora.eval.decode import COMPILE_STATS

    common.setup_child(args)
    rows, prompts, batches = {}, None, None
    for name in names:
        model, tokenizer, _ = build_model(name, args)
        if prompts is None:
            prompts = gsm8k_prompts(tokenizer, args.prompts, args.prompt_style, args.data)
            batches = batches_like_ours(tokenizer, prompts, args.batch_size)
        decode = row_decoder(name, model, tokenizer, args)
        compile_before = COMPILE_STATS.total_s
        decode([prompts[i] for i in batches[0]], args.warmup_new_tokens)  # compiles a compiled row's first shape
        rows[name] = {"decode": decode, "tokenizer": tokenizer, "compile_s": COMPILE_STATS.total_s - compile_before,
                      "seconds": [], "tokens": [], "steps": []}
    for b, idx in enumerate(batches):
        texts = [prompts[i] for i in idx]
        for name in (names if b % 2 == 0 else names[::-1]):
            row = rows[name]
            compile_before = COMPILE_STATS.total_s
            start = time.perf_counter()
            out, counts = row["decode"](texts, args.max_new_tokens)
            seconds = time.perf_counter() - start - (COMPILE_STATS.total_s - compile_before)
            row["compile_s"] += COMPILE_STATS.total_s - compile_before
            if counts is None:
                counts = [len(row["tokenizer"](t, add_special_tokens=False)["input_ids"]) for t in out]
            row["seconds"].append(seconds)
            row["tokens"].append(sum(counts))
            row["steps"].append(decode_steps(counts, [range(len(texts))], args.max_new_tokens))
    per_step = {n: [s / k for s, k in zip(r["seconds"], r["steps"])] for n, r in rows.items()}
    return {name: {"config": name, "tokens_per_s": sum(r["tokens"]) / sum(r["seconds"]),
                   "ms_per_step": 1e3 * sum(r["seconds"]) / sum(r["steps"]),
                   "ratio_median": statistics.median(a / b for a, b in zip(per_step[name], per_step[names[0]])),
                   "seconds": sum(r["seconds"]), "tokens": sum(r["tokens"]), "decode_steps": sum(r["steps"]),
                   "batch_seconds": r["seconds"], "compile_s": r["compile_s"] if name.endswith("-compiled") else None}
            for name, r in rows.items()}


def run_one(name: str, args: argparse.Namespace) -> dict:
    """Warm up, then decode every prompt once with one row's model and decoder; its figures."""
    from gptqlora.eval.decode import COMPILE_STATS
    from gptqlora.quant.linear import QuantizedLinear, kernels_used

    common.setup_child(args)
    if name in VLLM_ROWS:
        return run_vllm(name, args)
    if name == "llamacpp":
        return run_llamacpp(name, args)
    model, tokenizer, facts = build_model(name, args)
    prompts = gsm8k_prompts(tokenizer, args.prompts, args.prompt_style, args.data)
    batches = batches_like_ours(tokenizer, prompts, args.batch_size)
    device = next(model.parameters()).device
    facts["model_mb"] = common.model_bytes(model) / common.MiB
    compiled = name.endswith("-compiled")
    decode = row_decoder(name, model, tokenizer, args)

    window = common.MemoryWindow(device)
    decode([prompts[i] for i in batches[0]], args.warmup_new_tokens)
    common.sync(device)
    compile_before = COMPILE_STATS.total_s
    start = time.perf_counter()
    texts, counts = decode(prompts, args.max_new_tokens)
    common.sync(device)
    seconds = time.perf_counter() - start - (COMPILE_STATS.total_s - compile_before)  # compiling reported apart
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
            "kernels": kernels_used(model) or None, "threads": torch.get_num_threads(),
            "compile_s": COMPILE_STATS.total_s if compiled else None}


# ---------------------------------------------------------------------------------------------- llama.cpp row

def llamacpp_gguf(args: argparse.Namespace) -> Path:
    """The GGUF the llamacpp row runs: ``--gguf``, else the embedded model's (the file its float checkpoint was
    dequantized from, so llama.cpp runs the float rows' weights as they were quantized).

    Raises:
        UsageError: no GGUF for ``--model`` (a synthetic model, or a model that is not an embedded alias and no
            ``--gguf``), or the file is missing.
    """
    from gptqlora.errors import UsageError
    from gptqlora.models import EMBEDDED, embedded_gguf_path

    if args.gguf is not None:
        path = Path(args.gguf).expanduser()
        if not path.is_file():
            raise UsageError(f"--gguf {args.gguf}: no such file")
        return path
    if args.synthetic_blocks or args.model not in EMBEDDED:
        raise UsageError(f"no GGUF of {'the synthetic model' if args.synthetic_blocks else args.model}: "
                         f"pass --gguf PATH")
    return embedded_gguf_path(args.model)  # UsageError / InputNotFoundError where the package or its file is missing


def gguf_facts(path: Path) -> dict:
    """What the GGUF holds: its block linears' quantization types and bytes (``linear_weight_mb``, as our rows'
    ``weight_bytes``) and the file's size (``model_mb``)."""
    from gguf import GGUFReader

    linears = [t for t in GGUFReader(path).tensors
               if t.name.startswith("blk.") and t.name.split(".")[-2] in GGUF_LINEARS]  # blk.N.<linear>.weight
    types = sorted({t.tensor_type.name for t in linears})
    return {"dtype": f"GGUF {'+'.join(types)}", "linear_weight_mb": sum(int(t.n_bytes) for t in linears) / common.MiB,
            "model_mb": path.stat().st_size / common.MiB}


def llamacpp_generate(llm, prompt_ids: Sequence[int], eos: set[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding of one prompt's token ids with llama-cpp-python's ``Llama.generate``, from an empty KV cache.

    Returns:
        The generated ids, cut before the first eos; at most ``max_new_tokens``, clamped to the context as ours.
    """
    # An empty cache: generate() would otherwise keep the previous prompt's longest common prefix (the chat
    # template's system prompt) and skip its prefill, which the other rows all compute.
    llm.reset()
    budget = min(max_new_tokens, llm.n_ctx() - len(prompt_ids))
    out: list[int] = []
    if budget <= 0:  # the prompt fills the context: no tokens, as ours
        return out
    # temp 0 is llama.cpp's greedy sampler (argmax); repeat_penalty 1 leaves the logits as they are
    for token in llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        if token in eos:
            break
        out.append(token)
        if len(out) == budget:  # stop before generate() evaluates a token nobody reads
            break
    return out


def run_llamacpp(name: str, args: argparse.Namespace) -> dict:
    """The llamacpp row: llama-cpp-python on the GGUF, the same prompts as token ids, greedy, one at a time; its
    figures, or ``{"skipped": why}`` where llama_cpp is not importable, there is no GGUF or the batch is not 1."""
    from transformers import AutoTokenizer, GenerationConfig

    from gptqlora.errors import InputNotFoundError, UsageError
    from gptqlora.eval.generate import eos_token_ids
    from gptqlora.models import local_model_dir

    try:
        if args.batch_size != 1:  # Llama keeps one sequence; batching needs the low-level llama_batch API
            raise UsageError(f"llama-cpp-python's Llama decodes one sequence at a time: batch 1 only, not "
                             f"--batch-size {args.batch_size}")
        try:
            import llama_cpp
        except ImportError as e:
            raise UsageError(f"llama_cpp is not importable ({e}): pip install llama-cpp-python") from e
        gguf = llamacpp_gguf(args)
    except (UsageError, InputNotFoundError) as e:
        reason = str(e).splitlines()[0]
        print(f"[bench] {name}: skipped: {reason}", file=sys.stderr, flush=True)
        return {"config": name, "skipped": reason}

    source = local_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)  # ours: the prompts and their ids are the other rows'
    eos = eos_token_ids(None, tokenizer, GenerationConfig.from_pretrained(source))
    prompts = gsm8k_prompts(tokenizer, args.prompts, args.prompt_style, args.data)
    batches = batches_like_ours(tokenizer, prompts, 1)  # our order, longest first
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    threads = args.threads or torch.get_num_threads()  # torch's choice in the other rows, so the same count
    start = time.perf_counter()
    # use_mmap=False reads the weights into memory of their own, as common.materialize holds every other row's
    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads,
                          n_ctx=max(map(len, prompt_ids)) + args.max_new_tokens, n_batch=512, use_mmap=False,
                          seed=args.seed, verbose=False)
    facts = {"load_s": time.perf_counter() - start, **gguf_facts(gguf)}
    same_ids = sum(llm.tokenize(p.encode(), add_bos=False, special=True) == ids for p, ids in zip(prompts, prompt_ids))

    def decode(order: Sequence[int], max_new: int) -> list[list[int]]:
        return [llamacpp_generate(llm, prompt_ids[i], eos, max_new) for i in order]

    order = [i for idx in batches for i in idx]
    window = common.MemoryWindow(torch.device("cpu"))
    decode(batches[0], args.warmup_new_tokens)
    start = time.perf_counter()
    generated = dict(zip(order, decode(order, args.max_new_tokens)))
    seconds = time.perf_counter() - start
    memory = window.report()
    out = [generated[i] for i in range(len(prompts))]
    counts = [len(x) for x in out]
    steps = decode_steps(counts, batches, args.max_new_tokens)
    return {"config": name, "seconds": seconds, "tokens": sum(counts), "tokens_per_s": sum(counts) / seconds,
            "decode_steps": steps, "ms_per_step": 1e3 * seconds / steps, "prompts": len(prompts),
            "counts": counts, "counted_by": "ids",
            "text_sha1": [text_digest(tokenizer.decode(x, skip_special_tokens=True)) for x in out],
            "same_prompt_ids": f"{same_ids}/{len(prompts)}", **facts, **memory, "device": "cpu",
            "engine": f"llama-cpp-python {llama_cpp.__version__}", "gguf": str(gguf), "threads": threads}


# ---------------------------------------------------------------------------------------------- vLLM rows

def serve_plan(name: str, args: argparse.Namespace, device: str, tmp: Path):
    """What a vLLM row's server loads (``gptqlora.eval.vllm.ServePlan``): the float model's directory, or the base
    and adapter of our rows saved under ``tmp``; checked before anything is quantized.

    Returns:
        (plan, facts): ``base_model``'s facts where a model was built here, else {}.
    Raises:
        UsageError: what vLLM cannot serve on this machine, in one line (``check_servable``).
    """
    from gptqlora.eval.vllm import GPTQ_DTYPES, check_servable
    from gptqlora.files import read_json_object
    from gptqlora.lora.adapter import save_adapter
    from gptqlora.models import local_model_dir, resolve_dtype
    from gptqlora.quant.checkpoint import save_quantized

    source = None if args.synthetic_blocks else local_model_dir(args.model)  # None: a hub id, or none on disk yet
    dtype = str(resolve_dtype(args.dtype, device, inference=True)).removeprefix("torch.")  # the float rows'
    if "4bit" in name:
        dtype = dtype if dtype in GPTQ_DTYPES else "bfloat16"
        config = read_json_object(source / "config.json") if source is not None else {}
        q = rtn_config(args)
        check_servable(f"the 4-bit base of {args.model}", config | {"quantization_config": {
            "bits": q.bits, "sym": q.sym, "group_size": q.group_size}}, None, device, dtype)
    facts, adapter = {}, None
    if "4bit" in name or "lora" in name or args.synthetic_blocks:
        model, tokenizer, facts = base_model(name, args)
        if "4bit" in name:
            source = save_quantized(model, tokenizer, tmp / "base", rtn_config(args))
        elif args.synthetic_blocks:
            model.save_pretrained(tmp / "base")
            tokenizer.save_pretrained(tmp / "base")
            source = tmp / "base"
        if "lora" in name:
            add_lora(model, args)
            adapter = str(save_adapter(model, tmp / "adapter", str(source or args.model)))
        del model
    config = read_json_object(source / "config.json") if source is not None else None
    return check_servable(str(source or args.model), config, adapter, device, dtype), facts


def server_env(args: argparse.Namespace) -> dict[str, str]:
    """What the server's environment gets: ``--threads N`` as N unbound OpenMP threads in its worker (what
    ``torch.set_num_threads(N)`` gives our rows; vLLM's CPU worker reads ``VLLM_CPU_OMP_THREADS_BIND``, and with
    ``nobind`` leaves torch at ``OMP_NUM_THREADS``), and a CPU server's KV cache in GiB."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_cache_gib)}
    if args.threads:
        env |= {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(args.threads)}
    return env


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant alive, from each process's parent in ``/proc/PID/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state, ppid
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        tree.append(pid := todo.pop())
        todo += children.get(pid, [])
    return tree


def memory_mb(pids: Sequence[int], field: str, file: str = "status") -> float:
    """A memory field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``) or ``smaps_rollup`` (``Pss``), KiB there,
    summed over ``pids``, in MiB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/{file}") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith(field + ":")), 0)
        except OSError:  # gone meanwhile
            pass
    return total / 1024


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of ``root``'s tree (the processes alive now), from ``/proc/PID/stat``."""
    ticks = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ticks += sum(int(v) for v in f.read().rsplit(")", 1)[1].split()[11:13])  # utime, stime
        except (OSError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


class TreeRSSPeak:
    """The peak of a process tree's summed VmRSS, sampled every ``interval`` seconds in a thread while entered.

    The tree is read once on entering (a ready vLLM server starts no more processes): reading every process's
    parent at each sample would cost the client ~10 ms of CPU per sample on a busy machine.
    """

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root, self.interval, self.peak_mb, self.pids = root, interval, 0.0, [root]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, memory_mb(self.pids, "VmRSS"))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> TreeRSSPeak:
        self.pids = process_tree(self.root)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, memory_mb(process_tree(self.root), "VmRSS"))


def run_vllm(name: str, args: argparse.Namespace) -> dict:
    """A vLLM row: its server started, warmed up, then every prompt decoded batch by batch; its figures, or
    ``{"skipped": why}`` where there is no vLLM environment or vLLM cannot serve the row here."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoTokenizer, GenerationConfig

    from gptqlora.errors import UsageError
    from gptqlora.eval.generate import eos_token_ids
    from gptqlora.eval.vllm import ADAPTER_NAME, BASE_NAME, VLLMClient, VLLMServer, vllm_python
    from gptqlora.models import local_model_dir, resolve_device

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        try:
            python = vllm_python(None)
            plan, facts = serve_plan(name, args, device, Path(tmp))
        except UsageError as e:
            reason = str(e).splitlines()[0]
            print(f"[bench] {name}: skipped: {reason}", file=sys.stderr, flush=True)
            return {"config": name, "skipped": reason}
        tokenizer = AutoTokenizer.from_pretrained(plan.model)
        try:  # the float model's generation config, as our rows' model.generation_config
            generation = None if args.synthetic_blocks else GenerationConfig.from_pretrained(
                str(local_model_dir(args.model) or args.model))
        except OSError:  # no generation_config.json
            generation = None
        eos = sorted(eos_token_ids(None, tokenizer, generation))
        # the timed prompts, then a batch more for the warmup (vLLM's prefix cache would skip a warmed prompt's prefill)
        n = args.prompts
        prompts = gsm8k_prompts(tokenizer, n + min(n, args.batch_size), args.prompt_style, args.data)
        batches, warmup = batches_like_ours(tokenizer, prompts[:n], args.batch_size), [list(range(n, len(prompts)))]
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        env = server_env(args)
        os.environ.update(env)  # VLLMServer hands this process's environment to the server

        start = time.perf_counter()
        with VLLMServer(python, plan, device=device, seed=args.seed) as server, \
                ThreadPoolExecutor(max_workers=args.batch_size) as pool:
            startup_s = time.perf_counter() - start
            setup_peak_mb = memory_mb(process_tree(server.proc.pid), "VmHWM")
            client = VLLMClient(server.url)
            served = ADAPTER_NAME if plan.adapter else BASE_NAME

            def one(i: int, max_new: int) -> str:
                room = plan.max_model_len - len(prompt_ids[i]) if plan.max_model_len else max_new
                budget = min(max_new, room)  # clamped to the context, as ours
                if budget <= 0:  # the prompt fills the context: no tokens, as ours
                    return ""
                return client.complete(served, prompt_ids[i], max_tokens=budget, temperature=0.0, stop_token_ids=eos,
                                       stop_after_answer_line=args.stop_after_answer_line)

            def decode(batch_list: Sequence[Sequence[int]], max_new: int) -> tuple[list[str], list[float]]:
                texts, batch_s = [""] * len(prompts), []
                for idx in batch_list:  # a batch's requests at once, then wait for all of them
                    start = time.perf_counter()
                    for i, text in zip(idx, list(pool.map(lambda i: one(i, max_new), idx))):
                        texts[i] = text
                    batch_s.append(time.perf_counter() - start)
                return texts, batch_s

            with TreeRSSPeak(server.proc.pid) as rss:
                warmup_start = time.perf_counter()
                decode(warmup, args.warmup_new_tokens)
                warmup_s = time.perf_counter() - warmup_start
                cpu_before = tree_cpu_s(server.proc.pid)
                start = time.perf_counter()
                texts, batch_s = decode(batches, args.max_new_tokens)
                seconds = time.perf_counter() - start
                server_cpu_s = tree_cpu_s(server.proc.pid) - cpu_before
            pss_mb = memory_mb(process_tree(server.proc.pid), "Pss", "smaps_rollup")
            version = client.version()
    texts = texts[:n]
    counts = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    steps = decode_steps(counts, batches, args.max_new_tokens)
    return {"config": name, "seconds": seconds, "tokens": sum(counts), "tokens_per_s": sum(counts) / seconds,
            "decode_steps": steps, "ms_per_step": 1e3 * seconds / steps, "prompts": n, "counts": counts,
            "counted_by": "re-tokenized text", "text_sha1": [text_digest(t) for t in texts],
            "batch_s": batch_s, "server_startup_s": startup_s, "warmup_s": warmup_s, "server_cpu_s": server_cpu_s,
            "peak_rss_mb": rss.peak_mb, "setup_peak_rss_mb": setup_peak_mb, "end_pss_mb": pss_mb,
            "rss_of": "vLLM server tree: summed VmRSS sampled every 0.1 s; setup: summed VmHWM when ready",
            **facts, "linear_weight_mb": None, "device": device, "dtype": plan.dtype, "engine": f"vllm {version}",
            "served": plan.model, "adapter": plan.adapter is not None, "server_env": env, "threads": args.threads}


def compare_texts(results: dict[str, dict]) -> None:
    """Add ``same_as_hf`` (prompts whose text equals hf-float's) and ``retok_diff`` (count check) to the other rows,
    and to a vLLM or compiled row ``same_as_ours`` (prompts whose text equals our eager row's of the same model)."""
    def same(a: dict, b: dict) -> list[int]:
        return [i for i, (x, y) in enumerate(zip(a["text_sha1"], b["text_sha1"])) if x == y]

    ran = {name: r for name, r in results.items() if "text_sha1" in r}  # neither failed nor skipped
    hf = ran.get("hf-float")
    for name, r in ran.items():
        if hf is not None and name != "hf-float":
            idx = same(r, hf)
            r["same_as_hf"] = f"{len(idx)}/{len(hf['text_sha1'])}"
            r["retok_diff"] = sum(abs(r["counts"][i] - hf["counts"][i]) for i in idx)
        eager = ("ours-" + name.removeprefix("vllm-") if name.startswith("vllm-")
                 else name.removesuffix("-compiled") if name.endswith("-compiled") else None)
        if eager is not None and (ours := ran.get(eager)) is not None:
            r["same_as_ours"] = f"{len(same(r, ours))}/{len(ours['text_sha1'])}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = common.parse_args(build_parser(), QUICK, argv)
    if args.one is not None:
        common.emit_json(run_one(args.one, args))
        return 0
    names = common.config_names(args, ROWS)
    separate = [n for n in names if n in SEPARATE_ROWS]
    if args.interleave and separate:
        raise SystemExit(f"--interleave: {', '.join(separate)} decode in another engine; leave them out")
    load_before, started = common.load_average(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if args.interleave:
        results, columns = run_interleaved(names, args), INTERLEAVED_COLUMNS
    else:
        results, columns = common.run_children(Path(__file__), names, argv), COLUMNS
        compare_texts(results)
    load_after = common.load_average()
    print(f"## Greedy decoding: {args.prompts} GSM8K test prompts ({args.prompt_style}), batches of {args.batch_size}, "
          f"up to {args.max_new_tokens} new tokens, stop at eos"
          f"{' or after the answer line (ours)' if args.stop_after_answer_line else ''}; started {started}, "
          f"load average before {load_before}, after {load_after}"
          f"{'; rows interleaved batch by batch in one process' if args.interleave else ''}\n")
    print(common.markdown_table(results, columns))
    print()
    settings = {k: v for k, v in vars(args).items() if k != "one"}
    return common.finish(results, {"benchmark": "generate", "settings": settings, "started": started,
                                   "load_before": load_before, "load_after": load_after,
                                   "environment": common.environment(), "results": results})


if __name__ == "__main__":
    raise SystemExit(main())
