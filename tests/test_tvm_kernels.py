"""Fused int4 kernels (targets/tvm/kernels.py): numbers against numpy, structure, aarch64 under qemu.

Tolerances. The kernels round activations to int8 per group of 32 (like llama.cpp's Q8_0), so:
  * against a numpy emulation of exactly that (int8 activations, integer dot, fp32 scales) the relative
    L2 error must be < 1e-4 (only fp32 summation order differs);
  * against numpy fp32 dequantize + matmul it must be < 1.5e-2 (measured ~5.5e-3) and, per output,
    within 3% of the output's largest magnitude.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.relax.frontend import nn
from tvm.support import cc

from exporter.quant import quantize_weight, unpack_int4, unpack_int8
from exporter.recipes import EMBEDDED_DIR
from runner import build as runner_build
from targets.tvm import kernels
from targets.tvm.model import Q4, Q8, QWeight

# (out, in): out not a multiple of the 16-row task; in/32 = 7, 33 groups leave SIMD tails (blocks of 4/2)
SHAPES = [(100, 224), (37, 1056), (300, 2304)]
CACHE = kernels.CACHE.parent


class Linear(nn.Module):
    def __init__(self, n_out: int, n_in: int, kind: str = Q4):
        self.w = QWeight(n_out, n_in, kind)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.w(x)


NORM_EPS = 1e-5


class NormLinear(nn.Module):
    """RMSNorm then a q4 linear layer: a block's attention_norm + wqkv."""
    def __init__(self, n_out: int, n_in: int):
        self.norm = nn.RMSNorm(n_in, -1, NORM_EPS, bias=False, dtype="float32")
        self.w = QWeight(n_out, n_in, Q4)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.w(self.norm(x))


def linear_ir(n_out: int, n_in: int, kind: str = Q4, norm: bool = False) -> tvm.IRModule:
    model = NormLinear(n_out, n_in) if norm else Linear(n_out, n_in, kind)
    mod, _ = model.export_tvm(spec={"forward": {"x": nn.spec.Tensor([1, "n", n_in], "float32")}})
    return mod


def weights(n_out: int, n_in: int, seed: int = 0, bits: int = 4):
    w = np.random.default_rng(seed).standard_normal((n_out, n_in)).astype(np.float32) * 0.05
    return quantize_weight(torch.from_numpy(w), bits, search=False)


def quantize_act(x: np.ndarray):
    """The kernels' activation rounding: int8 per 32-group, round half away from zero."""
    m, k = x.shape
    xg = x.reshape(m, k // 32, 32)
    amax = np.abs(xg).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    v = xg * inv
    xq = np.clip(np.trunc(v + np.copysign(np.float32(0.5), v)), -127, 127)
    return xq.astype(np.float64), (amax / np.float32(127))[..., 0].astype(np.float64)      # [m,G,32], [m,G]


def emulate(x: np.ndarray, qw: np.ndarray, sc: np.ndarray) -> np.ndarray:
    """numpy model of the kernel maths: int8 activations per 32-group, exact integer dot products."""
    m, k = x.shape
    xq, d = quantize_act(x)
    ones = np.ones_like(sc)
    q = (unpack_int4(qw, ones) if qw.dtype == np.uint32 else unpack_int8(qw, ones)).astype(np.float64)
    dots = np.einsum("mgk,ogk->mog", xq, q.reshape(qw.shape[0], k // 32, 32))   # [m, out, G] exact integers
    return np.einsum("mog,og,mg->mo", dots, sc.astype(np.float64), d).astype(np.float32)


def check(y: np.ndarray, x: np.ndarray, qw: np.ndarray, sc: np.ndarray) -> None:
    ref = x @ (unpack_int4(qw, sc) if qw.dtype == np.uint32 else unpack_int8(qw, sc)).T
    emu = emulate(x, qw, sc)
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    assert rel(y, emu) < 1e-4, f"kernel vs its int8 emulation: rel err {rel(y, emu):.2e}"
    assert rel(y, ref) < 1.5e-2, f"kernel vs fp32 dequant+matmul: rel err {rel(y, ref):.2e}"
    assert np.all(np.abs(y - ref) <= 0.03 * np.abs(ref).max(axis=1, keepdims=True))


def x86_target(mcpu: str) -> tvm.target.Target:
    """This machine's host target ("host") or an x86_64 one for another CPU (an older ISA path)."""
    return kernels.host_target() if mcpu == "host" else tvm.target.Target(
        {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu})


def build_host(mod: tvm.IRModule, target: tvm.target.Target, path: Path) -> relax.VirtualMachine:
    ex = tvm.compile(kernels.optimize_for_cpu(mod, target), target)
    ex.export_library(str(path))
    return relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())


# x86 ISA paths this machine can run: portable C, AVX2, AVX-512BW, and the host CPU (AVX-512 VNNI here)
HOST_ISAS = ["x86-64", pytest.param("haswell", marks=pytest.mark.slow),
             pytest.param("skylake-avx512", marks=pytest.mark.slow), "host"]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 ISA variants need an x86_64 host")
@pytest.mark.parametrize("mcpu", HOST_ISAS)
def test_fused_matches_numpy_host(tmp_path, mcpu):
    target = x86_target(mcpu)
    isa = kernels.isa_of(target)
    if mcpu != "host":
        assert isa == {"x86-64": "portable-c", "haswell": "avx2", "skylake-avx512": "avx512bw"}[mcpu]
    if not tvm.get_global_func("target.llvm_cpu_has_feature")("avx2", kernels.host_target()) and isa != "portable-c":
        pytest.skip(f"host cannot run {isa}")
    cases = [(Q4, 4, *shape) for shape in SHAPES] + [(Q8, 8, 37, 1056)]
    for i, (kind, bits, n_out, n_in) in enumerate(cases):
        vm = build_host(linear_ir(n_out, n_in, kind), target, tmp_path / f"lin{i}.so")
        qw, sc = weights(n_out, n_in, seed=i, bits=bits)
        for n in (1, 5, 39, 77):   # decode GEMV; prefill GEMMs: their token tiles (16, 8, 4, 1) and blocks + tails
            x = np.random.default_rng(10 + n).standard_normal((1, n, n_in)).astype(np.float32)
            y = vm["forward"](tvm.runtime.tensor(x), tvm.runtime.tensor(qw), tvm.runtime.tensor(sc)).numpy()
            assert y.shape == (1, n, n_out)
            check(y[0], x[0], qw, sc)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 ISA variants need an x86_64 host")
@pytest.mark.parametrize("mcpu", ["x86-64", "host"])
def test_rmsnorm_quantiser_matches_numpy(tmp_path, mcpu):
    """rms_norm(x, w) feeding a q4 linear layer is computed by its quantiser (mcpm_q4_quant_rmsnorm): the
    layer's output against numpy's RMSNorm then the kernel maths, at check()'s tolerances."""
    target = x86_target(mcpu)
    for i, (n_out, n_in) in enumerate(SHAPES[1:]):
        mod = linear_ir(n_out, n_in, norm=True)
        assert "mcpm_q4_quant_rmsnorm" in kernels.optimize_for_cpu(mod, target)["forward"].script()
        vm = build_host(mod, target, tmp_path / f"norm{i}.so")
        qw, sc = weights(n_out, n_in, seed=i)
        nw = (1 + 0.5 * np.random.default_rng(i).standard_normal(n_in)).astype(np.float32)
        for n in (1, 5, 39):
            x = np.random.default_rng(20 + n).standard_normal((1, n, n_in)).astype(np.float32) * 3
            y = vm["forward"](tvm.runtime.tensor(x), tvm.runtime.tensor(nw), tvm.runtime.tensor(qw),
                              tvm.runtime.tensor(sc)).numpy()
            xn = x[0] / np.sqrt(np.mean(x[0] ** 2, axis=-1, keepdims=True) + np.float32(NORM_EPS)) * nw
            check(y[0], xn.astype(np.float32), qw, sc)


# ---------------------------------------------------------------- structure: the dequantize is fused
_BUF = re.compile(r'(?:Buffer|alloc_buffer|match_buffer)\((?:[^()]*?,\s*)?\(((?:T\.int64\(\d+\)|\d+)'
                  r'(?:,\s*(?:T\.int64\(\d+\)|\d+))*),?\)(?:,\s*"(\w+)")?')
_DIM = re.compile(r"T\.int64\((\d+)\)|(\d+)")


def float_buffers_at_least(mod: tvm.IRModule, elems: int) -> list[str]:
    """Static-shape float buffers (TIR params, allocations) of >= elems elements, from the IR text."""
    found = []
    for match in _BUF.finditer(mod.script()):
        dims = [int(a or b) for a, b in _DIM.findall(match.group(1))]
        dtype = match.group(2) or "float32"
        if dtype.startswith("float") and int(np.prod(dims)) >= elems:
            found.append(match.group(0))
    return found


def lowered(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    with target:
        seq = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                        relax.transform.FuseOps(), relax.transform.FuseTIR(),
                                        relax.transform.DeadCodeElimination()])
        return seq(mod)


def test_no_fp32_weight_is_materialised():
    n_out, n_in = 300, 2304
    target = kernels.host_target()
    before = float_buffers_at_least(lowered(linear_ir(n_out, n_in), target), n_out * n_in)
    assert before, "control: the unfused module should hold a float [out, in] weight buffer"
    mod = kernels.optimize_for_cpu(linear_ir(n_out, n_in), target)
    assert float_buffers_at_least(lowered(mod, target), n_out * n_in) == []
    assert "dequantize" not in [gv.name_hint for gv in mod.functions.keys()]
    assert "external_mods" in mod.attrs and len(mod.attrs["external_mods"]) == 1


@pytest.mark.parametrize("scheme", ["q4f16", "q4f16_e8"])
def test_every_quantized_linear_of_the_model_is_fused(scheme):
    from exporter.config import MiniCPMConfig
    from targets.tvm import pipeline

    cfg = MiniCPMConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                        intermediate_size=640, vocab_size=1024, scale_emb=12, dim_model_base=64,
                        scale_depth=1.4, max_position_embeddings=512)
    target = kernels.host_target()
    mod, _ = pipeline.export_ir(cfg, scheme, target)
    out, n = kernels.fuse_q4_matmul(mod, target)
    # per layer wqkv, wo, w13, w2, in prefill, decode, batch_prefill and batch_decode (MLC's four forward
    # functions); plus the tied head (int4 or int8) in each
    assert n == 4 * (4 * cfg.num_hidden_layers + 1)
    names = [gv.name_hint for gv in out.functions.keys()]
    assert not any(s.startswith("dequantize") for s in names), names
    # w2's input, silu(gate) * up, is computed by the activation quantiser (q4_quant_swiglu): no silu left
    calls = "\n".join(out[f].script() for f in ("prefill", "decode", "batch_prefill", "batch_decode"))
    assert calls.count("mcpm_q4_quant_swiglu, ") == 4 * cfg.num_hidden_layers and "R.nn.silu" not in calls
    # every block's RMSNorms (attention_norm, ffn_norm) are computed by the quantiser; the final norm stays
    # (the head's input is that norm divided by hidden_size / dim_model_base)
    assert calls.count("mcpm_q4_quant_rmsnorm, ") == 4 * 2 * cfg.num_hidden_layers
    assert calls.count("R.nn.rms_norm(") == 4
    assert float_buffers_at_least(lowered(out, target), 256 * 256) == []


def test_system_lib_build_links_the_microkernels(tmp_path):
    """Android bundles are system libraries with a symbol prefix: the kernels must build and be inside."""
    target = kernels.host_target()
    mod = kernels.optimize_for_cpu(linear_ir(100, 224), target).with_attr("system_lib_prefix", "mcpm_kerneltest_")
    relax.build(mod, target, system_lib=True).export_library(str(tmp_path / "lib.tar"))
    with tarfile.open(tmp_path / "lib.tar") as tar:
        tar.extractall(tmp_path / "objs")
    defined = subprocess.run(["nm", "--defined-only", *map(str, (tmp_path / "objs").glob("*.o"))],
                             capture_output=True, text=True, check=True).stdout
    prefix = kernels.kernel_prefix(target)
    for name in ("q4_matmul_dyn", "q4_quant_act", "counter_reset"):
        assert f" W {prefix}{name}\n" in defined, name      # weak: a second library's copy is the same code
    assert " mcpm_q4_" not in defined                          # no unversioned names left to clash


# ---------------------------------------------------------------- aarch64 under qemu
A64_ROOT = CACHE / "tvm_aarch64" / "root"


def aarch64_runtime() -> Path:
    """The aarch64 TVM runtime (libraries and tvm_ffi headers), unpacked privately (never installed) from
    the pinned, sha256-checked wheels that scripts/install.sh fetched for the on-device runner: the
    tests download nothing."""
    if (A64_ROOT / "tvm" / "lib" / "libtvm_runtime.so").exists():
        return A64_ROOT
    wheels = runner_build.cached_wheels(runner_build.default_cache_dir() / "wheels")
    A64_ROOT.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=A64_ROOT.parent, prefix=".unpack-")
    try:
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                z.extractall(tmp, [n for n in z.namelist() if n.startswith(("tvm_ffi/", "tvm/lib/"))])
        shutil.rmtree(A64_ROOT, ignore_errors=True)         # an unpack of the old code, cut short
        os.replace(tmp, A64_ROOT)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return A64_ROOT


def aarch64_driver(root: Path) -> Path:
    src = Path(__file__).parent / "support" / "q4_driver.cc"
    exe = CACHE / "tvm_aarch64" / "q4_driver"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        inc = root / "tvm_ffi" / "include"
        subprocess.run(["aarch64-linux-gnu-g++", "-std=c++17", "-O1", f"-I{inc}", f"-I{inc / 'dlpack'}", str(src),
                        "-o", str(exe), f"-L{root / 'tvm_ffi' / 'lib'}", f"-L{root / 'tvm' / 'lib'}",
                        "-Wl,--no-as-needed", "-ltvm_ffi", "-ltvm_runtime"], check=True)
    return exe


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("qemu-aarch64-static") and shutil.which("aarch64-linux-gnu-g++")),
                    reason="needs qemu-aarch64-static and aarch64-linux-gnu-g++")
@pytest.mark.parametrize("mattr", [["+neon"], ["+neon", "+dotprod"], ["+neon", "+dotprod", "+i8mm"]],
                         ids=["neon", "dotprod", "i8mm"])
def test_fused_matches_numpy_aarch64_qemu(tmp_path, mattr):
    root = aarch64_runtime()
    driver = aarch64_driver(root)
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": mattr})
    assert kernels.isa_of(target) == {1: "neon", 2: "neon-dotprod", 3: "neon-i8mm"}[len(mattr)]
    env = {**os.environ, "LD_LIBRARY_PATH": f"{root / 'tvm_ffi' / 'lib'}:{root / 'tvm' / 'lib'}",
           "TVM_NUM_THREADS": "2"}
    for i, (kind, bits, n_out, n_in) in enumerate([(Q4, 4, *SHAPES[0]), (Q4, 4, *SHAPES[1]), (Q8, 8, 37, 1056)]):
        lib = tmp_path / f"a64_{i}.so"
        ex = tvm.compile(kernels.optimize_for_cpu(linear_ir(n_out, n_in, kind), target), target)
        ex.export_library(str(lib), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
        qw, sc = weights(n_out, n_in, seed=i, bits=bits)
        for n in (1, 5, 39):
            x = np.random.default_rng(10 + n).standard_normal((1, n, n_in)).astype(np.float32)
            files = [tmp_path / f for f in ("x.bin", "qw.bin", "sc.bin", "y.bin")]
            for arr, f in zip((x, qw, sc), files):
                arr.tofile(f)
            proc = subprocess.run(["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu", str(driver), str(lib),
                                   f"q{bits}", str(n), str(n_in), str(n_out), *map(str, files)], env=env,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-2000:]
            check(np.fromfile(files[3], dtype=np.float32).reshape(n, n_out), x[0], qw, sc)


# ---------------------------------------------------------------- attention
# kernels vs TVM's: fp32 summation order only (1e-4, logits are O(10)); with a float16 cache both round
# the attention output to float16, so an order difference can move it by one fp16 step (~1e-3 relative)
ATTN_ATOL = {"float32": 1e-4, "float16": 2e-2}


# (model, cache dtype, ISA): the trained tiny model (head_dim 32) and a random 2-layer one with head_dim 64
# (MiniCPM-2B's), on this CPU's kernels (AVX-512: 2 and 4 vectors per head row), AVX2 (4 and 8) and
# portable C; aarch64's NEON ones run in the qemu export tests.
ATTN_CASES = [("tiny", "float32", "host"), ("tiny", "float16", "host"), ("hd64", "float16", "host"),
              pytest.param("tiny", "float16", "x86-64", marks=pytest.mark.slow),
              pytest.param("hd64", "float16", "haswell", marks=pytest.mark.slow),
              pytest.param("tiny", "float16", "haswell", marks=pytest.mark.slow)]
HD64 = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}


@pytest.mark.parametrize("model,kv_dtype,mcpu", ATTN_CASES)
def test_attention_kernels_match_tvm_kernels(tmp_path, model, kv_dtype, mcpu):
    """kernels.replace_attention (decode, ragged and paged prefill, RoPE, KV append) vs TVM's own CPU kernels, on a model
    with no quantized linears, so attention is the only difference: GQA (2 query heads per KV head), a
    45-token prompt in chunks of 32 (ragged prefill, then paged prefill of the prefix + merge), 110
    decode steps that cross KV pages (16 slots, a last page partly filled; from 8 pages (113 tokens) on, decode
    splits the context into 2 parts of pages and merges them); and a 150-token prompt in one
    chunk (several 16-query x 64-key blocks of the ragged kernel, causal). Identical greedy tokens, logits
    within ATTN_ATOL."""
    from exporter.checkpoint import open_checkpoint
    from exporter.config import MiniCPMConfig
    from targets.tvm import pipeline
    from targets.tvm.params import tvm_params
    from targets.tvm.runner import TVMModel

    if mcpu != "host" and os.uname().machine != "x86_64":
        pytest.skip("x86 ISA variants need an x86_64 host")
    if model == "tiny":
        ck = open_checkpoint(EMBEDDED_DIR / "tinycpm-docs")
    else:
        from bench.make_2b_checkpoint import CONFIG_2B, make_checkpoint
        ck = open_checkpoint(make_checkpoint(tmp_path / "hd64", {**CONFIG_2B, **HD64, "vocab_size": 8192}))
    cfg = MiniCPMConfig.from_hf(ck.raw_config)
    assert cfg.num_attention_heads == 2 * cfg.num_key_value_heads
    assert cfg.head_dim == {"tiny": 32, "hd64": 64}[model]
    target = x86_target(mcpu)
    mod, specs = pipeline.export_ir(cfg, None, target, context_window=160, prefill_chunk=150, kv_dtype=kv_dtype)
    state = ck.text_tensors(cfg)
    if model == "hd64":     # random weights attend almost uniformly: sharpen the scores (online-softmax rescales)
        state = {k: v * 10 if k.endswith(("attention.wq.weight", "attention.wk.weight")) else v for k, v in state.items()}
        assert sum(k.endswith("attention.wq.weight") for k in state) == cfg.num_hidden_layers
    arrays = [a for _, a in tvm_params(specs, state)]
    runs, whole = [], []
    for use_kernels in (True, False):
        ex = pipeline.compile_ir(mod, target, use_kernels=use_kernels)
        ex.export_library(str(tmp_path / f"m{use_kernels}.so"))
        model = TVMModel(tmp_path / f"m{use_kernels}.so", arrays, context_window=160, prefill_chunk=32)
        runs.append(model.generate(list(range(5, 50)), 110))
        model.prefill_chunk = 150
        ids = [int(t) for t in np.arange(150) * 37 % 4000 + 5]
        whole.append(model.forward_chunks(model.new_cache(), model.embed(ids)))
    ours, tvms = runs
    assert ours.tokens == tvms.tokens
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ours.logits, tvms.logits))
    assert diff < ATTN_ATOL[kv_dtype], diff
    assert float(np.abs(whole[0] - whole[1]).max()) < ATTN_ATOL[kv_dtype]
    assert kernels.replace_attention(mod, target)[1] == 5

