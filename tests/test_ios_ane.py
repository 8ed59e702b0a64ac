"""--ane-head: the tied embedding / head split into pieces inside the program. tiny's vocabulary (8192)
already fits the Neural Engine's 16384, so the export here uses pieces of 3000 rows (3 pieces of 2731,
the last one with a padding row, like MiniCPM-2B's prime 122753 in 8 x 15345): no tensor of either
function may have a dimension over 3000, and the logits must equal the unsplit package's."""
import json

import numpy as np
import pytest

from exporter import api
from exporter.errors import ExportError
from targets.coreml.options import IOSOptions
from targets.coreml.session import open_bundle
from targets.coreml.verify import package_state_dict, structure
from targets.coreml.wrapper import MASK_VALUE, flat_logits

pytestmark = pytest.mark.slow
ROWS = 3000
# Both packages hold the same weights (the pieces are palettized with the whole matrix's tables) and
# compute every logit with the same operations in the same order: measured 0.0 through the interpreter.
# (Pieces with their own tables differed by up to 0.41; one op rounded differently, by ~0.02.)
BOUND = 1e-3


@pytest.fixture(scope="module")
def ane_bundle(tmp_path_factory):
    return api.export("ios", "tiny", out=tmp_path_factory.mktemp("ane") / "tiny-ane",
                      options=IOSOptions(ane_head_rows=ROWS))


@pytest.fixture(scope="module")
def sessions(ane_bundle, ios_tiny_bundle):
    return open_bundle(ane_bundle), open_bundle(ios_tiny_bundle)


def test_no_tensor_dimension_over_the_limit(sessions):
    split, whole = sessions
    facts = structure(split.interp, "lut6", max_dim=ROWS)
    assert facts["max_tensor_dim"] == 2731 and len(facts["lut_weights"]) == 3
    with pytest.raises(ExportError, match=r"tensor dimension 8192 > 3000"):
        structure(whole.interp, "lut6", max_dim=ROWS)


def test_manifest_and_readme(ane_bundle):
    ml = json.loads((ane_bundle / "manifest.json").read_text())["coreml"]
    for fn in ("prefill", "decode"):
        assert ml["functions"][fn]["outputs"]["logits"]["shape"] == [1, 3, 2731]
    assert ml["ane_head"]["pieces"] == 3 and ml["ane_head"]["rows_per_piece"] == 2731
    assert ml["compute_units"]["recommended"] == ".cpuAndNeuralEngine"
    assert ml["compute_units"]["max_tensor_dim"] == 2731
    assert "3 rows of 2731" in (ane_bundle / "README.md").read_text()


def test_same_weights_and_logits_as_the_unsplit_package(sessions, tiny):
    split, whole = sessions
    names = ["tok_embeddings.weight"]
    a = package_state_dict(split.interp, names)["tok_embeddings.weight"]
    b = package_state_dict(whole.interp, names)["tok_embeddings.weight"]
    assert a.shape == b.shape == (8192, 256) and bool((a == b).all())
    ids = tiny.tokenizer.encode("Lists are mutable sequences. " * 12)[:100]     # 2 prefill chunks
    split.reset(), whole.reset()
    out_split, out_whole = split.feed(ids), whole.feed(ids)
    worst = 0.0
    for step in range(4):
        assert out_split.shape == (1, 3, 2731) and out_whole.shape == (1, 1, 8192)
        assert out_split[0, 2, -1] == np.float16(MASK_VALUE)                    # the padding row
        x, y = (flat_logits(o, 8192).astype(np.float32) for o in (out_split, out_whole))
        worst = max(worst, float(np.abs(x - y).max()))
        assert split.argmax(out_split) == whole.argmax(out_whole) == int(y.argmax())
        nxt = int(y.argmax())
        out_split, out_whole = split.step(nxt), whole.step(nxt)
    assert worst <= BOUND


def test_swift_loop_reads_the_pieces(sessions):
    split, whole = sessions
    messages = [{"role": "user", "content": "How do I sort a list of tuples by the second item?"}]
    split.reset(), whole.reset()
    reply = split.reply(messages, 8)
    assert reply == whole.reply(messages, 8) and len(reply) > 0
