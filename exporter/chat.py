"""Chat templates: how a conversation becomes the prompt text a recipe was trained on.

One ``ChatTemplate`` per ``Recipe.conv_template`` name, holding exactly the fields of MLC-LLM's
Conversation (written into mlc-chat-config.json by the TVM target, ``mlc_conversation()``), plus
``format_turns`` (the text for ``exporter.tokenizer.Tokenizer.encode``, which adds BOS) and ``jinja``
(the Hugging Face ``chat_template`` rendering the same text, for tokenizer_config.json).

Rendering (MLC's rule): ``system_template`` with the system message, then per turn
``roles[role] + role_content_sep + content + seps[role == assistant]`` and, for the generation
prompt, ``roles["assistant"] + role_empty_sep``.

- ``minicpm``: MiniCPM-2B SFT/DPO (OpenBMB's model card and ``chat()``): ``<用户>{user}<AI>{assistant}``,
  no separators, contents stripped as OpenBMB's own chat_template does (MLC's engine does not strip:
  only contents with surrounding whitespace render differently there).
- ``minicpm-v``: MiniCPM-V 1.0/2.0 ``chat()``: the same roles; the image placeholder text and ``\\n``
  open the first user turn; contents are not stripped.
- ``plain``: completion (``tiny``): the prompt text as is.
Every template prepends BOS (MLC: ``system_prefix_token_ids``) and stops at EOS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import ExportError

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system_template: str            # contains "{system_message}"
    system_message: str
    user_role: str
    assistant_role: str
    seps: tuple[str, ...]           # 1 or 2: after user turns, after assistant turns
    role_content_sep: str
    role_empty_sep: str
    stop_str: tuple[str, ...]
    stop_token_ids: tuple[int, ...]  # MiniCPM's SentencePiece vocab: </s> = 2 (LlamaTokenizer layout)
    add_bos: bool
    strip_content: bool
    image_first: bool = False       # an image placeholder opens the first user turn, then "\n"

    @property
    def roles(self) -> dict[str, str]:
        return {USER: self.user_role, ASSISTANT: self.assistant_role}

    def _sep(self, role: str) -> str:
        return self.seps[-1] if role == ASSISTANT else self.seps[0]

    def format_turns(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = True,
                     image: str | None = None) -> str:
        """The prompt text (without BOS) for ``messages`` = [(role, content)]; an optional first
        ("system", text) sets the system message. ``image``: placeholder text of an image attached
        to the first user turn (templates with ``image_first`` only)."""
        system = self.system_message
        turns = list(messages)
        if turns and turns[0][0] == SYSTEM:
            system = turns.pop(0)[1]
        if image is not None and not self.image_first:
            raise ExportError(f"chat template '{self.name}' takes no image")
        out = [self.system_template.replace("{system_message}", system)]
        first_user = True
        for role, content in turns:
            if role not in (USER, ASSISTANT):
                raise ExportError(f"chat template '{self.name}': unknown role '{role}' "
                                  f"(a system message may only come first)")
            text = content.strip() if self.strip_content else content
            if role == USER and first_user and image is not None:
                text = image + "\n" + text
            first_user = first_user and role != USER
            out.append(self.roles[role] + self.role_content_sep + text + self._sep(role))
        if add_generation_prompt:
            out.append(self.assistant_role + self.role_empty_sep)
        return "".join(out)

    def image_turn(self, content: str) -> tuple[str, str]:
        """One user turn opened by an image (``image_first``), as the text before the image placeholder and
        the text after the placeholder's ``\n``: the image prompt (exporter/vision/slicing.build_prompt)
        puts the image block and the newline token between them."""
        mark = "\0"
        before, after = self.format_turns([(USER, content)], image=mark).split(mark + "\n", 1)
        return before, after

    def options(self) -> dict:
        """What MLC's Conversation has no field for (mlc-chat-config.json mcpm.chat_options; mcpm-run reads it)."""
        return {"strip_content": self.strip_content, "image_first": self.image_first}

    def jinja(self) -> str:
        """Hugging Face ``chat_template`` rendering exactly ``format_turns`` (messages as
        [{"role", "content"}], ``add_generation_prompt``); BOS comes from the tokenizer."""
        def lit(s: str) -> str:
            return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"

        content = "message['content']" + (".strip()" if self.strip_content else "")
        pre, post = self.system_template.split("{system_message}") \
            if "{system_message}" in self.system_template else (self.system_template, None)
        system = (f"{{%- if messages and messages[0]['role'] == 'system' %}}"
                  f"{{%- set sys = messages[0]['content'] %}}{{%- set msgs = messages[1:] %}}"
                  f"{{%- else %}}{{%- set sys = {lit(self.system_message)} %}}{{%- set msgs = messages %}}"
                  f"{{%- endif %}}")
        system += f"{{{{- {lit(pre)} + sys + {lit(post)} }}}}" if post is not None else f"{{{{- {lit(pre)} }}}}"
        user = f"{lit(self.user_role + self.role_content_sep)} + {content} + {lit(self.seps[0])}"
        if self.image_first:   # an image placeholder is passed as the template variable ``image``
            user = (f"{lit(self.user_role + self.role_content_sep)} + "
                    f"((ns.image + '\\n') if ns.image is not none else '') + {content} + {lit(self.seps[0])}")
            system += "{%- set ns = namespace(image=image if image is defined else none) %}"
        return (system
                + "{%- for message in msgs %}"
                + "{%- if message['role'] == 'user' %}" + f"{{{{- {user} }}}}"
                + ("{%- set ns.image = none %}" if self.image_first else "")
                + "{%- elif message['role'] == 'assistant' %}"
                + f"{{{{- {lit(self.assistant_role + self.role_content_sep)} + {content} + {lit(self.seps[-1])} }}}}"
                + "{%- else %}{{- raise_exception('unknown role ' + message['role']) }}{%- endif %}"
                + "{%- endfor %}"
                + f"{{%- if add_generation_prompt %}}{{{{- {lit(self.assistant_role + self.role_empty_sep)} }}}}"
                + "{%- endif %}")

    def mlc_conversation(self, bos_id: int) -> dict:
        """MLC-LLM's Conversation JSON (every key its C++ Conversation::FromJSON requires)."""
        return {
            "name": self.name, "system_template": self.system_template,
            "system_message": self.system_message,
            "system_prefix_token_ids": [bos_id] if self.add_bos else [],
            "add_role_after_system_message": True,
            "roles": self.roles, "role_templates": {USER: "{user_message}", ASSISTANT: "{assistant_message}"},
            "messages": [], "seps": list(self.seps), "role_content_sep": self.role_content_sep,
            "role_empty_sep": self.role_empty_sep, "stop_str": list(self.stop_str),
            "stop_token_ids": list(self.stop_token_ids), "function_string": "",
            "use_function_calling": False,
        }


_TEMPLATES = {
    "minicpm": ChatTemplate(
        name="minicpm", system_template="{system_message}", system_message="",
        user_role="<用户>", assistant_role="<AI>", seps=("",), role_content_sep="", role_empty_sep="",
        stop_str=("<用户>", "<AI>"), stop_token_ids=(2,), add_bos=True, strip_content=True),
    "minicpm-v": ChatTemplate(
        name="minicpm-v", system_template="{system_message}", system_message="",
        user_role="<用户>", assistant_role="<AI>", seps=("",), role_content_sep="", role_empty_sep="",
        stop_str=("<用户>", "<AI>"), stop_token_ids=(2,), add_bos=True, strip_content=False,
        image_first=True),
    "plain": ChatTemplate(
        name="plain", system_template="{system_message}", system_message="",
        user_role="", assistant_role="", seps=("",), role_content_sep="", role_empty_sep="",
        stop_str=(), stop_token_ids=(2,), add_bos=True, strip_content=False),
}


def get_chat_template(name: str) -> ChatTemplate:
    try:
        return _TEMPLATES[name]
    except KeyError:
        raise ExportError(f"unknown chat template '{name}' (known: {', '.join(sorted(_TEMPLATES))})") from None
