import dataclasses

import pytest

from gptqlora import cli
from gptqlora import config as C


def parse(*argv):
    parser = cli.build_parser()
    args = parser.parse_args(list(argv))
    return args, {cls: cli.config_from_args(cls, args) for cls in cli.COMMANDS[args.command][1]}


def test_defaults_come_from_the_dataclasses():
    _, configs = parse("quantize", "--out", "x")
    assert configs[C.QuantConfig] == C.QuantConfig()
    assert configs[C.ModelConfig] == C.ModelConfig()


def test_every_config_field_is_a_flag():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["run"]
    dests = {a.dest for a in sub._actions}
    for cls in cli.COMMANDS["run"][1]:
        for f in dataclasses.fields(cls):
            assert f.name in dests, f"{cls.__name__}.{f.name} has no flag"


def test_flags_and_seed_spellings():
    _, configs = parse("finetune", "--batch_size", "4", "--epochs", "3", "--bits", "3", "--asym", "--targets", "all",
                       "--act-order", "--lora-r", "8")
    assert configs[C.TrainConfig].batch_size == 4 and configs[C.TrainConfig].epochs == 3
    q = configs[C.QuantConfig]
    assert q.bits == 3 and q.sym is False and q.act_order is True and q.target_names == C.ALL_TARGETS
    assert configs[C.LoRAConfig].r == 8


@pytest.mark.parametrize("argv,message", [
    (["quantize", "--out", "x", "--bits", "5"], "invalid choice"),
    (["quantize", "--out", "x", "--group-size", "-3"], "group_size=-3"),
    (["quantize", "--out", "x", "--targets", "qq_proj"], "unknown quantization target"),
])
def test_invalid_options_fail_before_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert message in capsys.readouterr().err


def test_out_dir_with_other_files_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("precious")
    assert cli.main(["quantize", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_data_defaults_to_env(monkeypatch):
    monkeypatch.setenv("GSM8K_DIR", "/some/dir")
    assert C.DataConfig().data == "/some/dir"
    monkeypatch.delenv("GSM8K_DIR")
    assert C.DataConfig().data == "openai/gsm8k"
