"""Host decode benchmark (issue 3): one MiniCPM-2B-shaped int4 model, one prompt, N threads, side by side.

    python3.11 bench/decode_host.py [--engines mcpm,llama.cpp,onnxruntime,torch] [--json]
                                    [--threads 2] [--prompt-tokens 64] [--new-tokens 32] [--checkpoint DIR]

Engines (all greedy, same prompt ids, same random-weight checkpoint from bench/make_2b_checkpoint.py):
  mcpm         this project's host build: targets/tvm/pipeline.py (paged KV cache) with the fused int4
               kernels of targets/tvm/kernels.py, q4f16 everywhere (tied head int4 too), mcpu = this CPU
  llama.cpp    llama-cpp-python, built from the PyPI sdist on first use (CPU, GGML_NATIVE) into
               $MCPM_EXPORT_CACHE/llama_cpp; GGUF via the sdist's convert_hf_to_gguf.py (bf16), then
               pure Q4_0 (token embedding/output also Q4_0: same bits per weight as q4f16)
  onnxruntime  bench/ort_minicpm.py: MatMulNBits int4 (accuracy_level 4), same q4f16 weights
  torch        exporter/model.py eager, fp32 weights (the q4f16 weights dequantized)
Roofline: read bandwidth measured with torch (sum over 2 GiB, same threads) divided by the bytes a
decoded token must read (int4 weights + scales + fp32 KV cache at mid generation).
Each engine runs in its own process (llama.cpp's OpenMP and torch's do not mix), one warm-up
generation, then the timed one. Prefill = prompt tokens / prefill time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from exporter.cache import cache_root  # noqa: E402

ENGINES = ("mcpm", "llama.cpp", "onnxruntime", "torch")
CACHE = cache_root()
LLAMA = CACHE / "llama_cpp"
LLAMA_VERSION = "0.3.36"
# The 2 cores are shared with other jobs: thread pools that busy-wait at barriers collapse when a
# worker is descheduled (llama.cpp 2 threads: 0.15 tok/s spinning vs 0.92 passive, measured), and
# TVM's pinning of workers to cores hurts the same way. Every engine is run without spinning/pinning.
PASSIVE_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TVM_BIND_THREADS": "0"}


def log(msg: str) -> None:
    print(f"[decode_host] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- model + roofline
def load_quantized(ckpt: Path):
    """(config, q4f16 QuantizedModel) of the checkpoint; the quantized arrays are cached next to it."""
    import numpy as np
    import torch

    from exporter.checkpoint import open_checkpoint
    from exporter.config import MiniCPMConfig
    from exporter.quant import SCHEMES, QTensor, QuantizedModel, quantize_state_dict

    cfg = MiniCPMConfig.from_hf(json.loads((ckpt / "config.json").read_text()))
    cache = ckpt.with_name(ckpt.name + ".q4f16.npz")
    if cache.exists():
        z = np.load(cache)
        qm = QuantizedModel(SCHEMES["q4f16"])
        for key in z.files:
            name, _, part = key.partition("|")
            if part == "data":
                qm.tensors[name] = QTensor(4, z[key], z[name + "|scale"])
            elif not part:
                qm.tensors[name] = z[key]
        return cfg, qm
    state = open_checkpoint(ckpt).text_tensors(cfg, dtype=torch.bfloat16)
    qm = quantize_state_dict(state, "q4f16", search=False)
    arrays = {}
    for name, v in qm.tensors.items():
        if isinstance(v, QTensor):
            arrays[name + "|data"], arrays[name + "|scale"] = v.data, v.scale
        else:
            arrays[name] = v
    tmp = cache.with_name(cache.name + ".partial.npz")
    np.savez(tmp, **arrays)
    tmp.rename(cache)
    return cfg, qm


def bandwidth_gb_s(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(1 << 29, dtype=torch.float32)          # 2 GiB, larger than any cache
    best = min(_timed(lambda: x.sum()) for _ in range(7))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bytes_per_token(cfg, qm, context: int) -> int:
    from exporter.quant import QTensor

    weights = sum(v.nbytes for v in qm.tensors.values() if isinstance(v, QTensor))
    if not cfg.tie_word_embeddings:       # the embedding table is only gathered, the head is read
        weights -= qm.tensors["tok_embeddings.weight"].nbytes
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4 * context
    return weights + kv


# ---------------------------------------------------------------- engines: each returns (prefill_s, decode_s, tokens)
def run_mcpm(cfg, qm, prompt, new, threads, tmp: Path):
    import tvm

    from targets.tvm import params, pipeline, runner

    # the host build's target with this machine's CPU (llama.cpp is built GGML_NATIVE too); the
    # bundle's portable x86-64-v3 host target would select the kernels' AVX2 path
    cpu = tvm.get_global_func("target.llvm_get_system_cpu")()
    target = pipeline.make_target("cpu", {**pipeline.HOST_TARGET, "mcpu": cpu})
    t0 = time.perf_counter()
    mod, specs = pipeline.export_ir(cfg, "q4f16", target, context_window=len(prompt) + new + 16,
                                    prefill_chunk=len(prompt))
    ex = pipeline.compile_ir(mod, target)
    pipeline.save_so(ex, tmp / "model.so", "x86_64")
    log(f"mcpm: compiled in {time.perf_counter() - t0:.0f} s")
    arrays = [a for _, a in params.tvm_params(specs, qm)]
    model = runner.TVMModel(tmp / "model.so", arrays, context_window=len(prompt) + new + 16,
                            prefill_chunk=len(prompt))
    model.generate(prompt, 4)
    g = model.generate(prompt, new)
    return g.prefill_s, g.decode_s, g.tokens


def run_torch(cfg, qm, prompt, new, threads, tmp: Path):
    import torch

    from exporter.model import KVCache, MiniCPM

    torch.set_num_threads(threads)
    with torch.device("meta"):
        model = MiniCPM(cfg)
    model.load_state_dict(qm.dequantized(), strict=True, assign=True)   # no second fp32 copy (11 GB)
    model.eval()

    @torch.no_grad()
    def gen(n):
        cache = KVCache(cfg, len(prompt) + n)
        t0 = time.perf_counter()
        logits = model(torch.tensor([prompt]), cache, start=0, last_only=True)
        t1 = time.perf_counter()
        out = [int(logits[0, -1].argmax())]
        for _ in range(n - 1):
            logits = model(torch.tensor([[out[-1]]]), cache, start=cache.length, last_only=True)
            out.append(int(logits[0, -1].argmax()))
        return t1 - t0, time.perf_counter() - t1, out

    gen(4)
    return gen(new)


def run_onnxruntime(cfg, qm, prompt, new, threads, tmp: Path):
    import numpy as np
    import onnxruntime as ort

    import ort_minicpm

    path = ort_minicpm.build(cfg, qm, tmp / "minicpm_q4.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")     # see PASSIVE_ENV
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    emb = qm.tensors["tok_embeddings.weight"]
    L, H, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim

    def embeds(ids):
        from exporter.quant import unpack_int4
        return (unpack_int4(emb.data[ids], emb.scale[ids]) * cfg.scale_emb)[None].astype(np.float32)

    def step(ids, start, past):
        cos, sin = ort_minicpm.rope_tables(cfg, start, len(ids))
        feed = {"embeds": embeds(ids), "cos": cos, "sin": sin, "mask": ort_minicpm.causal_mask(start, len(ids))}
        for i in range(L):
            feed[f"past_k{i}"], feed[f"past_v{i}"] = past[2 * i], past[2 * i + 1]
        res = sess.run(None, feed)
        return res[0][0, -1], res[1:]

    def gen(n):
        past = [np.zeros((1, H, 0, D), np.float32)] * (2 * L)
        t0 = time.perf_counter()
        logits, past = step(prompt, 0, past)
        t1 = time.perf_counter()
        out = [int(logits.argmax())]
        for _ in range(n - 1):
            logits, past = step([out[-1]], len(prompt) + len(out) - 1, past)
            out.append(int(logits.argmax()))
        return t1 - t0, time.perf_counter() - t1, out

    gen(4)
    return gen(new)


def _llama_paths():
    src = LLAMA / "src" / f"llama_cpp_python-{LLAMA_VERSION}"
    return src, src / "vendor" / "llama.cpp", LLAMA / "site", LLAMA / "convdeps"


def ensure_llama_cpp() -> None:
    """pip-build llama-cpp-python from the PyPI sdist into a private dir (~20 min on 2 cores, once)."""
    src, vendor, site, convdeps = _llama_paths()
    sdist = LLAMA / "sdist" / f"llama_cpp_python-{LLAMA_VERSION}.tar.gz"
    pip = [sys.executable, "-m", "pip", "-q"]
    if not sdist.exists():
        log("llama.cpp: downloading the llama-cpp-python sdist")
        subprocess.run([*pip, "download", "--no-deps", "--no-binary", ":all:", "-d", str(sdist.parent),
                        f"llama-cpp-python=={LLAMA_VERSION}"], check=True)
    if not (site / "llama_cpp").exists():
        log("llama.cpp: building llama-cpp-python (CPU, GGML_NATIVE); this takes long on 2 cores")
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_CURL=OFF",
               "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
        subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(sdist)], check=True, env=env)
        subprocess.run([*pip, "install", "--no-deps", "--target", str(site), "diskcache"], check=True)
    if not vendor.exists():
        (LLAMA / "src").mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "xzf", str(sdist), "-C", str(LLAMA / "src")], check=True)
    if not (convdeps / "transformers").exists():      # convert_hf_to_gguf imports transformers.AutoConfig
        subprocess.run([*pip, "install", "--no-deps", "--target", str(convdeps), "transformers==4.46.3",
                        "huggingface_hub==0.26.5", "tokenizers==0.20.3"], check=True)


def llama_gguf(ckpt: Path) -> Path:
    """Q4_0 GGUF of the checkpoint (cached next to it)."""
    _, vendor, site, convdeps = _llama_paths()
    q4 = ckpt.with_name(ckpt.name + ".Q4_0.gguf")
    if q4.exists():
        return q4
    bf16 = ckpt.with_name(ckpt.name + ".bf16.gguf")
    if not bf16.exists():
        log("llama.cpp: convert_hf_to_gguf.py -> bf16 GGUF")
        env = {**os.environ, "PYTHONPATH": f"{convdeps}:{vendor / 'gguf-py'}"}
        subprocess.run([sys.executable, str(vendor / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", "bf16",
                        "--outfile", str(bf16)], check=True, env=env, capture_output=True)
    sys.path.insert(0, str(site))
    import llama_cpp

    log("llama.cpp: llama_model_quantize -> pure Q4_0")
    p = llama_cpp.llama_model_quantize_default_params()
    p.nthread, p.ftype, p.pure = 2, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, True
    p.output_tensor_type = p.token_embedding_type = llama_cpp.GGML_TYPE_Q4_0
    tmp = q4.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(bf16).encode(), str(tmp).encode(), p) != 0:
        raise RuntimeError("llama_model_quantize failed")
    tmp.rename(q4)
    bf16.unlink()
    return q4


def run_llama_cpp(cfg, qm, prompt, new, threads, tmp: Path, ckpt: Path):
    import numpy as np

    ensure_llama_cpp()
    gguf = llama_gguf(ckpt)
    sys.path.insert(0, str(_llama_paths()[2]))
    import llama_cpp
    import llama_cpp.llama as llama_mod

    # no weight repacking ("extra buffer types"): the repacked/AMX path segfaults in this VM
    default_params = llama_cpp.llama_model_default_params

    def no_repack():
        p = default_params()
        p.use_extra_bufts = False
        return p

    llama_mod.llama_cpp.llama_model_default_params = no_repack
    llm = llama_cpp.Llama(str(gguf), n_ctx=len(prompt) + new + 16, n_batch=len(prompt), n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    def argmax():
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(cfg.vocab_size,)).argmax())

    def gen(n):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        out = [argmax()]
        for _ in range(n - 1):
            llm.eval([out[-1]])
            out.append(argmax())
        return t1 - t0, time.perf_counter() - t1, out

    gen(4)
    return gen(new)


# ---------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)   # one engine, in its own process
    args = ap.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        ap.error(f"unknown engine '{bad[0]}' (known: {', '.join(ENGINES)})")
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    from make_2b_checkpoint import make_checkpoint

    ckpt = make_checkpoint(args.checkpoint) if args.checkpoint else make_checkpoint()
    log(f"checkpoint {ckpt}; quantizing to q4f16")
    cfg, qm = load_quantized(ckpt)
    import numpy as np

    prompt = [1] + [int(t) for t in np.random.default_rng(0).integers(3, 8000, args.prompt_tokens - 1)]
    if args.worker:
        runners = {"mcpm": run_mcpm, "torch": run_torch, "onnxruntime": run_onnxruntime,
                   "llama.cpp": lambda *a: run_llama_cpp(*a, ckpt=ckpt)}
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(runners[args.worker](cfg, qm, prompt, args.new_tokens, args.threads, Path(tmp))))
        return {}
    bw = bandwidth_gb_s(args.threads)
    per_tok = bytes_per_token(cfg, qm, args.prompt_tokens + args.new_tokens // 2)
    result = {"engines": {}, "roofline_tok_s": round(bw * 1e9 / per_tok, 2), "bandwidth_gb_s": round(bw, 2),
              "bytes_per_token": per_tok, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens}
    for name in engines:
        log(f"running {name} (own process)")
        cmd = [sys.executable, __file__, "--worker", name, "--threads", str(args.threads), "--prompt-tokens",
               str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--checkpoint", str(ckpt)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **PASSIVE_ENV})
        if proc.returncode != 0:
            log(f"{name} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
            result["engines"][name] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
            continue
        pre_s, dec_s, toks = json.loads(proc.stdout.strip().splitlines()[-1])
        result["engines"][name] = {"decode_tok_s": round((len(toks) - 1) / dec_s, 2),
                                   "prefill_tok_s": round(args.prompt_tokens / pre_s, 2), "first_tokens": toks[:8]}
        log(f"{name}: {result['engines'][name]}")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"roofline {result['roofline_tok_s']} tok/s = {bw:.1f} GB/s / {per_tok / 1e9:.3f} GB per token "
              f"({args.threads} threads)")
        print(f"{'engine':<12} {'decode tok/s':>12} {'prefill tok/s':>13} {'% roofline':>10}  first tokens")
        for name, r in result["engines"].items():
            if "error" in r:
                print(f"{name:<12} failed: {r['error']}")
                continue
            print(f"{name:<12} {r['decode_tok_s']:>12.2f} {r['prefill_tok_s']:>13.2f} "
                  f"{100 * r['decode_tok_s'] / result['roofline_tok_s']:>9.0f}%  {r['first_tokens']}")
    return result


if __name__ == "__main__":
    main()
