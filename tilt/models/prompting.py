"""Prompt formats applied where prompts are tokenized: ``model.prompt_format`` and ``model.chat_template``.

The built-in tasks write bare prompts ("7+2="). A chat model answers those better inside its chat
format, e.g. with a system line and two worked turns. ``FormattedTokenizer`` rewrites each prompt
before tokenizing it, so sampling, training and held-out evaluation all see the same text; the
rest of the tokenizer (decode, ids, saving) is the model's own.
"""
from __future__ import annotations

from typing import Any, Optional

PLACEHOLDER = "{prompt}"


class FormattedTokenizer:
    """Wraps a Hugging Face tokenizer: ``tok(prompt)`` tokenizes ``format_prompt(prompt)``."""

    def __init__(self, tokenizer, *, prompt_format: Optional[str] = None, chat_template: bool = False):
        self.base, self.prompt_format, self.chat_template = tokenizer, prompt_format, chat_template

    def format_prompt(self, prompt: str) -> str:
        """``prompt`` put in place of "{prompt}" in ``prompt_format``; then, with ``chat_template``,
        made the user turn of the tokenizer's chat template with the assistant turn opened."""
        text = self.prompt_format.replace(PLACEHOLDER, prompt) if self.prompt_format else prompt
        if self.chat_template:
            text = self.base.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return text

    def __call__(self, text: str, **kwargs: Any):
        return self.base(self.format_prompt(text), **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.base, name)


def formatted(tokenizer, mcfg):
    """The policy tokenizer for a ``tilt.config.ModelCfg``: wrapped only if a format is configured.
    ConfigError when ``chat_template`` is asked of a tokenizer that has none."""
    from tilt.config import ConfigError

    if not mcfg.prompt_format and not mcfg.chat_template:
        return tokenizer
    if mcfg.chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"model.chat_template=true but the tokenizer of {mcfg.path!r} has no chat template; "
                          "write the format into model.prompt_format instead")
    return FormattedTokenizer(tokenizer, prompt_format=mcfg.prompt_format, chat_template=mcfg.chat_template)
