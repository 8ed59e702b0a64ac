"""exporter/chat.py: the MiniCPM chat formats, their Hugging Face jinja twin and MLC's Conversation."""
from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm
from jinja2.sandbox import ImmutableSandboxedEnvironment

from exporter.chat import get_chat_template
from exporter.errors import ExportError
from exporter.recipes import EMBEDDED_DIR
from exporter.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TINY_TOKENIZER = EMBEDDED_DIR / "tinycpm-docs" / "tokenizer.model"
EVAL_TEXT = ROOT.parent / "shared" / "eval" / "python-tutorial.txt"

# OpenBMB's chat_template of MiniCPM-2B-sft-bf16 / dpo-bf16 (tokenizer_config.json), as published
OPENBMB_MINICPM = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                   "{{'<用户>' + message['content'].strip() + '<AI>'}}{% else %}"
                   "{{message['content'].strip()}}{% endif %}{% endfor %}")

CONVERSATIONS = [
    [("user", "What is a list comprehension?")],
    [("user", " Hi "), ("assistant", "Hello! "), ("user", "How do I sort a dict by value?\n")],
    [("system", "You answer briefly."), ("user", "Name a Python web framework.")],
    [("user", "单引号 ' and \\ backslash"), ("assistant", "ok")],
]


def render(template: str, messages, add_generation_prompt: bool, **extra) -> str:
    """As transformers' apply_chat_template renders a chat_template."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(ValueError(m))
    return env.from_string(template).render(
        messages=[{"role": r, "content": c} for r, c in messages],
        add_generation_prompt=add_generation_prompt, **extra)


def mlc_as_prompt(conv: dict, messages) -> str:
    """MLC-LLM's Conversation rendering rule (protocol/conversation_protocol.py, json_ffi/conv_template.cc),
    restated: system, then role + role_content_sep + content + sep per turn, then the empty assistant."""
    seps = conv["seps"] * (2 if len(conv["seps"]) == 1 else 1)
    system = conv["system_message"]
    if messages and messages[0][0] == "system":
        system, messages = messages[0][1], messages[1:]
    out = conv["system_template"].replace("{system_message}", system)
    for role, content in messages:
        out += conv["roles"][role] + conv["role_content_sep"] + \
            conv["role_templates"][role].replace("{" + role + "_message}", content) + seps[role == "assistant"]
    return out + conv["roles"]["assistant"] + conv["role_empty_sep"]


@pytest.mark.parametrize("name", ["minicpm", "minicpm-v", "plain"])
@pytest.mark.parametrize("gen", [True, False])
def test_jinja_renders_format_turns(name, gen):
    t = get_chat_template(name)
    for conv in CONVERSATIONS:
        assert render(t.jinja(), conv, gen) == t.format_turns(conv, add_generation_prompt=gen)


def test_minicpm_is_openbmbs_format():
    t = get_chat_template("minicpm")
    assert t.format_turns([("user", "hi")]) == "<用户>hi<AI>"
    for conv in CONVERSATIONS:
        if conv[-1][0] == "user":   # OpenBMB's template closes every user turn with <AI>
            assert t.format_turns(conv) == render(OPENBMB_MINICPM, conv, True), conv


def test_mlc_conversation_renders_the_same():
    required = {"system_template", "system_message", "add_role_after_system_message", "roles", "messages",
                "seps", "role_content_sep", "role_empty_sep", "stop_str", "stop_token_ids"}
    for name in ("minicpm", "minicpm-v", "plain"):
        t = get_chat_template(name)
        conv = t.mlc_conversation(bos_id=1)
        assert required <= set(conv) and conv["system_prefix_token_ids"] == [1] and conv["stop_token_ids"] == [2]
        assert isinstance(conv["roles"], dict) and all(isinstance(s, str) for s in conv["seps"])
        for c in CONVERSATIONS:
            plain = [(r, x.strip()) for r, x in c]   # MLC's engine does not strip contents
            assert mlc_as_prompt(conv, plain) == t.format_turns(plain), (name, c)


def test_minicpm_v_image_opens_the_first_user_turn():
    t = get_chat_template("minicpm-v")
    img = "<image>" + "<unk>" * 3 + "</image>"
    conv = [("user", "What is shown?"), ("assistant", "A cat."), ("user", "Colour?")]
    text = t.format_turns(conv, image=img)
    assert text == f"<用户>{img}\nWhat is shown?<AI>A cat.<用户>Colour?<AI>"
    assert render(t.jinja(), conv, True, image=img) == text
    with pytest.raises(ExportError, match="takes no image"):
        get_chat_template("minicpm").format_turns(conv, image=img)
    before, after = t.image_turn(" What is shown?")      # split around the image (slicing.build_prompt)
    assert (before, after) == ("<用户>", " What is shown?<AI>")
    assert before + img + "\n" + after == t.format_turns([("user", " What is shown?")], image=img)
    assert t.options() == {"strip_content": False, "image_first": True}


def test_plain_is_the_prompt_and_tiny_ids():
    tok = Tokenizer(TINY_TOKENIZER)
    text = "Python lists are mutable sequences."
    prompt = get_chat_template("plain").format_turns([("user", text)])
    assert prompt == text and tok.encode(prompt) == [tok.bos_id] + tok.sp.EncodeAsIds(text)
    assert get_chat_template("plain").stop_token_ids == (tok.eos_id,)


def test_minicpm_markers_are_single_tokens(tmp_path):
    """On a SentencePiece vocabulary holding <用户>/<AI> as pieces (as MiniCPM's does), the formatted turn
    tokenizes to BOS, (SentencePiece's dummy prefix,) <用户>, the content's ids, <AI>."""
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(EVAL_TEXT.read_text().splitlines()[:2000]),
                                   model_prefix=str(tmp_path / "sp"), vocab_size=600,
                                   user_defined_symbols=["<用户>", "<AI>"], byte_fallback=True,
                                   minloglevel=2)
    tok = Tokenizer(tmp_path / "sp.model")
    user, ai = tok.piece_id("<用户>"), tok.piece_id("<AI>")
    q = "How do I open a file?"
    text = get_chat_template("minicpm").format_turns([("user", q)])
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and user in ids[1:3] and ids[-1] == ai
    assert tok.decode(ids[1:]) == text and tok.decode(ids[ids.index(user) + 1:-1]) == q
    two = tok.encode(get_chat_template("minicpm").format_turns([("user", q), ("assistant", "open()"),
                                                                 ("user", "Thanks")]))
    assert [i for i in two if i in (user, ai)] == [user, ai, user, ai]


def test_unknown_template_and_role():
    with pytest.raises(ExportError, match="unknown chat template 'chatml'"):
        get_chat_template("chatml")
    with pytest.raises(ExportError, match="unknown role 'tool'"):
        get_chat_template("minicpm").format_turns([("tool", "x")])
