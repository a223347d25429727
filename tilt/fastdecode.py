"""A lean one-token decode step for Llama-family models (Llama, Qwen2, Mistral).

Sampling calls the model once per new token with one token per row. For small models most of
that call is not arithmetic: HF's forward builds a 4-D mask, does cache bookkeeping and
dispatches ~40 modules per layer. ``LeanDecoder.step`` computes the same function with fewer,
larger operations: one matmul for Q, K and V together, one for the gate and up projections,
``torch.nn.functional.rms_norm``, and the model's own rotary module for cos/sin. K and V go
into the rollout's preallocated cache (``tilt.rollout.preallocated_cache``) through its layers'
``update``, so prefill (HF's forward) and decode share one cache.

Only what is checked is used: model types Llama/Qwen2/Mistral with SiLU MLPs, float32/float64
weights, no sliding window, full attention. Anything else returns ``None`` from ``lean_decoder``
and sampling keeps HF's forward. tests/test_rollout.py and tests/test_hf_models.py check the
sampled log-probs against a teacher-forced HF forward (atol 1e-5).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED = ("llama", "qwen2", "mistral")


def _weight_and_bias(*linears) -> tuple[Tensor, Optional[Tensor]]:
    """Rows of several plain nn.Linear stacked into one (weight [sum out, in], bias or None)."""
    for m in linears:
        _plain(m)
    w = torch.cat([m.weight for m in linears], 0)
    if all(m.bias is None for m in linears):
        return w, None
    return w, torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])


def _plain(m) -> tuple[Tensor, Optional[Tensor]]:
    """(weight, bias) of a plain nn.Linear; AttributeError for any other module type (a LoRA
    layer's adapters are not in its ``weight``, so fusing it would drop them)."""
    if type(m) is not torch.nn.Linear:
        raise AttributeError(f"not a plain nn.Linear: {type(m).__name__}")
    return m.weight, m.bias


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


class LeanDecoder:
    """Fused weights of one model, built once per ``generate`` call (weights are read, not copied
    back: the decoder is for sampling under ``torch.no_grad``)."""

    def __init__(self, model, cache):
        cfg = model.config
        base = model.model
        self.cache, self.rotary = cache, base.rotary_emb
        self.embed = base.embed_tokens.weight  # [V, H]
        self.norm_w, self.norm_eps = base.norm.weight, base.norm.variance_epsilon
        self.lm_w, self.lm_b = model.lm_head.weight, model.lm_head.bias
        self.nq, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        attn0 = base.layers[0].self_attn
        self.head_dim, self.scaling = attn0.head_dim, attn0.scaling
        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append({
                "in_w": layer.input_layernorm.weight, "in_eps": layer.input_layernorm.variance_epsilon,
                "qkv": _weight_and_bias(a.q_proj, a.k_proj, a.v_proj), "o": _plain(a.o_proj),
                "post_w": layer.post_attention_layernorm.weight,
                "post_eps": layer.post_attention_layernorm.variance_epsilon,
                "gu": _weight_and_bias(m.gate_proj, m.up_proj), "down": _plain(m.down_proj),
                "inter": m.gate_proj.out_features})

    @torch.no_grad()
    def step(self, tok: Tensor, pos: Tensor, attn_mask: Tensor) -> Tensor:
        """Logits [N, V] for one new token per row.

        tok, pos: [N] token ids and their positions; attn_mask: [N, L] 1 where the key is real,
        including the new token (L = cached length + 1).
        """
        n, d = tok.shape[0], self.head_dim
        h = F.embedding(tok, self.embed)  # [N, H]
        cos, sin = self.rotary(h, pos[:, None])  # [N, 1, d] each
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [N, 1, 1, d] broadcast over heads
        keep = attn_mask.bool()[:, None, None, :]  # [N, 1, 1, L]
        nq, nkv = self.nq, self.nkv
        for i, ly in enumerate(self.layers):
            x = F.rms_norm(h, (h.shape[-1],), ly["in_w"], ly["in_eps"])  # [N, H]
            qkv = F.linear(x, *ly["qkv"])  # [N, (nq + 2 nkv) d]
            q = qkv[:, :nq * d].view(n, nq, 1, d)
            k = qkv[:, nq * d:(nq + nkv) * d].view(n, nkv, 1, d)
            v = qkv[:, (nq + nkv) * d:].reshape(n, nkv, 1, d)
            q = q * cos + _rotate_half(q) * sin  # Eq. 34 of RoFormer (arXiv:2104.09864), HF layout
            k = k * cos + _rotate_half(k) * sin
            keys, values = self.cache.layers[i].update(k, v)  # [N, nkv, L, d]
            if nkv != nq:  # grouped-query attention
                keys = keys.repeat_interleave(nq // nkv, 1)
                values = values.repeat_interleave(nq // nkv, 1)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=keep, scale=self.scaling)  # [N, nq, 1, d]
            h = h + F.linear(o.reshape(n, nq * d), *ly["o"])
            x = F.rms_norm(h, (h.shape[-1],), ly["post_w"], ly["post_eps"])
            gu = F.linear(x, *ly["gu"])  # [N, 2 I]
            h = h + F.linear(F.silu(gu[:, :ly["inter"]]) * gu[:, ly["inter"]:], *ly["down"])
        h = F.rms_norm(h, (h.shape[-1],), self.norm_w, self.norm_eps)
        return F.linear(h, self.lm_w, self.lm_b)  # [N, V]


def lean_decoder(model, cache) -> Optional[LeanDecoder]:
    """A ``LeanDecoder`` when the model and cache are of the checked kinds, else None."""
    from transformers import PreTrainedModel

    cfg = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel):  # e.g. a peft model: its adapters live outside the weights
        return None
    if cfg is None or cache is None or getattr(cfg, "model_type", None) not in SUPPORTED:
        return None
    if getattr(cfg, "hidden_act", None) != "silu" or not hasattr(F, "rms_norm"):
        return None
    if getattr(cfg, "use_sliding_window", False) or (cfg.model_type == "mistral" and cfg.sliding_window):
        return None
    if model.lm_head.weight.dtype not in (torch.float32, torch.float64):
        return None
    if any(getattr(layer, "attention_type", "full_attention") != "full_attention" for layer in model.model.layers):
        return None
    try:
        return LeanDecoder(model, cache)
    except AttributeError:  # a variant whose modules are named differently
        return None
