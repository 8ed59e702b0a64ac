"""int8 weights for the vision encoder's linears (issue 6): Relax rewrite + microkernel GEMM.

``quantize_ir(mod, params)`` takes the imported vision module (``main`` with the 3 inputs, then one
parameter per torch parameter, before BundleModelParams) and rewrites every

    y = matmul(x, W)      W = permute_dims(P) | permute_dims(split(P)[i]) | P      (P a 2-D parameter)

into two opaque ``call_tir``s on new q8 parameters (docs/DESIGN.md's q8: int8 [out, Kp] + float16 scale
per 32 inputs, Kp = in rounded up to 32 with zero columns, e.g. so400m's fc2 4304 -> 4320):

    (xq, xd) = call_tir(vision_q8_quant, (x2,))          # activations -> int8 per 32-group (Q8_0)
    (y2, _)  = call_tir(vision_q8_matmul, (qw, sc, xq, xd))

That covers the ViT blocks' qkv / proj / fc1 / fc2 and the resampler's kv_proj, in_proj (q, k, v
slices, one q8 tensor each), out_proj and proj. The patch embedding (a reshaped conv weight) and the
position-embedding interpolation (``pos_interp @ pos_embed``, interpolation weights as activations)
stay float32. The fp32 parameters no longer used are dropped from the signature.

The two functions are TIR wrappers around microkernels/vq8_gemm.c (``vq8_quant_act``,
``vq8_matmul_dyn``: token quads x row quads tiles, weights repacked per task, AVX-512 VNNI / AVX2 / NEON
dotprod / Armv8.0 NEON / portable C); their symbol names carry ``kernels.kernel_prefix(target)``, so ``bind_kernels(mod,
target)`` (in compile_vision, llvm targets only) fills them in per target and attaches the object.
"""
from __future__ import annotations

import numpy as np
import torch
import tvm
from tvm import relax, tirx
from tvm.relax.dpl import is_op, rewrite_call, wildcard
from tvm.script import tirx as T

from exporter.quant import GROUP, quantize_weight
from targets.tvm import kernels

QUANT, MATMUL = "vision_q8_quant", "vision_q8_matmul"
SLOTS = kernels.PARALLEL_SLOTS
UNBOUND = "mcpm_kunbound_"     # symbol prefix until bind_kernels sets the target's kernels.kernel_prefix


def quant_func(prefix: str) -> tirx.PrimFunc:
    sym = f"{prefix}vq8_quant_act"

    @T.prim_func(private=True)
    def vq8_quant(x: T.handle, xq: T.handle, xd: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True, "op_pattern": 8})
        for t in T.parallel(SLOTS):
            T.evaluate(T.call_extern("int32", sym, x, xq, xd, t, SLOTS))

    return vq8_quant


def matmul_func(prefix: str) -> tirx.PrimFunc:
    reset, sym = f"{prefix}counter_reset", f"{prefix}vq8_matmul_dyn"

    @T.prim_func(private=True)
    def vq8_matmul(qw: T.handle, sc: T.handle, xq: T.handle, xd: T.handle, y: T.handle, cnt: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True, "op_pattern": 8})
        T.evaluate(T.call_extern("int32", reset, cnt))
        for t in T.parallel(SLOTS):
            T.evaluate(T.call_extern("int32", sym, qw, sc, xq, xd, y, cnt))

    return vq8_matmul


def quantize_q8(w_out_in: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] float -> (int8 [out, Kp], float16 [out, Kp/32]), zero-padded to Kp = ceil32(in)."""
    out, n = w_out_in.shape
    kp = -(-n // GROUP) * GROUP
    w = np.zeros((out, kp), np.float32)
    w[:, :n] = w_out_in
    return quantize_weight(torch.from_numpy(w), 8, search=False)


def dequantized(qw: np.ndarray, sc: np.ndarray, n_in: int) -> np.ndarray:
    """The float32 [out, in] weight the q8 tensors stand for."""
    out, kp = qw.shape
    w = qw.astype(np.float32).reshape(out, kp // GROUP, GROUP) * sc.astype(np.float32)[:, :, None]
    return w.reshape(out, kp)[:, :n_in]


def emit_linear(gv_quant, gv_matmul, x, dims, qw, sc, n_out: int) -> relax.Expr:
    """y[..., n_out] = x[..., k] (dims) times the q8 weight (qw, sc Relax values) through the kernels."""
    k = int(dims[-1])
    kp = -(-k // GROUP) * GROUP
    rows = tirx.IntImm("int64", 1)
    for d in dims[:-1]:
        rows = rows * d
    mp = tirx.floordiv(rows + 3, 4) * 4
    x2 = relax.op.reshape(x, relax.ShapeExpr([rows, k]))
    quant = relax.op.call_tir(gv_quant, relax.Tuple([x2]), [relax.TensorType([mp * kp], "int8"),
                                                            relax.TensorType([mp * (kp // GROUP)], "float32")])
    acts = [relax.TupleGetItem(quant, 0), relax.TupleGetItem(quant, 1)]
    out = relax.op.call_tir(gv_matmul, relax.Tuple([qw, sc, *acts]),
                            [relax.TensorType([rows, n_out], "float32"), relax.TensorType([1], "int32")])
    return relax.op.reshape(relax.TupleGetItem(out, 0), relax.ShapeExpr([*dims[:-1], n_out]))


def linear_module(n_out: int, k: int) -> tvm.IRModule:
    """forward(x f32 [1, m, k], qw int8 [n_out, Kp], sc f16 [n_out, Kp/32]) -> [1, m, n_out] (kernel tests)."""
    kp = -(-k // GROUP) * GROUP
    m = tirx.Var("m", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, m, k], "float32"))
    qw = relax.Var("qw", relax.TensorType([n_out, kp], "int8"))
    sc = relax.Var("sc", relax.TensorType([n_out, kp // GROUP], "float16"))
    gq = bb.add_func(quant_func(UNBOUND).with_attr("global_symbol", QUANT), QUANT)
    gm = bb.add_func(matmul_func(UNBOUND).with_attr("global_symbol", MATMUL), MATMUL)
    with bb.function("forward", [x, qw, sc]):
        with bb.dataflow():
            y = bb.emit_output(emit_linear(gq, gm, x, [tirx.IntImm("int64", 1), m, tirx.IntImm("int64", k)],
                                           qw, sc, n_out))
        bb.emit_func_output(y)
    return bb.get()


class _Q8Rewriter:
    def __init__(self, func: relax.Function, values: dict, bb: relax.BlockBuilder):
        self.values = values                                # relax param Var -> (torch name, np array)
        self.bindings = {b.var: b.value for blk in func.body.blocks for b in blk.bindings}
        self.bb, self.new_params, self.fvars = bb, [], {}
        self.x, self.w = wildcard(), wildcard()
        self.pattern = is_op("relax.matmul")(self.x, self.w)
        self.count = 0

    def _gv(self, name: str, make) -> relax.GlobalVar:
        if name not in self.fvars:
            self.fvars[name] = self.bb.add_func(make(UNBOUND).with_attr("global_symbol", name), name)
        return self.fvars[name]

    def _resolve(self, e) -> tuple[str, np.ndarray] | None:
        """W = matmul's right operand [in, out] -> (name, W^T as [out, in]) when it is a parameter form."""
        e = self.bindings.get(e, e)
        if isinstance(e, relax.Var) and e in self.values:
            name, arr = self.values[e]
            return (f"{name}.T", arr.T) if arr.ndim == 2 else None    # matmul(x, P): P is [in, out]
        if isinstance(e, relax.Call) and e.op.name == "relax.permute_dims":
            axes = e.attrs.axes
            if axes is not None and [int(a) for a in axes] != [1, 0]:
                return None
            src = self.bindings.get(e.args[0], e.args[0])
            if isinstance(src, relax.Var) and src in self.values:
                name, arr = self.values[src]
                return (name, arr) if arr.ndim == 2 else None
            if isinstance(src, relax.TupleGetItem):
                split = self.bindings.get(src.tuple_value, src.tuple_value)
                if isinstance(split, relax.Call) and split.op.name == "relax.split" \
                        and int(split.attrs.axis) == 0 and split.args[0] in self.values:
                    name, arr = self.values[split.args[0]]
                    sec = split.attrs.indices_or_sections
                    if arr.ndim != 2 or isinstance(sec, tirx.IntImm) or isinstance(sec, int):
                        return None
                    parts = np.split(arr, [int(i) for i in sec], axis=0)
                    return f"{name}[{src.index}]", parts[src.index]
        return None

    def __call__(self, orig: relax.Expr, m: dict) -> relax.Expr:
        x = m[self.x]
        res = self._resolve(m[self.w])
        xs = x.ty
        if res is None or not isinstance(xs, relax.TensorType) or str(xs.dtype) != "float32" or xs.ndim < 1:
            return orig
        name, w = res
        n_out, k = w.shape
        dims = list(xs.shape.values) if isinstance(xs.shape, relax.ShapeExpr) else None
        if dims is None or not isinstance(dims[-1], tirx.IntImm) or int(dims[-1]) != k:
            return orig
        qw, sc = quantize_q8(w)
        pq = relax.Var(f"{name}.q8", relax.TensorType(qw.shape, "int8"))
        ps = relax.Var(f"{name}.q8_scale", relax.TensorType(sc.shape, "float16"))
        self.new_params += [(pq, f"{name}.q8", qw), (ps, f"{name}.q8_scale", sc)]
        self.count += 1
        return emit_linear(self._gv(QUANT, quant_func), self._gv(MATMUL, matmul_func), x, dims, pq, ps, n_out)


def quantize_ir(mod: tvm.IRModule, params: list[tuple[str, np.ndarray]], fn: str = "main",
                num_input: int = 3) -> tuple[tvm.IRModule, list[tuple[str, np.ndarray]], dict]:
    """Rewrite ``fn``'s weight matmuls to the q8 kernels; returns (module, params in call order, info)."""
    func = mod[fn]
    fparams = list(func.params)
    weights = fparams[num_input:]
    if len(weights) != len(params):
        raise ValueError(f"{len(weights)} weight parameters, {len(params)} arrays")
    values = {v: (name, arr) for v, (name, arr) in zip(weights, params)}
    bb = relax.BlockBuilder(mod)
    rw = _Q8Rewriter(func, values, bb)
    new = rewrite_call(rw.pattern, rw, func)
    body = relax.analysis.remove_all_unused(new).body
    used = set(relax.analysis.free_vars(body))
    kept = [(v, values[v]) for v in weights if v in used]
    sig = fparams[:num_input] + [v for v, _ in kept] + [v for v, _, _ in rw.new_params]
    out_params = [(name, arr) for _, (name, arr) in kept] + [(name, arr) for _, name, arr in rw.new_params]
    newf = relax.Function(sig, body, func.ret_ty, func.is_pure, func.attrs)
    bb.update_func(mod.get_global_var(fn), newf)
    info = {"linears_q8": rw.count, "fp32_params_dropped": len(weights) - len(kept)}
    return bb.get(), out_params, info


def bind_kernels(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Point the q8 wrappers at ``target``'s microkernel names and attach the compiled object (llvm only)."""
    gvs = {gv.name_hint: gv for gv in mod.get_global_vars()}
    if QUANT not in gvs:
        return mod
    prefix = kernels.kernel_prefix(target)
    mod = mod.clone()
    for name, make in ((QUANT, quant_func), (MATMUL, matmul_func)):
        if name in gvs:
            mod.update_func(gvs[name], make(prefix).with_attr("global_symbol", name))
    return kernels.attach_microkernels(mod, target)


def has_q8(mod: tvm.IRModule) -> bool:
    return any(gv.name_hint == QUANT for gv in mod.get_global_vars())


def dequantized_state(state: dict, params: list[tuple[str, np.ndarray]]) -> dict:
    """torch state dict with every weight replaced by what its q8 tensors stand for (names of quantize_ir:
    ``P.q8`` = P, ``P.T.q8`` = P transposed, ``P[i].q8`` = row block i of a split P)."""
    arrays = dict(params)
    out = {k: v.clone() for k, v in state.items()}
    for name, qw in params:
        if not name.endswith(".q8"):
            continue
        base, sc = name[:-3], arrays[name + "_scale"]
        idx = None
        if base.endswith("]"):
            base, idx = base[:-1].rsplit("[", 1)
        transposed = base.endswith(".T")
        base = base[:-2] if transposed else base
        ref = out[base]
        n_in = ref.shape[0] if transposed else ref.shape[1]
        w = torch.from_numpy(dequantized(qw, sc, n_in))
        if transposed:
            out[base] = w.T.contiguous()
        elif idx is None:
            out[base] = w
        else:
            rows = w.shape[0]
            out[base][int(idx) * rows:(int(idx) + 1) * rows] = w
    return out
