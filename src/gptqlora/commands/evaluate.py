"""``gptqlora eval``: exact-match GSM8K accuracy, greedy and self-consistency; resumable after a crash.

Data-parallel under torchrun (``torchrun --nproc-per-node N --no-python gptqlora eval ...``): each rank loads the
model and answers its share of the generation batches; rank 0 alone checks, locks and writes the output, and only
rank 0 prints the result.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gptqlora import distributed
from gptqlora.commands.common import (check_quantized_input, evaluate_loaded, fewshot, load_quantized_base,
                                      local_data_dir)
from gptqlora.config import (DataConfig, EvalConfig, ModelConfig, PromptConfig, SplitConfig, adapter_field, group, opt,
                             overwrite_field, quantized_field, seed_field)
from gptqlora.errors import UsageError
from gptqlora.files import OutputLock, check_output, clear_output

BATCH_ALIASES = {"eval_batch_size": ("--batch-size", "--batch_size")}  # what users type for this command


@dataclass
class EvalArgs:
    model: ModelConfig = group(ModelConfig)
    data: DataConfig = group(DataConfig)
    prompt: PromptConfig = group(PromptConfig)
    split: SplitConfig = group(SplitConfig)
    eval: EvalConfig = group(EvalConfig, aliases=BATCH_ALIASES)
    seed: int = seed_field()
    quantized: str | None = quantized_field()
    adapter: str | None = adapter_field()
    output_dir: str | None = opt(None, "Where predictions.jsonl, eval_config.json and summary.json go (default: "
                                       "OUT/eval next to the adapter's directory, else ./eval_out).")
    verifier: str | None = opt(None, "A verifier directory (gptqlora train-verifier) that reranks the --samples K "
                                     "solutions: best-of-K and verifier-weighted vote, next to greedy and majority vote.")
    resume: bool = opt(False, "Continue an interrupted evaluation in --output-dir: questions already answered with "
                              "the same settings are kept, the rest are generated.")
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:
        from gptqlora.commands.finetune import check_resume_flags

        check_resume_flags(self.resume, self.overwrite)
        if self.verifier and not self.eval.samples:
            raise UsageError("--verifier reranks sampled solutions: add --samples K")

    def default_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return Path(self.adapter).expanduser().parent / "eval" if self.adapter else Path("eval_out")


@contextmanager
def main_writes(out: Path, overwrite: bool = False) -> Iterator[None]:
    """Rank 0 holds ``out``'s writer lock (and empties ``out`` for ``--overwrite``) while the block runs; the other
    ranks write nothing there themselves, and a refusal (another process holds the lock) is raised on every rank."""
    lock = OutputLock(out)

    def take() -> None:
        lock.__enter__()
        if overwrite:
            clear_output(out)

    distributed.from_main(take)
    try:
        yield
    finally:
        lock.__exit__(None, None, None)  # a no-op where it was not taken


def check_scored_model(model_args: ModelConfig, quantized: str | None, adapter: str | None,
                       max_new_tokens: int, prompt_style: str) -> Path | None:
    """What :func:`load_scored_model` will load, checked without loading it: the model's directory, the adapter's
    files, that the generation budget fits the model's context (config.json's ``max_position_embeddings``), and that
    the prompts can be built (a chat template is rendered once on a probe, from the tokenizer alone). Every generating
    command (eval, sample, run's evaluations and sampling) calls it before touching its output.

    Returns:
        The model's local directory (None for a hub id, whose context and template are checked once it is loaded).
    Raises:
        UsageError: see ``check_quantized_input``, ``check_model_source``, ``read_adapter_config``,
            ``gptqlora.eval.generate.check_token_budget`` and ``gptqlora.data.gsm8k.resolve_style``.
    """
    from gptqlora.eval.generate import check_token_budget, model_dir_context
    from gptqlora.lora.adapter import read_adapter_config
    from gptqlora.models import check_model_source

    source = (check_quantized_input(quantized) if quantized
              else check_model_source(model_args.model, model_args.cache_dir))
    if adapter:
        read_adapter_config(adapter)
    check_token_budget(max_new_tokens, model_dir_context(source), source or model_args.model)
    if source is not None and prompt_style != "plain":  # a stranger's template fails here, not after the weights load
        from transformers import AutoTokenizer

        from gptqlora.data.gsm8k import resolve_style

        resolve_style(prompt_style, AutoTokenizer.from_pretrained(source))
    return source


def load_scored_model(model_args: ModelConfig, quantized: str | None, adapter: str | None):
    """The model to score (quantized base or float model, plus an optional adapter) and its provenance record; under
    torchrun with CUDA each rank loads it onto its own GPU."""
    from gptqlora.lora.adapter import adapter_record, load_adapter
    from gptqlora.models import load_model, model_input_path, resolve_device
    from gptqlora.provenance import base_record

    device = distributed.rank_device(resolve_device(model_args.device))
    if quantized:
        model, tokenizer = load_quantized_base(quantized, model_args.dtype, device, model_args.kernel, inference=True)
        base = base_record(quantized)
    else:
        model, tokenizer = load_model(model_args.model, model_args.dtype, device, model_args.cache_dir, inference=True)
        base = base_record(model_input_path(model_args.model, model_args.cache_dir) or model_args.model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    record = {"base": base, "adapter": None, "dtype": dtype}  # the compute dtype changes greedy text
    if quantized:
        record["kernel"] = model_args.kernel  # so does the kernel, in bf16
    if adapter:
        load_adapter(model, adapter, base=base)  # warns, naming both, when the adapter was trained on another base
        record["adapter"] = adapter_record(adapter)
    return model, tokenizer, record


def evaluate(args: EvalArgs) -> dict | None:
    """Evaluate and return the summary (None on ranks other than 0, which print nothing)."""
    from gptqlora.commands.finetune import join
    from gptqlora.data.gsm8k import load_gsm8k
    from gptqlora.eval.verifier import load_verifier
    from gptqlora.models import resolve_device
    from gptqlora.verifier.model import read_verifier_config

    source = check_scored_model(args.model, args.quantized, args.adapter, args.eval.max_new_tokens,
                                args.prompt.prompt_style)
    if args.verifier:
        read_verifier_config(args.verifier)
    entries = load_gsm8k(args.split.split, args.data.data)[: args.split.limit]
    exemplars = fewshot(args.data.data, args.eval.shots, args.seed)
    world = join(resolve_device(args.model.device))  # the group, and on a CPU each process's share of its cores
    try:
        out = distributed.from_main(check_output, args.default_output_dir(),
                                    inputs=[source, args.adapter, args.verifier, local_data_dir(args.data.data)],
                                    overwrite=args.overwrite, resume=args.resume, what="--output-dir")
        with main_writes(out, args.overwrite):
            model, tokenizer, record = load_scored_model(args.model, args.quantized, args.adapter)
            verifier = None
            if args.verifier:  # loads its own copy of its base (no adapter swapping): memory for a second base
                verifier = load_verifier(args.verifier, dtype=args.model.dtype, kernel=args.model.kernel,
                                         device=distributed.rank_device(resolve_device(args.model.device)),
                                         scored_base=record["base"])  # warns, naming both, over another base
                record["verifier"] = verifier.record  # a resume with another verifier is refused
            summary = evaluate_loaded(model, tokenizer, entries, exemplars, args.eval, args.prompt.prompt_style,
                                      args.seed, out, split=args.split.split, resume=args.resume,
                                      provenance=record, verifier=verifier)
    finally:
        distributed.shutdown()
    return summary | {"output_dir": str(out)} if world.main else None
