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
``VERIFIER_TRAINING_WAIT``), and its evaluation is data-parallel again.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gptqlora import distributed
from gptqlora.commands.common import calib_inputs, check_calibration, evaluate_loaded, fewshot, local_data_dir
from gptqlora.commands.finetune import (check_lora_targets, check_resume_flags, gsm8k_source, join, load_training_data,
                                        prepare_base, quantizes, train_on_base)
from gptqlora.config import (CalibConfig, DataConfig, EvalConfig, LoRAConfig, ModelConfig, PromptConfig, QuantConfig,
                             RunConfig, TrainConfig, TrainDataConfig, group, overwrite_field, seed_field)
from gptqlora.errors import UsageError
from gptqlora.files import check_output, write_atomic

# How long the other ranks wait while rank 0 trains the verifier: longer than any verifier training we foresee
# (the job's own timeout, 30 minutes with gloo and 10 with NCCL, is not).
VERIFIER_TRAINING_WAIT = datetime.timedelta(hours=24)

# Settings a resumed run may change: the flags that say how to start, and those train_lora allows (with a warning).
RESUMABLE_CHANGES = ("overwrite", "train.resume", "train.lr", "train.max_grad_norm", "train.fsdp")


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
    run: RunConfig = group(RunConfig)
    seed: int = seed_field()
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:
        check_resume_flags(self.train.resume, self.overwrite)
        # The run's budget applies where the user did not set the finer-grained flag.
        if self.train.max_steps is None and self.run.train_steps:
            self.train = dataclasses.replace(self.train, max_steps=self.run.train_steps)


def flat_settings(args: RunArgs) -> dict:
    """Every setting as ``group.field -> value`` (the command's own fields without a prefix)."""
    flat = {}
    for key, value in dataclasses.asdict(args).items():
        if isinstance(value, dict):
            flat |= {f"{key}.{k}": v for k, v in value.items()}
        else:
            flat[key] = value
    return flat


def check_same_run(recorded: dict, now: dict, where: Path) -> None:
    """Refuse to resume a run with settings other than those it was started with (RESUMABLE_CHANGES aside).

    Raises:
        UsageError: naming every differing setting with both values.
    """
    diffs = [f"{k}: run {recorded.get(k)!r}, now {now.get(k)!r}" for k in sorted(recorded.keys() | now.keys())
             if k not in RESUMABLE_CHANGES and recorded.get(k) != now.get(k)]
    if diffs:
        raise UsageError(f"cannot resume {where}: it was started with other settings ({'; '.join(diffs)}); resume "
                         "with the run's settings, or start a new --out")


# Selections an evaluation may report besides greedy: summary key -> how the table names it.
SELECTIONS = {"self_consistency": "majority vote", "verifier_best_of_k": "verifier best-of", "verifier_weighted_vote":
              "verifier-weighted vote", "pass_at_k": "pass@"}


def results_table(rows: dict[str, dict]) -> str:
    """A Markdown table: one row per model (and per selection of its samples, when it sampled), accuracy with its 95%
    interval and answer-token loss."""
    lines = ["| model | exact match | 95% CI | answer-token loss | questions |", "|---|---|---|---|---|"]

    def line(name: str, block: dict, r: dict) -> str:
        return (f"| {name} | {100 * block['accuracy']:.1f}% ({block['correct']}/{r['n']}) | "
                f"{100 * block['ci95'][0]:.1f}-{100 * block['ci95'][1]:.1f}% | {r['answer_loss']:.4f} | {r['n']} |")

    for name, r in rows.items():
        lines.append(line(name, r["greedy"], r))
        for key, label in SELECTIONS.items():
            block = r.get(key)
            if isinstance(block, dict) and "accuracy" in block:
                gap = "" if label.endswith("@") else " "
                lines.append(line(f"{name}: {label}{gap}{block['k']}", block, r))
    return "\n".join(lines)


def check_output_dir(args: RunArgs, inputs: list, settings: dict) -> Path:
    """The run's directory, checked (and on ``--resume`` its recorded settings compared) before any work.

    Raises:
        UsageError: see ``check_output`` and ``check_same_run``; a ``--resume`` with nothing to resume.
    """
    out = check_output(args.train.out, inputs=inputs, overwrite=args.overwrite, resume=args.train.resume)
    if args.train.resume:
        if not (out / "run_config.json").is_file():
            raise UsageError(f"--resume: {out} holds no run_config.json of an earlier `gptqlora run`: run without "
                             "--resume to start")
        check_same_run(json.loads((out / "run_config.json").read_text()), settings, out)
    return out


def run(args: RunArgs) -> dict | None:
    """The whole job; returns where the results are (None on ranks other than 0, which print nothing)."""
    from gptqlora.commands.evaluate import check_scored_model, main_writes
    from gptqlora.data.gsm8k import load_gsm8k
    from gptqlora.models import resolve_device
    from gptqlora.train.parallel import check_fsdp

    check_fsdp(args.train.fsdp, distributed.world())
    mc = args.model
    # its quantized copy has the float model's context and tokenizer
    source = check_scored_model(mc, None, None, args.eval.max_new_tokens, args.prompt.prompt_style)
    check_lora_targets(source, args.lora.lora_targets)
    train, held, data_report = load_training_data(args)
    if quantizes(args):  # before the float model is loaded and evaluated
        check_calibration(args.quant.method, args.calib, gsm8k_source(args), source)
    test = load_gsm8k("test", args.data.data)[: args.run.test_limit or None]
    exemplars = fewshot(args.data.data, args.eval.shots, args.seed)
    device = resolve_device(mc.device)  # an unknown or absent device fails here, before any work
    settings = flat_settings(args)
    world = join(device)  # the group, and on a CPU each process's share of its cores
    try:
        out = distributed.from_main(check_output_dir, args, [source, local_data_dir(args.data.data),
                                                             *calib_inputs(args.calib)], settings)
        with main_writes(out, args.overwrite):
            result = run_in(args, out, settings, test, exemplars, train, held, world, data_report)
    finally:
        distributed.shutdown()
    if not world.main:
        return None
    print("\n" + result["table"])
    return {"results": str(out / "results.md"), "timings_s": result["timings_s"]}


def run_in(args: RunArgs, out: Path, settings: dict, test: list[dict], exemplars: list[dict], train: list[dict],
           held: list[dict], world: distributed.World, data_report: dict | None = None) -> dict:
    """The stages, in ``out`` (checked, and locked by rank 0); every rank runs them, rank 0 writes the files."""
    from gptqlora.commands.evaluate import load_scored_model
    from gptqlora.eval.verifier import load_verifier
    from gptqlora.models import resolve_device

    mc, tc, qc = args.model, args.train, args.quant
    say = print if world.main else (lambda *a, **kw: None)

    def read_rows() -> dict[str, dict]:
        out.mkdir(parents=True, exist_ok=True)
        if not tc.resume:
            write_atomic(out / "run_config.json", json.dumps(settings, indent=2) + "\n")
        return json.loads(rows_path.read_text()) if tc.resume and rows_path.is_file() else {}

    rows_path = out / "rows.json"
    rows: dict[str, dict] = distributed.from_main(read_rows)
    timings: dict[str, float] = {}

    def evaluate(name: str, quantized: Path | None = None, adapter: Path | None = None,
                 verifier_dir: Path | None = None) -> None:
        if name in rows:
            say(f"\n== {name}: evaluated before, kept ==", flush=True)
            return
        eval_dir = out / "eval" / name.replace(" ", "_")
        resume = distributed.from_main(lambda: tc.resume and (eval_dir / "eval_config.json").is_file())
        start = time.perf_counter()
        say(f"\n== evaluating {name}{' (resumed)' if resume else ''} ==", flush=True)
        model, tokenizer, provenance = load_scored_model(mc, quantized and str(quantized), adapter and str(adapter))
        ec, verifier = args.eval, None
        if verifier_dir is not None:  # K samples per question, reranked
            ec = dataclasses.replace(args.eval, samples=args.run.verifier_samples)
            verifier = load_verifier(verifier_dir, dtype=mc.dtype, kernel=mc.kernel,
                                     device=distributed.rank_device(resolve_device(mc.device)),
                                     scored_base=provenance["base"])
            provenance["verifier"] = verifier.record
        rows[name] = evaluate_loaded(model, tokenizer, test, exemplars, ec, args.prompt.prompt_style,
                                     args.seed, eval_dir, resume=resume, provenance=provenance, verifier=verifier)
        timings[f"eval {name}"] = round(time.perf_counter() - start, 1)
        if world.main:
            write_atomic(rows_path, json.dumps(rows, indent=2, default=str) + "\n")

    if not args.run.skip_float_eval:
        evaluate("float base")
    model, tokenizer, base_dir, report = prepare_base(args, out)
    if report is not None:
        timings["quantize"] = report["seconds"]
    evaluate(f"{qc.method} {qc.bits}-bit base", base_dir)
    start = time.perf_counter()
    resume_training = distributed.from_main(lambda: tc.resume and (out / "train_state").is_dir())
    # A run killed before its first checkpoint restarts training; its partial metrics are its own to replace.
    args.train = dataclasses.replace(tc, resume=resume_training)
    training = train_on_base(model, tokenizer, base_dir, train, held, args,
                             overwrite=tc.resume and not resume_training, data_report=data_report)
    timings["finetune"] = round(time.perf_counter() - start, 1)
    del model  # the evaluation loads its own copy
    evaluate(f"{qc.method} {qc.bits}-bit + LoRA", base_dir, out / "lora_adapter")
    if args.run.verifier_questions:
        start = time.perf_counter()
        verifier_dir = train_run_verifier(args, out, base_dir, out / "lora_adapter", say)
        timings["verifier: sample and train"] = round(time.perf_counter() - start, 1)
        evaluate(f"{qc.method} {qc.bits}-bit + LoRA + verifier", base_dir, out / "lora_adapter", verifier_dir)

    table = results_table(rows)
    result = {"table": table, "rows": rows, "quantization": report, "training": training, "timings_s": timings,
              "command": "gptqlora " + " ".join(sys.argv[1:])}
    if world.main:
        write_atomic(out / "results.json", json.dumps(result, indent=2, default=str))
        write_atomic(out / "results.md", table + "\n")
    distributed.barrier()  # no rank leaves before the results are written
    return result


def train_run_verifier(args: RunArgs, out: Path, base_dir: Path, adapter: Path, say) -> Path:
    """The verifier stage's first two steps, each as its command runs it, in ``out/verifier``: labelled samples of
    the train split (``samples``; an interrupted sampling is resumed, a finished one kept), then the verifier
    trained on them with train-verifier's defaults (``model``; kept when already written). Returns its directory.

    Under torchrun every rank calls it: the sampling is data-parallel, the training runs on rank 0 while the others
    wait for it (``VERIFIER_TRAINING_WAIT`` at most); rank 0 decides what is kept.
    """
    from gptqlora.commands.sample import SampleArgs, sample_joined
    from gptqlora.commands.train_verifier import TrainVerifierArgs, train_verifier_command
    from gptqlora.verifier.model import CONFIG_FILE as VERIFIER_CONFIG
    from gptqlora.verifier.samples import SAMPLE_CONFIG, SUMMARY

    rc = args.run
    samples_dir, model_dir = out / "verifier" / "samples", out / "verifier" / "model"
    sampled, resume = distributed.from_main(lambda: ((samples_dir / SUMMARY).is_file(),
                                                     (samples_dir / SAMPLE_CONFIG).is_file()))
    if sampled:
        say("\n== verifier samples: written before, kept ==", flush=True)
    else:
        say(f"\n== sampling {rc.verifier_samples} solutions for {rc.verifier_questions} train questions"
            f"{' (resumed)' if resume else ''} ==", flush=True)
        sample_joined(SampleArgs(model=args.model, data=args.data, prompt=args.prompt,
                                 eval=dataclasses.replace(args.eval, samples=rc.verifier_samples), split="train",
                                 limit=rc.verifier_questions, seed=args.seed, quantized=str(base_dir),
                                 adapter=str(adapter), out=str(samples_dir), resume=resume))

    def train() -> None:  # rank 0 alone
        if (model_dir / VERIFIER_CONFIG).is_file():
            say("\n== verifier: trained before, kept ==", flush=True)
            return
        say("\n== training the verifier ==", flush=True)
        train_verifier_command(TrainVerifierArgs(
            model=dataclasses.replace(args.model, model=ModelConfig().model),  # it trains over the quantized base
            data=args.data, prompt=args.prompt, lora=args.lora, seed=args.seed, quantized=str(base_dir),
            samples_dir=str(samples_dir), out=str(model_dir), overwrite=model_dir.exists()))

    distributed.from_main(train, wait=VERIFIER_TRAINING_WAIT)
    return model_dir
