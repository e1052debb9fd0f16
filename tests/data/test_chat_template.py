"""Chat templates, a stranger's code: every render bounded in time and size, every failure one line naming the
model directory, and the template probed where the prompt style is decided (before any model loads)."""

from __future__ import annotations

import pytest

from gptqlora.data.gsm8k import build_prompt, resolve_style
from gptqlora.errors import UsageError

QUESTION = "Natalia sold clips to 48 of her friends in April. How many clips did Natalia sell?"


def stranger_tokenizer(tmp_path, template: str):
    """A tokenizer loaded from a model directory whose chat_template.jinja is ``template``."""
    from transformers import AutoTokenizer

    from conftest import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tok.chat_template = template
    tok.save_pretrained(tmp_path / "stranger")
    return AutoTokenizer.from_pretrained(tmp_path / "stranger")


@pytest.mark.parametrize("template, cause", [
    ("{{ ''.__class__.__mro__ }}", "broke the sandbox's rules (access to attribute '__class__'"),
    ("{{ cycler.__init__.__globals__ }}", "broke the sandbox's rules"),
    ("{{ raise_exception('System role not supported') }}", "failed (System role not supported)"),
    ("{% for m in messages %}{{ m.content }}", "failed (Unexpected end of template"),
    ("{{ messages | map(attribute='content') | sum }}", "raised TypeError"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took more than 1 s"),
    ("{% for i in range(100000) %}{{ 'x' * 500 }}{% endfor %}", "rendered 50,000,000 characters"),
    ("{{ 'Answer me.' }}", "renders a conversation without its last question"),
])
def test_a_bad_chat_template_is_one_line_naming_its_model_directory(tmp_path, monkeypatch, template, cause):
    from gptqlora.data import chat_template
    from conftest import deadline

    monkeypatch.setattr(chat_template, "CHAT_TEMPLATE_SECONDS", 1.0)
    tok = stranger_tokenizer(tmp_path, template)
    with deadline(10):
        with pytest.raises(UsageError) as e:
            resolve_style("auto", tok)  # the probe: where eval, sample and training first resolve the style
        if "question" not in cause:  # and every render, should a prompt be built without the probe
            with pytest.raises(UsageError, match=cause.split(" (")[0]):
                build_prompt(QUESTION, "chat", tok)
    message = str(e.value)
    assert message.startswith(f"the chat template of {tmp_path / 'stranger'} ") and "\n" not in message
    assert cause in message and message.endswith("--prompt-style plain")


def test_a_runaway_template_is_stopped_and_the_callers_alarm_survives(tmp_path, monkeypatch):
    import signal
    import time

    from gptqlora.data import chat_template

    monkeypatch.setattr(chat_template, "CHAT_TEMPLATE_SECONDS", 0.5)
    tok = stranger_tokenizer(tmp_path, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                       "{% endfor %}")

    def callers(signum, frame):
        pytest.fail("the caller's alarm went off: the render was not stopped")

    old = signal.signal(signal.SIGALRM, callers)
    signal.setitimer(signal.ITIMER_REAL, 8.0)
    try:
        start = time.monotonic()
        with pytest.raises(UsageError, match="took more than 0.5 s"):
            resolve_style("chat", tok)
        assert time.monotonic() - start < 4
        # The caller's handler is back and its timer runs on with what was left of it.
        assert signal.getsignal(signal.SIGALRM) is callers
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 7.5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)



@pytest.mark.parametrize("command", ["eval", "sample"])
def test_cli_refuses_a_looping_template_before_the_model_loads(tmp_path, gsm8k_dir, capsys, monkeypatch, command):
    """eval and sample probe the model directory's template from its tokenizer alone, before any weights load."""
    import gptqlora.models
    from conftest import deadline, error_of, make_tiny_llama
    from gptqlora import cli
    from gptqlora.data import chat_template

    stranger_tokenizer(tmp_path, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    make_tiny_llama().save_pretrained(tmp_path / "stranger")
    monkeypatch.setattr(chat_template, "CHAT_TEMPLATE_SECONDS", 1.0)
    monkeypatch.setattr(gptqlora.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    out = ["--output-dir", str(tmp_path / "out")] if command == "eval" else ["--out", str(tmp_path / "out"), "--samples", "2"]
    capsys.readouterr()
    with deadline(20):
        code = cli.main([command, "--model", str(tmp_path / "stranger"), "--data", str(gsm8k_dir), "--limit", "1",
                         *out])
    line = error_of(capsys)
    assert code == 2 and "chat template" in line and "stranger" in line and "took more than 1 s" in line, line
    assert not (tmp_path / "out").exists()
