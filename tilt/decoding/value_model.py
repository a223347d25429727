"""The Q model of Q♯ for a causal LM: a head on pi_ref's last hidden state predicting, for every
candidate next token a, the success probability P(r = 1 | s, a) of a pi_ref continuation.

Why a head and not a separate model: pi_ref's forward already runs at every decoding step, so the
values of all V candidate tokens cost one [H, V] matmul on the hidden state it produced; there is
no second tokenizer to keep aligned and nothing extra to ship (the paper also trains separate
small models; a head is the cheap end of that choice). pi_ref stays frozen.

Rewards are treated as Bernoulli (tilt's verifiers give {0, 1}); Q = beta log(1 - p + p e^(1/beta))
(``soft_q_bernoulli``, Q♯ Eq. 5 for a two-point reward distribution). The head is saved with the
tokenizer's fingerprint so it is never used with another vocabulary.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from tilt.decoding.qsharp import soft_q_bernoulli

WEIGHTS, META = "q_head.safetensors", "q_head.json"


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary (token -> id map)."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


class QHead(nn.Module):
    """Success logits [..., V] from hidden states [..., H]; starts at P(r = 1) = sigmoid(bias)."""

    def __init__(self, hidden_size: int, vocab_size: int, *, init_p: float = 0.5):
        super().__init__()
        self.proj = nn.Linear(hidden_size, vocab_size)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, float(torch.logit(torch.tensor(min(max(init_p, 1e-3), 1 - 1e-3)))))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden)

    def success_probs(self, hidden: Tensor) -> Tensor:
        """P(r = 1 | s, a) = E[r | s, a] for every candidate token, [..., V]."""
        return torch.sigmoid(self.proj(hidden.to(self.proj.weight.dtype)))

    def q_values(self, hidden: Tensor, *, beta: float) -> Tensor:
        """Q(s, a) for every candidate token, [..., V]."""
        return soft_q_bernoulli(torch.sigmoid(self.proj(hidden.to(self.proj.weight.dtype))), beta=beta)


def save_q_head(head: QHead, out: Path, *, tokenizer, base_model: str, info: dict | None = None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / WEIGHTS))
    meta = {"hidden_size": head.proj.in_features, "vocab_size": head.proj.out_features,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "base_model": base_model,
            "reward": "bernoulli", **(info or {})}
    (out / META).write_text(json.dumps(meta, indent=1))


def read_checked_meta(path: str | Path, *, meta_name: str, weights_name: str, what: str, make: str,
                      tokenizer, hidden_size: int) -> dict:
    """The metadata of a saved value model or probe at ``path``; refuse one made for another
    tokenizer or hidden size. ``what`` names the kind in errors, ``make`` says how to make one."""
    p = Path(path)
    if not (p / meta_name).exists() or not (p / weights_name).exists():
        raise FileNotFoundError(f"no {what} at {str(p)!r} (expected {meta_name} and {weights_name}; "
                                f"{make})")
    meta = json.loads((p / meta_name).read_text())
    mine = tokenizer_fingerprint(tokenizer)
    if meta["tokenizer_fingerprint"] != mine:
        raise ValueError(f"{what} {str(p)!r} was made for another tokenizer (vocab fingerprint "
                         f"{meta['tokenizer_fingerprint']}; base {meta['base_model']!r}) but this model's tokenizer "
                         f"has fingerprint {mine}; {make} for this model")
    if meta["hidden_size"] != hidden_size:
        raise ValueError(f"{what} {str(p)!r} expects hidden size {meta['hidden_size']}, this model has "
                         f"{hidden_size}; it was made on another base model ({meta['base_model']!r})")
    return meta


def load_q_head(path: str | Path, *, tokenizer, hidden_size: int) -> QHead:
    """Load a saved head; refuse one trained for another tokenizer or hidden size."""
    from safetensors.torch import load_file

    p = Path(path)
    meta = read_checked_meta(p, meta_name=META, weights_name=WEIGHTS, what="value model",
                             make="train one with `tilt train-value`",
                             tokenizer=tokenizer, hidden_size=hidden_size)
    head = QHead(meta["hidden_size"], meta["vocab_size"])
    head.load_state_dict(load_file(str(p / WEIGHTS)))
    return head.eval()
