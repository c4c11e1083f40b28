"""Chat templates that make-model writes, one per family, as the real checkpoints ship them.

DeepSeek (V3.1/R1 style): `<｜User｜>` / `<｜Assistant｜>` markers after the BOS token; the
`thinking` kwarg opens a `<think>` block in the generation prompt (so the model's output holds only
the closing `</think>`), without it the prompt closes the block at once. Kept in
tokenizer_config.json's `chat_template`, as DeepSeek does.
Qwen3: ChatML (`<|im_start|>role ... <|im_end|>`), no BOS; the model opens `<think>` itself, and
`enable_thinking=False` puts an empty `<think>\n\n</think>\n\n` into the generation prompt. Kept in
chat_template.jinja, as newer checkpoints do. Earlier assistant turns drop their reasoning in both.
The role and think markers are added tokens (not special: they stay in detokenized text).
"""

from __future__ import annotations

DEEPSEEK_TOKENS = ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>")
QWEN3_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")

DEEPSEEK = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% if not thinking is defined %}{% set thinking = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='', is_first_sp=true, is_last_user=false) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_last_user = true -%}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if ns.is_last_user %}{{ '<｜Assistant｜></think>' }}{%- endif %}{%- set ns.is_last_user = false -%}"
    "{%- set content = message['content'] -%}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>', 1)[1] -%}{%- endif %}"
    "{{ content + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt and ns.is_last_user %}{{ '<｜Assistant｜>' }}"
    "{%- if thinking %}{{ '<think>' }}{%- else %}{{ '</think>' }}{%- endif %}{% endif %}"
)

QWEN3 = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- if '</think>' in message.content %}
            {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""


def family_template(arch: str) -> tuple[str, tuple[str, ...], str]:
    """(template, added tokens, file it lives in: tokenizer_config.json or chat_template.jinja)."""
    if arch == "deepseek_v3":
        return DEEPSEEK, DEEPSEEK_TOKENS, "tokenizer_config.json"
    return QWEN3, QWEN3_TOKENS, "chat_template.jinja"
