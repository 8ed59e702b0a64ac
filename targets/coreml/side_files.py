"""The files beside MiniCPM.mlpackage in an ios bundle: what a Swift app reads besides the model.

- tokenizer.json + tokenizer_config.json (with the recipe's chat template, exporter/chat.py): what
  swift-transformers' `AutoTokenizer.from(modelFolder:)` loads (exporter/hf_tokenizer.py, checked
  against SentencePiece before it is written);
- generation_config.json: the checkpoint's, or BOS/EOS and the context window when it has none;
- tokenizer.model, special_tokens_map.json: the SentencePiece originals (other runtimes);
- config.json: the checkpoint's Hugging Face config;
- README.md: contract summary, memory budget and compute units of this bundle (docs/ios.md).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from exporter.chat import get_chat_template
from exporter.errors import ExportError
from exporter.hf_tokenizer import write_hf_tokenizer

from .budget import human_bytes

PACKAGE = "MiniCPM.mlpackage"
COPIED = ("tokenizer.model", "special_tokens_map.json", "generation_config.json")


def write_side_files(ctx, staging: Path) -> dict:
    """Write everything but the package; returns the manifest's description of them."""
    src, recipe, cfg = ctx.checkpoint.path, ctx.recipe, ctx.config
    for name in COPIED:
        if (src / name).is_file():
            shutil.copyfile(src / name, staging / name)
    if not (staging / "tokenizer.model").is_file():
        raise ExportError(f"{src}: tokenizer.model is missing")
    template = get_chat_template(recipe.conv_template)
    written = write_hf_tokenizer(staging / "tokenizer.model", staging, template.jinja(),
                                 model_max_length=recipe.context_window)
    if not (staging / "generation_config.json").is_file():
        (staging / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
             "max_length": recipe.context_window, "do_sample": False}, indent=2) + "\n")
    (staging / "config.json").write_text(json.dumps(ctx.checkpoint.raw_config, indent=2,
                                                    sort_keys=True) + "\n")
    return {"tokenizer": written, "tokenizer_library": "swift-transformers (AutoTokenizer.from(modelFolder:))",
            "chat_template": {"name": template.name, "stop_token_ids": list(template.stop_token_ids),
                              "stop_str": list(template.stop_str),
                              "bos": "not in the template: tokenizer.encode(text:) adds it, "
                                     "applyChatTemplate does not (prepend bos_token_id once)"},
            "generation_config": "generation_config.json"}


def write_readme(staging: Path, recipe, coreml: dict) -> None:
    """README.md of the bundle, from the manifest's "coreml" section."""
    mem, units, fns = coreml["memory"], coreml["compute_units"], coreml["functions"]
    gb = human_bytes
    prefill, decode = fns["prefill"], fns["decode"]
    state = decode["states"]["key_cache"]["shape"]
    ane = coreml.get("ane_head")
    lines = [
        f"# {recipe.name} for iOS (Core ML)", "",
        f"{recipe.description}. `{PACKAGE}`: ML Program for iOS {coreml['minimum_deployment_target'][3:]}+, "
        f"functions `prefill` and `decode` sharing weights and one state (`key_cache`, `value_cache` "
        f"float16 {state}). The complete Swift sample and the contract: docs/ios.md of mcpm-export.", "",
        "| function | inputs | output |", "|---|---|---|",
        f"| `prefill` | input_ids int32 {prefill['inputs']['input_ids']['shape']}, start_pos int32 [1], "
        f"last_index int32 [1] | logits float16 {prefill['outputs']['logits']['shape']} |",
        f"| `decode` | input_ids int32 [1, 1], start_pos int32 [1] | logits float16 "
        f"{decode['outputs']['logits']['shape']} |", "",
        f"Chunking: {coreml['chunking_rule']}", "",
        (f"Logits come in {ane['pieces']} rows of {ane['rows_per_piece']} (`--ane-head`): {ane['logits']}."
         if ane else "Logits: one row over the vocabulary."), "",
        "Tokenizer: `tokenizer.json` + `tokenizer_config.json` for swift-transformers "
        "(`AutoTokenizer.from(modelFolder:)`); `encode(text:)` adds BOS itself, `applyChatTemplate` does "
        f"not. Chat template `{coreml['files']['chat_template']['name']}` in tokenizer_config.json; stop at "
        f"token ids {coreml['files']['chat_template']['stop_token_ids']} (EOS).", "",
        "## Memory (estimate from the shapes, not measured on a device)", "",
        "| weights (weight.bin) | KV state, full context (per conversation) | working memory | peak |",
        "|---|---|---|---|",
        f"| {gb(mem['weights_bytes'])} | {gb(mem['kv_state_bytes'])} | {gb(mem['working_bytes'])} | "
        f"~{gb(mem['peak_bytes'])} |", "",
        "Check `os_proc_available_memory()` before loading; a 2B model needs the "
        "`com.apple.developer.kernel.increased-memory-limit` entitlement (docs/ios.md).", "",
        f"## Compute units: `{units['recommended']}`", "", units["reason"], "",
    ]
    (staging / "README.md").write_text("\n".join(lines))
