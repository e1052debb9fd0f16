"""``gptqlora merge``: fold an adapter into its quantized base and re-quantize the changed layers with GPTQ."""

from __future__ import annotations

import time
from dataclasses import dataclass

from gptqlora.config import (CalibConfig, DataConfig, PromptConfig, adapter_field, group, opt, overwrite_field,
                             quantized_field, seed_field)
from gptqlora.context import RunContext
from gptqlora.errors import UsageError
from gptqlora.workflows.base import calib_inputs, check_calibration, check_quantized_input, local_data_dir


@dataclass
class MergeArgs:
    """The base is loaded on the CPU with its own quantization config; only calibration is configurable."""

    quantized: str = quantized_field(required=True)
    adapter: str = adapter_field(required=True)
    out: str = opt(None, "Directory to write the merged GPTQ model to (refused if it exists and is not empty, "
                         "unless --overwrite).", required=True)
    overwrite: bool = overwrite_field()
    data: DataConfig = group(DataConfig)
    prompt: PromptConfig = group(PromptConfig)
    calib: CalibConfig = group(CalibConfig)
    seed: int = seed_field()
    ppl_limit: int = opt(100, "GSM8K test solutions scored before and after merging.")

    def __post_init__(self) -> None:
        if not self.quantized or not self.adapter or not self.out:
            raise UsageError("merge needs --quantized DIR (the base the adapter was trained on), --adapter DIR and "
                             "--out DIR")
        if self.ppl_limit <= 0:
            raise UsageError(f"ppl_limit={self.ppl_limit} must be positive")


def merge(args: MergeArgs) -> dict | None:
    """Check the base, the adapter and the calibration source, merge, re-quantize the changed layers, write ``--out``
    whole; returns the report (answer-token perplexity before and after)."""
    from gptqlora.data.calibration import calibration_for
    from gptqlora.data.gsm8k import load_gsm8k
    from gptqlora.eval.perplexity import gsm8k_answer_loss
    from gptqlora.lora.adapter import adapter_record, load_adapter, read_adapter_config
    from gptqlora.lora.merge import merge_into_quantized
    from gptqlora.provenance import base_record
    from gptqlora.quant.checkpoint import load_quantized, save_quantized

    source = check_quantized_input(args.quantized)
    read_adapter_config(args.adapter)
    test = load_gsm8k("test", args.data.data)[: args.ppl_limit]
    check_calibration("gptq", args.calib, args.data.data, source)  # merging re-quantizes with GPTQ
    with RunContext.start("cpu", args.seed, torchrun=False) as run:  # the base loads on the CPU (see MergeArgs)
        with run.output(args.out, inputs=[source, args.adapter, local_data_dir(args.data.data),
                                          *calib_inputs(args.calib)], overwrite=args.overwrite, staged=True) as out:
            model, tokenizer, qconfig = load_quantized(source)
            base = base_record(source)
            load_adapter(model, args.adapter, base=base)
            style = args.prompt.prompt_style
            before = gsm8k_answer_loss(model, tokenizer, test, style=style)
            calib, _ = calibration_for(args.calib, tokenizer, args.data.data, run.seed)
            start = time.perf_counter()
            losses = merge_into_quantized(model, calib, qconfig)
            seconds = time.perf_counter() - start
            after = gsm8k_answer_loss(model, tokenizer, test, style=style)
            used = {"base": base, "adapter": adapter_record(args.adapter)}
            save_quantized(model, tokenizer, out, qconfig, extra={"merged_adapter": str(args.adapter),
                                                                  "base": str(args.quantized), "provenance": used},
                           overwrite=args.overwrite)
    return run.main_only({"out": str(out), "requantized_layers": len(losses), "seconds": round(seconds, 1),
                          "perplexity_unmerged": before["perplexity"], "perplexity_merged": after["perplexity"],
                          "note": f"answer-token perplexity on the first {len(test)} GSM8K test solutions",
                          "used": used})
