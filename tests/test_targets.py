"""The target-module grammar (targets.parse_targets): a regex whose matching could hang is refused before it meets a
name, naming where it came from; the regexes people write and the ones our adapters write are accepted."""

from __future__ import annotations

import re

import pytest

from conftest import deadline, make_tiny_llama, make_tiny_tokenizer
from gptqlora import cli
from gptqlora.errors import UsageError
from gptqlora.targets import ALL_TARGETS, MAX_TARGET_REGEX_CHARS, check_target_regex, parse_targets

# Regexes that backtrack for hours on a module name: nested repeats, a repeated alternation, too many '.*' in a row.
HANGING = [r"(.*.*)*X", r"(a|ab)*c", r"(\w+\.)*X", r".*.*.*.*.*.*.*.*.*.*X",
           "".join(f"(?:{re.escape(c)}|.)" for c in "model.layers.0.self_attn") + "X"]


@pytest.mark.parametrize("pattern", HANGING)
def test_a_regex_that_could_hang_is_refused_in_one_line_naming_its_source(pattern):
    with deadline(10), pytest.raises(UsageError) as e:
        names = [f"model.layers.{i}.{t}" for i in range(2) for t in ALL_TARGETS]
        targets = parse_targets("re:" + pattern)
        [n for n in names if targets.fullmatch(n)]  # what today's code does next, and where it hangs
    message = str(e.value)
    assert message.startswith("--lora-targets: ") and "\n" not in message
    assert "list the module names instead" in message
    with pytest.raises(UsageError, match=r"^/x/adapter_config\.json: target_modules: "):
        check_target_regex(pattern, where="/x/adapter_config.json: target_modules")


def test_an_overlong_regex_is_refused():
    with pytest.raises(UsageError, match=f"more than {MAX_TARGET_REGEX_CHARS}"):
        parse_targets("re:" + "a" * (MAX_TARGET_REGEX_CHARS + 1))


@pytest.mark.parametrize("pattern", [r".*\.(q|v)_proj", r"model\.layers\.(0|1|2)\..*", r".*layers\.1.*\..*_proj",
                                     r".*\.layers\.\d+\.(self_attn|mlp)\..*", r".*\.self_attn\.(k|o)_proj",
                                     r"model\.layers\.1\.mlp\.(up|down)_proj", r"model\.layers\.\d{1,2}\.mlp\.\w+"])
def test_the_regexes_people_write_are_accepted(pattern):
    assert parse_targets("re:" + pattern).pattern == pattern


def test_the_regex_our_adapters_write_for_a_deep_model_is_accepted():
    # save_adapter writes the escaped '|' join of the adapted modules: here every linear of a 126-layer model but one
    # layer's (~31 KB), the longest such regex for today's models.
    names = [f"model.layers.{i}.{t}" for i in range(126) for t in ALL_TARGETS]
    pattern = "|".join(re.escape(n) for n in sorted(names[7:]))
    with deadline(10):
        compiled = parse_targets("re:" + pattern)
    assert [n for n in names if compiled.fullmatch(n)] == names[7:]


def test_cli_refuses_a_hanging_lora_targets_regex_while_parsing(tmp_path, gsm8k_dir, capsys, monkeypatch):
    import gptqlora.models

    model_dir = tmp_path / "m"
    make_tiny_llama().save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    monkeypatch.setattr(gptqlora.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with deadline(10), pytest.raises(SystemExit) as e:  # argparse's exit: usage, then the one error line
        cli.main(["finetune", "--model", str(model_dir), "--data", str(gsm8k_dir), "--out", str(tmp_path / "ft"),
                  "--lora-targets", "re:(.*.*)*X"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "error: --lora-targets: the target regex '(.*.*)*X' repeats a part" in err.splitlines()[-1]
    assert not (tmp_path / "ft").exists()
