"""The transcribed Swift loop (targets/coreml/session.py) against a scripted model: every call it makes
(function, start_pos, last_index, padding), the state bookkeeping, stops, streaming text and the
--ane-head logits layout. The same loop against the real package: tests/test_ios_swift.py (slow)."""
import numpy as np
import pytest

from exporter.chat import get_chat_template
from exporter.hf_tokenizer import build_hf_tokenizer
from exporter.recipes import EMBEDDED_DIR
from targets.coreml.session import ChatError, ChatSession, Contract

MODEL = EMBEDDED_DIR / "tinycpm-docs" / "tokenizer.model"
VOCAB = 8192


class Scripted:
    """Stands in for the MIL interpreter: records calls and answers with logits whose argmax is
    answers.get(slot, 300 + slot), slot = the KV slot of the last real token fed."""

    def __init__(self, answers, rows=1):
        self.answers, self.rows, self.calls = answers, rows, []

    def run(self, function, inputs, states):
        start = int(inputs["start_pos"][0])
        last = int(inputs["last_index"][0]) if "last_index" in inputs else None
        self.calls.append((function, start, last, inputs["input_ids"][0].tolist()))
        slot = start + (last or 0)
        width = -(-VOCAB // self.rows)
        logits = np.full(self.rows * width, -1.0, np.float16)
        logits[self.answers.get(slot, 300 + slot)] = 5.0
        return {"logits": logits.reshape(1, self.rows, width)}


@pytest.fixture(scope="module")
def tok():
    return build_hf_tokenizer(MODEL)


def session(answers, tok, chunk=4, context=16):
    contract = Contract(chunk, context, VOCAB, 1, 2, (1, 1, context, 1))
    return ChatSession(Scripted(answers), contract, tok, get_chat_template("minicpm").jinja())


def test_chunks_positions_padding(tok):
    s = session({}, tok)
    s.feed(list(range(10, 20)))                               # 10 tokens, C = 4
    assert s.interp.calls == [("prefill", 0, 3, [10, 11, 12, 13]), ("prefill", 4, 3, [14, 15, 16, 17]),
                              ("prefill", 8, 1, [18, 19, 0, 0])]
    assert s.cached == list(range(10, 20))
    s.step(7)
    assert s.interp.calls[-1] == ("decode", 10, None, [7]) and len(s.cached) == 11


def test_near_the_end_decode_and_the_last_slot(tok):
    """A chunk that would run past N goes through decode; generation fills all N slots and still
    returns the token predicted from the last one."""
    msgs = [{"role": "user", "content": "def f(x): return x"}]
    n = len(session({}, tok, context=64).prompt_ids(msgs))    # BOS + rendered prompt
    assert n % 8 not in (0, 7)                                 # so the last chunk cannot be padded:
    context = n + 2                                            # n // 8 * 8 + 8 > n + 2
    s = session({}, tok, chunk=8, context=context)
    reply = s.reply(msgs, max_new_tokens=50)
    full = n // 8 * 8
    assert [c[1] for c in s.interp.calls if c[0] == "prefill"] == list(range(0, full, 8))
    assert [c[1] for c in s.interp.calls if c[0] == "decode"] == list(range(full, context))  # N - 1 used
    assert reply == [300 + n - 1, 300 + n, 300 + n + 1]        # N - n + 1 tokens
    assert len(s.cached) == context


def test_second_turn_reuses_the_state(tok):
    msgs = [{"role": "user", "content": "Lists hold items."}]
    n = len(session({}, tok).prompt_ids(msgs))
    s = session({n + 1: 2}, tok, chunk=8, context=64)
    first = s.reply(msgs, max_new_tokens=10)
    assert first == [300 + n - 1, 300 + n]                     # EOS stops, not appended
    held = list(s.cached)                                      # prompt + first[0] (first[1] never fed)
    msgs += [{"role": "assistant", "content": tok.decode(first)}, {"role": "user", "content": "More?"}]
    ids = s.prompt_ids(msgs)
    keep = next(i for i, (a, b) in enumerate(zip(held + [-1], ids)) if a != b)
    s.interp.calls.clear()
    s.interp.answers = {len(ids): 2}
    assert s.reply(msgs, max_new_tokens=10) == [300 + len(ids) - 1]
    assert s.interp.calls[0][1] == keep > len(held) // 2       # fed from the kept prefix on
    assert s.cached[:keep] == held[:keep] and s.cached == ids + [300 + len(ids) - 1]


def test_streams_whole_characters_only(tok):
    """A character split over byte-fallback pieces is shown once complete, never as U+FFFD."""
    pieces = tok.encode("中x", add_special_tokens=False).ids[1:]     # drop the leading "▁"
    assert sum(tok.id_to_token(i).startswith("<0x") for i in pieces) == 3
    msgs = [{"role": "user", "content": "hi"}]
    n = len(session({}, tok).prompt_ids(msgs))
    s = session({n - 1 + i: t for i, t in enumerate(pieces + [2])}, tok, chunk=8, context=64)
    shown = []
    assert s.reply(msgs, 20, shown.append) == pieces
    assert shown == ["中", "x"]


def test_ane_layout_argmax(tok):
    s = session({}, tok)
    logits = np.full((1, 3, 2731), -1, np.float16)
    logits[0, 2, 2730] = 9                                     # id 8192: padding, never chosen
    logits[0, 1, 5] = logits[0, 2, 0] = 4                      # ids 2736 and 5462: first wins
    assert s.argmax(logits) == 2736
    assert s.argmax(logits.reshape(1, 1, -1)[:, :, :VOCAB]) == 2736


def test_too_long_and_busy(tok):
    s = session({}, tok, context=8)
    with pytest.raises(ChatError, match="tooLong"):
        s.reply([{"role": "user", "content": "a rather long question for a tiny window"}], 4)
    s.busy = True
    with pytest.raises(ChatError, match="busy"):
        s.reply([{"role": "user", "content": "a"}], 4)
