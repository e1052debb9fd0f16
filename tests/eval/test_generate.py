"""Our decoding loop: batched == one at a time == Hugging Face's generate, stop rules, padding, sampling."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

from gptqlora.eval.generate import (
    answer_line_complete,
    generate,
    generate_batch,
    generate_samples,
    left_pad,
    position_ids_from_mask,
    sample_next_token,
    stop_cut,
)

PROMPTS = [
    "Natalia sold clips to 48 of her friends",
    "Q: 2+2?",
    "A much longer prompt with several words in it, so the others get left padded by many tokens.",
    "x",
    "Weng earns $12 an hour for babysitting.",
]
EOS = 258  # <|im_end|>, also the pad token


def chaotic_llama(seed: int = 0):
    """The tiny llama with weights of unit-scale activations: the default 0.02-std init makes a tied-embedding model
    echo its last token, which would hide padding and position bugs; these weights make the output depend on the
    whole context (and the first of PROMPTS ends in eos after 26 greedy tokens)."""
    model = make_tiny_llama(seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(3.0 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def model():
    return chaotic_llama()


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def encode(tok, prompts):
    return [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_batched_greedy_equals_one_at_a_time(model, tok):
    enc = encode(tok, PROMPTS)
    batched = generate_batch(model, enc, max_new_tokens=30, pad_id=EOS, eos_ids={EOS})
    single = [generate_batch(model, [e], max_new_tokens=30, pad_id=EOS, eos_ids={EOS})[0] for e in enc]
    assert batched == single
    # The texts differ between prompts and one sequence ends at eos mid-batch: the comparison is not vacuous.
    assert len({tuple(s) for s in single}) == len(PROMPTS)
    assert any(len(s) < 30 for s in single) and any(len(s) == 30 for s in single)
    # Through the text API: sorted by length into batches of 4 and 1, and put back in order.
    texts = generate(model, tok, PROMPTS, max_new_tokens=30, batch_size=4, stop_after_answer_line=False)
    assert texts == [tok.decode(s, skip_special_tokens=True) for s in single]


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_greedy_equals_hf_generate(model, tok, prompt):
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=30,
                         pad_token_id=EOS)[0, ids.shape[1]:].tolist()
    ref = ref[:ref.index(EOS)] if EOS in ref else ref  # HF keeps the eos and pads after it; we drop both
    ours = generate_batch(model, ids.tolist(), max_new_tokens=30, pad_id=EOS, eos_ids={EOS})[0]
    assert ours == ref


def test_answer_line_complete():
    assert answer_line_complete("so 3 + 4 = 7\n#### 7") is None  # not finished: more digits may follow
    assert answer_line_complete("#### \n") is None  # no number
    text = "Step one.\n#### 1,234\nQuestion: next"
    assert text[:answer_line_complete(text)] == "Step one.\n#### 1,234"
    text = "#### -3.5 dollars\n#### 9\n"
    assert text[:answer_line_complete(text)] == "#### -3.5 dollars"  # the first answer line wins


def test_stop_cut():
    assert stop_cut("abc Question: d", stop_strings=["Question:"]) == 4
    assert stop_cut("#### 5\nQuestion: 6\n", stop_strings=["Question:"]) == 6  # the earliest cut wins
    assert stop_cut("#### 5\n", stop_after_answer_line=False) is None
    assert stop_cut("plain text", stop_strings=["", "zz"]) is None


class ScriptedLM(torch.nn.Module):
    """A fake causal LM that writes a fixed script per prompt (chosen by the prompt's last token) and records
    what the loop feeds it."""

    def __init__(self, tok, scripts: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config, self.tok = None, tok
        self.scripts = {tok.convert_tokens_to_ids(k): tok(v, add_special_tokens=False)["input_ids"] + [EOS]
                        for k, v in scripts.items()}
        self.calls = []

    def forward(self, input_ids, attention_mask, position_ids, cache=None, use_cache=True, logits_to_keep=0):
        self.calls.append((input_ids.clone(), attention_mask.clone(), position_ids.clone()))
        if len(self.calls) == 1:
            self.rows = [self.scripts[int(t)] for t in input_ids[:, -1]]
        step = len(self.calls) - 1
        logits = torch.zeros(input_ids.shape[0], 1, 300)
        for i, script in enumerate(self.rows):
            logits[i, 0, script[min(step, len(script) - 1)]] = 1.0
        return SimpleNamespace(logits=logits)


def test_stops_eos_answer_line_and_masks_finished(tok):
    scripts = {"a": "x = 2\n#### 42\nQuestion: more text", "b": "yy", "c": "sixteen chars ok and more"}
    lm = ScriptedLM(tok, scripts)
    out = generate(lm, tok, ["a", "b", "c"], max_new_tokens=16, batch_size=3)
    assert out == ["x = 2\n#### 42", "yy", "sixteen chars ok"]
    # "b" finished at its eos (3rd token); afterwards it is fed pad with a 0 mask, while "c" stays unmasked.
    row_b = next(i for i, t in enumerate(lm.calls[0][0][:, -1].tolist()) if t == tok.convert_tokens_to_ids("b"))
    for ids, mask, pos in lm.calls[4:]:
        assert ids[row_b, -1] == EOS and mask[row_b, -1] == 0
    final_ids, final_mask, final_pos = lm.calls[-1]
    row_c = next(i for i, t in enumerate(lm.calls[0][0][:, -1].tolist()) if t == tok.convert_tokens_to_ids("c"))
    assert final_mask[row_c].all() and final_pos[row_c, -1] == final_mask.shape[1] - 1
    assert len(lm.calls) == 16  # "c" runs the whole budget; no forward after the last token


def test_stop_strings_and_all_finished_ends_loop(tok):
    lm = ScriptedLM(tok, {"a": "one\nQuestion: two", "b": "ab"})
    out = generate(lm, tok, ["a", "b"], max_new_tokens=50, stop_strings=["Question:"])
    assert out == ["one\n", "ab"]
    assert len(lm.calls) == len("one\nQuestion:")  # stopped as soon as both were done


def test_sample_next_token_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    drawn = sample_next_token(logits, temperature=1.0, top_p=0.8, generator=g)
    assert set(drawn.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.8: the tail is never drawn
    assert abs((drawn == 0).float().mean().item() - 0.5 / 0.8) < 0.05  # renormalised within the nucleus
    assert sample_next_token(logits[:3], temperature=1.0, top_p=1e-6, generator=g).tolist() == [0, 0, 0]
    assert sample_next_token(logits[:3]).tolist() == [0, 0, 0]  # greedy


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(model, tok):
    kw = dict(max_new_tokens=12, batch_size=2, stop_after_answer_line=False)
    prompts = PROMPTS[:3]
    a = generate(model, tok, prompts, temperature=1.0, generator=torch.Generator().manual_seed(1), **kw)
    b = generate(model, tok, prompts, temperature=1.0, generator=torch.Generator().manual_seed(1), **kw)
    c = generate(model, tok, prompts, temperature=1.0, generator=torch.Generator().manual_seed(2), **kw)
    assert a == b and a != c
    greedy = generate(model, tok, prompts, **kw)
    nucleus_of_one = generate(model, tok, prompts, temperature=1.0, top_p=1e-9,
                              generator=torch.Generator().manual_seed(3), **kw)
    assert nucleus_of_one == greedy


def test_generate_samples(model, tok):
    kw = dict(max_new_tokens=10, batch_size=6, stop_after_answer_line=False)
    s1 = generate_samples(model, tok, PROMPTS[:2], k=3, temperature=1.0, top_p=0.95, seed=7, **kw)
    s2 = generate_samples(model, tok, PROMPTS[:2], k=3, temperature=1.0, top_p=0.95, seed=7, **kw)
    assert s1 == s2 and [len(s) for s in s1] == [3, 3]
    assert all(len(set(s)) > 1 for s in s1)  # the k samples of a prompt are distinct draws
    with pytest.raises(ValueError, match="temperature"):
        generate_samples(model, tok, PROMPTS, k=2, temperature=0.0)


def test_generate_restores_mode_and_validates(model, tok):
    model.train()
    generate(model, tok, ["hi"], max_new_tokens=2)
    assert model.training
    model.eval()
    with pytest.raises(ValueError, match="no tokens"):
        generate(model, tok, ["ok", ""], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tok, ["ok"], temperature=1.0, top_p=0.0)
