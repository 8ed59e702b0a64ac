"""MiniCPM decoder as an ONNX graph with int4 MatMulNBits (com.microsoft), for bench/decode_host.py.

The same q4f16 weights as the TVM build (docs/DESIGN.md): the packed uint32 rows viewed as bytes are
exactly MatMulNBits' [N, K/32, 16] blob layout (element 2j in the low nibble of byte j), zero point 7
(packed 0x77), fp32 scales, accuracy_level 4 (int8 activations, ORT's fastest CPU path). q/k/v and
gate/up are row-concatenated like the TVM model. Attention is plain ONNX ops over an explicit past KV
(inputs past_k{i}/past_v{i} [1, kv_heads, T, head_dim], outputs present_*), RoPE via cos/sin inputs,
a causal mask input; the embedding lookup stays outside (the caller feeds embeds), as in the TVM model.
Only the last position reaches the LM head.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.config import MiniCPMConfig
from exporter.quant import QTensor, QuantizedModel


class _G:
    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, arr: np.ndarray, name: str | None = None) -> str:
        self.n += 1
        name = name or f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, kind: str, inputs: list[str], domain: str = "", **attrs) -> str:
        self.n += 1
        out = f"t{self.n}"
        self.nodes.append(helper.make_node(kind, inputs, [out], domain=domain or None, **attrs))
        return out

    def matmul_q4(self, x: str, q: QTensor) -> str:
        n, k = q.shape
        blob = q.data.view(np.uint8).reshape(n, k // 32, 16)
        zp = np.full((n * ((k // 32 + 1) // 2),), 0x77, dtype=np.uint8)
        return self.op("MatMulNBits", [x, self.const(blob), self.const(q.scale.astype(np.float32).reshape(-1)),
                                       self.const(zp)], domain="com.microsoft", K=k, N=n, bits=4,
                       block_size=32, accuracy_level=4)

    def rms(self, x: str, w: np.ndarray, eps: float) -> str:
        ms = self.op("ReduceMean", [self.op("Mul", [x, x]), self.const(np.array([-1], np.int64))], keepdims=1)
        inv = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [ms, self.const(np.array(eps, np.float32))])])])
        return self.op("Mul", [self.op("Mul", [x, inv]), self.const(w.astype(np.float32))])


def _cat_rows(*qs: QTensor) -> QTensor:
    return QTensor(4, np.concatenate([q.data for q in qs]), np.concatenate([q.scale for q in qs]))


def build(cfg: MiniCPMConfig, qm: QuantizedModel, path: Path) -> Path:
    """Write the ONNX model (+ external weight file) to ``path``; returns it."""
    t, g = qm.tensors, _G()
    H, D, L = cfg.num_attention_heads, cfg.head_dim, cfg.num_hidden_layers
    KV = cfg.num_key_value_heads
    if KV != H:
        raise ValueError("bench ONNX graph: GQA (kv_heads != heads) not implemented")
    hid = cfg.hidden_size
    inputs = [helper.make_tensor_value_info("embeds", TensorProto.FLOAT, [1, "S", hid]),
              helper.make_tensor_value_info("cos", TensorProto.FLOAT, ["S", D]),
              helper.make_tensor_value_info("sin", TensorProto.FLOAT, ["S", D]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["S", "T"])]
    outputs = []
    shape_bshd = g.const(np.array([1, -1, H, D], np.int64))
    shape_bsh = g.const(np.array([1, -1, H * D], np.int64))
    half = g.const(np.array([D // 2, D // 2], np.int64))
    neg = g.const(np.array(-1.0, np.float32))
    rscale = g.const(np.array(cfg.residual_scale, np.float32))
    smscale = g.const(np.array(D ** -0.5, np.float32))

    def rope(x: str) -> str:              # x [1, H, S, D]; rotate-half
        a, b = (f"{x}_h0", f"{x}_h1")
        g.nodes.append(helper.make_node("Split", [x, half], [a, b], axis=-1))
        rot = g.op("Concat", [g.op("Mul", [b, neg]), a], axis=-1)
        return g.op("Add", [g.op("Mul", [x, "cos"]), g.op("Mul", [rot, "sin"])])

    h = "embeds"
    for i in range(L):
        p = f"layers.{i}."
        x = g.rms(h, t[p + "attention_norm.weight"], cfg.rms_norm_eps)
        qkv = g.matmul_q4(x, _cat_rows(*(t[p + f"attention.w{c}.weight"] for c in "qkv")))
        q, k, v = (f"l{i}_q", f"l{i}_k", f"l{i}_v")
        g.nodes.append(helper.make_node("Split", [qkv, g.const(np.array([H * D] * 3, np.int64))], [q, k, v], axis=-1))
        heads = lambda z: g.op("Transpose", [g.op("Reshape", [z, shape_bshd])], perm=[0, 2, 1, 3])  # noqa: E731
        q, k, v = rope(heads(q)), rope(heads(k)), heads(v)
        pk, pv = f"past_k{i}", f"past_v{i}"
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, KV, "P", D]) for n in (pk, pv)]
        ck, cv = g.op("Concat", [pk, k], axis=2), g.op("Concat", [pv, v], axis=2)
        g.nodes += [helper.make_node("Identity", [ck], [f"present_k{i}"]),
                    helper.make_node("Identity", [cv], [f"present_v{i}"])]
        outputs += [helper.make_tensor_value_info(f"present_{c}{i}", TensorProto.FLOAT, [1, KV, "T", D]) for c in "kv"]
        s = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [ck], perm=[0, 1, 3, 2])]), smscale]), "mask"])
        o = g.op("MatMul", [g.op("Softmax", [s], axis=-1), cv])
        o = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), shape_bsh])
        h = g.op("Add", [h, g.op("Mul", [g.matmul_q4(o, t[p + "attention.wo.weight"]), rscale])])
        x = g.rms(h, t[p + "ffn_norm.weight"], cfg.rms_norm_eps)
        gu = g.matmul_q4(x, _cat_rows(t[p + "feed_forward.w1.weight"], t[p + "feed_forward.w3.weight"]))
        gate, up = f"l{i}_gate", f"l{i}_up"
        g.nodes.append(helper.make_node("Split", [gu, g.const(np.array([cfg.intermediate_size] * 2, np.int64))],
                                        [gate, up], axis=-1))
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        h = g.op("Add", [h, g.op("Mul", [g.matmul_q4(act, t[p + "feed_forward.w2.weight"]), rscale])])
    last = g.op("Slice", [h, g.const(np.array([-1], np.int64)), g.const(np.array([2 ** 62], np.int64)),
                          g.const(np.array([1], np.int64))])
    x = g.op("Mul", [g.rms(last, t["norm.weight"], cfg.rms_norm_eps), g.const(np.array(1 / cfg.logit_scale, np.float32))])
    head = t["tok_embeddings.weight"] if cfg.tie_word_embeddings else t["output.weight"]
    g.nodes.append(helper.make_node("Identity", [g.matmul_q4(x, head)], ["logits"]))
    outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, cfg.vocab_size]))
    graph = helper.make_graph(g.nodes, "minicpm_q4", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    path = Path(path)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return path


def rope_tables(cfg: MiniCPMConfig, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    ang = np.arange(start, start + n, dtype=np.float64)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], axis=-1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def causal_mask(start: int, n: int) -> np.ndarray:
    rows = np.arange(start, start + n)[:, None]
    cols = np.arange(start + n)[None, :]
    return np.where(cols <= rows, 0.0, -1e30).astype(np.float32)
