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

    def encode(self, text: str, bos: bool = True, what: str = "text") -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:     # a command-line argument that was not UTF-8 (surrogate escapes)
            raise ExportError(f"{what}: not valid UTF-8 text (undecodable byte at character {e.start})") from None
        ids = self.sp.EncodeAsIds(text)
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def piece_id(self, piece: str) -> int:
        return self.sp.PieceToId(piece)


def read_text_file(path: Path, label: str) -> str:
    """A UTF-8 text file's content, or one ExportError line naming the file (missing, binary, empty)."""
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ExportError(f"{label} {path}: no such file") from None
    except OSError as e:
        raise ExportError(f"{label} {path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ExportError(f"{label} {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}; "
                          f"convert it, e.g. iconv -f latin1 -t utf-8)") from None
    if "\0" in text:
        raise ExportError(f"{label} {path}: a binary file, not text (NUL byte at offset "
                          f"{data.index(0)})")
    if not text.strip():
        raise ExportError(f"{label} {path}: empty file")
    return text
