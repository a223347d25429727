"""Rollout: prompts in, token ids + per-token log-probs + masks out.

Batched sampling with a KV cache, for any Hugging Face causal LM. Prompts are left-padded
(``position_ids`` come from the attention mask, so padding does not shift positions);
completions are right-padded and stop at EOS. ``continue_from`` restarts generation from
given prefixes (prompt + partial completion), which branching methods (SPO, TEMPO) use.
"""
from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from tilt import kernels
from tilt.batch import RolloutBatch
from tilt.fastdecode import grouped_decoder, lean_decoder, lean_supported, linear_parts, resolve
from tilt.fastforward import forward_supported, shared_completion_logits, shared_completion_states
from tilt.token_logprobs import head_token_logprobs, token_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    min_new_tokens: int = 0  # EOS cannot be sampled before this many tokens (as HF ``min_new_tokens``)
    lean: bool = True  # decode with tilt.fastdecode where the model type is supported (same numbers)
    matmul_dtype: Optional[torch.dtype] = None  # decode-step matmuls in this dtype (lean decoder only; None = model's)
    kv_dtype: Optional[torch.dtype] = None  # completion KV cache in this dtype (grouped decoder only; None = model's)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Pack token lists into a left-padded [N, P] id tensor and its [N, P] mask."""
    width = max(len(s) for s in seqs)
    # built as lists and converted once: per-row tensor writes cost ~10 us each, N of them per step
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long).view(len(seqs), width)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long).view(len(seqs), width)
    return ids, mask


def masked_rows(ids: Tensor, mask: Tensor) -> list[list[int]]:
    """The ids of each row of ``ids`` [N, L] where ``mask`` is nonzero, as lists (one conversion of
    each tensor, instead of a mask-and-index per row)."""
    return [[t for t, k in zip(row, keep) if k] for row, keep in zip(ids.tolist(), mask.tolist())]


def encode_prompts(tokenizer, prompts: list[str], *, add_special_tokens: bool = True) -> tuple[Tensor, Tensor]:
    """Tokenize prompts (with the tokenizer's special tokens, e.g. BOS, unless the text was
    rendered by a chat template, which writes its own) and left-pad.

    Each distinct prompt is tokenized once (a group repeats its prompt G times)."""
    pad_id = tokenizer.pad_token_id
    ids_of = {p: tokenizer(p, add_special_tokens=add_special_tokens).input_ids for p in dict.fromkeys(prompts)}
    return left_pad([ids_of[p] for p in prompts], pad_id)


def model_device(model) -> torch.device:
    """The device a model computes on (its ``device`` attribute, else its first parameter's)."""
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else next(model.parameters()).device


def model_dtype(model) -> torch.dtype:
    """The dtype of a model's first parameter (the lean paths require float32/float64 weights)."""
    return next(model.parameters()).dtype


CDF_SAMPLING_MIN_VOCAB = 1024  # from this vocabulary size on, draw by inverse CDF (see _multinomial)
C_SAMPLING = True  # those draws through tilt.kernels' sampler where it runs (False: torch ops; see _pick)


def _multinomial(probs: Tensor, generator: torch.Generator | None, u: Tensor | None = None) -> Tensor:
    """One draw per row of [N, V] ``probs`` (unnormalised, >= 0), made on the generator's device (the
    run's RNG is a CPU generator, so the same seed samples the same tokens on any device); [N] on
    probs' device.

    Below ``CDF_SAMPLING_MIN_VOCAB`` tokens this is ``torch.multinomial``. On CPU that draws V
    exponential variates per row: 56 ms per step for 64 rows of SmolLM2's 49,152-token vocabulary,
    a quarter of its sampling time (benchmarks/README.md). From that size on, each row draws one
    uniform u and takes the first token whose cumulative mass exceeds u times the row's total (inverse
    transform sampling): the same distribution, a zero-probability token is never chosen, one
    random number per row. The two draw different tokens from the same seed, hence the threshold:
    runs on small vocabularies (the shipped model's 53) sample exactly as before. ``u`` [N, 1]: uniform
    draws already taken from ``generator`` (by ``_pick`` for the C sampler, which then declined)."""
    dev = probs.device if generator is None else generator.device
    p = probs.to(dev)
    if p.shape[-1] < CDF_SAMPLING_MIN_VOCAB:
        tok = torch.multinomial(p, 1, generator=generator).squeeze(-1)
    else:
        cdf = p.cumsum(-1)  # [N, V]
        if u is None:
            u = torch.rand(p.shape[:-1] + (1,), generator=generator, device=dev, dtype=cdf.dtype)
        u = u.to(dev, cdf.dtype) * cdf[..., -1:]  # [N, 1]
        tok = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # [N]
        over = tok >= p.shape[-1]  # u * total rounded up to the total: take the row's last token with mass
        if bool(over.any()):
            tok[over] = (cdf[over] < cdf[over][:, -1:]).sum(-1)
    return tok.to(probs.device)


def _pick(logits: Tensor, params: SamplingParams, generator: torch.Generator | None,
          ban: int | None = None) -> tuple[Tensor, Tensor]:
    """Choose next tokens from [N, V] logits; return (tokens [N], their log-probs [N]).

    The log-prob is under softmax(logits / temperature) (the untruncated sampling
    distribution, as TRL and verl report it); greedy reports the T=1 log-prob. Token ``ban``
    (EOS before ``min_new_tokens``) is never chosen but keeps its mass in the reported log-prob,
    so rollout log-probs still equal teacher-forced ones.
    """
    if params.temperature <= 0:
        logp = torch.log_softmax(_atleast32(logits), dim=-1)  # [N, V]
        tok = (logp if ban is None else logp.index_fill(-1, torch.tensor([ban], device=logp.device),
                                                         -torch.inf)).argmax(-1)  # [N]
        return tok, logp.gather(-1, tok[:, None]).squeeze(-1)
    logits = _atleast32(logits)
    u = None
    if (C_SAMPLING and params.top_p >= 1.0 and logits.shape[-1] >= CDF_SAMPLING_MIN_VOCAB and logits.dim() == 2
            and kernels.usable(logits) and (generator is None or generator.device.type == "cpu")):
        # the C sampler (speed work 33): the same uniform draw per row as the torch path below, the
        # same inverse-CDF rule and log-prob in about two walks of each row instead of six
        u = torch.rand((logits.shape[0], 1), generator=generator, dtype=torch.float32)  # [N, 1]
        picked = kernels.sample_rows(logits, u, params.temperature, ban)
        if picked is not None:
            return picked
    logp = torch.log_softmax(logits if params.temperature == 1.0 else logits / params.temperature, dim=-1)  # [N, V]
    probs = logp.exp()  # [N, V], a new tensor: the ban is written in place
    if ban is not None:
        probs.index_fill_(-1, torch.tensor([ban], device=logp.device), 0.0)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)  # [N, V]
        drop = sorted_p.cumsum(-1) - sorted_p > params.top_p  # keep the smallest set with mass >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    tok = _multinomial(probs, generator, u)  # [N]
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


@functools.lru_cache(maxsize=None)
def _cache_keyword_of(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kw(model, cache) -> dict:
    """``{keyword: cache}`` for a Hugging Face forward: ``cache`` where transformers has renamed the argument
    (its forward signature has it: 5.25 deprecates ``past_key_values``, with a warning on every run, and 5.40
    removes it), else ``past_key_values`` (the versions before). Read from the Hugging Face model's class
    (``tilt.fastdecode.resolve``: a peft model or a LoRA run's reference takes ``**kwargs``), once per class;
    a wrapper it does not know, from the model's own class."""
    found = resolve(model)
    return {_cache_keyword_of(type(found[0] if found else model)): cache}


def output_cache(out):
    """The KV cache a Hugging Face model output carries, under either name (``cache_kw``)."""
    return out["cache"] if "cache" in out else out.past_key_values


def preallocated_cache(model, capacity: int):
    """A ``DynamicCache`` whose full-attention layers write into one [N, H, capacity, D] buffer each.

    HF's ``DynamicLayer`` concatenates the new key/value onto the cache at every token, which
    copies the whole cache each step (O(T^2) bytes over a generation; 34% of the sampling time of
    1M x 256 tokens in benchmarks/profile_step.py). Writing into a buffer sized once removes those
    copies; attention sees a view of the filled prefix, so the numbers are unchanged. Returns None
    (the model's default cache) when this transformers version or model type does not fit.
    """
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # transformers < 4.56 has no per-layer cache classes
        return None

    class BufferLayer(DynamicLayer):
        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            self.kbuf = key_states.new_empty(key_states.shape[:-2] + (capacity, key_states.shape[-1]))
            self.vbuf = value_states.new_empty(value_states.shape[:-2] + (capacity, value_states.shape[-1]))
            self.filled = 0

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.filled + key_states.shape[-2]
            if end > capacity:
                raise RuntimeError(f"KV buffer of {capacity} positions overflowed ({end})")
            self.kbuf[..., self.filled:end, :] = key_states
            self.vbuf[..., self.filled:end, :] = value_states
            self.filled = end
            self.keys, self.values = self.kbuf[..., :end, :], self.vbuf[..., :end, :]  # [N, H, end, D] views
            return self.keys, self.values

        def batch_select_indices(self, indices: Tensor) -> None:
            if self.is_initialized:
                self.kbuf, self.vbuf = self.kbuf.index_select(0, indices), self.vbuf.index_select(0, indices)
                self.keys, self.values = self.kbuf[..., :self.filled, :], self.vbuf[..., :self.filled, :]

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - exotic configs keep HF's own cache
        return None
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None  # sliding-window or other special layers: keep HF's behaviour
    cache.layers = [BufferLayer() for _ in cache.layers]
    return cache


@torch.no_grad()
def generate(model, prompt_ids: Tensor, prompt_mask: Tensor, *, params: SamplingParams,
             eos_id: int, pad_id: int, generator: torch.Generator | None = None) -> RolloutBatch:
    """Sample completions for left-padded prompts with a KV cache.

    Args:
        model: any ``transformers`` causal LM (Llama, Qwen2, GPT-2, ...).
        prompt_ids, prompt_mask: [N, P] left-padded prompts and their mask.
        params: max new tokens, temperature (0 = greedy), top-p.
        eos_id, pad_id: generation stops at EOS; positions after it hold pad_id, mask 0.
        generator: torch RNG for sampling (seed control and exact resume).
    Returns:
        RolloutBatch with completions [N, T], T <= max_new_tokens, on the prompts' device (the
        model may sit on another one).
    """
    home, dev = prompt_ids.device, model_device(model)
    prompt_ids, prompt_mask = prompt_ids.to(dev), prompt_mask.to(dev)
    n = prompt_ids.shape[0]
    attn = prompt_mask.clone()  # [N, P]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # [N, P] positions ignore left padding
    capacity = prompt_ids.shape[1] + params.max_new_tokens
    fast = past = None
    if params.lean and lean_supported(model):  # G samples per prompt: prompt keys held once per prompt
        u_ids, u_mask, inverse = unique_prompts(prompt_ids, prompt_mask)
        counts = torch.bincount(inverse, minlength=u_ids.shape[0])  # [U] rows per prompt
        if 2 * u_ids.shape[0] <= n and bool((counts == counts[0]).all()):
            if params.matmul_dtype in (None, model_dtype(model)):  # the prompts through the decoder's own weights
                fast = grouped_decoder(model, None, u_mask, inverse, params.max_new_tokens, positions=capacity,
                                       kv_dtype=params.kv_dtype)
                logits = None if fast is None else fast.prefill(u_ids, u_mask).index_select(0, inverse)  # [N, V]
            else:  # lower-precision decode products: the prompts still in the model's dtype (HF's forward)
                u_pos = (u_mask.cumsum(-1) - 1).clamp(min=0)  # [U, P]
                out = model(input_ids=u_ids, attention_mask=u_mask, position_ids=u_pos, use_cache=True,
                            **cache_kw(model, preallocated_cache(model, prompt_ids.shape[1])), logits_to_keep=1)
                fast = grouped_decoder(model, output_cache(out), u_mask, inverse, params.max_new_tokens,
                                       params.matmul_dtype, positions=capacity, kv_dtype=params.kv_dtype)
                logits = out.logits[:, -1].index_select(0, inverse)  # [N, V]
    # another KV cache dtype needs the grouped decoder. A model it supports, on a batch not in equal groups (a
    # prompt drawn twice in one step), samples that batch with a cache in the model's dtype instead: no sampler
    # mismatch there, the correction's weights are 1. (Checked only when another dtype is asked for.)
    if (params.kv_dtype not in (None, model_dtype(model)) and fast is None
            and not (params.lean and lean_supported(model))):
        raise ValueError(f"a {params.kv_dtype} KV cache needs tilt's grouped decoder, which does not apply to this "
                         f"model: it runs float32 Llama/Qwen2/Mistral models (tilt.fastdecode.lean_supported; this is "
                         f"{type(model).__name__}, lean={params.lean})")
    if fast is None:
        shared = shared_prefill(model, prompt_ids, prompt_mask, cache=preallocated_cache(model, capacity),
                                logits_to_keep=1)
        if shared is not None:  # G samples per prompt: each distinct prompt was prefilled once
            out, inverse = shared
            logits = out.logits[:, -1].index_select(0, inverse)  # [N, V]
        else:
            out = model(input_ids=prompt_ids, attention_mask=attn, position_ids=pos,
                        **cache_kw(model, preallocated_cache(model, capacity)), use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1]  # [N, V]
        past = output_cache(out)
        fast = lean_decoder(model, past, params.matmul_dtype, capacity) if params.lean and past is not None else None
    if params.matmul_dtype is not None and fast is None:
        raise ValueError(f"decode matmuls in {params.matmul_dtype} need tilt's lean decoder, which does not apply to "
                         f"this model ({type(model).__name__}): it runs Llama/Qwen2/Mistral models in float32 without "
                         f"adapters (tilt.fastdecode.lean_supported)")
    next_pos = pos[:, -1] + 1  # [N]
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    toks, lps, masks = [], [], []
    for t in range(params.max_new_tokens):
        tok, lp = _pick(logits, params, generator, eos_id if t < params.min_new_tokens else None)  # [N], [N]
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        masks.append(~done)
        toks.append(tok)
        lps.append(torch.where(done, torch.zeros_like(lp), lp))
        done = done | (tok == eos_id)
        if bool(done.all()) or t + 1 == params.max_new_tokens:
            break
        attn = torch.cat([attn, torch.ones((n, 1), dtype=attn.dtype, device=dev)], dim=1)  # [N, P+t+1]
        if fast is not None:
            logits = fast.step(tok, next_pos, attn)  # [N, V]
        else:
            out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                        **cache_kw(model, past), use_cache=True)
            past, logits = output_cache(out), out.logits[:, -1]
        next_pos = next_pos + 1
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=torch.stack(toks, 1),  # [N, T]
        completion_mask=torch.stack(masks, 1).long(),  # [N, T]
        logprobs=torch.stack(lps, 1),  # [N, T]
    ).to(home)


def continue_from(model, prompt_ids: Tensor, prompt_mask: Tensor, prefix_ids: Tensor, prefix_mask: Tensor,
                  *, params: SamplingParams, eos_id: int, pad_id: int,
                  generator: torch.Generator | None = None) -> RolloutBatch:
    """Continue generation after given prefixes (prompt + first tokens of a completion).

    ``prefix_ids``/``prefix_mask`` are [N, L] right-padded partial completions. The returned
    batch holds only the NEW tokens; its ``prompt_ids`` are the left-packed prompt+prefix.
    """
    seqs = [p + q for p, q in zip(masked_rows(prompt_ids, prompt_mask), masked_rows(prefix_ids, prefix_mask))]
    ctx_ids, ctx_mask = left_pad(seqs, pad_id)
    return generate(model, ctx_ids, ctx_mask, params=params, eos_id=eos_id, pad_id=pad_id, generator=generator)


def unique_prompts(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Distinct prompt rows: (ids [U, P], mask [U, P], inverse [N]) with prompt_ids == ids[inverse]."""
    both = torch.cat([prompt_ids, prompt_mask], 1)  # [N, 2P]
    uniq, inverse = torch.unique(both, dim=0, return_inverse=True)  # [U, 2P], [N]
    p = prompt_ids.shape[1]
    return uniq[:, :p], uniq[:, p:], inverse


def _select_rows(cache, rows: Tensor) -> bool:
    """Expand a prompt cache to the rows ``rows``; False if the cache is not per-layer K/V.

    ``index_select`` rather than ``tensor[rows]``: its backward (index_add) is deterministic on
    CPU, while advanced indexing's (index_put with accumulate) varies from run to run."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        return False
    for layer in layers:
        if hasattr(layer, "kbuf"):  # tilt's BufferLayer: expand the buffers themselves
            layer.batch_select_indices(rows)
        elif layer.keys is not None and layer.keys.numel():
            layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
    return True


def shared_prefill(model, prompt_ids: Tensor, prompt_mask: Tensor, *, cache=None, **extra):
    """Run each distinct prompt once and expand its KV cache to its rows.

    Returns (model output over the U distinct prompts, inverse [N]) with the output's cache
    holding N rows, or None when fewer than two rows share a prompt on average (nothing to save)
    or the cache cannot be expanded; the caller then runs the plain forward (with a fresh cache).
    """
    u_ids, u_mask, inverse = unique_prompts(prompt_ids, prompt_mask)
    if 2 * u_ids.shape[0] > prompt_ids.shape[0]:
        return None
    u_pos = (u_mask.cumsum(-1) - 1).clamp(min=0)  # [U, P]
    out = model(input_ids=u_ids, attention_mask=u_mask, position_ids=u_pos, **cache_kw(model, cache),
                use_cache=True, **extra)
    return (out, inverse) if _select_rows(output_cache(out), inverse) else None


def completion_logits(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                      completion_mask: Tensor, *, hidden: bool = False, lean: bool = True) -> tuple[Tensor, Tensor | None]:
    """Teacher-forced logits at the completion positions [N, T, V] (model dtype) and, if ``hidden``,
    the last layer's hidden states there [N, T, H] (the state before token t). Grad flows if enabled.

    The G completions of a prompt share it, so each distinct prompt is run once and its KV cache is
    indexed out to its rows; the completions then run on top of it. Causal attention makes this the
    same computation as one forward over [prompt, completion] per row, minus (G-1)/G of the prompt
    work (68% of the FLOPs at 8 new tokens in benchmarks/profile_step.py). Rows with distinct
    prompts (or models whose cache cannot be indexed) take the plain single forward.
    Inputs may sit on another device than the model; the outputs are on the inputs' device.
    With ``lean`` (default) and a model of the kinds ``tilt.fastforward`` runs, both parts run in one
    lean pass (``shared_completion_logits``: the same function, fewer and larger operations).
    """
    home, dev = prompt_ids.device, model_device(model)
    if dev != home:
        logits, states = completion_logits(model, prompt_ids.to(dev), prompt_mask.to(dev), completion_ids.to(dev),
                                           completion_mask.to(dev), hidden=hidden, lean=lean)
        return logits.to(home), (states.to(home) if states is not None else None)
    if lean and not hidden and forward_supported(model):
        u_ids, u_mask, inverse = unique_prompts(prompt_ids, prompt_mask)
        return shared_completion_logits(model, u_ids, u_mask, inverse, completion_ids, completion_mask), None
    ids = torch.cat([prompt_ids, completion_ids], 1)  # [N, P+T]
    attn = torch.cat([prompt_mask, completion_mask], 1)  # [N, P+T]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # [N, P+T] positions ignore left padding
    p = prompt_ids.shape[1]
    extra = {"output_hidden_states": True} if hidden else {}
    shared = shared_prefill(model, prompt_ids, prompt_mask, logits_to_keep=1, **extra)  # only the last is read
    if shared is not None:
        head, inverse = shared
        tail = model(input_ids=completion_ids, attention_mask=attn, position_ids=pos[:, p:],
                     **cache_kw(model, output_cache(head)), use_cache=True, **extra)
        logits = torch.cat([head.logits[:, -1:].index_select(0, inverse), tail.logits[:, :-1]], 1)  # [N, T, V]
        states = None
        if hidden:
            states = torch.cat([head.hidden_states[-1][:, -1:].index_select(0, inverse),
                                tail.hidden_states[-1][:, :-1]], 1)
        return logits, states
    t = completion_ids.shape[1]
    # the LM head only at the T + 1 last positions (P-1 .. P+T-1): no logits over the prompt
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, logits_to_keep=t + 1, **extra)
    states = out.hidden_states[-1][:, p - 1:-1] if hidden else None  # [N, T, H]
    return out.logits[:, :-1], states  # [N, T, V]


def _plain_head(model) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) of the model's LM head when it is a Linear without active LoRA adapters, else None."""
    inner, adapters = resolve(model)
    try:
        weight, bias, loras = linear_parts(inner.lm_head, adapters)
    except AttributeError:  # not a plain or vanilla-LoRA Linear
        return None
    return None if loras else (weight, bias)


def completion_token_logprobs(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                              completion_mask: Tensor, *, temperature: float = 1.0, entropy: bool = False
                              ) -> tuple[Tensor, Tensor | None]:
    """Teacher-forced log-probs of the completion tokens under softmax(logits / temperature), [N, T], and
    (if ``entropy``) that softmax's entropy, [N, T]; grad flows if enabled. Equal to
    ``token_logprobs(completion_logits(...))``. On the lean pass with a plain LM head the head runs
    inside ``head_token_logprobs`` (no [N, T, V] tensor is allocated); otherwise through the logits."""
    head = _plain_head(model) if prompt_ids.device == model_device(model) and forward_supported(model) else None
    if head is not None:
        u_ids, u_mask, inverse = unique_prompts(prompt_ids, prompt_mask)
        states = shared_completion_states(model, u_ids, u_mask, inverse, completion_ids, completion_mask)
        return head_token_logprobs(states, *head, completion_ids, temperature=temperature, entropy=entropy)
    logits = completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask)[0]  # [N, T, V]
    return token_logprobs(logits, completion_ids.to(logits.device), temperature=temperature, entropy=entropy)


def forward_tokens(n_rows: int, n_prompts: int, prompt_len: int, completion_len: int) -> int:
    """Positions one ``completion_logits`` call runs for ``n_rows`` rows holding ``n_prompts`` distinct
    prompts: each prompt once plus every row's completion when the prompts are shared (at least two
    rows per prompt on average, as ``shared_prefill`` decides), else every row's whole sequence."""
    if 2 * n_prompts <= n_rows:
        return n_prompts * prompt_len + n_rows * completion_len
    return n_rows * (prompt_len + completion_len)


# train.micro_batch_tokens="auto" lets one micro-batch's activations take an eighth of the machine's memory,
# between 2 and 8 GiB (``auto_activation_bytes``). Fewer, larger micro-batches are faster where the weights
# are large: SmolLM2-135M full fine-tuning at 64 tokens (4,240 positions), fwd+bwd in micro-batches of 816 /
# 2,200 / 4,400 positions, interleaved, medians of 3: 23.7 / 19.0 / 19.4 s (benchmarks/README.md, speed
# work 34); on the 10M and 30M models one micro-batch already held the whole batch.
AUTO_ACTIVATION_MIN_BYTES = 2 << 30
AUTO_ACTIVATION_MAX_BYTES = 8 << 30


CGROUP_MEMORY_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1


def machine_memory_bytes() -> Optional[int]:
    """This process's memory limit: physical memory, or a smaller cgroup limit (containers,
    ``CGROUP_MEMORY_FILES``; "max" or an unreadable file is no limit); None where neither can be read."""
    found = []
    try:
        found.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    for path in CGROUP_MEMORY_FILES:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < 1 << 60:  # "max" or a huge number: no limit
            found.append(int(text))
    return min(found) if found else None


def auto_activation_bytes(memory: Optional[int] = None) -> int:
    """The "auto" activation budget: an eighth of ``memory`` (default: ``machine_memory_bytes``), clamped to
    [``AUTO_ACTIVATION_MIN_BYTES``, ``AUTO_ACTIVATION_MAX_BYTES``]; the minimum where memory is unknown.
    On a 24 GiB machine 3 GiB."""
    memory = machine_memory_bytes() if memory is None else memory
    if not memory:
        return AUTO_ACTIVATION_MIN_BYTES
    return max(AUTO_ACTIVATION_MIN_BYTES, min(AUTO_ACTIVATION_MAX_BYTES, memory // 8))


def activation_bytes_per_position(model) -> int:
    """Estimated bytes one forward position keeps for the backward: per layer about 6 hidden-sized and 4
    intermediate-sized tensors (norm inputs, projections, attention, the gated MLP; the norms and SwiGLU
    keep only their inputs, speed work 29/31), plus one vocabulary-sized row at the head (its logits;
    ``head_token_logprobs`` keeps no other vocabulary-sized tensor). Measured from peak-RSS slopes at 64
    tokens (micro-batches of ~1,000 against one of 4,240 positions): 208 KB at 10M (225 estimated), 287
    KB at 30M (313), ~930 KB on SmolLM2-135M (1,350: grouped-query attention keeps less)."""
    cfg = model.config
    hidden = cfg.hidden_size
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    elem = next(model.parameters()).element_size()
    return elem * (cfg.num_hidden_layers * (6 * hidden + 4 * inter) + cfg.vocab_size)


def auto_micro_batch_tokens(model, budget_bytes: Optional[int] = None) -> int:
    """Forward positions per micro-batch whose activations fit ``budget_bytes`` (default
    ``auto_activation_bytes()``), by ``activation_bytes_per_position``. At least 256."""
    budget = auto_activation_bytes() if budget_bytes is None else budget_bytes
    return max(256, budget // activation_bytes_per_position(model))


def token_chunks(prompt_ids: Tensor, prompt_mask: Tensor, completion_len: int, budget: int | None, *,
                 rows: Tensor | None = None, max_rows: int | None = None) -> list[Tensor]:
    """Split ``rows`` (default: all, in order) into consecutive chunks whose forward runs at most
    ``budget`` positions (``forward_tokens``: a prompt shared by a chunk's rows counts once) and that
    hold at most ``max_rows`` rows. A single row over the budget is a chunk of its own. The chunks
    bound the activation memory of teacher-forced passes; how rows are split does not change the sum
    of their losses or the log-probs.
    """
    rows = torch.arange(prompt_ids.shape[0]) if rows is None else rows
    if not budget and not max_rows:
        return [rows]
    _, _, inverse = unique_prompts(prompt_ids, prompt_mask)  # [N] prompt id of each row
    p = prompt_ids.shape[1]
    chunks, cur, seen = [], [], set()
    for r in rows.tolist():
        prompts = seen | {int(inverse[r])}
        fits = (max_rows is None or len(cur) < max_rows) and (
            not budget or forward_tokens(len(cur) + 1, len(prompts), p, completion_len) <= budget)
        if cur and not fits:
            chunks.append(torch.tensor(cur))
            cur, prompts = [], {int(inverse[r])}
        cur.append(r)
        seen = prompts
    chunks.append(torch.tensor(cur))
    return chunks


def sequence_logprobs(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                      completion_mask: Tensor, *, temperature: float = 1.0, with_entropy: bool = False,
                      chunk_tokens: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Teacher-forced log-probs of the completion tokens (with grad if enabled).

    Returns (logp [N, T], entropy [N, T] or None) under softmax(logits / temperature).
    ``chunk_tokens`` runs the rows in chunks of at most that many forward positions (``token_chunks``:
    a shared prompt counts once), which bounds the memory of a no-grad pass (e.g. the reference
    model's) at any batch size.
    """
    logps, ents = [], []
    for part in token_chunks(prompt_ids, prompt_mask, completion_ids.shape[1], chunk_tokens):
        logp, ent = completion_token_logprobs(model, prompt_ids[part], prompt_mask[part], completion_ids[part],
                                              completion_mask[part], temperature=temperature, entropy=with_entropy)
        logps.append(logp)  # [n, T]
        if with_entropy:
            ents.append(ent)  # [n, T]
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


def decode_completions(tokenizer, batch: RolloutBatch, eos_id: int) -> list[str]:
    """Completion texts with EOS and padding removed."""
    texts = []
    for ids, m in zip(batch.completion_ids.tolist(), batch.completion_mask.tolist()):
        keep = [t for t, k in zip(ids, m) if k and t != eos_id]
        texts.append(tokenizer.decode(keep, skip_special_tokens=True))
    return texts


def _atleast32(x: Tensor) -> Tensor:
    """Promote half/bfloat16 logits to float32 for log-softmax; keep float64 as it is."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
