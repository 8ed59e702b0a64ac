"""Core ML constants holding exactly the centrally quantized weights (exporter/quant.py QTensor).

A q4f16 group of 32 is (codes q in 0..15, float16 scale s), w = (q - 7) * s, values v = q - 7 in
[-7, 8]. Core ML's ``constexpr_blockwise_shift_scale`` (iOS 18) computes ``scale * data`` per block with
signed int4 ``data`` in [-8, 7]: a block whose values fit [-7, 7] is stored as (v, s), the form
coremltools' own linear_symmetric quantizer writes; a block using +8 as (-v, -s) (negating a float16
is exact). int8 groups (scheme q4f16_e8's embedding) are (v, s) as they are. The package therefore
holds the very codes and scales the centre quantized and gated; Core ML multiplies them in float16, so
each decompressed weight is the gated one rounded to float16 (relative error <= 2**-11).

``ShippedWeights`` is the graph pass that swaps the converted program's float16 weight constants for
those ops, by constant name (the names torch.export + ct.convert give the reference model's
parameters, ``mil_const_name``; --ane-head pieces are row blocks of the embedding)."""
from __future__ import annotations

import logging

import numpy as np

from exporter.errors import ExportError
from exporter.quant import GROUP, Q4_ZERO, QTensor, unpack_codes

logging.getLogger("coremltools").setLevel(logging.ERROR)
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402
from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass  # noqa: E402


def mil_const_name(canonical: str) -> str:
    """Constant name the torch.export -> Core ML conversion gives a reference-model parameter."""
    return "p_" + canonical.replace(".", "_") + "_to_fp16"


def blockwise(qt: QTensor) -> tuple[np.ndarray, np.ndarray]:
    """(data, scale) of constexpr_blockwise_shift_scale for ``qt``: int4 or int8 data [out, in], float16
    scale [out, in / GROUP]; ``scale * data`` per block is qt's dequantized weight."""
    scale = np.asarray(qt.scale, np.float16)
    if qt.bits == 8:
        return np.asarray(qt.data, np.int8), scale
    values = unpack_codes(qt.data).astype(np.int8) - np.int8(Q4_ZERO)
    out, n = values.shape
    blocks = values.reshape(out, n // GROUP, GROUP)
    flip = (blocks > 7).any(-1)                        # uses +8: store the negation
    blocks = np.where(flip[..., None], -blocks, blocks)
    return blocks.reshape(out, n).astype(types.np_int4_dtype), np.where(flip, -scale, scale)


def rows(qt: QTensor, first: int, count: int) -> QTensor:
    """Rows first..first+count of a quantized matrix (an --ane-head piece)."""
    return QTensor(qt.bits, qt.data[first:first + count], qt.scale[first:first + count])


def shipped_constants(tensors: dict, pieces: list[tuple[int, int]]) -> dict[str, QTensor]:
    """Program constant name -> QTensor for every quantized weight of ``tensors`` (canonical names);
    with --ane-head ``pieces`` [(first row, rows)] the embedding as its pieces."""
    out = {mil_const_name(n): t for n, t in tensors.items() if isinstance(t, QTensor)}
    embed = tensors.get("tok_embeddings.weight")
    if pieces and isinstance(embed, QTensor):
        out.update({f"p_embed_piece_{p}_to_fp16": rows(embed, first, count)
                    for p, (first, count) in enumerate(pieces)})
    return out


class ShippedWeights(AbstractGraphPass):
    """Replace each named float16 constant by constexpr_blockwise_shift_scale of its QTensor. Every
    2-D constant feeding a ``linear`` must be one of them (else the program would ship float16)."""

    def __init__(self, constants: dict[str, QTensor]):
        super().__init__()
        self.constants = constants

    def apply(self, prog) -> None:
        for fn in prog.functions.values():
            with fn:
                for op in list(fn.operations):
                    if op.op_type != "const":
                        continue
                    qt = self.constants.get(op.name)
                    if qt is None:
                        val = op.outputs[0].val
                        users = {c.op_type for c in op.outputs[0].child_ops}
                        if isinstance(val, np.ndarray) and val.ndim == 2 and users == {"linear"}:
                            raise ExportError(f"ios: linear weight '{op.name}' has no quantized "
                                              f"weights (coremltools/torch naming changed?)")
                        continue
                    if tuple(op.outputs[0].shape) != qt.shape:
                        raise ExportError(f"ios: '{op.name}' is {tuple(op.outputs[0].shape)}, the quantized "
                                          f"weights {qt.shape}")
                    data, scale = blockwise(qt)
                    new = mb.constexpr_blockwise_shift_scale(data=data, scale=scale, before_op=op,
                                                            name=op.name + "_quantized")
                    fn.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new,
                                                    no_check_var_types=True)
                    fn.remove_ops([op])
