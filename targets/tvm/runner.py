"""Run a compiled MiniCPM TVM library on the host: the MLC-LLM engine's call sequence (docs/DESIGN.md).

Per generation: create_tir_paged_kv_cache -> kv_state_add_sequence(0) -> for each prompt chunk
(<= prefill_chunk tokens): embed (-> [n, hidden]) copied into alloc_embedding_tensor's workspace ->
begin_forward / prefill(workspace viewed [1, n, hidden]) -> (logits, kv) / end_forward -> for each new
token: the same with decode. Greedy sampling (argmax, exporter/parity.greedy: TVMModel is a parity
Engine). ``embed_hook`` may rewrite the prompt's embeddings (the vision splice) before prefill.

Vision (MiniCPM-V bundles): VisionRunner runs the compiled encoder (vision/lib/host/vision.so, built by
targets/tvm/vision.py): image -> plan -> per encoded image ``image_embed`` -> features, which
generate_with_image splices over the prompt's <unk> rows; run_bundle_with_image is `run --image`.
"""
from __future__ import annotations

import json
import mmap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import tvm
from tvm import relax

from exporter.chat import get_chat_template
from exporter.errors import ExportError
from exporter.model import check_generation
from exporter.parity import Generation, greedy
from exporter.vision import preprocess as pp
from exporter.vision.config import VisionConfig
from exporter.vision.slicing import ImagePlan, image_prompt, plan_image, read_image, slice_images

PAGE_SIZE = 16
VISION_FUNCTION = "image_embed"   # the vision library's VM function (DESIGN.md, Vision)
VISION_DIR = "vision"             # the vision part's folder in the bundle


HUGE_PAGE = 2 << 20


def host_tensors(arrays: list[np.ndarray]) -> list[tvm.runtime.Tensor]:
    """The arrays as host tensors in one arena that Linux backs with 2 MiB transparent huge pages
    (madvise MADV_HUGEPAGE before the first touch; where that is refused, ordinary pages).

    Decode reads every weight once per token: MiniCPM-2B's 1.5 GB are ~375k pages of 4 KiB, a TLB
    miss each (a two-level walk under virtualisation), against ~750 of 2 MiB (bench/RESULTS.md)."""
    offsets, size = [], 0
    for a in arrays:
        size = -(-size // 64) * 64              # TVM's tensor alignment
        offsets.append(size)
        size += a.nbytes
    arena = mmap.mmap(-1, size + HUGE_PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)   # zero-filled, untouched
    base = -np.frombuffer(arena, np.uint8, 1).ctypes.data % HUGE_PAGE
    try:
        arena.madvise(mmap.MADV_HUGEPAGE, base, size)
    except (AttributeError, OSError):           # not Linux, or THP disabled: ordinary pages
        pass
    out = []
    for a, off in zip(arrays, offsets):
        view = np.frombuffer(arena, a.dtype, a.size, base + off).reshape(a.shape)
        view[...] = a
        out.append(tvm.runtime.from_dlpack(view))   # the view (and so the arena) lives as long as the tensor
    return out


def host_vm(lib: Path | tvm.runtime.Module, params: list[np.ndarray], what: str):
    """(device, VirtualMachine, params on the device) of a host (x86_64) library or loaded module."""
    if isinstance(lib, (str, Path)):
        if not Path(lib).is_file():
            raise ExportError(f"{lib}: compiled {what} library not found")
        lib = tvm.runtime.load_module(str(lib))
    dev = tvm.cpu()
    return dev, relax.VirtualMachine(lib, dev), host_tensors(params)


class TVMModel:
    def __init__(self, lib: Path | tvm.runtime.Module, params: list[np.ndarray], context_window: int,
                 prefill_chunk: int):
        self.dev, self.vm, self.params = host_vm(lib, params, "model")
        self.context_window, self.prefill_chunk = context_window, prefill_chunk
        g = tvm.get_global_func
        self._add_seq = g("vm.builtin.kv_state_add_sequence")
        self._begin = g("vm.builtin.kv_state_begin_forward")
        self._end = g("vm.builtin.kv_state_end_forward")
        self._clear = g("vm.builtin.kv_state_clear")
        self.kv, self._kv_size = None, None     # the one KV cache (new_cache)

        self.workspace = self.vm["alloc_embedding_tensor"]()    # [prefill_chunk of the library, hidden]
        self.hidden = int(self.workspace.shape[1])
        if prefill_chunk > int(self.workspace.shape[0]):
            raise ExportError(f"prefill chunk {prefill_chunk} exceeds the library's {self.workspace.shape[0]}")

    def new_cache(self):
        """The model's KV cache, empty but for sequence 0. It is created on the first call and cleared on
        later ones, as MLC's engine keeps one cache: a new one is fresh memory, and its first pass takes a
        page fault per 4 KiB of KV (~90 per decoded token at MiniCPM-2B's width) on the calling thread."""
        size = (self.context_window, self.prefill_chunk)
        if self.kv is None or self._kv_size != size:
            S = tvm.runtime.ShapeTuple
            self.kv = None                    # the old cache's memory goes before the new one is made
            self.kv = self.vm["create_tir_paged_kv_cache"](S([1]), S([size[0]]), S([size[1]]), S([PAGE_SIZE]), S([0]))
            self._kv_size = size
        else:
            self._clear(self.kv)
        self._add_seq(self.kv, 0)
        return self.kv

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

    def prefill(self, ids: list[int], embed_hook: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """exporter/parity Engine: a fresh KV cache, embed (+ ``embed_hook``), chunked prefill; last logits."""
        self.new_cache()
        embeds = self.embed(ids)
        return self.forward_chunks(self.kv, embed_hook(embeds) if embed_hook else embeds)

    def decode(self, token: int) -> np.ndarray:
        return self.forward(self.kv, self.embed([token]), "decode")

    def generate(self, prompt: list[int], max_new_tokens: int, eos_id: int | None = None,
                 embed_hook: Callable[[np.ndarray], np.ndarray] | None = None,
                 stop_ids: set[int] | None = None) -> Generation:
        if not prompt:
            raise ExportError("prompt is empty after tokenization")
        check_generation(max_new_tokens, len(prompt), self.context_window)
        stop = set(stop_ids or ()) | ({eos_id} if eos_id is not None else set())
        engine = self if embed_hook is None else _Spliced(self, embed_hook)
        return greedy(engine, prompt, max_new_tokens, stop)


@dataclass
class _Spliced:
    """A TVMModel whose prompt embeddings go through ``hook`` (the vision splice) before prefill."""
    model: TVMModel
    hook: Callable[[np.ndarray], np.ndarray]

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self.model.prefill(ids, self.hook)

    def decode(self, token: int) -> np.ndarray:
        return self.model.decode(token)


def load_bundle(bundle: Path) -> tuple[TVMModel, "Tokenizer", dict]:
    """The host build of an android/harmony bundle, its tokenizer and mlc-chat-config.json."""
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


class VisionRunner:
    """Host runtime of the compiled vision library: image -> [n_images * query_num, hidden]."""

    def __init__(self, lib, params: list[np.ndarray], vcfg: VisionConfig, key_pos: np.ndarray | None = None):
        self.dev, self.vm, self.params = host_vm(lib, params, "vision")
        self.cfg, self.key_pos = vcfg, key_pos

    @classmethod
    def from_bundle(cls, bundle: Path) -> "VisionRunner":
        from .params import read_tensor_cache
        vdir = Path(bundle) / VISION_DIR
        conf_path = vdir / "vision-config.json"
        if not conf_path.is_file():
            raise ExportError(f"{bundle}: bundle has no vision part ({conf_path} missing)")
        conf = json.loads(conf_path.read_text())
        vcfg = VisionConfig(**conf["config"])
        key_pos = None
        if conf.get("key_pos"):
            key_pos = np.fromfile(vdir / conf["key_pos"]["file"], dtype=np.float32).reshape(conf["key_pos"]["shape"])
        params = [a for _, a in read_tensor_cache(vdir / "params")]
        return cls(vdir / "lib" / "host" / "vision.so", params, vcfg, key_pos)

    def embed_one(self, image) -> np.ndarray:
        inp = pp.encoder_inputs(image, self.cfg, self.key_pos)
        args = [tvm.runtime.tensor(inp[k], self.dev) for k in pp.INPUT_NAMES]
        return self.vm[VISION_FUNCTION](*args, self.params).numpy()

    def embed_image(self, image) -> tuple[ImagePlan, np.ndarray, list[float]]:
        """(plan, features [n_images*Q, D], seconds per encoded image)."""
        plan = plan_image(image.width, image.height, self.cfg)
        feats, times = [], []
        for im in slice_images(image, plan):
            t0 = time.perf_counter()
            feats.append(self.embed_one(im))
            times.append(time.perf_counter() - t0)
        return plan, np.concatenate(feats), times


def generate_with_image(model, ids: list[int], starts: list[int], feats: np.ndarray, query_num: int,
                        max_new_tokens: int, eos_id: int | None = None) -> dict:
    """Greedy generation with a compiled text model (targets/tvm/runner.TVMModel) and spliced
    image features: embed(ids) -> features replace the <unk> rows -> chunked prefill -> decode."""
    from exporter.vision.multimodal import splice

    check_generation(max_new_tokens, len(ids), model.context_window, "image prompt")
    gen = model.generate(ids, max_new_tokens, eos_id,
                         embed_hook=lambda embeds: splice(embeds, starts, feats, query_num))
    return {"tokens": gen.tokens, "logits": gen.logits, "prefill_s": gen.prefill_s, "decode_s": gen.decode_s}


def run_bundle_with_image(bundle: Path, image_path: Path, prompt: str, max_new_tokens: int = 32,
                          chat: bool = True) -> dict:
    """`mcpm-export run BUNDLE --image PATH`: vision encode (per slice), prefill and decode timed apart.
    ``chat``: the prompt is a user turn of the bundle's chat template opened by the image; else as is."""
    check_generation(max_new_tokens)
    image = read_image(image_path, "--image ")
    vision = VisionRunner.from_bundle(Path(bundle))
    model, tok, conf = load_bundle(Path(bundle))
    plan, feats, times = vision.embed_image(image)
    template = get_chat_template(conf.get("mcpm", {}).get("chat_template", "minicpm-v")) if chat else None
    ids, starts = image_prompt(tok, plan, prompt, Path(bundle) / "tokenizer_config.json", template)
    gen = generate_with_image(model, ids, starts, feats, vision.cfg.query_num, max_new_tokens,
                              conf.get("eos_token_id"))
    n_new = len(gen["tokens"])
    return {"bundle": str(bundle), "image": str(image_path), "plan": plan.to_dict(), "prompt_tokens": len(ids),
            "tokens": gen["tokens"], "text": tok.decode(gen["tokens"]),
            "vision_encode_s": [round(t, 4) for t in times], "vision_total_s": round(sum(times), 4),
            "prefill_s": round(gen["prefill_s"], 4), "prefill_tok_s": round(len(ids) / gen["prefill_s"], 2),
            "decode_tok_s": round((n_new - 1) / gen["decode_s"], 2) if n_new > 1 and gen["decode_s"] else 0.0,
            "backend": "host (x86_64 builds in lib/host and vision/lib/host)"}
