"""Vision path numerics: loader name table, export form vs reference, host TVM and onnxruntime parity.

Tolerances (relative to max |feature| of the PyTorch reference, fp32 everywhere):
  export form (torch) vs reference        1e-5   (measured ~1e-6)
  TVM host build / onnxruntime vs torch   1e-4   (measured ~1e-6)
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exporter import names as text_names
from exporter.errors import ExportError
from exporter.recipes import get_recipe, load_recipes
from exporter.vision import preprocess as pp
from exporter.vision.loader import load_minicpmv
from exporter.vision.model import VisionEncoder, key_pos_table
from exporter.vision.slicing import plan_image, slice_images
from targets.tvm.runner import VisionRunner
from targets.tvm.vision import export_ir, reference_features, synthetic_image
from tests.support.tiny_minicpmv import tiny_model_for, tiny_recipe, write_tiny_minicpmv

EXPORT_RTOL, RUNTIME_RTOL = 1e-5, 1e-4
THUMB_ONLY, MULTI_SLICE = (400, 300), (1344, 896)


def rel_err(got, ref) -> float:
    return float(np.abs(np.asarray(got) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    path = write_tiny_minicpmv(tmp_path_factory.mktemp("v2") / "ckpt", version=2)
    return load_minicpmv(path, tiny_recipe(get_recipe("v2-int4")))


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    path = write_tiny_minicpmv(tmp_path_factory.mktemp("v1") / "ckpt", version=1, seed=1)
    return load_minicpmv(path, tiny_recipe(get_recipe("v-int4")))


@pytest.mark.parametrize("n_out", [1, 7, 16, 27, 32, 39, 64, 143])
def test_aa_bicubic_matrix_is_torch_antialias_bicubic(n_out):
    grid = torch.randn(1, 3, 27, 27, dtype=torch.float64)
    want = F.interpolate(grid, size=(n_out, 9), mode="bicubic", antialias=True, align_corners=False)
    a_h = torch.from_numpy(pp.aa_bicubic_matrix(27, n_out)).double()
    a_w = torch.from_numpy(pp.aa_bicubic_matrix(27, 9)).double()
    assert float((a_h @ grid @ a_w.T - want).abs().max()) < 1e-6


def test_sincos_2d_is_openbmb_table():
    # OpenBMB get_2d_sincos_pos_embed((h, w)): meshgrid(w, h), first half encodes grid[0] (columns)
    D, h, w = 32, 3, 5
    gw, gh = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))

    def one(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float32) / (dim / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    want = np.concatenate([one(D // 2, gw), one(D // 2, gh)], axis=1)
    assert np.allclose(pp.sincos_2d(D, h, w).reshape(-1, D), want, atol=1e-6)


def test_patchify_matches_conv2d():
    x = torch.randn(3, 28, 42)
    weight = torch.randn(5, 3, 14, 14)
    conv = F.conv2d(x[None], weight, stride=14)[0].permute(1, 2, 0).reshape(-1, 5)
    lin = torch.from_numpy(pp.patchify(x.numpy(), 14)).reshape(-1, 3 * 196) @ weight.reshape(5, -1).T
    assert float((conv - lin).abs().max()) < 1e-4


def test_loader_consumes_every_key(v2):
    ck = v2.checkpoint
    assert all(k.startswith(("vpm.", "resampler.", "llm.")) for k in ck.shards)
    assert set(v2.vision_state) == {k for k in ck.shards if not k.startswith("llm.")}
    text = v2.text_state()
    assert set(text) == text_names.expected_names(v2.text_config.num_hidden_layers, v2.text_config.tie_word_embeddings)
    cfg = v2.vision_config
    assert (cfg.width, cfg.depth, cfg.heads, cfg.pos_grid, cfg.hidden, cfg.resampler_heads) == (64, 2, 4, 27, 256, 2)


def _rewrite(src, dst, edit):
    """Copy a checkpoint dir, editing the vision shard's tensors with ``edit(dict)``."""
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    shard = dst / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not v.endswith("2.safetensors")}
    index["weight_map"].update({k: shard.name for k in tensors})
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.__setitem__("vpm.mystery.weight", torch.zeros(2)), "'vpm.mystery.weight' is not in the MiniCPM-V name table"),
    (lambda t: t.pop("resampler.ln_post.bias"), "lacks tensor 'resampler.ln_post.bias'"),
    (lambda t: t.__setitem__("resampler.proj", torch.zeros(3, 3)), "'resampler.proj' has shape"),
])
def test_loader_errors_name_the_tensor(v2, tmp_path, edit, match):
    bad = _rewrite(v2.checkpoint.path, tmp_path / "bad", edit)
    with pytest.raises(ExportError, match=match):
        load_minicpmv(bad, tiny_recipe(get_recipe("v2-int4")))


def test_loader_ignores_attention_pool_head(v2, tmp_path):
    ok = _rewrite(v2.checkpoint.path, tmp_path / "ok",
                  lambda t: t.__setitem__("vpm.attn_pool.latent", torch.zeros(1, 1, 64)))
    assert "vpm.attn_pool.latent" not in load_minicpmv(ok, tiny_recipe(get_recipe("v2-int4"))).vision_state


@pytest.mark.parametrize("size", [THUMB_ONLY, MULTI_SLICE, (4000, 200)])
def test_export_form_matches_reference_v2(v2, size):
    vision, cfg = v2.vision_model(), v2.vision_config
    enc = VisionEncoder(vision)
    img = synthetic_image(*size)
    for im in slice_images(img, plan_image(*size, cfg)):
        inp = pp.encoder_inputs(im, cfg)
        with torch.no_grad():
            got = enc(*[torch.from_numpy(inp[k]) for k in pp.INPUT_NAMES])
        ref = vision.reference_embed(torch.from_numpy(pp.normalise(im)))
        assert rel_err(got, ref) < EXPORT_RTOL


def test_export_form_matches_reference_v1(v1):
    vision, cfg = v1.vision_model(), v1.vision_config
    assert not cfg.adaptive and not cfg.slicing
    img = synthetic_image(640, 480).resize((448, 448))
    inp = pp.encoder_inputs(img, cfg, key_pos_table(vision, 32, 32))
    with torch.no_grad():
        got = VisionEncoder(vision)(*[torch.from_numpy(inp[k]) for k in pp.INPUT_NAMES])
    assert rel_err(got, vision.reference_embed(torch.from_numpy(pp.normalise(img)))) < EXPORT_RTOL


@pytest.fixture(scope="module")
def host_runner(v2):
    """The vision library compiled for this machine (same IR as the phone builds)."""
    from targets.tvm import pipeline
    mod, params = export_ir(v2.vision_model())
    ex = pipeline.compile_ir(mod, pipeline.make_target("cpu", pipeline.HOST_TARGET), use_kernels=False)
    return VisionRunner(ex, [a for _, a in params], v2.vision_config)


@pytest.mark.parametrize("size", [THUMB_ONLY, MULTI_SLICE])
def test_host_tvm_matches_pytorch(v2, host_runner, size):
    img = synthetic_image(*size)
    plan, got, times = host_runner.embed_image(img)
    assert got.shape == (64 * len(plan.images), 256) and len(times) == len(plan.images)
    assert len(plan.images) == (1 if size == THUMB_ONLY else 7)
    assert rel_err(got, reference_features(v2.vision_model(), img)) < RUNTIME_RTOL


def test_onnxruntime_matches_pytorch(v2, tmp_path):
    from exporter.vision.onnx_ref import OnnxVision, export_onnx
    vision = v2.vision_model()
    sess = OnnxVision(export_onnx(vision, tmp_path / "vision.onnx"), v2.vision_config)
    for size in (THUMB_ONLY, MULTI_SLICE):
        img = synthetic_image(*size)
        got = np.concatenate([sess.embed_one(im) for im in slice_images(img, plan_image(*size, v2.vision_config))])
        assert rel_err(got, reference_features(vision, img)) < RUNTIME_RTOL


def test_parity_check_can_fail(v2, host_runner):
    """The export-time verification rejects a library whose weights drifted."""
    from targets.tvm.vision import parity
    vision = v2.vision_model()
    with torch.no_grad():
        vision.resampler.proj.mul_(1.01)
    with pytest.raises(ExportError, match="vision verification failed"):
        parity(host_runner, vision, sizes=[THUMB_ONLY])


def test_every_recipe_has_a_tiny_test_model(tmp_path):
    for name, recipe in load_recipes().items():
        path = tiny_model_for(recipe, tmp_path)
        assert (path / "config.json").is_file(), name
        if recipe.is_vision:
            ck = load_minicpmv(path, tiny_recipe(recipe))
            assert ck.vision_config.version == recipe.vision.get("version", 2), name
