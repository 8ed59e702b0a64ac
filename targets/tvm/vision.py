"""The vision component of the android / harmony TVM bundles (MiniCPM-V), next to the text component.

The export form of the vision encoder + resampler (exporter/vision/model.py:VisionEncoder) is
traced with torch.export (one dynamic dim: the patch count N = h*w, so every slice shape the
planner produces runs on one library, no buckets) and imported with
tvm.relax.frontend.torch.from_exported_program, then lowered by the text model's compile pipeline
(targets/tvm/pipeline.compile_ir with ``dynamic_shapes`` and the CPU matmul schedule of
vision_schedule.py) for the same targets plus x86_64 for host verification; the weights go through
the same tensor-cache writer (params.write_tensor_cache). The host runtime is
targets/tvm/runner.VisionRunner; parity uses exporter/parity.compare. N has no upper bound: TVM
allocates the N-sized intermediates at run time (a bound would make its static planner reserve the
worst case, e.g. N^2 attention). The export hands over its opened checkpoint (ctx.checkpoint).

Bundle additions (next to the text model's files in the same staging directory)::

  vision/lib/<backend>/vision.tar|so   function ``image_embed(patches, pos_interp, key_pos, params)``
  vision/lib/host/vision.so            x86_64 build: export-time parity check and ``mcpm-export run``
  vision/params/                       TVM tensor cache of vpm.* / resampler.* (float32)
  vision/vision-config.json            config, slicing rule, special token ids (incl. bos), input spec
  vision/key_pos.bin                   V1 only: fixed float32 [N, hidden] resampler key positions
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from exporter.checkpoint import Checkpoint
from exporter.errors import ExportError
from exporter.parity import Tolerance, compare
from exporter.tokenizer import Tokenizer
from exporter.vision import preprocess as pp
from exporter.vision.config import VisionConfig
from exporter.vision.loader import MiniCPMVCheckpoint, load_minicpmv, minicpmv_checkpoint
from exporter.vision.model import MiniCPMVVision, VisionEncoder, key_pos_table
from exporter.vision.slicing import ImageTokens, plan_image, slice_images

from . import pipeline, vision_q8
from .params import write_tensor_cache
from .presets import get_preset
from .runner import VISION_DIR, VISION_FUNCTION as FUNCTION, VisionRunner
from .vision_schedule import schedule_matmuls

PARITY_RTOL = 1e-3      # max |tvm - torch| / max |torch| per image; measured ~1e-6 on the tiny model
# q8 weights (targets/tvm/vision_q8.py): vs PyTorch on the same dequantized weights the only difference is the
# int8 activation rounding (measured 8e-3 tiny V2, see bench/RESULTS.md for the real width); vs the fp32
# reference the weight rounding adds to it (measured 1.2e-2 tiny V2).
PARITY_RTOL_Q8, PARITY_RTOL_Q8_FP32 = 3e-2, 6e-2
VERIFY_SIZES = [(400, 300), (896, 448)]   # thumbnail only; thumbnail + 2x1 slices
WEIGHT_FORMATS = ("q8", "fp32")          # recipe vision.weights / vision_weights; default q8
_dynamic_reduction = pipeline._dynamic_reduction   # the guard compile_ir(dynamic_shapes=True) applies


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
        mod, params, _ = vision_q8.quantize_ir(mod, params)
    func = mod["main"].with_attr("global_symbol", FUNCTION).with_attr("num_input", 3)
    mod = tvm.IRModule({relax.GlobalVar(FUNCTION): func,
                        **{gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"}})
    mod = relax.transform.BundleModelParams("params")(mod)      # params: one tuple, last argument
    return mod, params


def compile_vision(mod: tvm.IRModule, target: tvm.target.Target, prefix: str | None = None) -> relax.VMExecutable:
    """The text model's pipeline (pipeline.compile_ir) for the vision graph: no int4 kernels; q8 weights
    bound to the microkernels first (CPU only); matmuls scheduled by vision_schedule.py on CPUs, by
    dlight on GPUs except those reducing over the dynamic patch count (``dynamic_shapes``)."""
    if vision_q8.has_q8(mod):
        if target.kind.name != "llvm":
            raise ExportError(f"vision q8 weights run on the CPU microkernels only, not on '{target.kind.name}'")
        mod = vision_q8.bind_kernels(mod, target)
    return pipeline.compile_ir(mod, target, prefix=prefix, use_kernels=False, dynamic_shapes=True,
                               cpu_schedule=schedule_matmuls)


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

    out = copy.deepcopy(vision)
    out.load_state_dict(vision_q8.dequantized_state(vision.state_dict(), params))
    return out.eval()


def parity(runner: VisionRunner, vision: MiniCPMVVision, sizes=VERIFY_SIZES,
           params: list[tuple[str, np.ndarray]] | None = None) -> dict:
    """Compiled-vs-PyTorch features over test images (exporter/parity.compare, one step per image size);
    ExportError beyond the bound.

    fp32 weights: against the fp32 reference within PARITY_RTOL. q8 weights (``params`` has ``*.q8``
    tensors): against PyTorch with the same dequantized weights within PARITY_RTOL_Q8 and against the
    fp32 reference within PARITY_RTOL_Q8_FP32."""
    q8 = params is not None and any(name.endswith(".q8") for name, _ in params)
    deq = dequantized_vision(vision, params) if q8 else None
    fp32 = Tolerance(rtol=PARITY_RTOL_Q8_FP32 if q8 else PARITY_RTOL, tokens_must_match=False,
                     reference="PyTorch fp32", quantity="image features")
    on_q8 = Tolerance(rtol=PARITY_RTOL_Q8, tokens_must_match=False,
                      reference="PyTorch on the dequantized q8 weights", quantity="image features")
    rows = []
    for w, h in sizes:
        img = synthetic_image(w, h)
        plan, got, _ = runner.embed_image(img)
        vs_fp32 = compare([got], [reference_features(vision, img)], fp32)
        row = {"size": [w, h], "images": len(plan.images), "max_rel_err": vs_fp32.max_rel_err}
        checks = [vs_fp32]
        if q8:
            vs_q8 = compare([got], [reference_features(deq, img)], on_q8)
            row = {**row, "max_rel_err_fp32": row["max_rel_err"], "max_rel_err": vs_q8.max_rel_err}
            checks.insert(0, vs_q8)
        rows.append(row)
        for report in checks:
            report.check(f"vision verification failed: {w}x{h} image")
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


def build_vision(checkpoint: Path | Checkpoint | MiniCPMVCheckpoint, recipe, staging: Path, platform: str,
                 backend: str = "cpu", soc: str = "generic", progress=None, weights: str | None = None) -> dict:
    """Compile, package and verify the vision part into ``staging``; returns manifest keys.
    ``checkpoint``: the export's opened checkpoint (or a MiniCPM-V view of it, or a directory)."""
    say = (lambda stage, msg: progress.log(f"{stage}: {msg}")) if progress is not None else (lambda s, m: None)
    if platform not in pipeline.TRIPLES:
        raise ExportError(f"unknown TVM platform '{platform}'")
    if backend not in pipeline.BACKENDS:
        raise ExportError(f"--backend: unknown backend '{backend}' (known: {', '.join(pipeline.BACKENDS)})")
    ck = (checkpoint if isinstance(checkpoint, MiniCPMVCheckpoint) else
          minicpmv_checkpoint(checkpoint, recipe) if isinstance(checkpoint, Checkpoint) else
          load_minicpmv(Path(checkpoint), recipe))
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
        libs[b] = pipeline.save_library(compile_vision(mod, target, prefix=prefix), vdir / "lib" / b, "vision",
                                        triple, f"{VISION_DIR}/lib/{b}", b, check_opencl=False, what="vision ")
    say("vision", "compile host (x86_64) for verification")
    host = pipeline.make_target("cpu", pipeline.HOST_TARGET)
    (vdir / "lib" / "host").mkdir(parents=True, exist_ok=True)
    pipeline.save_so(compile_vision(mod, host), vdir / "lib" / "host" / "vision.so", "x86_64")
    libs["host"] = {"so": f"{VISION_DIR}/lib/host/vision.so"}
    write_tensor_cache(params, vdir / "params")
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
