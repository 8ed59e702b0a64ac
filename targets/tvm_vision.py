"""MiniCPM-V vision path for the android / harmony TVM bundles (issue 6).

The export form of the vision encoder + resampler (exporter/vision/model.py:VisionEncoder) is
traced with torch.export (one dynamic dim: the patch count N = h*w, so every slice shape the
planner produces runs on one library, no buckets) and imported with
tvm.relax.frontend.torch.from_exported_program, then lowered for the same targets as the text
model (aarch64 CPU via targets/tvm/pipeline.py, OpenCL via compile_vision's dlight variant) plus
x86_64 for host verification. N has no upper bound: TVM allocates the N-sized intermediates at
run time (a bound would make its static planner reserve the worst case, e.g. N^2 attention).

Bundle additions (next to the text model's files in the same staging directory)::

  vision/lib/<backend>/vision.tar|so   function ``image_embed(patches, pos_interp, key_pos, params)``
  vision/lib/host/vision.so            x86_64 build: export-time parity check and ``mcpm-export run``
  vision/params/                       TVM tensor cache of vpm.* / resampler.* (float32)
  vision/vision-config.json            config, slicing rule, special token ids (incl. bos), input spec
  vision/key_pos.bin                   V1 only: fixed float32 [N, hidden] resampler key positions
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from exporter.errors import ExportError
from exporter.model import check_generation
from exporter.tokenizer import Tokenizer
from exporter.vision import preprocess as pp
from exporter.vision.config import VisionConfig
from exporter.vision.loader import load_minicpmv
from exporter.vision.model import MiniCPMVVision, VisionEncoder, key_pos_table
from exporter.vision.slicing import ImagePlan, ImageTokens, build_prompt, plan_image, read_image, slice_images
from targets.tvm.reproducible import canonical_shape_funcs

FUNCTION = "image_embed"
VISION_DIR = "vision"
PARITY_RTOL = 1e-3      # max |tvm - torch| / max |torch| per image; measured ~1e-6 on the tiny model
# q8 weights (targets/tvm/vision_q8.py): vs PyTorch on the same dequantized weights the only difference is the
# int8 activation rounding (measured 8e-3 tiny V2, see bench/RESULTS.md for the real width); vs the fp32
# reference the weight rounding adds to it (measured 1.2e-2 tiny V2).
PARITY_RTOL_Q8, PARITY_RTOL_Q8_FP32 = 3e-2, 6e-2
VERIFY_SIZES = [(400, 300), (896, 448)]   # thumbnail only; thumbnail + 2x1 slices
WEIGHT_FORMATS = ("q8", "fp32")          # recipe vision.weights / vision_weights; default q8


def export_ir(vision: MiniCPMVVision, weights: str = "fp32") -> tuple[tvm.IRModule, list[tuple[str, np.ndarray]]]:
    """Relax module with ``image_embed`` (inputs, then params) and the params in call order.

    weights "q8": the big linears take int8 weights through the microkernels (targets/tvm/vision_q8.py;
    CPU builds only); "fp32": every parameter float32."""
    if weights not in WEIGHT_FORMATS:
        raise ExportError(f"vision_weights: unknown format '{weights}' (known: {', '.join(WEIGHT_FORMATS)})")
    cfg = vision.cfg
    enc = VisionEncoder(vision).eval()
    n_ex = 6 * 7
    args = (torch.zeros(n_ex, 3 * cfg.patch ** 2), torch.zeros(n_ex, cfg.pos_grid ** 2),
            torch.zeros(n_ex, cfg.hidden))
    n = torch.export.Dim("n")
    with torch.no_grad():
        ep = torch.export.export(enc, args, dynamic_shapes=({0: n}, {0: n}, {0: n}))
    names = list(ep.graph_signature.parameters)
    mod = from_exported_program(ep, keep_params_as_input=True, unwrap_unit_return_tuple=True)
    mod, _ = relax.frontend.detach_params(mod)
    state = dict(enc.named_parameters())
    params = [(name, state[name].detach().numpy().astype(np.float32)) for name in names]
    if weights == "q8":
        from targets.tvm.vision_q8 import quantize_ir
        mod, params, _ = quantize_ir(mod, params)
    func = mod["main"].with_attr("global_symbol", FUNCTION).with_attr("num_input", 3)
    mod = tvm.IRModule({relax.GlobalVar(FUNCTION): func,
                        **{gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"}})
    mod = relax.transform.BundleModelParams("params")(mod)      # params: one tuple, last argument
    return mod, params


def _dynamic_reduction(func) -> bool:
    """True when a block of ``func`` reduces over a symbolic extent (e.g. attention @ V over N)."""
    from tvm.s_tir import Schedule
    from tvm.s_tir import dlight as dl
    try:
        infos = dl.normalize_prim_func(Schedule(func)) or []
    except Exception:   # noqa: BLE001 - not analysable: let the inner rule decide
        return False
    return any(it.kind == "R" and not isinstance(it.dom, int) for info in infos for it in info.iters)


def compile_vision(mod: tvm.IRModule, target: tvm.target.Target, prefix: str | None = None) -> relax.VMExecutable:
    """targets/tvm/pipeline.py's lowering plus a schedule for the matmuls: on CPUs
    targets/tvm/vision_schedule.py (tiled, vectorised, row-parallel); on GPUs dlight's rules, except
    that its Matmul rule skips matmuls whose reduction length is the dynamic token count (it would
    unroll a symbolic loop); those fall through to the GEMV/Reduction/Fallback rules."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_passes
    from tvm.s_tir import dlight as dl

    from targets.tvm.vision_schedule import schedule_matmuls

    class StaticReductionMatmul(dl.ScheduleRule):
        def __init__(self):
            self.inner = dl.gpu.Matmul()

        def apply(self, func, target, tunable):
            return None if _dynamic_reduction(func) else self.inner.apply(func, target, tunable)

    @tvm.transform.module_pass(opt_level=0, name="mcpm_vision_pipeline")
    def _pipeline(m: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                      relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
                      relax.transform.DeadCodeElimination()]
            if target.kind.name == "llvm":
                passes.append(schedule_matmuls)
            else:
                passes.append(dl.ApplyDefaultSchedule(StaticReductionMatmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                                      dl.gpu.GeneralReduction(), dl.gpu.Fallback()))
            passes += cpu_passes.dataflow_lower_passes(target) + cpu_passes.finalize_passes(target)
            passes.append(canonical_shape_funcs)   # byte-reproducible builds (targets/tvm/reproducible.py)
            return tvm.transform.Sequential(passes)(m)

    from targets.tvm import vision_q8
    if vision_q8.has_q8(mod):
        if target.kind.name != "llvm":
            raise ExportError(f"vision q8 weights run on the CPU microkernels only, not on '{target.kind.name}'")
        mod = vision_q8.bind_kernels(mod, target)
    if prefix is not None:
        mod = mod.with_attr("system_lib_prefix", prefix)
    return relax.build(mod, target, relax_pipeline=_pipeline, system_lib=prefix is not None)


class VisionRunner:
    """Host runtime of the compiled vision library: image -> [n_images * query_num, hidden]."""

    def __init__(self, lib, params: list[np.ndarray], vcfg: VisionConfig, key_pos: np.ndarray | None = None):
        if isinstance(lib, (str, Path)):
            if not Path(lib).is_file():
                raise ExportError(f"{lib}: compiled vision library not found")
            lib = tvm.runtime.load_module(str(lib))
        self.dev = tvm.cpu()
        self.vm = relax.VirtualMachine(lib, self.dev)
        self.params = [tvm.runtime.tensor(np.ascontiguousarray(a), self.dev) for a in params]
        self.cfg, self.key_pos = vcfg, key_pos

    @classmethod
    def from_bundle(cls, bundle: Path) -> "VisionRunner":
        from targets.tvm.params import read_tensor_cache
        vdir = Path(bundle) / VISION_DIR
        conf_path = vdir / "vision-config.json"
        if not conf_path.is_file():
            raise ExportError(f"{bundle}: bundle has no vision part ({conf_path} missing)")
        conf = json.loads(conf_path.read_text())
        vcfg = VisionConfig(**conf["config"])
        key_pos = None
        if conf.get("key_pos"):
            key_pos = np.fromfile(vdir / conf["key_pos"]["file"], dtype=np.float32).reshape(conf["key_pos"]["shape"])
        params = [a for _, a in read_tensor_cache(vdir / "params")]
        return cls(vdir / "lib" / "host" / "vision.so", params, vcfg, key_pos)

    def embed_one(self, image) -> np.ndarray:
        inp = pp.encoder_inputs(image, self.cfg, self.key_pos)
        args = [tvm.runtime.tensor(inp[k], self.dev) for k in pp.INPUT_NAMES]
        return self.vm[FUNCTION](*args, self.params).numpy()

    def embed_image(self, image) -> tuple[ImagePlan, np.ndarray, list[float]]:
        """(plan, features [n_images*Q, D], seconds per encoded image)."""
        plan = plan_image(image.width, image.height, self.cfg)
        feats, times = [], []
        for im in slice_images(image, plan):
            t0 = time.perf_counter()
            feats.append(self.embed_one(im))
            times.append(time.perf_counter() - t0)
        return plan, np.concatenate(feats), times


def reference_features(vision: MiniCPMVVision, image) -> np.ndarray:
    """PyTorch reference features of every image of the plan, [n_images*Q, D]."""
    plan = plan_image(image.width, image.height, vision.cfg)
    return np.concatenate([vision.reference_embed(torch.from_numpy(pp.normalise(im))).numpy()
                           for im in slice_images(image, plan)])


def synthetic_image(width: int, height: int, seed: int = 0):
    """Deterministic synthetic RGB image: smooth gradients plus noise (PIL)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), (x + y) / max(width + height - 2, 1)], -1)
    arr = np.clip(base * 200 + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def dequantized_vision(vision: MiniCPMVVision, params: list[tuple[str, np.ndarray]]) -> MiniCPMVVision:
    """A copy of ``vision`` whose weights are the bundle's q8 weights dequantized (the q8 parity reference)."""
    import copy

    from targets.tvm.vision_q8 import dequantized_state
    out = copy.deepcopy(vision)
    out.load_state_dict(dequantized_state(vision.state_dict(), params))
    return out.eval()


def _rel(got, ref) -> float:
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6))


def parity(runner: VisionRunner, vision: MiniCPMVVision, sizes=VERIFY_SIZES,
           params: list[tuple[str, np.ndarray]] | None = None) -> dict:
    """Compiled-vs-PyTorch features over test images; ExportError beyond the bound.

    fp32 weights: against the fp32 reference within PARITY_RTOL. q8 weights (``params`` has ``*.q8``
    tensors): against PyTorch with the same dequantized weights within PARITY_RTOL_Q8 and against the
    fp32 reference within PARITY_RTOL_Q8_FP32."""
    q8 = params is not None and any(name.endswith(".q8") for name, _ in params)
    deq = dequantized_vision(vision, params) if q8 else None
    rows = []
    for w, h in sizes:
        img = synthetic_image(w, h)
        plan, got, _ = runner.embed_image(img)
        ref = reference_features(vision, img)
        row = {"size": [w, h], "images": len(plan.images), "max_rel_err": _rel(got, ref)}
        checks = [("PyTorch fp32", row["max_rel_err"], PARITY_RTOL_Q8_FP32 if q8 else PARITY_RTOL)]
        if q8:
            row = {**row, "max_rel_err_fp32": row["max_rel_err"],
                   "max_rel_err": _rel(got, reference_features(deq, img))}
            checks.insert(0, ("PyTorch on the dequantized q8 weights", row["max_rel_err"], PARITY_RTOL_Q8))
        rows.append(row)
        for what, err, bound in checks:
            if not err <= bound:
                raise ExportError(f"vision verification failed: {w}x{h} image features differ from {what} "
                                  f"by {err:.2e} (relative; bound {bound:.0e})")
    if q8:
        return {"images": rows, "rtol": PARITY_RTOL_Q8, "rtol_fp32": PARITY_RTOL_Q8_FP32,
                "reference": "exporter/vision/model.py (PyTorch) on the dequantized q8 weights; "
                             "max_rel_err_fp32 against the fp32 weights"}
    return {"images": rows, "rtol": PARITY_RTOL, "reference": "exporter/vision/model.py (PyTorch fp32)"}


def resize_pass_order() -> str:
    """How this Pillow orders its two 8-bit resize passes (runner/vision.cc follows it): Pillow 13
    (python-pillow/Pillow#9549) resizes vertically first when the height shrinks much more."""
    import PIL
    return "pillow>=13" if int(PIL.__version__.split(".")[0]) >= 13 else "pillow<13"


def _vision_config_json(vcfg: VisionConfig, tok: ImageTokens, libs: dict, prefix: str, key_pos,
                        bos: int | None = None, weights: dict | None = None) -> dict:
    return {
        "version": "mcpm-export/vision/1",
        "function": FUNCTION,
        "inputs": {"patches": "float32 [N, 3*patch*patch]", "pos_interp": "float32 [N, pos_grid^2]",
                   "key_pos": "float32 [N, hidden]", "output": "float32 [query_num, hidden]",
                   "spec": "exporter/vision/preprocess.py"},
        "config": vcfg.to_dict(),
        "slicing": {"rule": "exporter/vision/slicing.py (OpenBMB slice_image)", "resize": "PIL bicubic",
                    "resize_pass_order": resize_pass_order(),
                    "enabled": vcfg.slicing, "max_slice_nums": vcfg.max_slice_nums,
                    "scale_resolution": vcfg.scale_resolution, "patch_size": vcfg.patch},
        "tokens": {"im_start": tok.im_start, "im_end": tok.im_end, "slice_start": tok.slice_start,
                   "slice_end": tok.slice_end, "unk": tok.unk, "newline": tok.newline, "bos": bos,
                   "layout": "[bos] <image> unk*Q </image> [<slice> rows of cells joined by newline </slice>] "
                             "newline text; features replace the unk embeddings after scale_emb"},
        "system_lib_prefix": prefix, "libs": libs,
        "params": "vision/params/tensor-cache.json (records in call order after the inputs)",
        "weights": weights or {"format": "fp32"},
        **({"key_pos": key_pos} if key_pos else {}),
    }


def weight_format(recipe, backend: str, option: str | None = None) -> tuple[str, str]:
    """(format, why): --vision-weights, else the recipe's vision.weights, else q8; OpenCL builds keep fp32
    (the int8 path is CPU microkernels only and the bundle has one vision params set)."""
    asked = option or (getattr(recipe, "vision", None) or {}).get("weights") or "q8"
    if asked not in WEIGHT_FORMATS:
        raise ExportError(f"vision weights: unknown format '{asked}' (known: {', '.join(WEIGHT_FORMATS)})")
    if asked == "q8" and backend != "cpu":
        return "fp32", f"--backend {backend}: the OpenCL vision build keeps fp32 weights (q8 is CPU only)"
    return asked, "requested" if option or asked != "q8" else "default"


def build_vision(checkpoint_dir: Path, recipe, staging: Path, platform: str, backend: str = "cpu",
                 soc: str = "generic", progress=None, weights: str | None = None) -> dict:
    """Compile, package and verify the vision part into ``staging``; returns manifest keys."""
    from targets.tvm import pipeline
    from targets.tvm.params import write_tensor_cache
    from targets.tvm.presets import get_preset

    say = (lambda stage, msg: progress.log(f"{stage}: {msg}")) if progress is not None else (lambda s, m: None)
    if platform not in pipeline.TRIPLES:
        raise ExportError(f"unknown TVM platform '{platform}'")
    if backend not in pipeline.BACKENDS:
        raise ExportError(f"--backend: unknown backend '{backend}' (known: {', '.join(pipeline.BACKENDS)})")
    ck = load_minicpmv(checkpoint_dir, recipe)
    vcfg, vision = ck.vision_config, ck.vision_model()
    text_tok = Tokenizer(ck.checkpoint.tokenizer_path)
    tok = ImageTokens.from_tokenizer(text_tok, ck.checkpoint.path / "tokenizer_config.json")
    triple, preset = pipeline.TRIPLES[platform], get_preset(soc)
    prefix = pipeline.system_lib_prefix(recipe.name) + "vision_"
    vdir = staging / VISION_DIR
    fmt, why = weight_format(recipe, backend, weights)
    say("vision", f"torch.export + relax import (ViT {vcfg.width}x{vcfg.depth}, resampler {vcfg.hidden}; "
                  f"{fmt} weights, {why})")
    n_fp32 = int(sum(p.numel() for p in VisionEncoder(vision).parameters()) * 4)
    mod, params = export_ir(vision, fmt)
    winfo = {"format": fmt, "reason": why, "bytes": int(sum(a.nbytes for _, a in params)), "fp32_bytes": n_fp32}
    if fmt == "q8":
        winfo.update(scheme="int8 [out, ceil32(in)] + float16 scale per 32 inputs; int8 activations per 32",
                     kernels="targets/tvm/microkernels/vq8_gemm.c vq8_*",
                     fp32="patch embedding, position embedding, biases, norms, resampler queries")
    libs = {}
    for b in pipeline.BACKENDS[backend]:
        say("vision", f"compile {b}: {triple}")
        target = pipeline.make_target(b, preset.llvm_target(triple))
        ex = compile_vision(mod, target, prefix=prefix)
        out = vdir / "lib" / b
        out.mkdir(parents=True, exist_ok=True)
        pipeline.save_tar(ex, out / "vision.tar")
        pipeline.save_so(ex, out / "vision.so", triple)
        libs[b] = {"tar": f"{VISION_DIR}/lib/{b}/vision.tar", "so": f"{VISION_DIR}/lib/{b}/vision.so"}
        if b == "opencl":
            src = pipeline.opencl_source(ex)
            if "__kernel" not in src:
                raise ExportError("vision opencl build produced no OpenCL kernels")
            (out / "kernels.cl").write_text(src)
            libs[b].update(source=f"{VISION_DIR}/lib/opencl/kernels.cl", executed=False)
    say("vision", "compile host (x86_64) for verification")
    host = pipeline.make_target("cpu", pipeline.HOST_TARGET)
    (vdir / "lib" / "host").mkdir(parents=True, exist_ok=True)
    pipeline.save_so(compile_vision(mod, host), vdir / "lib" / "host" / "vision.so", "x86_64")
    libs["host"] = {"so": f"{VISION_DIR}/lib/host/vision.so"}
    write_tensor_cache(params, vdir / "params", {"ParamSize": len(params),
                                                 "ParamBytes": int(sum(a.nbytes for _, a in params))})
    key_pos_info, key_pos = None, None
    if not vcfg.adaptive:
        g = vcfg.image_size // vcfg.patch
        key_pos = key_pos_table(vision, g, g).reshape(g * g, -1)
        key_pos.tofile(vdir / "key_pos.bin")
        key_pos_info = {"file": "key_pos.bin", "shape": list(key_pos.shape), "dtype": "float32"}
    (vdir / "vision-config.json").write_text(json.dumps(
        _vision_config_json(vcfg, tok, libs, prefix, key_pos_info, text_tok.bos_id, winfo), indent=2,
        sort_keys=True) + "\n")
    say("verify", "vision: host build vs PyTorch on a thumbnail-only and a sliced image")
    runner = VisionRunner(vdir / "lib" / "host" / "vision.so", [a for _, a in params], vcfg, key_pos)
    report = parity(runner, vision, params=params)
    say("verify", "vision max rel err " + ", ".join(f"{r['max_rel_err']:.1e}" for r in report["images"]))
    return {"vision": {"config": f"{VISION_DIR}/vision-config.json", "libs": libs, "weights": winfo,
                       "system_lib_prefix": prefix, "verification": report}}


def build_vision_part(ctx, staging: Path, platform: str) -> dict:
    """Hook for the android/harmony Target.build: ``if ctx.recipe.is_vision: extra.update(...)``."""
    return build_vision(Path(ctx.checkpoint.path), ctx.recipe, staging, platform,
                        ctx.options.get("backend", "cpu"), ctx.options.get("soc", "generic"), ctx.progress,
                        ctx.options.get("vision_weights"))


def image_prompt(tokenizer: Tokenizer, plan: ImagePlan, text: str, config_json=None) -> tuple[list[int], list[int]]:
    """Token ids of [bos] image-block newline text, and where each image's 64 features go."""
    return build_prompt(plan, ImageTokens.from_tokenizer(tokenizer, config_json), tokenizer.encode(text, bos=False),
                        tokenizer.bos_id)


def generate_with_image(model, ids: list[int], starts: list[int], feats: np.ndarray, query_num: int,
                        max_new_tokens: int, eos_id: int | None = None) -> dict:
    """Greedy generation with a compiled text model (targets/tvm/runner.TVMModel) and spliced
    image features: embed(ids) -> features replace the <unk> rows -> chunked prefill -> decode."""
    from exporter.vision.multimodal import splice

    check_generation(max_new_tokens, len(ids), model.context_window, "image prompt")
    gen = model.generate(ids, max_new_tokens, eos_id,
                         embed_hook=lambda embeds: splice(embeds, starts, feats, query_num))
    return {"tokens": gen.tokens, "logits": gen.logits, "prefill_s": gen.prefill_s, "decode_s": gen.decode_s}


def run_bundle_with_image(bundle: Path, image_path: Path, prompt: str, max_new_tokens: int = 32) -> dict:
    """`mcpm-export run BUNDLE --image PATH`: vision encode (per slice), prefill and decode timed apart."""
    from targets.tvm.runner import load_bundle

    check_generation(max_new_tokens)
    image = read_image(image_path, "--image ")
    vision = VisionRunner.from_bundle(Path(bundle))
    model, tok, conf = load_bundle(Path(bundle))
    plan, feats, times = vision.embed_image(image)
    ids, starts = image_prompt(tok, plan, prompt, Path(bundle) / "tokenizer_config.json")
    gen = generate_with_image(model, ids, starts, feats, vision.cfg.query_num, max_new_tokens,
                              conf.get("eos_token_id"))
    n_new = len(gen["tokens"])
    return {"bundle": str(bundle), "image": str(image_path), "plan": plan.to_dict(), "prompt_tokens": len(ids),
            "tokens": gen["tokens"], "text": tok.decode(gen["tokens"]),
            "vision_encode_s": [round(t, 4) for t in times], "vision_total_s": round(sum(times), 4),
            "prefill_s": round(gen["prefill_s"], 4), "prefill_tok_s": round(len(ids) / gen["prefill_s"], 2),
            "decode_tok_s": round((n_new - 1) / gen["decode_s"], 2) if n_new > 1 and gen["decode_s"] else 0.0,
            "backend": "host (x86_64 builds in lib/host and vision/lib/host)"}
