"""Rendering a conversation with each model's own chat template.

A model uses, in order: the config's `chat_template` (a built-in name below or a Jinja
template), else the template shipped with its tokenizer. A model with neither cannot serve
chat requests (a clear error names it).
"""

from __future__ import annotations

from coolfusion.core.errors import InvalidRequest
from coolfusion.core.types import Message

# Gemma's turn format. Gemma has no system role: the system text opens the first user turn.
GEMMA = (
    "{{ bos_token }}"
    "{% set first = namespace(sys='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set first.sys = first.sys + m['content'] + '\n\n' %}"
    "{% else %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{% if m['role'] == 'user' %}{{ first.sys }}{% set first.sys = '' %}{% endif %}"
    "{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# ChatML, for models that ship none but were tuned on it.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BUILTIN = {"gemma": GEMMA, "chatml": CHATML}


def resolve_template(configured: str | None, tokenizer) -> str | None:
    if configured is not None:
        return BUILTIN.get(configured, configured)
    return getattr(tokenizer, "chat_template", None)


def render(messages: tuple[Message, ...], template: str | None, tokenizer, model_name: str) -> str:
    """The prompt text for a chat request, ending where the assistant's reply begins."""
    if template is None:
        raise InvalidRequest(
            f"model {model_name!r} has no chat template; set chat_template in config.yaml or use /v1/completions",
            param="messages",
        )
    msgs = [{"role": m.role, "content": m.content} for m in messages]
    return tokenizer.apply_chat_template(msgs, chat_template=template, add_generation_prompt=True, tokenize=False)
