"""Offline checkpoint resolution, the name table, and every bad input's one-line error."""
import json
import subprocess
import sys

import pytest

from exporter import names
from exporter.checkpoint import open_checkpoint, resolve_checkpoint
from exporter.config import MiniCPMConfig
from exporter.errors import ExportError
from exporter.recipes import get_recipe, load_recipes, parse_recipe


def load_text(path, recipe="tiny"):
    r = get_recipe(recipe)
    ck = open_checkpoint(path, r)
    return ck.text_tensors(MiniCPMConfig.from_hf(ck.raw_config))


def test_name_table_consumes_every_key(tiny):
    hf_keys = set(tiny.checkpoint.shards)
    mapped = {names.canonical_name(k) for k in hf_keys}
    assert None not in mapped and mapped == set(tiny.state)
    assert mapped == names.expected_names(8, tied=True)


def test_every_recipe_parses_and_lists():
    recs = load_recipes()
    assert {"sft-int4", "dpo-int4", "sft-fp16", "dpo-fp16", "1b-sft-int4", "v-int4", "v2-int4", "tiny"} <= set(recs)
    for r in recs.values():
        if r.is_vision:
            assert "ios" not in r.targets
    out = subprocess.run([sys.executable, "-m", "exporter.cli", "recipes", "--json"], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out)["sft-int4"]["hidden_size"] == 2304


@pytest.mark.parametrize("edit,field", [
    ('quantization = "q3_magic"', "quantization"),
    ('targets = ["android", "symbian"]', "targets"),
    ("prefill_chunk = \"big\"", "prefill_chunk"),
])
def test_bad_recipe_names_file_and_field(tmp_path, edit, field):
    src = get_recipe("tiny").source.read_text()
    key = edit.split(" =")[0]
    lines = [edit if line.startswith(key + " =") else line for line in src.splitlines()]
    bad = tmp_path / "bad.toml"
    bad.write_text("\n".join(lines))
    with pytest.raises(ExportError, match=rf"bad\.toml.*'{field}'"):
        parse_recipe(bad)


def test_malformed_recipe_file(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("description = [unclosed\n")
    with pytest.raises(ExportError, match="broken.toml: malformed recipe"):
        parse_recipe(bad)


def test_unknown_recipe():
    with pytest.raises(ExportError, match="unknown recipe 'nope'.*tiny"):
        get_recipe("nope")


def test_hf_cache_layout_resolves_refs_main(tmp_path, monkeypatch, tiny_copy):
    repo = tmp_path / "hub" / "models--openbmb--MiniCPM-2B-sft-bf16"
    (repo / "snapshots").mkdir(parents=True)
    (repo / "refs").mkdir()
    tiny_copy.rename(repo / "snapshots" / "abc123")
    (repo / "snapshots" / "old").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_checkpoint(get_recipe("sft-int4")).name == "abc123"


def test_missing_checkpoint_names_repo_places_and_option(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "b"))
    with pytest.raises(ExportError) as e:
        resolve_checkpoint(get_recipe("sft-int4"))
    msg = str(e.value)
    assert "openbmb/MiniCPM-2B-sft-bf16" in msg and str(tmp_path / "a") in msg
    assert str(tmp_path / "b" / "hub") in msg and "--checkpoint" in msg and "\n" not in msg


def test_wrong_architecture(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=r"config.json: architecture LlamaForCausalLM is not MiniCPMForCausalLM"):
        load_text(tiny_copy)


def test_dims_disagree_with_recipe(tiny_copy):
    with pytest.raises(ExportError, match=r"config.json: hidden_size=256, recipe 'sft-int4' expects 2304"):
        open_checkpoint(tiny_copy, get_recipe("sft-int4"))


def test_truncated_shard(tiny_copy):
    shard = tiny_copy / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ExportError, match=r"model-00002-of-00002.safetensors: truncated or corrupt shard"):
        load_text(tiny_copy)


def test_corrupt_shard_header(tiny_copy):
    shard = tiny_copy / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"#garbage####"
    shard.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"model-00001-of-00002.safetensors: corrupt"):
        load_text(tiny_copy)


def test_missing_shard(tiny_copy):
    (tiny_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ExportError, match=r"model-00002-of-00002.safetensors: shard named in .* is missing"):
        load_text(tiny_copy)


def test_missing_tokenizer(tiny_copy):
    (tiny_copy / "tokenizer.model").unlink()
    with pytest.raises(ExportError, match=r"tokenizer.model: tokenizer.model \(SentencePiece\) is missing"):
        load_text(tiny_copy)


def test_unknown_key_is_an_error(tiny_copy):
    from safetensors.torch import load_file, save_file
    shard = tiny_copy / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    tensors["model.layers.0.mystery.weight"] = next(iter(tensors.values())).clone()
    save_file(tensors, shard)
    index = json.loads((tiny_copy / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mystery.weight"] = shard.name
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ExportError, match=r"key 'model.layers.0.mystery.weight' is not in the name table"):
        load_text(tiny_copy)


def test_shapes_disagree_with_config(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["intermediate_size"] = 512
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    r = get_recipe("tiny")
    ck = open_checkpoint(tiny_copy)  # no recipe: the dims check does not catch it, the shapes do
    with pytest.raises(ExportError, match=r"safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' \(layers.0."
                                          r"feed_forward.w1.weight\) has shape \(640, 256\), config.json implies \(512, 256\)"):
        ck.text_tensors(MiniCPMConfig.from_hf(ck.raw_config))
    assert r.dims["intermediate_size"] == 640


def test_single_file_checkpoint(tiny_copy, tiny):
    from safetensors.torch import load_file, save_file
    merged = {}
    for shard in sorted(tiny_copy.glob("model-*.safetensors")):
        merged.update(load_file(shard))
        shard.unlink()
    (tiny_copy / "model.safetensors.index.json").unlink()
    save_file(merged, tiny_copy / "model.safetensors")
    state = load_text(tiny_copy)
    assert set(state) == set(tiny.state)
