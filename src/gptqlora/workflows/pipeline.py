"""The whole job's pieces (``gptqlora run``): its recorded settings and the resume check against them, its
evaluations kept one row per model in ``OUT/rows.json``, the results table, and the verifier stage.

Every rank takes part in each piece; rank 0 alone writes ``run_config.json``, ``rows.json`` and ``results.*``. In the
verifier stage the sampling is data-parallel (the samples of a one-process run), the verifier is trained by rank 0
alone while the others wait (for up to ``VERIFIER_TRAINING_WAIT``), and its evaluation is data-parallel again.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

from gptqlora import distributed
from gptqlora.config import (EngineConfig, EvalConfig, LoRAConfig, ModelConfig, QuantConfig, RunConfig,
                             VerifierTrainConfig)
from gptqlora.context import RunContext
from gptqlora.errors import UsageError
from gptqlora.files import read_json_object, write_atomic
from gptqlora.workflows.base import local_data_dir
from gptqlora.workflows.sample import sample_questions, sample_solutions
from gptqlora.workflows.scored import check_scored_model, evaluate_model
from gptqlora.workflows.verifier import make_verifier, read_verifier_data

# How long the other ranks wait while rank 0 trains the verifier: longer than any verifier training we foresee
# (the job's own timeout, 30 minutes with gloo and 10 with NCCL, is not).
VERIFIER_TRAINING_WAIT = datetime.timedelta(hours=24)

# Settings a resumed run may change: the flags that say how to start, and those train_lora allows (with a warning).
RESUMABLE_CHANGES = ("overwrite", "train.resume", "train.lr", "train.max_grad_norm", "train.fsdp", "engine.engine_url",
                     "engine.vllm_python")

RUN_CONFIG, ROWS = "run_config.json", "rows.json"

# Selections an evaluation may report besides greedy: summary key -> how the table names it.
SELECTIONS = {"self_consistency": "majority vote", "verifier_best_of_k": "verifier best-of", "verifier_weighted_vote":
              "verifier-weighted vote", "pass_at_k": "pass@"}


# ---------------------------------------------------------------------------------------------- settings

def flat_settings(args: Any) -> dict:
    """Every setting of a command's config (a dataclass of groups) as ``group.field -> value``, the command's own
    fields without a prefix."""
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


def check_resumable(out: Path, settings: dict) -> None:
    """A ``--resume``'s output check: ``out`` holds an earlier run started with ``settings``.

    Raises:
        UsageError: no run_config.json in ``out``; see ``check_same_run``.
    """
    if not (out / RUN_CONFIG).is_file():
        raise UsageError(f"--resume: {out} holds no run_config.json of an earlier `gptqlora run`: run without "
                         "--resume to start")
    check_same_run(read_json_object(out / RUN_CONFIG), settings, out)


def check_served_quantization(engine: EngineConfig, mc: ModelConfig, qc: QuantConfig, source: Path | None) -> None:
    """With ``--engine vllm``: that vLLM will serve the base this run is about to quantize (its bits, symmetry and
    group size, on the float model's shapes), before anything is quantized.

    Raises:
        UsageError: see ``gptqlora.eval.vllm.check_servable``.
    """
    if engine.engine != "vllm":
        return
    from gptqlora.eval.generate import model_dir_config
    from gptqlora.eval.vllm import check_servable
    from gptqlora.models import resolve_device

    config = model_dir_config(source) or {}
    config = config | {"quantization_config": {"bits": qc.bits, "sym": qc.sym, "group_size": qc.group_size}}
    check_servable(f"the {qc.bits}-bit base of {mc.model}", config, None, resolve_device(mc.device), mc.dtype)


# ---------------------------------------------------------------------------------------------- evaluations

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


@dataclasses.dataclass
class Evaluations:
    """The job's evaluations of its models on one set of test questions, each scored as ``gptqlora eval`` would (a
    copy loaded from disk in the inference dtype, freed afterwards) into ``OUT/eval/NAME``, and kept as a row of
    ``OUT/rows.json`` once finished: a resume keeps finished rows and continues an interrupted evaluation."""

    run: RunContext
    out: Path
    mc: ModelConfig
    ec: EvalConfig
    style: str
    test: list[dict]
    exemplars: list[dict]
    resume: bool
    engine: EngineConfig | None = None
    rows: dict[str, dict] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def start(self, settings: dict) -> None:
        """Record ``settings`` in run_config.json on a fresh start; on a resume read the finished rows (rank 0)."""
        def read_rows() -> dict[str, dict]:
            self.out.mkdir(parents=True, exist_ok=True)
            if not self.resume:
                write_atomic(self.out / RUN_CONFIG, json.dumps(settings, indent=2) + "\n")
            rows_path = self.out / ROWS
            return read_json_object(rows_path) if self.resume and rows_path.is_file() else {}

        self.rows = distributed.from_main(read_rows)

    def evaluate(self, name: str, quantized: Path | None = None, adapter: Path | None = None,
                 verifier: Path | None = None, samples: int | None = None) -> None:
        """Score one model (the float model, or ``quantized`` with ``adapter``), with ``samples`` per question
        reranked by ``verifier``; a row finished before is kept."""
        run = self.run
        if name in self.rows:
            run.say(f"\n== {name}: evaluated before, kept ==", flush=True)
            return
        eval_dir = self.out / "eval" / name.replace(" ", "_")
        resume = distributed.from_main(lambda: self.resume and (eval_dir / "eval_config.json").is_file())
        start = time.perf_counter()
        run.say(f"\n== evaluating {name}{' (resumed)' if resume else ''} ==", flush=True)
        ec = self.ec if samples is None else dataclasses.replace(self.ec, samples=samples)
        self.rows[name] = evaluate_model(run, self.mc, quantized and str(quantized), adapter and str(adapter),
                                         verifier, self.test, self.exemplars, ec, self.style, eval_dir, resume=resume,
                                         engine=self.engine)
        self.timings[f"eval {name}"] = round(time.perf_counter() - start, 1)
        if run.world.main:
            write_atomic(self.out / ROWS, json.dumps(self.rows, indent=2, default=str) + "\n")

    def finish(self, quantization: dict | None, training: dict) -> dict:
        """Write results.json and results.md (rank 0; every rank waits for them); returns the results."""
        table = results_table(self.rows)
        result = {"table": table, "rows": self.rows, "quantization": quantization, "training": training,
                  "timings_s": self.timings, "command": "gptqlora " + " ".join(sys.argv[1:])}
        if self.run.world.main:
            write_atomic(self.out / "results.json", json.dumps(result, indent=2, default=str))
            write_atomic(self.out / "results.md", table + "\n")
        distributed.barrier()  # no rank leaves before the results are written
        return result


# ---------------------------------------------------------------------------------------------- the verifier stage

def verifier_stage(run: RunContext, out: Path, base_dir: Path, adapter: Path, mc: ModelConfig, data: str,
                   style: str, lc: LoRAConfig, ec: EvalConfig, rc: RunConfig,
                   engine: EngineConfig | None = None) -> Path:
    """In ``out/verifier``: labelled samples of ``rc.verifier_questions`` train questions from base + adapter
    (``samples``; an interrupted sampling is resumed, a finished one kept), then a verifier trained on them with
    train-verifier's defaults (``model``; kept when already written). Returns its directory.

    Every rank calls it: the sampling is data-parallel, the training runs on rank 0 while the others wait for it
    (``VERIFIER_TRAINING_WAIT`` at most); rank 0 decides what is kept.
    """
    from gptqlora.verifier.model import CONFIG_FILE as VERIFIER_CONFIG
    from gptqlora.verifier.samples import SAMPLE_CONFIG, SUMMARY

    samples_dir, model_dir = out / "verifier" / "samples", out / "verifier" / "model"
    sampled, resume = distributed.from_main(lambda: ((samples_dir / SUMMARY).is_file(),
                                                     (samples_dir / SAMPLE_CONFIG).is_file()))
    if sampled:
        run.say("\n== verifier samples: written before, kept ==", flush=True)
    else:
        run.say(f"\n== sampling {rc.verifier_samples} solutions for {rc.verifier_questions} train questions"
                f"{' (resumed)' if resume else ''} ==", flush=True)
        sample_ec = dataclasses.replace(ec, samples=rc.verifier_samples)
        source = check_scored_model(mc, str(base_dir), str(adapter), sample_ec.max_new_tokens, style, engine)
        entries, exemplars = sample_questions(data, "train", rc.verifier_questions, sample_ec.shots, run.seed)
        with run.output(samples_dir, inputs=[source, str(adapter), local_data_dir(data)], resume=resume) as where:
            sample_solutions(run, where, mc, str(base_dir), str(adapter), entries, exemplars, sample_ec, style,
                             split="train", resume=resume, engine=engine)

    def train() -> None:  # rank 0 alone
        if (model_dir / VERIFIER_CONFIG).is_file():
            run.say("\n== verifier: trained before, kept ==", flush=True)
            return
        run.say("\n== training the verifier ==", flush=True)
        vc = VerifierTrainConfig()
        vd = read_verifier_data(str(base_dir), str(samples_dir), data, lc.lora_targets, vc, run.seed)
        make_verifier(run.alone(), model_dir, vd, mc, style, lc, vc, overwrite=model_dir.exists())

    distributed.from_main(train, wait=VERIFIER_TRAINING_WAIT)
    return model_dir
