"""The ``ios`` target: a stateful, int4, two-function Core ML package plus tokenizer and config.

Bundle layout (docs/ios.md):
    MiniCPM.mlpackage/        functions prefill + decode, KV cache as Core ML states
    tokenizer.json, tokenizer_config.json (chat template), generation_config.json   (swift-transformers)
    tokenizer.model (+ special_tokens_map.json)                                      (SentencePiece)
    config.json, README.md    (memory budget, compute units)
    manifest.json             written by exporter/bundle.py after verification passed
"""
from __future__ import annotations

import gc
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from exporter.errors import ExportError
from exporter.quality import CALIBRATION_TEXT
from exporter.quant import SCHEMES, Scheme, dequantize
from exporter.tokenizer import Tokenizer
from targets.base import ExportPlan, Quantization, check_choices

from .budget import compute_units, memory_budget
from .convert import build_mlpackage, io_spec, spill_large, weight_file
from .options import ANE_MAX_DIM, BLOCK_SIZE, EMBEDDINGS, MIN_IOS, IOSOptions, IOSSettings
from .palettize import Lut6Codec
from .side_files import PACKAGE, write_readme, write_side_files
from .verify import TOLERANCE, check, model_from_state, numerics, structure
from .wrapper import CoreMLMiniCPM, head_pieces

VERIFY_STEPS = 32
# Default embedding / tied head per scheme; the target option ``embedding`` (api.export(...,
# embedding="int8")) picks another of convert.EMBEDDINGS.
DEFAULT_EMBEDDING = {"q4f16": "int4", "q4f16_e8": "lut6"}
COMPRESSION = (f"linear weights: the central quantizer's q4f16 codes and float16 scales as int4 "
               f"constexpr_blockwise_shift_scale per_block {BLOCK_SIZE} (targets/coreml/shipped.py); "
               f"embedding/head per quantization.embedding")

CHUNKING_RULE = (
    "Split the prompt into chunks of prefill_chunk tokens. For each chunk call 'prefill' with "
    "input_ids = the chunk right-padded with 0 to prefill_chunk, start_pos = number of tokens "
    "already in the cache, last_index = (real tokens in this chunk) - 1; the logits returned for "
    "the last chunk predict the first new token. Then call 'decode' once per new token with "
    "start_pos = tokens in the cache. Both functions share one MLState (key_cache, value_cache); "
    "padding written past the real tokens is masked and later overwritten. Requires "
    "start_pos + prefill_chunk <= context_window for prefill and start_pos < context_window for decode: "
    "once a padded chunk would pass the window, feed the remaining tokens to 'decode' one at a time; "
    "generation may continue until all context_window slots hold tokens.")


def parse_deployment_target(value: str | int | None) -> int:
    """'iOS18' / 'ios18' / '18' -> 18; anything else is a one-line error."""
    text = str(value if value is not None else f"iOS{MIN_IOS}").strip()
    m = re.fullmatch(r"(?i)(?:ios)?\s*(\d+)(?:\.0)?", text)
    if not m:
        raise ExportError(f"--deployment-target '{text}': expected the form iOS18")
    return int(m.group(1))


# What the centre quantizes per embedding kind: int4 and int8 are the schemes' own codes (shipped
# exactly, targets/coreml/shipped.py); lut6 keeps the embedding for the target's palette codec.
LUT6_SCHEME = Scheme("q4f16_lut6", 4, None, "int4 group-32 linears (q4f16 codes); embedding/tied head "
                                            "6-bit palettized (targets/coreml/palettize.py)")
SCHEME_FOR = {"int4": SCHEMES["q4f16"], "int8": SCHEMES["q4f16_e8"], "lut6": LUT6_SCHEME, None: SCHEMES["fp16"]}


class IOSTarget:
    name = "ios"
    Options = IOSOptions

    def plan(self, recipe, options: IOSOptions) -> ExportPlan:
        """Refusals that need no model (vision recipes, too-old deployment targets, bad options), and
        what the centre quantizes for this package."""
        check_choices(options, self.name)
        if recipe.is_vision:
            raise ExportError(f"ios: recipe '{recipe.name}' is a vision model; the iOS target is "
                              f"text only (export it for android or harmony)")
        ios = parse_deployment_target(options.deployment_target)
        if recipe.quantization not in DEFAULT_EMBEDDING and recipe.quantization != "fp16":
            raise ExportError(f"ios: recipe '{recipe.name}' uses scheme '{recipe.quantization}', "
                              f"which the Core ML target does not support")
        embedding = DEFAULT_EMBEDDING.get(recipe.quantization)
        if options.embedding:
            if embedding is None:
                raise ExportError(f"ios: recipe '{recipe.name}' keeps float16 weights; the embedding "
                                  f"option needs an int4 scheme")
            embedding = options.embedding
        if ios < MIN_IOS:
            why = ("int4 weights (constexpr_blockwise_shift_scale) need" if embedding
                   else "the stateful KV cache (Core ML states) needs")
            raise ExportError(f"ios: --deployment-target iOS{ios} is too old: {why} iOS {MIN_IOS} "
                              f"or newer (recipe '{recipe.name}', scheme {recipe.quantization})")
        head_rows = None
        if options.ane_head or options.ane_head_rows:
            head_rows = options.ane_head_rows or ANE_MAX_DIM
            if not isinstance(head_rows, int) or not 1 <= head_rows <= ANE_MAX_DIM:
                raise ExportError(f"ios: ane_head_rows must be an integer in 1..{ANE_MAX_DIM}, got {head_rows!r}")
        embed = EMBEDDINGS[embedding] if embedding else {"scheme": "float16", "bits": 16}
        notes = (("embedding_bits", embed["bits"]), ("embedding", {"kind": embedding or "fp16", **embed}),
                 ("block_size", BLOCK_SIZE), ("coreml", COMPRESSION if embedding else "none (float16)"))
        codecs = (("tok_embeddings.weight", Lut6Codec()),) if embedding == "lut6" else ()
        return ExportPlan(self.name, Quantization(SCHEME_FOR[embedding], recipe.quantizer, codecs, notes),
                          ("text",), VERIFY_STEPS, TOLERANCE, options,
                          IOSSettings(ios, embedding, head_rows))

    def build(self, ctx, staging: Path) -> dict:
        recipe, cfg, opts = ctx.recipe, ctx.config, ctx.plan.settings
        embedding = opts.embedding
        if opts.deployment_target != MIN_IOS:
            ctx.progress.log(f"note: the package targets iOS {MIN_IOS} (runs on iOS {opts.deployment_target})")
        package = staging / PACKAGE
        tensors = ctx.quantized.tensors
        names = list(tensors)
        with ctx.progress.stage("coreml convert"):
            n_params = convert_weights(tensors, cfg, recipe.context_window, recipe.prefill_chunk, package,
                                       embedding, opts.head_rows, lambda _stage, msg: ctx.progress.log(msg))
            deterministic_package_manifest(package)
        files = write_side_files(ctx, staging)
        with ctx.progress.stage("coreml verify"):
            verification = self._verify(ctx, package, opts, names)
        wbytes = weight_file(package).stat().st_size
        budget = memory_budget(cfg, recipe.context_window, recipe.prefill_chunk, weights=wbytes)
        units = compute_units(verification["structure"]["max_tensor_dim"], embedding, bool(opts.head_rows))
        ctx.progress.log(f"memory: {budget.summary()}; compute units {units.recommended}")
        logits_shape = ([1, *head_pieces(cfg.vocab_size, opts.head_rows)] if opts.head_rows
                        else [1, 1, cfg.vocab_size])
        ctx.progress.log(f"weight.bin {wbytes / 1e6:.2f} MB = {wbytes / n_params:.3f} bytes/parameter")
        result = {
            "backend": "coreml",
            "coreml": {
                "package": PACKAGE,
                "minimum_deployment_target": f"iOS{MIN_IOS}",
                "model_type": "mlprogram (multifunction)",
                "default_function": "decode",
                "functions": io_spec(cfg, recipe.context_window, recipe.prefill_chunk, logits_shape),
                "vocab_size": cfg.vocab_size,
                "ane_head": ({"pieces": logits_shape[1], "rows_per_piece": logits_shape[2],
                              "logits": "token id = p * rows_per_piece + r; ids >= vocab_size are "
                                        "padding (-1e4)"} if opts.head_rows else None),
                "compute_units": units.to_dict(),
                "memory": budget.to_dict(),
                "files": files,
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
        write_readme(staging, recipe, result["coreml"])
        return result

    @staticmethod
    def _verify(ctx, package: Path, opts: IOSSettings, names: list[str]) -> dict:
        from .mil_interp import Interpreter
        from .verify import max_tensor_dim

        recipe, cfg, embedding = ctx.recipe, ctx.config, opts.embedding
        interp = Interpreter.from_package(package)
        if embedding:
            facts = structure(interp, embedding, opts.head_rows)
        else:
            (largest, where), limit = max_tensor_dim(interp), opts.head_rows
            if limit and largest > limit:
                raise ExportError(f"Core ML package has a tensor dimension {largest} > {limit} ({where})")
            facts = {"functions": sorted(interp.program.functions), "max_tensor_dim": largest}
        tok = Tokenizer(ctx.tokenizer_path)
        calib = tok.encode(CALIBRATION_TEXT.read_text())
        n_prompt = min(recipe.prefill_chunk * 3 // 2 + 4, recipe.context_window - VERIFY_STEPS)
        report = numerics(interp, cfg, names, calib[:n_prompt], recipe.context_window,
                          recipe.prefill_chunk, ctx.plan.verify_tokens,
                          progress=lambda _s, msg: ctx.progress.log(msg))
        check(report, package)
        ctx.progress.log(f"Core ML vs PyTorch int4 reference: {report.steps} greedy tokens identical, "
                         f"max |logit diff| {report.max_abs_logit_diff:.4f} (bound {report.logit_bound})")
        return {"method": "NumPy MIL interpreter (targets/coreml/mil_interp.py) vs PyTorch "
                          "reference with the package's decompressed weights",
                "weights": "the centrally quantized and gated weights (targets/coreml/shipped.py: same codes "
                           "and scales, decompressed in float16)",
                **report.to_dict(), "structure": {k: v for k, v in facts.items() if k != "fp32_constants"}}


def convert_weights(tensors: dict, cfg, context: int, chunk: int, package: Path, embedding: str | None,
                    head_rows: int | None = None, progress=lambda stage, msg: None) -> int:
    """The .mlpackage holding ``tensors`` (QuantizedModel.tensors as shipped: QTensor codes and scales,
    the Lut6 embedding, float16 arrays); returns the parameter count.

    Memory (docs/ios.md): the weights, dequantized to float32 one tensor at a time for torch.export,
    are mapped from files (convert.spill_large), not held in memory."""
    source = model_from_state(cfg, {n: spill_large(torch.from_numpy(dequantize(t))) for n, t in tensors.items()})
    n_params = sum(p.numel() for p in source.parameters())
    lut = tensors["tok_embeddings.weight"] if embedding == "lut6" else None
    split = (torch.from_numpy(lut.rows()), torch.from_numpy(lut.row_scale.astype("float32"))) if lut else None
    model = CoreMLMiniCPM(source, context, row_scaled_embedding=embedding == "lut6", head_rows=head_rows,
                          row_split=split).eval()
    del source, split
    build_mlpackage(model, chunk, package, embedding, progress=progress, spill=True, weights=tensors)
    del model
    gc.collect()
    return n_params


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
