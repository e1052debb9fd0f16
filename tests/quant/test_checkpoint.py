import json

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer
from safetensors.torch import load_file, save_file

from gptqlora.config import QuantConfig
from gptqlora.models import load_model
from gptqlora.quant.checkpoint import load_quantized, save_quantized
from gptqlora.quant.driver import quantize_model_weights
from gptqlora.quant.linear import QuantizedLinear


def quantized_tiny(config: QuantConfig):
    model = make_tiny_llama()
    ids = torch.randint(0, 259, (8, 32), generator=torch.Generator().manual_seed(0))
    quantize_model_weights(model, ids, config, progress=False)
    return model, ids


def saved_attention_only(tmp_path):
    """A tiny model with 4-bit attention, saved to tmp_path/q."""
    config = QuantConfig(targets="attn", group_size=32)
    model, _ = quantized_tiny(config)
    return save_quantized(model, None, tmp_path / "q", config)


@pytest.mark.parametrize("config", [QuantConfig(targets="all", group_size=32),
                                    QuantConfig(targets="attn", group_size=32, act_order=True, static_groups=False,
                                                sym=False),
                                    QuantConfig(targets="all", bits=3, group_size=-1)])
def test_save_load_bit_identical_with_identical_logits(tmp_path, config):
    model, ids = quantized_tiny(config)
    save_quantized(model, make_tiny_tokenizer(), tmp_path / "q", config)
    loaded, tokenizer, qconfig = load_quantized(tmp_path / "q")
    assert qconfig.target_names == config.target_names and qconfig.bits == config.bits
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert tokenizer.eos_token == "<|im_end|>"
    # load_model recognises the directory and returns QuantizedLinear layers.
    again, _ = load_model(str(tmp_path / "q"))
    assert sum(isinstance(m, QuantizedLinear) for m in again.modules()) == 2 * len(config.target_names)


def test_config_holds_the_gptq_block(tmp_path):
    saved_attention_only(tmp_path)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    block = cfg["quantization_config"]
    assert block == {k: v for k, v in json.loads((tmp_path / "q" / "quantize_config.json").read_text()).items()
                     if k != "gptqlora"}
    assert block["quant_method"] == "gptq" and block["checkpoint_format"] == "gptq" and block["bits"] == 4
    assert block["modules_in_block_to_quantize"] == [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"],
                                                     ["self_attn.o_proj"]]
    assert block["dynamic"] == {"-:.*\\.mlp\\..*": {}}
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    prefix = "model.layers.0.self_attn.q_proj."
    assert tensors[prefix + "qweight"].dtype == torch.int32 and tensors[prefix + "qweight"].shape == (8, 64)
    assert tensors[prefix + "qzeros"].shape == (2, 8) and tensors[prefix + "scales"].dtype == torch.float16
    assert (tensors[prefix + "qzeros"] == 0x77777777).all()  # symmetric 4-bit: z = 8 stored as 7
    assert tensors[prefix + "g_idx"].dtype == torch.int32
    assert "model.layers.0.mlp.up_proj.weight" in tensors  # not quantized: plain weight


def test_truncated_file_fails_clearly(tmp_path):
    saved_attention_only(tmp_path)
    f = tmp_path / "q" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_quantized(tmp_path / "q")


def test_shape_mismatch_names_the_tensor(tmp_path):
    saved_attention_only(tmp_path)
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["group_size"] = 16  # the stored scales hold 2 groups, the config now implies 4
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "q" / "quantize_config.json").unlink()  # else the two configs' disagreement is reported first
    with pytest.raises(ValueError, match=r"k_proj.qzeros has shape \(2, 4\) but the config implies \(4, 4\)"):
        load_quantized(tmp_path / "q")


def test_missing_tensor_is_reported(tmp_path):
    saved_attention_only(tmp_path)
    f = tmp_path / "q" / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.self_attn.o_proj.qzeros"]
    save_file(tensors, f)
    with pytest.raises(ValueError, match="missing.*o_proj.qzeros"):
        load_quantized(tmp_path / "q")


def test_overwrite_is_atomic(tmp_path):
    config = QuantConfig(targets="attn", group_size=32)
    model, _ = quantized_tiny(config)
    out = save_quantized(model, None, tmp_path / "q", config)
    (out / "note.txt").write_text("kept unless overwrite")
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_quantized(model, None, out, config)
    assert (out / "note.txt").is_file()
    save_quantized(model, None, out, config, overwrite=True)
    assert not (out / "note.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary or old directory left behind


def test_quantize_config_disagreeing_with_config_json_names_both_files(tmp_path):
    saved_attention_only(tmp_path)
    side = tmp_path / "q" / "quantize_config.json"
    block = json.loads(side.read_text())
    block["sym"] = not block["sym"]
    side.write_text(json.dumps(block))
    with pytest.raises(ValueError, match=r"quantize_config.json and .*config.json disagree on sym"):
        load_quantized(tmp_path / "q")


def test_sharded_directory_saves_and_loads_bit_identical(tmp_path):
    config = QuantConfig(targets="all", group_size=32, act_order=True, static_groups=False)
    model, ids = quantized_tiny(config)
    out = save_quantized(model, make_tiny_tokenizer(), tmp_path / "q", config, max_shard_size="30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    # A block is never split across shards: each layer's tensors sit in one file.
    for i in range(2):
        assert len({f for k, f in index["weight_map"].items() if k.startswith(f"model.layers.{i}.")}) == 1
    loaded, _, _ = load_quantized(out)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    again, _ = load_model(str(out))  # load_model recognises a sharded quantized directory too
    assert sum(isinstance(m, QuantizedLinear) for m in again.modules()) == 14


def test_damaged_shards_are_reported(tmp_path):
    config = QuantConfig(targets="attn", group_size=32)
    model, _ = quantized_tiny(config)
    out = save_quantized(model, None, tmp_path / "q", config, max_shard_size="30KB")
    shard = out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.1.self_attn.q_proj.qweight"]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_quantized(out)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_quantized(out)


@pytest.mark.parametrize("order", [dict(), dict(act_order=False), dict(static_groups=False),
                                   dict(act_order=False, group_aware=True)])
def test_quantization_block_reads_back_the_config_that_wrote_it(order):
    # The solver's order survives the round trip, while desc_act tells loaders only whether g_idx is permuted.
    from gptqlora.quant.checkpoint import gptq_config_dict, quant_config_from_dict

    config = QuantConfig(bits=4, group_size=64, targets="all", **order)
    block = gptq_config_dict(config)
    back = quant_config_from_dict(json.loads(json.dumps(block)))
    assert (back.act_order, back.static_groups, back.group_aware) == (config.act_order, config.static_groups,
                                                                      config.group_aware)
    assert block["desc_act"] == (config.act_order and not config.static_groups)


def test_another_tools_static_groups_block_reads_as_act_order():
    # gptqmodel writes desc_act true with static groups (g_idx then stays k // g); it has no "act_order" key.
    from gptqlora.quant.checkpoint import quant_config_from_dict

    block = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "static_groups": True,
             "sym": True, "checkpoint_format": "gptq"}
    back = quant_config_from_dict(block)
    assert back.act_order and back.static_groups
    assert not quant_config_from_dict(block | {"desc_act": False}).act_order
    # gptqmodel's default block: group-aware, which it turns off under desc_act
    assert quant_config_from_dict(block | {"desc_act": False, "act_group_aware": True}).group_aware
    assert not quant_config_from_dict(block | {"act_group_aware": True}).group_aware


def test_a_quantized_directory_needing_its_own_code_is_refused_before_loading(tmp_path):
    from gptqlora.errors import UsageError
    from gptqlora.quant.checkpoint import read_quantized_config

    out = saved_attention_only(tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg |= {"model_type": "mine", "auto_map": {"AutoConfig": "configuration_mine.MineConfig"}}
    (out / "config.json").write_text(json.dumps(cfg))
    for read in (read_quantized_config, load_quantized, lambda d: load_model(str(d))):
        with pytest.raises(UsageError, match="model_type 'mine' needs code from the model's repository \\(auto_map\\)"
                                             ", which gptqlora never runs"):
            read(out)
