"""Vision part for harmony with --backend all (slow): aarch64 CPU + OpenCL libraries, host-verified.

The OpenCL kernels are compiled and inspected, not executed (PyPI TVM has no OpenCL runtime).
"""
from __future__ import annotations

import json

import pytest

from exporter.recipes import get_recipe
from exporter.vision.loader import load_minicpmv
from targets.tvm.vision import _dynamic_reduction, build_vision, export_ir
from tests.support.tiny_minicpmv import tiny_recipe, write_tiny_minicpmv

pytestmark = pytest.mark.slow


def test_harmony_all_backends(tmp_path):
    ckpt = write_tiny_minicpmv(tmp_path / "ckpt", version=2)
    staging = tmp_path / "staging"
    staging.mkdir()
    extra = build_vision(ckpt, tiny_recipe(get_recipe("v2-int4")), staging, "harmony", "all")
    libs = extra["vision"]["libs"]
    assert set(libs) == {"cpu", "opencl", "host"}
    for rel in (libs["cpu"]["tar"], libs["cpu"]["so"], libs["opencl"]["tar"], libs["opencl"]["so"]):
        assert (staging / rel).stat().st_size > 0
    with open(staging / libs["cpu"]["so"], "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183   # EM_AARCH64
    src = (staging / libs["opencl"]["source"]).read_text()
    assert "__kernel" in src
    assert all(r["max_rel_err"] < 1e-4 for r in extra["vision"]["verification"]["images"])
    conf = json.loads((staging / "vision" / "vision-config.json").read_text())
    assert conf["weights"]["format"] == "fp32" and "OpenCL" in conf["weights"]["reason"]   # q8 is CPU only
    assert conf["tokens"]["im_start"] != conf["tokens"]["unk"]


def test_dynamic_reduction_detector(tmp_path):
    """The guard that keeps dlight's Matmul rule off reductions over the dynamic token count."""
    import tvm
    from tvm import relax
    ck = load_minicpmv(write_tiny_minicpmv(tmp_path / "c", version=2), tiny_recipe(get_recipe("v2-int4")))
    mod, _ = export_ir(ck.vision_model())
    with tvm.target.Target({"kind": "opencl"}):
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                        relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    flags = [_dynamic_reduction(f) for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert any(flags) and not all(flags)


def test_v1_fixed_square_cpu(tmp_path):
    """MiniCPM-V 1.0: one 448x448 image, non-adaptive resampler keys shipped as vision/key_pos.bin; q8 weights
    (default) read back from the bundle's tensor cache."""
    from targets.tvm.params import read_tensor_cache
    from targets.tvm.runner import VisionRunner
    from targets.tvm.vision import PARITY_RTOL_Q8, dequantized_vision, reference_features, synthetic_image
    ckpt = write_tiny_minicpmv(tmp_path / "ckpt", version=1)
    staging = tmp_path / "staging"
    staging.mkdir()
    extra = build_vision(ckpt, tiny_recipe(get_recipe("v-int4")), staging, "android", "cpu")
    assert [r["images"] for r in extra["vision"]["verification"]["images"]] == [1, 1]
    conf = json.loads((staging / "vision" / "vision-config.json").read_text())
    assert conf["key_pos"]["shape"] == [1024, 256] and (staging / "vision" / "key_pos.bin").stat().st_size == 1024 * 256 * 4
    # the bundle-side runner (key_pos read back from disk) agrees with PyTorch too
    runner = VisionRunner.from_bundle(staging)
    img = synthetic_image(1000, 300)
    _, got, _ = runner.embed_image(img)
    vision = load_minicpmv(ckpt, tiny_recipe(get_recipe("v-int4"))).vision_model()
    ref = reference_features(dequantized_vision(vision, read_tensor_cache(staging / "vision" / "params")), img)
    assert abs(got - ref).max() / abs(ref).max() < PARITY_RTOL_Q8
