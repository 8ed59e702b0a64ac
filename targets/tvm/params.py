"""Weights for the TVM model: canonical tensors -> TVM parameter arrays -> TVM tensor cache.

Parameter names are the nn.Module paths of targets/tvm/model.py; the fused weights concatenate
canonical rows: ``attention.wqkv`` = wq;wk;wv, ``feed_forward.w13`` = w1;w3 (q4f16 rows are
independent, so concatenating packed rows is exact).

The on-disk format is TVM's tensor cache (``tensor-cache.json`` + ``params_shard_*.bin`` in the bundle root,
format "raw-shard", records in the order of the model's packed params tuple), readable by
``tvm.contrib.tvmjs.load_tensor_cache`` and the runtime's ``vm.builtin.tensor_cache.load``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from exporter.errors import ExportError
from exporter.quant import QTensor, QuantizedModel

SHARD_BYTES = 32 << 20

# fused TVM weight -> canonical weights whose rows it concatenates
FUSED = {"attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
         "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3")}


def _canonical_sources(module_path: str) -> list[str]:
    """'layers.3.attention.wqkv' -> ['layers.3.attention.wq.weight', ...]; others map 1:1."""
    for fused, parts in FUSED.items():
        if module_path.endswith(fused):
            stem = module_path[: -len(fused)]
            return [f"{stem}{p}.weight" for p in parts]
    return [module_path + ".weight"]


def _field(value, leaf: str) -> np.ndarray:
    """The array a parameter leaf ('q_weight', 'q_scale', 'weight') takes from one canonical tensor."""
    if isinstance(value, QTensor):
        if leaf == "weight":
            raise KeyError("quantized tensor where a plain weight was expected")
        return value.data if leaf == "q_weight" else value.scale
    if leaf != "weight":
        raise KeyError("plain tensor where a quantized weight was expected")
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def tvm_params(param_specs: list[tuple[str, tuple, str]], source: QuantizedModel | dict) -> list[tuple[str, np.ndarray]]:
    """Arrays for the model's params (name, shape, dtype), in order, from a QuantizedModel or an fp state dict."""
    tensors = source.tensors if isinstance(source, QuantizedModel) else source
    out = []
    for name, shape, dtype in param_specs:
        module_path, leaf = name.rsplit(".", 1)
        try:
            parts = [_field(tensors[c], leaf) for c in _canonical_sources(module_path)]
        except KeyError as e:
            raise ExportError(f"TVM parameter '{name}': no matching canonical tensor ({e})") from None
        arr = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        arr = np.ascontiguousarray(arr.astype(dtype, copy=False))
        if tuple(arr.shape) != tuple(shape):
            raise ExportError(f"TVM parameter '{name}': shape {tuple(arr.shape)}, model expects {tuple(shape)}")
        out.append((name, arr))
    return out


def write_tensor_cache(params: list[tuple[str, np.ndarray]], directory: Path, metadata: dict | None = None) -> None:
    """TVM tensor cache: params_shard_{i}.bin (<= 32 MB unless one tensor is larger) + tensor-cache.json.
    ``metadata`` defaults to MLC's {ParamSize, ParamBytes}. The one writer of the text and vision weights."""
    if metadata is None:
        metadata = {"ParamSize": len(params), "ParamBytes": int(sum(a.nbytes for _, a in params))}
    directory.mkdir(parents=True, exist_ok=True)
    shards, records, buf = [], [], bytearray()

    def flush():
        nonlocal records, buf
        if not records:
            return
        path = directory / f"params_shard_{len(shards)}.bin"
        path.write_bytes(buf)
        shards.append({"dataPath": path.name, "format": "raw-shard", "nbytes": len(buf),
                       "records": records, "md5sum": hashlib.md5(buf).hexdigest()})
        records, buf = [], bytearray()

    for name, arr in params:
        data = arr.tobytes()
        if buf and len(buf) + len(data) > SHARD_BYTES:
            flush()
        records.append({"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype), "format": "raw",
                        "nbytes": len(data), "byteOffset": len(buf)})
        buf += data
    flush()
    (directory / "tensor-cache.json").write_text(
        json.dumps({"metadata": metadata or {}, "records": shards}, indent=1))


def read_tensor_cache(directory: Path) -> list[tuple[str, np.ndarray]]:
    """(name, array) in record order; ExportError on a missing/short shard."""
    index = directory / "tensor-cache.json"
    try:
        info = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{index}: cannot read tensor cache ({e})") from None
    out = []
    for shard in info["records"]:
        path = directory / shard["dataPath"]
        raw = path.read_bytes() if path.is_file() else b""
        if len(raw) != shard["nbytes"]:
            raise ExportError(f"{path}: expected {shard['nbytes']} bytes, found {len(raw)}")
        for rec in shard["records"]:
            a = np.frombuffer(raw, dtype=rec["dtype"], count=int(np.prod(rec["shape"])), offset=rec["byteOffset"])
            out.append((rec["name"], a.reshape(rec["shape"])))
    return out
