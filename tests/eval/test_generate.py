"""Our decoding loop: batched == one at a time == Hugging Face's generate, stop rules, padding, sampling."""

from __future__ import annotations

import json
import logging
import random
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

import gptqlora.eval.generate as generate_module
from gptqlora.errors import UsageError
from gptqlora.eval.decode import EagerDecode
from gptqlora.eval.generate import (
    ANSWER_LINE_RE,
    StopChecker,
    _line_carry,
    contiguous_head_input,
    answer_line_complete,
    check_token_budget,
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


def test_generation_stops_at_the_context_and_a_budget_past_it_is_refused(tok, caplog):
    """Each row gets min(budget, context - its prompt) tokens, whatever its batch; a prompt that fills the context
    gets none; a budget the context cannot hold beside one prompt token is refused before any forward pass."""
    model = chaotic_llama()  # context 512
    enc = encode(tok, PROMPTS)
    free = generate_batch(model, enc, max_new_tokens=30, pad_id=EOS, eos_ids={EOS})  # far from the context
    context = len(enc[2]) + 10  # the longest prompt gets 10 tokens, the short ones all 30
    model.config.max_position_embeddings = context
    bounded = generate_batch(model, enc, max_new_tokens=30, pad_id=EOS, eos_ids={EOS}, context=context)
    assert bounded == [f[:min(30, context - len(e))] for f, e in zip(free, enc)]
    assert len(bounded[2]) == 10 < len(free[2]) and any(len(b) == 30 for b in bounded)
    assert bounded == [generate_batch(model, [e], max_new_tokens=30, pad_id=EOS, eos_ids={EOS}, context=context)[0]
                       for e in enc]
    # Through generate: the bound is the model's own context, with a warning; the longest prompt fills a context
    # of its length and gets nothing, the others their share.
    model.config.max_position_embeddings = len(enc[2])
    with caplog.at_level(logging.WARNING, logger="gptqlora.eval.generate"):
        texts = generate(model, tok, PROMPTS, max_new_tokens=30, batch_size=2, stop_after_answer_line=False)
    assert texts == [tok.decode(f[:max(0, min(30, len(enc[2]) - len(e)))]) for f, e in zip(free, enc)]
    assert texts[2] == "" and all(texts[i] for i in (0, 1, 3, 4))
    assert f"the model's context of {len(enc[2])} tokens" in caplog.text and "1 of them fill it" in caplog.text

    model.config.max_position_embeddings = 512
    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    for budget in (512, 100_000):
        with pytest.raises(UsageError, match=f"max_new_tokens={budget} .*max_position_embeddings 512.*below 512"):
            generate(model, tok, PROMPTS, max_new_tokens=budget)
    assert forwards == []
    check_token_budget(511, 512)  # one position left for a one-token prompt
    check_token_budget(10**6, None)  # a config without a context bounds nothing


@pytest.mark.parametrize("command", ["eval", "sample", "run"])
def test_a_budget_past_the_context_is_one_line_before_any_model_loads(tmp_path, gsm8k_dir, monkeypatch, capsys,
                                                                       command):
    """Every generating command reads the context from config.json and refuses ``--max-new-tokens`` >= it before
    it loads a model or touches its output, which keeps what it held even with --overwrite."""
    from gptqlora import cli, models

    model_dir = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(model_dir)  # max_position_embeddings 512
    make_tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's")
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: pytest.fail("a model was loaded"))
    out_flag = {"eval": "--output-dir", "sample": "--out", "run": "--out"}[command]
    argv = [command, "--model", str(model_dir), "--data", str(gsm8k_dir), out_flag, str(out), "--overwrite",
            "--max-new-tokens", "512", "--limit" if command != "run" else "--test-limit", "2"]
    argv += ["--samples", "2"] if command == "sample" else []
    capsys.readouterr()  # save_pretrained's progress bars
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"gptqlora {command}: error: max_new_tokens=512 does not fit")
    assert f"{model_dir}: its config.json gives max_position_embeddings 512" in err and "below 512" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "the user's"


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_greedy_equals_hf_generate(model, tok, prompt):
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=30,
                         pad_token_id=EOS)[0, ids.shape[1]:].tolist()
    ref = ref[:ref.index(EOS)] if EOS in ref else ref  # HF keeps the eos and pads after it; we drop both
    ours = generate_batch(model, ids.tolist(), max_new_tokens=30, pad_id=EOS, eos_ids={EOS})[0]
    assert ours == ref


def test_head_gets_a_contiguous_input_while_decoding(tok):
    """torch's CPU bf16 linear on a strided input with a frozen weight converts the whole weight per call (81 ms
    and 108 MiB for SmolLM2's head): the decoding loop hands the head a contiguous [B, 1, H] slice."""
    model = chaotic_llama()
    seen = []
    head = model.get_output_embeddings()

    def standard_strides(x):  # what a fresh tensor of x's shape has (is_contiguous() ignores size-1 dimensions)
        return x.stride() == torch.empty(x.shape).stride()

    probe = head.register_forward_hook(lambda _m, args, _out: seen.append(standard_strides(args[0])))
    hooks_before = len(head._forward_pre_hooks)
    for batch in (2, 1):  # at batch 1 the slice is "contiguous" but keeps the prompt's stride
        x = torch.randn(batch, 5, head.in_features)[:, -1:, :]
        assert not standard_strides(x)
        with contiguous_head_input(model):
            head(x)
        head(x)
        assert seen == [True, False]  # on while active, off after
        seen.clear()
    for prompts in (PROMPTS[:2], PROMPTS[:1]):
        generate_batch(model, encode(tok, prompts), max_new_tokens=3, pad_id=EOS, eos_ids={EOS})
        assert seen and all(seen)
        seen.clear()
    assert len(head._forward_pre_hooks) == hooks_before
    probe.remove()


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
    what the loop feeds it. Its cache holds each row's place in the batch, so it follows the rows a decoder keeps,
    as a real model's cache would."""

    def __init__(self, tok, scripts: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config, self.tok = None, tok
        self.scripts = {tok.convert_tokens_to_ids(k): tok(v, add_special_tokens=False)["input_ids"] + [EOS]
                        for k, v in scripts.items()}
        self.calls = []  # per forward: input_ids, attention_mask, position_ids, the batch rows computed

    def forward(self, input_ids, attention_mask, position_ids, cache=None, use_cache=True, logits_to_keep=0):
        if not self.calls:
            self.rows = [self.scripts[int(t)] for t in input_ids[:, -1]]
            place = torch.arange(len(input_ids), dtype=torch.float)[:, None, None, None]  # [B, 1, 1, 1]
            cache.update(place, place, 0)
        rows = cache.layers[0].keys[:, 0, 0, 0].long().tolist()
        self.calls.append((input_ids.clone(), attention_mask.clone(), position_ids.clone(), rows))
        step = len(self.calls) - 1
        logits = torch.zeros(input_ids.shape[0], 1, 300)
        for i, row in enumerate(rows):
            script = self.rows[row]
            logits[i, 0, script[min(step, len(script) - 1)]] = 1.0
        return SimpleNamespace(logits=logits)


class KeepingRows(EagerDecode):
    """Eager decoding as it was before finished rows were dropped: they stay, fed pad under a 0 mask."""

    def drop(self, rows):
        pass


@pytest.mark.parametrize("decoder", ["drops", "keeps"])
def test_stops_eos_answer_line_and_drops_or_masks_finished(tok, monkeypatch, decoder):
    if decoder == "keeps":
        monkeypatch.setattr(generate_module, "EagerDecode", KeepingRows)
    scripts = {"a": "x = 2\n#### 42\nQuestion: more text", "b": "yy", "c": "sixteen chars ok and more"}
    lm = ScriptedLM(tok, scripts)
    out = generate(lm, tok, ["a", "b", "c"], max_new_tokens=16, batch_size=3)
    assert out == ["x = 2\n#### 42", "yy", "sixteen chars ok"]
    # "b" finished at its eos (3rd token). Dropped, it is computed no more; kept, it is fed its eos once more, then
    # pad with a 0 mask. "c" stays unmasked either way.
    row_b = next(i for i, t in enumerate(lm.calls[0][0][:, -1].tolist()) if t == tok.convert_tokens_to_ids("b"))
    if decoder == "drops":
        assert all(row_b in rows for *_, rows in lm.calls[:3]) and all(row_b not in rows for *_, rows in lm.calls[3:])
    else:
        assert all(rows == [0, 1, 2] for *_, rows in lm.calls)
        for ids, mask, pos, rows in lm.calls[4:]:
            assert ids[row_b, -1] == EOS and mask[row_b, -1] == 0
    final_ids, final_mask, final_pos, final_rows = lm.calls[-1]
    row_c = next(i for i, t in enumerate(lm.calls[0][0][:, -1].tolist()) if t == tok.convert_tokens_to_ids("c"))
    c = final_rows.index(row_c)
    assert final_mask[c].all() and final_pos[c, -1] == final_mask.shape[1] - 1
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


# ---------------------------------------------------------------------------------------------- incremental stop check

# GSM8K-like pieces; joined at random they split "####", numbers and multi-byte characters (unicode digits among
# them: Python's \d matches "٣" and "３") across tokens in every way.
PIECES = ["####", "#", "##", "###", " ", "\n", "\n\n", "4", "42", "1,234", "-3.5", "٣", "３", "€", "é", "🙂", "Question:",
          "Q", "uestion", ":", "x = 2", ".", "$", "\ufffd"]
CORPUS = ["Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72\n", "So 3 + 4 = 7 dollars.\n#### 7\n\nQuestion: ok",
          "Le café coûte ٣ € ou ３ ¥ 🙂.\n#### -3.5\n", "#### 1,234\n"] * 20
STOP_RULES = [  # (stop strings, stop after the answer line)
    ((), True), (("Question:",), False), (("\n\n", "Q:"), True), (("€", "#4"), True), (("٣ ", "\ufffd"), False)]


def trained_byte_level_tokenizer():
    """A byte-level BPE (as GPT-2 and SmolLM2) with merges learnt across whitespace, so single tokens hold
    pieces like "\\n####" or "4\\n" and multi-byte characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|im_end|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>")


def sentencepiece_like_tokenizer():
    """A Llama-2-style tokenizer: "▁" for spaces, byte fallback (<0xNN> tokens), and a decoder that strips the text's
    leading space, so a token's text depends on whether it comes first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(backend.to_str())
    for byte in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(spec["model"]["vocab"]))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def random_stream(rng: random.Random, tok, random_ids: list[int]) -> list[int]:
    """Token ids: GSM8K-like text as the tokenizer encodes it, or ids drawn at random (broken UTF-8 included),
    with special tokens sprinkled in (decoded with skip_special_tokens, so they add no text)."""
    if rng.random() < 0.6:
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 14)))
        ids = tok(text, add_special_tokens=False)["input_ids"]
    else:
        ids = [rng.choice(random_ids) for _ in range(rng.randint(1, 40))]
    for _ in range(rng.randint(0, 2)):
        ids.insert(rng.randint(0, len(ids)), rng.choice(tok.all_special_ids))
    return ids


def first_stop_whole_text(tok, ids, stop_strings, answer_line) -> int | None:
    """The reference: decode everything after every token (the loop's old stop check)."""
    for t in range(1, len(ids) + 1):
        if stop_cut(tok.decode(ids[:t], skip_special_tokens=True), stop_strings, answer_line) is not None:
            return t
    return None


def first_stop_incremental(tok, ids, stop_strings, answer_line) -> int | None:
    check = StopChecker(tok, stop_strings, answer_line)
    return next((t for t, i in enumerate(ids, 1) if check.push(i)), None)


@pytest.mark.parametrize("kind", ["bytes", "byte-level-bpe", "sentencepiece-like"])
def test_incremental_stop_check_equals_whole_text_check(tok, kind):
    tokenizer = {"bytes": lambda: tok, "byte-level-bpe": trained_byte_level_tokenizer,
                 "sentencepiece-like": sentencepiece_like_tokenizer}[kind]()
    vocab = tokenizer.get_vocab()
    random_ids = sorted(vocab.values())
    if kind == "sentencepiece-like":
        # Its byte fallback turns a whole run of byte tokens into U+FFFDs when any of them is invalid, so a later
        # byte can rewrite committed text: draw only its valid UTF-8 (byte tokens come from encoding text).
        random_ids = [i for t, i in vocab.items() if not t.startswith("<0x")]
    rng = random.Random(kind)
    stops = set()
    for _ in range(400):
        ids = random_stream(rng, tokenizer, random_ids)
        for stop_strings, answer_line in STOP_RULES:
            expected = first_stop_whole_text(tokenizer, ids, stop_strings, answer_line)
            assert first_stop_incremental(tokenizer, ids, stop_strings, answer_line) == expected, (ids, stop_strings)
            stops.add(expected)
    assert None in stops and len(stops) > 10  # streams that stop, at many positions, and streams that do not


def test_line_carry_keeps_what_the_answer_line_regex_needs():
    rng = random.Random(0)
    alphabet = ["#", "#", "#", "1", "٣", "a", " ", "\n"]
    for _ in range(3000):
        line = "".join(rng.choice(alphabet[:-1]) for _ in range(rng.randint(0, 10)))  # an unfinished line
        more = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        carry = _line_carry(line)
        assert len(carry) <= 5
        assert (ANSWER_LINE_RE.search(line + more) is None) == (ANSWER_LINE_RE.search(carry + more) is None), (line,
                                                                                                                more)


def whole_text_checks(tok, n, stop_strings=(), answer_line=True):
    """The old per-token stop rule, as stop checks for generate_batch: re-decode all ids so far."""
    def check_for(ids):
        def check(token):
            ids.append(token)
            return stop_cut(tok.decode(ids, skip_special_tokens=True), stop_strings, answer_line) is not None
        return check
    return [check_for([]) for _ in range(n)]


def test_generate_stops_where_the_whole_text_check_stops(tok):
    scripts = {"a": "x = 2\n####٣\nQuestion: more", "b": "two\n\nlines", "c": "# ## 7\n#### €3\nrest",
               "d": "####\n5\n#### x 5", "e": "Qu€stion: no\nQuestion: yes"}
    prompts = list(scripts)
    for stop_strings, answer_line in STOP_RULES:
        ids_new = generate_batch(ScriptedLM(tok, scripts), encode(tok, prompts), max_new_tokens=40, pad_id=EOS,
                                 eos_ids={EOS}, stop_checks=[StopChecker(tok, stop_strings, answer_line).push
                                                             for _ in prompts])
        ids_old = generate_batch(ScriptedLM(tok, scripts), encode(tok, prompts), max_new_tokens=40, pad_id=EOS,
                                 eos_ids={EOS}, stop_checks=whole_text_checks(tok, len(prompts), stop_strings,
                                                                              answer_line))
        assert ids_new == ids_old
        texts = generate(ScriptedLM(tok, scripts), tok, prompts, max_new_tokens=40, stop_strings=stop_strings,
                         stop_after_answer_line=answer_line)
        cuts = [stop_cut(tok.decode(i), stop_strings, answer_line) for i in ids_old]
        assert texts == [tok.decode(i)[:c] for i, c in zip(ids_old, cuts)]
    assert generate(ScriptedLM(tok, scripts), tok, prompts, max_new_tokens=40) == [
        "x = 2\n####٣", "two\n\nlines", "# ## 7\n#### €3", "####\n5\n#### x 5", "Qu€stion: no\nQuestion: yes"]


class TensorLM(torch.nn.Module):
    """A fake causal LM made of tensor ops only (no host reads): logits from the last token and its position."""

    def __init__(self, vocab: int = 259, eos_bias: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.freq = torch.nn.Parameter(torch.randn(vocab, generator=g))
        self.config, self.steps = None, 0
        with torch.no_grad():
            self.table[:, EOS] += eos_bias

    def forward(self, input_ids, attention_mask, position_ids, cache=None, use_cache=True, logits_to_keep=0):
        self.steps += 1
        logits = self.table[input_ids[:, -1:]] + torch.sin(position_ids[:, -1:, None] * self.freq)  # [B, 1, V]
        return SimpleNamespace(logits=logits)


HOST_READS = ("tolist", "item", "__bool__", "__int__", "__index__", "__float__", "nonzero", "cpu", "numpy")


def count_host_reads(monkeypatch) -> dict[str, int]:
    """Count the tensor -> Python conversions (each a device sync on an accelerator) from now on."""
    counts = dict.fromkeys(HOST_READS, 0)
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kw):
            counts[_name] += 1
            return _original(self, *args, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_one_host_read_per_decode_step(tok, monkeypatch):
    lm = TensorLM(eos_bias=2.5)  # some rows draw eos early, others run the budget
    prompts = encode(tok, PROMPTS)
    checks = [StopChecker(tok, ["e"], stop_after_answer_line=True).push for _ in prompts]  # "e" stops some rows
    counts = count_host_reads(monkeypatch)
    out = generate_batch(lm, prompts, max_new_tokens=40, pad_id=EOS, eos_ids={EOS}, stop_checks=checks)
    monkeypatch.undo()
    assert counts == {**dict.fromkeys(HOST_READS, 0), "tolist": lm.steps}
    assert 1 < lm.steps < 40 and len({len(o) for o in out}) > 1  # rows ended at different steps, all before 40


@pytest.mark.gpu
def test_one_device_sync_per_decode_step_on_cuda(tok):
    """Greedy decoding: 8 more steps cost 8 more syncs from the loop (the prompt's upload is a fixed cost). Sampling
    adds one inside ``torch.multinomial``, which checks its input with ``.item()``."""
    lm = TensorLM(eos_bias=-100.0).cuda()  # never eos: every row runs the budget
    prompts = encode(tok, PROMPTS)
    syncs = {}
    for budget in (8, 16):
        checks = [StopChecker(tok, ["never written"]).push for _ in prompts]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = generate_batch(lm, prompts, max_new_tokens=budget, pad_id=EOS, eos_ids={EOS},
                                     stop_checks=checks)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        assert [len(o) for o in out] == [budget] * len(prompts)
        syncs[budget] = sum(w.filename.endswith("eval/generate.py") for w in caught)
    assert syncs[16] - syncs[8] == 8


def test_stop_check_work_per_token_does_not_grow_with_length(tok, monkeypatch):
    """A long generation, one line of 300 characters then the answer line: per token a bounded number of decode
    and regex calls on bounded lengths, however long the text."""
    script = "x" * 150 + "é" * 75 + "#### 5\nQuestion: never"  # no newline for 300 bytes; 2-byte characters
    decoded, searched = [], []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: decoded.append(len(ids)) or decode(ids, **kw))
    monkeypatch.setattr(generate_module, "ANSWER_LINE_RE", SimpleNamespace(
        search=lambda text: searched.append(len(text)) or ANSWER_LINE_RE.search(text)))
    out = generate(ScriptedLM(tok, {"a": script}), tok, ["a"], max_new_tokens=400, stop_strings=["Question:"])
    tokens = len(tok(script[:script.index("\n") + 1], add_special_tokens=False)["input_ids"])
    assert out == [script[:script.index("\n")]]
    # After the loop, generate decodes the whole sequence and searches its text once, to cut it.
    assert decoded[-1] == tokens and searched[-1] == len(script[:script.index("\n") + 1])
    loop_decodes, loop_searches = decoded[:-1], searched[:-1]
    assert len(loop_decodes) <= 2 * tokens and max(loop_decodes) <= 4  # ids per decode: a few, not all so far
    assert len(loop_searches) == tokens and max(loop_searches) <= 5 + 2  # the line's carry plus one token's text


def test_generate_batch_wants_one_stop_check_per_prompt(model, tok):
    with pytest.raises(ValueError, match="one per prompt"):
        generate_batch(model, encode(tok, PROMPTS[:2]), max_new_tokens=2, pad_id=EOS, eos_ids={EOS},
                       stop_checks=[lambda t: False])


@pytest.mark.slow
def test_incremental_stop_check_on_the_embedded_tokenizer(gsm8k_dir):
    """SmolLM2's own byte-level BPE: real GSM8K solutions (each stops at its answer line) and random streams."""
    from transformers import AutoTokenizer

    from gptqlora.data.gsm8k import load_gsm8k
    from gptqlora.models import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    streams = [tokenizer(e["question"] + "\n" + e["answer"] + "\n\nQuestion: next", add_special_tokens=False)
               ["input_ids"] for e in load_gsm8k("train", str(gsm8k_dir))[:200]]
    rng = random.Random(0)
    streams += [random_stream(rng, tokenizer, list(range(len(tokenizer)))) for _ in range(200)]
    for ids in streams:
        for stop_strings, answer_line in STOP_RULES:
            expected = first_stop_whole_text(tokenizer, ids, stop_strings, answer_line)
            assert first_stop_incremental(tokenizer, ids, stop_strings, answer_line) == expected, (ids, stop_strings)
