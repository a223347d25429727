"""`tilt sft`: supervised fine-tuning on a user's dataset, writing a model `tilt train` starts from.

Rows are (prompt, completion) pairs, or a conversational ``messages`` list whose last message
is the assistant's answer. The prompt is rendered as RL will render it (tilt.data.prompts.render:
a string as is, messages through the chat template with ``add_generation_prompt=True``); the
loss is the mean next-token cross-entropy over completion tokens + EOS only
(``tilt.pretrain.sft_loss``). The result is a Hugging Face model directory (weights, config,
tokenizer), written to a temporary directory and renamed.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from tilt.checkpoint import save_pretrained_atomic
from tilt.config import ConfigError
from tilt.data.files import load_file
from tilt.data.prompts import is_conversational, prompt_kind, render
from tilt.model import load_policy
from tilt.pretrain import sft_loss


@dataclass
class SFTCfg:
    """Settings of a `tilt sft` run (recorded next to the weights in tilt_sft.json)."""

    model: str = "shipped"
    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 16
    seed: int = 0
    threads: int = 1
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    split: Optional[str] = None


def _content(x: Any) -> str:
    """A completion cell: a string, or [{"role": "assistant", "content": ...}] (TRL's conversational)."""
    if isinstance(x, str):
        return x
    if is_conversational(x) and len(x) == 1:
        return str(x[0]["content"])
    raise ConfigError(f"a completion must be a string or one assistant message, got {str(x)[:60]!r}")


def sft_pairs(rows: list[dict], tok, cfg: SFTCfg, where: str) -> tuple[list[str], list[str], bool]:
    """(rendered prompts, completion texts, whether prompts came from a chat template) of the rows."""
    if not rows:
        raise ConfigError(f"{where}: the dataset is empty (0 rows)")
    cols = set(rows[0])
    if {cfg.prompt_column, cfg.completion_column} <= cols:
        raw = [r[cfg.prompt_column] for r in rows]
        comps = [_content(r[cfg.completion_column]) for r in rows]
    elif cfg.messages_column in cols:
        raw, comps = [], []
        for i, r in enumerate(rows):
            msgs = r[cfg.messages_column]
            if not (is_conversational(msgs) and len(msgs) >= 2 and msgs[-1]["role"] == "assistant"):
                raise ConfigError(f"{where}: row {i}: {cfg.messages_column!r} must be a list of >= 2 messages "
                                  "ending with the assistant's")
            raw.append(msgs[:-1])
            comps.append(str(msgs[-1]["content"]))
    else:
        raise ConfigError(f"{where}: needs columns {cfg.prompt_column!r} and {cfg.completion_column!r}, or "
                          f"{cfg.messages_column!r}; the columns are {', '.join(sorted(cols))}")
    kinds = {prompt_kind(p) for p in raw}
    if "other" in kinds or len(kinds) > 1 or any(p is None for p in raw):
        raise ConfigError(f"{where}: prompts must all be strings or all lists of messages (found {sorted(kinds)})")
    chat = kinds == {"messages"}
    return [render(tok, p) for p in raw], comps, chat


def encode_pairs(tok, prompts: list[str], completions: list[str], *, chat: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [N, L] ids = prompt + completion + EOS, attention mask, loss mask (completion + EOS).

    The prompt is tokenized exactly as the rollout tokenizes it (tilt.rollout.encode_prompts:
    with special tokens unless a chat template rendered it), so SFT and RL see the same prefix."""
    rows, lmask = [], []
    for p, c in zip(prompts, completions):
        pi = tok(p, add_special_tokens=not chat).input_ids
        ci = tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append(pi + ci)
        lmask.append([0] * len(pi) + [1] * len(ci))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)  # [N, L]
    attn, lm = torch.zeros_like(ids), torch.zeros_like(ids)  # [N, L]
    for i, (r, m) in enumerate(zip(rows, lmask)):
        ids[i, :len(r)], attn[i, :len(r)], lm[i, :len(m)] = torch.tensor(r), 1, torch.tensor(m)
    return ids, attn, lm


def sft(data: str, out: Path, cfg: SFTCfg, *, dataset=None, echo: Callable[[str], None] = print) -> dict:
    """Fine-tune ``cfg.model`` on ``data`` (a dataset file, or ``dataset``) and save it to ``out``."""
    out = Path(out)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    ds = dataset if dataset is not None else load_file(data, split=cfg.split, field="tilt sft DATA")
    pol = load_policy(cfg.model)
    tok, model = pol.tokenizer, pol.model
    prompts, comps, chat = sft_pairs([dict(r) for r in ds], tok, cfg, f"dataset {data!r}")
    ids, attn, lm = encode_pairs(tok, prompts, comps, chat=chat)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, steps, t0 = len(prompts), math.ceil(len(prompts) / cfg.batch_size), time.time()
    echo(f"sft: {n} examples, {cfg.epochs} epochs of {steps} steps, from {cfg.model}")
    model.train()
    losses = []
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(steps):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            loss = sft_loss(model, ids[idx], attn[idx], lm[idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / n)
        echo(f"epoch {epoch + 1}: completion loss {losses[-1]:.4f} ({time.time() - t0:.0f}s)")
    info = {"sft_config": asdict(cfg), "data": str(data), "examples": n, "epoch_losses": losses,
            "seconds": round(time.time() - t0, 1)}
    _save(model, tok, out, info)
    return info


def _save(model, tok, out: Path, info: dict) -> None:
    """Model + tokenizer + tilt_sft.json to ``out`` atomically."""
    model.eval()
    save_pretrained_atomic(model, tok, out, {"tilt_sft.json": json.dumps(info, indent=1)})
