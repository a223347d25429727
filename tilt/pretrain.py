"""`tilt pretrain`: build the shipped base model by ordinary SFT on a limited labelled set.

Labelled solutions are scarce and verifiers are cheap: the base model sees ``n_examples``
labelled items from the "sft" seed range only, so RL later trains on prompts whose answers it
never saw. Training stops early when the loss on a held-out slice of the SFT range stops
improving (nothing is degraded on purpose). The result is saved as safetensors + HF config +
the character tokenizer, loadable with ``AutoModelForCausalLM.from_pretrained``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from tilt.checkpoint import save_pretrained_atomic
from tilt.model import build_llama
from tilt.tasks.mix import parse_mix, sample_items
from tilt.tokenizer import build_char_tokenizer


@dataclass
class PretrainCfg:
    """Settings of the base-model SFT run (recorded next to the weights)."""

    mix: str = "addition:1-3,multiplication:1-3,countdown:1-3,sorting:1-3"
    n_examples: int = 2500
    n_val: int = 1000
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    batch_size: int = 64
    lr: float = 2e-3
    max_epochs: int = 40
    patience: int = 3
    seed: int = 0
    threads: int = 1  # one thread makes the result bit-reproducible across machines of this kind


def encode_sft(tok, items) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [N, L] ids = <bos> prompt answer <eos>, attention mask, and loss mask (answer+eos)."""
    rows, lmask = [], []
    for it in items:
        p = tok(it.prompt).input_ids
        a = tok(it.answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append(p + a)
        lmask.append([0] * len(p) + [1] * len(a))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    lm = torch.zeros_like(ids)
    for i, (r, m) in enumerate(zip(rows, lmask)):
        ids[i, :len(r)] = torch.tensor(r)
        attn[i, :len(r)] = 1
        lm[i, :len(m)] = torch.tensor(m)
    return ids, attn, lm


def sft_loss(model, ids, attn, lm) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # [N, L-1, V]
    tgt, m = ids[:, 1:], lm[:, 1:].float()  # [N, L-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")  # [N, L-1]
    return (nll * m).sum() / m.sum()


def pretrain(cfg: PretrainCfg, out: Path, *, echo: Callable[[str], None] = print,
             save_every_best: bool = True) -> dict:
    """Train the base model and save it to ``out`` (atomically: temp dir, then rename)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = build_char_tokenizer()
    mix = parse_mix(cfg.mix)
    train_items = sample_items(mix, split="sft", start=0, count=cfg.n_examples)
    val_items = sample_items(mix, split="sft", start=cfg.n_examples, count=cfg.n_val)
    tr, va = encode_sft(tok, train_items), encode_sft(tok, val_items)
    model = build_llama(len(tok), hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads,
                        intermediate=cfg.intermediate, seed=cfg.seed)
    echo(f"pretrain: {sum(p.numel() for p in model.parameters()):,} parameters, "
         f"{cfg.n_examples} labelled examples, mix {cfg.mix}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(cfg.n_examples / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.max_epochs * steps_per_epoch,
                                                pct_start=0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, bad, t0 = float("inf"), None, 0, time.time()
    for epoch in range(cfg.max_epochs):
        model.train()
        perm = torch.randperm(cfg.n_examples, generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            loss = sft_loss(model, tr[0][idx], tr[1][idx], tr[2][idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            val = float(sft_loss(model, *va))
        echo(f"epoch {epoch + 1}: train loss {float(loss.detach()):.4f}  val loss {val:.4f}  ({time.time() - t0:.0f}s)")
        if val < best - 1e-4:
            best, bad = val, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
            if save_every_best:
                _save(model, tok, out, {"pretrain_config": asdict(cfg), "best_val_loss": best,
                                        "epochs_run": epoch + 1, "seconds": round(time.time() - t0, 1)})
        else:
            bad += 1
            if bad >= cfg.patience:
                echo(f"early stop: val loss has not improved for {cfg.patience} epochs")
                break
    model.load_state_dict(best_state)
    info = {"pretrain_config": asdict(cfg), "best_val_loss": best, "epochs_run": epoch + 1,
            "seconds": round(time.time() - t0, 1)}
    _save(model, tok, out, info)
    return info


def _save(model, tok, out: Path, info: dict) -> None:
    """Model + tokenizer + provenance (tilt_pretrain.json) to ``out`` atomically."""
    model.eval()
    save_pretrained_atomic(model, tok, out, {"tilt_pretrain.json": json.dumps(info, indent=1)})
