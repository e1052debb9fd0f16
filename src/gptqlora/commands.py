"""The subcommands, as functions of their configs. The CLI parses flags into configs and calls these."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from gptqlora import config as C
from gptqlora.quant.linear import QuantizedLinear

Configs = dict[type, object]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the decoder blocks' linear weights as stored (packed buffers for quantized layers)."""
    total = 0
    for module in model.model.layers.modules():
        if isinstance(module, QuantizedLinear):
            total += sum(b.numel() * b.element_size() for b in module.buffers())
        elif isinstance(module, nn.Linear):
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total


def quantize_loaded(model: nn.Module, tokenizer, qc: C.QuantConfig, dc: C.DataConfig, progress: bool = True) -> dict:
    """Quantize an already loaded float model in place; returns a report (time, losses, bytes)."""
    from gptqlora.data.calibration import calibration_tokens
    from gptqlora.quant.driver import quantize_model_weights

    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("the model is already quantized: pass a float model to quantize")
    before = weight_bytes(model)
    calib = None
    if qc.method == "gptq":
        calib = calibration_tokens(tokenizer, dc.calib_samples, dc.calib_seqlen, source=dc.data,
                                   text_file=dc.calib_text, seed=dc.seed)
    start = time.perf_counter()
    losses = quantize_model_weights(model, calib, qc, progress=progress)
    seconds = time.perf_counter() - start
    return {"method": qc.method, "bits": qc.bits, "group_size": qc.group_size, "targets": list(qc.target_names),
            "seconds": round(seconds, 2), "gptq_loss_total": round(sum(losses.values()), 4),
            "weight_bytes_before": before, "weight_bytes_after": weight_bytes(model),
            "calibration": None if calib is None else {"source": dc.calib_text or dc.data,
                                                       "samples": dc.calib_samples, "seqlen": dc.calib_seqlen},
            "layer_losses": {k: round(v, 6) for k, v in losses.items()}}


def check_out_dir(out: str | Path, marker: str = "config.json") -> Path:
    """Refuse, before any work, to write into a non-empty directory that is not an earlier output of ours."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / marker).exists())):
        raise ValueError(f"--out {path} exists and holds other files: choose a new directory (nothing was written)")
    return path


def quantize(args: argparse.Namespace, configs: Configs) -> dict:
    from gptqlora.models import load_model
    from gptqlora.quant.checkpoint import save_quantized

    mc, qc, dc = configs[C.ModelConfig], configs[C.QuantConfig], configs[C.DataConfig]
    out = check_out_dir(args.out)
    model, tokenizer = load_model(mc.model, mc.dtype, mc.device, mc.cache_dir)
    report = quantize_loaded(model, tokenizer, qc, dc)
    save_quantized(model, tokenizer, out, qc, extra=report | {"base_model": mc.model})
    # Each layer's GPTQ loss is kept in OUT/quantize_config.json (and logged with -v), not printed.
    return {k: v for k, v in report.items() if k != "layer_losses"} | {"out": str(out)}


def perplexity(args: argparse.Namespace, configs: Configs) -> dict:
    from gptqlora.eval.perplexity import gsm8k_answer_loss
    from gptqlora.models import load_model

    mc, dc, ec = configs[C.ModelConfig], configs[C.DataConfig], configs[C.EvalConfig]
    model, tokenizer = load_model(mc.model, mc.dtype, mc.device, mc.cache_dir)
    result = gsm8k_answer_loss(model, tokenizer, source=dc.data, split=ec.split, limit=ec.limit,
                               batch_size=ec.eval_batch_size, max_length=args.max_length, style=dc.prompt_style)
    n_quant = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    return {"model": mc.model, "quantized_layers": n_quant, "split": ec.split} | result



def _load_quantized_base(path: str, mc: C.ModelConfig):
    from gptqlora.eval.gsm8k_eval import check_quantized
    from gptqlora.models import load_model

    model, tokenizer = load_model(path, mc.dtype, mc.device, mc.cache_dir)
    check_quantized(model)
    return model, tokenizer


def split_train(entries: list[dict], holdout: int, limit: int | None, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle of GSM8K train into (training examples, held-out examples for the eval loss)."""
    order = torch.randperm(len(entries), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [entries[i] for i in order]
    held, rest = shuffled[:holdout], shuffled[holdout:]
    return (rest[:limit] if limit else rest), held


def prepare_base(args: argparse.Namespace, configs: Configs, out: Path):
    """The quantized base of a fine-tuning run: --quantized DIR, the run's own earlier base on --resume, or a fresh
    quantization of --model written to OUT/quantized_base."""
    from gptqlora.models import load_model
    from gptqlora.quant.checkpoint import save_quantized

    mc, qc, dc, tc = (configs[k] for k in (C.ModelConfig, C.QuantConfig, C.DataConfig, C.TrainConfig))
    base_dir = out / "quantized_base"
    if getattr(args, "quantized", None):
        model, tokenizer = _load_quantized_base(args.quantized, mc)
        return model, tokenizer, args.quantized, None
    if tc.resume and (base_dir / "config.json").is_file():
        model, tokenizer = _load_quantized_base(str(base_dir), mc)
        return model, tokenizer, str(base_dir), None
    model, tokenizer = load_model(mc.model, mc.dtype, mc.device, mc.cache_dir)
    report = quantize_loaded(model, tokenizer, qc, dc)
    save_quantized(model, tokenizer, base_dir, qc, extra=report | {"base_model": mc.model})
    return model, tokenizer, str(base_dir), report


def finetune_loaded(model, tokenizer, base_name: str, configs: Configs) -> dict:
    """Inject LoRA into a loaded (quantized) model and train it on GSM8K train."""
    from gptqlora.data.gsm8k import GSM8KCoTDataset, load_gsm8k
    from gptqlora.lora.layer import inject_lora_layers
    from gptqlora.train.loop import train_lora

    dc, lc, tc = configs[C.DataConfig], configs[C.LoRAConfig], configs[C.TrainConfig]
    train, held = split_train(load_gsm8k("train", dc.data), tc.eval_holdout, tc.train_limit, dc.seed)
    train_ds = GSM8KCoTDataset(train, tokenizer, style=dc.prompt_style, max_length=tc.max_length)
    held_ds = GSM8KCoTDataset(held, tokenizer, style=dc.prompt_style, max_length=tc.max_length) if held else None
    inject_lora_layers(model, lc.lora_targets, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, use_rslora=lc.rslora)
    return train_lora(model, tokenizer, train_ds, held_ds, tc, seed=dc.seed, base_model_name_or_path=base_name)


def finetune(args: argparse.Namespace, configs: Configs) -> dict:
    tc = configs[C.TrainConfig]
    out = Path(tc.out)
    model, tokenizer, base_name, report = prepare_base(args, configs, out)
    summary = finetune_loaded(model, tokenizer, base_name, configs)
    return {"quantized_base": base_name, "quantization": report, "training": summary}


def _log(line: str) -> None:
    print(line, flush=True)  # one line per question: show progress even when stdout is a file


def evaluate_loaded(model, tokenizer, configs: Configs, out_dir: str | Path | None, log=_log) -> dict:
    """Exact-match accuracy (and answer-token loss) of a loaded model on the configured GSM8K split."""
    from gptqlora.data.gsm8k import load_gsm8k
    from gptqlora.eval.gsm8k_eval import evaluate_gsm8k, fewshot_exemplars
    from gptqlora.eval.perplexity import gsm8k_answer_loss

    dc, ec = configs[C.DataConfig], configs[C.EvalConfig]
    entries = load_gsm8k(ec.split, dc.data)[: ec.limit]
    exemplars = fewshot_exemplars(load_gsm8k("train", dc.data), ec.shots, seed=dc.seed) if ec.shots else ()
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for m in quantized:
        m.set_cache(ec.cache_dequantized)
    try:
        summary = evaluate_gsm8k(model, tokenizer, entries, ec, style=dc.prompt_style, exemplars=exemplars,
                                 out_dir=out_dir, log=log, seed=dc.seed)
        loss = gsm8k_answer_loss(model, tokenizer, entries, style=dc.prompt_style, batch_size=ec.eval_batch_size)
    finally:
        for m in quantized:
            m.set_cache(False)
    return summary | {"answer_loss": loss["loss"], "answer_perplexity": loss["perplexity"]}


def eval(args: argparse.Namespace, configs: Configs) -> dict:  # noqa: A001 - the subcommand's name
    from gptqlora.lora.adapter import load_adapter
    from gptqlora.models import load_model

    mc = configs[C.ModelConfig]
    if args.quantized:
        model, tokenizer = _load_quantized_base(args.quantized, mc)
    else:
        model, tokenizer = load_model(mc.model, mc.dtype, mc.device, mc.cache_dir)
    if args.adapter:
        load_adapter(model, args.adapter)
    out_dir = args.output_dir or (Path(args.adapter).parent / "eval" if args.adapter else Path("eval_out"))
    return evaluate_loaded(model, tokenizer, configs, out_dir)


def merge(args: argparse.Namespace, configs: Configs) -> dict:
    from gptqlora.data.calibration import calibration_tokens
    from gptqlora.eval.perplexity import gsm8k_answer_loss
    from gptqlora.lora.adapter import load_adapter
    from gptqlora.lora.merge import merge_into_quantized
    from gptqlora.quant.checkpoint import load_quantized, save_quantized

    dc = configs[C.DataConfig]
    if not args.quantized:
        raise ValueError("merge needs --quantized DIR (the base the adapter was trained on) and --adapter DIR")
    out = check_out_dir(args.out)
    model, tokenizer, qconfig = load_quantized(args.quantized)
    load_adapter(model, args.adapter)
    before = gsm8k_answer_loss(model, tokenizer, source=dc.data, split="test", limit=args.ppl_limit,
                               style=dc.prompt_style)
    calib = calibration_tokens(tokenizer, dc.calib_samples, dc.calib_seqlen, source=dc.data, text_file=dc.calib_text,
                               seed=dc.seed)
    start = time.perf_counter()
    losses = merge_into_quantized(model, calib, qconfig)
    seconds = time.perf_counter() - start
    after = gsm8k_answer_loss(model, tokenizer, source=dc.data, split="test", limit=args.ppl_limit,
                              style=dc.prompt_style)
    save_quantized(model, tokenizer, out, qconfig, extra={"merged_adapter": str(args.adapter),
                                                          "base": str(args.quantized)})
    return {"out": str(out), "requantized_layers": len(losses), "seconds": round(seconds, 1),
            "perplexity_unmerged": before["perplexity"], "perplexity_merged": after["perplexity"],
            "note": f"answer-token perplexity on the first {args.ppl_limit} GSM8K test solutions"}


def results_table(rows: dict[str, dict]) -> str:
    """A Markdown table: one row per model, accuracy with its 95% interval and answer-token loss."""
    lines = ["| model | exact match | 95% CI | answer-token loss | questions |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        g = r["greedy"]
        lines.append(f"| {name} | {100 * g['accuracy']:.1f}% ({g['correct']}/{r['n']}) | "
                     f"{100 * g['ci95'][0]:.1f}-{100 * g['ci95'][1]:.1f}% | {r['answer_loss']:.4f} | {r['n']} |")
    return "\n".join(lines)


def run(args: argparse.Namespace, configs: Configs) -> dict:
    """quantize -> fine-tune -> evaluate, writing OUT/results.{json,md} and OUT/run_config.json."""
    from gptqlora.eval.gsm8k_eval import write_atomic
    from gptqlora.models import load_model
    from gptqlora.quant.checkpoint import save_quantized

    mc, qc, dc, tc, ec, rc = (configs[k] for k in (C.ModelConfig, C.QuantConfig, C.DataConfig, C.TrainConfig,
                                                   C.EvalConfig, C.RunConfig))
    # The run's budget applies where the user did not set the finer-grained flag.
    if ec.limit is None and rc.test_limit:
        ec = configs[C.EvalConfig] = dataclasses.replace(ec, limit=rc.test_limit)
    if tc.max_steps is None and rc.train_steps:
        tc = configs[C.TrainConfig] = dataclasses.replace(tc, max_steps=rc.train_steps)
    out = Path(tc.out)
    if not tc.resume and (out / "train_state").exists():
        raise ValueError(f"{out} holds an earlier run's checkpoints: pass --resume to continue it, or a new --out")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "run_config.json", json.dumps({k.__name__: dataclasses.asdict(v) for k, v in configs.items()},
                                                     indent=2))
    rows: dict[str, dict] = {}
    timings: dict[str, float] = {}

    def evaluate(name: str, model, tokenizer) -> None:
        start = time.perf_counter()
        print(f"\n== evaluating {name} ==", flush=True)
        rows[name] = evaluate_loaded(model, tokenizer, configs, out / "eval" / name.replace(" ", "_"))
        timings[f"eval {name}"] = round(time.perf_counter() - start, 1)

    model, tokenizer = load_model(mc.model, mc.dtype, mc.device, mc.cache_dir)
    if not args.skip_float_eval:
        evaluate("float base", model, tokenizer)
    base_dir = out / "quantized_base"
    if tc.resume and (base_dir / "config.json").is_file():
        model, tokenizer = _load_quantized_base(str(base_dir), mc)
        report = None
    else:
        report = quantize_loaded(model, tokenizer, qc, dc)
        save_quantized(model, tokenizer, base_dir, qc, extra=report | {"base_model": mc.model})
        timings["quantize"] = report["seconds"]
    evaluate(f"{qc.method} {qc.bits}-bit base", model, tokenizer)
    start = time.perf_counter()
    training = finetune_loaded(model, tokenizer, str(base_dir), configs)
    timings["finetune"] = round(time.perf_counter() - start, 1)
    evaluate(f"{qc.method} {qc.bits}-bit + LoRA", model, tokenizer)

    table = results_table(rows)
    result = {"table": table, "rows": rows, "quantization": report, "training": training, "timings_s": timings,
              "command": "gptqlora " + " ".join(sys.argv[1:])}
    write_atomic(out / "results.json", json.dumps(result, indent=2, default=str))
    write_atomic(out / "results.md", table + "\n")
    print("\n" + table)
    return {"results": str(out / "results.md"), "timings_s": timings}
