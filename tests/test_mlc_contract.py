"""The android bundle against MLC-LLM's model-library contract (no phone, no MLC build: the installed TVM
runtime replays what MLC's engine does, cpp/serve/{function_table,model,logit_processor}.cc):

- ``_metadata`` parsed with the keys and types ModelMetadata::FromJSON requires;
- the engine's call sequence on the host library: tensor_cache.load(<bundle root>) + params by name,
  alloc_embedding_tensor -> embed (2-D) copied into the workspace -> prefill tuple -> batch_prefill with two
  sequences of different lengths -> batch_decode for both -> softmax_with_temperature and the in-place
  logit functions; greedy tokens equal the PyTorch reference for both sequences;
- mlc-chat-config.json / mlc-package-config.json against MLC's schema rules;
- the static link: the aarch64 model.tar objects linked --whole-archive into the runner (as mlc4j links
  libmodel_android.a), cpu and opencl together, run under qemu through SystemLib(prefix) only.
"""
from __future__ import annotations

import json
import subprocess
import tarfile

import numpy as np
import pytest
import torch
import tvm

from exporter.chat import get_chat_template
from exporter.model import MiniCPM
from exporter.tokenizer import Tokenizer
from targets.tvm import mlc, pipeline
from targets.tvm.target import LOGIT_ATOL_KERNELS, build_bundle
from tests.test_tvm_export import tiny_request

S = tvm.runtime.ShapeTuple
G = tvm.get_global_func
KDLCPU, POOLED = 1, 2
GEN = 12
PROMPTS = ["def fibonacci(n):", "Python is an easy to learn, powerful programming language. It has efficient"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """tiny for android with the cpu and opencl libraries (both linked in the static-link test), and a
    host library of the plain pipeline (no int8-activation int4 kernels: exact to fp32 rounding)."""
    out = tmp_path_factory.mktemp("mlc-bundle")
    req = tiny_request("android", backend="all")
    keys = build_bundle(req, out)
    ref = MiniCPM.from_state_dict(req.config, req.weights.dequantized())
    host = pipeline.make_target("cpu", pipeline.HOST_TARGET)
    mod, _ = pipeline.export_ir(req.config, req.recipe.quantization, host, {}, 512, 64, kv_dtype="float32")
    pipeline.compile_ir(mod, host, use_kernels=False).export_library(str(out.parent / "plain.so"))
    return out, keys, ref


def _mlc_load(bundle, lib=None):
    """FunctionTable::Init + LoadParams for a library file: vm_load_executable, vm_initialization,
    ModelMetadata::FromModule, tensor_cache.load(model folder), param_array_from_cache_by_name."""
    exe = tvm.runtime.load_module(str(lib or bundle / "lib" / "host" / "model.so"))
    vm = exe["vm_load_executable"]()
    vm["vm_initialization"](KDLCPU, 0, POOLED, KDLCPU, 0, POOLED)
    meta = json.loads(vm["_metadata"]())
    G("vm.builtin.tensor_cache.load")(str(bundle), KDLCPU, 0)
    params = G("vm.builtin.param_array_from_cache_by_name")([p["name"] for p in meta["params"]])
    G("vm.builtin.tensor_cache.clear")()
    return vm, meta, params


def test_metadata_has_mlcs_required_keys_and_types(bundle):
    vm, meta, params = _mlc_load(bundle[0])
    for key in ("model_type", "quantization"):
        assert isinstance(meta[key], str)
    for key in ("context_window_size", "prefill_chunk_size", "max_batch_size", "tensor_parallel_shards",
                "sliding_window_size", "attention_sink_size", "pipeline_parallel_stages"):
        assert type(meta[key]) is int, key
    assert meta["tensor_parallel_shards"] == 1 and meta["pipeline_parallel_stages"] == 1   # FunctionTable checks
    assert meta["sliding_window_size"] == -1 and meta["kv_state_kind"] == "kv_cache"
    assert (meta["context_window_size"], meta["prefill_chunk_size"]) == (512, 64)
    assert {k: type(v) for k, v in meta["kv_cache"].items()} == {
        "num_hidden_layers": int, "num_attention_heads": int, "num_key_value_heads": int, "head_dim": int}
    assert meta["memory_usage"] and all(type(v) is int and v > 0 for v in meta["memory_usage"].values())
    assert len(params) == len(meta["params"]) > 0
    for p, arr in zip(meta["params"], params):     # every param found by name in the bundle root's cache
        assert isinstance(p["name"], str) and p["preprocs"] == [] and p["pipeline_stages"] == [0]
        assert list(arr.shape) == p["shape"] and str(arr.dtype) == p["dtype"], p["name"]
    for name in (*mlc.KERNEL_FUNCTIONS, *mlc.MLC_FUNCTIONS):
        assert vm[name] is not None


@pytest.mark.parametrize("lib", ["plain", "bundle"])
def test_engine_call_sequence_two_sequences_equal_the_reference(bundle, lib):
    """Greedy tokens of both sequences equal the reference's (plain build: exactly; the bundle's build with
    the int8-activation kernels: logits within LOGIT_ATOL_KERNELS of the reference's on the same context,
    and each token the reference's argmax unless the reference's top two are closer than twice that)."""
    path, _, ref = bundle
    vm, meta, params = _mlc_load(path, path.parent / "plain.so" if lib == "plain" else None)
    tok = Tokenizer(path / "tokenizer.model")
    prompts = [tok.encode(p) for p in PROMPTS]
    assert len(prompts[0]) != len(prompts[1]) and sum(map(len, prompts)) <= meta["prefill_chunk_size"]
    kv = vm["create_tir_paged_kv_cache"](S([mlc.MAX_BATCH_SIZE]), S([meta["context_window_size"]]),
                                         S([meta["prefill_chunk_size"]]), S([16]), S([0]))
    for seq in (0, 1):
        G("vm.builtin.kv_state_add_sequence")(kv, seq)
    begin, end = G("vm.builtin.kv_state_begin_forward"), G("vm.builtin.kv_state_end_forward")
    ws = vm["alloc_embedding_tensor"]()
    hidden = meta["kv_cache"]["num_attention_heads"] * meta["kv_cache"]["head_dim"]
    assert tuple(ws.shape) == (meta["prefill_chunk_size"], hidden) and ws.dtype == "float32"

    def embed(ids, offset):
        """Model::TokenEmbed: embed -> [n, hidden], copied into the workspace at ``offset`` rows."""
        e = vm["embed"](tvm.runtime.tensor(np.asarray(ids, "int32")), params)
        assert tuple(e.shape) == (len(ids), hidden)
        ws._create_view((len(ids), hidden), "float32", offset * hidden * 4).copyfrom(e)
        return ws

    # sequence 0, first 3 tokens: the single-sequence `prefill` (BatchPrefill with one sequence)
    a, b = prompts
    begin(kv, S([0]), S([3]))
    out = vm["prefill"](embed(a[:3], 0)._create_view((1, 3, hidden), "float32"), kv, params)
    end(kv)
    assert len(out) == 2 and tuple(out[0].shape) == (1, 1, meta["mcpm"]["vocab_size"])
    # the rest of sequence 0 and all of sequence 1 in one batch_prefill
    rest = a[3:]
    embed(rest, 0)
    embed(b, len(rest))
    total = len(rest) + len(b)
    begin(kv, S([0, 1]), S([len(rest), len(b)]))
    logits, _ = vm["batch_prefill"](ws._create_view((1, total, hidden), "float32"),
                                    tvm.runtime.tensor(np.array([len(rest) - 1, total - 1], "int32")), kv, params)
    end(kv)
    assert tuple(logits.shape) == (1, 2, meta["mcpm"]["vocab_size"])
    steps = [logits.numpy()[0]]
    for _ in range(GEN - 1):
        nxt = steps[-1].argmax(-1).astype("int32")
        emb = vm["embed"](tvm.runtime.tensor(nxt), params)              # [2, hidden]
        begin(kv, S([0, 1]), S([1, 1]))
        logits, _ = vm["batch_decode"](emb._create_view((2, 1, hidden), "float32"), kv, params)
        end(kv)
        steps.append(logits.numpy()[:, 0])
    got = np.stack(steps, 1).argmax(-1)                                  # [2, GEN]
    with torch.no_grad():
        for seq, prompt in enumerate(prompts):
            if lib == "plain":
                want, _ = ref.generate(prompt, GEN)
                assert got[seq].tolist() == want, seq
                continue
            ctx = torch.tensor([prompt + got[seq].tolist()[:-1]])
            want = ref(ctx)[0, len(prompt) - 1:].numpy()                # reference logits on our context
            ours = np.stack(steps, 1)[seq]
            assert np.abs(ours - want).max() <= LOGIT_ATOL_KERNELS, seq
            top2 = np.sort(want, -1)[:, -2:]
            clear = top2[:, 1] - top2[:, 0] > 2 * LOGIT_ATOL_KERNELS
            assert (got[seq][clear] == want.argmax(-1)[clear]).all() and clear.sum() >= 3, seq

    # sampling helpers on the last logits: softmax_with_temperature (0 = greedy) and the in-place ones
    last = logits.numpy()                                                # [2, 1, vocab]
    probs = vm["softmax_with_temperature"](logits, tvm.runtime.tensor(np.array([0.0, 0.7], "float32"))).numpy()
    assert probs[0, 0].argmax() == last[0, 0].argmax() and probs[0, 0].max() == 1.0
    x = last[1, 0] / 0.7
    np.testing.assert_allclose(probs[1, 0], np.exp(x - x.max()) / np.exp(x - x.max()).sum(), rtol=1e-4, atol=1e-7)
    flat = tvm.runtime.tensor(last[:, 0].copy())
    i32 = lambda *v: tvm.runtime.tensor(np.array(v, "int32"))  # noqa: E731
    want = last[:, 0].copy()
    vm["apply_logit_bias_inplace"](flat, i32(1, 0), i32(5, 7), tvm.runtime.tensor(np.array([2.0, -3.0], "float32")))
    want[1, 5] += 2.0
    want[0, 7] -= 3.0
    vm["apply_penalty_inplace"](flat, i32(1), i32(0), i32(9), i32(3), tvm.runtime.tensor(np.array([[0.5, 0.25, 1.5]],
                                                                                               "float32")))
    v = want[1, 9] - 0.5 - 3 * 0.25
    want[1, 9] = v * 1.5 if v < 0 else v / 1.5
    mask = np.zeros((2, (want.shape[1] + 31) // 32), "int32")
    mask[0, 0] = 0b1011                                                   # sequence 0 may only emit 0, 1, 3
    mask[1] = -1
    vm["apply_bitmask_inplace"](flat, i32(0, 1), tvm.runtime.tensor(mask))
    want[0, [i for i in range(want.shape[1]) if i not in (0, 1, 3)]] = np.finfo("float32").min
    np.testing.assert_allclose(flat.numpy(), want, rtol=1e-6)


def test_mlc_chat_config_follows_mlcs_schema(bundle):
    path, keys, _ = bundle
    conf = json.loads((path / "mlc-chat-config.json").read_text())
    assert conf["version"] == "0.1.0" and conf["model_type"] == "minicpm"
    assert isinstance(conf["model_lib"], str) and conf["model_lib"] == "mcpm_tiny_opencl"   # Gson: a string
    assert conf["model_lib"] + "_" == conf["mcpm"]["libs"]["opencl"]["prefix"]
    for key in ("vocab_size", "context_window_size", "sliding_window_size", "prefill_chunk_size",
                "attention_sink_size", "tensor_parallel_shards"):
        assert type(conf[key]) is int, key
    assert conf["model_config"]["prefill_chunk_size"] == 64 and conf["model_config"]["context_window_size"] == 512
    conv = conf["conv_template"]        # json_ffi Conversation::FromJSON's required keys and types
    for key in ("system_template", "system_message", "role_content_sep", "role_empty_sep"):
        assert isinstance(conv[key], str), key
    assert isinstance(conv["add_role_after_system_message"], bool) and conv["messages"] == []
    assert set(conv["roles"]) == {"user", "assistant"} and all(isinstance(r, str) for r in conv["roles"].values())
    assert 1 <= len(conv["seps"]) <= 2 and conv["stop_token_ids"] == [2] and conv["system_prefix_token_ids"] == [1]
    assert conv == get_chat_template("plain").mlc_conversation(1)
    assert "tokenizer.json" in conf["tokenizer_files"] and (path / "tokenizer.json").is_file()
    assert (path / "tensor-cache.json").is_file() and not (path / "params").exists()    # MLC's flat folder
    tc = json.loads((path / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == get_chat_template("plain").jinja()
    pkg = json.loads((path / "mlc-package-config.json").read_text())
    entry = pkg["model_list"][0]
    assert entry == keys["mlc"]["package_entry"] and entry["model_lib"] == conf["model_lib"]
    assert entry["model_id"] == "tiny" and entry["bundle_weight"] is True
    assert pkg["model_lib_path_for_prepare_libs"] == {"mcpm_tiny_opencl": "lib/opencl/model.tar"}
    # the same turn through MLC's path (tokenizer.json without special tokens + system_prefix_token_ids) and
    # through the HF chat_template gives the ids the PyTorch reference gets (SentencePiece + BOS)
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
    for turn in PROMPTS:
        want = Tokenizer(path / "tokenizer.model").encode(get_chat_template("plain").format_turns([("user", turn)]))
        text = ImmutableSandboxedEnvironment().from_string(tc["chat_template"]).render(
            messages=[{"role": "user", "content": turn}], add_generation_prompt=True)
        assert conv["system_prefix_token_ids"] + hf.encode(text, add_special_tokens=False).ids == want
        assert hf.encode(text).ids == want
    params = sum((path / s).stat().st_size for s in
                 [r["dataPath"] for r in json.loads((path / "tensor-cache.json").read_text())["records"]])
    assert params < entry["estimated_vram_bytes"] < params + 64 << 20


# ------------------------------------------------------------------ static link under qemu
def test_static_link_cpu_and_opencl_into_one_program(bundle, tmp_path):
    """Both model.tar archives' objects linked --whole-archive into the runner (no dlopen of a model
    library, no duplicate symbols); run under qemu with --system-lib (SystemLib(prefix) only), the cpu
    library gives what lib/cpu/model.so gives, within the kernels' bound of the PyTorch reference."""
    from runner import build
    from tests.test_runner import QEMU, run_json
    import shutil

    if not (shutil.which(QEMU) and shutil.which("aarch64-linux-gnu-g++")):
        pytest.skip("needs qemu-aarch64-static and g++-aarch64-linux-gnu")
    path, _, ref = bundle
    runner = tmp_path / "runner"
    shutil.copytree(build.build_runner(), runner)
    objs = []
    for backend in ("cpu", "opencl"):
        with tarfile.open(path / "lib" / backend / "model.tar") as tf:
            for m in tf.getmembers():
                if m.isfile():
                    dst = tmp_path / f"{backend}-{m.name}"
                    dst.write_bytes(tf.extractfile(m).read())
                    objs.append(str(dst))
    here = build.HERE
    cmd = ["aarch64-linux-gnu-g++", *build.CXXFLAGS, f"-I{build._ffi_include()}", *(str(here / n) for n in build.CXX_SOURCES),
           "-Wl,--whole-archive", *objs, "-Wl,--no-whole-archive",
           "-o", str(runner / "mcpm-run.bin"), f"-L{runner / 'lib'}", "-ltvm_runtime", "-ltvm_ffi", "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]     # no duplicate symbols between the two libraries
    prompt = Tokenizer(path / "tokenizer.model").encode(PROMPTS[0])
    ids = ["--prompt-ids", ",".join(map(str, prompt)), "--gen-len", GEN, "--threads", 1]
    static = run_json(runner, "--bundle", path, "--system-lib", *ids, "--logits-out", tmp_path / "static.bin")
    shared = run_json(build.build_runner(), "--bundle", path, *ids, "--logits-out", tmp_path / "shared.bin")
    assert static["tokens"] == shared["tokens"]          # the same code as lib/cpu/model.so, bit for bit
    assert (tmp_path / "static.bin").read_bytes() == (tmp_path / "shared.bin").read_bytes()
    logits = np.fromfile(tmp_path / "static.bin", "<f4").reshape(GEN, -1)
    with torch.no_grad():                                 # reference logits on the same context
        want = ref(torch.tensor([prompt + static["tokens"][:-1]]))[0, len(prompt) - 1:].numpy()
    assert np.abs(logits - want).max() <= LOGIT_ATOL_KERNELS
    assert static["tokens"][:7] == [int(t) for t in want.argmax(-1)[:7]]   # step 7 is a near tie (0.05)
