"""tokenizer.json / tokenizer_config.json converted from tokenizer.model: same ids as SentencePiece, same text back."""
import json
from pathlib import Path

import pytest
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import Tokenizer as HFTokenizer, normalizers

from exporter.errors import ExportError
from exporter.hf_tokenizer import build_hf_tokenizer, check_against_sentencepiece, write_hf_tokenizer
from exporter.recipes import EMBEDDED_DIR
from exporter.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
MODEL = EMBEDDED_DIR / "tinycpm-docs" / "tokenizer.model"
EVAL_TEXT = ROOT.parent / "shared" / "eval" / "python-tutorial.txt"
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    names = write_hf_tokenizer(MODEL, out, TEMPLATE, model_max_length=512)
    return out, names


def test_files_and_config(written):
    out, names = written
    assert sorted(names) == ["tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["chat_template"] == TEMPLATE
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False
    assert cfg["tokenizer_class"] == "LlamaTokenizer" and cfg["model_max_length"] == 512
    assert cfg["added_tokens_decoder"]["1"]["content"] == "<s>"


def test_eval_text_same_ids_and_round_trip(written):
    out, _ = written
    hf = HFTokenizer.from_file(str(out / "tokenizer.json"))
    sp = Tokenizer(MODEL)
    text = EVAL_TEXT.read_text(encoding="utf-8")
    want = sp.encode(text)
    enc = hf.encode(text)
    assert want[0] == sp.bos_id and len(want) > 50000
    assert enc.ids == want
    assert hf.encode(text, add_special_tokens=False).ids == want[1:]
    assert hf.decode(enc.ids, skip_special_tokens=True) == text


def test_byte_fallback_round_trip(written):
    """Characters outside the 8192-piece vocabulary go through <0xXX> pieces and come back whole."""
    out, _ = written
    hf = HFTokenizer.from_file(str(out / "tokenizer.json"))
    sp = Tokenizer(MODEL)
    text = "中文 mixed with English, emoji 😀 and ✓"
    ids = hf.encode(text).ids
    assert ids == sp.encode(text)
    assert any(hf.id_to_token(i).startswith("<0x") for i in ids)
    assert hf.decode(ids, skip_special_tokens=True) == text


def test_check_catches_a_wrong_tokenizer():
    hf = build_hf_tokenizer(MODEL)
    hf.normalizer = normalizers.Replace(" ", "\u2581")  # no dummy prefix: ids differ from SentencePiece
    with pytest.raises(ExportError, match="disagrees with tokenizer.model at token 1"):
        check_against_sentencepiece(hf, Tokenizer(MODEL), ["hello world"])


def test_unsupported_model_is_one_clear_error(tmp_path):
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(MODEL.read_bytes())
    proto.trainer_spec.model_type = sp_pb2.TrainerSpec.UNIGRAM
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(proto.SerializeToString())
    with pytest.raises(ExportError, match="model_type UNIGRAM"):
        write_hf_tokenizer(bad, tmp_path / "out", None)
    assert not (tmp_path / "out").exists()


def test_user_defined_pieces_are_checked(tmp_path):
    """A user-defined piece (a chat role marker) is an added token in tokenizer.json; swift-transformers
    then normalizes the text around it piece by piece (a dummy-prefix "▁" after every marker), which
    SentencePiece does not: the export refuses instead of shipping different ids."""
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(MODEL.read_bytes())
    piece = proto.pieces.add()
    piece.piece, piece.type = "<用户>", sp_pb2.ModelProto.SentencePiece.USER_DEFINED
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(proto.SerializeToString())
    with pytest.raises(ExportError, match="disagrees with tokenizer.model"):
        write_hf_tokenizer(bad, tmp_path / "out", None)
    said = []                           # android/harmony (MLC reads tokenizer.model too): left out, said why
    assert write_hf_tokenizer(bad, tmp_path / "lenient", None, strict=False, say=said.append) == \
        ["tokenizer_config.json"]
    assert not (tmp_path / "lenient" / "tokenizer.json").exists() and "disagrees" in said[0]
    proto.normalizer_spec.add_dummy_prefix = False                  # then the two agree
    bad.write_bytes(proto.SerializeToString())
    assert write_hf_tokenizer(bad, tmp_path / "out", None) == ["tokenizer.json", "tokenizer_config.json"]
    hf = HFTokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert hf.encode("<用户>hi<用户>", add_special_tokens=False).ids[0] == 8192
