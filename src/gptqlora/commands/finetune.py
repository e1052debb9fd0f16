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

from dataclasses import dataclass, fields

from gptqlora import distributed
from gptqlora.config import (CalibConfig, DataConfig, LoRAConfig, ModelConfig, PromptConfig, QuantConfig, TrainConfig,
                             TrainDataConfig, check_resume_flags, group, overwrite_field, quantized_field, seed_field)
from gptqlora.context import RunContext
from gptqlora.errors import UsageError
from gptqlora.workflows.base import (calib_inputs, check_calibration, check_quantized_input, local_data_dir,
                                     prepare_base, quantizes)
from gptqlora.workflows.training import (check_lora_targets, check_resumable_training, gsm8k_source,
                                         load_training_data, train_on_base)


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


def finetune(args: FinetuneArgs) -> dict | None:
    """Quantize (or load) the base, train, write the run's directory; returns the summary (None on ranks > 0 under
    torchrun: rank 0's is the one printed).

    Every rank checks the inputs before any work; rank 0 checks, locks and (for --overwrite) clears the output.
    """
    from gptqlora.models import check_model_source
    from gptqlora.train.parallel import check_fsdp

    tc = args.train
    check_fsdp(tc.fsdp, distributed.world())
    source = check_quantized_input(args.quantized) if args.quantized else check_model_source(args.model.model,
                                                                                              args.model.cache_dir)
    check_lora_targets(source, args.lora.lora_targets)
    train, held, data_report = load_training_data(args.data, args.train_data, tc, args.seed)
    calib_data = gsm8k_source(args.data, args.train_data)
    if quantizes(tc.out, args.quantized, tc.resume):
        check_calibration(args.quant.method, args.calib, calib_data, source)
    mixed = [local_data_dir(s) for s, _ in args.train_data.mix]
    with RunContext.start(args.model.device, args.seed) as run:
        with run.output(tc.out, inputs=[source, local_data_dir(args.data.data), *mixed, *calib_inputs(args.calib)],
                        overwrite=args.overwrite, resume=tc.resume,
                        check=check_resumable_training if tc.resume else None) as out:
            model, tokenizer, base_dir, report = prepare_base(run, args.model, args.quant, args.calib, calib_data, out,
                                                              quantized=args.quantized, resume=tc.resume)
            summary = train_on_base(run, model, tokenizer, base_dir, train, held, args.lora, tc,
                                    args.prompt.prompt_style, args.data.data, data_report=data_report)
    return run.main_only({"quantized_base": str(base_dir), "quantization": report, "training_data": data_report,
                          "training": summary})
