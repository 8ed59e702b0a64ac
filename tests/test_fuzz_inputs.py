"""Fuzz-style (issue 12): a few hundred randomly corrupted safetensors headers and bundle manifests,
seeded. Whatever the corruption, the user gets ExportError (checkpoints) or a list of problem lines
(verify): no other exception ever escapes."""
import copy
import json
import math
import random
import shutil
import struct
import traceback

import pytest
import torch
from safetensors.torch import save as st_save

from exporter.bundle import MANIFEST, manifest_text
from exporter.checkpoint import open_checkpoint
from exporter.errors import ExportError
from exporter.recipes import EMBEDDED_DIR
from exporter.verify import verify_bundle
from tests.support.release_bundles import assemble_bundle, compile_libs

TINY = EMBEDDED_DIR / "tinycpm-docs"
CASES = 300
ODD_VALUES = [None, True, False, -1, 0, 7, 2**63, -2**70, 1e308, math.inf, math.nan, 0.5, "", "x", "F32", "BF16",
              "../../etc/passwd", "/etc/passwd", "lib/cpu/model.tar", "a" * 300, [], {}, [1, "a"], [[[]]],
              [0, 2**64], [-4, 4], {"a": 1}, {"sha256": "0" * 64, "size": -1}, {"tar": "/"}, "\u0000\ud7ff"]


def odd(rng: random.Random):
    return copy.deepcopy(rng.choice(ODD_VALUES))


def mutate_json(doc, rng: random.Random):
    """Replace, delete or add one node anywhere in a JSON document (in place when possible)."""
    if not isinstance(doc, (dict, list)) or not doc or rng.random() < 0.05:
        return odd(rng)
    key = rng.choice(list(doc)) if isinstance(doc, dict) else rng.randrange(len(doc))
    r = rng.random()
    if r < 0.45 and isinstance(doc[key], (dict, list)) and doc[key]:
        doc[key] = mutate_json(doc[key], rng)
    elif r < 0.75:
        doc[key] = odd(rng)
    elif r < 0.9:
        del doc[key]
    elif isinstance(doc, dict):
        doc[rng.choice(["__metadata__", "extra", "dtype", "files", "libs"])] = odd(rng)
    return doc


def corrupt_bytes(data: bytes, lo: int, hi: int, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        b[rng.randrange(lo, hi)] = rng.randrange(256)
    return bytes(b)


# ------------------------------------------------------------------ safetensors headers
def shard_bytes() -> bytes:
    g = torch.Generator().manual_seed(0)
    return st_save({"model.embed_tokens.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
                    "model.norm.weight": torch.ones(8),
                    "model.layers.0.mlp.up_proj.weight": torch.randn(4, 8, generator=g)}, {"format": "pt"})


def corrupt_shard(data: bytes, rng: random.Random) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    kind = rng.randrange(5)
    if kind == 0:                                       # bytes of the header text
        return corrupt_bytes(data, 8, 8 + n, rng)
    if kind == 1:                                       # the length prefix
        return struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, n + 64, 2**63, 2**64 - 1])) + data[8:]
    if kind == 2:                                       # cut anywhere
        return data[:rng.randrange(len(data))]
    text = json.dumps(mutate_json(header, rng), allow_nan=True).encode()
    if kind == 3:                                       # a structurally odd header, body kept
        return struct.pack("<Q", len(text)) + text + body
    text += b" " * rng.randrange(8)                     # and the same with the tensor bytes scrambled
    return struct.pack("<Q", len(text)) + text + corrupt_bytes(body, 0, len(body), rng)


def test_corrupted_safetensors_headers_give_export_errors(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(TINY / name, ck / name)
    clean, rng, escaped, refused = shard_bytes(), random.Random(12), [], 0
    for case in range(CASES):
        data = corrupt_shard(clean, rng)
        (ck / "model.safetensors").write_bytes(data)
        try:
            for _ in open_checkpoint(ck).hf_items():
                pass
        except ExportError as e:
            assert "\n" not in str(e)
            refused += 1
        except BaseException as e:  # noqa: BLE001  (safetensors' Rust panics are BaseExceptions)
            escaped.append(f"case {case}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
    assert not escaped, "\n".join(escaped[:5])
    assert refused > CASES * 0.8          # the corruptions really are caught (a few are harmless)


# ------------------------------------------------------------------ bundle manifests
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    compile_libs(root / "libs" / "tiny", "mcpm_tiny_")
    return assemble_bundle(root / "mcpm-tiny-android-q4f16_e8-v0.1.0", root / "libs")


def test_corrupted_manifests_give_problem_lines(bundle):
    clean = json.loads((bundle / MANIFEST).read_text())
    conf = (bundle / "mlc-chat-config.json").read_text()
    assert verify_bundle(bundle) == []
    rng, escaped, flagged = random.Random(12), [], 0
    for case in range(CASES):
        m = json.loads(json.dumps(clean))
        for _ in range(rng.randint(1, 3)):
            m = mutate_json(m, rng)
        r = rng.random()
        if r < 0.5 and isinstance(m, dict):        # re-stamped: the checks after the digest run too
            try:
                text = manifest_text(m)
            except ExportError:
                text = json.dumps(m)
        else:
            text = json.dumps(m, allow_nan=True)
        if r > 0.9:
            text = corrupt_bytes(text.encode(), 0, len(text), rng).decode("latin-1")
        (bundle / MANIFEST).write_text(text)
        if rng.random() < 0.2:
            (bundle / "mlc-chat-config.json").write_text(json.dumps(mutate_json(json.loads(conf), rng)))
        try:
            problems = verify_bundle(bundle)
            assert isinstance(problems, list) and all(isinstance(p, str) and "\n" not in p for p in problems)
            flagged += bool(problems)
        except BaseException as e:  # noqa: BLE001
            escaped.append(f"case {case}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}\n{text[:400]}")
        finally:
            (bundle / "mlc-chat-config.json").write_text(conf)
    assert not escaped, "\n".join(escaped[:5])
    assert flagged > CASES * 0.9
