"""``gptqlora run``: the whole job (evaluate float -> quantize -> evaluate -> fine-tune -> evaluate), one table.

With ``--verifier-questions N`` a verifier stage follows (off by default): ``gptqlora sample`` of K solutions for N
train questions with base + adapter (``verifier/samples``), ``gptqlora train-verifier`` on them (``verifier/model``)
and an evaluation of K samples per test question reranked by it: one more row with greedy, majority vote, verifier
best-of-K, verifier-weighted vote and pass@K.

Each evaluation scores what ``gptqlora eval`` would: a copy loaded from disk (the float model, the run's quantized
base, base + the run's adapter) in the inference dtype (bf16 on a CPU that runs it natively, where the 4-bit layers
decode with int4-aten), freed afterwards; quantizing and training keep their own dtype.

Every stage can be resumed: ``--resume`` keeps finished evaluations (``rows.json``), continues an interrupted one
from its last answered batch, reuses the run's quantized base and continues training from its last checkpoint;
it refuses when any recorded setting differs from the one given now.

Under torchrun (``torchrun --nproc-per-node N --no-python gptqlora run ...``) every rank takes part in each stage:
the evaluations are data-parallel (``gptqlora eval``'s), quantizing and training are ``gptqlora finetune``'s (rank 0
quantizes, DDP trains, or FSDP2 with ``--fsdp``); rank 0 alone writes run_config.json, rows.json and results.*,
while the others wait. In the verifier stage the sampling is data-parallel (``gptqlora sample``'s: the samples of a
one-process run), the verifier is trained by rank 0 alone while the others wait (for up to
``gptqlora.workflows.pipeline.VERIFIER_TRAINING_WAIT``), and its evaluation is data-parallel again.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass

from gptqlora import distributed
from gptqlora.config import (CalibConfig, DataConfig, EngineConfig, EvalConfig, LoRAConfig, ModelConfig, PromptConfig, QuantConfig,
                             RunConfig, TrainConfig, TrainDataConfig, check_resume_flags, group, overwrite_field,
                             seed_field)
from gptqlora.context import RunContext
from gptqlora.workflows.base import calib_inputs, check_calibration, local_data_dir, prepare_base, quantizes
from gptqlora.workflows.pipeline import (Evaluations, check_resumable, check_served_quantization, flat_settings,
                                        verifier_stage)
from gptqlora.workflows.scored import check_scored_model, fewshot
from gptqlora.workflows.training import check_lora_targets, gsm8k_source, load_training_data, train_on_base


@dataclass
class RunArgs:
    model: ModelConfig = group(ModelConfig)
    quant: QuantConfig = group(QuantConfig)
    calib: CalibConfig = group(CalibConfig)
    data: DataConfig = group(DataConfig)
    prompt: PromptConfig = group(PromptConfig)
    lora: LoRAConfig = group(LoRAConfig)
    train: TrainConfig = group(TrainConfig)
    train_data: TrainDataConfig = group(TrainDataConfig)
    eval: EvalConfig = group(EvalConfig)
    engine: EngineConfig = group(EngineConfig)
    run: RunConfig = group(RunConfig)
    seed: int = seed_field()
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:
        check_resume_flags(self.train.resume, self.overwrite)
        # The run's budget applies where the user did not set the finer-grained flag.
        if self.train.max_steps is None and self.run.train_steps:
            self.train = dataclasses.replace(self.train, max_steps=self.run.train_steps)


def run(args: RunArgs) -> dict | None:
    """The whole job; returns where the results are (None on ranks other than 0, which print nothing)."""
    from gptqlora.data.gsm8k import load_gsm8k
    from gptqlora.train.parallel import check_fsdp

    mc, qc, tc, style = args.model, args.quant, args.train, args.prompt.prompt_style
    check_fsdp(tc.fsdp, distributed.world())
    # its quantized copy has the float model's context and tokenizer
    source = check_scored_model(mc, None, None, args.eval.max_new_tokens, style, args.engine)
    check_served_quantization(args.engine, mc, qc, source)  # the base it will quantize, before any work
    check_lora_targets(source, args.lora.lora_targets)
    train, held, data_report = load_training_data(args.data, args.train_data, tc, args.seed)
    calib_data = gsm8k_source(args.data, args.train_data)
    if quantizes(tc.out, None, tc.resume):  # before the float model is loaded and evaluated
        check_calibration(qc.method, args.calib, calib_data, source)
    test = load_gsm8k("test", args.data.data)[: args.run.test_limit or None]
    exemplars = fewshot(args.data.data, args.eval.shots, args.seed)
    settings = flat_settings(args)
    with RunContext.start(mc.device, args.seed) as run:
        with run.output(tc.out, inputs=[source, local_data_dir(args.data.data), *calib_inputs(args.calib)],
                        overwrite=args.overwrite, resume=tc.resume,
                        check=functools.partial(check_resumable, settings=settings) if tc.resume else None) as out:
            evals = Evaluations(run, out, mc, args.eval, style, test, exemplars, resume=tc.resume,
                                engine=args.engine)
            evals.start(settings)
            if not args.run.skip_float_eval:
                evals.evaluate("float base")
            model, tokenizer, base_dir, report = prepare_base(run, mc, qc, args.calib, calib_data, out,
                                                              resume=tc.resume)
            if report is not None:
                evals.timings["quantize"] = report["seconds"]
            evals.evaluate(f"{qc.method} {qc.bits}-bit base", base_dir)
            start = time.perf_counter()
            resume_training = distributed.from_main(lambda: tc.resume and (out / "train_state").is_dir())
            # A run killed before its first checkpoint restarts training; its partial metrics are its own to replace.
            training = train_on_base(run, model, tokenizer, base_dir, train, held, args.lora,
                                     dataclasses.replace(tc, resume=resume_training), style, args.data.data,
                                     overwrite=tc.resume and not resume_training, data_report=data_report)
            evals.timings["finetune"] = round(time.perf_counter() - start, 1)
            del model  # the evaluation loads its own copy
            adapter = out / "lora_adapter"
            evals.evaluate(f"{qc.method} {qc.bits}-bit + LoRA", base_dir, adapter)
            if args.run.verifier_questions:
                start = time.perf_counter()
                verifier = verifier_stage(run, out, base_dir, adapter, mc, args.data.data, style, args.lora,
                                          args.eval, args.run, args.engine)
                evals.timings["verifier: sample and train"] = round(time.perf_counter() - start, 1)
                evals.evaluate(f"{qc.method} {qc.bits}-bit + LoRA + verifier", base_dir, adapter, verifier,
                               samples=args.run.verifier_samples)
            result = evals.finish(report, training)
    run.say("\n" + result["table"])
    return run.main_only({"results": str(out / "results.md"), "timings_s": result["timings_s"]})
