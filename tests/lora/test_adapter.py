"""PEFT-format adapters: fixed key names, round trips, and parity with PEFT's own loader and saver."""

from __future__ import annotations

import json
import logging
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gptqlora import files
from gptqlora.errors import UsageError
from gptqlora.lora import adapter as adapter_mod
from gptqlora.lora.adapter import (BASE_FILE, CONFIG_NAME, WEIGHTS_NAME, adapter_record, check_adapter_base,
                                   load_adapter, read_adapter_base, read_adapter_config, save_adapter)
from gptqlora.lora.layer import adapter_state_dict, inject_lora_layers, lora_modules
from gptqlora.provenance import base_record

from conftest import make_tiny_llama

BASE_NAME = "tiny-llama-seed0"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def randomize_B(model: nn.Module, std: float = 0.1) -> None:
    """Give every LoRA layer a non-zero B so the adapter actually changes the outputs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, std)


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained_adapter(tmp_path: Path, targets="attn", use_rslora: bool = False) -> tuple[Path, torch.Tensor]:
    """Save a non-trivial adapter from the tiny model; return its directory and the adapted model's logits."""
    model = make_tiny_llama()
    base_logits = logits(model)
    inject_lora_layers(model, targets, r=4, alpha=8.0, dropout=0.05, use_rslora=use_rslora)
    randomize_B(model)
    model.eval()
    ours = logits(model)
    assert not torch.allclose(ours, base_logits, atol=1e-3)  # the adapter is not a no-op
    return save_adapter(model, tmp_path / "adapter", BASE_NAME), ours


def test_peft_key_names_and_shapes_are_fixed(tiny_llama):
    inject_lora_layers(tiny_llama, "attn", r=4, alpha=8.0)
    sd = adapter_state_dict(tiny_llama)
    assert set(sd) == {f"base_model.model.model.layers.{i}.self_attn.{p}.{ab}.weight"
                       for i in range(2) for p in ATTN for ab in ("lora_A", "lora_B")}
    # hidden 64; k/v have 2 KV heads of 16 dims each, so 32 outputs.
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (64, 4)
    assert sd["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (32, 4)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in sd.values())


def test_saved_files_and_config(tmp_path):
    out, _ = trained_adapter(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert not [p for p in tmp_path.iterdir() if p.name != "adapter"]  # no staging directory left
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    expected = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": BASE_NAME, "r": 4,
                "lora_alpha": 8, "lora_dropout": 0.05, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
                "revision": None}
    assert {k: config[k] for k in expected} == expected
    tensors = load_file(str(out / WEIGHTS_NAME))
    assert len(tensors) == 16 and all(t.dtype == torch.float32 for t in tensors.values())


def test_config_extra_and_partial_targets(tmp_path):
    model = make_tiny_llama()
    inject_lora_layers(model, r"re:model\.layers\.0\.self_attn\.q_proj", r=2, alpha=4.0)
    out = save_adapter(model, tmp_path / "a", BASE_NAME, {"revision": "main"})
    config = read_adapter_config(out)
    assert config["revision"] == "main"
    # Short names would re-create q_proj on layer 1 too, so the exact modules are written as a regex.
    assert isinstance(config["target_modules"], str)
    load_adapter(fresh := make_tiny_llama(), out)
    assert set(lora_modules(fresh)) == {"model.layers.0.self_attn.q_proj"}


def test_round_trip_gives_identical_logits(tmp_path):
    out, ours = trained_adapter(tmp_path, targets="all")
    model = load_adapter(make_tiny_llama(), out).eval()
    assert torch.equal(logits(model), ours)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if ".lora_" in n}


def test_load_into_already_injected_model(tmp_path):
    out, ours = trained_adapter(tmp_path)
    model = make_tiny_llama()
    inject_lora_layers(model, "attn", r=4, alpha=8.0)
    assert torch.equal(logits(load_adapter(model, out).eval()), ours)
    other = make_tiny_llama()
    inject_lora_layers(other, "attn", r=4, alpha=16.0)
    with pytest.raises(ValueError, match="alpha"):
        load_adapter(other, out)


@pytest.mark.parametrize("targets, use_rslora", [("attn", False), ("all", True), ("q_proj,v_proj", False),
                                                 (r"re:model\.layers\.1\.mlp\.(up|down)_proj", False)])
def test_peft_loads_our_adapter(tmp_path, targets, use_rslora):
    from peft import PeftModel

    out, ours = trained_adapter(tmp_path, targets, use_rslora)
    peft_model = PeftModel.from_pretrained(make_tiny_llama(), str(out)).eval()
    torch.testing.assert_close(logits(peft_model), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj", "down_proj"], r".*\.self_attn\.(k|o)_proj",
                                            "all-linear"])
def test_we_load_peft_saved_adapters(tmp_path, target_modules):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1,
                                                              target_modules=target_modules, task_type="CAUSAL_LM"))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.eval()
    expected = logits(peft_model)
    peft_model.save_pretrained(str(tmp_path / "peft"))

    model = load_adapter(make_tiny_llama(), tmp_path / "peft").eval()
    assert len(lora_modules(model)) == sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)


def test_other_shapes_fail_naming_the_shape(tmp_path):
    out, _ = trained_adapter(tmp_path)
    narrow = make_tiny_llama(hidden=32, intermediate=64)
    with pytest.raises(ValueError, match=r"shape mismatch for 'base_model\.model\.model\.layers\.0\..*\(4, 32\).*"
                                         r"\(4, 64\)"):
        load_adapter(narrow, out)
    assert not lora_modules(narrow)  # a failed load leaves the model untouched


def test_missing_module_names_the_module_and_base(tmp_path):
    out, _ = trained_adapter(tmp_path)
    with pytest.raises(ValueError, match=rf"model\.layers\.1\.self_attn\.\w+_proj.*does not have.*{BASE_NAME}"):
        load_adapter(make_tiny_llama(num_layers=1), out)


def test_missing_keys_fail_when_strict(tmp_path):
    out, _ = trained_adapter(tmp_path)
    tensors = load_file(str(out / WEIGHTS_NAME))
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[dropped]
    save_file(tensors, str(out / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"lacks 1 LoRA tensors.*layers\.1\.self_attn\.v_proj\.lora_B"):
        load_adapter(make_tiny_llama(), out)
    model = load_adapter(make_tiny_llama(), out, strict=False)
    assert torch.count_nonzero(model.model.layers[1].self_attn.v_proj.lora_B.weight) == 0
    assert torch.count_nonzero(model.model.layers[1].self_attn.q_proj.lora_B.weight) > 0


def test_not_an_adapter_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a PEFT LoRA adapter directory.*does not exist"):
        read_adapter_config(tmp_path / "nowhere")
    (tmp_path / CONFIG_NAME).write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=f"expected {CONFIG_NAME} and {WEIGHTS_NAME}.*pickle"):
        load_adapter(make_tiny_llama(), tmp_path)


@pytest.mark.parametrize("edit, message", [
    ({"peft_type": "IA3"}, "peft_type"), ({"use_dora": True}, "DoRA"), ({"bias": "all"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
])
def test_unsupported_configs_are_rejected(tmp_path, edit, message):
    out, _ = trained_adapter(tmp_path)
    config = json.loads((out / CONFIG_NAME).read_text())
    (out / CONFIG_NAME).write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=message):
        load_adapter(make_tiny_llama(), out)


def test_corrupt_weights_name_the_file(tmp_path):
    out, _ = trained_adapter(tmp_path)
    data = (out / WEIGHTS_NAME).read_bytes()
    (out / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}.*truncated or corrupt"):
        load_adapter(make_tiny_llama(), out)


def test_failed_save_leaves_existing_adapter_intact(tmp_path, monkeypatch):
    out, _ = trained_adapter(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    model = make_tiny_llama()
    inject_lora_layers(model, "q_proj", r=2, alpha=4.0)
    real_write = adapter_mod.write_atomic
    written = []

    def full_disk_on_second_file(path, data):
        if written:  # the weights went through; the config does not
            raise OSError("disk full")
        written.append(path)
        return real_write(path, data)

    monkeypatch.setattr(adapter_mod, "write_atomic", full_disk_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, out, BASE_NAME)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no file replaced, no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    monkeypatch.undo()
    save_adapter(model, out, BASE_NAME)  # a successful overwrite replaces both files
    assert read_adapter_config(out)["r"] == 2 and len(load_file(str(out / WEIGHTS_NAME))) == 4


def test_failed_save_of_a_new_adapter_leaves_nothing(tmp_path, monkeypatch):
    model = make_tiny_llama()
    inject_lora_layers(model, "q_proj", r=2, alpha=4.0)

    def crash(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "new", BASE_NAME)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_files_follow_the_umask(tmp_path, monkeypatch, mask):
    model = make_tiny_llama()
    inject_lora_layers(model, "q_proj", r=2, alpha=4.0)
    monkeypatch.setattr(files, "_UMASK", mask)  # files reads the umask once per process
    previous = os.umask(mask)
    try:
        out = save_adapter(model, tmp_path / "a", BASE_NAME, base={"path": "x", "fingerprint": "f"})
        fresh = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
        save_adapter(model, out, BASE_NAME, base={"path": "x", "fingerprint": "f"})  # over an existing one
        again = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask  # not tempfile's private 0700
    assert fresh == again == {n: 0o666 & ~mask for n in (BASE_FILE, CONFIG_NAME, WEIGHTS_NAME)}


def saved_base(tmp_path: Path, seed: int, name: str) -> dict:
    """The base record of a tiny model saved as a Hugging Face directory."""
    make_tiny_llama(seed=seed).save_pretrained(tmp_path / name)
    return base_record(tmp_path / name)


def test_the_base_sidecar_is_written_and_peft_still_loads_the_adapter(tmp_path):
    from peft import PeftModel

    base = saved_base(tmp_path, seed=0, name="base")
    model = make_tiny_llama()
    inject_lora_layers(model, "attn", r=4, alpha=8.0)
    randomize_B(model)
    out = save_adapter(model.eval(), tmp_path / "adapter", BASE_NAME, base=base)
    assert sorted(p.name for p in out.iterdir()) == sorted([BASE_FILE, CONFIG_NAME, WEIGHTS_NAME])
    assert read_adapter_base(out) == base
    assert adapter_record(out) == {"path": str(out.resolve()), "base": base}
    assert BASE_FILE not in json.dumps(read_adapter_config(out)) and "fingerprint" not in read_adapter_config(out)
    peft_model = PeftModel.from_pretrained(make_tiny_llama(), str(out)).eval()
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=1e-5, atol=1e-5)

    save_adapter(model, out, BASE_NAME)  # saved again without a base: the old record would name the wrong one
    assert read_adapter_base(out) is None and adapter_record(out)["base"] is None


def test_loading_onto_another_base_warns_naming_both(tmp_path, caplog):
    base = saved_base(tmp_path, seed=0, name="base")
    other = saved_base(tmp_path, seed=1, name="other")
    model = make_tiny_llama()
    inject_lora_layers(model, "attn", r=4, alpha=8.0)
    out = save_adapter(model, tmp_path / "adapter", BASE_NAME, base=base)

    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match="trained on") as caught:
        loaded = load_adapter(make_tiny_llama(seed=1), out, base=other)
    message = str(caught[0].message)
    for record in (base, other):
        assert record["path"] in message and record["fingerprint"][:12] in message
    assert message in caplog.text
    assert lora_modules(loaded)  # a warning, not an error: it may be intended
    assert check_adapter_base(out, other) == message

    # The same weights in another place are the same base; an adapter without a record is not checked.
    moved = {**base, "path": "/somewhere/else"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(make_tiny_llama(), out, base=moved)
        (out / BASE_FILE).unlink()
        load_adapter(make_tiny_llama(), out, base=other)
    assert check_adapter_base(out, other) is None


def test_non_finite_adapter_weights_are_refused_naming_the_file(tmp_path):
    out, _ = trained_adapter(tmp_path)
    tensors = load_file(str(out / WEIGHTS_NAME))
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, str(out / WEIGHTS_NAME))
    model = make_tiny_llama()
    with pytest.raises(UsageError, match=rf"{WEIGHTS_NAME} holds NaN or infinite values.*v_proj\.lora_B"):
        load_adapter(model, out)
    assert not lora_modules(model)


def test_save_without_lora_is_an_error(tmp_path, tiny_llama):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(tiny_llama, tmp_path / "a", BASE_NAME)


# ---------------------------------------------------------------------------------------------- target regexes

def with_target_modules(out: Path, target_modules) -> Path:
    """The adapter in ``out`` with its config's target_modules replaced, as a stranger could write it."""
    config = json.loads((out / CONFIG_NAME).read_text())
    (out / CONFIG_NAME).write_text(json.dumps({**config, "target_modules": target_modules}))
    return out


@pytest.mark.parametrize("pattern", [r"(.*.*)*X", r"model\.layers\.0\.self_attn\.(\w+_?)*proj"])
def test_a_target_regex_that_could_hang_is_refused_in_one_line_naming_the_config(tmp_path, pattern):
    from conftest import deadline

    out = with_target_modules(trained_adapter(tmp_path)[0], pattern)
    model = make_tiny_llama()
    with deadline(10):
        for load in (read_adapter_config, lambda d: load_adapter(model, d)):
            with pytest.raises(UsageError) as e:
                load(out)
            message = str(e.value)
            assert message.startswith(f"{out / CONFIG_NAME}: target_modules: the target regex ") and "\n" not in message
            assert "list the module names instead" in message
    assert not lora_modules(model)


def test_eval_refuses_an_adapter_whose_regex_could_hang_before_loading(tmp_path, gsm8k_dir, capsys, monkeypatch):
    from conftest import make_tiny_tokenizer
    from gptqlora import cli
    import gptqlora.models
    from conftest import deadline

    model_dir = tmp_path / "m"
    make_tiny_llama().save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    out = with_target_modules(trained_adapter(tmp_path)[0], r"(.*.*)*X")
    monkeypatch.setattr(gptqlora.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    capsys.readouterr()  # the fixtures' progress bars
    with deadline(10):
        code = cli.main(["eval", "--model", str(model_dir), "--adapter", str(out), "--data", str(gsm8k_dir),
                         "--limit", "1", "--output-dir", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{out / CONFIG_NAME}: target_modules: the target regex '(.*.*)*X' repeats a part" in err
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("adapted", [range(29), range(1)], ids=["all-but-the-last-layer", "layer-0-only"])
def test_our_regex_adapters_on_a_deep_model_load_by_their_tensor_names(tmp_path, monkeypatch, one_thread, adapted):
    # Short names would adapt every layer, so save_adapter writes the '|' join of the adapted modules' names; a load
    # takes the modules from the tensor names and never runs the regex over the model's names.
    model = make_tiny_llama(num_layers=30, hidden=16, intermediate=32)
    layers = "|".join(map(str, adapted))
    inject_lora_layers(model, rf"re:model\.layers\.({layers})\.(self_attn|mlp)\.\w+", r=2, alpha=4.0)
    randomize_B(model)
    ours = logits(model.eval())
    out = save_adapter(model, tmp_path / "deep", BASE_NAME)
    assert isinstance(json.loads((out / CONFIG_NAME).read_text())["target_modules"], str)
    monkeypatch.setattr(adapter_mod, "find_targets", lambda *a, **k: pytest.fail("ran the adapter's regex"))
    loaded = load_adapter(make_tiny_llama(num_layers=30, hidden=16, intermediate=32), out).eval()
    assert set(lora_modules(loaded)) == set(lora_modules(model)) and len(lora_modules(loaded)) == 7 * len(adapted)
    assert torch.equal(logits(loaded), ours)


def test_an_adapter_file_linked_out_of_its_directory_is_refused_before_it_is_read(tmp_path):
    """A stranger's adapter_model.safetensors -> another adapter's weights elsewhere: refused, naming the link."""
    out = trained_adapter(tmp_path)[0]
    elsewhere = tmp_path / "elsewhere.safetensors"
    (out / WEIGHTS_NAME).rename(elsewhere)
    (out / WEIGHTS_NAME).symlink_to(elsewhere)
    with pytest.raises(UsageError, match=f"{WEIGHTS_NAME} is a link to .*, outside"):
        read_adapter_config(out)
    with pytest.raises(UsageError, match="outside"):
        load_adapter(make_tiny_llama(), out)
