"""The android / harmony targets: compile, package and verify a TVM bundle (MLC-LLM-like layout).

Bundle (inside the staging directory handed over by exporter/bundle.py)::

  lib/cpu/model.tar        aarch64 objects, system library, symbols prefixed mcpm_<recipe>_
  lib/cpu/model.so         the same code as a shared object (clang + lld)
  lib/opencl/model.tar|so  --backend opencl|all: OpenCL kernels + aarch64 host code
  lib/opencl/kernels.cl    the OpenCL C source of those kernels (built and inspected here, not executed)
  lib/host/model.so        x86_64 build of the same model: verification and `mcpm-export run`
  params/                  TVM tensor cache: tensor-cache.json + params_shard_*.bin
  mlc-chat-config.json     model config, context window, prefill chunk, conv template, tokenizer files
  tokenizer.model (+ tokenizer_config.json, ...)

Verification (before the bundle may be finalized): greedy VERIFY_TOKENS tokens from the host build
must equal the PyTorch reference run on the same (dequantized) weights, and every step's logits must
be within LOGIT_ATOL of the reference's.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from exporter.config import MiniCPMConfig
from exporter.errors import ExportError
from exporter.model import MiniCPM
from exporter.progress import Progress
from exporter.quant import QuantizedModel
from exporter.recipes import Recipe
from exporter.tokenizer import Tokenizer

from . import pipeline
from .params import tvm_params, write_tensor_cache
from .presets import get_preset
from .runner import PAGE_SIZE, TVMModel

BACKENDS = {"cpu": ("cpu",), "opencl": ("opencl",), "all": ("cpu", "opencl")}
VERIFY_TOKENS = 64
LOGIT_ATOL = 2e-3        # fp32 everywhere: measured ~2e-5 on tiny; logits are O(10)
OPENCL_NOTE = ("OpenCL kernels are compiled and their source inspected at export time; PyPI TVM has no "
               "OpenCL runtime, so they were not executed here (the CPU path was verified via lib/host).")
VERIFY_PROMPT = (
    "Python is an easy to learn, powerful programming language. It has efficient high-level data "
    "structures and a simple but effective approach to object-oriented programming.\n\n"
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
    "    for _ in range(n):\n        a, b = b, a + b\n    return a\n")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


@dataclass
class BuildRequest:
    recipe: Recipe
    config: MiniCPMConfig
    weights: QuantizedModel            # fp16 scheme too: a QuantizedModel holding fp16 arrays
    tokenizer_dir: Path
    platform: str                      # "android" | "harmony"
    backend: str = "cpu"               # cpu | opencl | all
    soc: str = "generic"
    progress: Progress = field(default_factory=lambda: Progress(quiet=True))
    reference: MiniCPM | None = None   # PyTorch model on the dequantized weights (built if None)


def _write_config(req: BuildRequest, staging: Path, libs: dict, prefix: str, tok_files: list[str]) -> None:
    cfg = req.config
    conf = {
        "model_type": "minicpm",
        "quantization": req.recipe.quantization,
        "model_config": cfg.to_dict(),
        "vocab_size": cfg.vocab_size,
        "context_window_size": req.recipe.context_window,
        "prefill_chunk_size": req.recipe.prefill_chunk,
        "sliding_window_size": -1,
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1,
        "max_batch_size": 1,
        "temperature": 0.0,
        "conv_template": {"name": req.recipe.conv_template},
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": 0,
        "tokenizer_files": tok_files,
        "tokenizer_info": {"token_postproc_method": "byte_fallback", "prepend_space_in_encode": True,
                           "strip_space_in_decode": True},
        "model_lib": {"system_lib_prefix": prefix, "libs": libs, "page_size": PAGE_SIZE,
                      "functions": ["embed", "prefill", "decode", "create_tir_paged_kv_cache", "_metadata"],
                      "params": "params/tensor-cache.json (records are the packed params tuple, in order)"},
        "version": "mcpm-export/tvm/1",
    }
    (staging / "mlc-chat-config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


def _reference(req: BuildRequest) -> MiniCPM:
    return req.reference or MiniCPM.from_state_dict(req.config, req.weights.dequantized())


def verify(req: BuildRequest, host_lib, params: list[np.ndarray], tokens: int = VERIFY_TOKENS) -> dict:
    """Greedy ``tokens`` from the host build vs the PyTorch reference; ExportError on any mismatch."""
    tok = Tokenizer(req.tokenizer_dir / "tokenizer.model")
    prompt = tok.encode(VERIFY_PROMPT)
    tvm_model = TVMModel(host_lib, params, req.recipe.context_window, req.recipe.prefill_chunk)
    got = tvm_model.generate(prompt, tokens)
    with torch.no_grad():
        ref_tokens, ref_logits = _reference(req).generate(prompt, tokens, prefill_chunk=req.recipe.prefill_chunk)
    n = min(len(got.tokens), len(ref_tokens))
    diff = max(float(np.abs(a - b.numpy()).max()) for a, b in zip(got.logits[:n], ref_logits[:n]))
    report = {"prompt_tokens": len(prompt), "new_tokens": tokens, "tokens_equal": got.tokens == ref_tokens,
              "max_abs_logit_diff": diff, "logit_atol": LOGIT_ATOL, "reference": "exporter/model.py on the "
              "dequantized bundle weights (PyTorch, fp32)"}
    if got.tokens != ref_tokens:
        first = next((i for i, (a, b) in enumerate(zip(got.tokens, ref_tokens)) if a != b), n)
        raise ExportError(f"verification failed: host build's greedy token {first} is {got.tokens[first]}, "
                          f"PyTorch reference gives {ref_tokens[first]} (max logit diff {diff:.2e})")
    if diff > LOGIT_ATOL:
        raise ExportError(f"verification failed: logits differ from the PyTorch reference by {diff:.2e} "
                          f"(bound {LOGIT_ATOL:.0e})")
    return report


def build_bundle(req: BuildRequest, staging: Path) -> dict:
    """Compile + package + verify into ``staging``; returns the target-specific manifest keys."""
    if req.backend not in BACKENDS:
        raise ExportError(f"--backend: unknown backend '{req.backend}' (known: {', '.join(BACKENDS)})")
    if req.platform not in pipeline.TRIPLES:
        raise ExportError(f"unknown TVM platform '{req.platform}'")
    triple = pipeline.TRIPLES[req.platform]
    preset = get_preset(req.soc)
    prefix = pipeline.system_lib_prefix(req.recipe.name)
    scheme = req.recipe.quantization
    meta = {"model": "minicpm", "recipe": req.recipe.name, "quantization": scheme,
            "context_window_size": req.recipe.context_window, "prefill_chunk_size": req.recipe.prefill_chunk,
            "hidden_size": req.config.hidden_size, "vocab_size": req.config.vocab_size, "page_size": PAGE_SIZE}
    libs: dict[str, dict] = {}
    builds = {}
    log = req.progress.log
    with req.progress.stage("compile"):
        for backend in BACKENDS[req.backend]:
            cpu_target = preset.llvm_target(triple)
            log(f"{backend}: {triple}, SoC preset {preset.name} (mcpu={preset.mcpu})")
            target = pipeline.make_target(backend, cpu_target)
            mod, specs = pipeline.export_ir(req.config, scheme, target, {**meta, "backend": backend})
            builds[backend] = pipeline.compile_ir(mod, target, prefix=prefix)
            libs[backend] = {"tar": f"lib/{backend}/model.tar", "so": f"lib/{backend}/model.so",
                             "target": cpu_target if backend == "cpu" else
                             {"device": pipeline.OPENCL_TARGET, "host": cpu_target}}
        log("host: x86_64 build for verification and `mcpm-export run`")
        host_target = pipeline.make_target("cpu", pipeline.HOST_TARGET)
        mod, specs = pipeline.export_ir(req.config, scheme, host_target, {**meta, "backend": "host"})
        host_ex = pipeline.compile_ir(mod, host_target)
        libs["host"] = {"so": "lib/host/model.so", "target": pipeline.HOST_TARGET}

    with req.progress.stage("package"):
        for backend, ex in builds.items():
            out = staging / "lib" / backend
            out.mkdir(parents=True, exist_ok=True)
            log(f"lib/{backend}/model.tar, lib/{backend}/model.so")
            pipeline.save_tar(ex, out / "model.tar")
            pipeline.save_so(ex, out / "model.so", triple)
            if backend == "opencl":
                src = pipeline.opencl_source(ex)
                if "__kernel" not in src:
                    raise ExportError("opencl build produced no OpenCL kernels")
                (out / "kernels.cl").write_text(src)
                libs[backend].update(source="lib/opencl/kernels.cl", executed=False)
        (staging / "lib" / "host").mkdir(parents=True, exist_ok=True)
        pipeline.save_so(host_ex, staging / "lib" / "host" / "model.so", "x86_64")
        named = tvm_params(specs, req.weights)
        log(f"params/: {len(named)} tensors, {sum(a.nbytes for _, a in named) / 1e6:.1f} MB")
        write_tensor_cache(named, staging / "params", {"ParamSize": len(named), "ParamBytes":
                                                       int(sum(a.nbytes for _, a in named))})
        tok_files = []
        for name in TOKENIZER_FILES:
            if (req.tokenizer_dir / name).is_file():
                shutil.copyfile(req.tokenizer_dir / name, staging / name)
                tok_files.append(name)
        _write_config(req, staging, libs, prefix, tok_files)

    with req.progress.stage("verify"):
        report = verify(req, staging / "lib" / "host" / "model.so", [a for _, a in named])
        log(f"host build: greedy {VERIFY_TOKENS} tokens equal the PyTorch reference, "
            f"max |logit diff| {report['max_abs_logit_diff']:.1e} (bound {LOGIT_ATOL:.0e})")
    return {"platform": req.platform, "triple": triple, "backends": list(BACKENDS[req.backend]),
            "soc": {"preset": preset.name, "mcpu": preset.mcpu, "mattr": list(preset.mattr)},
            "system_lib_prefix": prefix, "libs": libs, "verification": report,
            **({"opencl": {"built": True, "executed": False, "note": OPENCL_NOTE}}
               if "opencl" in BACKENDS[req.backend] else {})}


class TVMTarget:
    """android / harmony: the same pipeline, different triple (aarch64-linux-android / aarch64-linux-ohos)."""
    allows_vision = True

    def __init__(self, name: str):
        self.name = name

    def build(self, ctx, staging: Path) -> dict:
        opts = ctx.options
        req = BuildRequest(recipe=ctx.recipe, config=ctx.config, weights=ctx.quantized,
                           tokenizer_dir=Path(ctx.tokenizer_path).parent, platform=self.name,
                           backend=opts.get("backend") or "cpu", soc=opts.get("soc") or "generic",
                           progress=ctx.progress, reference=ctx.quant_reference)
        extra = build_bundle(req, staging)
        if ctx.recipe.is_vision:
            from targets.tvm_vision import build_vision
            with ctx.progress.stage("vision"):
                extra.update(build_vision(ctx.checkpoint.path, ctx.recipe, staging, self.name, req.backend,
                                          req.soc, ctx.progress))
        return extra


ANDROID = TVMTarget("android")
HARMONY = TVMTarget("harmony")
