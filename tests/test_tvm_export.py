"""android / harmony bundles end to end: real TVM builds, aarch64 objects, host verification, `run`,
and every bad input giving one clear error with nothing half-written."""
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.bundle import Staging, check_files
from exporter.checkpoint import open_checkpoint
from exporter.config import MiniCPMConfig
from exporter.errors import ExportError
from exporter.model import MiniCPM
from exporter.progress import Progress
from exporter.quant import quantize_state_dict, unpack_int4, unpack_int8
from exporter.recipes import EMBEDDED_DIR, get_recipe
from exporter.tokenizer import Tokenizer
from targets.tvm.options import TVMOptions
from targets.tvm.params import read_tensor_cache
from targets.tvm.target import VERIFY_PROMPT, VERIFY_TOKENS, BuildRequest, TVMTarget, build_bundle
from tests.support.cli import cli, nothing_partial, one_error_line

ROOT = Path(__file__).resolve().parent.parent
TINY = EMBEDDED_DIR / "tinycpm-docs"
EM_AARCH64 = 183


def elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not a 64-bit ELF file"
    return int.from_bytes(data[18:20], "little")


def check_aarch64_libs(bundle: Path, backend: str, prefix: str) -> None:
    """model.so and every .tar member are AArch64 ELF; TVM's objects define only prefixed strong symbols
    (weak ones are compiler fp16 helpers); the microkernel object defines only weak mcpm_k<hash>_* names."""
    lib = bundle / "lib" / backend
    assert elf_machine((lib / "model.so").read_bytes()) == EM_AARCH64
    blob = f"{prefix}__tvm_ffi__library_bin"
    found_blob = False
    with tarfile.open(lib / "model.tar") as tf:
        members = [m for m in tf.getmembers() if m.isfile()]
        assert members
        for m in members:
            data = tf.extractfile(m).read()
            assert elf_machine(data) == EM_AARCH64, m.name
            obj = bundle / f"_check_{m.name}"
            obj.write_bytes(data)
            try:
                lines = subprocess.run(["aarch64-linux-gnu-nm", "--defined-only", "--extern-only", obj],
                                       capture_output=True, text=True, check=True).stdout.splitlines()
            finally:
                obj.unlink()
            strong = [ln.split()[-1] for ln in lines if ln.split()[-2] not in ("W", "V", "w", "v")]
            weak = [ln.split()[-1] for ln in lines if ln.split()[-2] in ("W", "w")]
            if not strong:      # the microkernel object: only weak, content-keyed names (kernels.kernel_prefix)
                assert weak and all(s.startswith("mcpm_k") for s in weak), (m.name, weak)
                continue
            found_blob |= blob in strong
            if any(prefix in s for s in strong):
                assert all(prefix in s for s in strong), (m.name, [s for s in strong if prefix not in s])
            else:
                assert all(s.startswith("mcpm_") for s in strong), (m.name, strong)
    assert found_blob, f"{blob} not defined in {lib / 'model.tar'}"


def tiny_request(platform, backend="cpu", reference=None):
    ck = open_checkpoint(TINY)
    cfg = MiniCPMConfig.from_hf(ck.raw_config)
    qm = quantize_state_dict(ck.text_tensors(cfg), "q4f16_e8", search=False)
    return BuildRequest(get_recipe("tiny"), cfg, qm, TINY, platform, backend=backend, soc="kirin9000",
                        reference=reference)


# ------------------------------------------------------------------ builds
def test_harmony_cpu_bundle(tmp_path):
    """build_bundle for HarmonyOS (aarch64-linux-ohos): aarch64 libs, tensor cache, config, verification."""
    req = tiny_request("harmony")
    keys = build_bundle(req, tmp_path)
    assert keys["triple"] == "aarch64-linux-ohos" and keys["backends"] == ["cpu"]
    c = req.config          # float16 KV cache (int4 kernels): K and V, every layer, the whole context
    assert keys["kv_cache"] == {"dtype": "float16", "context_window": 512, "bytes_at_context":
                                2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 512 * 2}
    assert keys["soc"]["mcpu"] == "cortex-a77"
    check_aarch64_libs(tmp_path, "cpu", "mcpm_tiny_")
    v = keys["verification"]
    assert v["tokens_equal"] and v["new_tokens"] == VERIFY_TOKENS and v["max_abs_logit_diff"] <= v["logit_atol"]
    conf = json.loads((tmp_path / "mlc-chat-config.json").read_text())
    assert conf["context_window_size"] == 512 and conf["prefill_chunk_size"] == 64
    assert conf["model_lib"] == "mcpm_tiny" and conf["mcpm"]["libs"]["cpu"]["prefix"] == "mcpm_tiny_"
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert name in conf["tokenizer_files"] and (tmp_path / name).is_file()
    names = [n for n, _ in read_tensor_cache(tmp_path)]
    assert names[0] == "tok_embeddings.q_weight" and "layers.7.feed_forward.w13.q_scale" in names
    assert not (tmp_path / "lib" / "opencl").exists()


@pytest.mark.slow
def test_android_export_all_backends_and_run(tmp_path):
    """`mcpm-export android --backend all` then `mcpm-export run --json` on the bundle's host build."""
    out = tmp_path / "bundle"
    r = cli("android", "--model", "tiny", "--backend", "all", "--soc", "sd8gen2", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert check_files(out, manifest) == []
    assert manifest["target"] == "android" and manifest["triple"] == "aarch64-linux-android"
    assert manifest["backends"] == ["cpu", "opencl"] and manifest["opencl"]["executed"] is False
    assert manifest["verification"]["tokens_equal"]
    assert {"ppl_fp", "ppl_int4", "loss_pct"} <= set(manifest["quality"])
    for backend, prefix in (("cpu", "mcpm_tiny_"), ("opencl", "mcpm_tiny_opencl_")):
        check_aarch64_libs(out, backend, prefix)
    src = (out / "lib" / "opencl" / "kernels.cl").read_text()
    assert "__kernel void" in src and "mcpm_tiny_" in src
    assert "clang" in manifest["libs"]["opencl"]["compile_checked_with"]
    assert elf_machine((out / "lib" / "host" / "model.so").read_bytes()) == 62    # EM_X86_64

    r = cli("run", out, "--prompt", VERIFY_PROMPT, "--max-new-tokens", VERIFY_TOKENS, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert {"tokens", "text", "prefill_tok_s", "decode_tok_s"} <= set(res)
    # the host build of the bundle reproduces the PyTorch int4 reference run on the bundle's own weights
    ck = open_checkpoint(TINY)
    cfg = MiniCPMConfig.from_hf(ck.raw_config)
    ref = MiniCPM.from_state_dict(cfg, bundle_state(dict(read_tensor_cache(out)), cfg))
    prompt = Tokenizer(out / "tokenizer.model").encode(VERIFY_PROMPT)
    assert res["prompt_tokens"] == len(prompt)
    want, _ = ref.generate(prompt, VERIFY_TOKENS, prefill_chunk=64)
    assert res["tokens"] == want
    assert res["text"] == Tokenizer(out / "tokenizer.model").decode(want)
    assert res["prefill_tok_s"] > 0 and res["decode_tok_s"] > 0


def bundle_state(t: dict, cfg) -> dict:
    """Canonical float32 state dict from a bundle's tensor cache (unfusing wqkv / w13)."""
    def deq(stem):
        if stem + ".weight" in t:
            return t[stem + ".weight"].astype("float32")
        qw, sc = t[stem + ".q_weight"], t[stem + ".q_scale"]
        return unpack_int4(qw, sc) if qw.dtype == "uint32" else unpack_int8(qw, sc)

    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out = {"tok_embeddings.weight": deq("tok_embeddings"), "norm.weight": deq("norm")}
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        qkv, w13 = deq(p + "attention.wqkv"), deq(p + "feed_forward.w13")
        out.update({p + "attention_norm.weight": deq(p + "attention_norm"), p + "ffn_norm.weight": deq(p + "ffn_norm"),
                    p + "attention.wq.weight": qkv[:q], p + "attention.wk.weight": qkv[q:q + kv],
                    p + "attention.wv.weight": qkv[q + kv:], p + "attention.wo.weight": deq(p + "attention.wo"),
                    p + "feed_forward.w1.weight": w13[:cfg.intermediate_size],
                    p + "feed_forward.w3.weight": w13[cfg.intermediate_size:],
                    p + "feed_forward.w2.weight": deq(p + "feed_forward.w2")})
    return {k: torch.from_numpy(v.copy()) for k, v in out.items()}


@pytest.mark.slow
def test_failed_verification_leaves_no_bundle(tmp_path):
    """A reference that disagrees (the fp model vs the int4 bundle) must fail the export, nothing left."""
    ck = open_checkpoint(TINY)
    cfg = MiniCPMConfig.from_hf(ck.raw_config)
    fp_model = MiniCPM.from_state_dict(cfg, ck.text_tensors(cfg))
    req = tiny_request("android", reference=fp_model)
    out = tmp_path / "bundle"

    class Ctx:
        recipe, config, quantized, quant_reference = req.recipe, req.config, req.weights, fp_model
        tokenizer_path, progress = TINY / "tokenizer.model", Progress(quiet=True)
        plan = TVMTarget("android").plan(req.recipe, TVMOptions())
        checkpoint = ck

    with pytest.raises(ExportError, match="verification failed"):
        with Staging(out) as st:
            TVMTarget("android").build(Ctx, st.dir)
            st.finalize({})
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_opencl_check_catches_bad_source(tmp_path):
    from targets.tvm.pipeline import check_opencl_source

    good = tmp_path / "good.cl"
    good.write_text("__kernel void k(__global float* x) { x[get_global_id(0)] = 1.0f; }\n")
    assert "clang" in check_opencl_source(good)
    bad = tmp_path / "bad.cl"
    bad.write_text("__kernel void k(__global float* x) { x[0] = undefined_thing; }\n")
    with pytest.raises(ExportError, match="bad.cl: OpenCL C does not compile"):
        check_opencl_source(bad)


# ------------------------------------------------------------------ bad input
def test_unknown_recipe(tmp_path):
    one_error_line(cli("android", "--model", "no-such-model", "--out", tmp_path / "b"), "unknown recipe",
                   "no-such-model")
    assert not (tmp_path / "b").exists()


def test_checkpoint_shape_disagrees_with_config(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    for f in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(TINY / f, ck / f)
    state = {}
    for shard in sorted(TINY.glob("*.safetensors")):
        state.update(load_file(shard))
    key = "model.layers.2.mlp.down_proj.weight"
    state[key] = state[key][:, :320].contiguous()
    save_file(state, ck / "model.safetensors")
    r = cli("harmony", "--model", "tiny", "--checkpoint", ck, "--out", tmp_path / "b")
    one_error_line(r, "layers.2.feed_forward.w2.weight", "(256, 320)", "(256, 640)")
    assert not (tmp_path / "b").exists()
    nothing_partial(tmp_path)


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    one_error_line(cli("android", "--out", blocker / "bundle"), "--out", "cannot write")
    assert blocker.read_text() == "not a directory"


def test_nonempty_out_without_force(tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_error_line(cli("android", "--out", out), "not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    nothing_partial(tmp_path)


def test_unknown_soc_and_backend(tmp_path):
    for args in (["--soc", "snapdragon9000"], ["--backend", "vulkan"]):
        r = cli("android", *args, "--out", tmp_path / "b")
        assert r.returncode == 2 and "Invalid value" in r.stderr
    assert not (tmp_path / "b").exists()


def test_run_rejects_non_bundle_and_bad_length(tmp_path):
    one_error_line(cli("run", tmp_path, "--prompt", "hi"), "not a bundle")
    one_error_line(cli("run", tmp_path, "--prompt", "hi", "--max-new-tokens", "0"), "--max-new-tokens")


@pytest.mark.slow
def test_model_libraries_are_reproducible(tmp_path):
    """Same inputs, two builds: byte-identical .tar and .so (no timestamps or build ids)."""
    from targets.tvm import pipeline
    from targets.tvm.presets import get_preset

    cfg = MiniCPMConfig.from_hf(open_checkpoint(TINY).raw_config)
    target = pipeline.make_target("cpu", get_preset("armv8.2").llvm_target(pipeline.TRIPLES["android"]))
    blobs = []
    for i in range(2):
        mod, _ = pipeline.export_ir(cfg, "q4f16_e8", target)
        ex = pipeline.compile_ir(mod, target, prefix="mcpm_tiny_")
        pipeline.save_tar(ex, tmp_path / f"{i}.tar")
        pipeline.save_so(ex, tmp_path / f"{i}.so", pipeline.TRIPLES["android"])
        blobs.append(((tmp_path / f"{i}.tar").read_bytes(), (tmp_path / f"{i}.so").read_bytes()))
    assert blobs[0] == blobs[1]
