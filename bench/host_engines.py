"""The engines of bench/decode_host.py: one MiniCPM-2B-shaped int4 model behind one interface.

Every engine is a ``Session`` with ``reset()`` (empty context) and ``feed(ids) -> next token`` (greedy:
argmax of the last position's logits). ``run_workloads`` times the llama-bench workloads on a session:
``pp<P>`` (prefill P tokens from an empty context), ``tg<N>@d<D>`` (N decode steps after a D-token
context; ``tg<N>`` = depth 0, i.e. after one token). Each engine runs in its own process (llama.cpp's
OpenMP and torch's do not mix); decode_host.py interleaves the processes.

Engines (each in its best documented configuration for a CPU; handicapped variants are labelled):
  mcpm               this project's host build: targets/tvm/pipeline.py (paged KV cache) with the
                     microkernels of targets/tvm/kernels.py, q4f16 everywhere, mcpu = this CPU
  llama.cpp          llama-cpp-python built from the PyPI sdist (GGML_NATIVE) into $MCPM_EXPORT_CACHE/llama_cpp,
                     GGUF via the sdist's convert_hf_to_gguf.py (bf16), then pure Q4_0, its defaults:
                     weight repacking on (extra buffer types), default thread waits, n_ubatch 512
  llama.cpp-passive  the same with passive OpenMP waits (OMP_WAIT_POLICY=PASSIVE): on a shared machine
                     the default spin-waits collapse when a worker is descheduled (extra row)
  llama.cpp-thp      the defaults with glibc's malloc asking for transparent huge pages
                     (GLIBC_TUNABLES=glibc.malloc.hugetlb=1: its repacked weights and KV cache in 2 MiB
                     pages, as mcpm's weights are, targets/tvm/runner.host_tensors; extra row)
  llama.cpp-norepack no weight repacking and passive waits (handicapped: how this bench ran llama.cpp
                     before issue 11; an extra row only)
  onnxruntime        bench/ort_minicpm.py: MatMulNBits int4 (accuracy_level 4), ORT session defaults
  torch              exporter/model.py eager, fp32 weights (the q4f16 weights dequantized)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from exporter.cache import cache_root

CACHE = cache_root()
LLAMA = CACHE / "llama_cpp"
LLAMA_VERSION = "0.3.36"
ENGINES = ("mcpm", "llama.cpp", "llama.cpp-passive", "llama.cpp-thp", "llama.cpp-norepack", "onnxruntime", "torch")
# Environment per engine process. mcpm: TVM's pool without pinning (shared cores; measured better
# here). llama.cpp-passive / -norepack: passive OpenMP waits. llama.cpp-thp: huge pages from malloc.
# Everything else: defaults.
ENGINE_ENV = {"mcpm": {"TVM_BIND_THREADS": "0"}, "llama.cpp-passive": {"OMP_WAIT_POLICY": "PASSIVE"},
              "llama.cpp-thp": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
              "llama.cpp-norepack": {"OMP_WAIT_POLICY": "PASSIVE"}}


def log(msg: str) -> None:
    print(f"[decode_host] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Plan:
    """What one worker measures: pp<len(prompt)> with tg<new>@d<len(prompt)>, then tg<new>@d<D> per depth."""
    prompt: list[int]
    new: int
    depths: tuple[int, ...]
    depth_ids: list[int]          # token ids the depth contexts are cut from (max depth long)

    @property
    def context(self) -> int:
        return max(len(self.prompt), *self.depths, 1) + self.new + 16

    @property
    def chunk(self) -> int:
        return max(len(self.prompt), *self.depths, 1)


def workload_names(prompt_tokens: int, new: int, depths) -> list[str]:
    names = [f"pp{prompt_tokens}", f"tg{new}@d{prompt_tokens}"]
    return names + [tg_name(new, d) for d in depths if tg_name(new, d) not in names]


def tg_name(new: int, depth: int) -> str:
    return f"tg{new}" if depth == 0 else f"tg{new}@d{depth}"


class Session:
    def reset(self) -> None:
        raise NotImplementedError

    def feed(self, ids: list[int]) -> int:
        raise NotImplementedError


def _generate(s: Session, ids: list[int], new: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, seconds of `new` decode steps, tokens)."""
    s.reset()
    t0 = time.perf_counter()
    toks = [s.feed(ids)]
    t1 = time.perf_counter()
    for _ in range(new):
        toks.append(s.feed([toks[-1]]))
    return t1 - t0, time.perf_counter() - t1, toks


def run_workloads(s: Session, plan: Plan) -> dict:
    """{workload: {"s": seconds, "tokens": n}} plus "first_tokens" (of the pp generation)."""
    _generate(s, plan.prompt[:16], 4)                                  # warm-up
    pre, dec, toks = _generate(s, plan.prompt, plan.new)
    p = len(plan.prompt)
    out = {f"pp{p}": {"s": pre, "tokens": p}, f"tg{plan.new}@d{p}": {"s": dec, "tokens": plan.new},
           "first_tokens": toks[:8]}
    for d in plan.depths:
        name = tg_name(plan.new, d)
        if name not in out:
            _, dec, _ = _generate(s, plan.depth_ids[:max(d, 1)], plan.new)
            out[name] = {"s": dec, "tokens": plan.new}
    return out


# ---------------------------------------------------------------- mcpm
class McpmSession(Session):
    def __init__(self, cfg, qm, plan: Plan, workdir: Path):
        import tvm

        from targets.tvm import params, pipeline, runner

        # the host build's target with this machine's CPU (llama.cpp is built GGML_NATIVE too); the
        # bundle's portable x86-64-v3 host target would select the kernels' AVX2 path
        cpu = tvm.get_global_func("target.llvm_get_system_cpu")()
        target = pipeline.make_target("cpu", {**pipeline.HOST_TARGET, "mcpu": cpu})
        mod, specs = pipeline.export_ir(cfg, "q4f16", target, context_window=plan.context, prefill_chunk=plan.chunk)
        lib = workdir / "mcpm-model.so"        # compiled once per decode_host run, reused by every rep
        if not lib.exists():
            t0 = time.perf_counter()
            pipeline.save_so(pipeline.compile_ir(mod, target), workdir / "partial.so", "x86_64")
            os.replace(workdir / "partial.so", lib)
            log(f"mcpm: compiled in {time.perf_counter() - t0:.0f} s")
        self.model = runner.TVMModel(lib, [a for _, a in params.tvm_params(specs, qm)],
                                     context_window=plan.context, prefill_chunk=plan.chunk)
        self.kv, self.fresh = None, True

    def reset(self) -> None:
        self.kv, self.fresh = self.model.new_cache(), True

    def feed(self, ids: list[int]) -> int:
        import numpy as np

        if len(ids) == 1 and not self.fresh:
            logits = self.model.forward(self.kv, self.model.embed(ids), "decode")
        else:
            logits = self.model.forward_chunks(self.kv, self.model.embed(ids))
        self.fresh = False
        return int(np.argmax(logits))


# ---------------------------------------------------------------- torch
class TorchSession(Session):
    def __init__(self, cfg, qm, plan: Plan, threads: int):
        import torch

        from exporter.model import MiniCPM

        torch.set_num_threads(threads)
        with torch.device("meta"):
            model = MiniCPM(cfg)
        model.load_state_dict(qm.dequantized(), strict=True, assign=True)   # no second fp32 copy (11 GB)
        self.model, self.cfg, self.plan = model.eval(), cfg, plan

    def reset(self) -> None:
        from exporter.model import KVCache
        self.cache = KVCache(self.cfg, self.plan.context)

    def feed(self, ids: list[int]) -> int:
        import torch
        with torch.no_grad():
            logits = self.model(torch.tensor([ids]), self.cache, start=self.cache.length, last_only=True)
        return int(logits[0, -1].argmax())


# ---------------------------------------------------------------- onnxruntime
class OrtSession(Session):
    def __init__(self, cfg, qm, plan: Plan, threads: int, workdir: Path):
        import onnxruntime as ort

        import ort_minicpm

        path = ort_minicpm.build(cfg, qm, workdir / "minicpm_q4.onnx")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.cfg, self.emb, self.ort_minicpm = cfg, qm.tensors["tok_embeddings.weight"], ort_minicpm

    def reset(self) -> None:
        import numpy as np
        c = self.cfg
        self.past = [np.zeros((1, c.num_key_value_heads, 0, c.head_dim), np.float32)] * (2 * c.num_hidden_layers)
        self.pos = 0

    def feed(self, ids: list[int]) -> int:
        import numpy as np

        from exporter.quant import unpack_int4

        m = self.ort_minicpm
        emb = (unpack_int4(self.emb.data[ids], self.emb.scale[ids]) * self.cfg.scale_emb)[None].astype(np.float32)
        cos, sin = m.rope_tables(self.cfg, self.pos, len(ids))
        feed = {"embeds": emb, "cos": cos, "sin": sin, "mask": m.causal_mask(self.pos, len(ids))}
        for i in range(self.cfg.num_hidden_layers):
            feed[f"past_k{i}"], feed[f"past_v{i}"] = self.past[2 * i], self.past[2 * i + 1]
        res = self.sess.run(None, feed)
        self.past, self.pos = res[1:], self.pos + len(ids)
        return int(res[0][0, -1].argmax())


# ---------------------------------------------------------------- llama.cpp
def _llama_paths():
    src = LLAMA / "src" / f"llama_cpp_python-{LLAMA_VERSION}"
    return src, src / "vendor" / "llama.cpp", LLAMA / "site", LLAMA / "convdeps"


def llama_sdist() -> Path:
    return LLAMA / "sdist" / f"llama_cpp_python-{LLAMA_VERSION}.tar.gz"


def ensure_llama_cpp() -> None:
    """pip-build llama-cpp-python from the PyPI sdist into a private dir (~20 min on 2 cores, once)."""
    src, vendor, site, convdeps = _llama_paths()
    sdist = llama_sdist()
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


def llama_vendor() -> Path:
    """The llama.cpp sources inside the sdist (read by bench/arm_kernels.py; never committed)."""
    return _llama_paths()[1]


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


class LlamaSession(Session):
    def __init__(self, cfg, plan: Plan, threads: int, ckpt: Path, repack: bool):
        ensure_llama_cpp()
        gguf = llama_gguf(ckpt)
        sys.path.insert(0, str(_llama_paths()[2]))
        import llama_cpp
        import llama_cpp.llama as llama_mod

        if not repack:     # no "extra buffer types" (the repacked Q4_0 -> Q4_0x8 GEMV/GEMM kernels)
            default_params = llama_cpp.llama_model_default_params

            def no_repack():
                p = default_params()
                p.use_extra_bufts = False
                return p

            llama_mod.llama_cpp.llama_model_default_params = no_repack
        self.llm = llama_cpp.Llama(str(gguf), n_ctx=plan.context, n_batch=plan.chunk, n_ubatch=512,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)
        self.vocab = cfg.vocab_size

    def reset(self) -> None:
        self.llm.reset()

    def feed(self, ids: list[int]) -> int:
        import numpy as np
        self.llm.eval(ids)
        return int(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,)).argmax())


def make_session(name: str, cfg, qm, plan: Plan, threads: int, workdir: Path, ckpt: Path) -> Session:
    if name == "mcpm":
        return McpmSession(cfg, qm, plan, workdir)
    if name == "torch":
        return TorchSession(cfg, qm, plan, threads)
    if name == "onnxruntime":
        return OrtSession(cfg, qm, plan, threads, workdir)
    return LlamaSession(cfg, plan, threads, ckpt, repack=(name != "llama.cpp-norepack"))


def worker_json(name: str, cfg, qm, plan: Plan, threads: int, workdir: Path, ckpt: Path) -> str:
    return json.dumps(run_workloads(make_session(name, cfg, qm, plan, threads, workdir, ckpt), plan))
