"""int8 vision weights (targets/tvm/vision_q8.py + microkernels/vq8_gemm.c vq8_*): kernel numbers, rewrite, parity.

Tolerances.
  * GEMM kernel vs a numpy emulation of its maths (int8 activations per 32-group, exact integer dots,
    fp32 scales): relative L2 < 1e-4 (fp32 summation order only); vs numpy fp32 dequant + matmul < 1.5e-2
    (activation rounding, ~5e-3 measured), as tests/test_tvm_kernels.py states for the text q8 kernel.
  * Tiny V1/V2 encoder, host build with q8 weights: vs PyTorch on the same dequantized weights
    PARITY_RTOL_Q8 (3e-2; measured ~8e-3), vs the fp32 weights PARITY_RTOL_Q8_FP32 (6e-2; measured ~1.2e-2)
    (max abs diff over max |feature|, targets/tvm/vision.parity).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.support import cc

from exporter.recipes import get_recipe
from exporter.vision.loader import load_minicpmv
from targets.tvm import kernels, pipeline
from targets.tvm import vision_q8 as vq
from targets.tvm.runner import VisionRunner
from targets.tvm.vision import PARITY_RTOL_Q8, PARITY_RTOL_Q8_FP32, compile_vision, export_ir, parity
from tests.support.tiny_minicpmv import tiny_recipe, write_tiny_minicpmv
from tests.test_tvm_kernels import aarch64_driver, aarch64_runtime

# (out, in): rows not a multiple of the 32-row task / 4-row quad; in not a multiple of 32 (padded: 4304-like)
SHAPES = [(70, 96), (37, 1056), (100, 240)]
TOKENS = (1, 5, 19)       # token quads: partial, and 4 quads + a tail for the AVX-512 2x4 block


def case(n_out: int, n_in: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    qw, sc = vq.quantize_q8(rng.standard_normal((n_out, n_in)).astype(np.float32) * 0.05)
    return qw, sc


def check(y: np.ndarray, x: np.ndarray, qw: np.ndarray, sc: np.ndarray) -> None:
    m, k = x.shape
    kp = qw.shape[1]
    xp = np.zeros((m, kp), np.float32)
    xp[:, :k] = x
    xg = xp.reshape(m, kp // 32, 32)
    amax = np.abs(xg).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    v = xg * inv
    xq = np.clip(np.trunc(v + np.copysign(np.float32(0.5), v)), -127, 127).astype(np.float64)
    d = (amax / np.float32(127))[..., 0].astype(np.float64)
    dots = np.einsum("mgk,ogk->mog", xq, qw.astype(np.float64).reshape(qw.shape[0], kp // 32, 32))
    emu = np.einsum("mog,og,mg->mo", dots, sc.astype(np.float64), d)
    ref = x @ vq.dequantized(qw, sc, k).T
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    assert rel(y, emu) < 1e-4, f"kernel vs its int8 emulation: rel err {rel(y, emu):.2e}"
    assert rel(y, ref) < 1.5e-2, f"kernel vs fp32 dequant+matmul: rel err {rel(y, ref):.2e}"


def build(n_out, n_in, target, path, fcompile=None):
    ex = tvm.compile(vq.bind_kernels(vq.linear_module(n_out, n_in), target), target)
    ex.export_library(str(path), **({"fcompile": fcompile} if fcompile else {}))
    return path


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 ISA variants need an x86_64 host")
@pytest.mark.parametrize("mcpu", ["x86-64", "x86-64-v3", "host"])   # portable C, AVX2, host (AVX-512 VNNI here)
def test_gemm_matches_numpy_host(tmp_path, mcpu):
    target = kernels.host_target() if mcpu == "host" else tvm.target.Target(
        {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu})
    if mcpu != "host":
        assert kernels.isa_of(target) == {"x86-64": "portable-c", "x86-64-v3": "avx2"}[mcpu]
    for i, (n_out, n_in) in enumerate(SHAPES):
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(build(n_out, n_in, target, tmp_path / f"l{i}.so"))),
                                  tvm.cpu())
        qw, sc = case(n_out, n_in, i)
        for m in TOKENS:
            x = np.random.default_rng(m).standard_normal((1, m, n_in)).astype(np.float32)
            y = vm["forward"](tvm.runtime.tensor(x), tvm.runtime.tensor(qw), tvm.runtime.tensor(sc)).numpy()
            assert y.shape == (1, m, n_out)
            check(y[0], x[0], qw, sc)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("qemu-aarch64-static") and shutil.which("aarch64-linux-gnu-g++")),
                    reason="needs qemu-aarch64-static and aarch64-linux-gnu-g++")
@pytest.mark.parametrize("mattr", [["+neon"], ["+neon", "+dotprod"]], ids=["neon", "dotprod"])
def test_gemm_matches_numpy_aarch64_qemu(tmp_path, mattr):
    root = aarch64_runtime()
    driver = aarch64_driver(root)
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": mattr})
    env = {**os.environ, "LD_LIBRARY_PATH": f"{root / 'tvm_ffi' / 'lib'}:{root / 'tvm' / 'lib'}",
           "TVM_NUM_THREADS": "2"}
    for i, (n_out, n_in) in enumerate([(70, 96), (37, 1056)]):     # the driver reads k/32 scale groups
        lib = build(n_out, n_in, target, tmp_path / f"a64_{i}.so", cc.cross_compiler("aarch64-linux-gnu-g++"))
        qw, sc = case(n_out, n_in, i)
        for m in TOKENS:
            x = np.random.default_rng(m).standard_normal((1, m, n_in)).astype(np.float32)
            files = [tmp_path / f for f in ("x.bin", "qw.bin", "sc.bin", "y.bin")]
            for arr, f in zip((x, qw, sc), files):
                arr.tofile(f)
            proc = subprocess.run(["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu", str(driver), str(lib), "q8",
                                   str(m), str(n_in), str(n_out), *map(str, files)], env=env, capture_output=True,
                                  text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-2000:]
            check(np.fromfile(files[3], dtype=np.float32).reshape(m, n_out), x[0], qw, sc)


def test_rewrite_covers_the_big_linears(tmp_path):
    ck = load_minicpmv(write_tiny_minicpmv(tmp_path / "ckpt", version=2), tiny_recipe(get_recipe("v2-int4")))
    vision = ck.vision_model()
    _, fp32 = export_ir(vision, "fp32")
    mod, params = export_ir(vision, "q8")
    names = [n for n, _ in params]
    depth = vision.cfg.depth
    for b in range(depth):
        for lin in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            assert f"vpm.blocks.{b}.{lin}.weight.q8" in names and f"vpm.blocks.{b}.{lin}.weight" not in names
    for n in ("resampler.kv_proj.weight", "resampler.attn.in_proj_weight[0]", "resampler.attn.in_proj_weight[2]",
              "resampler.attn.out_proj.weight", "resampler.proj.T"):
        assert f"{n}.q8" in names and f"{n}.q8_scale" in names
    assert "vpm.patch_embed.proj.weight" in names and "vpm.pos_embed" in names      # kept fp32
    fc2 = dict(params)["vpm.blocks.0.mlp.fc2.weight.q8"]
    assert fc2.dtype == np.int8 and fc2.shape[1] % 32 == 0 and fc2.shape[1] >= vision.cfg.mlp
    assert sum(a.nbytes for _, a in params) < 0.5 * sum(a.nbytes for _, a in fp32)
    with pytest.raises(Exception, match="CPU microkernels only"):
        compile_vision(mod, pipeline.make_target("opencl", pipeline.HOST_TARGET))


@pytest.mark.parametrize("version", [2, 1])
def test_tiny_encoder_parity_q8(tmp_path, version):
    rec = tiny_recipe(get_recipe("v2-int4" if version == 2 else "v-int4"))
    ck = load_minicpmv(write_tiny_minicpmv(tmp_path / "ckpt", version=version, seed=version), rec)
    vision, vcfg = ck.vision_model(), ck.vision_config
    mod, params = export_ir(vision, "q8")
    compile_vision(mod, pipeline.make_target("cpu", pipeline.HOST_TARGET)).export_library(str(tmp_path / "v.so"))
    key_pos = None
    if not vcfg.adaptive:
        from exporter.vision.model import key_pos_table
        g = vcfg.image_size // vcfg.patch
        key_pos = key_pos_table(vision, g, g).reshape(g * g, -1)
    runner = VisionRunner(tmp_path / "v.so", [a for _, a in params], vcfg, key_pos)
    with torch.no_grad():
        report = parity(runner, vision, params=params)
    for row in report["images"]:
        assert row["max_rel_err"] <= PARITY_RTOL_Q8 and row["max_rel_err_fp32"] <= PARITY_RTOL_Q8_FP32
        assert row["max_rel_err"] > 0          # the q8 path really ran (int8 activations are not exact)
