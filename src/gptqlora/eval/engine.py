"""What generates for an evaluation or a sampling: our own decoding loop on a loaded model (the reference), or an
engine that serves the model elsewhere (``gptqlora.eval.vllm.VLLMEngine``).

Both take the same prompts and give the same kind of answer, so the records, the resume and the scores around them
(:mod:`gptqlora.eval.gsm8k_eval`, ``gptqlora.verifier.samples``) do not know which one ran:

- ``greedy(prompts, ...)``: one greedy continuation per prompt, stopped after a complete ``#### <number>`` line;
- ``samples(prompts, k, ...)``: ``k`` sampled continuations per prompt, reproducible from ``seed``;
- ``answer_loss(entries, style, batch_size)``: the teacher-forced answer-token loss of the gold solutions;
- ``kernels()``: the quantized layers per backend that ran (ours only);
- ``expect(steps, rows)``: the decoding steps and batch rows of the job, told before it starts: ours compiles its
  decode step (``gptqlora.eval.decode``) when its ``compile`` setting is ``on``, or ``auto`` and compiling pays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from gptqlora.eval.decode import use_compiled
from gptqlora.eval.generate import generate, generate_samples


class Engine:
    """The generation interface; :class:`LocalEngine` is the reference every other engine is tested against."""

    name: str = "engine"

    def greedy(self, prompts: list[str], *, max_new_tokens: int, batch_size: int,
               add_special_tokens: bool) -> list[str]:
        raise NotImplementedError

    def samples(self, prompts: list[str], *, k: int, temperature: float, top_p: float, seed: int,
                max_new_tokens: int, batch_size: int, add_special_tokens: bool) -> list[list[str]]:
        raise NotImplementedError

    def answer_loss(self, entries: Sequence[dict], style: str, batch_size: int) -> dict[str, Any]:
        raise NotImplementedError

    def kernels(self) -> dict[str, int] | None:
        return None

    def expect(self, steps: int, rows: int) -> None:
        """The decoding steps (batches x budget, samples included) this engine is about to run on this rank, in
        batches of ``rows`` rows."""


class LocalEngine(Engine):
    """Our decoding loop (``gptqlora.eval.generate``) on a model loaded in this process."""

    name = "ours"

    def __init__(self, model: nn.Module, tokenizer, compile: str = "auto"):
        """``compile``: 'auto', 'on' or 'off' (``EngineConfig.compile``); decided by :meth:`expect`."""
        self.model, self.tokenizer, self.compile = model, tokenizer, compile
        self.compiled = use_compiled(compile, 0, 1)

    def expect(self, steps, rows):
        self.compiled = use_compiled(self.compile, steps, rows)

    def greedy(self, prompts, *, max_new_tokens, batch_size, add_special_tokens):
        return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        stop_after_answer_line=True, add_special_tokens=add_special_tokens, compiled=self.compiled)

    def samples(self, prompts, *, k, temperature, top_p, seed, max_new_tokens, batch_size, add_special_tokens):
        """One generator seeded with ``seed`` draws every sample of the call, the ``k`` copies of each prompt side by
        side in the batch stream."""
        return generate_samples(self.model, self.tokenizer, prompts, k=k, temperature=temperature, top_p=top_p,
                                seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                stop_after_answer_line=True, add_special_tokens=add_special_tokens,
                                compiled=self.compiled)

    def answer_loss(self, entries, style, batch_size):
        from gptqlora.eval.perplexity import gsm8k_answer_loss

        return gsm8k_answer_loss(self.model, self.tokenizer, list(entries), style=style, batch_size=batch_size)

    def kernels(self):
        from gptqlora.quant.linear import kernels_used

        # tests may pass a stand-in for the model
        return (kernels_used(self.model) or None) if isinstance(self.model, nn.Module) else None


def as_engine(model: nn.Module | Engine, tokenizer) -> Engine:
    """``model`` itself when it is an engine, else our loop on it (``compile='auto'``)."""
    return model if isinstance(model, Engine) else LocalEngine(model, tokenizer)
