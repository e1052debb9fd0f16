"""The ``gptqlora`` command line, derived from the config dataclasses (each field is one ``--flag``).

Subcommands: quantize, perplexity, finetune, eval, merge, run. Each is a thin shell over library functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from gptqlora import config as C

COMMANDS: dict[str, tuple[str, tuple[type, ...]]] = {
    "quantize": ("Quantize a model's linear layers (GPTQ or RTN) and save a GPTQ v1 directory.",
                 (C.ModelConfig, C.QuantConfig, C.DataConfig)),
    "perplexity": ("Teacher-forced perplexity of GSM8K solutions (float or quantized model).",
                   (C.ModelConfig, C.DataConfig, C.EvalConfig)),
    "finetune": ("Train LoRA adapters over a quantized base on GSM8K train.",
                 (C.ModelConfig, C.QuantConfig, C.DataConfig, C.LoRAConfig, C.TrainConfig)),
    "eval": ("Exact-match GSM8K accuracy with greedy decoding and optional self-consistency.",
             (C.ModelConfig, C.DataConfig, C.EvalConfig)),
    "merge": ("Merge a LoRA adapter into its quantized base and re-quantize with GPTQ.",
              (C.ModelConfig, C.QuantConfig, C.DataConfig)),
    "run": ("The whole job: quantize -> fine-tune -> evaluate, with one results table.",
            (C.ModelConfig, C.QuantConfig, C.DataConfig, C.LoRAConfig, C.TrainConfig, C.EvalConfig, C.RunConfig)),
}

_SCALARS = {"int": int, "float": float, "str": str}


def _flag_names(name: str, aliases: Sequence[str]) -> list[str]:
    names = [f"--{name.replace('_', '-')}"]
    if "_" in name:
        names.append(f"--{name}")  # the seed's spelling (--batch_size) keeps working
    return names + [a for a in aliases if a != "--asym"]


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of ``cls``, typed from its annotation, documented by its help, defaulting to None.

    Defaults stay in the dataclass: a flag left out is simply not passed to the constructor.
    """
    group = parser.add_argument_group(cls.__name__.removesuffix("Config").lower() or cls.__name__)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f"{meta.get('help', '')} (default: {default})"
        kind = str(f.type).replace(" | None", "")
        names = _flag_names(f.name, meta.get("aliases", ()))
        if kind == "bool":
            group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
            if "--asym" in meta.get("aliases", ()):
                group.add_argument("--asym", dest=f.name, action="store_false", help="Same as --no-sym.")
        else:
            group.add_argument(*names, dest=f.name, type=_SCALARS[kind], default=None, choices=meta.get("choices"),
                               help=help_text, metavar=f.name.upper())


def config_from_args(cls: type, ns: argparse.Namespace) -> Any:
    """Build ``cls`` from the flags that were given; validation happens in its ``__post_init__``."""
    given = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if getattr(ns, f.name, None) is not None}
    return cls(**given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptqlora", description="GPTQ quantization + LoRA fine-tuning on GSM8K.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log each layer's GPTQ loss and more.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, groups) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        for cls in groups:
            add_config_args(p, cls)
        if name in ("quantize", "merge"):
            p.add_argument("--out", required=True, help="Directory to write the GPTQ-format model to.")
        if name in ("finetune", "eval", "merge"):
            p.add_argument("--quantized", default=None, help="A quantized model directory (GPTQ v1) to start from.")
        if name in ("eval", "merge"):
            p.add_argument("--adapter", default=None, required=name == "merge",
                           help="A LoRA adapter directory (PEFT format).")
        if name == "eval":
            p.add_argument("--output-dir", default=None, help="Where predictions.jsonl and summary.json go "
                                                              "(default: next to the adapter, else ./eval_out).")
        if name == "merge":
            p.add_argument("--ppl-limit", type=int, default=100,
                           help="GSM8K test solutions scored before and after merging (default 100).")
        if name == "perplexity":
            p.add_argument("--max-length", type=int, default=512, help="Tokens per example (default 512).")
        if name == "run":
            p.add_argument("--skip-float-eval", action="store_true",
                           help="Leave the float base out of the final table (saves one evaluation).")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    try:
        configs = {cls: config_from_args(cls, args) for cls in COMMANDS[args.command][1]}
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    from gptqlora import commands

    try:
        result = getattr(commands, args.command)(args, configs)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, NotADirectoryError) as e:
        print(f"gptqlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
