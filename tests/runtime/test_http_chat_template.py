"""ChatTemplate renders the checkpoints' own templates exactly as transformers' apply_chat_template does,
on the tokenizer_config.json / chat_template.jinja that `hmoe make-model` writes for each family."""

from __future__ import annotations

import json

import pytest

from hmoe.runtime.http.chat_template import ChatTemplate
from hmoe.runtime.http.schema import ApiError, parse_chat
from hmoe.runtime.tokenizer import load_tokenizer

FILES = ("tokenizer_config.json", "chat_template.jinja")
CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"},
        {"role": "user", "content": "2+2?"},
    ],
    [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "ü é"}],
]
KWARGS = [{}, {"thinking": True}, {"thinking": False}, {"enable_thinking": False}, {"enable_thinking": True}]


def files_of(path) -> dict:
    return {name: (path / name).read_bytes() if (path / name).is_file() else None for name in FILES}


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen3_moe"])
def model(request, tiny_models):
    from transformers import AutoTokenizer

    path = tiny_models(request.param, "fp32")
    return path, AutoTokenizer.from_pretrained(path), ChatTemplate.from_files(files_of(path))


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("kwargs", KWARGS)
def test_rendering_and_token_ids_equal_transformers(model, conversation, kwargs):
    path, reference, template = model
    messages = parse_chat({"messages": CONVERSATIONS[conversation]}, 1).messages  # as the API hands them over
    for add in (True, False):
        want = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add, **kwargs)
        assert template.render(messages, add, **kwargs) == want
    want_ids = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kwargs)
    want_ids = want_ids["input_ids"] if isinstance(want_ids, dict) or hasattr(want_ids, "keys") else want_ids
    text = template.render(messages, True, **kwargs)
    ids = load_tokenizer(path).encode(text, add_special_tokens=False).ids
    assert ids == list(want_ids)
    bos = reference.bos_token_id
    assert ids.count(bos) == (1 if path.name.startswith("deepseek") else 0)  # the template's BOS, never twice


def test_thinking_templates_open_or_close_the_think_block(model):
    path, _, template = model
    user = [{"role": "user", "content": "Hi"}]
    if path.name.startswith("deepseek"):
        assert template.render(user, thinking=True).endswith("<｜Assistant｜><think>")
        assert template.render(user).endswith("<｜Assistant｜></think>")
    else:
        assert template.render(user).endswith("<|im_start|>assistant\n")
        assert template.render(user, enable_thinking=False).endswith("<think>\n\n</think>\n\n")


def test_each_family_keeps_its_template_where_the_real_ones_do(tiny_models):
    deepseek, qwen = tiny_models("deepseek_v3", "fp32"), tiny_models("qwen3_moe", "fp32")
    assert "chat_template" in json.loads((deepseek / "tokenizer_config.json").read_text())
    assert not (deepseek / "chat_template.jinja").exists() and (qwen / "chat_template.jinja").is_file()


def test_override_file_list_templates_and_missing_ones(tmp_path):
    override = tmp_path / "t.jinja"
    override.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}")
    config = json.dumps({"eos_token": {"content": "</s>"}, "chat_template": "ignored"}).encode()
    template = ChatTemplate.from_files({"tokenizer_config.json": config}, str(override))
    assert template.render([{"role": "user", "content": "x"}]) == "[user]x</s>"
    named = json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
    assert ChatTemplate.from_files({"tokenizer_config.json": named.encode()}).render([]) == "D"
    assert ChatTemplate.from_files({"tokenizer_config.json": b"{}"}) is None
    assert ChatTemplate.from_files({}) is None


def test_a_template_that_refuses_gives_a_coded_400():
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ApiError) as info:
        template.render([{"role": "user", "content": "x"}])
    assert info.value.status == 400 and info.value.code == "chat_template_error" and "alternate" in info.value.message
    sandboxed = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ApiError):
        sandboxed.render([])
    assert ChatTemplate("{{ x | tojson }}").render([], x={"a": "<é>"}) == '{"a": "<é>"}'
