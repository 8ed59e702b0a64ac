"""Bad input from a careful new user or a hostile tester (issue 12): one clear line, exit 1, nothing
finished-looking left. Real checkpoints, files and processes (`mcpm-export` run as a subprocess)."""
import json
import math
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from exporter.bundle import MANIFEST, manifest_text
from exporter.checkpoint import open_checkpoint
from exporter.config import MiniCPMConfig
from exporter.errors import ExportError
from exporter.model import MiniCPM
from exporter.quality import QualityReport, gate, implausible, perplexity
from exporter.recipes import get_recipe
from exporter.verify import verify_bundle
from tests.support.cli import ROOT, cli, nothing_partial, one_error_line

EVAL = ROOT.parent / "shared" / "eval" / "python-tutorial.txt"


def poison(ckpt: Path, key: str, value: float, everywhere: bool = False) -> Path:
    """Write ``value`` into one element (or all) of checkpoint tensor ``key``; returns its shard."""
    shard = ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(shard)
    t = tensors[key].clone()
    if everywhere:
        t.fill_(value)
    else:
        t.view(-1)[7] = value
    tensors[key] = t
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


# ------------------------------------------------------------------ 1. non-finite weights and perplexity
@pytest.mark.parametrize("target,value", [("android", math.nan), ("ios", math.inf)])
def test_non_finite_weight_is_refused_at_load(tiny_copy, tmp_path, target, value):
    key = "model.layers.0.self_attn.k_proj.weight"
    shard = poison(tiny_copy, key, value)
    out = tmp_path / "b"
    r = cli(target, "--checkpoint", tiny_copy, "--out", out)
    one_error_line(r, shard.name, f"'{key}'", "non-finite", "NaN" if math.isnan(value) else "1 Inf")
    assert not out.exists()
    nothing_partial(tmp_path)


def test_gate_fails_on_non_finite_perplexity_even_when_loss_is_allowed(tiny_copy, tiny):
    """Finite but huge weights (a bf16 norm of 3e38) overflow: perplexity NaN, and the gate refuses."""
    poison(tiny_copy, "model.norm.weight", 3e38, everywhere=True)
    ck = open_checkpoint(tiny_copy)
    cfg = MiniCPMConfig.from_hf(ck.raw_config)
    model = MiniCPM.from_state_dict(cfg, ck.text_tensors(cfg))
    ids = tiny.tokenizer.encode(EVAL.read_text())
    ppl = perplexity(model, ids, count=1)
    assert not math.isfinite(ppl)
    report = QualityReport(ppl_fp=ppl, ppl_int4=ppl, tokens=512, windows=1, text="t", threshold_pct=1.0)
    for override in (False, True):
        with pytest.raises(ExportError, match="perplexity is not finite"):
            gate(report, override)
    good = QualityReport(ppl_fp=33.0, ppl_int4=33.2, tokens=512, windows=1, text="t", threshold_pct=1.0)
    gate(good)
    assert implausible(good) is None
    assert "implausibly high" in implausible(QualityReport(943.0, 950.0, 512, 1, "t", 1.0))


@pytest.mark.slow
def test_export_gate_refuses_overflowing_checkpoint(tiny_copy, tmp_path):
    poison(tiny_copy, "model.norm.weight", 3e38, everywhere=True)
    r = cli("android", "--checkpoint", tiny_copy, "--out", tmp_path / "b", "--allow-quality-loss")
    one_error_line(r, "quality gate: perplexity is not finite")
    assert not (tmp_path / "b").exists()
    nothing_partial(tmp_path)


def test_manifest_is_strict_json(tmp_path):
    with pytest.raises(ExportError, match=r"non-finite number at 'quality.ppl_fp'"):
        manifest_text({"quality": {"ppl_fp": math.nan}})
    assert json.loads(manifest_text({"quality": {"ppl_fp": 1.5}}))["quality"]["ppl_fp"] == 1.5


# ------------------------------------------------------------------ 3. generate: one length check
def test_generate_checks_the_context_window():
    one_error_line(cli("generate", "--prompt", "Lists", "--max-new-tokens", "100000", timeout=120),
                   "--max-new-tokens 100000 exceeds the context window 512")
    one_error_line(cli("generate", "--prompt", "Lists", "--max-new-tokens", "-1", timeout=120),
                   "--max-new-tokens must be >= 1 (got -1)")


# ------------------------------------------------------------------ 7. tracebacks that became one line
def test_generate_prompt_that_is_not_utf8():
    r = subprocess.run([sys.executable, "-m", "exporter.cli", "generate", "--prompt", b"caf\xe9 \xff"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    one_error_line(r, "--prompt: not valid UTF-8")


TEXTS = {
    "binary": (bytes(range(256)) * 8, "not UTF-8 text (byte 0x80 at offset 128"),
    "latin-1": ("Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 50, "not UTF-8 text (byte 0xe9 at offset 3"),
    "nul": (b"\x00" * 64, "a binary file, not text"),
    "empty": (b"", "empty file"),
    "short": (b"too short\n", "too short for perplexity"),
}


def test_eval_text_that_is_binary_latin1_empty_or_short(tmp_path):
    from exporter.api import evaluate

    for name, (content, needle) in TEXTS.items():
        f = tmp_path / f"{name}.txt"
        f.write_bytes(content)
        with pytest.raises(ExportError) as e:
            evaluate("tiny", f, windows=1)
        assert f"--text {f}" in str(e.value) and needle in str(e.value), (name, str(e.value))
    one_error_line(cli("eval", "--text", tmp_path / "latin-1.txt", timeout=300), "--text", TEXTS["latin-1"][1])


def png(width: int, height: int, rows: bytes | None = None) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IDAT", zlib.compress(rows)) if rows is not None else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + body + chunk(b"IEND", b"")


def test_image_plan_decompression_bomb_and_truncated_png(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png(100000, 100000))
    one_error_line(cli("image-plan", bomb, timeout=120), str(bomb), "refusing the image", "decompression bomb")
    good = png(64, 48, b"".join(b"\x00" + bytes([x % 256, 0, 0] * 64) for x in range(48)))
    (tmp_path / "good.png").write_bytes(good)
    r = cli("image-plan", tmp_path / "good.png", "--json", timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["size"] == [64, 48], r.stderr
    cut = tmp_path / "cut.png"
    cut.write_bytes(good[: len(good) // 2])
    one_error_line(cli("image-plan", cut, timeout=120), str(cut), "cannot read image")


# ------------------------------------------------------------------ 9. cheap checks before slow ones
def test_ios_with_a_vision_recipe_is_refused_before_the_checkpoint(tmp_path):
    r = cli("ios", "--model", "v2-int4", "--out", tmp_path / "b", timeout=120)
    one_error_line(r, "does not allow target 'ios'", "iOS is text only")
    assert "not found" not in r.stderr and not (tmp_path / "b").exists()


# ------------------------------------------------------------------ weaker messages
def test_checkpoint_file_and_path_like_model(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    one_error_line(cli("eval", "--checkpoint", f, "--text", EVAL, timeout=120), "is a file", "config.json")
    one_error_line(cli("android", "--model", "../models/tinycpm-docs", "--out", tmp_path / "b", timeout=120),
                   "--model '../models/tinycpm-docs': a recipe name is expected", "--checkpoint DIR")
    assert not (tmp_path / "b").exists()
    for model in ("openbmb/MiniCPM-2B-sft-bf16", "~/ckpt", "tiny.toml", ""):
        with pytest.raises(ExportError, match=f"--model '{model}': a recipe name is expected"):
            get_recipe(model)


def test_untied_config_without_lm_head_names_the_flag_and_key(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    ck = open_checkpoint(tiny_copy)
    with pytest.raises(ExportError, match=r"tie_word_embeddings=false but the checkpoint has no 'lm_head.weight'"):
        ck.text_plan(MiniCPMConfig.from_hf(ck.raw_config))


def test_archive_traversal_is_named_as_unsafe(tmp_path):
    src = tmp_path / "evil.txt"
    src.write_text("x")
    archive = tmp_path / "mcpm-tiny-android-q4f16_e8-v0.1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, "mcpm-tiny-android-q4f16_e8-v0.1.0/../../evil.txt")
    (problem,) = verify_bundle(archive)
    assert "unsafe archive member" in problem and "truncated" not in problem
    assert not (tmp_path.parent / "evil.txt").exists()


def test_verify_of_an_edited_or_nan_manifest(tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "x.bin").write_bytes(b"1234")
    m = {"schema": "mcpm-export/manifest/1", "mcpm_export_version": "0.1.0", "recipe": "tiny", "target": "ios",
         "quantization": {"scheme": "q4f16_e8"}, "quality": {"ppl_fp": 33.9}, "versions": {"mcpm_export": "0.1.0"},
         "source": {"checkpoint_fingerprint": "f"}, "files": {"x.bin": {"sha256": "0" * 64, "size": 4}}}
    (bundle / MANIFEST).write_text(manifest_text(m))
    edited = json.loads((bundle / MANIFEST).read_text())
    edited["quality"]["ppl_fp"] = 12.0
    (bundle / MANIFEST).write_text(json.dumps(edited))
    assert any("edited after export" in p for p in verify_bundle(bundle))
    edited["quality"]["ppl_fp"] = math.nan
    (bundle / MANIFEST).write_text(json.dumps(edited))
    assert any("holds NaN or Infinity" in p for p in verify_bundle(bundle))

