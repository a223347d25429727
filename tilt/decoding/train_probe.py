"""`tilt train-probe`: a Q-Probe (E5, arXiv:2402.14688) for a causal LM.

The embedding phi(x, y) of a completion is pi_ref's last-layer hidden state at the last token of
prompt + completion (the paper reads one layer's state at the last token; we take the last layer).
Data: k pi_ref samples for each training prompt, scored by the task verifier. The probe is linear,
Q(x, y) = w^T phi + b, fit by one of ``fit_probe_objective``'s objectives, and saved with the
tokenizer's fingerprint (like the Q head) so it is never used with another vocabulary. At decode
time ``decode.name: qprobe`` draws k pi_ref completions and keeps one ∝ exp(Q / beta).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from tilt.decoding.qprobe import fit_probe_objective, pg_loss
from tilt.decoding.value_model import read_checked_meta, tokenizer_fingerprint
from tilt.rollout import SamplingParams, decode_completions, encode_prompts, generate, model_device

WEIGHTS, META = "q_probe.safetensors", "q_probe.json"


@dataclass
class QProbe:
    """A linear probe on completion embeddings: Q = phi w + b."""

    w: Tensor  # [H]
    b: Tensor  # []

    def scores(self, phi: Tensor) -> Tensor:
        """phi [N, H] -> Q [N]."""
        return phi.to(self.w.dtype) @ self.w + self.b


@torch.no_grad()
def completion_embeddings(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                          completion_mask: Tensor) -> Tensor:
    """phi(x, y): last-layer hidden state after the last completion token, [N, H] float32.

    Prompts are left-padded [N, P], completions right-padded [N, T] with at least one token.
    """
    dev = model_device(model)
    ids = torch.cat([prompt_ids, completion_ids], 1).to(dev)  # [N, P+T]
    attn = torch.cat([prompt_mask, completion_mask], 1).to(dev)  # [N, P+T]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # [N, P+T]
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True)
    last = prompt_ids.shape[1] + completion_mask.sum(-1).to(dev) - 1  # [N] index of the last completion token
    return out.hidden_states[-1][torch.arange(ids.shape[0], device=dev), last].float().cpu()  # [N, H]


@torch.no_grad()
def collect_probe_data(policy, items, *, k: int, max_new_tokens: int,
                       generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """k pi_ref samples per item: (features [B, k, H], verifier rewards [B, k])."""
    from tilt.rewards import verifier_reward

    rows = [it for it in items for _ in range(k)]
    ids, mask = encode_prompts(policy.tokenizer, [it.prompt for it in rows])
    batch = generate(policy.model, ids, mask, params=SamplingParams(max_new_tokens, 1.0), eos_id=policy.eos_id,
                     pad_id=policy.pad_id, generator=generator)
    texts = decode_completions(policy.tokenizer, batch, policy.eos_id)
    rewards = verifier_reward([it.prompt for it in rows], texts, task=[it.task for it in rows],
                              columns=[it.columns for it in rows])
    phi = completion_embeddings(policy.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                batch.completion_mask)  # [B*k, H]
    return phi.reshape(len(items), k, -1), torch.tensor(rewards, dtype=torch.float32).reshape(len(items), k)


def train_probe(policy, items, *, k: int, objective: str, beta: float = 1.0, l2: float = 1e-3, epochs: int = 500,
                lr: float = 1e-2, max_new_tokens: int = 16, seed: int = 0) -> tuple[QProbe, dict]:
    """Sample, score, fit; returns the probe and stats (examples, mean reward, expected reward of the
    k-sample resampler on the training groups before / after fitting)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"train-probe needs k >= 1 samples per prompt, got {k!r}")
    if not beta > 0:
        raise ValueError(f"train-probe beta must be > 0, got {beta!r}")
    gen = torch.Generator().manual_seed(seed)
    phi, r = collect_probe_data(policy, items, k=k, max_new_tokens=max_new_tokens, generator=gen)
    w, b = fit_probe_objective(phi, r, objective=objective, beta=beta, l2=l2, epochs=epochs, lr=lr)
    probe = QProbe(w.float(), b.float())
    picked = -pg_loss(probe.scores(phi.reshape(-1, phi.shape[-1])).reshape(r.shape), r, beta=beta)
    stats = {"examples": int(r.numel()), "prompts": len(items), "k": k, "reward_mean": float(r.mean()),
             "resampled_reward_train": float(picked)}
    return probe, stats


def save_q_probe(probe: QProbe, out: Path, *, tokenizer, base_model: str, info: dict | None = None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({"w": probe.w.contiguous(), "b": probe.b.reshape(1).contiguous()}, str(out / WEIGHTS))
    meta = {"hidden_size": probe.w.numel(), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "base_model": base_model, "embedding": "last-layer hidden state at the last completion token",
            **(info or {})}
    (out / META).write_text(json.dumps(meta, indent=1))


def load_q_probe(path: str | Path, *, tokenizer, hidden_size: int) -> QProbe:
    """Load a saved probe; refuse one fit for another tokenizer or hidden size."""
    from safetensors.torch import load_file

    p = Path(path)
    read_checked_meta(p, meta_name=META, weights_name=WEIGHTS, what="Q-probe", make="fit one with `tilt train-probe`",
                      tokenizer=tokenizer, hidden_size=hidden_size)
    t = load_file(str(p / WEIGHTS))
    return QProbe(t["w"], t["b"].reshape(()))
