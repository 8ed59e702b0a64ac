"""iOS (Core ML) target, slow tier: one real `ios` export of tiny, then the saved package is checked
structurally and executed by the NumPy MIL interpreter against the PyTorch int4 reference."""
import json

import numpy as np
import pytest

from exporter import api
from exporter.errors import ExportError
from exporter.quality import CALIBRATION_TEXT, perplexity
from exporter.verify import verify_bundle
from targets.coreml.convert import LUT_EMBED_NAME, weight_file
from targets.coreml.mil_interp import Interpreter
from targets.coreml.palettize import packed_bytes
from targets.coreml.target import PACKAGE
from targets.coreml.options import IOSOptions
from targets.coreml.target import IOS
from targets.coreml.verify import LOGIT_BOUND, check, model_from_state, numerics, package_state_dict, structure

pytestmark = pytest.mark.slow
EVAL_TEXT = "/work/shared/eval/python-tutorial.txt"


@pytest.fixture(scope="module")
def bundle(ios_tiny_bundle):
    return ios_tiny_bundle


@pytest.fixture(scope="module")
def manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


@pytest.fixture(scope="module")
def interp(bundle):
    return Interpreter.from_package(bundle / PACKAGE)


def test_bundle_layout_and_manifest(bundle, manifest):
    for name in (PACKAGE, "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "config.json", "README.md", "manifest.json"):
        assert (bundle / name).exists(), name
    assert manifest["target"] == "ios" and manifest["backend"] == "coreml"
    ml = manifest["coreml"]
    assert ml["minimum_deployment_target"] == "iOS18"
    assert ml["functions"]["prefill"]["inputs"]["input_ids"]["shape"] == [1, 64]
    assert ml["functions"]["decode"]["inputs"]["input_ids"]["shape"] == [1, 1]
    assert ml["functions"]["decode"]["states"]["key_cache"]["shape"] == [8, 4, 512, 32]
    assert "last_index" in ml["chunking_rule"]
    assert manifest["verification"]["tokens_match"] is True
    assert manifest["verification"]["max_abs_logit_diff"] < LOGIT_BOUND
    q = manifest["quality"]         # GPTQ can beat the fp model on the 6 gate windows (tiny: -0.46%)
    assert q["ppl_fp"] > 1 and 0.95 < q["ppl_int4"] / q["ppl_fp"] and q["loss_pct"] <= q["threshold_pct"]
    assert f"{PACKAGE}/Data/com.apple.CoreML/weights/weight.bin" in manifest["files"]
    embed = manifest["quantization"]["embedding"]
    assert embed["kind"] == "lut6" and embed["bits"] == 6 and embed["op"] == "constexpr_lut_to_dense"
    assert "32 hidden columns" in embed["lut"] and manifest["quantization"]["embedding_bits"] == 6
    assert verify_bundle(bundle) == []
    # package item identifiers are derived from paths, not random: rebuilds are byte-identical
    ids = json.loads((bundle / PACKAGE / "Manifest.json").read_text())["itemInfoEntries"]
    assert all(k.split("-")[2].startswith("5") for k in ids)      # uuid5


def test_package_structure(interp):
    facts = structure(interp)
    assert set(facts["functions"]) == {"prefill", "decode"}
    assert facts["int4_weights"] == 8 * 7                 # every linear of every layer
    assert facts["int8_weights"] == 0
    assert facts["lut_weights"] == {LUT_EMBED_NAME + "_palettized":      # tied embedding / head
                                    {"bits": 6, "lut_shape": [1, 256 // 32, 64, 1]}}
    assert facts["fp32_constants"] == []
    assert structure(interp, "lut6") == facts
    with pytest.raises(ExportError, match="lacks the int8 embedding"):
        structure(interp, "int8")


def blob_bytes(nbytes: int) -> int:
    """weight.bin stores each blob behind a 64-byte header, padded to 64 bytes."""
    return 64 + -(-nbytes // 64) * 64


def test_weights_shared_and_small(bundle, manifest, interp):
    """weight.bin is exactly one copy of every constant in the format's layout (a duplicate between the
    functions would add megabytes): 4,924,224 bytes = 0.647 bytes/parameter on tiny, of which the
    6-bit embedding is 6 bits per weight + 8 tables of 64 float16 + one float16 scale per row."""
    wbytes = weight_file(bundle / PACKAGE).stat().st_size
    params = manifest["coreml"]["parameters"]
    blobs = {}
    for fn in interp.program.functions.values():
        for op in fn.operations:
            val = op.outputs[0].val
            if op.op_type == "const" and isinstance(val, np.ndarray) and val.size >= 10:
                bits = op.outputs[0].dtype.get_bitwidth()
                blobs[(op.outputs[0].dtype, val.shape, val.tobytes())] = -(-val.size * bits // 8)
    assert wbytes == 64 + sum(blob_bytes(b) for b in blobs.values())
    ops = {op.name: op for op in interp.program.functions["decode"].operations}
    lut_op = ops[LUT_EMBED_NAME + "_palettized"]
    embed = [lut_op.indices, lut_op.lut, ops["b_embed_row_scale_to_fp16"].outputs[0]]
    assert sum(-(-v.val.size * v.dtype.get_bitwidth() // 8) for v in embed) == packed_bytes(8192, 256)
    assert wbytes == 4_924_224 and round(wbytes / params, 3) == 0.647
    assert manifest["coreml"]["bytes_per_parameter"] == round(wbytes / params, 4)


def test_greedy_decode_matches_pytorch_int4_reference(bundle, interp, tiny):
    """A prompt from an unseen text: 2 prefill chunks (second padded) + 32 decode steps through the
    states give the reference's greedy tokens; logits within LOGIT_BOUND (measured ~0.02)."""
    with open(EVAL_TEXT) as f:
        prompt = tiny.tokenizer.encode(f.read(4000))[200:290]
    report = numerics(interp, tiny.config, list(tiny.state), prompt, 512, 64, steps=32)
    check(report, bundle)
    assert report.tokens_match and report.max_abs_logit_diff < LOGIT_BOUND
    assert len(set(report.tokens_coreml)) > 4                  # not a degenerate repetition


def test_verification_catches_a_wrong_scaling(bundle, tiny):
    """Break one MiniCPM scaling inside the program (scale_emb 12 -> 11): the check must fail."""
    interp = Interpreter.from_package(bundle / PACKAGE)
    changed = 0
    for fname, fn in interp.program.functions.items():
        for op in fn.operations:
            if op.op_type == "mul" and op.y.val is not None and np.size(op.y.val) == 1 \
                    and float(op.y.val) == 12.0:
                interp._consts[(fname, op.y.name)] = np.asarray(op.y.val) * np.float16(11 / 12)
                changed += 1
    assert changed == 2                                        # once in prefill, once in decode
    report = numerics(interp, tiny.config, list(tiny.state), tiny.tokenizer.encode("def main():"),
                      512, 64, steps=4)
    with pytest.raises(ExportError, match="differ from the PyTorch int4 reference"):
        check(report, bundle)


def test_interpreter_decompresses_weights_once_as_coremltools_does(bundle):
    """The interpreter's own 6-bit table look-up equals coremltools' decompression, and prefill and
    decode get one shared copy of every decompressed weight (not one per function)."""
    from targets.coreml.mil_interp import _lut_to_dense

    interp = Interpreter.from_package(bundle / PACKAGE)
    ops = {name: {op.name: op for op in fn.operations if op.op_type.startswith("constexpr_")}
           for name, fn in interp.program.functions.items()}
    lut_op = ops["decode"][LUT_EMBED_NAME + "_palettized"]
    assert np.array_equal(_lut_to_dense(lut_op), lut_op.materialized_val_inference())
    assert len(ops["decode"]) == len(ops["prefill"]) == 8 * 7 + 1
    for name, op in ops["decode"].items():
        assert interp.constant("decode", op) is interp.constant("prefill", ops["prefill"][name]), name


def test_package_holds_the_gated_weights(manifest, interp, tiny):
    """The manifest names what shipped (scheme q4f16_lut6, the recipe's quantizer) and its quality figures
    measure the package's weights: the centre's quantization of the iOS plan, redone here, is what the
    package decompresses to (int4 weights: the gated value rounded to float16, as Core ML multiplies
    code x scale in float16; the palettized embedding: exactly), and the gate's perplexity recomputed on
    the package's own weights matches the manifest's (measured: equal to 4 digits)."""
    q = manifest["quantization"]
    assert q["scheme"] == "q4f16_lut6" and q["quantizer"] == tiny.recipe.quantizer == "gptq"
    plan = IOS.plan(tiny.recipe, IOSOptions()).quantization
    qm, report = api.quantize_source(tiny.recipe, tiny.config, tiny.tokenizer, tiny.state.__getitem__,
                                     list(tiny.state), plan.scheme, quantizer=plan.quantizer,
                                     codecs=dict(plan.codecs))
    assert report.to_dict() == manifest["quality"]
    gated = qm.dequantized()
    package = package_state_dict(interp, list(gated))
    for name, w in gated.items():
        want = w if name == "tok_embeddings.weight" else w.half().float()
        assert bool((package[name] == want).all()), name
    linear = "layers.3.feed_forward.w2.weight"
    assert 0 < float((package[linear] - gated[linear]).abs().max()) <= float(gated[linear].abs().max()) * 2 ** -11
    recipe = tiny.recipe
    gate_ids = tiny.tokenizer.encode(CALIBRATION_TEXT.read_text())[512 * recipe.calibration_windows:]
    ppl = perplexity(model_from_state(tiny.config, package), gate_ids, count=recipe.gate_windows)
    assert abs(ppl / manifest["quality"]["ppl_int4"] - 1) < 2e-4
