"""Hugging Face tokenizer files (tokenizer.json + tokenizer_config.json) from a SentencePiece tokenizer.model.

Converted offline with the `tokenizers` library, in the layout transformers' LlamaConverter gives legacy Llama
tokenizers (BPE with byte fallback over the whole text, normalizer Prepend + Replace, no pre-tokenizer), which
is what swift-transformers' `AutoTokenizer.from(modelFolder:)` and transformers' `AutoTokenizer` load. The BPE
merges come from the SentencePiece vocabulary: every split (left, right) of a piece into two pieces, ranked by
the piece's score, which is the order SentencePiece's BPE applies them in. The written tokenizer is checked to
give SentencePiece's ids on a probe text before the files are written (`ExportError` otherwise).
"""
from __future__ import annotations

import json
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, processors

from .errors import ExportError
from .tokenizer import Tokenizer

SPACE = "\u2581"  # SentencePiece's whitespace symbol
PROBE_TEXT = (Path(__file__).resolve().parent / "data" / "calibration.txt")
PROBE_EXTRA = ("  leading spaces,\ttabs\n\n    indented code()\r\n", "中文混合 English 123 ✓ 😀 ",
               "def f(x):\n        return x ** 2  # comment\n", "trailing space ", "")
FILES = ["tokenizer.json", "tokenizer_config.json"]
_Piece = sp_pb2.ModelProto.SentencePiece


def _load_proto(tokenizer_model: Path) -> sp_pb2.ModelProto:
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(tokenizer_model).read_bytes())
    except (OSError, ValueError) as e:
        raise ExportError(f"{tokenizer_model}: cannot read SentencePiece model ({e})") from None
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    unsupported = []
    if spec.model_type != sp_pb2.TrainerSpec.BPE:
        unsupported.append(f"model_type {sp_pb2.TrainerSpec.ModelType.Name(spec.model_type)} (only BPE)")
    if not spec.byte_fallback:
        unsupported.append("byte_fallback off")
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        unsupported.append(f"normalizer '{norm.name}' (only identity)")
    if norm.remove_extra_whitespaces:
        unsupported.append("remove_extra_whitespaces")
    if spec.treat_whitespace_as_suffix:
        unsupported.append("treat_whitespace_as_suffix")
    if unsupported:
        raise ExportError(f"{tokenizer_model}: cannot convert to tokenizer.json: {', '.join(unsupported)}")
    return proto


def _merges(pieces: list[_Piece], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a normal piece, in SentencePiece's merge priority."""
    ranked = []
    for pid, p in enumerate(pieces):
        if p.type != _Piece.NORMAL or len(p.piece) < 2:
            continue
        for i in range(1, len(p.piece)):
            left, right = p.piece[:i], p.piece[i:]
            if left in vocab and right in vocab:
                ranked.append((-p.score, pid, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(r[4], r[5]) for r in ranked]


def build_hf_tokenizer(tokenizer_model: Path) -> HFTokenizer:
    """The `tokenizers` equivalent of the SentencePiece model (Llama conventions: BOS added, no EOS)."""
    proto = _load_proto(tokenizer_model)
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    spec = proto.trainer_spec
    unk = pieces[spec.unk_id].piece
    bpe = models.BPE(vocab=vocab, merges=_merges(pieces, vocab), unk_token=unk, fuse_unk=True,
                     byte_fallback=True)
    tok = HFTokenizer(bpe)
    steps = [normalizers.Prepend(SPACE)] if proto.normalizer_spec.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    special = [p.piece for p in pieces if p.type in (_Piece.CONTROL, _Piece.UNKNOWN)]
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in special])
    user = [p.piece for p in pieces if p.type == _Piece.USER_DEFINED]
    if user:
        tok.add_tokens([AddedToken(s, normalized=False, special=False) for s in user])
    bos = pieces[spec.bos_id].piece
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, spec.bos_id)])
    return tok


def check_against_sentencepiece(hf: HFTokenizer, sp: Tokenizer, texts: list[str]) -> None:
    """ExportError unless `hf` encodes every text to SentencePiece's ids (BOS included) and decodes it back."""
    for text in texts:
        want, got = sp.encode(text), hf.encode(text).ids
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise ExportError(f"tokenizer.json disagrees with tokenizer.model at token {at}: "
                              f"{got[at:at + 4]} vs {want[at:at + 4]}")
        if hf.decode(got, skip_special_tokens=True) != sp.decode(want):
            raise ExportError("tokenizer.json decodes differently from tokenizer.model")


def write_hf_tokenizer(tokenizer_model: Path, out_dir: Path, chat_template: str | None, *,
                       model_max_length: int | None = None, strict: bool = True,
                       say=lambda msg: None) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json into out_dir; returns the file names written.
    ``strict=False`` (runtimes that read tokenizer.model too, such as MLC-LLM's): a tokenizer.json that
    disagrees with SentencePiece is left out (``say`` tells why) instead of stopping the export."""
    hf = build_hf_tokenizer(tokenizer_model)
    sp = Tokenizer(tokenizer_model)
    probe = PROBE_TEXT.read_text(encoding="utf-8")[:20000]
    # user-defined pieces (e.g. chat role markers) are added tokens here: the text around them is
    # normalized piece by piece, as swift-transformers does, which SentencePiece may not match
    user = [t.content for t in hf.get_added_tokens_decoder().values() if not t.special][:32]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        check_against_sentencepiece(hf, sp, [probe, *PROBE_EXTRA, *(f"{u}hello {u} world{u}" for u in user)])
        hf.save(str(out_dir / "tokenizer.json"))
    except ExportError as e:
        if strict:
            raise
        say(f"tokenizer.json left out ({e}); tokenizer.model is the tokenizer")
    piece = sp.sp.IdToPiece
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": piece(sp.bos_id), "eos_token": piece(sp.eos_id), "unk_token": piece(sp.sp.unk_id()),
        "pad_token": None,
        "add_bos_token": True, "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): _added(t) for i, t in sorted(hf.get_added_tokens_decoder().items())},
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    return [name for name in FILES if (out_dir / name).is_file()]


def _added(token: AddedToken) -> dict:
    return {"content": token.content, "lstrip": token.lstrip, "normalized": token.normalized,
            "rstrip": token.rstrip, "single_word": token.single_word, "special": token.special}
