"""The eager decoder drops finished rows and decodes as before; the compiled step (static cache, torch.compile)
against the eager loop: the same tokens, a few shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_tokenizer
from eval.test_generate import EOS, PROMPTS, KeepingRows, chaotic_llama, encode

import gptqlora.eval.generate as generate_module
from gptqlora.eval import decode
from gptqlora.eval.decode import bucket_length, bucket_rows, use_compiled
from gptqlora.eval.engine import LocalEngine
from gptqlora.eval.generate import generate, generate_batch


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # each test's model compiles its own graphs
    yield
    torch._dynamo.reset()


def dropped_and_kept(monkeypatch, model, run):
    """``run()`` with the eager decoder, which drops finished rows, then with one that keeps them (pad under a 0
    mask); and the rows each forward pass of the first computed."""
    rows = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: rows.append(len(kw["input_ids"])), with_kwargs=True)
    dropped = run()
    hook.remove()
    with monkeypatch.context() as m:
        m.setattr(generate_module, "EagerDecode", KeepingRows)
        kept = run()
    return dropped, kept, rows


def test_eager_greedy_drops_finished_rows_and_decodes_as_before(tok, monkeypatch):
    """Rows that end at eos after 5, 5, 11, 15 and 26 tokens (token 7 is a second eos) are each computed up to the
    step that draws their eos, and the tokens equal those of the decoder that keeps them."""
    model = chaotic_llama()
    enc = encode(tok, PROMPTS)
    dropped, kept, rows = dropped_and_kept(monkeypatch, model, lambda: generate_batch(
        model, enc, max_new_tokens=30, pad_id=EOS, eos_ids={EOS, 7}))
    assert dropped == kept
    assert [len(s) for s in dropped] == [26, 5, 5, 15, 11]  # all end at eos, at different steps
    assert rows == [5] * 6 + [3] * 6 + [2] * 4 + [1] * 11  # a forward pass per step, the prefill first


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_eager_sampling_draws_as_before_when_rows_are_dropped(tok, monkeypatch, top_p):
    """A seeded generator draws for every row of the batch, dropped or not (zero logits): the same samples."""
    model = chaotic_llama()
    enc = encode(tok, PROMPTS)
    eos = {EOS} | set(range(0, 259, 16))  # often drawn: rows end at different steps
    dropped, kept, rows = dropped_and_kept(monkeypatch, model, lambda: generate_batch(
        model, enc, max_new_tokens=30, pad_id=EOS, eos_ids=eos, temperature=1.0, top_p=top_p,
        generator=torch.Generator().manual_seed(0)))
    assert dropped == kept
    assert len({len(s) for s in dropped}) >= 4 and len(set(rows)) >= 4  # rows ended, and were dropped, apart


def test_buckets():
    assert [bucket_rows(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]
    assert bucket_length(1, None) == 256 and bucket_length(257, None) == 512
    assert bucket_length(300, 400) == 400 and bucket_length(400, 400) == 400  # within the context, never below


def test_auto_compiles_long_jobs_only():
    long, small = decode.COMPILE_MIN_STEPS, decode.COMPILE_MAX_ROWS
    assert not use_compiled("auto", long - 1, 1) and use_compiled("auto", long, small)
    assert not use_compiled("auto", long, small + 1)  # where the compiled step was measured slower
    assert use_compiled("on", 0, 64) and not use_compiled("off", 10**9, 1)
    with pytest.raises(ValueError, match="compile"):
        use_compiled("sometimes", 1, 1)


def test_compiled_greedy_equals_eager_on_a_tiny_fp32_model(tok):
    """Five prompts of different lengths (left padding), a row that ends at eos mid-batch, 3 rows bucketed to 4."""
    model = chaotic_llama()
    enc = encode(tok, PROMPTS)
    eager = generate_batch(model, enc, max_new_tokens=30, pad_id=EOS, eos_ids={EOS})
    compiled = generate_batch(model, enc, max_new_tokens=30, pad_id=EOS, eos_ids={EOS}, compiled=True)
    assert compiled == eager
    assert any(len(s) < 30 for s in eager) and len({tuple(s) for s in eager}) == len(PROMPTS)  # not vacuous
    three = generate_batch(model, enc[:3], max_new_tokens=30, pad_id=EOS, eos_ids={EOS}, compiled=True)
    assert three == eager[:3]
    assert {(8, 256), (4, 256)} <= set(decode.COMPILE_STATS.seconds)


def test_compiled_decoding_stops_at_the_context(tok):
    model = chaotic_llama()
    enc = encode(tok, PROMPTS)
    context = len(enc[2]) + 10  # the longest prompt gets 10 tokens
    model.config.max_position_embeddings = context
    eager = generate_batch(model, enc, max_new_tokens=30, pad_id=EOS, eos_ids={EOS}, context=context)
    compiled = generate_batch(model, enc, max_new_tokens=30, pad_id=EOS, eos_ids={EOS}, context=context,
                              compiled=True)
    assert compiled == eager and len(eager[2]) == 10


def test_compiled_sampling_draws_as_eager(tok):
    model = chaotic_llama()
    kw = dict(max_new_tokens=12, batch_size=2, stop_after_answer_line=False, temperature=1.0)
    eager = generate(model, tok, PROMPTS[:3], generator=torch.Generator().manual_seed(1), **kw)
    compiled = generate(model, tok, PROMPTS[:3], generator=torch.Generator().manual_seed(1), compiled=True, **kw)
    assert compiled == eager


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_4bit_lora_model_calls_our_kernels_and_equals_eager(tok, monkeypatch, dtype):
    from gptqlora.config import QuantConfig
    from gptqlora.lora import inject_lora_layers
    from gptqlora.quant.driver import quantize_model_weights

    model = chaotic_llama()
    quantize_model_weights(model, None, QuantConfig(method="rtn", bits=4, group_size=32, targets="all"),
                           progress=False)
    torch.manual_seed(1)
    inject_lora_layers(model, "all", r=4, alpha=8.0, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # an adapter that changes the output
    model.to(dtype)
    enc = encode(tok, PROMPTS[:2])
    eager = generate_batch(model, enc, max_new_tokens=20, pad_id=EOS, eos_ids={EOS})
    graphs = []

    def backend(gm, example_inputs):  # inductor, recording what it was given
        graphs.append(gm)
        return torch._inductor.compile(gm, example_inputs)

    monkeypatch.setattr(decode, "compiled_step", lambda device_type: torch.compile(decode._decode_step,
                                                                                 backend=backend, dynamic=False))
    compiled = generate_batch(model, enc, max_new_tokens=20, pad_id=EOS, eos_ids={EOS}, compiled=True)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes]
    calls = (targets.count("gptqlora.quantized_linear"), targets.count("aten._weight_int4pack_mm_for_cpu"))
    if dtype == torch.float32:  # dequant-gemm, the kernel auto picks in fp32: one opaque call per block linear
        assert calls == (7 * 2, 0)
        assert compiled == eager
    else:  # int4-aten, auto's pick for a bf16 token, is traceable: the graph calls it directly
        assert calls == (0, 7 * 2)
        # bf16 rounding differs between inductor's fused code and eager's, and this model amplifies it, so the
        # reference here is the compiled step with every layer the opaque op: the same kernels, called indirectly
        torch._dynamo.reset()
        for m in model.modules():
            if hasattr(m, "_traced"):
                m._traced.clear()
        monkeypatch.setattr(decode, "trace_kernels", lambda *args: 0)
        graphs.clear()
        opaque = generate_batch(model, enc, max_new_tokens=20, pad_id=EOS, eos_ids={EOS}, compiled=True)
        assert [str(n.target) for g in graphs for n in g.graph.nodes].count("gptqlora.quantized_linear") == 7 * 2
        assert compiled == opaque


def test_local_engine_compiles_when_told_a_long_job(tok, monkeypatch):
    seen = []
    monkeypatch.setattr("gptqlora.eval.engine.generate", lambda *a, **kw: seen.append(kw["compiled"]) or ["x"])
    engine = LocalEngine(object(), tok)
    engine.greedy(["p"], max_new_tokens=4, batch_size=1, add_special_tokens=False)
    engine.expect(decode.COMPILE_MIN_STEPS, 1)
    engine.greedy(["p"], max_new_tokens=4, batch_size=1, add_special_tokens=False)
    off = LocalEngine(object(), tok, compile="off")
    off.expect(10**9, 1)
    off.greedy(["p"], max_new_tokens=4, batch_size=1, add_special_tokens=False)
    assert seen == [False, True, False]


@pytest.mark.parametrize("boolean", [True, False])
def test_one_query_attention_equals_sdpa(boolean):
    """Grouped-query heads (6 over 2 key/value heads), a mask with holes, as a boolean or an additive float mask;
    a longer query is sdpa's own call."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(shape, generator=g) for shape in ([3, 6, 1, 8], [3, 2, 16, 8], [3, 2, 16, 8]))
    keep = torch.rand(3, 1, 1, 16, generator=g) > 0.3
    keep[..., 0] = True
    mask = keep if boolean else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 3, True, False
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ours, _ = decode.one_query_attention(module, query, key, value, mask, scaling=0.3)
    theirs, _ = sdpa(module, query, key, value, mask, scaling=0.3)
    assert ours.shape == theirs.shape == (3, 1, 6, 8)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    unmasked, _ = decode.one_query_attention(module, query, key, value, None, scaling=0.3)
    assert not torch.allclose(unmasked, ours)  # the mask mattered
    longer = torch.randn(3, 6, 2, 8, generator=g)
    assert torch.equal(decode.one_query_attention(module, longer, key, value, None)[0],
                       sdpa(module, longer, key, value, None)[0])


def test_compiled_cpu_step_of_one_row_calls_no_matmul_or_attention_kernel(tok):
    """At one row, the LoRA products, the projections (dense, all under 2048 wide here) and attention are inductor's
    own loops: a profiled compiled step calls no aten matmul and no sdpa kernel, which the eager prefill does."""
    from torch.profiler import ProfilerActivity, profile

    from gptqlora.lora import inject_lora_layers

    model = chaotic_llama()
    inject_lora_layers(model, "all", r=4, alpha=8.0, dropout=0.0)
    ids = torch.tensor([encode(tok, PROMPTS[:1])[0]])
    kernels = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu")
    with profile(activities=[ProfilerActivity.CPU]) as prefill:
        decoder = decode.CompiledDecode(model, ids, torch.ones_like(ids), max_new_tokens=8, pad_id=EOS,
                                        context=None)
    assert {e.key for e in prefill.key_averages()} & set(kernels)  # the eager prompt calls them
    active = torch.ones(1, dtype=torch.bool)
    decoder.advance(decoder.logits().argmax(-1), active)  # compiles
    with profile(activities=[ProfilerActivity.CPU]) as steps:
        for _ in range(3):
            decoder.advance(decoder.logits().argmax(-1), active)
    called = {e.key: e.count for e in steps.key_averages()}
    assert not {k: called[k] for k in kernels if k in called}
    assert model.config._attn_implementation == "sdpa"  # restored after each step


def test_compiled_steps_after_a_batchs_first_follow_a_change_between_batches(tok):
    """A batch's later steps skip the guards its first step passed (only those that tell cached graphs apart run):
    a change between batches (the adapters' scale, a constant in the graph) is still seen, and with both graphs
    cached, each batch runs its own."""
    from gptqlora.lora import LoRALinear, inject_lora_layers

    model = chaotic_llama()
    inject_lora_layers(model, "all", r=4, alpha=8.0, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    enc = encode(tok, PROMPTS[:1])

    def run(scale, compiled):
        for m in layers:
            m.scale = scale
        return generate_batch(model, enc, max_new_tokens=12, pad_id=EOS, eos_ids={EOS}, compiled=compiled)

    eager = {scale: run(scale, False) for scale in (2.0, 0.0)}
    assert eager[2.0] != eager[0.0]  # the scale changes the tokens
    for scale in (2.0, 0.0, 2.0, 0.0):
        assert run(scale, True) == eager[scale]


def test_cpu_step_options_keep_addmm_scales_and_take_a_wide_head_in_one_pass():
    """At one row: an addmm with alpha and beta (inductor's own decomposition drops them) and a linear wider than
    2048 (the head) compile to inductor's loops, no aten matmul, equal to eager."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    x, head = torch.randn(1, 64, generator=g), torch.randn(3000, 64, generator=g)  # head: [N, K]
    bias, a, b = torch.randn(1, 48, generator=g), torch.randn(1, 16, generator=g), torch.randn(16, 48, generator=g)

    def f(x, head, bias, a, b):
        return torch.nn.functional.linear(x, head), torch.addmm(bias, a, b, beta=0.5, alpha=3.0)

    compiled = torch.compile(f, dynamic=False, options=decode.cpu_step_options())
    expected = f(x, head, bias, a, b)
    compiled(x, head, bias, a, b)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = compiled(x, head, bias, a, b)
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    assert not {e.key for e in prof.key_averages()} & {"aten::mm", "aten::addmm"}
