"""MLC-LLM's model-library contract: the functions and ``_metadata`` its engine looks up in a model library.

Written from the contract MLC's C++ engine reads (cpp/metadata/model.cc ``ModelMetadata::FromJSON``,
cpp/serve/function_table.cc, cpp/serve/model.cc, cpp/serve/logit_processor.cc), not from MLC's code.
targets/tvm/model.py provides embed/prefill/decode/batch_prefill/batch_decode/create_tir_paged_kv_cache;
``attach`` adds to the Relax module:

  alloc_embedding_tensor()                                  -> float32[prefill_chunk, hidden] workspace
  softmax_with_temperature(logits f32[b, 1, v], temperature f32[b]) -> probs f32[b, 1, v]
      (temperature <= 1e-5: the argmax distribution, 1/count on every maximum, as MLC's greedy path expects)
  apply_logit_bias_inplace(logits f32[b, v], pos2seq_id i32[t], token_ids i32[t], bias f32[t])
      logits[pos2seq_id[i], token_ids[i]] += bias[i]
  apply_penalty_inplace(logits f32[b, v], seq_ids i32[s], pos2seq_id i32[t], token_ids i32[t],
                        token_cnt i32[t], penalties f32[s, 3])
      presence/frequency subtracted, then repetition: negative logits * r, others / r
  apply_bitmask_inplace(logits f32[b, v], seq_ids i32[s], bitmask i32[b, ceil(v/32)])
      logits[seq, v] = -inf-ish (float32 lowest) where bit v of the row is 0
  _metadata()                                               -> JSON, ``metadata()`` below

The three in-place functions are VM functions over TIR (``tir_<name>``, called in place on the logits);
GPU builds bind their single loop to blocks of GPU_THREADS threads.
"""
from __future__ import annotations

import json

import tvm
from tvm import relax
from tvm.script import tirx as T

from exporter.config import MiniCPMConfig

GREEDY_TEMPERATURE = 1e-5   # at or below: greedy (argmax distribution)
GPU_THREADS = 256           # fits OPENCL_TARGET's max_num_threads
MAX_BATCH_SIZE = 4          # sequences per batch_prefill/batch_decode the library is declared for (MLC: max_num_sequence)
KERNEL_FUNCTIONS = ("embed", "prefill", "decode", "batch_prefill", "batch_decode", "create_tir_paged_kv_cache")
MLC_FUNCTIONS = ("alloc_embedding_tensor", "softmax_with_temperature", "apply_logit_bias_inplace",
                 "apply_penalty_inplace", "apply_bitmask_inplace", "_metadata")


@T.macro
def _bias(logits, pos2seq_id, token_ids, bias, vi):
    logits[pos2seq_id[vi], token_ids[vi]] = logits[pos2seq_id[vi], token_ids[vi]] + bias[vi]


@T.macro
def _penalty(logits, seq_ids, pos2seq_id, token_ids, token_cnt, penalties, vi):
    logits[seq_ids[pos2seq_id[vi]], token_ids[vi]] = (
        logits[seq_ids[pos2seq_id[vi]], token_ids[vi]] - penalties[pos2seq_id[vi], 0]
        - T.Cast("float32", token_cnt[vi]) * penalties[pos2seq_id[vi], 1])
    logits[seq_ids[pos2seq_id[vi]], token_ids[vi]] = T.if_then_else(
        logits[seq_ids[pos2seq_id[vi]], token_ids[vi]] < T.float32(0),
        logits[seq_ids[pos2seq_id[vi]], token_ids[vi]] * penalties[pos2seq_id[vi], 2],
        logits[seq_ids[pos2seq_id[vi]], token_ids[vi]] / penalties[pos2seq_id[vi], 2])


@T.macro
def _mask(logits, seq_ids, bitmask, vocab, vi):
    logits[seq_ids[vi // vocab], vi % vocab] = T.if_then_else(
        T.bitwise_and(T.shift_right(bitmask[seq_ids[vi // vocab], vi % vocab // 32], vi % vocab % 32), 1) == 1,
        logits[seq_ids[vi // vocab], vi % vocab], T.min_value("float32"))


@T.macro(hygienic=False)
def _each(n, gpu, threads, body, args):
    """body(*args, vi) for vi in [0, n): serial on CPU; on GPU blocks of ``threads`` threads, one vi each."""
    if gpu:
        for bx in T.thread_binding((n + threads - 1) // threads, "blockIdx.x"):
            for tx in T.thread_binding(threads, "threadIdx.x"):
                with T.sblock("each"):
                    vi = T.axis.spatial(n, bx * threads + tx)
                    T.where(bx * threads + tx < n)
                    body(*args, vi)
    else:
        for i in range(n):
            with T.sblock("each"):
                vi = T.axis.spatial(n, i)
                body(*args, vi)


def _logit_bias(gpu: bool, threads: int = GPU_THREADS) -> tvm.tirx.PrimFunc:
    @T.prim_func(s_tir=True)
    def f(var_logits: T.handle, var_pos2seq_id: T.handle, var_token_ids: T.handle, var_bias: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch, vocab, num_token = T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(var_logits, (batch, vocab), "float32")
        pos2seq_id = T.match_buffer(var_pos2seq_id, (num_token,), "int32")
        token_ids = T.match_buffer(var_token_ids, (num_token,), "int32")
        bias = T.match_buffer(var_bias, (num_token,), "float32")
        _each(num_token, gpu, threads, _bias, (logits, pos2seq_id, token_ids, bias))
    return f


def _penalty_func(gpu: bool, threads: int = GPU_THREADS) -> tvm.tirx.PrimFunc:
    @T.prim_func(s_tir=True)
    def f(var_logits: T.handle, var_seq_ids: T.handle, var_pos2seq_id: T.handle, var_token_ids: T.handle,
          var_token_cnt: T.handle, var_penalties: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch, vocab, num_token, num_seq = T.int32(), T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(var_logits, (batch, vocab), "float32")
        seq_ids = T.match_buffer(var_seq_ids, (num_seq,), "int32")
        pos2seq_id = T.match_buffer(var_pos2seq_id, (num_token,), "int32")
        token_ids = T.match_buffer(var_token_ids, (num_token,), "int32")
        token_cnt = T.match_buffer(var_token_cnt, (num_token,), "int32")
        penalties = T.match_buffer(var_penalties, (num_seq, 3), "float32")   # presence, frequency, repetition
        _each(num_token, gpu, threads, _penalty, (logits, seq_ids, pos2seq_id, token_ids, token_cnt, penalties))
    return f


def _bitmask(gpu: bool, threads: int = GPU_THREADS) -> tvm.tirx.PrimFunc:
    @T.prim_func(s_tir=True)
    def f(var_logits: T.handle, var_seq_ids: T.handle, var_bitmask: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        batch, vocab, num_seq = T.int32(), T.int32(), T.int32()
        logits = T.match_buffer(var_logits, (batch, vocab), "float32")
        seq_ids = T.match_buffer(var_seq_ids, (num_seq,), "int32")
        bitmask = T.match_buffer(var_bitmask, (batch, (vocab + 31) // 32), "int32")
        _each(num_seq * vocab, gpu, threads, _mask, (logits, seq_ids, bitmask, vocab))
    return f


F32, I32 = "float32", "int32"
# VM entry point -> (TIR function factory (gpu: bool), the arguments' (name, ndim, dtype))
IN_PLACE = {
    "apply_logit_bias_inplace": (_logit_bias, [
        ("logits", 2, F32), ("pos2seq_id", 1, I32), ("token_ids", 1, I32), ("logit_bias", 1, F32)]),
    "apply_penalty_inplace": (_penalty_func, [
        ("logits", 2, F32), ("seq_ids", 1, I32), ("pos2seq_id", 1, I32), ("token_ids", 1, I32),
        ("token_cnt", 1, I32), ("penalties", 2, F32)]),
    "apply_bitmask_inplace": (_bitmask, [("logits", 2, F32), ("seq_ids", 1, I32), ("bitmask", 2, I32)]),
}


def _in_place(bb: relax.BlockBuilder, name: str, gpu: bool) -> None:
    """The TIR function (CPU: serial; GPU: one loop over blocks of GPU_THREADS threads) and the VM entry
    point ``name`` calling it in place on its first argument (the engine looks functions up on the VM)."""
    make, arg_specs = IN_PLACE[name]
    gv = bb.add_func(make(gpu).with_attr("global_symbol", f"tir_{name}"), f"tir_{name}")
    args = [relax.Var(arg, relax.TensorType([tvm.tirx.Var(f"{arg}_{j}", "int64") for j in range(ndim)], dtype))
            for arg, ndim, dtype in arg_specs]
    with bb.function(name, params=args):
        out = bb.emit(relax.op.call_tir_inplace(gv, relax.Tuple(args), [0], args[0].ty))
        bb.emit_func_output(out)


def _softmax_with_temperature(bb: relax.BlockBuilder) -> None:
    b, v = tvm.tirx.Var("batch_size", "int64"), tvm.tirx.Var("vocab_size", "int64")
    logits = relax.Var("logits", relax.TensorType([b, 1, v], "float32"))
    temperature = relax.Var("temperature", relax.TensorType([b], "float32"))
    op = relax.op
    with bb.function("softmax_with_temperature", params=[logits, temperature]):
        with bb.dataflow():
            t = bb.emit(op.reshape(temperature, [b, 1, 1]))
            greedy = bb.emit(op.less_equal(t, relax.const(GREEDY_TEMPERATURE, "float32")))
            safe_t = bb.emit(op.where(greedy, relax.const(1.0, "float32"), t))
            soft = bb.emit(op.nn.softmax(op.divide(logits, safe_t), axis=-1))
            hit = bb.emit(op.astype(op.equal(logits, op.max(logits, axis=-1, keepdims=True)), "float32"))
            argmax = bb.emit(op.divide(hit, op.sum(hit, axis=-1, keepdims=True)))
            out = bb.emit_output(op.where(greedy, argmax, soft))
        bb.emit_func_output(out)


def attach(mod: tvm.IRModule, cfg: MiniCPMConfig, prefill_chunk: int, gpu: bool, meta: dict) -> tvm.IRModule:
    """``mod`` + alloc_embedding_tensor, softmax_with_temperature, the in-place logit functions, _metadata."""
    bb = relax.BlockBuilder(mod)
    with bb.function("alloc_embedding_tensor", params=[]):
        bb.emit_func_output(bb.emit(relax.op.builtin.alloc_tensor(
            relax.ShapeExpr([prefill_chunk, cfg.hidden_size]), "float32",
            runtime_device_index=0)))
    _softmax_with_temperature(bb)
    for name in IN_PLACE:
        _in_place(bb, name, gpu)
    with bb.function("_metadata", params=[]):
        bb.emit_func_output(relax.expr.String(json.dumps(meta, sort_keys=True)))
    return bb.get()


def memory_usage(cfg: MiniCPMConfig, prefill_chunk: int) -> dict[str, int]:
    """Bytes of temporary activations per forward function (an analytic upper estimate: the widest
    activations alive at once, float32); MLC's engine adds the max to the params when sizing the KV cache."""
    width = (cfg.hidden_size * 3 + 2 * cfg.intermediate_size
             + (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim)
    per_token = 4 * width
    return {"prefill": prefill_chunk * per_token + 4 * cfg.vocab_size,
            "batch_prefill": prefill_chunk * per_token + 4 * cfg.vocab_size * prefill_chunk,
            "decode": per_token + 4 * cfg.vocab_size, "batch_decode": per_token + 4 * cfg.vocab_size,
            "embed": 4 * prefill_chunk * cfg.hidden_size}


def metadata(cfg: MiniCPMConfig, quantization: str, context_window: int, prefill_chunk: int,
             params: list[tuple[str, tuple, str]], extra: dict) -> dict:
    """``_metadata()``: every key MLC's ModelMetadata::FromJSON requires (+ ``mcpm``: our own keys)."""
    return {
        "model_type": "minicpm", "quantization": quantization,
        "context_window_size": context_window, "prefill_chunk_size": prefill_chunk,
        "sliding_window_size": -1, "attention_sink_size": -1,
        "tensor_parallel_shards": 1, "pipeline_parallel_stages": 1, "max_batch_size": MAX_BATCH_SIZE,
        "kv_state_kind": "kv_cache",
        "kv_cache": {"num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
                     "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim},
        "memory_usage": memory_usage(cfg, prefill_chunk),
        "params": [{"name": n, "shape": list(s), "dtype": d, "preprocs": [], "pipeline_stages": [0]}
                   for n, s, d in params],
        "mcpm": {"hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, **extra},
    }
