"""Do the ecosystem's own loaders read our GPTQ directories as they are? Logits compared with our loader.

Runs transformers' ``AutoModelForCausalLM.from_pretrained`` (which dispatches GPTQ checkpoints to gptqmodel through
optimum) in a Python environment that has gptqmodel, on a directory written by ``gptqlora quantize``, and compares
its logits on GSM8K prompts with our own loader's.

    python benchmarks/check_interop.py DIR --gptqmodel-python /path/to/venv/bin/python

Prints the figures as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HF_SCRIPT = r"""
import os, sys
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
model_dir, ids_file, out_file = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu", dtype=torch.float32)
kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
ids = load_file(ids_file)["input_ids"]
with torch.no_grad():
    logits = model(ids).logits.float()
save_file({"logits": logits.contiguous()}, out_file)
print("HF_KINDS " + ",".join(kinds))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="A directory written by `gptqlora quantize`.")
    parser.add_argument("--gptqmodel-python", required=True, help="Python of an environment with gptqmodel+optimum.")
    parser.add_argument("--prompts", type=int, default=4, help="GSM8K test questions to compare logits on.")
    parser.add_argument("--data", default=os.environ.get("GSM8K_DIR", "openai/gsm8k"))
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file, save_file

    from gptqlora.data.gsm8k import build_prompt, load_gsm8k
    from gptqlora.quant.checkpoint import load_quantized

    model, tokenizer, qconfig = load_quantized(args.model_dir)
    model.float()
    questions = [e["question"] for e in load_gsm8k("test", args.data)[: args.prompts]]
    encoded = [tokenizer(build_prompt(q, "plain"), add_special_tokens=False).input_ids for q in questions]
    length = min(len(e) for e in encoded)
    ids = torch.tensor([e[:length] for e in encoded])  # [B, T], equal lengths: no padding in the comparison
    with torch.no_grad():
        ours = model(ids).logits.float()
    with tempfile.TemporaryDirectory() as tmp:
        ids_file, out_file = str(Path(tmp) / "ids.safetensors"), str(Path(tmp) / "logits.safetensors")
        save_file({"input_ids": ids}, ids_file)
        proc = subprocess.run([args.gptqmodel_python, "-c", HF_SCRIPT, args.model_dir, ids_file, out_file],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            print(json.dumps({"loaded": False, "error": proc.stderr.strip().splitlines()[-1:]}))
            return 1
        theirs = load_file(out_file)["logits"]
    kinds = next(ln for ln in proc.stdout.splitlines() if ln.startswith("HF_KINDS ")).split(" ", 1)[1]
    diff = (ours - theirs).abs()
    result = {"loaded": True, "model_dir": args.model_dir, "bits": qconfig.bits, "group_size": qconfig.group_size,
              "targets": list(qconfig.target_names), "hf_linear_kinds": kinds.split(","),
              "max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
              "logit_scale": ours.abs().mean().item(),
              "same_argmax_fraction": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
