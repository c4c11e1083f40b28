"""ChatTemplate: the checkpoint's Jinja chat template, rendered as transformers' apply_chat_template does.

Where it comes from: `--chat-template FILE` ([http] chat_template), else chat_template.jinja, else
tokenizer_config.json's `chat_template` (a string, or a list of named templates: "default" is used),
as kept in the model folder or the weight pack. Rendering matches transformers: a sandboxed
environment with trim_blocks and lstrip_blocks, loop controls, `raise_exception`, `strftime_now`,
a `tojson` that does not escape HTML, the tokenizer's special tokens (bos_token, eos_token, ...) as
variables, `add_generation_prompt`, and the request's chat_template_kwargs.

The rendered text already holds every special token the model expects (the BOS a template writes),
so the gateway tokenizes it with add_special_tokens=False and sends token ids: the router never adds
a BOS of its own to a chat prompt (the same rule transformers applies with tokenize=True).
"""

from __future__ import annotations

import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hmoe.runtime.http.schema import ApiError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplate:
    """One compiled template and the special tokens it sees; `render` → the prompt text."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols], undefined=jinja2.Undefined
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ApiError(500, "chat_template_error", f"the chat template does not compile: {exc}") from None
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_files(cls, files: dict[str, bytes | None], override: str = "") -> ChatTemplate | None:
        """From the model's files ({name: bytes or None}: tokenizer_config.json, chat_template.jinja)
        and an override file path; None when neither has a template."""
        config = _tokenizer_config(files.get("tokenizer_config.json"))
        special = {k: _token_text(config[k]) for k in SPECIAL_TOKEN_KEYS if config.get(k) is not None}
        if override:
            with open(override, encoding="utf-8") as f:
                return cls(f.read(), special)
        jinja = files.get("chat_template.jinja")
        if jinja:
            return cls(jinja.decode("utf-8"), special)
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        return cls(source, special) if isinstance(source, str) and source else None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text (ApiError chat_template_error when the template refuses the messages)."""
        try:
            return self.template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **kwargs},
            )
        except jinja2.TemplateError as exc:
            raise ApiError(400, "chat_template_error", f"the chat template refused the messages: {exc}") from None
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:  # a template's own bugs
            raise ApiError(
                400, "chat_template_error", f"the chat template failed: {type(exc).__name__}: {exc}"
            ) from None


def _tokenizer_config(blob: bytes | None) -> dict:
    if not blob:
        return {}
    try:
        config = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def _token_text(token) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return token.get("content", "") if isinstance(token, dict) else str(token)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)
