"""targets/tvm/vision_schedule.py: the CPU matmul schedule keeps results exact for any dynamic N
(row counts that are not multiples of the 4-row tile or the 128-row block) and really applies."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from targets.tvm import pipeline
from targets.tvm.vision_schedule import schedule_func


def _linear_module(k: int, j: int) -> tvm.IRModule:
    """Relax module of x @ w + b with a dynamic row count (torch.export, as targets/tvm/vision.py)."""
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    class Linear(torch.nn.Module):
        def forward(self, x, w, b):
            return x @ w + b

    args = (torch.zeros(8, k), torch.zeros(k, j), torch.zeros(j))
    ep = torch.export.export(Linear(), args, dynamic_shapes=({0: torch.export.Dim("n")}, None, None))
    return from_exported_program(ep, unwrap_unit_return_tuple=True)


def _legalized(mod: tvm.IRModule) -> tvm.IRModule:
    with tvm.target.Target(pipeline.HOST_TARGET):
        return tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                         relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)


def test_matmul_funcs_are_scheduled():
    mod = _legalized(_linear_module(192, 272))
    prims = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    scheduled = [schedule_func(f) for f in prims]
    assert any(s is not None and "T.parallel" in s.script() and "T.vectorized" in s.script() for s in scheduled)


@pytest.mark.parametrize("n", [1, 37, 130, 257])
def test_scheduled_linear_matches_numpy(n):
    from targets.tvm.vision import compile_vision
    ex = compile_vision(_linear_module(192, 272), pipeline.make_target("cpu", pipeline.HOST_TARGET))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(n)
    x, w, b = (rng.standard_normal(s).astype("float32") for s in [(n, 192), (192, 272), (272,)])
    got = vm["main"](*(tvm.runtime.tensor(a) for a in (x, w, b))).numpy()
    ref = x.astype(np.float64) @ w + b
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
