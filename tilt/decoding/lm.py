"""Decoding a causal LM with a ``DECODERS`` entry: the bridge from pure rules to generation.

``Decoding.build`` resolves a decoder name, its kwargs and (if the entry needs values) a Q model,
and checks them once against the model (unknown name, missing or mismatched value model, k larger
than the vocabulary, beta <= 0 all fail here, before any generation). Sequence entries keep one of
n pi_ref completions (scored by the Q head, or by a Q-probe for ``qprobe``); block entries run
``tilt.decoding.blockwise`` (E4 blockwise CD). ``sample`` and ``greedy``
delegate to ``tilt.rollout.generate``, so they give exactly today's samples; every other rule runs
``guided_generate``: a KV-cached loop that applies the rule to pi_ref's logits (and Q values from
the hidden state) at every step; a "sequence" entry keeps one of n pi_ref samples; a "search" entry
(q_search) runs ``tilt.decoding.step_search``'s best-first search over LM-proposed steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from tilt.batch import RolloutBatch
from tilt.decoding import DECODERS
from tilt.decoding.blockwise import blockwise_decode
from tilt.decoding.train_probe import QProbe, load_q_probe
from tilt.decoding.step_search import delimiter_ids, head_step_value, search_generate
from tilt.decoding.value_model import QHead, load_q_head
from tilt.rollout import SamplingParams, cache_kw, continue_from, generate, output_cache


@torch.no_grad()
def guided_generate(model, prompt_ids: Tensor, prompt_mask: Tensor, *, rule: Callable[..., Tensor],
                    q_fn: Optional[Callable[[Tensor], Tensor]], max_new_tokens: int, eos_id: int, pad_id: int,
                    generator: torch.Generator | None = None) -> tuple[RolloutBatch, Tensor]:
    """Sample with ``rule(logits [N, V], values=[N, V] | None) -> logp [N, V]`` at every step.

    Returns (batch with ``logprobs`` = log pi_decoder(y_t), ref log-probs log pi_ref(y_t) [N, T]);
    sum_t of their difference is a one-sample estimate of KL(decoder || pi_ref) for the sequence.
    """
    n = prompt_ids.shape[0]
    attn = prompt_mask.clone()  # [N, P]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # [N, P]
    hidden = q_fn is not None
    out = model(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True,
                output_hidden_states=hidden)
    next_pos = pos[:, -1] + 1  # [N]
    done = torch.zeros(n, dtype=torch.bool)
    toks, lps, refs, masks = [], [], [], []
    for t in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # [N, V]
        values = q_fn(out.hidden_states[-1][:, -1]) if hidden else None  # [N, V]
        logp = rule(logits, values=values)  # [N, V]
        tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)  # [N]
        ref = torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)  # [N]
        lp = logp.gather(-1, tok[:, None]).squeeze(-1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        masks.append(~done)
        toks.append(tok)
        lps.append(torch.where(done, torch.zeros_like(lp), lp))
        refs.append(torch.where(done, torch.zeros_like(ref), ref))
        done = done | (tok == eos_id)
        if bool(done.all()) or t + 1 == max_new_tokens:
            break
        attn = torch.cat([attn, torch.ones((n, 1), dtype=attn.dtype)], dim=1)  # [N, P+t+1]
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                    **cache_kw(model, output_cache(out)), use_cache=True, output_hidden_states=hidden)
        next_pos = next_pos + 1
    batch = RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=torch.stack(toks, 1),
                         completion_mask=torch.stack(masks, 1).long(), logprobs=torch.stack(lps, 1))
    return batch, torch.stack(refs, 1)


@dataclass
class Decoding:
    """A resolved decoder: registry name, its kwargs, and the Q model it needs (if any)."""

    name: str = "sample"
    kwargs: dict[str, Any] = field(default_factory=dict)
    q_head: Optional[QHead] = None
    probe: Optional[QProbe] = None
    tokenizer: Any = None  # for decoders that read token texts (q_search's step delimiters)
    generated_tokens: int = 0  # every token sampled by ``generate`` so far, discarded candidates included

    @classmethod
    def build(cls, name: str, kwargs: Optional[dict] = None, *, value_model: Optional[str] = None,
              model=None, tokenizer=None) -> "Decoding":
        """Resolve and check against ``model``'s vocabulary and ``tokenizer`` (errors name the cause)."""
        entry = DECODERS.entry(name)  # unknown name -> error listing the valid ones
        kwargs = dict(kwargs or {})
        head = probe = None
        if "values" in entry.meta["needs"]:
            if value_model is None:
                maker = "fit one with `tilt train-probe`" if entry.meta["values"] == "probe" else \
                    "train one with `tilt train-value`"
                raise ValueError(f"decoder {name!r} needs a value model (decode.value_model / --value-model); {maker}")
            if entry.meta["values"] == "probe":  # E5: a linear probe on completion embeddings
                probe = load_q_probe(value_model, tokenizer=tokenizer, hidden_size=model.config.hidden_size)
            else:
                head = load_q_head(value_model, tokenizer=tokenizer, hidden_size=model.config.hidden_size)
            if entry.meta["kind"] == "token":
                kwargs.setdefault("beta", 1.0)
        elif value_model is not None:
            raise ValueError(f"decoder {name!r} uses no value model but decode.value_model={value_model!r} was given")
        dec = cls(name, kwargs, head, probe, tokenizer)
        if model is not None and head is not None and head.proj.out_features != model.config.vocab_size:
            raise ValueError(f"value model predicts {head.proj.out_features} tokens but the model has "
                             f"{model.config.vocab_size} logits; it was trained for another model")
        if model is not None and entry.meta["kind"] == "search":
            try:
                entry.fn(torch.zeros(1), logp=torch.zeros(1), **kwargs)
            except TypeError as exc:
                raise ValueError(f"decode.kwargs {kwargs} do not fit decoder {name!r}: {exc}") from None
            if tokenizer is None:
                raise ValueError(f"decoder {name!r} reads step delimiters and needs the model's tokenizer")
            delimiter_ids(tokenizer, kwargs.get("delimiters", ",>"))
        elif model is not None and entry.meta["kind"] in ("sequence", "block"):
            count = entry.meta["candidates"]
            n = kwargs.get(count, 4)
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"decoder {name!r} needs {count} >= 1 candidates (an integer), got {n!r}")
            try:
                entry.fn(torch.zeros(1, n), **kwargs)
            except TypeError as exc:
                raise ValueError(f"decode.kwargs {kwargs} do not fit decoder {name!r}: {exc}") from None
        elif model is not None:  # bad kwargs (k > vocab, beta <= 0, unknown kwarg) fail now, not mid-run
            vocab = model.config.vocab_size
            probe = torch.zeros(1, vocab)
            try:
                entry.fn(probe, values=torch.zeros(1, vocab) if head is not None else None, **kwargs)
            except TypeError as exc:
                raise ValueError(f"decode.kwargs {kwargs} do not fit decoder {name!r}: {exc}") from None
        return dec

    @property
    def is_plain(self) -> bool:
        """True when generation is exactly today's ``tilt.rollout.generate`` path."""
        return self.name in ("sample", "greedy") and set(self.kwargs) <= {"temperature"}

    def generate(self, model, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, eos_id: int,
                 pad_id: int, generator: torch.Generator | None = None,
                 with_ref: bool = False) -> tuple[RolloutBatch, Optional[Tensor]]:
        """Completions for left-padded prompts; (batch, ref log-probs [N, T] or None on the plain path).

        ``with_ref`` sends sample/greedy through ``guided_generate`` too, so that token-level decoders
        always return pi_ref's log-probs (same tokens as the plain path for sample; the KL picture)."""
        if self.is_plain and not with_ref:
            temperature = 0.0 if self.name == "greedy" else float(self.kwargs.get("temperature", 1.0))
            batch = generate(model, prompt_ids, prompt_mask, params=SamplingParams(max_new_tokens, temperature),
                             eos_id=eos_id, pad_id=pad_id, generator=generator)
            self.generated_tokens += int(batch.completion_mask.sum())
            return batch, None
        fn = DECODERS.get(self.name)
        beta = self.kwargs.get("beta", 1.0)
        kind = DECODERS.entry(self.name).meta["kind"]
        if kind == "block":
            return self._blockwise(model, prompt_ids, prompt_mask, fn, max_new_tokens=max_new_tokens, eos_id=eos_id,
                                   pad_id=pad_id, generator=generator), None
        if kind == "sequence":
            return self._select(model, prompt_ids, prompt_mask, fn, beta, max_new_tokens=max_new_tokens,
                                eos_id=eos_id, pad_id=pad_id, generator=generator), None
        if kind == "search":
            return self._search(model, prompt_ids, prompt_mask, fn, max_new_tokens=max_new_tokens, eos_id=eos_id,
                                pad_id=pad_id, generator=generator), None
        q_fn = None
        if self.q_head is not None and DECODERS.entry(self.name).meta["values"] == "expected_reward":
            q_fn = lambda h: self.q_head.success_probs(h)  # noqa: E731  CD / TQ*: E[r | s, a]
        elif self.q_head is not None:
            q_fn = lambda h: self.q_head.q_values(h, beta=beta)  # noqa: E731  Q♯: beta log E[e^(r/beta)]
        batch, ref = guided_generate(model, prompt_ids, prompt_mask,
                                     rule=lambda lg, values: fn(lg, values=values, **self.kwargs), q_fn=q_fn,
                                     max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, generator=generator)
        self.generated_tokens += int(batch.completion_mask.sum())
        return batch, ref

    def _search(self, model, prompt_ids: Tensor, prompt_mask: Tensor, fn, *, max_new_tokens: int, eos_id: int,
                pad_id: int, generator) -> RolloutBatch:
        """E6: best-first step search per prompt (tilt.decoding.step_search); ``logprobs`` are pi_ref's."""
        kw = dict(self.kwargs)
        k, budget = int(kw.pop("k", 4)), int(kw.pop("max_expansions", 32))
        delims = delimiter_ids(self.tokenizer, kw.get("delimiters", ",>"))
        batch, used = search_generate(model, prompt_ids, prompt_mask, value=head_step_value(self.q_head),
                                      score=lambda h, logp: fn(h, logp=logp, **kw), k=k, max_expansions=budget,
                                      max_new_tokens=max_new_tokens, delimiters=delims, eos_id=eos_id, pad_id=pad_id,
                                      generator=generator)
        self.generated_tokens += used
        return batch

    def _last_token_values(self, model, prompt_ids: Tensor, prompt_mask: Tensor, ids: Tensor, mask: Tensor, *,
                           beta: float) -> Tensor:
        """The value model's score of each completion [N]: Q(s_{T-1}, y_T), the value of its last token
        (E[r | s, a] for "expected_reward" entries, the soft Q otherwise)."""
        from tilt.rollout import completion_logits

        n = ids.shape[0]
        _, states = completion_logits(model, prompt_ids, prompt_mask, ids, mask, hidden=True)  # [N, T, H]
        last = mask.sum(-1) - 1  # [N] index of the last generated token
        h_last = states[torch.arange(n), last]  # [N, H] state before the last token
        if DECODERS.entry(self.name).meta["values"] == "expected_reward":
            q = self.q_head.success_probs(h_last)  # [N, V] CD's prefix scorer
        else:
            q = self.q_head.q_values(h_last, beta=beta)  # [N, V]
        return q.gather(-1, ids[torch.arange(n), last][:, None]).squeeze(-1).detach()  # [N]

    def _select(self, model, prompt_ids: Tensor, prompt_mask: Tensor, fn, beta: float, *, max_new_tokens: int,
                eos_id: int, pad_id: int, generator) -> RolloutBatch:
        """n pi_ref samples per prompt, scored by the value model (or the Q-probe), one kept."""
        from tilt.decoding.train_probe import completion_embeddings

        n = int(self.kwargs.get(DECODERS.entry(self.name).meta["candidates"], 4))
        b = prompt_ids.shape[0]
        rows = torch.arange(b).repeat_interleave(n)  # [B*n]
        cands = generate(model, prompt_ids[rows], prompt_mask[rows], params=SamplingParams(max_new_tokens, 1.0),
                         eos_id=eos_id, pad_id=pad_id, generator=generator)
        if self.probe is not None:  # E5 Q-Probe: w^T phi(x, y) of the whole completion
            phi = completion_embeddings(model, cands.prompt_ids, cands.prompt_mask, cands.completion_ids,
                                        cands.completion_mask)  # [B*n, H]
            scores = self.probe.scores(phi)  # [B*n]
        else:
            scores = self._last_token_values(model, cands.prompt_ids, cands.prompt_mask, cands.completion_ids,
                                             cands.completion_mask, beta=beta)  # [B*n]
        pick = fn(scores.reshape(b, n), generator=generator, **self.kwargs)  # [B]
        keep = torch.arange(b) * n + pick  # [B]
        self.generated_tokens += int(cands.completion_mask.sum())
        return RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                            completion_ids=cands.completion_ids[keep], completion_mask=cands.completion_mask[keep],
                            logprobs=cands.logprobs[keep])

    def _blockwise(self, model, prompt_ids: Tensor, prompt_mask: Tensor, fn, *, max_new_tokens: int, eos_id: int,
                   pad_id: int, generator) -> RolloutBatch:
        """E4 blockwise CD on the LM: K pi_ref blocks per step, scored V = E[r | s, a] of the block's last token."""
        def propose(rows: Tensor, prefix: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor]:
            out = continue_from(model, prompt_ids[rows], prompt_mask[rows], prefix, torch.ones_like(prefix),
                                params=SamplingParams(length, 1.0), eos_id=eos_id, pad_id=pad_id, generator=generator)
            extra = length - out.completion_ids.shape[1]  # generation stops early once every row hit EOS
            pad = lambda x, v: torch.nn.functional.pad(x, (0, extra), value=v)  # noqa: E731
            self.generated_tokens += int(out.completion_mask.sum())  # every proposed block, kept or not
            return pad(out.completion_ids, pad_id), pad(out.completion_mask, 0), pad(out.logprobs, 0.0)

        def score(rows: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
            return self._last_token_values(model, prompt_ids[rows], prompt_mask[rows], ids, mask, beta=1.0)

        ids, mask, logp = blockwise_decode(
            prompt_ids.shape[0], propose=propose, score=score, k=self.kwargs.get("k", 4),
            block_len=self.kwargs.get("block_len", 4), max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
            select=lambda s: fn(s, generator=generator, **self.kwargs))
        return RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=ids, completion_mask=mask,
                            logprobs=logp)


def decoding_from_config(dcfg, policy) -> Optional[Decoding]:
    """The ``decode`` config section as a Decoding for ``policy``; None for plain sampling (today's path)."""
    if dcfg.name == "sample" and not dcfg.kwargs and dcfg.value_model is None:
        return None
    return Decoding.build(dcfg.name, dcfg.kwargs, value_model=dcfg.value_model, model=policy.model,
                          tokenizer=policy.tokenizer)
