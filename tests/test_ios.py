"""iOS (Core ML) target, fast tier: the Core ML-friendly forward, the NumPy MIL interpreter on a small
converted program, the central weights shipped as Core ML constants, the 6-bit embedding tables, the
plan, and every refusal (vision, old iOS, bad options, bad checkpoint)."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from exporter import api
from exporter.errors import ExportError
from exporter.recipes import get_recipe
from targets.coreml.palettize import dequantize, kmeans_lut, nearest, packed_bytes
from exporter.quant import QTensor, quantize_weight
from targets.coreml.options import IOSOptions, IOSSettings
from targets.coreml.target import IOS, parse_deployment_target
from targets.coreml.wrapper import CoreMLMiniCPM

i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731


@torch.no_grad()
def test_coreml_forward_equals_reference(tiny):
    """Chunked prefill (last chunk padded, read at last_index) + decode through the fixed-size cache
    buffers gives the reference model's logits (float32 both sides: |diff| < 1e-4, logits ~ 20)."""
    ref = tiny.model
    model = CoreMLMiniCPM(ref, context=256).eval()
    ids = torch.randint(0, ref.cfg.vocab_size, (1, 108), generator=torch.Generator().manual_seed(3))
    full = ref(ids)                                                   # [1, 108, vocab]
    first = model(ids[:, :64].int(), i32(0), i32(63))                 # chunk 1: 64 real tokens
    padded = torch.zeros(1, 64, dtype=torch.int32)
    padded[0, :36] = ids[0, 64:100]
    second = model(padded, i32(64), i32(35))                          # chunk 2: 36 real + 28 pad
    assert (first[0, 0] - full[0, 63]).abs().max() < 1e-4
    assert (second[0, 0] - full[0, 99]).abs().max() < 1e-4
    for pos in range(100, 108):                                       # decode overwrites the padding
        step = model(ids[:, pos:pos + 1].int(), i32(pos))
        assert (step[0, 0] - full[0, pos]).abs().max() < 1e-4, pos
    assert full[0, 99].abs().max() > 1.0                              # the comparison is not vacuous


@torch.no_grad()
def test_row_scaled_embedding_forward_equals_reference(tiny):
    """The lut6 layout (normalised rows, row scale after the gather and on the logits) is the same
    model: float32 logits within 2e-2 of the reference (logits ~10; the rows divided by their scale are
    rounded to float16, relative 2^-11 per weight: measured 0.005)."""
    ref = tiny.model
    model = CoreMLMiniCPM(ref, context=128, row_scaled_embedding=True).eval()
    assert model.embed_rows.abs().amax(1).eq(1).all()               # every row's largest value is 1
    ids = torch.randint(0, ref.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    got = model(ids.int(), i32(0))
    want = ref(ids)[0]
    assert (got[0] - want).abs().max() < 2e-2 and want.abs().max() > 5


def test_lut_tables():
    """The k-means table reproduces data with <= 64 distinct values exactly, and on Gaussian rows the
    6-bit tables (row scale + per-32-column tables) have < 3.5x the error of int8 per row (measured
    3.3x; uniform 6-bit per row: 4.1x), packed as 6 bits + tables + row scales."""
    few = np.random.default_rng(0).choice(np.linspace(-1, 1, 50), size=5000).astype(np.float16)
    lut = kmeans_lut(few)
    assert lut.shape == (64,) and np.all(np.diff(lut.astype(np.float32)) >= 0)
    assert np.array_equal(lut[nearest(few, lut)], few)
    w = np.random.default_rng(1).standard_normal((512, 256)).astype(np.float32) * 0.02
    q6 = dequantize(w)
    s8 = np.abs(w).max(1, keepdims=True) / 127
    q8 = np.round(w / s8) * s8
    rmse = lambda q: float(np.sqrt(np.mean((q - w) ** 2)))  # noqa: E731
    assert rmse(q6) < 3.5 * rmse(q8)
    assert packed_bytes(512, 256) == 512 * 256 * 6 // 8 + 8 * 64 * 2 + 512 * 2
    assert packed_bytes(122753, 2304) == 212_117_184 + 9216 + 245_506      # MiniCPM-2B


def test_mil_interpreter_runs_a_converted_stateful_program(tmp_path):
    """Convert a two-layer stateful toy with coremltools, save, load back, execute with the interpreter:
    outputs and the state written in place match PyTorch (float16 activations: 2e-2)."""
    import coremltools as ct
    from targets.coreml.patches import patched
    from targets.coreml.mil_interp import Interpreter

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(50, 16)
            self.lin = torch.nn.Linear(16, 16, bias=False)
            self.register_buffer("cache", torch.zeros(1, 8, 16))

        def forward(self, ids, start):
            s = start.item()
            torch._check(s >= 0)
            torch._check(s + ids.shape[1] <= 8)
            h = torch.nn.functional.silu(self.lin(self.emb(ids) * 2.0))
            self.cache[:, s:s + ids.shape[1]] = h
            return torch.softmax(h @ self.cache[0].T, -1) @ self.cache[0]

    toy = Toy().eval()
    with torch.no_grad(), patched():
        prog = torch.export.export(toy, (torch.zeros(1, 2, dtype=torch.int32), i32(0))).run_decompositions({})
        ml = ct.convert(prog, inputs=[ct.TensorType(name="ids", shape=(1, 2), dtype=np.int32),
                                      ct.TensorType(name="start", shape=(1,), dtype=np.int32)],
                        states=[ct.StateType(wrapped_type=ct.TensorType(shape=(1, 8, 16), dtype=np.float16),
                                             name="cache")],
                        outputs=[ct.TensorType(name="out", dtype=np.float16)],
                        minimum_deployment_target=ct.target.iOS18)
    ml.save(str(tmp_path / "toy.mlpackage"))
    interp = Interpreter.from_package(tmp_path / "toy.mlpackage")
    state = {"cache": np.zeros((1, 8, 16), np.float16)}
    toy.cache.zero_()
    for start, ids in ((0, [[3, 7]]), (2, [[11, 49]]), (4, [[0, 5]])):
        got = interp.run("main", {"ids": np.array(ids), "start": np.array([start])}, state)["out"]
        with torch.no_grad():
            want = toy(torch.tensor(ids, dtype=torch.int32), i32(start)).numpy()
        np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-2)
    np.testing.assert_allclose(state["cache"].astype(np.float32), toy.cache.numpy(), atol=2e-2)
    assert np.abs(state["cache"][0, 6:]).max() == 0                    # untouched slots stay zero
    with pytest.raises(ExportError, match="input 'start' not provided"):
        interp.run("main", {"ids": np.array([[1, 2]])}, state)
    with pytest.raises(ExportError, match=r"input 'ids' has shape \(1, 3\), expected \(1, 2\)"):
        interp.run("main", {"ids": np.array([[1, 2, 3]]), "start": np.array([0])}, state)


def settings(recipe: str, **options) -> IOSSettings:
    return IOS.plan(get_recipe(recipe), IOSOptions(**options)).settings


def test_shipped_constants_hold_the_central_codes(tmp_path):
    """A Linear converted by coremltools, its weight swapped by ShippedWeights for a q4f16 QTensor
    (blocks using +8 included): the package holds int4 data in [-8, 7] and float16 scales, and the
    interpreter decompresses exactly the central dequantized weights rounded to float16."""
    import coremltools as ct
    from coremltools.converters.mil.mil.ops.defs.iOS18 import constexpr_blockwise_shift_scale as op_def
    from coremltools.models.utils import _apply_graph_pass
    from targets.coreml.mil_interp import Interpreter
    from targets.coreml.patches import patched
    from targets.coreml.shipped import ShippedWeights, blockwise, mil_const_name

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=g) * (torch.rand(48, 128, generator=g) + 0.2)
    qt = QTensor(4, *quantize_weight(w, 4))
    data, scale = blockwise(qt)
    values = qt.dequantize()
    assert data.min() >= -8 and data.max() <= 7 and (scale < 0).any() and (scale > 0).any()
    exact = op_def.decompress(data, scale, None)
    assert exact.dtype == np.float16 and np.array_equal(exact, values.astype(np.float16))
    assert np.abs(exact.astype(np.float32) - values).max() <= np.abs(values).max() * 2.0 ** -11

    lin = torch.nn.Linear(128, 48, bias=False).eval()
    with torch.no_grad(), patched():
        lin.weight.copy_(w)
        prog = torch.export.export(lin, (torch.zeros(1, 128),)).run_decompositions({})
        ml = ct.convert(prog, inputs=[ct.TensorType(name="x", shape=(1, 128))], minimum_deployment_target=ct.target.iOS18,
                        compute_precision=ct.precision.FLOAT16)
        name = next(op.name for op in ml._mil_program.functions["main"].operations if op.op_type == "const"
                    and getattr(op.outputs[0].val, "ndim", 0) == 2)
        assert name == mil_const_name("weight")
        ml = _apply_graph_pass(ml, [ShippedWeights({name: qt})])
    ml.save(str(tmp_path / "lin.mlpackage"))
    interp = Interpreter.from_package(tmp_path / "lin.mlpackage")
    ops = {op.name: op for op in interp.program.functions["main"].operations}
    held = ops[name + "_quantized"]
    assert held.op_type == "constexpr_blockwise_shift_scale" and held.data.dtype.get_bitwidth() == 4
    assert np.array_equal(interp.constant("main", held), exact)
    with pytest.raises(ExportError, match="has no quantized weights"):
        ShippedWeights({}).apply(ct.convert(prog, inputs=[ct.TensorType(name="x", shape=(1, 128))],
                                            minimum_deployment_target=ct.target.iOS18)._mil_program)


def test_plan_declares_what_the_centre_quantizes():
    """The iOS plan names the recipe's quantizer (clip honoured) and the scheme per embedding kind; the
    lut6 embedding is the target's codec, so the gate measures the palettized values."""
    tiny = get_recipe("tiny")
    q = IOS.plan(tiny, IOSOptions()).quantization
    assert q.scheme.name == "q4f16_lut6" and q.quantizer == "gptq" and dict(q.codecs).keys() == {"tok_embeddings.weight"}
    assert IOS.plan(dataclasses.replace(tiny, quantizer="clip"), IOSOptions()).quantization.quantizer == "clip"
    assert IOS.plan(tiny, IOSOptions(embedding="int8")).quantization.scheme.name == "q4f16_e8"
    assert IOS.plan(tiny, IOSOptions(embedding="int4")).quantization.scheme.name == "q4f16"
    assert IOS.plan(get_recipe("sft-fp16"), IOSOptions()).quantization.manifest("gptq")["quantizer"] == "none"


@pytest.mark.parametrize("text,major", [("iOS18", 18), ("ios18", 18), ("18", 18), ("iOS26", 26)])
def test_deployment_target_parsing(text, major):
    assert parse_deployment_target(text) == major


def test_refuses_old_deployment_target_with_int4():
    with pytest.raises(ExportError, match=r"iOS17 is too old: int4 weights .* need iOS 18 or newer"):
        settings("tiny", deployment_target="iOS17")
    with pytest.raises(ExportError, match="expected the form iOS18"):
        settings("tiny", deployment_target="android")


def test_embedding_option():
    """q4f16_e8 ships the 6-bit palettized embedding; int8 stays reachable as a target option."""
    assert settings("tiny") == IOSSettings(18, "lut6", None)
    assert settings("sft-int4", embedding="int8") == IOSSettings(18, "int8")
    with pytest.raises(ExportError, match="embedding 'int7': expected one of lut6, int8, int4"):
        settings("tiny", embedding="int7")
    with pytest.raises(ExportError, match="keeps float16 weights"):
        settings("sft-fp16", embedding="lut6")
    res = subprocess.run([sys.executable, "-m", "exporter.cli", "ios", "--embedding", "int7"],
                         capture_output=True, text=True)        # the CLI offers the same choices
    assert res.returncode == 2 and "'int7' is not one of 'lut6', 'int8', 'int4'" in res.stderr, res.stderr


def test_refuses_vision_recipe():
    with pytest.raises(ExportError, match="vision model; the iOS target is text only"):
        IOS.plan(get_recipe("v-int4"), IOSOptions(deployment_target="iOS18"))
    with pytest.raises(ExportError, match="iOS is text only"):
        api.export("ios", "v2-int4")


def test_cli_refusals_are_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "bundle"
    res = subprocess.run([sys.executable, "-m", "exporter.cli", "ios", "--out", str(out),
                          "--deployment-target", "iOS16"], capture_output=True, text=True)
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "iOS16 is too old" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()


def test_absent_checkpoint(tmp_path):
    with pytest.raises(ExportError, match=r"--checkpoint .*nowhere: no such directory"):
        api.export("ios", "tiny", checkpoint=tmp_path / "nowhere", out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_corrupt_checkpoint(tiny_copy, tmp_path):
    shard = tiny_copy / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4096])
    with pytest.raises(ExportError, match=r"model-00002-of-00002.safetensors: truncated or corrupt"):
        api.export("ios", "tiny", checkpoint=tiny_copy, out=tmp_path / "b")
    assert not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".b.partial-*"))


def test_lean_coremltools_checks_match_originals(monkeypatch):
    """patches.py swaps coremltools' fp16-overflow check and const_deduplication's allclose
    for sliced versions (memory, docs/ios.md): they must answer exactly like the originals."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    from targets.coreml import patches as convert

    monkeypatch.setattr(convert, "CHUNK", 7)                  # force several slices
    rng = np.random.default_rng(0)
    cases = []
    for extra in ([], [70000.0], [-65505.0], [np.inf, -np.inf, np.nan], [65504.0], [2e38, 70000.0],
                  [3e38]):
        v = rng.normal(0, 100, 40).astype(np.float32)
        v[rng.choice(40, len(extra), replace=False)] = extra
        cases.append(v.reshape(5, 8))
    for v in cases:
        @mb.program(input_specs=[mb.TensorSpec(shape=(5, 8))])
        def prog(x):
            return mb.add(x=x, y=v)
        op = next(o for o in prog.functions["main"].operations if o.op_type == "add")
        assert convert._lean_fp16_overflow(op) == FP16ComputePrecision.fp16_overflow(op), v
    for a, b in [(cases[0], cases[0] + 1e-13), (cases[0], cases[0] + 1e-3), (cases[2], cases[2].copy()),
                 (cases[0].astype(np.uint8), cases[0].astype(np.uint8))]:
        for atol in (6e-8, 1e-12, 1e-2):
            assert convert._lean_allclose(a, b, rtol=0.0, atol=atol) == np.allclose(a, b, rtol=0.0, atol=atol)


def test_spill_weights_keeps_values_and_maps_files(tmp_path):
    """Spilled parameters: same values, shapes, dtypes and sharing; backed by the files (mapped)."""
    from targets.coreml.convert import SPILL_MIN, spill_weights

    big, small = torch.nn.Linear(1024, SPILL_MIN // 1024, bias=False), torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(big, small, big)              # one parameter used twice
    before = [p.detach().clone() for p in model.parameters()]
    assert spill_weights(model, tmp_path) == SPILL_MIN * 4
    assert list(tmp_path.iterdir()) == []                     # unlinked at once, mapping kept
    assert model[0].weight is model[2].weight and not model[0].weight.requires_grad
    for p, q in zip(model.parameters(), before):
        assert p.dtype == q.dtype and torch.equal(p, q)
    with open("/proc/self/maps") as f:
        assert sum(str(tmp_path) in line and "(deleted)" in line for line in f) >= 1


def test_ane_head_option():
    assert settings("sft-int4", ane_head=True).head_rows == 16384
    assert settings("tiny", ane_head_rows=3000) == IOSSettings(18, "lut6", 3000)
    assert settings("tiny", ane_head=False).head_rows is None
    with pytest.raises(ExportError, match=r"ane_head_rows must be an integer in 1..16384, got 20000"):
        settings("tiny", ane_head_rows=20000)
    res = subprocess.run([sys.executable, "-m", "exporter.cli", "ios", "--help"], capture_output=True, text=True)
    assert "--ane-head" in res.stdout


def test_memory_budget_and_compute_units():
    """The weight estimate against real 2B-width conversions (docs/ios.md: lut6, 1 and 2 layers:
    248,564,096 and 282,903,808 bytes of weight.bin); KV state = 2 caches of L*KV*N*D float16."""
    import dataclasses

    from targets.coreml.budget import compute_units, estimate_weight_bytes, memory_budget

    cfg = api.load("tiny").config
    two_b = get_recipe("sft-int4")
    for layers, measured in ((1, 248_564_096), (2, 282_903_808)):
        c = dataclasses.replace(cfg, **{**two_b.dims, "num_hidden_layers": layers})
        assert abs(estimate_weight_bytes(c, "lut6", 2048, 128) / measured - 1) < 0.001
    c = dataclasses.replace(cfg, **two_b.dims)
    b = memory_budget(c, 2048, 128, embedding="lut6")
    assert abs(estimate_weight_bytes(cfg, "lut6", 512, 64) / 4_924_224 - 1) < 0.01   # tiny's weight.bin
    assert b.kv_state_bytes == 2 * 40 * 36 * 2048 * 64 * 2                  # 755 MB, as issue 13 says
    assert b.peak_bytes == b.weights_bytes + b.kv_state_bytes + b.working_bytes
    assert memory_budget(c, 2048, 128, weights=123).weights_bytes == 123
    assert compute_units(122753, "lut6", False).recommended == ".cpuAndGPU"
    assert "exceeds the Neural Engine's 16384" in compute_units(122753, "lut6", False).reason
    assert compute_units(16384, "lut6", True).recommended == ".cpuAndNeuralEngine"
    assert compute_units(8192, "lut6", False).recommended == ".cpuAndGPU"
