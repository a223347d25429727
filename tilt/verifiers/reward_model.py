"""A local Hugging Face sequence-classification model as a reward function (as TRL accepts one).

``reward.functions: ["reward_model=/path/to/classifier"]`` (or ``make_reward_model(path)`` in
Python). Each (prompt, completion) is rendered with the classifier's own tokenizer: through its
chat template as a user / assistant exchange when it has one, else as ``prompt + completion``;
texts are scored in batches and the reward is the logit of label ``label`` (default 0, the single
output of a reward model). A path whose config is not a ``...ForSequenceClassification`` is a
ConfigError.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from tilt.config import ConfigError


def _load(path: str, device: str):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if not Path(path).is_dir():
        raise ConfigError(f"reward model path {path!r} is not a directory with a saved model")
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    archs = cfg.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(f"reward model {path!r} is not a sequence classifier (architectures: {archs or 'none'}); "
                          "a reward model must be saved as an AutoModelForSequenceClassification")
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).to(device).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def render(tok, prompt: str, completion: str) -> str:
    """The text the classifier scores: its chat template over user/assistant, else prompt + completion."""
    if getattr(tok, "chat_template", None):
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return tok.apply_chat_template(msgs, tokenize=False)
    return prompt + completion


def make_reward_model(path: str, *, batch_size: int = 16, label: int = 0, max_length: Optional[int] = None,
                      device: str = "cpu") -> Callable[..., list[float]]:
    """A reward function scoring with the classifier saved at ``path`` (batched, no gradients)."""
    model, tok = _load(path, device)
    if not 0 <= label < model.config.num_labels:
        raise ConfigError(f"reward model {path!r} has {model.config.num_labels} labels; label {label} is out of range")
    tok.padding_side = "right"

    @torch.no_grad()
    def reward_model(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        """Classifier logit of ``label`` for each rendered (prompt, completion)."""
        texts = [render(tok, p, c) for p, c in zip(prompts, completions)]
        out: list[float] = []
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=max_length is not None,
                      max_length=max_length).to(device)
            logits = model(**enc).logits  # [b, num_labels]
            out.extend(logits[:, label].float().tolist())
        return out

    reward_model.__name__ = f"reward_model[{Path(path).name}]"
    return reward_model


def _needs_path(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    raise ConfigError("the reward_model reward needs a path: use 'reward_model=/path/to/classifier'")


def _register() -> None:
    from tilt.rewards import REWARDS

    REWARDS.register("reward_model", factory=make_reward_model, needs_arg=True,
                     arg="/path/to/classifier")(_needs_path)


_register()
