"""The ``ios`` target: a stateful, int4, two-function Core ML package plus tokenizer and config.

Bundle layout (docs/ios.md):
    MiniCPM.mlpackage/        functions prefill + decode, KV cache as Core ML states
    tokenizer.model (+ tokenizer_config.json, special_tokens_map.json, generation_config.json)
    config.json
    manifest.json             written by exporter/bundle.py after verification passed
"""
from __future__ import annotations

import gc
import json
import re
import shutil
import uuid
from pathlib import Path

from exporter.errors import ExportError
from exporter.quality import CALIBRATION_TEXT, QualityReport, gate, perplexity
from exporter.tokenizer import Tokenizer

from .prequant import QUANTIZER, input_covariance, prequantize_state_dict
from .convert import (BLOCK_SIZE, EMBEDDINGS, MIN_IOS, build_mlpackage, io_spec, spill_large,
                      spill_weights, weight_file)
from .verify import check, model_from_state, numerics, package_state_dict, structure
from .wrapper import CoreMLMiniCPM

PACKAGE = "MiniCPM.mlpackage"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
VERIFY_STEPS = 32
# Default embedding / tied head per scheme; the target option ``embedding`` (api.export(...,
# embedding="int8")) picks another of convert.EMBEDDINGS.
DEFAULT_EMBEDDING = {"q4f16": "int4", "q4f16_e8": "lut6"}

CHUNKING_RULE = (
    "Split the prompt into chunks of prefill_chunk tokens. For each chunk call 'prefill' with "
    "input_ids = the chunk right-padded with 0 to prefill_chunk, start_pos = number of tokens "
    "already in the cache, last_index = (real tokens in this chunk) - 1; the logits returned for "
    "the last chunk predict the first new token. Then call 'decode' once per new token with "
    "start_pos = tokens in the cache. Both functions share one MLState (key_cache, value_cache); "
    "padding written past the real tokens is masked and later overwritten. Requires "
    "start_pos + prefill_chunk <= context_window for prefill and start_pos < context_window for decode.")


def parse_deployment_target(value: str | int | None) -> int:
    """'iOS18' / 'ios18' / '18' -> 18; anything else is a one-line error."""
    text = str(value if value is not None else f"iOS{MIN_IOS}").strip()
    m = re.fullmatch(r"(?i)(?:ios)?\s*(\d+)(?:\.0)?", text)
    if not m:
        raise ExportError(f"--deployment-target '{text}': expected the form iOS18")
    return int(m.group(1))


class IOSTarget:
    name = "ios"
    allows_vision = False

    def check_options(self, recipe, options: dict) -> tuple[int, str | None]:
        """Refusals that need no model: vision recipes, too-old deployment targets, bad options.

        Returns (deployment target major version, embedding kind or None for fp16)."""
        deployment_target = options.get("deployment_target")
        if recipe.is_vision:
            raise ExportError(f"ios: recipe '{recipe.name}' is a vision model; the iOS target is "
                              f"text only (export it for android or harmony)")
        ios = parse_deployment_target(deployment_target)
        if recipe.quantization not in DEFAULT_EMBEDDING and recipe.quantization != "fp16":
            raise ExportError(f"ios: recipe '{recipe.name}' uses scheme '{recipe.quantization}', "
                              f"which the Core ML target does not support")
        embedding = DEFAULT_EMBEDDING.get(recipe.quantization)
        if options.get("embedding"):
            if embedding is None:
                raise ExportError(f"ios: recipe '{recipe.name}' keeps float16 weights; the embedding "
                                  f"option needs an int4 scheme")
            if options["embedding"] not in EMBEDDINGS:
                raise ExportError(f"ios: embedding '{options['embedding']}': expected one of "
                                  f"{', '.join(EMBEDDINGS)}")
            embedding = options["embedding"]
        if ios < MIN_IOS:
            why = ("int4 weights (constexpr_blockwise_shift_scale) need" if embedding
                   else "the stateful KV cache (Core ML states) needs")
            raise ExportError(f"ios: --deployment-target iOS{ios} is too old: {why} iOS {MIN_IOS} "
                              f"or newer (recipe '{recipe.name}', scheme {recipe.quantization})")
        return ios, embedding

    def build(self, ctx, staging: Path) -> dict:
        recipe, cfg = ctx.recipe, ctx.config
        ios, embedding = self.check_options(recipe, ctx.options)
        if ios != MIN_IOS:
            ctx.progress.log(f"note: the package targets iOS {MIN_IOS} (runs on iOS {ios})")
        package = staging / PACKAGE
        if embedding:
            with ctx.progress.stage("coreml load reference"):
                load_mapped_reference(ctx)
        source = ctx.reference
        n_params = sum(p.numel() for p in source.parameters())
        names = list(source.state_dict())
        if embedding:
            with ctx.progress.stage("coreml prequantize"):
                # Memory (docs/ios.md): the float32 reference's weights, and the GPTQ-rounded ones
                # as they are made, are mapped from files (same values) instead of held in memory.
                spill_weights(ctx.reference)     # no-op when load_mapped_reference built it
                tok = Tokenizer(ctx.tokenizer_path)
                calib = tok.encode(CALIBRATION_TEXT.read_text())
                cov = input_covariance(ctx.reference, calib, count=recipe.calibration_windows)
                ctx.progress.log(f"GPTQ rounding onto Core ML's int4 grid "
                                 f"({recipe.calibration_windows} calibration windows)")
                state = prequantize_state_dict(ctx.reference.state_dict(), cov, store=spill_large,
                                               consume=True)
                del cov, source
                # the GPTQ-rounded model replaces the reference (rebuilt on demand if needed
                # later) and holds the state's tensors themselves, no second copy
                release_reference(ctx)
                source = model_from_state(cfg, state)
                del state
        with ctx.progress.stage("coreml convert"):
            model = CoreMLMiniCPM(source, recipe.context_window,
                                  row_scaled_embedding=embedding == "lut6").eval()
            del source
            # spill the float32 weights to mapped files only when the model is this target's own
            # (with an int4 scheme); in fp16 its modules are ctx.reference's
            build_mlpackage(model, recipe.prefill_chunk, package, embedding,
                            progress=lambda _stage, msg: ctx.progress.log(msg),
                            spill=embedding is not None)
            del model
            gc.collect()
            deterministic_package_manifest(package)
        self._copy_side_files(ctx, staging)
        with ctx.progress.stage("coreml verify"):
            verification, quality = self._verify(ctx, package, embedding, names)
        wbytes = weight_file(package).stat().st_size
        ctx.progress.log(f"weight.bin {wbytes / 1e6:.2f} MB = {wbytes / n_params:.3f} bytes/parameter")
        embed = EMBEDDINGS[embedding] if embedding else {"scheme": "float16", "bits": 16}
        compression = ("none (float16)" if embedding is None else
                       f"linear weights int4 linear_symmetric per_block {BLOCK_SIZE}, values "
                       f"chosen beforehand by the shared GPTQ quantizer on Core ML's grid "
                       f"(exporter/quantizers.py, targets/coreml/prequant.py); embedding/head {embedding}")
        return {
            "backend": "coreml",
            "quantization": {"scheme": recipe.quantization, "coreml": compression,
                             "quantizer": QUANTIZER if embedding else "none",
                             "tool": "coremltools.optimize.coreml.linear_quantize_weights",
                             "block_size": BLOCK_SIZE, "embedding_bits": embed["bits"],
                             "embedding": {"kind": embedding or "fp16", **embed}},
            "quality": quality,
            "coreml": {
                "package": PACKAGE,
                "minimum_deployment_target": f"iOS{MIN_IOS}",
                "model_type": "mlprogram (multifunction)",
                "default_function": "decode",
                "functions": io_spec(cfg, recipe.context_window, recipe.prefill_chunk),
                "context_window": recipe.context_window,
                "prefill_chunk": recipe.prefill_chunk,
                "chunking_rule": CHUNKING_RULE,
                "pad_token_id": 0,
                "bos_token_id": cfg.bos_token_id,
                "eos_token_id": cfg.eos_token_id,
                "weight_bin_bytes": wbytes,
                "parameters": n_params,
                "bytes_per_parameter": round(wbytes / n_params, 4),
            },
            "verification": verification,
        }

    @staticmethod
    def _copy_side_files(ctx, staging: Path) -> None:
        src = ctx.checkpoint.path
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, staging / name)
        if not (staging / "tokenizer.model").is_file():
            raise ExportError(f"{src}: tokenizer.model is missing")
        (staging / "config.json").write_text(json.dumps(ctx.checkpoint.raw_config, indent=2,
                                                        sort_keys=True) + "\n")

    @staticmethod
    def _verify(ctx, package: Path, embedding, names: list[str]) -> tuple[dict, dict]:
        from .mil_interp import Interpreter

        recipe, cfg = ctx.recipe, ctx.config
        interp = Interpreter.from_package(package)
        facts = structure(interp, embedding) if embedding else {"functions": sorted(interp.program.functions)}
        tok = Tokenizer(ctx.tokenizer_path)
        calib = tok.encode(CALIBRATION_TEXT.read_text())
        n_prompt = min(recipe.prefill_chunk * 3 // 2 + 4, recipe.context_window - VERIFY_STEPS)
        report = numerics(interp, cfg, names, calib[:n_prompt], recipe.context_window,
                          recipe.prefill_chunk, VERIFY_STEPS,
                          progress=lambda _s, msg: ctx.progress.log(msg))
        check(report, package)
        ctx.progress.log(f"Core ML vs PyTorch int4 reference: {report.steps} greedy tokens identical, "
                         f"max |logit diff| {report.max_abs_logit_diff:.4f} (bound {report.logit_bound})")
        quality = dict(ctx.quality)
        gate_ids, windows = calib[512 * recipe.calibration_windows:], recipe.gate_windows
        if embedding and windows and len(gate_ids) >= 512:
            interp.drop_cache()     # the interpreter's float16 weights; the float32 model follows
            gc.collect()
            coreml_ref = model_from_state(cfg, package_state_dict(interp, names, store=spill_large))
            if not quality.get("ppl_fp"):
                load_mapped_reference(ctx)      # released after the GPTQ pass
            ppl_fp = quality.get("ppl_fp") or perplexity(ctx.reference, gate_ids, count=windows)
            ppl_q = perplexity(coreml_ref, gate_ids, count=windows)
            quality.update({"ppl_fp": round(ppl_fp, 4), "ppl_int4": round(ppl_q, 4),
                            "loss_pct": round(100 * (ppl_q / ppl_fp - 1), 3),
                            "int4_weights": "Core ML package (decompressed as Core ML does)"})
            if "ppl_int4" in ctx.quality:
                quality["ppl_int4_q4f16"] = ctx.quality["ppl_int4"]
            ctx.progress.log(f"perplexity fp {ppl_fp:.3f} -> Core ML int4 {ppl_q:.3f} "
                             f"({quality['loss_pct']:+.2f}%, limit {recipe.max_ppl_loss_pct}%)")
            gate(QualityReport(ppl_fp, ppl_q, windows * 512, windows,
                               f"{CALIBRATION_TEXT.name} (windows {recipe.calibration_windows}+), "
                               f"Core ML weights",
                               recipe.max_ppl_loss_pct),
                 override=bool(ctx.options.get("allow_quality_loss")))
        verification = {"method": "NumPy MIL interpreter (targets/coreml/mil_interp.py) vs PyTorch "
                                  "reference with the package's decompressed weights",
                        **report.to_dict(), "structure": {k: v for k, v in facts.items()
                                                          if k != "fp32_constants"}}
        return verification, quality


def load_mapped_reference(ctx) -> None:
    """Build ctx.reference (the float32 reference of the original weights) one tensor at a time,
    each large one mapped from a file (convert.spill_large), when it is not built yet.

    ExportContext.load_reference (MiniCPM.from_state_dict of the whole float32 state dict) holds two
    float32 copies at once, 21.8 GB for MiniCPM-2B; this holds about one tensor. Same tensors as
    Checkpoint.text_tensors (exporter/checkpoint.py); the ios target is text only (no prefix)."""
    ckpt = ctx.checkpoint
    if "reference" in ctx.__dict__ or not (hasattr(ckpt, "text_plan") and hasattr(ckpt, "getter")):
        return
    plan = ckpt.text_plan(ctx.config, "")
    get = ckpt.getter(plan)
    state = {canon: spill_large(get(canon)) for canon in sorted(plan)}
    ctx.__dict__["reference"] = model_from_state(ctx.config, state)


def release_reference(ctx) -> None:
    """Drop the context's cached float32 reference model (ExportContext.reference is a
    cached_property: the next use rebuilds it from the checkpoint)."""
    ctx.__dict__.pop("reference", None)
    gc.collect()


def deterministic_package_manifest(package: Path) -> None:
    """coremltools names package items with random UUIDs; derive them from the paths instead (and
    write the model spec's bytes in a canonical order)."""
    path = package / "Manifest.json"
    data = json.loads(path.read_text())
    remap = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, "mcpm-export:" + item["path"]))
             for old, item in data["itemInfoEntries"].items()}
    data["itemInfoEntries"] = {remap[k]: v for k, v in data["itemInfoEntries"].items()}
    data["rootModelIdentifier"] = remap[data["rootModelIdentifier"]]
    path.write_text(json.dumps(data, indent=4, sort_keys=True) + "\n")
    # protobuf writes map fields (function/attribute maps) in hash order, which changes from process to
    # process: re-serialize the spec deterministically (same message, canonical bytes).
    from coremltools.proto import Model_pb2
    for spec_path in package.glob("Data/com.apple.CoreML/*.mlmodel"):
        spec = Model_pb2.Model()
        spec.ParseFromString(spec_path.read_bytes())
        spec_path.write_bytes(spec.SerializeToString(deterministic=True))


IOS = IOSTarget()
