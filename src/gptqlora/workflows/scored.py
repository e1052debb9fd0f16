"""Load a scored model and evaluate it: what every generating command (eval, sample, run's evaluations and its
sampling) checks before touching its output, loads onto this rank's device, and scores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gptqlora.config import EngineConfig, EvalConfig, ModelConfig
from gptqlora.context import RunContext
from gptqlora.errors import UsageError
from gptqlora.workflows.base import check_quantized_input, load_quantized_base


def fewshot(data: str, shots: int, seed: int) -> list[dict]:
    """The few-shot exemplars from the train split (none for ``shots == 0``), checked before any model loads.

    Raises:
        UsageError: more shots than train problems; see ``gptqlora.data.gsm8k.load_gsm8k``.
    """
    from gptqlora.data.gsm8k import load_gsm8k
    from gptqlora.eval.gsm8k_eval import fewshot_exemplars

    if not shots:
        return []
    train = load_gsm8k("train", data)
    if shots > len(train):
        raise UsageError(f"shots={shots} asks for more exemplars than the {len(train)} train problems: use fewer")
    return fewshot_exemplars(train, shots, seed=seed)


def check_scored_model(mc: ModelConfig, quantized: str | None, adapter: str | None, max_new_tokens: int,
                       prompt_style: str, engine: EngineConfig | None = None) -> Path | None:
    """What :func:`open_scored_model` will load, checked without loading it: the model's directory, the adapter's
    files, that the generation budget fits the model's context (config.json's ``max_position_embeddings``), that
    the prompts can be built (a chat template is rendered once on a probe, from the tokenizer alone), and, with
    ``--engine vllm``, that vLLM can serve the model and adapter (:func:`vllm_plan`).

    Returns:
        The model's local directory (None for a hub id, whose context and template are checked once it is loaded).
    Raises:
        UsageError: see ``check_quantized_input``, ``check_model_source``, ``read_adapter_config``,
            ``gptqlora.eval.generate.check_token_budget`` and ``gptqlora.data.gsm8k.resolve_style``.
    """
    from gptqlora.eval.generate import check_token_budget, model_dir_context
    from gptqlora.lora.adapter import read_adapter_config
    from gptqlora.models import check_model_source

    source = check_quantized_input(quantized) if quantized else check_model_source(mc.model, mc.cache_dir)
    if adapter:
        read_adapter_config(adapter)
    check_token_budget(max_new_tokens, model_dir_context(source), source or mc.model)
    if source is not None and prompt_style != "plain":  # a stranger's template fails here, not after the weights load
        from transformers import AutoTokenizer

        from gptqlora.data.gsm8k import resolve_style

        resolve_style(prompt_style, AutoTokenizer.from_pretrained(source))
    if engine is not None and engine.engine == "vllm":
        from gptqlora.eval.vllm import VLLMClient, served_model, vllm_python

        plan = vllm_plan(mc, quantized, adapter, source)
        if engine.engine_url is None:
            vllm_python(engine.vllm_python)
        else:  # the running server serves this model and adapter
            served_model(VLLMClient(engine.engine_url), plan)
    return source


def vllm_plan(mc: ModelConfig, quantized: str | None, adapter: str | None, source: Path | None):
    """How vLLM will serve the scored model (``gptqlora.eval.vllm.ServePlan``): its directory (or hub id), the
    dtype (``--dtype`` as our engine resolves it, GPTQ in bfloat16), the context and the adapter's rank.

    Raises:
        UsageError: a model or adapter vLLM cannot serve, named with why (``gptqlora.eval.vllm.check_servable``).
    """
    from gptqlora.eval.generate import model_dir_config
    from gptqlora.eval.vllm import check_servable
    from gptqlora.models import resolve_device, resolve_dtype

    config = model_dir_config(source)
    device = resolve_device(mc.device)
    dtype = mc.dtype if quantized else str(resolve_dtype(mc.dtype, device, inference=True)).removeprefix("torch.")
    return check_servable(str(source or mc.model), config, adapter, device, dtype)


def load_scored_model(mc: ModelConfig, quantized: str | None, adapter: str | None, device: str):
    """The model to score (quantized base or float model, plus an optional adapter) on ``device`` (this rank's), in
    the inference dtype, and its provenance record.

    Returns:
        (model, tokenizer, record): the record holds the base, the adapter, the compute dtype and, for a quantized
        base, the kernel (each changes greedy text).
    """
    from gptqlora.lora.adapter import adapter_record, load_adapter
    from gptqlora.models import load_model, model_input_path
    from gptqlora.provenance import base_record

    if quantized:
        model, tokenizer = load_quantized_base(quantized, mc.dtype, device, mc.kernel, inference=True)
        base = base_record(quantized)
    else:
        model, tokenizer = load_model(mc.model, mc.dtype, device, mc.cache_dir, inference=True)
        base = base_record(model_input_path(mc.model, mc.cache_dir) or mc.model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    record = {"base": base, "adapter": None, "dtype": dtype}  # the compute dtype changes greedy text
    if quantized:
        record["kernel"] = mc.kernel  # so does the kernel, in bf16
    if adapter:
        load_adapter(model, adapter, base=base)  # warns, naming both, when the adapter was trained on another base
        record["adapter"] = adapter_record(adapter)
    return model, tokenizer, record


@contextlib.contextmanager
def open_scored_model(run: RunContext, mc: ModelConfig, quantized: str | None, adapter: str | None,
                      engine: EngineConfig | None = None) -> Iterator[tuple[Any, Any, dict]]:
    """The scored model on this rank, ready to generate: loaded here (``load_scored_model``), or, with ``--engine
    vllm``, served by a vLLM server this rank starts (or the one at ``--engine-url``) and stopped on exit.

    Yields:
        (engine, tokenizer, record): what ``evaluate_loaded`` and ``sample_gsm8k`` take (ours: a ``LocalEngine``
        with ``--compile``'s setting, its model as ``.model``); the record is
        ``load_scored_model``'s plus ``"engine"`` (``"ours"``, or ``"vllm VERSION"``).
    """
    if engine is None or engine.engine == "ours":
        from gptqlora.eval.engine import LocalEngine

        model, tokenizer, record = load_scored_model(mc, quantized, adapter, run.device)
        yield LocalEngine(model, tokenizer, engine.compile if engine else "auto"), tokenizer, record | {"engine": "ours"}
        return
    from transformers import AutoTokenizer, GenerationConfig

    from gptqlora.eval.generate import eos_token_ids
    from gptqlora.eval.vllm import open_vllm
    from gptqlora.lora.adapter import adapter_record
    from gptqlora.models import local_model_dir
    from gptqlora.provenance import base_record

    source = Path(quantized) if quantized else local_model_dir(mc.model, mc.cache_dir)
    plan = vllm_plan(mc, quantized, adapter, source)
    tokenizer = AutoTokenizer.from_pretrained(plan.model)
    try:
        generation = GenerationConfig.from_pretrained(plan.model)
    except OSError:  # no generation_config.json
        generation = None
    eos = eos_token_ids(None, tokenizer, generation)
    record = {"base": base_record(source if source is not None else mc.model), "adapter": None}
    if adapter:
        record["adapter"] = adapter_record(adapter)
    with open_vllm(plan, tokenizer, eos, device=run.device, seed=run.seed, url=engine.engine_url,
                   python=engine.vllm_python, tensor_parallel_size=engine.tensor_parallel_size) as (served, extra):
        yield served, tokenizer, record | extra


def print_line(line: str) -> None:
    """An evaluation's progress line (one per question), flushed: progress shows even when stdout is a file."""
    print(line, flush=True)


def evaluate_loaded(model, tokenizer, entries: list[dict], exemplars: list[dict], ec: EvalConfig, style: str,
                    seed: int, out_dir: str | Path | None, split: str = "test", resume: bool = False,
                    provenance: dict | None = None, log: Callable[[str], Any] | None = None, rerank=None) -> dict:
    """Exact-match accuracy (and answer-token loss) of a loaded model on the given GSM8K entries.

    Under torchrun every rank calls this with its own copy of the model: both the generation batches and the loss
    batches are split across the ranks, rank 0 writes ``out_dir``, and every rank returns the same result.

    Args:
        rerank: scores the sampled solutions (``gptqlora.eval.rerank.Rerank``, e.g. a ``VerifierRerank``).
    """
    from gptqlora.eval.engine import as_engine
    from gptqlora.eval.gsm8k_eval import evaluate_gsm8k

    summary = evaluate_gsm8k(model, tokenizer, entries, ec, style=style, exemplars=exemplars, out_dir=out_dir,
                             log=log or print_line, seed=seed, split=split, resume=resume, provenance=provenance,
                             rerank=rerank)
    loss = as_engine(model, tokenizer).answer_loss(entries, style, ec.eval_batch_size)
    return summary | {"answer_loss": loss["loss"], "answer_perplexity": loss["perplexity"]}


def evaluate_model(run: RunContext, mc: ModelConfig, quantized: str | None, adapter: str | None,
                   verifier: str | Path | None, entries: list[dict], exemplars: list[dict], ec: EvalConfig,
                   style: str, out_dir: Path, *, split: str = "test", resume: bool = False,
                   engine: EngineConfig | None = None) -> dict:
    """Open the scored model (``open_scored_model``: loaded onto ``run.device``, or served by vLLM) and, with
    ``verifier``, load a verifier to rerank its samples, then ``evaluate_loaded`` with ``run.seed`` into ``out_dir``
    (claimed by the caller); the models are freed (a server stopped) on return. Returns the summary (on every
    rank)."""
    from gptqlora.verifier.load import VerifierRerank, load_verifier

    with open_scored_model(run, mc, quantized, adapter, engine) as (model, tokenizer, record):
        rerank = None
        if verifier:  # loads its own copy of its base (no adapter swapping): memory for a second base
            loaded = load_verifier(verifier, dtype=mc.dtype, kernel=mc.kernel, device=run.device,
                                   scored_base=record["base"])  # warns, naming both, over another base
            rerank = VerifierRerank(loaded, ec.eval_batch_size)
            record["verifier"] = rerank.record  # a resume with another verifier is refused
        return evaluate_loaded(model, tokenizer, entries, exemplars, ec, style, run.seed, out_dir, split=split,
                               resume=resume, provenance=record, rerank=rerank)
