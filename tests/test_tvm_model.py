"""The TVM model definition (targets/tvm/model.py) against the PyTorch reference (exporter/model.py).

Host (x86_64 LLVM) builds of the plain pipeline (no fused int4 kernels: those have their own tests) with a
float32 KV cache, so the two definitions must agree to fp32 rounding: logits within LOGIT_ATOL (logits
are O(10)) and identical greedy tokens, with chunked prefill through TVM's paged KV cache. The float16
cache (model.KV_DTYPE, what kernel builds ship) rounds k/v/q to fp16: within LOGIT_ATOL_KV16.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.checkpoint import open_checkpoint
from exporter.config import MiniCPMConfig
from exporter.errors import ExportError
from exporter.model import MiniCPM
from exporter.quant import quantize_state_dict
from exporter.recipes import EMBEDDED_DIR
from exporter.tokenizer import Tokenizer
from targets.tvm import pipeline
from targets.tvm.params import read_tensor_cache, tvm_params, write_tensor_cache
from targets.tvm.runner import TVMModel
from targets.tvm.target import VERIFY_PROMPT

ROOT = Path(__file__).resolve().parent.parent
TINY = EMBEDDED_DIR / "tinycpm-docs"
LOGIT_ATOL = 1e-3
LOGIT_ATOL_KV16 = 2e-2     # measured 5.8e-3 on tiny (fp32 weights, 24 tokens)
CONTEXT, CHUNK = 512, 64


@pytest.fixture(scope="module")
def tiny():
    ck = open_checkpoint(TINY)
    cfg = MiniCPMConfig.from_hf(ck.raw_config)
    tok = Tokenizer(ck.tokenizer_path)
    return cfg, ck.text_tensors(cfg), tok.encode(VERIFY_PROMPT)


def _build(cfg, scheme, source, kv_dtype="float32"):
    target = pipeline.make_target("cpu", pipeline.HOST_TARGET)
    mod, specs = pipeline.export_ir(cfg, scheme, target, {"test": True}, kv_dtype=kv_dtype)
    ex = pipeline.compile_ir(mod, target, use_kernels=False)
    return mod, TVMModel(ex, [a for _, a in tvm_params(specs, source)], CONTEXT, CHUNK), specs


@pytest.fixture(scope="module", params=[None, "q4f16_e8", "q4f16"], ids=["fp32", "q4f16_e8", "q4f16"])
def built(request, tiny):
    cfg, state, _ = tiny
    if request.param is None:
        source, ref_state = state, state
    else:
        qm = quantize_state_dict(state, request.param, search=False)
        source, ref_state = qm, qm.dequantized()
    mod, model, specs = _build(cfg, request.param, source)
    return request.param, mod, model, MiniCPM.from_state_dict(cfg, ref_state), specs, source


def test_greedy_tokens_and_logits_match_reference(built, tiny):
    scheme, _, model, ref, _, _ = built
    prompt = tiny[2]
    assert len(prompt) > CHUNK            # two prefill chunks through the paged KV cache
    n = {None: 24, "q4f16_e8": 32, "q4f16": 16}[scheme]   # 64-token greedy: tests/test_tvm_export.py
    got = model.generate(prompt, n)
    with torch.no_grad():
        want, ref_logits = ref.generate(prompt, n, prefill_chunk=CHUNK)
    assert got.tokens == want
    diff = max(float(np.abs(a - b.numpy()).max()) for a, b in zip(got.logits, ref_logits))
    assert diff < LOGIT_ATOL, f"{scheme}: max |logit diff| {diff}"
    # a second generation reuses the one KV cache, cleared (runner.TVMModel.new_cache): the same numbers
    kv = model.kv
    again = model.generate(prompt, n)
    assert model.kv.same_as(kv) and again.tokens == got.tokens
    assert all(np.array_equal(a, b) for a, b in zip(again.logits, got.logits))


def test_float16_kv_cache_matches_reference(tiny):
    """The shipped KV dtype (float16): same greedy tokens, logits within LOGIT_ATOL_KV16."""
    cfg, state, prompt = tiny
    _, model, _ = _build(cfg, None, state, kv_dtype="float16")
    got = model.generate(prompt, 24)
    with torch.no_grad():
        want, ref_logits = MiniCPM.from_state_dict(cfg, state).generate(prompt, 24, prefill_chunk=CHUNK)
    assert got.tokens == want
    diff = max(float(np.abs(a - b.numpy()).max()) for a, b in zip(got.logits, ref_logits))
    assert diff < LOGIT_ATOL_KV16, diff


def test_prefill_chunking_does_not_change_logits(built, tiny):
    _, _, model, ref, _, _ = built
    prompt = tiny[2]
    whole = model.forward_chunks(model.new_cache(), model.embed(prompt))          # chunks of 64
    model.prefill_chunk = 17
    try:
        small = model.forward_chunks(model.new_cache(), model.embed(prompt))      # chunks of 17
    finally:
        model.prefill_chunk = CHUNK
    with torch.no_grad():
        want = ref(torch.tensor([prompt]), last_only=True)[0, -1].numpy()
    np.testing.assert_allclose(small, whole, atol=LOGIT_ATOL)
    np.testing.assert_allclose(whole, want, atol=LOGIT_ATOL)


def test_module_has_documented_functions_and_dequantize_pattern(built):
    scheme, mod, *_ = built
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert {"embed", "prefill", "decode", "create_tir_paged_kv_cache", "_metadata"} <= names
    if scheme == "q4f16_e8":
        text = mod["decode"].script()
        # the pattern kernels.py matches: call_tir(dequantize, (q_weight, q_scale)) -> permute_dims -> matmul
        assert "R.call_tir(dequantize," in text and "R.permute_dims" in text and "R.matmul" in text
        assert "dequantize" in names and "dequantize_q8" in names


def test_tensor_cache_roundtrip_with_tvms_reader(built, tmp_path):
    from tvm.contrib.tvmjs import load_tensor_cache

    _, _, _, _, specs, source = built
    named = tvm_params(specs, source)
    write_tensor_cache(named, tmp_path)
    loaded, _ = load_tensor_cache(str(tmp_path), __import__("tvm").cpu())
    assert list(loaded) == [n for n, _ in named]
    for (name, arr), (name2, arr2) in zip(named, read_tensor_cache(tmp_path)):
        assert name == name2
        np.testing.assert_array_equal(loaded[name].numpy(), arr)
        np.testing.assert_array_equal(arr2, arr)


def test_params_reject_wrong_shape(tiny):
    cfg, state, _ = tiny
    target = pipeline.make_target("cpu", pipeline.HOST_TARGET)
    _, specs = pipeline.export_ir(cfg, None, target)
    bad = dict(state)
    bad["layers.3.feed_forward.w2.weight"] = bad["layers.3.feed_forward.w2.weight"][:, :320]
    with pytest.raises(ExportError, match="layers.3.feed_forward.w2.weight"):
        tvm_params(specs, bad)


def test_host_tensors_copy_exactly_into_huge_pages():
    """runner.host_tensors (the host weights, one arena): every array's values, dtype and shape kept, 64-byte
    aligned; where Linux offers transparent huge pages (madvise or always), the arena's mapping holds 2 MiB
    pages (/proc/self/smaps AnonHugePages)."""
    import re

    from targets.tvm.runner import HUGE_PAGE, host_tensors

    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((1024, 2048)).astype(np.float16), np.arange(7, dtype=np.int8),
              rng.integers(0, 2 ** 32, (2048, 1024), dtype=np.uint32), rng.standard_normal(5).astype(np.float32)]
    tensors = host_tensors(arrays)
    for a, t in zip(arrays, tensors):
        assert tuple(t.shape) == a.shape and str(t.dtype) == str(a.dtype) and t.data_ptr() % 64 == 0
        np.testing.assert_array_equal(t.numpy(), a)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this machine")
    start = tensors[0].data_ptr()
    for m in re.finditer(r"^([0-9a-f]+)-([0-9a-f]+) .*?\nAnonHugePages:\s+(\d+) kB", Path("/proc/self/smaps").read_text(),
                         re.M | re.S):
        if int(m[1], 16) <= start < int(m[2], 16):
            assert int(m[3]) * 1024 >= 2 * HUGE_PAGE, m[0].splitlines()[0]
            return
    pytest.fail(f"no mapping holds {start:#x}")
