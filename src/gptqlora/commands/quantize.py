"""``gptqlora quantize``: calibrate and quantize a float model's linears, write a GPTQ v1 directory."""

from __future__ import annotations

from dataclasses import dataclass

from gptqlora.commands.common import local_data_dir, quantize_loaded
from gptqlora.config import CalibConfig, DataConfig, ModelConfig, QuantConfig, group, opt, overwrite_field, seed_field
from gptqlora.files import OutputLock, check_output


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


def quantize(args: QuantizeArgs) -> dict:
    from gptqlora.data.gsm8k import load_gsm8k
    from gptqlora.models import check_model_source, load_model, resolve_device
    from gptqlora.quant.checkpoint import save_quantized

    mc = args.model
    source = check_model_source(mc.model, mc.cache_dir)
    if args.quant.method == "gptq" and args.calib.calib_text is None:
        load_gsm8k("train", args.data.data)  # the calibration source is readable before any model loads
    device = resolve_device(mc.device)
    out = check_output(args.out, inputs=[source, local_data_dir(args.data.data), args.calib.calib_text],
                       overwrite=args.overwrite)
    with OutputLock(out):
        model, tokenizer = load_model(mc.model, mc.dtype, device, mc.cache_dir)
        report = quantize_loaded(model, tokenizer, args.quant, args.calib, args.data.data, args.seed, kernel=mc.kernel)
        save_quantized(model, tokenizer, out, args.quant, extra=report | {"base_model": mc.model},
                       overwrite=args.overwrite)
    # Each layer's GPTQ loss is kept in OUT/quantize_config.json (and logged with -v), not printed.
    return {k: v for k, v in report.items() if k != "layer_losses"} | {"out": str(out)}
