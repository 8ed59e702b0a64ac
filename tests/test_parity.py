"""exporter/parity.py: the one greedy loop and the one parity checker.

Scripted engines pin the checker's edges (a one-token difference, a logit difference just above the
bound, NaN); the real engines (PyTorch reference on tiny, its greedy through MiniCPM.generate, the
numpy dev model) show the protocol is the one every engine runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.errors import ExportError
from exporter.model import MiniCPM, ReferenceEngine
from exporter.parity import Generation, Tolerance, check_parity, compare, greedy

VOCAB = 16
ATOL = 2e-3


class Scripted:
    """An Engine whose logits at step i are script[i] (prefill gives step 0); records what it was fed."""

    def __init__(self, script: list[np.ndarray]):
        self.script, self.fed, self.i = script, [], 0

    def prefill(self, ids):
        self.fed, self.i = [list(ids)], 0
        return self.script[0]

    def decode(self, token):
        self.fed.append(token)
        self.i += 1
        return self.script[self.i]


def script(tokens: list[int], margin: float = 1.0) -> list[np.ndarray]:
    rows = []
    for t in tokens:
        row = np.linspace(-1, 0, VOCAB).astype(np.float32) * 0.1
        row[t] = margin
        rows.append(row)
    return rows


TOKENS = [3, 5, 7, 9, 11, 13]
TOL = Tolerance(logit_atol=ATOL, reference="the scripted reference")


def test_greedy_loop_stops_and_forces():
    gen = greedy(Scripted(script(TOKENS)), [1, 2], 6)
    assert gen.tokens == TOKENS and len(gen.logits) == 6 and gen.prompt_len == 2
    eng = Scripted(script(TOKENS))
    assert greedy(eng, [1], 6, stop_ids={7}).tokens == [3, 5, 7]          # the stop token is kept
    assert eng.fed == [[1], 3, 5]
    eng = Scripted(script(TOKENS))
    greedy(eng, [1], 4, forced=[0, 0, 0, 0])
    assert eng.fed == [[1], 0, 0, 0]                                       # teacher forcing: never its own choice


def test_identical_engines_pass():
    report = check_parity(Scripted(script(TOKENS)), Scripted(script(TOKENS)), [1], 6, TOL, "label")
    assert report.tokens_match and report.max_abs_diff == 0.0 and report.steps == 6


def test_one_token_difference_fails_naming_the_step():
    other = list(TOKENS)
    other[3] = 4
    with pytest.raises(ExportError, match=r"^label: greedy tokens differ from the scripted reference at step 3 "
                                          r"\(9 vs 4"):
        check_parity(Scripted(script(TOKENS)), Scripted(script(other)), [1], 6, TOL, "label")
    # the same difference passes only where tokens are not required to match (and the logits are in bound)
    loose = Tolerance(logit_atol=None, tokens_must_match=False)
    assert not check_parity(Scripted(script(TOKENS)), Scripted(script(other)), [1], 6, loose, "l").tokens_match


@pytest.mark.parametrize("factor,fails", [(0.99, False), (1.01, True)])
def test_logit_difference_around_the_bound(factor, fails):
    got = script(TOKENS)
    got[2] = got[2].copy()
    got[2][0] += ATOL * factor                       # same argmax, one logit moved
    run = lambda: check_parity(Scripted(got), Scripted(script(TOKENS)), [1], 6, TOL, "label")  # noqa: E731
    if fails:
        with pytest.raises(ExportError, match=r"logits differ from the scripted reference by 2\.02e-03 at step 2 "
                                              r"\(bound 0\.002\)"):
            run()
    else:
        assert run().max_abs_diff == pytest.approx(ATOL * factor, rel=1e-3)


def test_relative_bound_and_nan():
    ref = np.ones((4, 8), np.float32)
    tol = Tolerance(rtol=1e-3, tokens_must_match=False, reference="fp32", quantity="features")
    assert compare([ref * (1 + 0.9e-3)], [ref], tol).check("x").max_rel_err == pytest.approx(0.9e-3, rel=1e-3)
    with pytest.raises(ExportError, match=r"^x: features differ from fp32 by 1\.10e-03 \(relative; bound 0\.001\)"):
        compare([ref * (1 + 1.1e-3)], [ref], tol).check("x")
    bad = ref.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ExportError, match="features differ"):
        compare([bad], [ref], tol).check("x")


def test_teacher_forced_compares_logits_past_a_divergence():
    """Teacher forced (Core ML's mode), the engine decodes the reference's tokens."""
    ref, eng = Scripted(script(TOKENS)), Scripted(script([3, 5, 8, 9, 11, 13]))
    tol = Tolerance(logit_atol=10.0, tokens_must_match=False, teacher_forced=True)
    report = check_parity(eng, ref, [1], 6, tol, "l")
    assert eng.fed == [[1], 3, 5, 7, 9, 11] and report.tokens == [3, 5, 8, 9, 11, 13]


def test_real_engines_share_the_loop(tiny):
    """MiniCPM.generate is greedy over ReferenceEngine; a chunked and a one-shot prefill agree; a model
    with one weight perturbed fails the check at a named step."""
    ids = tiny.tokenizer.encode("The for statement in Python")
    tokens, logits = tiny.model.generate(ids, 12)
    gen = greedy(ReferenceEngine(tiny.model, len(ids) + 12, prefill_chunk=3), ids, 12)
    assert isinstance(gen, Generation) and gen.tokens == tokens
    tol = Tolerance(logit_atol=1e-4, reference="PyTorch one-shot prefill")
    check_parity(ReferenceEngine(tiny.model, len(ids) + 12, 3), gen, ids, 12, tol, "chunked")
    state = {k: v.clone() for k, v in tiny.state.items()}
    state["norm.weight"] = state["norm.weight"] * 1.01
    other = MiniCPM.from_state_dict(tiny.config, state)
    with pytest.raises(ExportError, match=r"^perturbed: logits differ from PyTorch one-shot prefill by .* at step 0"):
        check_parity(ReferenceEngine(other, len(ids) + 12), ReferenceEngine(tiny.model, len(ids) + 12), ids, 12,
                     tol, "perturbed")
    assert isinstance(logits[0], torch.Tensor)


def test_devmodel_reference_is_an_engine():
    from runner import devmodel
    p = devmodel.random_params(0)
    prompt = [5, 17, 42]
    want, ids = [], list(prompt)
    for _ in range(5):                                  # the loop reference_greedy used to be
        want.append(int(np.argmax(devmodel._forward(p, ids))))
        ids.append(want[-1])
    assert devmodel.reference_greedy(p, prompt, 5) == want
