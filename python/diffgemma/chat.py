"""Prompts: the file's chat template (Gemma 4 turn format) rendered with jinja2, and prompt -> token ids."""

from __future__ import annotations

from typing import Any

from .errors import Error

# Used when a file has no template: the Gemma 4 turn format.
DEFAULT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise Error("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise Error(f"bad chat message {m!r}: expected {{'role': str, 'content': str}}")
    return messages


def render(template: str, messages: list[dict[str, str]], *, bos_token: str = "<bos>", eos_token: str = "<eos>",
           add_generation_prompt: bool = True) -> str:
    """Render a Hugging Face-style chat template (sandboxed jinja2)."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 is a dependency
        raise Error("chat templates need jinja2 (pip install jinja2)") from e

    def raise_exception(msg: str) -> None:
        raise Error(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=_check_messages(messages), bos_token=bos_token,
                                                eos_token=eos_token, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise Error(f"chat template failed to render: {e}") from e


def prompt_ids(model: Any, prompt: Any, chat: bool | None) -> list[int]:
    """Token ids for a str, a list of chat messages, or a list of token ids. chat=None applies the file's
    template to str/messages when the file has one."""
    if isinstance(prompt, list | tuple) and prompt and all(isinstance(t, int) for t in prompt):
        ids = [int(t) for t in prompt]
        if min(ids) < 0 or max(ids) >= model.hparams.n_vocab:
            raise Error(f"prompt token ids must be in [0, {model.hparams.n_vocab})")
        return ids
    template = model.metadata.get("tokenizer.chat_template")
    if isinstance(prompt, str):
        if not prompt:
            raise Error("the prompt is empty")
        if chat is False or (chat is None and not template):
            return model.tokenize(prompt)
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list | tuple):
        if not prompt:
            raise Error("the prompt is empty")
        messages = list(prompt)
        if chat is False:
            raise Error("chat=False needs a str or token-id prompt, not messages")
    else:
        raise Error("prompt must be a str, a list of chat messages or a list of token ids, "
                    f"not {type(prompt).__name__}")
    tok = model.tokenizer
    text = render(template or DEFAULT_TEMPLATE, messages, bos_token=tok.token_text(tok.bos) if tok.bos >= 0 else "",
                  eos_token=tok.token_text(tok.eos) if tok.eos >= 0 else "")
    ids = model.tokenize(text, add_special=False)
    if tok.bos >= 0 and (not ids or ids[0] != tok.bos):
        ids = [tok.bos] + ids
    return ids
