"""Find a checkpoint offline and read it lazily, one tensor at a time.

Resolution order: ``--checkpoint DIR``; the recipe's embedded copy; the Hugging Face cache
(HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub) in huggingface_hub's layout
``models--ORG--NAME/snapshots/REV`` with ``refs/main`` naming REV. The network is never touched.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from . import names
from .config import MiniCPMConfig, read_config_json
from .errors import ExportError
from .recipes import Recipe

TOKENIZER_FILES = ("tokenizer.model",)
OPTIONAL_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return list(dict.fromkeys(dirs))


def _snapshot_in_cache(cache: Path, repo_id: str) -> Path | None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = snaps / ref.read_text().strip()
        return snap if snap.is_dir() else None
    revs = sorted(p for p in snaps.iterdir() if p.is_dir())
    return revs[-1] if len(revs) == 1 else None


def resolve_checkpoint(recipe: Recipe, checkpoint: str | Path | None = None) -> Path:
    """The directory holding the recipe's checkpoint, or an ExportError naming every place looked."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if path.is_file():
            raise ExportError(f"--checkpoint {path}: is a file; give the checkpoint's folder (the one "
                              f"holding config.json and the safetensors shards)")
        if not path.is_dir():
            raise ExportError(f"--checkpoint {path}: no such directory")
        return path
    looked = []
    if recipe.embedded_path is not None:
        if recipe.embedded_path.is_dir():
            return recipe.embedded_path
        looked.append(str(recipe.embedded_path))
    for cache in hf_cache_dirs():
        snap = _snapshot_in_cache(cache, recipe.repo_id)
        if snap is not None:
            return snap
        looked.append(str(cache / ("models--" + recipe.repo_id.replace("/", "--"))))
    raise ExportError(f"checkpoint for '{recipe.repo_id}' not found offline (looked in: "
                      f"{'; '.join(looked)}); pass --checkpoint DIR")


@dataclass
class Checkpoint:
    """A checkpoint on disk; tensors are read lazily by ``tensors()``."""
    path: Path
    raw_config: dict
    shards: dict[str, Path]          # HF tensor name -> shard file
    tokenizer_path: Path

    def fingerprint(self) -> str:
        """sha256 over config, index and every shard's name and size (cheap, stable)."""
        h = hashlib.sha256(json.dumps(self.raw_config, sort_keys=True).encode())
        for shard in sorted(set(self.shards.values())):
            h.update(f"{shard.name}:{shard.stat().st_size}".encode())
        return h.hexdigest()

    def hf_items(self, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) for every key starting with prefix, one shard open at a time."""
        by_shard: dict[Path, list[str]] = {}
        for key, shard in sorted(self.shards.items()):
            if key.startswith(prefix):
                by_shard.setdefault(shard, []).append(key)
        for shard, keys in sorted(by_shard.items()):
            try:
                with safe_open(shard, framework="pt") as f:
                    present = set(f.keys())
                    for key in keys:
                        if key not in present:
                            raise ExportError(f"{shard}: tensor '{key}' listed in the index is missing")
                        yield key, require_finite(f.get_tensor(key), key, shard)
            except SafetensorError as e:
                raise ExportError(f"{shard}: corrupt or truncated safetensors shard ({e})") from None

    def text_plan(self, config: MiniCPMConfig, prefix: str = "") -> dict[str, tuple[Path, str]]:
        """canonical name -> (shard, HF key), validated from the shard headers alone (no tensor data):
        every key is consumed or explicitly ignored, none is missing, every shape fits config.json."""
        plan: dict[str, tuple[Path, str]] = {}
        for key, shard in sorted(self.shards.items()):
            if not key.startswith(prefix):
                continue
            canon = names.canonical_name(key, prefix)
            if canon is None:
                if names.is_ignored(key, prefix):
                    continue
                raise ExportError(f"{self.path}: checkpoint key '{key}' is not in the name table")
            plan[canon] = (shard, key)
        expected = expected_shapes(config)
        missing = sorted(set(expected) - set(plan))
        if missing == ["output.weight"]:
            raise ExportError(f"{self.path}: config.json has tie_word_embeddings=false but the checkpoint "
                              f"has no '{prefix}lm_head.weight' (the untied output head)")
        if missing:
            raise ExportError(f"{self.path}: checkpoint lacks tensor '{missing[0]}' ({len(missing)} missing)")
        extra = sorted(set(plan) - set(expected))
        if extra:
            raise ExportError(f"{self.path}: tensor '{extra[0]}' does not fit config.json "
                              f"(layers={config.num_hidden_layers}, tied={config.tie_word_embeddings})")
        shapes = {}
        for shard in sorted({s for s, _ in plan.values()}):
            shapes.update({(shard, k): tuple(v["shape"]) for k, v in _read_header(shard)[1].items()
                           if k != "__metadata__"})
        for canon, (shard, key) in sorted(plan.items()):
            if (shard, key) not in shapes:
                raise ExportError(f"{shard}: tensor '{key}' listed in the index is missing")
            if shapes[shard, key] != expected[canon]:
                raise ExportError(f"{shard}: tensor '{key}' ({canon}) has shape {shapes[shard, key]}, "
                                  f"config.json implies {expected[canon]}")
        return plan

    def getter(self, plan: dict[str, tuple[Path, str]], dtype: torch.dtype = torch.float32):
        """A function reading one canonical tensor at a time (bounded memory)."""
        def get(canon: str) -> torch.Tensor:
            shard, key = plan[canon]
            try:
                with safe_open(shard, framework="pt") as f:
                    return require_finite(f.get_tensor(key), key, shard).to(dtype)
            except SafetensorError as e:
                raise ExportError(f"{shard}: corrupt or truncated safetensors shard ({e})") from None
        return get

    def text_tensors(self, config: MiniCPMConfig, prefix: str = "",
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Canonical-name state dict of the text model, all in memory (small models, tests)."""
        plan = self.text_plan(config, prefix)
        get = self.getter(plan, dtype)
        return {canon: get(canon) for canon in sorted(plan)}


def require_finite(t: torch.Tensor, key: str, shard: Path) -> torch.Tensor:
    """Refuse NaN / Inf weights where they are read (one min/max pass, no temporary copy)."""
    if t.is_floating_point() and t.numel():
        lo, hi = t.aminmax()
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            bad = t.float().isnan().sum().item(), t.float().isinf().sum().item()
            raise ExportError(f"{shard}: tensor '{key}' holds non-finite weights ({bad[0]} NaN, {bad[1]} Inf); "
                              f"the checkpoint is damaged")
    return t


def expected_shapes(config: MiniCPMConfig) -> dict[str, tuple[int, ...]]:
    h, hd, L = config.hidden_size, config.head_dim, config.num_hidden_layers
    q, kv, inter = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.intermediate_size
    shapes = {"tok_embeddings.weight": (config.vocab_size, h), "norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["output.weight"] = (config.vocab_size, h)
    for i in range(L):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (h,), p + "ffn_norm.weight": (h,),
            p + "attention.wq.weight": (q, h), p + "attention.wk.weight": (kv, h),
            p + "attention.wv.weight": (kv, h), p + "attention.wo.weight": (h, q),
            p + "feed_forward.w1.weight": (inter, h), p + "feed_forward.w3.weight": (inter, h),
            p + "feed_forward.w2.weight": (h, inter),
        })
    return shapes


def open_checkpoint(path: Path, recipe: Recipe | None = None) -> Checkpoint:
    """Validate the directory layout and config against the recipe; read no tensor data yet."""
    raw = read_config_json(path / "config.json")
    if recipe is not None:
        archs = raw.get("architectures") or [raw.get("model_type", "?")]
        if recipe.architecture not in archs:
            raise ExportError(f"{path / 'config.json'}: architecture {archs[0]} is not "
                              f"{recipe.architecture}, which recipe '{recipe.name}' expects")
        for key, want in recipe.dims.items():
            got = raw.get(key, (raw.get("llm_config") or {}).get(key))
            if got != want:
                raise ExportError(f"{path / 'config.json'}: {key}={got}, recipe '{recipe.name}' "
                                  f"expects {want}")
    index = path / "model.safetensors.index.json"
    shards: dict[str, Path] = {}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise ExportError(f"{index}: not a valid safetensors index") from None
        for key, fname in weight_map.items():
            shard = path / fname
            if not shard.is_file():
                raise ExportError(f"{shard}: shard named in {index.name} is missing")
            shards[key] = shard
    elif (path / "model.safetensors").is_file():
        single = path / "model.safetensors"
        shards = {k: single for k in _read_header(single)[1] if k != "__metadata__"}
    else:
        raise ExportError(f"{path}: no model.safetensors or model.safetensors.index.json")
    for shard in set(shards.values()):
        _check_shard_header(shard)
    tok = path / "tokenizer.model"
    if not tok.is_file():
        raise ExportError(f"{tok}: tokenizer.model (SentencePiece) is missing")
    return Checkpoint(path=path, raw_config=raw, shards=shards, tokenizer_path=tok)


# safetensors dtype -> bytes per element
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
               "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _read_header(shard: Path) -> tuple[int, dict]:
    """(header length, header) of a safetensors file, every entry checked: a JSON object of
    {dtype, shape, data_offsets} whose byte range fits the dtype and shape."""
    size = shard.stat().st_size
    try:
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length exceeds file size")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        for key, v in header.items():
            if key == "__metadata__":
                if not (isinstance(v, dict) and all(isinstance(x, str) for x in v.values())):
                    raise ValueError("__metadata__ must map names to strings")
            elif not _entry_ok(v):
                raise ValueError(f"bad entry for tensor '{key}'")
    except (ValueError, RecursionError) as e:
        raise ExportError(f"{shard}: corrupt safetensors shard ({e})") from None
    return n, header


def _entry_ok(v) -> bool:
    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0
    if not (isinstance(v, dict) and isinstance(v.get("dtype"), str) and v["dtype"] in DTYPE_BYTES
            and isinstance(v.get("shape"), list)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2):
        return False
    (a, b), shape = v["data_offsets"], v["shape"]
    if not (all(map(is_int, shape)) and is_int(a) and is_int(b) and a <= b):
        return False
    return b - a == math.prod(shape) * DTYPE_BYTES[v["dtype"]]


def _check_shard_header(shard: Path) -> None:
    """Catch truncation up front: the header's data offsets must fit in the file."""
    size = shard.stat().st_size
    n, header = _read_header(shard)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ExportError(f"{shard}: truncated or corrupt shard: {size} bytes on disk, "
                          f"header describes {8 + n + end}")
