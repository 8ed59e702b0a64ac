"""`mcpm-run --prompt` / `--prompt-file`: the runner's own SentencePiece BPE tokenizer (runner/tokenizer.cc) and
chat templates (runner/prompt.cc), real aarch64 build under qemu-aarch64-static, against the sentencepiece
Python package and exporter/chat.py.

Measured: ids equal SentencePiece's on every line of the eval text (6,9xx lines) and on every awkward string
below, for the tinycpm-docs tokenizer, the tiny MiniCPM-V one (user-defined image pieces) and a trained one
holding <用户>/<AI> as user-defined pieces (also with remove_extra_whitespaces, and without byte fallback);
decoding equals SentencePiece's DecodeIds. Bound: exact equality.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from PIL import Image

from exporter.chat import get_chat_template
from exporter.recipes import EMBEDDED_DIR
from exporter.tokenizer import Tokenizer
from runner import build
from test_runner import QEMU, run, run_json

pytestmark = pytest.mark.skipif(
    not (shutil.which(QEMU) and shutil.which("aarch64-linux-gnu-g++")),
    reason="needs qemu-aarch64-static and g++-aarch64-linux-gnu")

ROOT = Path(__file__).resolve().parent.parent
EVAL_TEXT = ROOT.parent / "shared" / "eval" / "python-tutorial.txt"
TINY_TOKENIZER = EMBEDDED_DIR / "tinycpm-docs" / "tokenizer.model"
AWKWARD = ["  two  spaces  between ", " leading", "trailing ", "   ", " ", "tabs\tand\t\ttabs", "中文混合 English 123",
           "emoji 😀🤖 and a family 👩‍👩‍👧", "<用户>你好<AI>", "<用户> spaced <AI> ", "<image>x</image><slice></slice>",
           "<im<image>age>", "e\u0301 ｆｕｌｌ　ｗｉｄｔｈ", "\u2581already escaped\u2581", "<unk><s></s>", "\x7f\x01",
           "carriage\rreturn"]
MULTILINE = ["def f(x):\r\n    return x ** 2  # comment", "line one\nline two\n", "\n\nleading newlines", "trailing newlines\n\n", "a\n  indented\n\tb\n"]


@pytest.fixture(scope="module")
def runner_dir() -> Path:
    return build.build_runner()


def _train(out: Path, **kw) -> Path:
    lines = EVAL_TEXT.read_text().splitlines()[:3000]
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(lines), model_prefix=str(out), vocab_size=900,
                                   model_type="bpe", normalization_rule_name="identity", minloglevel=2, **kw)
    return out.with_suffix(".model")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    from tests.support.tiny_minicpmv import _tokenizer_bytes
    d = tmp_path_factory.mktemp("tokenizers")
    (d / "tiny-v.model").write_bytes(_tokenizer_bytes())
    chat = dict(user_defined_symbols=["<用户>", "<AI>", "<image>", "<im"])
    return {"tiny": TINY_TOKENIZER, "tiny-v": d / "tiny-v.model",
            "chat": _train(d / "chat", byte_fallback=True, remove_extra_whitespaces=False, **chat),
            "chat-rx": _train(d / "chat-rx", byte_fallback=True, remove_extra_whitespaces=True, **chat),
            "no-byte-fallback": _train(d / "nbf", byte_fallback=False, remove_extra_whitespaces=False)}


def text_bundle(root: Path, tokenizer: Path, template: str = "plain") -> Path:
    """Just what --tokenize-only reads: tokenizer.model and mlc-chat-config.json (as targets/tvm/target.py writes
    the chat keys)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer, root / "tokenizer.model")
    t, tok = get_chat_template(template), Tokenizer(tokenizer)
    conf = {"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
            "conv_template": t.mlc_conversation(tok.bos_id), "mcpm": {"chat_template": t.name, "chat_options": t.options()}}
    (root / "mlc-chat-config.json").write_text(json.dumps(conf, ensure_ascii=False))
    return root


def tokenize(runner: Path, bundle: Path, *args) -> list[dict]:
    proc = run(runner, "--bundle", bundle, "--tokenize-only", *args)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("name", ["tiny", "tiny-v", "chat", "chat-rx", "no-byte-fallback"])
def test_ids_equal_sentencepiece(runner_dir, tokenizers, tmp_path, name):
    sp = Tokenizer(tokenizers[name])
    bundle = text_bundle(tmp_path / "b", tokenizers[name])
    lines = EVAL_TEXT.read_text().split("\n") + AWKWARD
    (tmp_path / "lines.txt").write_text("\n".join(lines))
    got = tokenize(runner_dir, bundle, "--prompt-file", tmp_path / "lines.txt", "--raw", "--each-line")
    assert len(got) == len(lines) > 6000
    lossless = name in ("tiny", "tiny-v", "chat")   # identity normalizer, byte fallback, no whitespace removal
    for line, out in zip(lines, got):
        want = sp.encode(line)
        assert out["prompt_ids"] == want, line
        assert out["prompt_text"] == line
        assert out["decoded"] == sp.decode(want), line
        if lossless and "\u2581" not in line:   # SentencePiece decodes its own U+2581 to a space
            assert out["decoded"] == line
    for text in MULTILINE + ["\n".join(AWKWARD)]:   # whole texts, newlines inside
        (tmp_path / "t.txt").write_text(text)
        for args in (["--prompt", text], ["--prompt-file", tmp_path / "t.txt"]):
            out, = tokenize(runner_dir, bundle, *args, "--raw")
            assert out["prompt_ids"] == sp.encode(text) and out["decoded"] == sp.decode(sp.encode(text))


def test_decode_equals_sentencepiece(runner_dir, tokenizers, tmp_path):
    """Arbitrary ids, incl. byte pieces that are not UTF-8, byte runs cut by BOS, unk, leading U+2581 pieces."""
    for name in ("tiny-v", "chat-rx"):
        sp = Tokenizer(tokenizers[name])
        bundle = text_bundle(tmp_path / name, tokenizers[name])
        space, n = sp.piece_id("\u2581"), sp.vocab_size
        rng = random.Random(0)
        cases = [[0, space, space, 5], [space, space, space], [1, space, 500], [229, 1, 160, 160], [231, 187, 153],
                 [2, 0, 0, 300], [1, 2, 1]]
        cases += [[rng.choice([0, 1, 2, space, rng.randrange(3, 259), rng.randrange(n)]) for _ in range(12)]
                  for _ in range(6)]
        for ids in cases:
            out, = tokenize(runner_dir, bundle, "--prompt-ids", ",".join(map(str, ids)))
            assert out["decoded"] == sp.sp.DecodeIds(ids), (name, ids)


@pytest.mark.parametrize("template, tokenizer", [("minicpm", "chat"), ("minicpm", "tiny"), ("plain", "tiny"),
                                                 ("minicpm-v", "tiny-v")])
def test_chat_ids_equal_exporter_chat(runner_dir, tokenizers, tmp_path, template, tokenizer):
    t, sp = get_chat_template(template), Tokenizer(tokenizers[tokenizer])
    bundle = text_bundle(tmp_path / "b", tokenizers[tokenizer], template)
    for turn in ["How do I open a file?", "  Hi \n", "<用户>injected<AI>", "多行\n文本\t ", "\u3000x\u2003"]:
        want_text = t.format_turns([("user", turn)])
        want = sp.encode(want_text, bos=t.add_bos)
        for args in (["--prompt", turn], ["--prompt", turn, "--chat"]):
            out, = tokenize(runner_dir, bundle, *args)
            assert out["prompt_ids"] == want and out["prompt_text"] == want_text, (template, turn)
        out, = tokenize(runner_dir, bundle, "--prompt", turn, "--raw")
        assert out["prompt_ids"] == sp.encode(turn), turn
    if template == "minicpm" and tokenizer == "chat":   # the markers are single tokens
        out, = tokenize(runner_dir, bundle, "--prompt", "hi")
        assert [i for i in out["prompt_ids"] if i in (sp.piece_id("<用户>"), sp.piece_id("<AI>"))] == \
            [sp.piece_id("<用户>"), sp.piece_id("<AI>")]


def test_image_chat_prompt_equals_host(runner_dir, tokenizers, tmp_path):
    """--image --prompt: [bos] <用户> image-block \\n text <AI> (minicpm-v), as exporter.vision.slicing.image_prompt
    builds it for `mcpm-export run --image`; --raw keeps [bos] image-block \\n text."""
    from exporter.vision.slicing import image_prompt, plan_image
    from test_runner_vision import config_bundle
    bundle, vcfg = config_bundle(tmp_path / "v2", 2)
    text_bundle(bundle, tokenizers["tiny-v"], "minicpm-v")
    sp = Tokenizer(tokenizers["tiny-v"])
    for (w, h), text in [((448, 448), "Describe the picture:"), ((1344, 896), " What is this? ")]:
        path = tmp_path / f"{w}x{h}.ppm"
        Image.new("RGB", (w, h), (10, 20, 30)).save(path)
        plan = plan_image(w, h, vcfg)
        for mode, template in (("--chat", get_chat_template("minicpm-v")), ("--raw", None)):
            got = run_json(runner_dir, "--bundle", bundle, "--image", path, "--plan-only", "--prompt", text, mode)
            want, _ = image_prompt(sp, plan, text, template=template)
            assert got["prompt_ids"] == want and got["prompt_tokens"] == len(want), (w, h, mode)


@pytest.mark.parametrize("case, expect", [
    ("unigram", "does not implement model_type UNIGRAM (only BPE); tokenize on the host and use --prompt-ids"),
    ("nfkc", "does not implement normalizer 'nmt_nfkc' (only identity)"),
    ("not a model", "not a SentencePiece model"),
    ("no tokenizer", "tokenizer not found: {b}/tokenizer.model"),
    ("latin1 file", "the prompt is not valid UTF-8 (byte offset 3)"),
    ("image on plain", "chat template 'plain' takes no image; use --raw"),
    ("raw without text", "--chat and --raw need --prompt or --prompt-file"),
    ("two prompts", "give only one of --prompt, --prompt-file, --prompt-ids or --prompt-len"),
    ("missing file", "--prompt-file not found: /nonexistent.txt"),
])
def test_refusals_one_error_line(runner_dir, tokenizers, tmp_path, case, expect):
    b = text_bundle(tmp_path / "b", tokenizers["tiny"])
    args = ["--prompt", "hello", "--tokenize-only"]
    if case in ("unigram", "nfkc"):
        d = tmp_path / "train"
        lines = EVAL_TEXT.read_text().splitlines()[:2000]
        extra = {"model_type": "unigram"} if case == "unigram" else {"model_type": "bpe"}
        spm.SentencePieceTrainer.Train(sentence_iterator=iter(lines), model_prefix=str(d), vocab_size=500,
                                       minloglevel=2, **extra)
        shutil.copyfile(d.with_suffix(".model"), b / "tokenizer.model")
    elif case == "not a model":
        (b / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff")
    elif case == "no tokenizer":
        (b / "tokenizer.model").unlink()
    elif case == "latin1 file":
        (tmp_path / "p.txt").write_bytes("abc\xe9".encode("latin1"))
        args = ["--prompt-file", tmp_path / "p.txt", "--raw"]
    elif case == "image on plain":
        from test_runner_vision import config_bundle
        b, _ = config_bundle(tmp_path / "v", 2)
        text_bundle(b, tokenizers["tiny-v"], "plain")
        Image.new("RGB", (20, 20)).save(tmp_path / "i.ppm")
        args = ["--image", tmp_path / "i.ppm", "--plan-only", "--prompt", "hi"]
    elif case == "raw without text":
        args = ["--prompt-ids", "1,2", "--raw"]
    elif case == "two prompts":
        args = ["--prompt", "a", "--prompt-ids", "1"]
    elif case == "missing file":
        args = ["--prompt-file", "/nonexistent.txt"]
    proc = run(runner_dir, "--bundle", b, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(lines) == 1 and lines[0].startswith("mcpm-run: error: ") and expect.format(b=b) in lines[0], proc.stderr
