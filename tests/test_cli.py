import dataclasses

import pytest

from gptqlora import cli
from gptqlora import config as C
from gptqlora import targets as T
from gptqlora.commands import COMMANDS


REQUIRED = {"quantize": ("--out", "x"), "merge": ("--out", "x", "--quantized", "q", "--adapter", "a")}


def parse(*argv):
    parser = cli.build_parser()
    args = parser.parse_args(list(argv))
    return cli.config_from_args(COMMANDS[args.command].args, args)


def _dests(command: str) -> set[str]:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices[command]
    return {a.dest for a in sub._actions}


def test_defaults_come_from_the_dataclasses():
    args = parse("quantize", "--out", "x")
    assert args.quant == C.QuantConfig() and args.model == C.ModelConfig() and args.out == "x"
    assert args.overwrite is False and args.seed == 0


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_config_field_is_a_flag_and_no_flag_is_shared(command):
    """Each field of the command's config (and of its groups) is exactly one flag; no two fields share a flag."""
    cls = COMMANDS[command].args
    expected = set()
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("group")
        expected |= {f"{f.name}.{g.name}" for g in dataclasses.fields(sub)} if sub else {f.name}
    assert _dests(command) - {"help"} == expected
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices[command]
    flags = [o for a in sub._actions for o in a.option_strings]
    assert len(flags) == len(set(flags))


@pytest.mark.parametrize("command,flag", [
    ("merge", "--bits"), ("merge", "--group-size"), ("merge", "--device"), ("merge", "--dtype"),
    ("eval", "--calib-samples"), ("eval", "--calib-text"), ("perplexity", "--calib-seqlen"),
    ("perplexity", "--max-new-tokens"), ("quantize", "--lr"), ("quantize", "--prompt-style"),
    ("eval", "--lora-r"),
])
def test_a_flag_the_command_does_not_use_is_an_error(command, flag, capsys):
    with pytest.raises(SystemExit):
        parse(command, flag, "1", *REQUIRED.get(command, ()))
    assert "unrecognized arguments" in capsys.readouterr().err


def test_flags_and_seed_spellings():
    args = parse("finetune", "--batch_size", "4", "--epochs", "3", "--bits", "3", "--asym", "--targets", "all",
                 "--act-order", "--lora-r", "8")
    assert args.train.batch_size == 4 and args.train.epochs == 3
    q = args.quant
    assert q.bits == 3 and q.sym is False and q.act_order is True and q.target_names == T.ALL_TARGETS
    assert args.lora.r == 8


def test_eval_takes_batch_size_as_users_type_it():
    for flag in ("--batch-size", "--batch_size", "--eval-batch-size"):
        assert parse("eval", flag, "5").eval.eval_batch_size == 5


@pytest.mark.parametrize("argv,message", [
    (["quantize", "--out", "x", "--bits", "5"], "invalid choice"),
    (["quantize", "--out", "x", "--group-size", "-3"], "group_size=-3"),
    (["quantize", "--out", "x", "--group-size", "7"], "group_size=7 is not supported"),
    (["quantize", "--out", "x", "--targets", "qq_proj"], "unknown quantization target"),
    (["quantize", "--out", "x", "--device", "foo"], "device 'foo' is unknown"),
    (["eval", "--shots", "-1"], "must be >= 0"),
    (["eval", "--temperature", "0.5"], "--temperature only applies to sampling"),
    (["eval", "--top-p", "0.5"], "--top-p only applies to sampling"),
    (["eval", "--limit", "0"], "limit=0 must be positive"),
    (["eval", "--resume", "--overwrite"], "give one of them"),
    (["eval", "--kernel", "marlin"], "invalid choice"),
    (["finetune", "--lora-targets", "re:(", "--out", "x"], "target regex"),
    (["finetune", "--weight-decay", "-1"], "weight_decay=-1.0 must be >= 0"),
    (["finetune", "--warmup-steps", "-2"], "warmup_steps=-2 must be >= 0"),
    (["finetune", "--min-lr-ratio", "1.5"], "min_lr_ratio=1.5 must be in [0, 1]"),
    (["finetune", "--eval-holdout", "-1"], "eval_holdout=-1 must be >= 0"),
    (["finetune", "--train-limit", "0"], "train_limit=0 must be positive"),
    (["finetune", "--train-limit", "-3"], "train_limit=-3 must be positive"),
    (["finetune", "--quantized", "q", "--bits", "2"], "--bits applies when quantizing --model"),
    (["run", "--max-grad-norm", "-1"], "max_grad_norm=-1.0 must be >= 0"),
])
def test_invalid_options_fail_before_work(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_sampling_defaults_apply_only_with_samples():
    assert parse("eval").eval.temperature is None
    ec = parse("eval", "--samples", "4").eval
    assert (ec.temperature, ec.top_p) == (C.DEFAULT_TEMPERATURE, C.DEFAULT_TOP_P)
    assert parse("eval", "--samples", "4", "--temperature", "0.3").eval.temperature == 0.3


def test_data_defaults_to_env(monkeypatch):
    monkeypatch.setenv("GSM8K_DIR", "/some/dir")
    assert C.DataConfig().data == "/some/dir"
    monkeypatch.delenv("GSM8K_DIR")
    assert C.DataConfig().data == "openai/gsm8k"


def test_one_target_grammar_for_quantization_and_lora():
    assert T.parse_targets("attn,v_proj") == T.ATTN_TARGETS + ("v_proj",)
    assert T.resolve_targets("attn,v_proj") == T.ATTN_TARGETS
    assert T.parse_targets("q_proj, mlp") == ("q_proj",) + T.MLP_TARGETS
    assert T.parse_targets("re:.*q_proj").pattern == ".*q_proj"
    with pytest.raises(C.UsageError, match="quantization targets take names"):
        T.resolve_targets("re:.*")
