"""docs/ios.md's Swift sample, transcribed (targets/coreml/session.py), run against the exported tiny
package through the NumPy MIL interpreter: its tokens equal the PyTorch reference's (the package's own
weights, decompressed as Core ML does) for a prompt of three prefill chunks and for a second turn that
continues the same state; near the end of the window it feeds through decode and uses the last slot."""
import re
from pathlib import Path

import pytest

from targets.coreml.session import open_bundle
from targets.coreml.verify import TOLERANCE, model_from_state, package_state_dict

pytestmark = pytest.mark.slow
EVAL_TEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "eval" / "python-tutorial.txt"
DOC = Path(__file__).resolve().parent.parent / "docs" / "ios.md"
STEPS = 6


@pytest.fixture(scope="module")
def chat(ios_tiny_bundle):
    return open_bundle(ios_tiny_bundle)


@pytest.fixture(scope="module")
def reference(chat, tiny):
    return model_from_state(tiny.config, package_state_dict(chat.interp, list(tiny.state)))


def assert_reference_tokens(reference, chat, ids, steps, reply):
    """``reply`` (the transcribed loop's tokens, stop token dropped) equals the reference's greedy tokens,
    except at a near-tie: where the engine's token is within TOLERANCE.logit_atol of the reference's best
    logit (the package computes in float16 and may break a tie the other way); from there the reference
    continues from the engine's token. Any other difference fails."""
    done = 0
    while True:
        tokens, logits = reference.generate(ids + reply[:done], steps - done, eos_id=chat.c.eos,
                                            prefill_chunk=chat.c.chunk)
        if tokens and tokens[-1] in chat.c.stop_ids:
            tokens = tokens[:-1]
        rest = reply[done:]
        k = next((i for i, (a, b) in enumerate(zip(rest, tokens)) if a != b), None)
        if k is None:
            assert rest == tokens, (done, rest, tokens)
            return
        gap = float(logits[k].max() - logits[k][rest[k]])
        assert gap <= TOLERANCE.logit_atol, f"step {done + k}: {rest[k]} vs reference {tokens[k]}, gap {gap:.3f}"
        done += k + 1


def recording(chat):
    calls = []
    run = chat.interp.run

    def spy(function, inputs, states):
        calls.append((function, int(inputs["start_pos"][0])))
        return run(function, inputs, states)
    chat.interp.run = spy
    return calls


def test_three_chunks_then_a_second_turn(chat, reference):
    text = EVAL_TEXT.read_text(encoding="utf-8")
    C = chat.c.chunk
    words = text[6000:].split(" ")
    n = 20
    while len(chat.prompt_ids([{"role": "user", "content": " ".join(words[:n])}])) <= 2 * C + 10:
        n += 5
    messages = [{"role": "user", "content": " ".join(words[:n])}]
    ids = chat.prompt_ids(messages)
    assert 2 * C < len(ids) <= 3 * C and ids[0] == chat.c.bos and ids[1] != chat.c.bos
    chat.reset()
    calls = recording(chat)
    shown = []
    first = chat.reply(messages, STEPS, shown.append)
    assert_reference_tokens(reference, chat, ids, STEPS, first)
    assert len(set(first)) > 2
    assert calls[:3] == [("prefill", 0), ("prefill", C), ("prefill", 2 * C)]
    assert calls[3:] == [("decode", len(ids) + i) for i in range(len(first) - 1)]
    assert "".join(shown) == chat.tokenizer.decode(first, skip_special_tokens=False)

    held = list(chat.cached)
    messages += [{"role": "assistant", "content": chat.tokenizer.decode(first)},
                 {"role": "user", "content": "Show a short example with a list."}]
    ids2 = chat.prompt_ids(messages)
    calls.clear()
    second = chat.reply(messages, STEPS)
    assert_reference_tokens(reference, chat, ids2, STEPS, second)
    assert calls[0][1] >= len(ids)                       # the first turn's slots were kept
    assert chat.cached[:calls[0][1]] == held[:calls[0][1]] == ids2[:calls[0][1]]


def test_end_of_window(chat, reference):
    """A second turn that starts less than one chunk before the end goes through decode; generation
    stops only when all N slots hold tokens; the reference agrees on every token."""
    N, C = chat.c.context, chat.c.chunk
    words = EVAL_TEXT.read_text(encoding="utf-8")[20000:].split(" ")
    n = 300
    while len(chat.prompt_ids([{"role": "user", "content": " ".join(words[:n])}])) < N - C - 12:
        n += 10
    messages = [{"role": "user", "content": " ".join(words[:n])}]
    chat.reset()
    first = chat.reply(messages, 2)
    messages += [{"role": "assistant", "content": chat.tokenizer.decode(first)},
                 {"role": "user", "content": "And then?"}]
    ids = chat.prompt_ids(messages)
    assert N - C < len(ids) < N - 3, len(ids)
    calls = recording(chat)
    reply = chat.reply(messages, N)
    assert_reference_tokens(reference, chat, ids, N - len(ids) + 1, reply)
    assert [f for f, _ in calls] == ["decode"] * len(calls) and calls[-1][1] == N - 1
    if len(reply) == N - len(ids) + 1:                   # no EOS before the window filled up
        assert len(chat.cached) == N


def test_doc_sample_is_the_transcribed_loop():
    """The Swift lines whose logic the transcription copies are in docs/ios.md as written."""
    swift = DOC.read_text(encoding="utf-8")
    for line in ("if pos + C <= N {", "let n = min(C, tokens.count - i)",
                 '"last_index": try int32s([n - 1], shape: [1]),',
                 '"start_pos": try int32s([cached.count], shape: [1]),', "keep = min(keep, ids.count - 1)",
                 "if ids.first != contract.bosTokenId { ids.insert(contract.bosTokenId, at: 0) }",
                 "if reply.count == maxNewTokens || cached.count == contract.contextWindow { break }",
                 'if !text.hasSuffix("\\u{FFFD}") {', "config.computeUnits = computeUnits",
                 "for r in 0 ..< min(width, vocab - p * width) {", "try await MLModel.compileModel(at: package)"):
        assert line in swift, line
    assert not re.search(r"\.cpuAndNeuralEngine\s*$", swift, re.M)
