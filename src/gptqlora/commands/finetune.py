"""``gptqlora finetune``: LoRA over a quantized base (given, or quantized first) on GSM8K train.

Several processes train one adapter with DistributedDataParallel when launched by torchrun (gloo on CPU, NCCL with
one GPU per process), or with FSDP2 given ``--fsdp``::

    torchrun --nproc-per-node 4 --no-python gptqlora finetune --model M --batch-size 4 --grad-accum 2 --out runs/a
    python -m torch.distributed.run --nproc-per-node 4 -m gptqlora.cli finetune ...   # the same

``--batch-size`` is per process: a step reads batch x processes x accumulation examples (here 4 x 4 x 2 = 32; rank 0
prints it), the same examples, in the same order, as one process with ``--batch-size 16 --grad-accum 2``, and the
result equals that run's up to float rounding. Rank 0 quantizes ``--model`` and saves the base while the others
wait, then every rank loads it from disk (with ``--quantized`` each loads it at once). Rank 0 alone writes the
adapter, metrics, checkpoints and loss curve. ``--resume`` needs the process count of the run it continues. On a
CPU each process takes cores / local processes threads unless OMP_NUM_THREADS is set (torchrun sets it to 1 for
several processes when it is unset: set it to your share, e.g. OMP_NUM_THREADS=8 for 2 processes on 16 cores).

``--fsdp`` (torchrun with 2 or more processes only; refused otherwise) shards instead of replicating: each process
keeps 1/N of the LoRA weights, of their gradients and AdamW states, and of the float weights (embeddings, norms, the
head, linears left unquantized), gathering a block's for its forward and backward; the packed 4-bit weights are
buffers and stay whole in every process. The examples, steps and files are those of DDP (the checkpoints and the
adapter are gathered and written whole by rank 0); a resume may switch ``--fsdp`` on or off (with a warning).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

from gptqlora import distributed
from gptqlora.commands.common import (calib_inputs, check_calibration, check_quantized_input, load_quantized_base,
                                      local_data_dir, quantize_loaded, split_train)
from gptqlora.config import (CalibConfig, DataConfig, LoRAConfig, ModelConfig, PromptConfig, QuantConfig, TrainConfig,
                             TrainDataConfig, group, overwrite_field, quantized_field, seed_field)
from gptqlora.errors import UsageError
from gptqlora.files import OutputLock, check_output, clear_output

BASE_DIR = "quantized_base"  # where a run keeps the base it quantized itself


@dataclass
class FinetuneArgs:
    model: ModelConfig = group(ModelConfig)
    quant: QuantConfig = group(QuantConfig)
    calib: CalibConfig = group(CalibConfig)
    data: DataConfig = group(DataConfig)
    train_data: TrainDataConfig = group(TrainDataConfig)
    prompt: PromptConfig = group(PromptConfig)
    lora: LoRAConfig = group(LoRAConfig)
    train: TrainConfig = group(TrainConfig)
    seed: int = seed_field()
    quantized: str | None = quantized_field()
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:
        check_resume_flags(self.train.resume, self.overwrite)
        if self.quantized is not None:
            unused = [f.name for cls, given in ((QuantConfig, self.quant), (CalibConfig, self.calib))
                      for f in fields(cls) if getattr(given, f.name) != getattr(cls(), f.name)]
            if unused:
                raise UsageError(f"--{unused[0].replace('_', '-')} applies when quantizing --model; with --quantized "
                                 "the base is already quantized: leave the quantization options out")


def check_resume_flags(resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise UsageError("--resume continues what is in the output and --overwrite replaces it: give one of them")


def recorded_quantization(base_dir: Path) -> dict:
    """What a run's own base was quantized from and how (model, method and the GPTQ block), for resume checks."""
    import json

    from gptqlora.quant.checkpoint import gptq_config_dict, read_quantized_config

    _, qconfig = read_quantized_config(base_dir)
    side = json.loads((base_dir / "quantize_config.json").read_text()).get("gptqlora", {})
    return {"model": side.get("base_model"), "method": side.get("method")} | gptq_config_dict(qconfig)


def check_same_quantization(base_dir: Path, model: str, qc: QuantConfig) -> None:
    """Refuse to resume a run whose own base was quantized from another model or with other options.

    Raises:
        UsageError: naming each differing setting with the recorded and the requested value.
    """
    from gptqlora.quant.checkpoint import gptq_config_dict

    recorded = recorded_quantization(base_dir)
    asked = {"model": model, "method": qc.method} | gptq_config_dict(qc)
    diffs = [f"{k}: run {recorded.get(k)!r}, now {asked[k]!r}" for k in asked if recorded.get(k) != asked[k]]
    if diffs:
        raise UsageError(f"cannot resume: {base_dir} was quantized with other settings ({'; '.join(diffs)}); resume "
                         "with the run's settings, or start a new --out")


def join(device: str) -> distributed.World:
    """Join torchrun's process group (a no-op for one process), on this rank's device; on a CPU with several
    processes on the machine, take a fair share of its cores (``distributed.share_threads``)."""
    world = distributed.init(distributed.rank_device(device))
    if world.distributed and device == "cpu":
        distributed.share_threads()
    return world


def quantizes(args) -> bool:
    """Whether the run quantizes ``--model`` itself: not with ``--quantized``, nor on a ``--resume`` of a run whose
    base is saved (``prepare_base`` loads it)."""
    own_base = Path(args.train.out).expanduser() / BASE_DIR / "config.json"
    return not getattr(args, "quantized", None) and not (args.train.resume and own_base.is_file())


def prepare_base(args, out: Path, model=None, tokenizer=None):
    """The run's quantized base: ``--quantized``, the run's own base on ``--resume``, or ``--model`` quantized now.

    Under torchrun rank 0 quantizes and saves while the others wait, then every rank loads the saved base (rank 0
    too: every rank trains on the same tensors, as read from disk); ``model`` is then used by rank 0 only.

    ``model``/``tokenizer``: the already loaded float model (``run`` evaluates it first); loaded here when None.
    Returns:
        (model, tokenizer, base directory, quantization report or None).
    """
    from gptqlora.models import load_model, resolve_device
    from gptqlora.quant.checkpoint import save_quantized

    mc, device = args.model, resolve_device(args.model.device)
    world = join(device)
    device = distributed.rank_device(device)
    if getattr(args, "quantized", None):
        return (*load_quantized_base(args.quantized, mc.dtype, device, mc.kernel), Path(args.quantized), None)
    base_dir = out / BASE_DIR
    if args.train.resume and (base_dir / "config.json").is_file():
        check_same_quantization(base_dir, mc.model, args.quant)
        return (*load_quantized_base(base_dir, mc.dtype, device, mc.kernel), base_dir, None)
    report = None
    if world.main:
        if model is None:
            model, tokenizer = load_model(mc.model, mc.dtype, device, mc.cache_dir)
        report = quantize_loaded(model, tokenizer, args.quant, args.calib, gsm8k_source(args), args.seed,
                                 kernel=mc.kernel)
        save_quantized(model, tokenizer, base_dir, args.quant, extra=report | {"base_model": mc.model})
    if not world.distributed:
        return model, tokenizer, base_dir, report
    del model  # rank 0's in-memory copy: it loads the saved one below, as the others do
    distributed.barrier()  # the others wait for the saved base (within the process group's timeout)
    report = distributed.broadcast_object(report)
    return (*load_quantized_base(base_dir, mc.dtype, device, mc.kernel), base_dir, report)


def run_provenance(base_dir: Path, args, data_report: dict | None = None) -> dict:
    """What a training run is made from: its base (path and weights fingerprint), data source and seed, and with
    ``data_report`` (``load_training_data``) its sources, their weights and what the contamination guard dropped."""
    from gptqlora.provenance import base_record

    record = {"base": base_record(base_dir), "data": args.data.data, "seed": args.seed}
    return record | ({"training_data": data_report} if data_report is not None else {})


def train_on_base(model, tokenizer, base_dir: Path, train: list[dict], held: list[dict], args,
                  overwrite: bool = False, data_report: dict | None = None) -> dict:
    """Seed, inject LoRA and train; writes the adapter, metrics and checkpoints under ``args.train.out``.

    Under torchrun every rank calls it (after ``prepare_base``) and trains its shard of each batch; rank 0 writes.
    ``overwrite``: replace an earlier start's metrics that no checkpoint continues (``run --resume`` only).
    ``data_report``: where the examples came from (``load_training_data``), recorded in ``run_provenance.json``;
    rank 0 prints it when training is done (a run refused on the way prints its one error line only).
    """
    from gptqlora.data.corpora import describe_report
    from gptqlora.data.gsm8k import GSM8KCoTDataset
    from gptqlora.lora.layer import inject_lora_layers
    from gptqlora.train import seed_everything, train_lora

    lc, tc, style = args.lora, args.train, args.prompt.prompt_style
    world = distributed.joined()
    if world.distributed and world.main:
        print(f"global batch: {tc.batch_size} per process x {world.size} processes x {tc.grad_accum} accumulation = "
              f"{tc.batch_size * world.size * tc.grad_accum} examples per step", file=sys.stderr, flush=True)
    train_ds = GSM8KCoTDataset(train, tokenizer, style=style, max_length=tc.max_length)
    held_ds = GSM8KCoTDataset(held, tokenizer, style=style, max_length=tc.max_length) if held else None
    seed_everything(args.seed)  # LoRA init draws from the global RNG
    inject_lora_layers(model, lc.lora_targets, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, use_rslora=lc.rslora)
    summary = train_lora(model, tokenizer, train_ds, held_ds, tc, seed=args.seed,
                         base_model_name_or_path=str(base_dir), provenance=run_provenance(base_dir, args, data_report),
                         overwrite=overwrite)
    if data_report is not None and world.main:
        print(describe_report(data_report), file=sys.stderr, flush=True)
    return summary


def train_data_config(args) -> TrainDataConfig:
    """The command's training-data options (a command without the group trains on ``--data`` alone)."""
    return getattr(args, "train_data", None) or TrainDataConfig()


def gsm8k_source(args) -> str:
    """The GSM8K directory or hub id of the run: the contamination reference and the calibration text (see
    ``gptqlora.data.corpora.gsm8k_reference``)."""
    from gptqlora.data.corpora import gsm8k_reference

    return gsm8k_reference(args.data.data, bool(train_data_config(args).mix))


def load_training_data(args) -> tuple[list[dict], list[dict], dict]:
    """The training corpus (``--train-mix``, else ``--data``: GSM8K, MetaMathQA or MathInstruct), without GSM8K test
    questions, checked for scorable answers, split into (training, held-out) examples, with the report of how it was
    made (``gptqlora.data.corpora.describe_report`` prints it).

    Raises:
        UsageError: see ``gptqlora.data.corpora.gsm8k_reference`` and ``build_training_set``.
    """
    from gptqlora.data.corpora import build_training_set
    from gptqlora.data.gsm8k import check_answers

    td = train_data_config(args)
    entries, report = build_training_set(td.mix or ((args.data.data, 1.0),), gsm8k_source(args),
                                         td.program_of_thought, args.seed)
    check_answers([e for e in entries if not e.get("program")], f"training data ({args.data.data})")
    train, held = split_train(entries, args.train.eval_holdout, args.train.train_limit, args.seed)
    return train, held, report


def training_split(args) -> tuple[list[dict], list[dict]]:
    """The (training, held-out) examples of ``load_training_data``, without its report."""
    train, held, _ = load_training_data(args)
    return train, held


def check_lora_targets(source: Path | None, targets: str) -> None:
    """Check the LoRA targets against the model's module names before anything loads or is quantized.

    The model is built on the meta device from its config.json (no weights, no memory); a hub id is checked after
    loading instead.

    Raises:
        UsageError: targets that select no linear layer, or a named target that matches none.
    """
    if source is None or not (source / "config.json").is_file():
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from gptqlora.lora.layer import find_targets

    config = AutoConfig.from_pretrained(source)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    find_targets(skeleton, targets)


def check_run_dir(args, inputs: list) -> Path:
    """Check the run directory before any work: not an input, writable, and empty unless resuming or overwriting."""
    tc = args.train
    out = check_output(tc.out, inputs=inputs, overwrite=args.overwrite, resume=tc.resume)
    if tc.resume and not (out / "train_state").is_dir():
        raise UsageError(f"--resume: {out} holds no training checkpoints (train_state/) to continue: run without "
                         "--resume to start")
    return out


def finetune(args: FinetuneArgs) -> dict | None:
    """Quantize (or load) the base, train, write the run's directory; returns the summary (None on ranks > 0 under
    torchrun: rank 0's is the one printed).

    Every rank checks the inputs and the output before any work; rank 0 alone locks and clears the output.
    """
    from gptqlora.models import check_model_source, resolve_device
    from gptqlora.train.parallel import check_fsdp

    check_fsdp(args.train.fsdp, distributed.world())
    source = check_quantized_input(args.quantized) if args.quantized else check_model_source(args.model.model,
                                                                                              args.model.cache_dir)
    check_lora_targets(source, args.lora.lora_targets)
    train, held, data_report = load_training_data(args)
    if quantizes(args):
        check_calibration(args.quant.method, args.calib, gsm8k_source(args), source)
    world = join(resolve_device(args.model.device))
    mixed = [local_data_dir(s) for s, _ in train_data_config(args).mix]
    try:
        out = check_run_dir(args, [source, local_data_dir(args.data.data), *mixed, *calib_inputs(args.calib)])
        distributed.barrier()  # every rank has checked the output before rank 0 changes it
        with OutputLock(out) if world.main else nullcontext():
            if args.overwrite and world.main:
                clear_output(out)
            distributed.barrier()
            model, tokenizer, base_dir, report = prepare_base(args, out)
            summary = train_on_base(model, tokenizer, base_dir, train, held, args, data_report=data_report)
    finally:
        distributed.shutdown()
    if not world.main:
        return None
    return {"quantized_base": str(base_dir), "quantization": report, "training_data": data_report,
            "training": summary}
