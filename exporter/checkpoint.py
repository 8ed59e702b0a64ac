"""Find a checkpoint offline and read it lazily, one tensor at a time.

Resolution order: ``--checkpoint DIR``; the recipe's embedded copy; the Hugging Face cache
(HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub) in huggingface_hub's layout
``models--ORG--NAME/snapshots/REV`` with ``refs/main`` naming REV. The network is never touched.
"""
from __future__ import annotations

import hashlib
import json
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
                        yield key, f.get_tensor(key)
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
                raise ExportError(f"{self.path}: tensor '{canon}' has shape {shapes[shard, key]}, "
                                  f"config.json implies {expected[canon]}")
        return plan

    def getter(self, plan: dict[str, tuple[Path, str]], dtype: torch.dtype = torch.float32):
        """A function reading one canonical tensor at a time (bounded memory)."""
        def get(canon: str) -> torch.Tensor:
            shard, key = plan[canon]
            try:
                with safe_open(shard, framework="pt") as f:
                    return f.get_tensor(key).to(dtype)
            except SafetensorError as e:
                raise ExportError(f"{shard}: corrupt or truncated safetensors shard ({e})") from None
        return get

    def text_tensors(self, config: MiniCPMConfig, prefix: str = "",
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Canonical-name state dict of the text model, all in memory (small models, tests)."""
        plan = self.text_plan(config, prefix)
        get = self.getter(plan, dtype)
        return {canon: get(canon) for canon in sorted(plan)}


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
        try:
            with safe_open(single, framework="pt") as f:
                shards = {k: single for k in f.keys()}
        except SafetensorError as e:
            raise ExportError(f"{single}: corrupt or truncated safetensors file ({e})") from None
    else:
        raise ExportError(f"{path}: no model.safetensors or model.safetensors.index.json")
    for shard in set(shards.values()):
        _check_shard_header(shard)
    tok = path / "tokenizer.model"
    if not tok.is_file():
        raise ExportError(f"{tok}: tokenizer.model (SentencePiece) is missing")
    return Checkpoint(path=path, raw_config=raw, shards=shards, tokenizer_path=tok)


def _read_header(shard: Path) -> tuple[int, dict]:
    """(header length, header) of a safetensors file."""
    size = shard.stat().st_size
    try:
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length exceeds file size")
            return n, json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{shard}: corrupt safetensors shard ({e})") from None


def _check_shard_header(shard: Path) -> None:
    """Catch truncation up front: the header's data offsets must fit in the file."""
    size = shard.stat().st_size
    n, header = _read_header(shard)
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError) as e:
        raise ExportError(f"{shard}: corrupt safetensors shard (bad entry: {e})") from None
    if 8 + n + end != size:
        raise ExportError(f"{shard}: truncated or corrupt shard: {size} bytes on disk, "
                          f"header describes {8 + n + end}")
