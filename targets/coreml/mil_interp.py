"""Run a saved Core ML ML Program on Linux with NumPy (coremltools cannot predict off Apple OSes).

The package is loaded back with coremltools' own MIL-proto reader, then every op of a function is
evaluated in order. Ops reuse coremltools' per-op ``value_inference`` (the same code the
converter uses for constant folding) with the runtime values plugged into the op's input vars;
the rest is implemented here: state read/write, constexpr weight decompression (each constexpr_* op's
own ``materialized_val_inference``: int4/int8 constexpr_blockwise_shift_scale, constexpr_lut_to_dense
with the uint6 indices the MIL-proto reader unpacks from weight.bin), slice_update,
gather, and linear/matmul (float32 accumulation, result rounded to the op's float16 output, the
way Core ML's GPU/ANE kernels store activations).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from exporter.errors import ExportError

logging.getLogger("coremltools").setLevel(logging.ERROR)
import coremltools as ct  # noqa: E402
from coremltools.converters.mil.frontend.milproto.load import load as load_milproto  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402
from coremltools.converters.mil.mil.var import ListVar  # noqa: E402


def load_program(package: Path):
    """The MIL Program stored in an .mlpackage (all functions)."""
    model_file = package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    if not model_file.is_file():
        raise ExportError(f"{package}: not an .mlpackage (no Data/com.apple.CoreML/model.mlmodel)")
    spec = ct.utils.load_spec(str(package))
    weights = package / "Data" / "com.apple.CoreML" / "weights"
    return load_milproto(spec, spec.specificationVersion, file_weights_dir=str(weights))


def _np_dtype(var) -> np.dtype:
    return np.dtype(types.nptype_from_builtin(var.dtype))


def _input_vars(op):
    for v in op.inputs.values():
        yield from (v if isinstance(v, (list, tuple)) else (v,))


def _linear(op, val):
    x = val(op.x).astype(np.float32)
    y = x @ val(op.weight).astype(np.float32).T
    if op.bias is not None:
        y += val(op.bias).astype(np.float32)
    return y


def _matmul(op, val):
    x, y = val(op.x).astype(np.float32), val(op.y).astype(np.float32)
    if op.transpose_x.val:
        x = np.swapaxes(x, -1, -2)
    if op.transpose_y.val:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _slice_update(op, val):
    x = val(op.x).copy()
    begin, end = val(op.begin), val(op.end)
    stride = val(op.stride) if op.stride is not None else np.ones_like(begin)
    bmask = val(op.begin_mask) if op.begin_mask is not None else [False] * x.ndim
    emask = val(op.end_mask) if op.end_mask is not None else [False] * x.ndim
    index = tuple(slice(None if bm else int(b), None if em else int(e), int(s))
                  for b, e, s, bm, em in zip(begin, end, stride, bmask, emask))
    update = val(op.update)
    if x[index].shape != update.shape:
        raise ExportError(f"slice_update '{op.name}': update {update.shape} does not fit "
                          f"{x[index].shape} (begin {list(begin)}, end {list(end)})")
    x[index] = update
    return x


def _gather(op, val):
    x, idx = val(op.x), val(op.indices).astype(np.int64)
    axis = int(op.axis.val)
    if np.any(idx < -x.shape[axis]) or np.any(idx >= x.shape[axis]):
        raise ExportError(f"gather '{op.name}': index out of range for axis size {x.shape[axis]}")
    return np.take(x, idx, axis=axis)


def _silu(op, val):
    x = val(op.x).astype(np.float32)
    return x / (1.0 + np.exp(-x))


def _shape(op, val):  # coremltools' version reads the (possibly symbolic) static shape
    return np.array(np.shape(val(op.x)), dtype=np.int32)


OWN_OPS = {"linear": _linear, "matmul": _matmul, "silu": _silu, "shape": _shape,
           "slice_update": _slice_update, "gather": _gather}


def _lut_to_dense(op) -> np.ndarray | None:
    """constexpr_lut_to_dense of a 2-D weight with scalar entries, one block of the table at a time.

    coremltools' own decompress first repeats the table to the weight's shape times its 2**bits
    entries (33.7 GiB for MiniCPM-2B's 6-bit embedding); this needs only the output. None for
    layouts it does not handle (vector entries, other ranks): the caller falls back."""
    indices, lut = op.indices.val, op.lut.val
    if indices is None or lut is None or op.vector_axis is not None or indices.ndim != 2 \
            or lut.ndim != 4 or lut.shape[-1] != 1:
        return None
    (rows, cols), (br, bc) = indices.shape, lut.shape[:2]
    if rows % br or cols % bc:
        return None
    rs, cs = rows // br, cols // bc
    out = np.empty(indices.shape, dtype=lut.dtype)
    for i in range(br):
        for j in range(bc):
            block = (slice(i * rs, (i + 1) * rs), slice(j * cs, (j + 1) * cs))
            out[block] = lut[i, j, :, 0][indices[block]]
    return out


class Interpreter:
    """Evaluate functions of a loaded MIL program; constants are materialised once and cached.

    Decompressed weights (constexpr_* ops) are cached once for all functions: the functions of a
    multifunction package read the same weights under the same names (checked on the compressed
    data), so prefill and decode do not each hold a float16 copy of the model."""

    def __init__(self, program):
        self.program = program
        self._consts: dict[tuple[str, str], np.ndarray] = {}
        self._shared: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._dying: dict[str, list[list[str]]] = {}
        for fn in program.functions.values():   # NumPy 2 rejects np.bool_ where ints are expected
            for op in fn.operations:
                for var in _input_vars(op):
                    if var._sym_val is not None and isinstance(var._sym_val.val, np.bool_):
                        var._sym_val.val = bool(var._sym_val.val)

    @classmethod
    def from_package(cls, package: Path) -> "Interpreter":
        return cls(load_program(Path(package)))

    def function_names(self) -> list[str]:
        return list(self.program.functions)

    def constant(self, function: str, op, cache: bool = True) -> np.ndarray:
        """The value of a const / constexpr_* op; ``cache`` False decompresses without keeping it."""
        key = (function, op.outputs[0].name)
        if key in self._consts:
            return self._consts[key]
        if op.op_type == "const":
            self._consts[key] = op.outputs[0].val
            return self._consts[key]
        # constexpr_*: decompress at "load time", as Core ML does
        source = next(iter(op.inputs.values())).val     # data / indices: the compressed values
        skey = (op.op_type, op.outputs[0].name, tuple(op.outputs[0].shape))
        hit = self._shared.get(skey)
        if hit is not None and (hit[0] is source or np.array_equal(hit[0], source)):
            value = hit[1]
        else:
            value = _lut_to_dense(op) if op.op_type == "constexpr_lut_to_dense" else None
            if value is None:
                try:
                    value = np.asarray(op.materialized_val_inference())
                except (AttributeError, NotImplementedError):
                    raise ExportError(f"mil_interp: cannot decompress '{op.name}' ({op.op_type})") from None
            if cache and source is not None:
                self._shared[skey] = (source, value)
        if cache:
            self._consts[key] = value
        return value

    def drop_cache(self) -> None:
        """Forget materialised constants (the decompressed weights) to free their memory."""
        self._consts.clear()
        self._shared.clear()

    def run(self, function: str, inputs: dict[str, np.ndarray],
            states: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one call; ``states`` is updated in place (like an MLState)."""
        if function not in self.program.functions:
            raise ExportError(f"Core ML program has no function '{function}' "
                              f"(has: {', '.join(self.program.functions)})")
        fn = self.program.functions[function]
        env: dict[str, object] = {}
        for name, var in fn.inputs.items():
            if types.is_state(var.sym_type):
                if name not in states:
                    raise ExportError(f"function '{function}': state '{name}' not provided")
                env[name] = states[name]
            else:
                if name not in inputs:
                    raise ExportError(f"function '{function}': input '{name}' not provided")
                want = tuple(var.shape)
                arr = np.asarray(inputs[name], dtype=_np_dtype(var))
                if arr.shape != want:
                    raise ExportError(f"function '{function}': input '{name}' has shape "
                                      f"{arr.shape}, expected {want}")
                env[name] = arr

        def val(var):
            return env[var.name] if var.name in env else var.val

        dying = self._dying_after(function)
        for i, op in enumerate(fn.operations):
            out = op.outputs[0]
            if op.op_type == "const" or op.op_type.startswith("constexpr_"):
                env[out.name] = self.constant(function, op)
            elif op.op_type == "read_state":
                env[out.name] = env[op.input.name].copy()
            elif op.op_type == "coreml_update_state":
                value = np.asarray(val(op.value))
                states[op.state.name][...] = value
                env[out.name] = value
            elif op.op_type in OWN_OPS:
                env[out.name] = OWN_OPS[op.op_type](op, val).astype(_np_dtype(out))
            else:
                for name, value in zip((o.name for o in op.outputs), self._infer(op, env)):
                    env[name] = value
            for name in dying[i]:       # values no later op reads: every read_state / slice_update
                env.pop(name, None)     # holds a copy of a whole KV cache (L^2 growth otherwise)
        return {v.name: env[v.name] for v in fn.outputs}

    def _dying_after(self, function: str) -> list[list[str]]:
        """Per op of ``function``: names of the values whose last reader it is (not outputs)."""
        if function not in self._dying:
            fn = self.program.functions[function]
            last: dict[str, int] = {}
            for i, op in enumerate(fn.operations):
                for var in _input_vars(op):
                    last[var.name] = i
                for out in op.outputs:          # never read: free right after it is made
                    last.setdefault(out.name, i)
            keep = {v.name for v in fn.outputs} | set(fn.inputs)
            dying: list[list[str]] = [[] for _ in fn.operations]
            for name, i in last.items():
                if name not in keep:
                    dying[i].append(name)
            self._dying[function] = dying
        return self._dying[function]

    @staticmethod
    def _infer(op, env) -> tuple:
        """coremltools' own value inference with runtime values plugged into the input vars."""
        saved = []
        try:
            for var in _input_vars(op):
                if var.name in env and not isinstance(var, ListVar):
                    saved.append((var, var._sym_val))
                    holder = var.sym_type()
                    holder.val = env[var.name]
                    var._sym_val = holder
            try:
                result = op.value_inference()
            except NotImplementedError:
                raise ExportError(f"mil_interp: no implementation for op type '{op.op_type}' "
                                  f"('{op.name}')") from None
        finally:
            for var, old in saved:
                var._sym_val = old
        result = result if isinstance(result, tuple) else (result,)
        out = []
        for value, var in zip(result, op.outputs):
            if value is None:
                raise ExportError(f"mil_interp: op '{op.name}' ({op.op_type}) gave no value")
            if types.is_tensor(var.sym_type) or types.is_scalar(var.sym_type):
                value = np.asarray(value).astype(_np_dtype(var), copy=False)
            out.append(value)
        return tuple(out)
