"""SentencePiece tokenizer with LlamaTokenizer conventions (BOS added, no EOS)."""
from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from .errors import ExportError


class Tokenizer:
    def __init__(self, model_file: Path):
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(model_file))
        except (OSError, RuntimeError) as e:
            raise ExportError(f"{model_file}: cannot load SentencePiece model ({e})") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def piece_id(self, piece: str) -> int:
        return self.sp.PieceToId(piece)
