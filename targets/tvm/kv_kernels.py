"""The paged KV cache's CPU kernels swapped for the microkernels' (issue 11): TVM 0.27's TIRPagedKVCache
calls its attention, RoPE and append functions by name from the module (``batch_decode_paged_kv_cpu``,
``batch_prefill_ragged_kv``, ``batch_prefill_paged_kv_cpu``, ``fused_rope``,
``tir_kv_cache_transpose_append``); ``replace_attention`` replaces each by a TIR wrapper of the same
parameters that runs the C kernel of microkernels/attention.c, attn_prefill.c or rope.c in a parallel
loop (kv_append.c: one serial call). Used by kernels.optimize_for_cpu.
"""
from __future__ import annotations

import re

import tvm
from tvm import tirx
from tvm.script import tirx as T


# Parameters are plain handles (TVM passes a DLTensor* for each); the C side reads data and shapes.
def decode_attention_func(prefix: str, slots: int, heads: int, head_dim: int) -> tirx.PrimFunc:
    """Drop-in for TVM's CPU decode attention of the paged KV cache (same parameters; ``heads`` query
    heads of ``head_dim``): ``slots`` parallel calls of <prefix>attn_decode, then ``slots`` of
    <prefix>attn_decode_merge, sharing a workspace of a partial result per slot (attention.c: a single
    sequence's long context is split over its pages, the merge combines the parts; otherwise slot t of n
    takes query heads [t*H/n, (t+1)*H/n) and the merge loop is skipped: <prefix>attn_decode_parts is 0)."""
    sym, parts, merge = f"{prefix}attn_decode", f"{prefix}attn_decode_parts", f"{prefix}attn_decode_merge"

    @T.prim_func(private=True)
    def attn_decode(q: T.handle, pages: T.handle, indptr: T.handle, values: T.handle, length_info: T.handle,
                    k_rope_pos_offset: T.handle, q_rope_position: T.handle, output: T.handle, lse_h: T.handle,
                    rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        batch = T.int64()
        lse = T.match_buffer(lse_h, (batch, heads), "float32")   # a buffer: binds the device the workspace needs
        ws = T.alloc_buffer((slots * heads * (head_dim + 2),), "float32")
        for t in T.parallel(slots):
            T.evaluate(T.call_extern("int32", sym, q, pages, indptr, values, length_info, output, lse.data, ws.data,
                                     t, slots, rotary_mode, sm_scale))
        if T.call_extern("int32", parts, q, indptr, slots) > 0:
            for t in T.parallel(slots):
                T.evaluate(T.call_extern("int32", merge, q, indptr, output, lse.data, ws.data, t, slots, rotary_mode))

    return attn_decode


def prefill_attention_func(prefix: str, slots: int) -> tirx.PrimFunc:
    """Drop-in for TVM's CPU ragged prefill attention (a chunk's self-attention; same parameters):
    ``slots`` parallel calls of <prefix>attn_prefill, slot t of n taking every n-th (head x 16
    query rows) task."""
    sym = f"{prefix}attn_prefill"

    @T.prim_func(private=True)
    def attn_prefill(q: T.handle, q_indptr: T.handle, k: T.handle, v: T.handle, kv_indptr: T.handle,
                     q_rope_position: T.handle, k_rope_pos_offset: T.handle, output: T.handle, lse: T.handle,
                     causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32,
                     sm_scale: T.float32):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        for t in T.parallel(slots):
            T.evaluate(T.call_extern("int32", sym, q, q_indptr, k, v, kv_indptr, output, lse, t, slots, causal,
                                     rotary_mode, sm_scale))

    return attn_prefill


def prefill_paged_attention_func(prefix: str, slots: int) -> tirx.PrimFunc:
    """Drop-in for TVM's CPU paged prefill attention (a chunk's queries against the cached prefix; same
    parameters): ``slots`` parallel calls of <prefix>attn_prefill_paged, tasks as the ragged one."""
    sym = f"{prefix}attn_prefill_paged"

    @T.prim_func(private=True)
    def attn_prefill_paged(q: T.handle, q_indptr: T.handle, pages: T.handle, page_indptr: T.handle,
                           page_values: T.handle, length_info: T.handle, k_rope_pos_offset: T.handle,
                           q_rope_position: T.handle, output: T.handle, lse: T.handle, causal: T.int32,
                           rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        for t in T.parallel(slots):
            T.evaluate(T.call_extern("int32", sym, q, q_indptr, pages, page_indptr, page_values, length_info, output,
                                     lse, t, slots, causal, rotary_mode, sm_scale))

    return attn_prefill_paged


def rope_func(prefix: str, slots: int, theta: float, rot: int) -> tirx.PrimFunc:
    """Drop-in for the KV cache's "fused_rope" (split the fused QKV, RoPE on q and k; same parameters):
    ``slots`` parallel calls of <prefix>rope, slot t of n taking positions [t*S/n, (t+1)*S/n); a single
    position (a decode step) is done on the calling thread by <prefix>rope_one, without a parallel launch."""
    sym, one = f"{prefix}rope", f"{prefix}rope_one"

    @T.prim_func(private=True)
    def fused_rope(qkv: T.handle, position_map: T.handle, q: T.handle, k: T.handle, v: T.handle, apply_rope: T.int64):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        if T.call_extern("int32", one, qkv, position_map, q, k, v, apply_rope, T.float32(theta), T.int32(rot)) == 0:
            for t in T.parallel(slots):
                T.evaluate(T.call_extern("int32", sym, qkv, position_map, q, k, v, apply_rope, T.float32(theta),
                                         T.int32(rot), t, slots))

    return fused_rope


def kv_append_func(prefix: str) -> tirx.PrimFunc:
    """Drop-in for the KV cache's "tir_kv_cache_transpose_append" (new k and v rows into their pages; same
    parameters): one serial call of <prefix>kv_append (a decode step appends one token)."""
    sym = f"{prefix}kv_append"

    @T.prim_func(private=True)
    def kv_append(pages: T.handle, k_data: T.handle, v_data: T.handle, position_map: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        T.evaluate(T.call_extern("int32", sym, pages, k_data, v_data, position_map))

    return kv_append


_POW = re.compile(r"T\.pow\(T\.float32\(([0-9.e+-]+)\), T\.Cast\(\"float32\", \w+ \* 2 % (\d+)\) / T\.float32\(([0-9.]+)\)\)")


def rope_constants(func: tirx.PrimFunc) -> tuple[float, int] | None:
    """(theta, rotary dim) of TVM's fused_rope, read from its printed ``pow(theta, float(d * 2 % rot) / rot)``
    (TVM 0.27 has no Python TIR visitor); None when the function does not have that shape (it is then
    left alone)."""
    found = {(float(m[0]), int(m[1])) for m in _POW.findall(func.script()) if float(m[2]) == float(m[1])}
    return found.pop() if len(found) == 1 else None


# TVM 0.27 TIRPagedKVCache CPU kernels (no sliding window) -> (parameter count, wrapper maker taking the
# kernel prefix, the slot count and the replaced function; None leaves it alone). The query (or fused QKV)
# buffer's dtype is the cache's: float32 or float16; head_dim at most the C kernels' ATT_MAXD.
def _rope(prefix: str, slots: int, func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    consts = rope_constants(func)
    return rope_func(prefix, slots, *consts) if consts is not None and consts[1] % 2 == 0 else None


def _decode(prefix: str, slots: int, func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    heads, head_dim = func.params[0].shape[1:]
    return decode_attention_func(prefix, slots, int(heads), int(head_dim)) if isinstance(heads, tirx.IntImm) else None


ATTENTION_KERNELS = {"batch_decode_paged_kv_cpu": (13, _decode),
                     "batch_prefill_ragged_kv": (14, lambda prefix, slots, _: prefill_attention_func(prefix, slots)),
                     "batch_prefill_paged_kv_cpu": (15, lambda prefix, slots, _: prefill_paged_attention_func(prefix, slots)),
                     "fused_rope": (6, _rope)}
# copies rows of any element type: no dtype or head_dim condition
KV_APPEND = {"tir_kv_cache_transpose_append": (4, lambda prefix, slots, _: kv_append_func(prefix))}
ATT_MAXD = 128


def _attention_ok(func: tirx.PrimFunc) -> bool:
    """The first buffer (query, or fused QKV) is float32/float16 with head_dim <= ATT_MAXD (what the C
    kernels handle)."""
    buf = func.params[0]                       # tirx 0.27: buffer parameters are Buffers
    return isinstance(buf, tirx.Buffer) and str(buf.dtype) in ("float32", "float16") and len(buf.shape) == 3 \
        and isinstance(buf.shape[-1], tirx.IntImm) and int(buf.shape[-1]) <= ATT_MAXD


def replace_attention(mod: tvm.IRModule, prefix: str, slots: int) -> tuple[tvm.IRModule, int]:
    """Swap TVM's serial, scalar CPU decode, ragged-prefill and paged-prefill attention, its RoPE and its
    KV append for the microkernel versions (symbols ``prefix``*, ``slots``-way parallel loops); returns (module,
    kernels replaced)."""
    count = 0
    for gv, func in list(mod.functions.items()):
        spec = ATTENTION_KERNELS.get(gv.name_hint) or KV_APPEND.get(gv.name_hint)
        if spec is None or not isinstance(func, tirx.PrimFunc) or len(func.params) != spec[0] \
                or (gv.name_hint in ATTENTION_KERNELS and not _attention_ok(func)):
            continue
        new = spec[1](prefix, slots, func)
        if new is None:
            continue
        mod = mod.clone() if count == 0 else mod      # same GlobalVar: the KV cache creation refers to it
        mod.update_func(gv, new.with_attr("global_symbol", func.attrs["global_symbol"]))
        count += 1
    return mod, count
