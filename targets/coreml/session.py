"""The Swift sample of docs/ios.md (`MiniCPMChat`), transcribed line for line into Python.

Swift with Core ML cannot run here, so this transcription runs the same loop against the NumPy MIL
interpreter (the `MLModel.prediction(from:using:)` stand-in) and the tests compare it with the PyTorch
reference. Keep the two in step: same chunking (chunks of C tokens starting at the first uncached
token, right-padded with 0, `last_index` = real tokens - 1), positions (`start_pos` = tokens in the
state), state handling (one state per conversation; the cached prefix shared with the new prompt is
kept, the rest overwritten), single-token `decode` calls once a padded chunk would run past the window,
the last KV slot used (generation stops only when all N slots hold tokens), Float16 argmax over the
logits buffer (first maximum; ids >= vocab are --ane-head padding), EOS, streaming text that waits
while the decoded text ends in U+FFFD (an incomplete UTF-8 sequence from byte-fallback pieces).

The tokenizer is the bundle's tokenizer.json through the `tokenizers` library (what swift-transformers
reads), the prompt the bundle's `chat_template` rendered with Jinja and encoded without special tokens
(swift-transformers' `applyChatTemplate`), BOS prepended when the template does not add it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from exporter.errors import ExportError

from .convert import STATE_NAMES
from .mil_interp import Interpreter


@dataclass(frozen=True)
class Contract:
    """What the Swift sample reads from manifest.json ("coreml")."""
    chunk: int                  # C = prefill_chunk
    context: int                # N = context_window
    vocab: int
    bos: int
    eos: int
    state_shape: tuple[int, ...]
    stop_ids: frozenset[int] = frozenset()      # EOS + the chat template's stop_token_ids

    def __post_init__(self):
        object.__setattr__(self, "stop_ids", frozenset(self.stop_ids) | {self.eos})

    @classmethod
    def from_manifest(cls, coreml: dict) -> "Contract":
        shape = coreml["functions"]["decode"]["states"]["key_cache"]["shape"]
        stops = coreml.get("files", {}).get("chat_template", {}).get("stop_token_ids", [])
        return cls(coreml["prefill_chunk"], coreml["context_window"], coreml["vocab_size"],
                   coreml["bos_token_id"], coreml["eos_token_id"], tuple(shape), frozenset(stops))


class ChatError(ExportError):
    """Swift: `enum ChatError` (tooLong, busy)."""


class ChatSession:
    """Swift: `actor MiniCPMChat`. One conversation, one state; not for concurrent use."""

    def __init__(self, interp: Interpreter, contract: Contract, tokenizer=None, template: str | None = None):
        self.interp, self.c = interp, contract
        self.tokenizer, self.template = tokenizer, template
        self.busy = False
        self.reset()

    def reset(self) -> None:
        """Swift: `state = prefill.makeState(); cached = []` (a new conversation)."""
        self.state = {n: np.zeros(self.c.state_shape, np.float16) for n in STATE_NAMES}
        self.cached: list[int] = []         # cached[i] = the token whose K/V sit in slot i

    def feed(self, tokens: list[int]) -> np.ndarray:
        """Swift: `feed(_:)`. Run tokens after the cached ones; the logits after the last one."""
        C, N = self.c.chunk, self.c.context
        logits = None
        i = 0
        while i < len(tokens):
            pos = len(self.cached)
            n = min(C, len(tokens) - i)
            if pos + C <= N:                        # prefill writes all C slots, padding included
                chunk = tokens[i:i + n]
                padded = np.array([chunk + [0] * (C - n)], np.int32)
                logits = self.interp.run("prefill", {"input_ids": padded,
                                                     "start_pos": np.array([pos], np.int32),
                                                     "last_index": np.array([n - 1], np.int32)},
                                         self.state)["logits"]
                self.cached += chunk
                i += n
            else:                                   # near the end of the window: one slot at a time
                logits = self.step(tokens[i])
                i += 1
        return logits

    def step(self, token: int) -> np.ndarray:
        """Swift: `step(_:)`, one `decode` call at start_pos = tokens in the state."""
        logits = self.interp.run("decode", {"input_ids": np.array([[token]], np.int32),
                                            "start_pos": np.array([len(self.cached)], np.int32)},
                                 self.state)["logits"]
        self.cached.append(token)
        return logits

    def argmax(self, logits: np.ndarray) -> int:
        """Swift: `argmax(_:)` over the Float16 buffer, shape [1, P, R] (P = 1 unless --ane-head),
        token id p * R + r, ids >= vocab skipped, first maximum wins."""
        buf = np.ascontiguousarray(logits, np.float16)
        rows, width = buf.shape[1], buf.shape[2]
        best, best_value = 0, -np.inf
        for p in range(rows):
            row = buf[0, p, :max(0, min(width, self.c.vocab - p * width))]
            if row.size and row.max() > best_value:          # Swift scans element by element
                best, best_value = p * width + int(row.argmax()), float(row.max())
        return best

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Swift: `tokenizer.applyChatTemplate(messages:)` (no special tokens added), BOS once."""
        text = render_chat(self.template, messages, self.tokenizer.id_to_token(self.c.bos),
                           self.tokenizer.id_to_token(self.c.eos))
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids if ids[:1] == [self.c.bos] else [self.c.bos] + ids

    def reply(self, messages: list[dict], max_new_tokens: int,
              on_text: Callable[[str], None] = lambda s: None) -> list[int]:
        """Swift: `reply(to:maxNewTokens:onText:)`; returns the reply's token ids."""
        if self.busy:
            raise ChatError("busy: one state, one generation at a time")
        self.busy = True
        try:
            return self._reply(messages, max_new_tokens, on_text)
        finally:
            self.busy = False

    def _reply(self, messages, max_new_tokens, on_text) -> list[int]:
        ids = self.prompt_ids(messages)
        if len(ids) >= self.c.context:
            raise ChatError(f"tooLong: a prompt of {len(ids)} tokens does not fit {self.c.context}")
        keep = 0
        while keep < min(len(self.cached), len(ids)) and self.cached[keep] == ids[keep]:
            keep += 1
        keep = min(keep, len(ids) - 1)              # at least one token to feed: its logits start the reply
        del self.cached[keep:]
        logits = self.feed(ids[keep:])
        reply: list[int] = []
        shown = ""
        while True:
            nxt = self.argmax(logits)
            if nxt in self.c.stop_ids:
                break
            reply.append(nxt)
            text = self.tokenizer.decode(reply, skip_special_tokens=False)
            if not text.endswith("\ufffd"):         # an incomplete UTF-8 sequence so far: wait
                on_text(text[len(shown):])
                shown = text
            if len(reply) == max_new_tokens or len(self.cached) == self.c.context:
                break                               # window full: nxt was the last token it can predict
            logits = self.step(nxt)
        return reply


def render_chat(template: str | None, messages: list[dict], bos_token: str, eos_token: str) -> str:
    """The chat template rendered the way swift-transformers / transformers do (Jinja, trim_blocks,
    lstrip_blocks, add_generation_prompt true); without a template the contents are joined."""
    if template is None:
        return "".join(m["content"] for m in messages)
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ExportError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token=bos_token, eos_token=eos_token)


def open_bundle(bundle: Path) -> ChatSession:
    """A ChatSession on an exported ios bundle: package, manifest, tokenizer.json, chat template."""
    from tokenizers import Tokenizer as HFTokenizer

    from .side_files import PACKAGE

    bundle = Path(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    config = json.loads((bundle / "tokenizer_config.json").read_text(encoding="utf-8"))
    return ChatSession(Interpreter.from_package(bundle / PACKAGE), Contract.from_manifest(manifest["coreml"]),
                       HFTokenizer.from_file(str(bundle / "tokenizer.json")), config.get("chat_template"))
