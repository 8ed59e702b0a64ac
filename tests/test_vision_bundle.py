"""End to end (slow): tiny MiniCPM-V 2.0 -> android bundle (text + vision) -> `run --image` on the host
builds, against the PyTorch reference (vision reference + the dequantized text reference).

Tolerances: image features 1e-4 relative (as tests/test_vision_model.py); greedy tokens equal and
logits within 2e-3 absolute (the text target's LOGIT_ATOL; measured ~1e-5 with the plain lowering).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from exporter import api
from exporter.recipes import get_recipe
from exporter.vision.loader import load_minicpmv
from exporter.vision.multimodal import reference_generate
from exporter.vision.slicing import image_prompt, plan_image
from targets.tvm.options import TVMOptions
from targets.tvm.runner import VisionRunner, generate_with_image
from targets.tvm.vision import PARITY_RTOL_Q8, PARITY_RTOL_Q8_FP32, reference_features, synthetic_image
from targets.tvm.target import MLC_VISION_NOTE
from tests.support.tiny_minicpmv import tiny_recipe, write_tiny_minicpmv

pytestmark = pytest.mark.slow
LOGIT_ATOL = 2e-3


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("vbundle")
    ckpt = write_tiny_minicpmv(root / "ckpt", version=2)
    mp = pytest.MonkeyPatch()
    mp.setattr(api, "get_recipe", lambda name: tiny_recipe(get_recipe(name)))   # tiny dims, same recipe
    try:
        out = api.export("android", "v2-int4", checkpoint=ckpt, out=root / "bundle",
                         options=TVMOptions(backend="cpu"))
    finally:
        mp.undo()
    return ckpt, out


def test_bundle_layout_and_manifest(bundle):
    _, out = bundle
    manifest = json.loads((out / "manifest.json").read_text())
    for rel in ("vision/vision-config.json", "vision/lib/cpu/vision.tar", "vision/lib/cpu/vision.so",
                "vision/lib/host/vision.so", "vision/params/tensor-cache.json", "lib/cpu/model.tar"):
        assert rel in manifest["files"], rel
    ver = manifest["vision"]["verification"]
    # q8 weights (the default): vs PyTorch on the dequantized weights and vs fp32, targets/tvm/vision bounds
    assert [r["images"] for r in ver["images"]] == [1, 3]
    assert all(r["max_rel_err"] <= PARITY_RTOL_Q8 and r["max_rel_err_fp32"] <= PARITY_RTOL_Q8_FP32
               for r in ver["images"])
    conf = json.loads((out / "vision" / "vision-config.json").read_text())
    assert conf["weights"]["format"] == manifest["vision"]["weights"]["format"] == "q8"
    assert conf["weights"]["bytes"] < 0.5 * conf["weights"]["fp32_bytes"]
    assert conf["function"] == "image_embed" and conf["system_lib_prefix"] == "mcpm_v2_int4_vision_"
    # MLC-LLM: the text model loads; images are refused cleanly (no vision_config, no image_embed in the text
    # library: MLC's engine would embed (448/14)^2 = 1024 placeholder tokens, MiniCPM-V 2.0 uses 64 per slice)
    mlc_conf = json.loads((out / "mlc-chat-config.json").read_text())
    assert "vision_config" not in mlc_conf["model_config"] and mlc_conf["mcpm"]["vision"]["mlc"] == MLC_VISION_NOTE
    assert mlc_conf["conv_template"]["roles"] == {"user": "<用户>", "assistant": "<AI>"}
    import tvm
    text_vm = tvm.runtime.load_module(str(out / "lib" / "host" / "model.so"))["vm_load_executable"]()
    assert text_vm.implements_function("embed") and not text_vm.implements_function("image_embed")
    vc = conf["config"]
    assert (vc["scale_resolution"] // vc["patch"]) ** 2 != vc["query_num"]


@pytest.fixture(scope="module")
def host_models(tmp_path_factory):
    """Text + vision compiled for this machine only (no android build), from a tiny V2 checkpoint."""
    from targets.tvm import pipeline
    from targets.tvm.params import tvm_params
    from targets.tvm.runner import TVMModel
    from targets.tvm.vision import compile_vision, export_ir
    ckpt = write_tiny_minicpmv(tmp_path_factory.mktemp("host") / "ckpt", version=2)
    recipe = tiny_recipe(get_recipe("v2-int4"))
    lm = api.load(recipe, ckpt, prefix="llm.")
    qm, qref, _ = api.quantize(lm, allow_quality_loss=True)
    host = pipeline.make_target("cpu", pipeline.HOST_TARGET)
    mod, specs = pipeline.export_ir(lm.config, recipe.quantization, host, kv_dtype="float32")   # as plain builds ship
    # plain lowering (no fused int4 kernels, whose int8 activation rounding moves logits by ~0.1 on
    # this model, text or image alike): isolates the image splicing, exact to ~1e-5
    text = TVMModel(pipeline.compile_ir(mod, host, use_kernels=False), [a for _, a in tvm_params(specs, qm)],
                    recipe.context_window, recipe.prefill_chunk)
    ck = load_minicpmv(ckpt, recipe)
    vmod, vparams = export_ir(ck.vision_model())
    vision = VisionRunner(compile_vision(vmod, host), [a for _, a in vparams], ck.vision_config)
    return text, vision, lm.tokenizer, qref, ck


def test_image_generation_matches_pytorch(host_models):
    model, runner, tok, qref, ck = host_models
    img = synthetic_image(1344, 896)
    plan, feats, _ = runner.embed_image(img)
    ref_feats = reference_features(ck.vision_model(), img)
    assert np.abs(feats - ref_feats).max() / np.abs(ref_feats).max() < 1e-4
    ids, starts = image_prompt(tok, plan, "Describe the picture:")
    assert len(ids) == 1 + 7 * 66 + 2 + 1 + 1 + len(tok.encode("Describe the picture:", bos=False))
    got = generate_with_image(model, ids, starts, feats, 64, 8)
    ref_tokens, ref_logits = reference_generate(qref, ids, starts, ref_feats, 64, 8,
                                                prefill_chunk=model.prefill_chunk)
    assert got["tokens"] == ref_tokens
    assert max(float(np.abs(a - b).max()) for a, b in zip(got["logits"], ref_logits)) < LOGIT_ATOL
    # the image matters: another picture changes the first logits
    _, other, _ = runner.embed_image(synthetic_image(1344, 896, seed=5).transpose(0))
    alt = generate_with_image(model, ids, starts, other, 64, 1)
    assert float(np.abs(alt["logits"][0] - got["logits"][0]).max()) > 1e-3


def test_run_cli_with_image(bundle, tmp_path):
    from exporter.cli import main
    _, out = bundle
    path = tmp_path / "tall.png"
    synthetic_image(300, 1200).save(path)
    res = CliRunner().invoke(main, ["run", str(out), "--image", str(path), "--prompt", "What is this?",
                                    "--max-new-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output.splitlines()[-1])
    plan = plan_image(300, 1200, VisionRunner.from_bundle(out).cfg)
    assert len(data["vision_encode_s"]) == len(plan.images) and len(data["tokens"]) == 4
    assert data["plan"]["grid"] == list(plan.grid) and data["prefill_tok_s"] > 0
    bad = CliRunner().invoke(main, ["run", str(out), "--image", str(tmp_path / "missing.png"), "--prompt", "x"])
    assert bad.exit_code == 1 and "missing.png" in bad.output
