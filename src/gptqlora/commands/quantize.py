"""``gptqlora quantize``: calibrate and quantize a float model's linears, write a GPTQ v1 directory.

A safetensors checkpoint is quantized streamed, one decoder block in memory at a time, resumable; other checkpoints
are loaded whole and quantized in memory, with a note (``gptqlora.workflows.quantize``). Both give the same bytes on
the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptqlora.config import CalibConfig, DataConfig, ModelConfig, QuantConfig, group, opt, overwrite_field, seed_field
from gptqlora.context import RunContext
from gptqlora.quant.stream import DEFAULT_MAX_SHARD_SIZE, parse_size
from gptqlora.workflows.base import calib_inputs, check_calibration, local_data_dir
from gptqlora.workflows.quantize import quantize_to_dir


@dataclass
class QuantizeArgs:
    model: ModelConfig = group(ModelConfig)
    quant: QuantConfig = group(QuantConfig)
    data: DataConfig = group(DataConfig)
    calib: CalibConfig = group(CalibConfig)
    seed: int = seed_field()
    out: str = opt(None, "Directory to write the GPTQ-format model to (refused if it exists and is not empty, "
                         "unless --overwrite).", required=True)
    overwrite: bool = overwrite_field()
    max_shard_size: str = opt(DEFAULT_MAX_SHARD_SIZE, "Largest weights file of the output (e.g. 5GB, 500MB, 2GiB); "
                                                      "a larger model is written as Hugging Face shards with "
                                                      "model.safetensors.index.json.")
    resume: bool = opt(False, "Continue a quantization to --out that was killed, after its last finished block "
                              "(kept in .OUT.quantizing beside --out); without it such leftovers are discarded.")

    def __post_init__(self) -> None:
        parse_size(self.max_shard_size)  # a bad size is refused before any work


def quantize(args: QuantizeArgs) -> dict | None:
    """Check the model and the calibration source, quantize, write ``--out`` whole; returns the report (each
    layer's GPTQ loss is kept in OUT/quantize_config.json and logged with -v, not printed)."""
    from gptqlora.models import check_model_source

    mc = args.model
    source = check_model_source(mc.model, mc.cache_dir)
    check_calibration(args.quant.method, args.calib, args.data.data, source)
    with RunContext.start(mc.device, args.seed, torchrun=False) as run:
        # --resume continues .OUT.quantizing, not OUT itself: the output check is a fresh one's
        with run.output(args.out, inputs=[source, local_data_dir(args.data.data), *calib_inputs(args.calib)],
                        overwrite=args.overwrite, staged=True) as out:
            report = quantize_to_dir(run, out, mc, args.quant, args.calib, args.data.data, source,
                                     max_shard_size=args.max_shard_size, resume=args.resume, overwrite=args.overwrite)
    return run.main_only({k: v for k, v in report.items() if k != "layer_losses"} | {"out": str(out)})
