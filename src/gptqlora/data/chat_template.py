"""Chat templates rendered within bounds: a template is code from a model's directory, possibly a stranger's.

transformers renders it in jinja's sandbox, which blocks escapes (as a SecurityError) but neither time nor size: nested
``range(100000)`` loops run for hours. So every render of a chat template goes through ``render_chat_template``,
bounded in time (SIGALRM on the main thread) and in output size, and a template is probed once
(``check_chat_template``) where the prompt style is decided, before any prompt is built or any model runs.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Sequence

from gptqlora.errors import UsageError

# The bounds of one render:
CHAT_TEMPLATE_SECONDS = 5.0  # one GSM8K prompt renders in about a millisecond
CHAT_TEMPLATE_MAX_CHARS = 1_000_000  # an 8-shot GSM8K chat prompt is ~6,000 characters
# The probe's last question: a template that leaves it out of the rendered prompt would drop every real question.
_PROBE_QUESTION = "What is 4 + 4?"


class _RenderTimeout(BaseException):
    """Raised in a render by the timer's signal handler. Not an Exception, so no ``except Exception`` between the
    template and render_chat_template (jinja's render has one) can take it for the template's own error."""


def _within(seconds: float, call: Callable[[], str]) -> str:
    """``call()``, stopped by _RenderTimeout after ``seconds``.

    SIGALRM from ``setitimer(ITIMER_REAL)``; the previous handler and timer are put back afterwards, the timer with
    what was left of it. Only the main thread receives signals, so elsewhere (gptqlora renders no prompts off it), or
    when the SIGALRM handler was installed outside Python and could not be put back, the call runs unbounded.
    """
    old_handler = signal.getsignal(signal.SIGALRM) if hasattr(signal, "setitimer") else None
    if threading.current_thread() is not threading.main_thread() or old_handler is None:
        return call()
    armed = True

    def on_alarm(signum, frame):
        if armed:  # an alarm caught just after the call returned is ignored
            raise _RenderTimeout

    signal.signal(signal.SIGALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        return call()
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay:  # someone else's timer: re-arm it with what is left (a tick if it fell due meanwhile)
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - start), 1e-6), old_interval)


def _template_source(tokenizer) -> str:
    """Where a tokenizer's chat template came from, for messages."""
    where = getattr(tokenizer, "name_or_path", "") or ""
    return (f"the chat template of {where} (from its tokenizer_config.json or chat_template.jinja)" if where
            else "the tokenizer's chat template")


def render_chat_template(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The tokenizer's chat template applied to ``messages`` (text, not ids), within bounds.

    Every render of a chat template goes through here: at most CHAT_TEMPLATE_SECONDS and CHAT_TEMPLATE_MAX_CHARS.

    Raises:
        UsageError: one line naming the template's source (the tokenizer's name_or_path) and the cause: a render
            past the time bound, an output past the size bound, a sandbox violation (jinja2's SecurityError), a
            template error (a syntax error, ``raise_exception(...)``) or any other exception the template raised.
    """
    fix = "fix or remove the template, or pass --prompt-style plain"
    try:
        text = _within(CHAT_TEMPLATE_SECONDS, lambda: tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt))
    except _RenderTimeout:
        raise UsageError(f"{_template_source(tokenizer)} took more than {CHAT_TEMPLATE_SECONDS:g} s to render one "
                         f"prompt (a runaway loop?): {fix}") from None
    except Exception as e:  # the template is a stranger's code: whatever it raises is its fault, said in one line
        from jinja2.exceptions import SecurityError, TemplateError  # a dependency of transformers' chat templates

        cause = ("broke the sandbox's rules" if isinstance(e, SecurityError) else
                 "failed" if isinstance(e, TemplateError) else f"raised {type(e).__name__}")
        detail = " ".join(str(e).split())[:300]  # one line, and a bounded one
        raise UsageError(f"{_template_source(tokenizer)} {cause} ({detail}): {fix}") from e
    if len(text) > CHAT_TEMPLATE_MAX_CHARS:
        raise UsageError(f"{_template_source(tokenizer)} rendered {len(text):,} characters for one prompt, more than "
                         f"{CHAT_TEMPLATE_MAX_CHARS:,}: {fix}")
    return text


def check_chat_template(tokenizer, system_prompt: str) -> None:
    """Render a small conversation shaped as a GSM8K chat prompt (the system prompt, one solved exemplar, the
    question), so a template that hangs, errs, escapes its sandbox or drops the question fails before any work.

    Args:
        tokenizer: a tokenizer with a chat template.
        system_prompt: the system turn the real prompts open with.
    Raises:
        UsageError: see ``render_chat_template``; also a template that leaves the question out of the prompt.
    """
    probe = [{"role": "system", "content": system_prompt}, {"role": "user", "content": "What is 2 + 3?"},
             {"role": "assistant", "content": "2 + 3 = 5\n#### 5"}, {"role": "user", "content": _PROBE_QUESTION}]
    if _PROBE_QUESTION not in render_chat_template(tokenizer, probe):
        raise UsageError(f"{_template_source(tokenizer)} renders a conversation without its last question "
                         f"({_PROBE_QUESTION!r}), so no prompt would hold the question: fix the template, or pass "
                         "--prompt-style plain")
