"""Run a compiled MiniCPM TVM library on the host: the MLC-LLM engine's call sequence (docs/DESIGN.md).

Per generation: create_tir_paged_kv_cache -> kv_state_add_sequence(0) -> for each prompt chunk
(<= prefill_chunk tokens): embed (-> [n, hidden]) copied into alloc_embedding_tensor's workspace ->
begin_forward / prefill(workspace viewed [1, n, hidden]) -> (logits, kv) / end_forward -> for each new
token: the same with decode. Greedy sampling (argmax). ``embed_hook`` may rewrite the prompt's
embeddings (the vision splice) before prefill.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import tvm
from tvm import relax

from exporter.errors import ExportError
from exporter.model import check_generation

PAGE_SIZE = 16


@dataclass
class Generation:
    tokens: list[int]
    logits: list[np.ndarray] = field(repr=False)   # logits that chose each new token
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_len: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_len / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = max(len(self.tokens) - 1, 0)      # the first new token comes from prefill
        return n / self.decode_s if self.decode_s else 0.0


class TVMModel:
    def __init__(self, lib: Path | tvm.runtime.Module, params: list[np.ndarray], context_window: int,
                 prefill_chunk: int):
        if isinstance(lib, (str, Path)):
            if not Path(lib).is_file():
                raise ExportError(f"{lib}: compiled model library not found")
            lib = tvm.runtime.load_module(str(lib))
        self.dev = tvm.cpu()
        self.vm = relax.VirtualMachine(lib, self.dev)
        self.params = [tvm.runtime.tensor(np.ascontiguousarray(a), self.dev) for a in params]
        self.context_window, self.prefill_chunk = context_window, prefill_chunk
        g = tvm.get_global_func
        self._add_seq = g("vm.builtin.kv_state_add_sequence")
        self._begin = g("vm.builtin.kv_state_begin_forward")
        self._end = g("vm.builtin.kv_state_end_forward")

        self.workspace = self.vm["alloc_embedding_tensor"]()    # [prefill_chunk of the library, hidden]
        self.hidden = int(self.workspace.shape[1])
        if prefill_chunk > int(self.workspace.shape[0]):
            raise ExportError(f"prefill chunk {prefill_chunk} exceeds the library's {self.workspace.shape[0]}")

    def new_cache(self):
        S = tvm.runtime.ShapeTuple
        kv = self.vm["create_tir_paged_kv_cache"](S([1]), S([self.context_window]), S([self.prefill_chunk]),
                                                  S([PAGE_SIZE]), S([0]))
        self._add_seq(kv, 0)
        return kv

    def embed(self, ids: list[int]) -> np.ndarray:
        """embed(ids) -> float32[n, hidden] (already * scale_emb)."""
        return self.vm["embed"](tvm.runtime.tensor(np.asarray(ids, dtype="int32"), self.dev), self.params).numpy()

    def forward(self, kv, embeds: np.ndarray, fn: str = "prefill") -> np.ndarray:
        """One prefill/decode of embeds [n, hidden] through the workspace; logits of the last position."""
        n = embeds.shape[0]
        view = self.workspace._create_view((1, n, self.hidden), "float32")
        view.copyfrom(np.ascontiguousarray(embeds.reshape(1, n, self.hidden), dtype=np.float32))
        self._begin(kv, tvm.runtime.ShapeTuple([0]), tvm.runtime.ShapeTuple([n]))
        logits, _ = self.vm[fn](view, kv, self.params)
        self._end(kv)
        return logits.numpy()[0, -1]

    def forward_chunks(self, kv, embeds: np.ndarray) -> np.ndarray:
        """Prefill embeds [n, hidden] in chunks of prefill_chunk; logits of the last position."""
        for s in range(0, embeds.shape[0], self.prefill_chunk):
            logits = self.forward(kv, embeds[s:s + self.prefill_chunk])
        return logits

    def generate(self, prompt: list[int], max_new_tokens: int, eos_id: int | None = None,
                 embed_hook: Callable[[np.ndarray], np.ndarray] | None = None,
                 stop_ids: set[int] | None = None) -> Generation:
        if not prompt:
            raise ExportError("prompt is empty after tokenization")
        check_generation(max_new_tokens, len(prompt), self.context_window)
        stop = set(stop_ids or ()) | ({eos_id} if eos_id is not None else set())
        kv = self.new_cache()
        t0 = time.perf_counter()
        embeds = self.embed(prompt)
        logits = self.forward_chunks(kv, embed_hook(embeds) if embed_hook else embeds)
        t1 = time.perf_counter()
        out, steps = [], []
        for i in range(max_new_tokens):
            steps.append(logits)
            nxt = int(np.argmax(logits))
            out.append(nxt)
            if nxt in stop or i == max_new_tokens - 1:
                break
            logits = self.forward(kv, self.embed([nxt]), "decode")
        t2 = time.perf_counter()
        return Generation(out, steps, prefill_s=t1 - t0, decode_s=t2 - t1, prompt_len=len(prompt))


def load_bundle(bundle: Path) -> tuple[TVMModel, "Tokenizer", dict]:
    """The host build of an android/harmony bundle, its tokenizer and mlc-chat-config.json."""
    import json

    from exporter.bundle import read_manifest
    from exporter.tokenizer import Tokenizer
    from exporter.verify import require_verified

    from .params import read_tensor_cache

    bundle = Path(bundle)
    require_verified(bundle, host_run=True)   # refuse tampered / mismatched bundles (exporter/verify.py)
    manifest = read_manifest(bundle)
    if manifest.get("target") not in ("android", "harmony"):
        raise ExportError(f"{bundle}: a '{manifest.get('target')}' bundle; `run` needs an android or "
                          f"harmony (TVM) bundle")
    conf_path = bundle / "mlc-chat-config.json"
    try:
        conf = json.loads(conf_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{conf_path}: cannot read ({e})") from None
    params = [a for _, a in read_tensor_cache(bundle)]   # MLC's flat layout: next to mlc-chat-config.json
    model = TVMModel(bundle / "lib" / "host" / "model.so", params, conf["context_window_size"],
                     conf["prefill_chunk_size"])
    return model, Tokenizer(bundle / "tokenizer.model"), conf


def run_bundle(bundle: Path, prompt: str, max_new_tokens: int = 32, chat: bool = True) -> dict:
    """Greedy generation with the bundle's host build (what `mcpm-export run` prints). ``chat``: the
    prompt is one user turn in the bundle's chat template (exporter/chat.py, as the model was trained);
    else it is tokenized as is. Generation stops at the template's stop tokens."""
    from exporter.chat import get_chat_template

    check_generation(max_new_tokens)
    model, tok, conf = load_bundle(bundle)
    template = get_chat_template(conf.get("mcpm", {}).get("chat_template", "plain"))
    text = template.format_turns([("user", prompt)]) if chat else prompt
    ids = tok.encode(text, bos=template.add_bos or not chat)
    stop = set(template.stop_token_ids) | {tok.eos_id}
    gen = model.generate(ids, max_new_tokens, stop_ids=stop)
    return {"bundle": str(bundle), "chat_template": template.name if chat else None, "prompt_text": text,
            "prompt_tokens": len(ids), "tokens": gen.tokens, "text": tok.decode(gen.tokens),
            "prefill_tok_s": round(gen.prefill_tok_s, 2), "decode_tok_s": round(gen.decode_tok_s, 2),
            "backend": "host (x86_64 build in lib/host)"}
