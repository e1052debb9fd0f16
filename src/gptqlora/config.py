"""The typed configuration groups every command is composed of.

Every default is written once, here. Each subcommand (``gptqlora.commands.*``) declares one dataclass made of the
groups it uses and of its own fields; the command line (``cli.py``) is derived from that dataclass: each field
becomes ``--field-name`` (``--field_name`` is accepted too) with the field's ``help`` as its description, so
``--help`` lists exactly what the command reads and any other flag is an error. Validation lives in
``__post_init__``, so a bad value fails before any file is read or any model is loaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from gptqlora.errors import InputNotFoundError, UsageError
from gptqlora.targets import parse_targets, resolve_targets

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_HUB_DATASET = "openai/gsm8k"

# Group sizes the GPTQ ecosystem reads (gptqmodel's kernels; vLLM's Marlin takes -1, 32, 64 and 128).
GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
DTYPES = ("float32", "bfloat16", "float16")  # the compute and storage dtypes a model may ask for (and --dtype, + auto)
DEFAULT_TEMPERATURE = 0.7  # self-consistency sampling, used only with --samples
DEFAULT_TOP_P = 0.95
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def opt(default: Any = None, help: str = "", *, choices: tuple | str | None = None, aliases: tuple[str, ...] = (),
        factory: Any = None, required: bool = False) -> Any:
    """A dataclass field carrying its CLI help (the field's docstring), choices and extra flag spellings.

    ``choices`` is a tuple, or the dotted name (``"package.module.NAME"``) of a tuple a higher layer owns, which the
    command line (the top layer) reads when it builds the parser: e.g. the kernel names of the kernel registry.
    """
    meta = {"help": help, "choices": choices, "aliases": aliases, "required": required}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def group(cls: type, aliases: dict[str, tuple[str, ...]] | None = None) -> Any:
    """A field holding a whole config group; its fields become the command's flags (``aliases`` adds spellings)."""
    return field(default_factory=cls, metadata={"group": cls, "aliases": aliases or {}})


def default_data_source() -> str:
    """``$GSM8K_DIR`` when set, else the hub dataset id."""
    return os.environ.get("GSM8K_DIR") or DEFAULT_HUB_DATASET


# ---------------------------------------------------------------------------------------------- fields shared by commands
# Fields several commands take, each written once as a function returning the field.

def seed_field() -> Any:
    return opt(0, "Seed for everything random: calibration windows, the train/held-out split, LoRA init, dropout, "
                  "data order and sampling.")


def overwrite_field() -> Any:
    return opt(False, "Replace an existing, non-empty output. Never allowed when the output is, contains or is "
                      "inside one of the command's inputs.")


def quantized_field(required: bool = False) -> Any:
    return opt(None, "A quantized model directory (GPTQ v1) to start from.", required=required)


def adapter_field(required: bool = False) -> Any:
    return opt(None, "A LoRA adapter directory (PEFT format).", required=required)


# What users type for the evaluation batch size in the generating commands (eval, sample): EvalConfig's aliases there.
BATCH_ALIASES = {"eval_batch_size": ("--batch-size", "--batch_size")}


def check_resume_flags(resume: bool, overwrite: bool) -> None:
    """Refuse ``--resume`` with ``--overwrite`` (every command that resumes checks it in its ``__post_init__``).

    Raises:
        UsageError: both were given.
    """
    if resume and overwrite:
        raise UsageError("--resume continues what is in the output and --overwrite replaces it: give one of them")


# ---------------------------------------------------------------------------------------------- groups

@dataclass
class ModelConfig:
    model: str = opt(DEFAULT_MODEL, "Model: the alias 'smollm2-135m' (embedded), a local Hugging Face or gptqlora "
                                    "directory, or a hub id such as meta-llama/Llama-2-7b-hf.")
    dtype: str = opt("auto", "Compute dtype: 'auto' (bfloat16 on CUDA; on a CPU float32, or bfloat16 for evaluating a "
                             "float model where the CPU runs it natively), 'float32' or 'bfloat16'.",
                     choices=("auto", *DTYPES))
    device: str = opt("auto", "Device: 'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'.")
    cache_dir: str | None = opt(None, "Where the embedded model is cached as safetensors "
                                      "(default $GPTQLORA_CACHE or ~/.cache/gptqlora).")
    kernel: str = opt("auto", "Kernel of the quantized layers: 'auto' (per device, dtype and tokens per call, the "
                              "fastest measured), 'int4-aten', 'dequant-gemm', 'triton' (CUDA), 'dequant' (the "
                              "reference) or 'dense' (keeps a dequantized copy of every weight: fast, but the memory "
                              "saving is gone).", choices="gptqlora.quant.kernels.registry.KERNELS")

    def __post_init__(self) -> None:
        if not _DEVICE_RE.match(self.device):
            raise UsageError(f"device {self.device!r} is unknown: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.dtype not in ("auto", *DTYPES):
            raise UsageError(f"dtype {self.dtype!r} is unknown: use auto, {', '.join(DTYPES)}")
        if not self.model:
            raise UsageError("--model is empty: give the alias 'smollm2-135m', a model directory or a hub id")


@dataclass
class QuantConfig:
    method: str = opt("gptq", "Quantization method: 'gptq' or round-to-nearest 'rtn' (the baseline).",
                      choices=("gptq", "rtn"))
    bits: int = opt(4, "Bits per weight.", choices=(2, 3, 4, 8))
    group_size: int = opt(64, "Columns sharing one scale and zero: -1 (one group per row) or a power of two from "
                              "16 to 1024 dividing the layers' input size (vLLM's Marlin reads -1/32/64/128).")
    sym: bool = opt(True, "Symmetric grid (zero fixed at the middle); --asym for a free zero point.",
                    aliases=("--asym",))
    # Defaults chosen by measurement (issue 9): act-order with static groups damages least among the orders whose
    # checkpoint needs no g_idx permutation (answer-token perplexity over float, SmolLM2-135M, all linears, 4-bit g64,
    # 32 calibration windows: +0.27 against +0.54 for natural order, +0.39 for group-aware (damping 0.05; +0.48 at
    # 0.01), +0.25 for desc_act; with 128 windows +0.28 against +0.60 natural and +0.36 desc_act). Damping 0.01 beat
    # 0.05 and 0.1 for it (+0.30, +0.39).
    act_order: bool = opt(True, "GPTQ act-order: quantize columns by descending Hessian diagonal. With static groups "
                                "(the default) groups stay the contiguous k // group_size; without, g_idx becomes a "
                                "permutation (desc_act), which slows every kernel. --no-act-order --no-static-groups "
                                "is plain GPTQ.")
    static_groups: bool = opt(True, "Compute every group's scale and zero from the original weights up front, so "
                                    "act-order keeps contiguous groups.")
    group_aware: bool = opt(False, "Group-aware reordering (with --no-act-order): quantize groups by importance (max "
                                   "Hessian diagonal) and each group's columns by descending Hessian diagonal; groups "
                                   "stay contiguous, so g_idx needs no permutation.")
    damp_percent: float = opt(0.01, "Damping added to the Hessian diagonal, as a fraction of its mean.")
    block_size: int = opt(128, "GPTQ lazy-update block size (columns).")
    true_sequential: bool = opt(True, "Quantize a block's linears stage by stage ([k,v,q] -> o -> [up,gate] -> down), "
                                      "each stage calibrated on the outputs of the quantized previous ones.")
    targets: str = opt("attn", "Linears to quantize: 'attn' (q/k/v/o), 'mlp', 'all', or a comma list "
                               "such as 'q_proj,v_proj'.")
    calib_dtype: str = opt("auto", "Precision of the calibration forward passes: 'bfloat16', 'float32', or 'auto' "
                                   "(bfloat16 where the hardware runs it natively, as reference GPTQ runs fp16 on "
                                   "GPUs). Hessian products are float32 either way.",
                           choices=("auto", "float32", "bfloat16"))

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise UsageError(f"bits={self.bits} is not supported: choose 2, 3, 4 or 8")
        if self.group_size not in GROUP_SIZES:
            raise UsageError(f"group_size={self.group_size} is not supported: use -1 (one group per row) or one of "
                             f"{', '.join(map(str, GROUP_SIZES[1:]))} (what GPTQ loaders read)")
        if self.method not in ("gptq", "rtn"):
            raise UsageError(f"method={self.method!r} is unknown: use 'gptq' or 'rtn'")
        if self.act_order and self.group_aware:
            raise UsageError("act_order and group_aware are two column orders: pass --group-aware with --no-act-order")
        if not 0 < self.damp_percent < 1:
            raise UsageError(f"damp_percent={self.damp_percent} must be in (0, 1); 0.01 is the usual value")
        if self.block_size <= 0:
            raise UsageError(f"block_size={self.block_size} must be positive (128 is usual)")
        resolve_targets(self.targets)

    @property
    def target_names(self) -> tuple[str, ...]:
        return resolve_targets(self.targets)


@dataclass
class DataConfig:
    data: str = opt(None, "GSM8K source: a directory with train.jsonl/test.jsonl or a hub dataset id "
                          "(default $GSM8K_DIR when set, else openai/gsm8k). finetune also trains on a MetaMathQA or "
                          "MathInstruct JSON/JSONL file, directory or hub id given here, recognised by its fields.",
                    factory=default_data_source)

    def __post_init__(self) -> None:
        if not self.data:
            raise UsageError("empty --data: pass a directory holding train.jsonl/test.jsonl, or a hub dataset id")


MIX_GSM8K = "gsm8k"  # the name a training mixture gives GSM8K train (from --data)


def parse_mix(spec: str) -> tuple[tuple[str, float], ...]:
    """The training-mixture grammar: ``SOURCE=WEIGHT[,SOURCE=WEIGHT...]``, e.g. ``gsm8k=1,metamath.jsonl=0.2``.

    SOURCE is ``gsm8k`` (GSM8K train from ``--data``; write ``./gsm8k`` for a directory of that name) or anything
    ``--data`` takes; WEIGHT is a multiple of that source's size (1: every row once, 0.2: a seeded fifth, 2: every
    row twice), so a mixture reads as "GSM8K train plus a fifth of MetaMathQA". The last ``=`` splits a pair, so a
    path may hold ``=`` but not ``,``.

    Raises:
        UsageError: an empty spec, a pair without ``=``, a weight that is not a positive finite number, a source
            named twice.
    """
    pairs: list[tuple[str, float]] = []
    for item in (s.strip() for s in spec.split(",")):
        source, eq, weight = item.rpartition("=")
        source = source.strip()
        if not item or not eq or not source:
            raise UsageError(f"train mix item {item!r} is not SOURCE=WEIGHT: write e.g. "
                             f"--train-mix {MIX_GSM8K}=1,path/to/metamath.jsonl=0.2")
        try:
            w = float(weight)
        except ValueError:
            raise UsageError(f"train mix weight {weight!r} of {source!r} is not a number: use e.g. 1 or 0.2") from None
        if not 0 < w < float("inf"):
            raise UsageError(f"train mix weight {w} of {source!r} must be a positive multiple of its size "
                             "(1: all rows once, 0.2: a fifth); leave the source out to skip it")
        if source in (s for s, _ in pairs):
            raise UsageError(f"train mix names {source!r} twice: give each source once, with one weight")
        pairs.append((source, w))
    return tuple(pairs)


@dataclass
class TrainDataConfig:
    train_mix: str | None = opt(None, "Train on a weighted mixture instead of --data alone: SOURCE=WEIGHT pairs "
                                      "joined by commas, e.g. 'gsm8k=1,metamath.jsonl=0.2' (GSM8K train from --data, "
                                      "plus a seeded fifth of MetaMathQA); a weight is a multiple of the source's "
                                      "size. --data then names the GSM8K source only.")
    program_of_thought: bool = opt(False, "Keep MathInstruct's program-of-thought rows (Python programs, which the "
                                          "GSM8K scorer does not run) as training targets; by default they are "
                                          "dropped.")

    def __post_init__(self) -> None:
        if self.train_mix is not None:
            parse_mix(self.train_mix)

    @property
    def mix(self) -> tuple[tuple[str, float], ...]:
        """The mixture as (source, weight) pairs; empty when none is given."""
        return () if self.train_mix is None else parse_mix(self.train_mix)


@dataclass
class PromptConfig:
    prompt_style: str = opt("auto", "Prompt format: 'plain' (base models), 'chat' (the tokenizer's chat template) "
                                    "or 'auto' (chat when the tokenizer has a template).",
                            choices=("auto", "plain", "chat"))


@dataclass
class CalibConfig:
    calib_samples: int = opt(128, "Number of calibration sequences.")
    calib_seqlen: int = opt(512, "Tokens per calibration sequence.")
    calib_text: str | None = opt(None, "A UTF-8 text file to calibrate on instead of GSM8K train.")
    calib_data: str | None = opt(None, "A corpus to calibrate on instead of GSM8K train: MetaMathQA, MathInstruct "
                                       "or GSM8K as a JSON/JSONL file, a directory or a hub id, recognised by its "
                                       "fields as finetune's --data is (questions equal to a GSM8K test question "
                                       "are left out).")

    def __post_init__(self) -> None:
        if self.calib_samples <= 0 or self.calib_seqlen <= 0:
            raise UsageError(f"calib_samples={self.calib_samples} and calib_seqlen={self.calib_seqlen} must be "
                             "positive")
        if self.calib_text is not None and self.calib_data is not None:
            raise UsageError("--calib-text and --calib-data are two calibration sources: give one")
        if self.calib_data is not None and self.calib_data.startswith((".", "/", "~")) and not os.path.exists(
                os.path.expanduser(self.calib_data)):
            raise InputNotFoundError(f"calibration data {self.calib_data!r} does not exist: give a JSON/JSONL file, "
                                     "a directory or a hub dataset id")
        if self.calib_text is not None and not os.path.isfile(self.calib_text):
            raise InputNotFoundError(f"calibration text file {self.calib_text!r} does not exist: give a path to a "
                                     "UTF-8 text file, or leave --calib-text out to calibrate on GSM8K train")


@dataclass
class LoRAConfig:
    r: int = opt(16, "LoRA rank.", aliases=("--lora-r", "--rank"))
    alpha: float = opt(32.0, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with --rslora).",
                       aliases=("--lora-alpha",))
    dropout: float = opt(0.05, "Dropout on the LoRA input.", aliases=("--lora-dropout",))
    lora_targets: str = opt("attn", "Modules to adapt: 'attn' (q/k/v/o), 'mlp', 'all', a comma list of names, "
                                    "or a regex over full module names prefixed 're:'.")
    rslora: bool = opt(False, "Rank-stabilised scaling alpha/sqrt(r).")

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise UsageError(f"LoRA rank r={self.r} must be positive (8 or 16 are usual)")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"LoRA dropout={self.dropout} must be in [0, 1)")
        if not self.alpha > 0:
            raise UsageError(f"LoRA alpha={self.alpha} must be positive")
        parse_targets(self.lora_targets)


# A switch that can also be left to the library: 'auto' decides from the job and the hardware.
AUTO_ON_OFF = ("auto", "on", "off")


@dataclass
class TrainConfig:
    out: str = opt("checkpoints", "Output directory: quantized_base/, lora_adapter/, training checkpoints and logs.")
    epochs: float = opt(1.0, "Passes over the training examples (ignored when --max-steps is set).")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps.")
    batch_size: int = opt(2, "Examples per micro-batch, per process under torchrun (global batch: batch x processes"
                             " x grad accumulation).")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.", aliases=("--gradient-accumulation-steps",))
    lr: float = opt(2e-4, "Peak learning rate (AdamW).", aliases=("--learning-rate",))
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    warmup_steps: int = opt(10, "Linear warmup steps before cosine decay.")
    min_lr_ratio: float = opt(0.1, "Final learning rate as a fraction of the peak.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables).")
    max_length: int = opt(256, "Tokens per training example (prompt + solution), truncated beyond.")
    train_limit: int | None = opt(None, "Use only the first N (shuffled) training examples (default: all).")
    eval_holdout: int = opt(64, "Training examples held out for periodic eval loss (0: none).")
    eval_every: int = opt(50, "Steps between held-out evaluations.")
    save_every: int = opt(50, "Steps between training checkpoints.")
    log_every: int = opt(1, "Steps between metric lines in metrics.jsonl.")
    gradient_checkpointing: bool = opt(True, "Recompute block activations in the backward pass to save memory.")
    checkpoint_every: int = opt(1, "With gradient checkpointing, checkpoint one decoder block in this many (1: "
                                   "every block). The others keep their activations for the backward instead of "
                                   "recomputing them: a faster step for their memory, the same results. Over a "
                                   "4-bit base the memory its weights save can pay for them (benchmarks/RESULTS.md).")
    dequantize_once: str = opt("off", "Over a quantized base: keep each layer's dense weight from its first forward of "
                                      "a step to the step's end, so it is dequantized once per step, not twice "
                                      "(forward and checkpointed recompute), for the memory of those dense copies. "
                                      "'on', 'off', or 'auto': on when they take at most an eighth of the free "
                                      "memory. Same results. Off by default: on a 2-core CPU it was no faster with "
                                      "two threads (benchmarks/RESULTS.md).",
                               choices=AUTO_ON_OFF)
    compile_blocks: bool = opt(False, "Compile each decoder block (torch.compile), checkpointed as without: the same "
                                      "steps up to float rounding without LoRA dropout (with it, the compiled blocks "
                                      "draw their masks from inductor's generator). For GPUs, where it fuses the "
                                      "blocks' elementwise work; on a CPU the step is matmul-bound and was no faster "
                                      "(benchmarks/RESULTS.md).")
    bf16: bool | None = opt(None, "bf16 autocast (default: when the hardware supports it).")
    resume: bool = opt(False, "Continue from the last training checkpoint in --out.")
    fsdp: bool = opt(False, "Under torchrun (2 or more processes): shard the model with FSDP2 instead of "
                            "replicating it with DDP. Each process keeps 1/N of the LoRA weights, their gradients and "
                            "AdamW states, and of the float weights (embeddings, norms, head, unquantized linears); "
                            "the packed quantized weights stay whole in every process. Same steps as DDP, same "
                            "files written.")

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_length", "eval_every", "save_every", "log_every",
                     "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name}={getattr(self, name)} must be positive")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UsageError(f"max_steps={self.max_steps} must be positive")
        if self.compile_blocks and self.fsdp:
            raise UsageError("--compile-blocks with --fsdp is not supported: compile with DDP (leave out --fsdp)")
        if self.dequantize_once not in AUTO_ON_OFF:
            raise UsageError(f"dequantize_once {self.dequantize_once!r} is unknown: use {', '.join(AUTO_ON_OFF)}")
        if self.epochs <= 0:
            raise UsageError(f"epochs={self.epochs} must be positive")
        if not self.lr > 0:
            raise UsageError(f"lr={self.lr} must be positive")
        if self.weight_decay < 0:
            raise UsageError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.warmup_steps < 0:
            raise UsageError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UsageError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.max_grad_norm < 0:
            raise UsageError(f"max_grad_norm={self.max_grad_norm} must be >= 0 (0 disables clipping)")
        if self.train_limit is not None and self.train_limit <= 0:
            raise UsageError(f"train_limit={self.train_limit} must be positive; leave it out to train on every "
                             "example")
        if self.eval_holdout < 0:
            raise UsageError(f"eval_holdout={self.eval_holdout} must be >= 0 (0 holds nothing out)")
        if not self.out:
            raise UsageError("--out is empty: give the run's output directory")


@dataclass
class SplitConfig:
    split: str = opt("test", "GSM8K split to score.", choices=("train", "test"))
    limit: int | None = opt(None, "Score the first N questions only (default: the whole split).")

    def __post_init__(self) -> None:
        if self.split not in ("train", "test"):
            raise UsageError(f"split={self.split!r} is unknown: use 'train' or 'test'")
        if self.limit is not None and self.limit <= 0:
            raise UsageError(f"limit={self.limit} must be positive; leave it out for the whole split")


@dataclass
class EvalConfig:
    eval_batch_size: int = opt(16, "Questions per generation batch.")
    max_new_tokens: int = opt(256, "Generation budget per answer.")
    shots: int = opt(0, "Fixed few-shot exemplars from the train split placed before the question (for base models).")
    samples: int = opt(0, "Self-consistency: sampled solutions per question, majority-voted (0 = greedy only).")
    temperature: float | None = opt(None, f"Sampling temperature for self-consistency (with --samples; default "
                                          f"{DEFAULT_TEMPERATURE}).")
    top_p: float | None = opt(None, f"Nucleus sampling threshold for self-consistency (with --samples; default "
                                    f"{DEFAULT_TOP_P}).")

    def __post_init__(self) -> None:
        if self.eval_batch_size <= 0 or self.max_new_tokens <= 0:
            raise UsageError(f"batch size ({self.eval_batch_size}) and max_new_tokens ({self.max_new_tokens}) must "
                             "be positive")
        if self.shots < 0 or self.samples < 0:
            raise UsageError(f"shots ({self.shots}) and samples ({self.samples}) must be >= 0")
        if not self.samples:
            given = [n for n in ("temperature", "top_p") if getattr(self, n) is not None]
            if given:
                raise UsageError(f"--{given[0].replace('_', '-')} only applies to sampling: add --samples K "
                                 "(self-consistency), or leave it out for greedy decoding")
            return
        self.temperature = DEFAULT_TEMPERATURE if self.temperature is None else self.temperature
        self.top_p = DEFAULT_TOP_P if self.top_p is None else self.top_p
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise UsageError(f"self-consistency needs temperature > 0 and 0 < top_p <= 1 "
                             f"(got {self.temperature}, {self.top_p})")


ENGINES = ("ours", "vllm")
# --compile: our decode step compiled ('on'), eager ('off'), or compiled when the job is long enough ('auto').
COMPILE_CHOICES = AUTO_ON_OFF


@dataclass
class EngineConfig:
    engine: str = opt("ours", "What generates: 'ours' (our decoding loop, the reference) or 'vllm' (a vLLM server "
                              "started from the environment `make vllm-env` builds, or the one at --engine-url).",
                      choices=ENGINES)
    engine_url: str | None = opt(None, "With --engine vllm: a running vLLM server (http://HOST:PORT) serving the model "
                                       "(and the adapter as a LoRA module) to use instead of starting one.")
    vllm_python: str | None = opt(None, "With --engine vllm: the Python of the vLLM environment (default "
                                        "$GPTQLORA_VLLM_PYTHON, else .venv-vllm/bin/python).")
    tensor_parallel_size: int = opt(1, "With --engine vllm on GPUs: the GPUs vLLM splits the model over.")
    compile: str = opt("auto", "With --engine ours: decode with a compiled step over a static KV cache (torch.compile; "
                               "'auto' when the job is long enough to pay for compiling, 'on', or 'off' for the eager "
                               "loop).", choices=COMPILE_CHOICES)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise UsageError(f"engine {self.engine!r} is unknown: use {' or '.join(ENGINES)}")
        if self.compile not in COMPILE_CHOICES:
            raise UsageError(f"compile {self.compile!r} is unknown: use {', '.join(COMPILE_CHOICES)}")
        if self.engine == "vllm" and self.compile != "auto":
            raise UsageError("--compile is for --engine ours: vLLM compiles its own model")
        if self.engine != "vllm":
            given = [n for n in ("engine_url", "vllm_python") if getattr(self, n)]
            if given or self.tensor_parallel_size != 1:
                name = given[0] if given else "tensor_parallel_size"
                raise UsageError(f"--{name.replace('_', '-')} is for --engine vllm")
        if self.tensor_parallel_size < 1:
            raise UsageError(f"tensor_parallel_size ({self.tensor_parallel_size}) must be >= 1")
        if self.engine_url and not re.match(r"^https?://[^/\s]+/?$", self.engine_url):
            raise UsageError(f"--engine-url {self.engine_url!r}: give http://HOST:PORT")


@dataclass
class RunConfig:
    test_limit: int = opt(250, "Test questions `gptqlora run` evaluates each model on (0 = the whole test split).")
    train_steps: int = opt(300, "Optimizer steps `gptqlora run` trains for (0 = follow --epochs); --max-steps "
                                "overrides it.")
    skip_float_eval: bool = opt(False, "Leave the float base out of the final table (saves one evaluation).")
    verifier_questions: int = opt(0, "The verifier stage, after fine-tuning (0 = none): sample --verifier-samples "
                                     "solutions for this many GSM8K train questions with base + adapter, train a "
                                     "verifier on them (train-verifier's defaults) and rerank as many samples per "
                                     "test question: one more row (greedy, vote, verifier, pass@K).")
    verifier_samples: int = opt(8, "Samples per question of the verifier stage (training and reranking).")

    def __post_init__(self) -> None:
        if self.test_limit < 0 or self.train_steps < 0:
            raise UsageError(f"test_limit ({self.test_limit}) and train_steps ({self.train_steps}) must be >= 0")
        if self.verifier_questions < 0 or self.verifier_samples < 1:
            raise UsageError(f"verifier_questions ({self.verifier_questions}) must be >= 0 and verifier_samples "
                             f"({self.verifier_samples}) >= 1")


@dataclass
class VerifierTrainConfig:
    epochs: float = opt(1.0, "Passes over the labelled samples (ignored when --max-steps is set).")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps.")
    batch_size: int = opt(8, "Labelled solutions per optimizer step.")
    lr: float = opt(1e-4, "Peak learning rate (AdamW) of the verifier's LoRA and value head.")
    warmup_steps: int = opt(10, "Linear warmup steps before cosine decay.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables).")
    max_length: int = opt(512, "Tokens of prompt + solution the verifier reads; beyond, the prompt's start is cut "
                               "(the solution's end, where it is scored, stays).")
    lm_loss_weight: float = opt(0.0, "Weight of the language-model loss on correct solutions added to the value "
                                     "loss (0: value loss only).")
    balance: bool = opt(True, "Weigh correct and incorrect samples by the inverse of their frequency, so a rare "
                              "class counts as much as the common one.")
    val_questions: int = opt(0, "Questions held out (all their samples) to report the verifier's AUC on questions "
                                     "it never saw.")
    bf16: bool | None = opt(None, "bf16 autocast (default: when the hardware supports it).")

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.max_length < 2:
            raise UsageError(f"batch_size ({self.batch_size}) must be positive and max_length ({self.max_length}) "
                             "at least 2")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UsageError(f"max_steps={self.max_steps} must be positive")
        if self.epochs <= 0 or not self.lr > 0:
            raise UsageError(f"epochs ({self.epochs}) and lr ({self.lr}) must be positive")
        if self.warmup_steps < 0 or self.max_grad_norm < 0 or self.lm_loss_weight < 0 or self.val_questions < 0:
            raise UsageError("warmup_steps, max_grad_norm, lm_loss_weight and val_questions must be >= 0")
