"""Shared fixtures: tiny seeded models and a tiny byte-level tokenizer, so unit tests run in seconds offline."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
GSM8K_DIR = Path(os.environ.get("GSM8K_DIR", REPO.parent / "shared" / "data" / "gsm8k")).resolve()

SMOLLM_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_tokenizer(chat_template: bool = True):
    """A byte-level tokenizer (256 byte tokens + 3 specials); pad == eos, as in the embedded SmolLM2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    if chat_template:
        tok.chat_template = SMOLLM_CHAT_TEMPLATE
    return tok


def make_tiny_llama(num_layers: int = 2, hidden: int = 64, intermediate: int = 128, vocab: int = 259, seed: int = 0):
    """A seeded random LlamaForCausalLM with SmolLM2's shape ratios (GQA, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=257, eos_token_id=258,
                         pad_token_id=258)
    model = LlamaForCausalLM(config).eval()
    return model


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked ``gpu`` where torch sees no CUDA device: one gate, not a ``skipif`` on each."""
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(no_cuda)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a python child process of a test (a script, ``python -c``, torchrun and its workers).

    This process's environment with tests/ and src/ first on PYTHONPATH, so the child imports the shared fixtures
    and their siblings (``from conftest import ...``, ``from eval.eval_script import ...``) as pytest's
    ``pythonpath`` lets the tests do, and PYTHONSAFEPATH=1, so that neither its working directory nor a script's own
    folder comes before them (tests/train/tiny.py sits beside tests/train/conftest.py); ``extra`` goes on top.
    """
    paths = [str(TESTS), str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return os.environ | {"PYTHONPATH": os.pathsep.join(paths), "PYTHONSAFEPATH": "1"} | extra


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread within it, as the subprocesses and the ranks of the two-process tests run (the same
    kernels, so the same generations); the thread count before it comes back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail the test, rather than hang it, when the block runs longer than ``seconds``.

    A SIGALRM in the main thread; Python's regex engine and jinja's loops both stop for it.
    """
    def hung(signum, frame):
        pytest.fail(f"still running after {seconds} s: this would hang")

    old = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def error_of(capsys) -> str:
    """The one line a refused command printed on stderr (no traceback, nothing else)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # one line
    return lines[0]


@pytest.fixture
def one_thread(monkeypatch):
    """As each rank of the two-process tests runs: one thread (``one_torch_thread``); OMP_NUM_THREADS keeps a CLI
    run in this process to it."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with one_torch_thread():
        yield


@pytest.fixture
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "train.jsonl").is_file():
        pytest.fail(f"GSM8K not found at {GSM8K_DIR}: set GSM8K_DIR to the directory holding train.jsonl/test.jsonl")
    return GSM8K_DIR
