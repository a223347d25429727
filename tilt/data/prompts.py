"""Prompts as datasets hold them: a string, or a conversational list of {"role", "content"} messages.

``render`` turns one into the text the model continues (a conversational prompt through the
tokenizer's chat template with ``add_generation_prompt=True``, as TRL does); ``prompt_hash``
is the key of the deterministic held-out split and of the train/eval overlap check.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from tilt.config import ConfigError


def is_conversational(prompt: Any) -> bool:
    """True for a list of {"role", "content"} messages (TRL's conversational format)."""
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)


def prompt_kind(prompt: Any) -> str:
    """"string", "messages" or "other" (the last is an error for a prompt column)."""
    if isinstance(prompt, str):
        return "string"
    return "messages" if is_conversational(prompt) and prompt else "other"


def render(tokenizer, prompt: Any) -> str:
    """The text the model continues: the string itself, or the chat template applied to the
    messages with ``add_generation_prompt=True``; ConfigError when the tokenizer has no template."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the dataset holds conversational prompts (lists of {role, content} messages) but the "
                          "model's tokenizer has no chat_template; use a model whose tokenizer_config.json has "
                          "one, or give string prompts")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def normalise(prompt: Any) -> str:
    """Lower-case, whitespace-collapsed text of a prompt (messages: role and content of each)."""
    if isinstance(prompt, str):
        return " ".join(prompt.lower().split())
    return json.dumps([[m["role"], " ".join(str(m["content"]).lower().split())] for m in prompt])


def prompt_hash(prompt: Any) -> str:
    """sha256 of the normalised prompt (hex): equal for prompts differing only in case or spacing."""
    return hashlib.sha256(normalise(prompt).encode()).hexdigest()


def in_heldout(prompt: Any, fraction: float) -> bool:
    """Whether a prompt falls in the held-out ``fraction``: the first 8 hex digits of its hash,
    read as a number in [0, 1), are below ``fraction``. The same prompt always lands on the same side."""
    return int(prompt_hash(prompt)[:8], 16) / 16**8 < fraction


def unknown_chars(tokenizer, texts: list[str], *, limit: int = 2000) -> tuple[int, str]:
    """(how many of the first ``limit`` texts contain a token the tokenizer maps to <unk>, those
    characters). Tokenizers without an unk token report (0, "")."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return 0, ""
    bad, chars = 0, set()
    for text in texts[:limit]:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [text[a:b] for t, (a, b) in zip(enc.input_ids, enc["offset_mapping"]) if t == unk]
        if spans:
            bad += 1
            chars.update(spans)
    return bad, "".join(sorted(chars))[:40]
