"""A lean one-token decode step for Llama-family models (Llama, Qwen2, Mistral).

Sampling calls the model once per new token with one token per row. For small models most of
that call is not arithmetic: HF's forward builds a 4-D mask, does cache bookkeeping and
dispatches ~40 modules per layer. ``LeanDecoder.step`` computes the same function with fewer,
larger operations: one matmul for Q, K and V together, one for the gate and up projections,
norm weights folded into those matmuls, and one complex product for the rotary embedding of all
query and key heads (see ``LeanDecoder``). K and V go
into the rollout's preallocated cache (``tilt.rollout.preallocated_cache``) through its layers'
``update``, so prefill (HF's forward) and decode share one cache. Float32 products with enough weights
run through MKL's packed GEMM, bf16 products (``matmul_dtype``) through oneDNN's with a prepacked weight, the
weights packed once per ``generate`` call (``_packed``). ``GroupedDecoder`` is the same
step for G samples per prompt with each prompt's keys and values held once (see its docstring).
With a float32 model on CPU, ``GroupedDecoder``'s attention (with rotary embedding and the cache
write), norms and SwiGLU run as fused C kernels (tilt.kernels) between the products; where they cannot
be built the same step runs in torch ops.

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

from tilt import kernels

SUPPORTED = ("llama", "qwen2", "mistral")


Lora = tuple[Tensor, Tensor, float]  # (A [r, in], B [out, r], scaling) of one active LoRA adapter


def linear_parts(m, adapters: bool = True) -> tuple[Tensor, Optional[Tensor], list[Lora]]:
    """(weight, bias, LoRA adapters) of a projection: a plain nn.Linear, or a peft LoRA Linear whose
    active adapters are vanilla LoRA (Hu et al., arXiv:2106.09685, Eq. 3: h = W0 x + s B A x) with no
    dropout, no bias and no fan-in/fan-out transpose; with ``adapters=False`` (a LoRA run's reference)
    only its base weights. AttributeError for anything else, which keeps Hugging Face's forward."""
    if type(m) is torch.nn.Linear:
        return m.weight, m.bias, []
    base = getattr(m, "base_layer", None)
    if type(base) is not torch.nn.Linear or not hasattr(m, "lora_A") or getattr(m, "merged", True):
        raise AttributeError(f"not a plain nn.Linear or an unmerged peft LoRA Linear: {type(m).__name__}")
    if not adapters or m.disable_adapters:
        return base.weight, base.bias, []
    loras = []
    for name in m.active_adapters:
        if name not in m.lora_A:
            continue
        if (name in getattr(m, "lora_variant", {}) or getattr(m, "lora_bias", {}).get(name, False)
                or getattr(m, "fan_in_fan_out", False) or type(m.lora_dropout[name]) is not torch.nn.Identity):
            raise AttributeError(f"LoRA adapter {name!r} is not vanilla LoRA without dropout")
        loras.append((m.lora_A[name].weight, m.lora_B[name].weight, float(m.scaling[name])))
    return base.weight, base.bias, loras


def merged_weight(m, adapters: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """(W0 + sum s B A, bias) of a projection: its LoRA adapters merged into a new weight (for sampling
    under no_grad; the learner's pass keeps them apart, ``tilt.fastforward``)."""
    w, b, loras = linear_parts(m, adapters)
    for a_w, b_w, scale in loras:
        w = w + (b_w @ a_w) * scale
    return w, b


def _weight_and_bias(*linears, adapters: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """Rows of several projections (adapters merged) stacked into one (weight [sum out, in], bias or None)."""
    parts = [merged_weight(m, adapters) for m in linears]
    w = torch.cat([p[0] for p in parts], 0) if len(parts) > 1 else parts[0][0]
    if all(p[1] is None for p in parts):
        return w, None
    return w, torch.cat([p[1] if p[1] is not None else p[0].new_zeros(p[0].shape[0]) for p in parts])


def _plain(m, adapters: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """(weight, bias) of one projection, adapters merged (AttributeError for unsupported kinds)."""
    return merged_weight(m, adapters)


def resolve(model) -> Optional[tuple]:
    """(the Hugging Face model the lean paths read, whether its LoRA adapters apply) for a plain
    ``PreTrainedModel``, a peft LoRA model (its inner model, adapters on) or a LoRA run's reference
    (``tilt.models.lora.AdapterDisabledRef``: the inner model, adapters off); None for anything else."""
    from transformers import PreTrainedModel

    from tilt.models.lora import AdapterDisabledRef, is_lora

    if isinstance(model, AdapterDisabledRef):
        return (model.peft_model.get_base_model(), False) if is_lora(model.peft_model) else None
    if is_lora(model):
        return model.get_base_model(), True
    return (model, True) if isinstance(model, PreTrainedModel) else None


def _cast(wb: tuple[Tensor, Optional[Tensor]], dtype: Optional[torch.dtype]) -> tuple[Tensor, Optional[Tensor]]:
    """(weight, bias) in ``dtype`` (unchanged when None): the decode step's matmul operands."""
    if dtype is None:
        return wb
    return wb[0].to(dtype), (None if wb[1] is None else wb[1].to(dtype))


def _lin(x: Tensor, wb: tuple) -> Tensor:
    """``F.linear`` with the weight's dtype for the product and ``x``'s dtype for the result: with bf16
    weights the matmul runs in bf16 (AMX / AVX-512 BF16 kernels on CPU) while the residual stream, the
    norms, rotary embedding and attention stay in the model's dtype. A product packed by ``_packed``
    (weight, bias, packed weight, rows) runs tilt.kernels' ``linear`` (rows 0: any row count) or MKL's packed
    GEMM when ``x`` is a contiguous [rows, in]."""
    w, b = wb[0], wb[1]
    if len(wb) == 4 and x.dim() == 2:
        if wb[3] == 0:  # tilt.kernels' packed product, any row count
            if x.dtype == torch.float32 and x.is_contiguous():
                return kernels.linear(x, wb[2], w.shape[0], b)
            return F.linear(x.to(w.dtype), w, b).to(x.dtype)
        if wb[3] == -1:  # packed for ``kernels.linear_swiglu`` (the fused step); the plain product here
            return F.linear(x.to(w.dtype), w, b).to(x.dtype)
        if w.dtype == torch.bfloat16:  # oneDNN's packed weight serves any row count
            return torch.ops.mkldnn._linear_pointwise.default(x.to(w.dtype), wb[2], b, "none", [], "").to(x.dtype)
        if x.shape[0] == wb[3] and x.is_contiguous():
            return torch.ops.mkl._mkl_linear.default(x, wb[2], w, b, wb[3])
    if w.dtype == x.dtype:
        return F.linear(x, w, b)
    return F.linear(x.to(w.dtype), w, b).to(x.dtype)


def _mkl_packing_works() -> bool:
    """Whether this torch build has MKL's packed fp32 GEMM (the op inductor's CPU weight freezing uses)
    and it computes ``F.linear``."""
    try:
        # fixed values, not torch.randn: importing tilt must not move the global RNG
        x, w, b = torch.arange(24.0).view(3, 8).cos(), torch.arange(40.0).view(5, 8).sin(), torch.arange(5.0)
        out = torch.ops.mkl._mkl_linear(x, torch.ops.mkl._mkl_reorder_linear_weight(w, 3), w, b, 3)
        return bool(torch.allclose(out, F.linear(x, w, b), atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


MKL_PACKING = _mkl_packing_works()


def _dnn_bf16_packing_works() -> bool:
    """Whether this torch build has oneDNN's linear with a prepacked bf16 weight (the op inductor's
    CPU weight freezing uses for bf16), the CPU runs bf16 natively, and it computes bf16 ``F.linear``."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        x = torch.arange(24.0).view(3, 8).cos().bfloat16()
        w, b = torch.arange(40.0).view(5, 8).sin().bfloat16(), torch.arange(5.0).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 3)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return bool(torch.allclose(out.float(), F.linear(x, w, b).float(), atol=1e-2))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


DNN_BF16_PACKING = _dnn_bf16_packing_works()


# Packed decode products (speed work 28, benchmarks/README.md): with 64 rows, MKL's packed fp32 GEMM
# (the weight reordered once into the kernel's blocked layout, ``cblas_sgemm_pack``) ran the decode
# step's products in 0.63-0.95 of ``F.linear``'s time, and SmolLM2's [64, 576] x [576, 49152] head
# in 0.65, with the same values (bit-equal at K <= 576, 3e-6 apart at K = 1024 from another blocking).
# Below this many weight entries the packed call saved nothing (1M model: generate 1.03-1.05x slower
# with every product packed; [64, 128] x [128, 128]: 29.8 against 29.5 us).
PACK_MIN_WEIGHT = 1 << 17

# float32 decode products through tilt.kernels' ``linear`` (speed work 39) where the kernels load, every size
# (a small product unpacked went through F.linear at ~130 us for [64, 256] x [256, 256] in the decode loop,
# its weight cold; packed 27 us), else MKL's packed GEMM (False: MKL's; packed_decode.py --compare products)
C_PRODUCTS = True
# with those, the fused step's gate/up product and SwiGLU as one call (``kernels.linear_swiglu``, speed work 40)
C_SWIGLU = True
# the fused step's library calls as one call per token, all layers in one thread team (``tilt_decode_layers``,
# speed work 48; False: one call each from Python, the same kernels in the same order)
ONE_CALL = True


def _packed(wb: tuple, rows: int, swiglu: bool = False) -> tuple:
    """(weight, bias, packed weight, rows) for a CPU product when packing is available, else ``wb``
    unchanged (``F.linear``): float32 products in tilt.kernels' ``linear`` layout (rows 0: it serves any row
    count; ``C_PRODUCTS``; with ``swiglu``, a gated MLP's gate/up weight in ``linear_swiglu``'s layout, rows -1)
    or else, from ``PACK_MIN_WEIGHT`` entries, in MKL's packed GEMM layout, bf16 products (``matmul_dtype``)
    in oneDNN's (speed work 32)."""
    w = wb[0]
    if w.device.type != "cpu" or rows < 1:
        return wb
    with torch.no_grad():
        if w.dtype == torch.bfloat16 and DNN_BF16_PACKING:
            w = w.detach().contiguous()
            b = None if wb[1] is None else wb[1].detach().contiguous()
            return w, b, torch.ops.mkldnn._reorder_linear_weight(w, rows), rows
        ours = C_PRODUCTS and kernels.library() is not None
        if w.dtype != torch.float32 or (not ours and w.numel() < PACK_MIN_WEIGHT):
            return wb
        w = w.detach().contiguous()
        b = None if wb[1] is None else wb[1].detach().contiguous()
        if ours:
            if swiglu:  # a gated MLP's gate/up product for ``kernels.linear_swiglu`` (rows -1)
                return w, b, kernels.pack_linear_swiglu(w), -1
            return w, b, kernels.pack_linear(w), 0
        if not MKL_PACKING:
            return wb
        return w, b, torch.ops.mkl._mkl_reorder_linear_weight(w, rows), rows


def _pairs(d: int) -> Tensor:
    """[d] index putting HF's rotate-half partners next to each other: (0, d/2, 1, d/2 + 1, ...)."""
    h = d // 2
    return torch.stack([torch.arange(h), torch.arange(h, d)], -1).reshape(d)


def _complex(cos: Tensor, sin: Tensor) -> Tensor:
    """HF's cos/sin [.., d] (each angle twice, rotate-half layout) -> e^{i angle} [.., d/2]."""
    h = cos.shape[-1] // 2
    return torch.complex(cos[..., :h].contiguous(), sin[..., :h].contiguous())


def _normed(h: Tensor, eps: float) -> Tensor:
    """RMS norm without its weight (folded into the next matmul's columns by ``LeanDecoder``)."""
    return F.rms_norm(h, (h.shape[-1],), None, eps)


def _gqa_supported() -> bool:
    try:  # torch >= 2.5: SDPA reads grouped keys and values in place
        q, kv = torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2)
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


_SDPA_GQA = _gqa_supported()


# Up to this many keys, attention is three plain products (``_matmul_attention``) instead of SDPA's
# flash kernel, whose blocking costs more than it saves on short sequences. Forward + backward, 64 rows,
# 17 prompt keys + T completion keys (benchmarks/README.md, speed work 26): matmul / flash 0.33-0.49 at
# 25 keys, 0.57-0.63 at 33, 0.81-0.94 at 49, 0.98-1.21 at 81.
MATMUL_ATTENTION_MAX_KEYS = 48


def _matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """softmax(q k^T scale, masked) v (Eq. 1 of arXiv:1706.03762) as plain products; grouped-query
    heads share their key head through a broadcast dimension (no repeated keys)."""
    b, nq, length, d = q.shape
    nkv = k.shape[1]
    qg = q.view(b, nkv, nq // nkv, length, d)  # query heads grouped by their key head
    scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * scale  # [B, nkv, rep, L, S]
    scores = scores.masked_fill(~mask.unsqueeze(2), -torch.inf)  # mask [B|1, 1, L, S] -> [B|1, 1, 1, L, S]
    return torch.matmul(torch.softmax(scores, -1), v.unsqueeze(2)).view(b, nq, length, d)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """SDPA with a boolean ``mask`` (True = attend) for q [B, nq, L, d] and k, v [B, nkv, S, d]:
    with grouped-query attention (nkv < nq) the keys and values are read in place where torch
    supports it (``enable_gqa``), else repeated per query head. Short key sequences (at most
    ``MATMUL_ATTENTION_MAX_KEYS``) take ``_matmul_attention``."""
    nq, nkv = q.shape[1], k.shape[1]
    if k.shape[2] <= MATMUL_ATTENTION_MAX_KEYS and mask.dim() == 4 and mask.dtype == torch.bool:
        return _matmul_attention(q, k, v, mask, scale)
    if nkv == nq:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if _SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    k, v = k.repeat_interleave(nq // nkv, 1), v.repeat_interleave(nq // nkv, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def qkv_rows(nq: int, nkv: int, d: int, device=None) -> Tensor:
    """Row order [(nq + 2 nkv) d] of a stacked q/k/v projection with each query and key head in the
    pair layout of ``_pairs`` (values unchanged): what makes rotary embedding one complex product."""
    pair = _pairs(d).to(device)
    return torch.cat([(torch.arange(nq + nkv, device=device)[:, None] * d + pair).reshape(-1),
                      torch.arange((nq + nkv) * d, (nq + 2 * nkv) * d, device=device)])


class LeanDecoder:
    """Fused weights of one model, built once per ``generate`` call (weights are read, not copied
    back: the decoder is for sampling under ``torch.no_grad``).

    The weights are rearranged so that each step does less work than the model's own layers, with
    the same function (float rounding aside):

    * each RMS norm's weight is folded into the columns of the matmul that reads it, and the
      attention's 1/sqrt(d) into the query rows;
    * the query and key rows of each head are permuted so that the two halves rotary embedding
      pairs up (HF's rotate-half layout) sit next to each other; the rotation is then one complex
      product for all query and key heads, by e^{i p theta} looked up in a table built once
      (Eq. 34 of RoFormer, arXiv:2104.09864, in its complex form). Scores are dot products
      between queries and keys in the same layout, so they are unchanged; the prompt's cached keys
      are permuted once to match.

    ``matmul_dtype`` (e.g. ``torch.bfloat16``) casts the weights of the six products of a layer and of
    the LM head once, here; each step then multiplies in that dtype and returns to the model's dtype
    (``_lin``). The sampled tokens' log-probs are those of this lower-precision sampler, so the learner
    must correct for the mismatch (``correction.name``; tilt.corrections).

    ``positions``: an upper bound on the positions ``step`` is asked for (the rotation table's length).
    """

    def __init__(self, model, cache, matmul_dtype: Optional[torch.dtype] = None, positions: int = 0):
        model, adapters = resolve(model)
        cfg = model.config
        base = model.model
        self.cache, self.rotary = cache, base.rotary_emb
        self.embed = base.embed_tokens.weight  # [V, H]
        self.norm_eps = base.norm.variance_epsilon
        w_lm, b_lm = _plain(model.lm_head, adapters)
        self.lm = _cast((w_lm * base.norm.weight, b_lm), matmul_dtype)
        nq, nkv = self.nq, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        attn0 = base.layers[0].self_attn
        d = self.head_dim = attn0.head_dim
        dev = self.embed.device
        self.pair = _pairs(d).to(dev)
        rows = qkv_rows(nq, nkv, d, dev)  # [(nq + 2 nkv) d]
        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            w, b = _weight_and_bias(a.q_proj, a.k_proj, a.v_proj, adapters=adapters)
            row_scale = torch.ones(w.shape[0], dtype=w.dtype, device=dev)
            row_scale[:nq * d] = attn0.scaling
            w = w.index_select(0, rows) * row_scale[:, None] * layer.input_layernorm.weight
            b = None if b is None else b.index_select(0, rows) * row_scale
            w_gu, b_gu = _weight_and_bias(m.gate_proj, m.up_proj, adapters=adapters)
            self.layers.append({
                "in_eps": layer.input_layernorm.variance_epsilon,
                "qkv": _cast((w, b), matmul_dtype),
                "o": _cast(_plain(a.o_proj, adapters), matmul_dtype),
                "post_eps": layer.post_attention_layernorm.variance_epsilon,
                "gu": _cast((w_gu * layer.post_attention_layernorm.weight, b_gu), matmul_dtype),
                "down": _cast(_plain(m.down_proj, adapters), matmul_dtype),
                "inter": m.gate_proj.out_features})
        # rope types whose frequencies depend on the sequence length call the module every step
        self.table = None
        if positions and getattr(self.rotary, "rope_type", "default") not in ("dynamic", "longrope"):
            cos, sin = self.rotary(self.embed[:1], torch.arange(positions, device=dev)[None])  # [1, L, d]
            self.table = _complex(cos[0], sin[0])  # [L, d/2]
        self.packed_rows = 0  # the rows ``pack`` packed the products for (0: not packed)
        if cache is not None:  # the prompt's keys into the decoder's layout
            for layer in cache.layers:
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    layer.keys.copy_(layer.keys.index_select(-1, self.pair))

    def pack(self, rows: int) -> None:
        """Pack the decode step's products for ``rows`` rows per call (``_packed``; a no-op where neither
        tilt.kernels, MKL's packed float32 GEMM nor oneDNN's packed bf16 linear is available). tilt.kernels'
        layouts serve every row count and are packed once; with MKL's, float32 calls with other row counts
        (e.g. ``GroupedDecoder.prefill``) compute ``F.linear``. The fused step's gate/up products go in
        ``linear_swiglu``'s layout (``C_SWIGLU``)."""
        if rows == self.packed_rows:
            return

        def repacked(wb: tuple, swiglu: bool = False) -> tuple:  # tilt.kernels' layouts serve every row count
            return wb if len(wb) == 4 and wb[3] in (0, -1) else _packed(wb[:2], rows, swiglu)

        self.lm = repacked(self.lm)
        self._plan = None
        for ly in self.layers:
            for key in ("qkv", "o", "gu", "down"):
                ly[key] = repacked(ly[key], swiglu=key == "gu" and C_SWIGLU and getattr(self, "fused", False))
        self.packed_rows = rows

    def rotation(self, h: Tensor, pos: Tensor) -> Tensor:
        """e^{i p theta} [N, 1, d/2] for positions ``pos`` [N]."""
        if self.table is not None:
            return self.table.index_select(0, pos)[:, None]
        cos, sin = self.rotary(h, pos[:, None])  # [N, 1, d] each
        return _complex(cos, sin)

    def qkv(self, ly: dict, h: Tensor, rot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One decode position's queries, keys and values of layer ``ly``: RMS norm, the fused q/k/v
        projection, rotary embedding on q and k together. h [N, H] -> q [N, nq, 1, d], k and v
        [N, nkv, 1, d] (q and k in the decoder's pair layout, q scaled by 1/sqrt(d))."""
        n, nq, nkv, d = h.shape[0], self.nq, self.nkv, self.head_dim
        y = _lin(_normed(h, ly["in_eps"]), ly["qkv"])  # [N, (nq + 2 nkv) d]
        qk = torch.view_as_complex(y[:, :(nq + nkv) * d].view(n, nq + nkv, d // 2, 2)) * rot  # [N, nq + nkv, d/2]
        qk = torch.view_as_real(qk).view(n, nq + nkv, 1, d)
        return qk[:, :nq], qk[:, nq:], y[:, (nq + nkv) * d:].view(n, nkv, 1, d)

    @torch.no_grad()
    def step(self, tok: Tensor, pos: Tensor, attn_mask: Tensor) -> Tensor:
        """Logits [N, V] for one new token per row.

        tok, pos: [N] token ids and their positions; attn_mask: [N, L] 1 where the key is real,
        including the new token (L = cached length + 1).
        """
        n, d, nq = tok.shape[0], self.head_dim, self.nq
        self.pack(n)
        h = F.embedding(tok, self.embed)  # [N, H]
        rot = self.rotation(h, pos)
        keep = attn_mask.bool()[:, None, None, :]  # [N, 1, 1, L]
        for i, ly in enumerate(self.layers):
            q, k, v = self.qkv(ly, h, rot)  # [N, nq, 1, d], [N, nkv, 1, d] x 2
            keys, values = self.cache.layers[i].update(k, v)  # [N, nkv, L, d]
            o = attention(q, keys, values, keep, scale=1.0)  # [N, nq, 1, d] (q carries 1/sqrt(d))
            h = h + _lin(o.reshape(n, nq * d), ly["o"])  # o [N, nq, 1, d]
            h = self.mlp(ly, h)
        return _lin(_normed(h, self.norm_eps), self.lm)  # [N, V]

    @staticmethod
    def mlp(ly: dict, h: Tensor) -> Tensor:
        """The residual stream after layer ``ly``'s post-attention norm and SiLU-gated MLP, [N, H]."""
        gu = _lin(_normed(h, ly["post_eps"]), ly["gu"])  # [N, 2 I]
        return h + _lin(F.silu(gu[:, :ly["inter"]]) * gu[:, ly["inter"]:], ly["down"])


class GroupedDecoder(LeanDecoder):
    """``LeanDecoder`` for rows that share prompts in equal groups (G samples per prompt), with the
    prompt's keys and values kept once per distinct prompt.

    Decode attention reads the whole KV cache for every new token and is bandwidth-bound (about a
    third of the sampling time at 1M and 10M x 64 tokens in torch.profiler). With a per-row cache
    every row reads its own copy of its prompt's keys; here the G rows of a prompt ask their
    queries of one [P, d] block per head together (a [G, d] x [d, P] matmul), and only the
    completion keys are per row. With grouped-query attention the query heads that share a key
    head join that matmul too ([G rep, d] x [d, P]; rep = query heads per key head), and over the
    completion keys each row's rep heads form one [rep, d] x [d, t] product, so no key or value is
    repeated. Scores over the prompt and over the completion share one softmax,
    so this is the same attention (Eq. 1 of "Attention is all you need", arXiv:1706.03762) summed
    in another order: log-probs equal the per-row cache's to float rounding (~1e-7), and the
    samples are the same (tests/test_rollout.py). The rows run in prompt order inside ``step``
    (permuted in, logits permuted back), so sampling sees rows in the caller's order.

    ``kv_dtype=torch.float16`` keeps the completion keys and values in half precision (rounded to nearest
    as they are written, read back as floats; the prompt's stay in the model's dtype): the decode attention
    reads every cached key and value once per new token and is bound by the memory's read rate, and this
    halves the bytes (rollout.kv_cache_dtype; benchmarks/README.md, speed work 44). ``kv_dtype=torch.int8``
    keeps each key and value vector as 8-bit integers and one float scale (``kernels.quantize_int8``), 36
    bytes for a 32-value head instead of 64 in float16 (speed work 47). The sampler then differs from the
    learner by that rounding, so the trainer requires a correction for it.
    """

    def __init__(self, model, prompt_cache, prompt_mask: Tensor, inverse: Tensor, capacity: int,
                 matmul_dtype: Optional[torch.dtype] = None, positions: int = 0, fused: Optional[bool] = None,
                 kv_dtype: Optional[torch.dtype] = None):
        super().__init__(model, None, matmul_dtype, positions)
        n, u = inverse.shape[0], prompt_mask.shape[0]
        self.u, self.g = u, n // u
        self.perm = torch.argsort(inverse, stable=True)  # [N] rows in prompt order (U blocks of G)
        self.unperm = torch.argsort(self.perm)  # [N]
        pad = ~prompt_mask.bool()  # [U, P]
        self.prompt_pad = pad.repeat_interleave(self.g, 0)[:, None, :]  # [N, 1, P] in prompt order
        self.pad_u8 = pad.to(torch.uint8).contiguous()  # [U, P] for the fused kernel
        w = self.embed
        # float32 residual stream on CPU: the step's attention, norms and SwiGLU run as tilt.kernels'
        # fused C kernels (``_fused_step``; the products stay torch's / MKL's). ``fused=False``: torch
        # ops only (the benchmarks' and tests' reference path)
        self.fused = kernels.usable(w) if fused is None else bool(fused) and kernels.usable(w)
        # the completion keys and values in ``kv_dtype`` (None: the model's; float16 halves the bytes the decode
        # attention reads per token, int8 with a scale per vector takes 36 of 128 at d = 32; rollout.kv_cache_dtype):
        # rounded as they are written, read back as floats
        kv_dtype = kv_dtype or w.dtype
        if kv_dtype not in (w.dtype, torch.float16, torch.int8):
            raise ValueError(f"kv_dtype {kv_dtype}: the completion cache is kept in the model's dtype, float16 or int8")
        if kv_dtype == torch.float16 and self.fused and not kernels.kv_half_usable(self.head_dim):
            self.fused = False  # no float16 path in this build or at this head size: torch ops
        if kv_dtype == torch.int8 and self.fused and not kernels.kv_int8_usable(self.head_dim):
            self.fused = False  # no int8 path at this head size: torch ops
        # per layer: prompt keys in pair layout, [U, nkv, d, P] (transposed for ``attend``'s product) or
        # [U, nkv, P, d] for the fused kernel; values [U, nkv, P, d]
        self.kp, self.vp = [], []
        for layer in getattr(prompt_cache, "layers", ()):  # None: ``prefill`` fills them
            k, v = layer.keys, layer.values  # [U, nkv, P, d]
            k = k.index_select(-1, self.pair)
            self.kp.append((k if self.fused else k.transpose(-1, -2)).contiguous())
            self.vp.append(v.contiguous())
        self.kc = [w.new_empty(n, self.nkv, capacity, self.head_dim, dtype=kv_dtype) for _ in self.layers]  # [N, nkv, T, d]
        self.vc = [w.new_empty(n, self.nkv, capacity, self.head_dim, dtype=kv_dtype) for _ in self.layers]
        scaled = kv_dtype == torch.int8  # an int8 cache: one float32 scale per key and per value, [N, nkv, T]
        self.ks = [w.new_empty(n, self.nkv, capacity, dtype=torch.float32) for _ in self.layers] if scaled else None
        self.vs = [w.new_empty(n, self.nkv, capacity, dtype=torch.float32) for _ in self.layers] if scaled else None
        self.filled = 0
        self._plan: Optional[tuple] = None  # ``_calls``: the fused step's library calls, built on first use

    def prompt_keys(self, i: int) -> Tensor:
        """Layer ``i``'s prompt keys [U, nkv, P, d] (pair layout) whichever layout they are kept in."""
        return self.kp[i] if self.fused else self.kp[i].transpose(-1, -2)

    @torch.no_grad()
    def prefill(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Run the U distinct left-padded prompts ``ids``/``mask`` [U, P] through the decoder's own
        weights, keep their keys and values for ``attend``, and return the logits after each
        prompt's last token, [U, V]. The same function as the model's forward over the prompts
        (causal attention that skips left padding; a padding query sees itself so no row is empty),
        without its per-module dispatch, mask building and cache bookkeeping."""
        u, p = ids.shape
        nq, d = self.nq, self.head_dim
        self._plan = None
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [U, P] positions ignore left padding
        h = F.embedding(ids.reshape(u * p), self.embed)  # [U P, H]
        rot = self.rotation(h, pos.reshape(u * p))  # [U P, 1, d/2]
        ar = torch.arange(p, device=ids.device)
        keep = ((ar[None, :] <= ar[:, None])[None] & mask.bool()[:, None, :]) | torch.eye(p, dtype=torch.bool,
                                                                                            device=ids.device)
        keep = keep[:, None]  # [U, 1, P, P]
        for ly in self.layers:
            q, k, v = self.qkv(ly, h, rot)  # [U P, nq, 1, d], [U P, nkv, 1, d] x 2
            q, k, v = (x.reshape(u, p, -1, d).transpose(1, 2) for x in (q, k, v))  # [U, heads, P, d]
            self.kp.append((k if self.fused else k.transpose(-1, -2)).contiguous())  # [U, nkv, P, d] / [U, nkv, d, P]
            self.vp.append(v.contiguous())  # [U, nkv, P, d]
            o = attention(q, k, v, keep, scale=1.0)  # [U, nq, P, d]
            h = h + _lin(o.transpose(1, 2).reshape(u * p, nq * d), ly["o"])
            h = self.mlp(ly, h)
        last = h.view(u, p, -1)[:, -1]  # [U, H]: left padding puts every prompt's last token at P - 1
        return _lin(_normed(last, self.norm_eps), self.lm)  # [U, V]

    def attend(self, i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention output [N, nq * d] of one new token per row (rows in prompt order)."""
        n, nq, nkv, d, t, u, g = q.shape[0], self.nq, self.nkv, self.head_dim, self.filled, self.u, self.g
        rep = nq // nkv
        if self.ks is not None:  # an int8 cache: each vector as integers and a scale, read back in the model's dtype
            self.kc[i][:, :, t], self.ks[i][:, :, t] = kernels.quantize_int8(k[:, :, 0].float())
            self.vc[i][:, :, t], self.vs[i][:, :, t] = kernels.quantize_int8(v[:, :, 0].float())
            kc = kernels.dequantize_int8(self.kc[i][:, :, :t + 1], self.ks[i][:, :, :t + 1], q.dtype)
            vc = kernels.dequantize_int8(self.vc[i][:, :, :t + 1], self.vs[i][:, :, :t + 1], q.dtype)
        else:
            self.kc[i][:, :, t] = k[:, :, 0]
            self.vc[i][:, :, t] = v[:, :, 0]
            kc, vc = self.kc[i][:, :, :t + 1], self.vc[i][:, :, :t + 1]  # [N, nkv, t+1, d] views
        if kc.dtype != q.dtype:  # a float16 cache (kv_dtype): what was kept, read back in the model's dtype
            if bool((torch.isinf(self.kc[i][:, :, t]) & torch.isfinite(k[:, :, 0])).any()
                    | (torch.isinf(self.vc[i][:, :, t]) & torch.isfinite(v[:, :, 0])).any()):
                kernels.attend_done(kernels.KV_RANGE)  # rounded to infinity: beyond float16's range
            kc, vc = kc.to(q.dtype), vc.to(q.dtype)
        qh = q.reshape(n, nkv, rep, d)  # query heads grouped by their key head
        qg = qh.view(u, g, nkv, rep, d).transpose(1, 2).reshape(u, nkv, g * rep, d)  # [U, nkv, G rep, d]
        s_p = torch.matmul(qg, self.kp[i])  # [U, nkv, G rep, P]
        width = s_p.shape[-1]
        s_p = s_p.view(u, nkv, g, rep, width).transpose(1, 2).reshape(n, nq, width)  # [N, nq, P]
        s_p = s_p.masked_fill(self.prompt_pad, -torch.inf)
        s_c = torch.matmul(qh, kc.transpose(-1, -2)).view(n, nq, t + 1)  # [N, nq, t+1]
        p = torch.softmax(torch.cat([s_p, s_c], -1), -1)  # [N, nq, P+t+1] (q carries 1/sqrt(d))
        p_p = p[..., :width].reshape(u, g, nkv, rep, width).transpose(1, 2).reshape(u, nkv, g * rep, width)
        o = torch.matmul(p_p, self.vp[i]).view(u, nkv, g, rep, d).transpose(1, 2).reshape(n, nq, d)  # [N, nq, d]
        o = o + torch.matmul(p[..., width:].reshape(n, nkv, rep, t + 1), vc).view(n, nq, d)
        return o.reshape(n, nq * d)

    @torch.no_grad()
    def step(self, tok: Tensor, pos: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Logits [N, V] for one new token per row (caller's row order). ``attn_mask`` is not
        read: the prompt's padding is known and every generated position is attended to."""
        self.pack(tok.shape[0])
        tok, pos = tok.index_select(0, self.perm), pos.index_select(0, self.perm)  # prompt order
        h = F.embedding(tok, self.embed)  # [N, H]
        rot = self.rotation(h, pos)
        if self.fused:
            return self._fused_step(h, rot)
        for i, ly in enumerate(self.layers):
            q, k, v = self.qkv(ly, h, rot)  # [N, nq, 1, d], [N, nkv, 1, d] x 2
            h = h + _lin(self.attend(i, q, k, v), ly["o"])
            h = self.mlp(ly, h)
        self.filled += 1
        h = _normed(h.index_select(0, self.unperm), self.norm_eps)  # caller's order
        return _lin(h, self.lm)  # [N, V]

    def _calls(self, n: int) -> Optional[tuple]:
        """The fused step's library calls for ``n`` rows as argument lists (pointers to the packed weights,
        the caches and output buffers kept here), when every product of every layer is packed for
        tilt.kernels (``linear``, the gate/up product for ``linear_swiglu``), else None. The step then
        calls the library straight, without the Python wrappers' checks and allocations (about 0.1 ms a
        layer at 64 rows; speed work 41), or passes the same calls as records (``bufs["ops"]``,
        ``kernels.decode_op``) to ``tilt_decode_layers``, one call a token (``ONE_CALL``, speed work 48). Kept
        until ``pack`` or ``prefill`` changes what it points at."""
        if self._plan is not None and self._plan[0] == n:
            return self._plan[1]
        lys = self.layers
        if not lys or len(self.kp) != len(lys) or any(
                len(ly[key]) != 4 or ly[key][3] != (-1 if key == "gu" else 0)
                for ly in lys for key in ("qkv", "o", "gu", "down")):
            return None
        ptr = kernels._ptr
        hid, nq, nkv, d = self.embed.shape[1], self.nq, self.nkv, self.head_dim
        width, u, p, cap = (nq + 2 * nkv) * d, self.pad_u8.shape[0], self.pad_u8.shape[1], self.kc[0].shape[2]
        w = self.embed
        bufs = {"x": w.new_empty(n, hid), "y": w.new_empty(n, width), "a": w.new_empty(n, nq * d),
                "o": w.new_empty(n, hid), "g": w.new_empty(n, max(ly["inter"] for ly in lys)),
                "m": w.new_empty(n, hid)}
        x, y, a, o, g, m = (ptr(bufs[k]) for k in "xyaogm")
        rec, K = kernels.decode_op, kernels
        half = self._cache_kind()
        layers, ops = [], [rec(K.DECODE_NORM, None, x, n, hid, float(lys[0]["in_eps"]))]
        for i, ly in enumerate(lys):
            (_, qb, qp, _), (_, ob, op, _), (_, gb, gp, _), (_, db, dp, _) = (ly[k] for k in ("qkv", "o", "gu", "down"))
            inter = ly["inter"]
            eps = lys[i + 1]["in_eps"] if i + 1 < len(lys) else self.norm_eps
            layers.append(((x, ptr(qp), ptr(qb), y, n, width, hid),
                           (y, ptr(self.kc[i]), ptr(self.vc[i]), ptr(self.kp[i]), ptr(self.vp[i]), ptr(self.pad_u8),
                            a, n, u, nq, nkv, d, p, cap, ptr(self.ks[i]) if self.ks else None,
                            ptr(self.vs[i]) if self.vs else None),
                           (a, ptr(op), ptr(ob), o, n, hid, nq * d), (o, x, n, hid, ly["post_eps"]),
                           (x, ptr(gp), ptr(gb), g, n, inter, hid), (g, ptr(dp), ptr(db), m, n, hid, inter),
                           (m, x, n, hid, eps)))
            qkv, att, o_, post, gu, down, nxt = layers[-1]  # the same calls as records, in the same order
            ops += [rec(K.DECODE_LINEAR, *qkv), rec(K.DECODE_ATTEND, *att[:14], half, *att[14:]),
                    rec(K.DECODE_LINEAR, *o_), rec(K.DECODE_NORM, *post[:4], float(post[4])),
                    rec(K.DECODE_SWIGLU, *gu), rec(K.DECODE_LINEAR, *down),
                    rec(K.DECODE_NORM, *nxt[:4], float(nxt[4]))]
        bufs["ops"] = torch.tensor(ops, dtype=torch.int64)  # [ops, DECODE_OP] for tilt_decode_layers
        self._plan = (n, (bufs, layers))
        return self._plan[1]

    def _cache_kind(self) -> int:
        """``tilt_attend``'s ``half`` for the completion cache: 0 in the model's float dtype, 1 float16, 2 int8."""
        if not self.kc:
            return 0
        return 2 if self.kc[0].dtype == torch.int8 else int(self.kc[0].dtype == torch.float16)

    def _fused_step(self, h: Tensor, rot: Tensor) -> Tensor:
        """``step``'s layers with tilt.kernels: per layer four products and three fused calls (rotary
        embedding + cache write + attention; residual add + RMS norm, twice; SiLU-gated product), the
        residual stream ``h`` [N, H] (rows in prompt order) updated in place; with ``ONE_CALL`` all of a token's
        calls are one library call. The same function as the torch ops of ``step`` to float rounding
        (tests/test_kernels.py)."""
        lib, t, nq = kernels.library(), self.filled, self.nq
        half = self._cache_kind()
        rot = rot.reshape(h.shape[0], -1).contiguous()  # [N, d/2] complex
        calls = self._calls(h.shape[0])
        if calls is not None:  # the same calls as below, straight to the library
            if t >= self.kc[0].shape[2]:  # kernels.attend's check: the kernel would write past the cache
                raise ValueError(f"attend: position {t} outside the cache's {self.kc[0].shape[2]}")
            bufs, layers = calls
            hp, rp, x = h.data_ptr(), rot.data_ptr(), bufs["x"]
            if ONE_CALL:
                ops = bufs["ops"]
                kernels.attend_done(lib.tilt_decode_layers(ops.data_ptr(), ops.shape[0], hp, rp, t))
                self.filled += 1
                return _lin(x.index_select(0, self.unperm), self.lm)  # [N, V] in the caller's order
            lib.tilt_add_rms_norm(hp, None, x.data_ptr(), h.shape[0], h.shape[1], self.layers[0]["in_eps"])
            for qkv, att, o, post, gu, down, nxt in layers:
                lib.tilt_linear(*qkv)
                kernels.attend_done(lib.tilt_attend(att[0], rp, *att[1:-2], t, half, *att[-2:]))
                lib.tilt_linear(*o)
                lib.tilt_add_rms_norm(hp, *post)
                lib.tilt_linear_swiglu(*gu)
                lib.tilt_linear(*down)
                lib.tilt_add_rms_norm(hp, *nxt)
            self.filled += 1
            return _lin(x.index_select(0, self.unperm), self.lm)  # [N, V] in the caller's order
        x = kernels.add_rms_norm(h, None, self.layers[0]["in_eps"] if self.layers else self.norm_eps, lib)
        for i, ly in enumerate(self.layers):
            a = kernels.attend(_lin(x, ly["qkv"]), rot, self.kc[i], self.vc[i], self.kp[i], self.vp[i],
                               self.pad_u8, t, nq, lib, *((self.ks[i], self.vs[i]) if self.ks else ()))  # [N, nq d]
            x = kernels.add_rms_norm(h, _lin(a, ly["o"]), ly["post_eps"], lib)
            gu = ly["gu"]
            if len(gu) == 4 and gu[3] == -1:  # the SiLU-gated product in one call
                m = _lin(kernels.linear_swiglu(x, gu[2], ly["inter"], gu[1], lib), ly["down"])
            else:
                m = _lin(kernels.silu_mul(_lin(x, gu), lib), ly["down"])
            eps = self.layers[i + 1]["in_eps"] if i + 1 < len(self.layers) else self.norm_eps
            x = kernels.add_rms_norm(h, m, eps, lib)
        self.filled += 1
        return _lin(x.index_select(0, self.unperm), self.lm)  # [N, V] in the caller's order


def lean_supported(model) -> bool:
    """Whether ``model`` is of the kinds the lean decode steps are checked on (a plain model, or a
    LoRA model or LoRA reference whose adapters ``linear_parts`` reads)."""
    found = resolve(model)
    if found is None:
        return False
    model, adapters = found
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED:
        return False
    if getattr(cfg, "hidden_act", None) != "silu" or not hasattr(F, "rms_norm"):
        return False
    if getattr(cfg, "use_sliding_window", False) or (cfg.model_type == "mistral" and cfg.sliding_window):
        return False
    if type(model.model.embed_tokens) is not torch.nn.Embedding:
        return False
    try:
        w = _plain(model.lm_head, adapters)[0]
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            for proj in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
                linear_parts(proj, adapters)
    except AttributeError:
        return False
    if w.dtype not in (torch.float32, torch.float64):
        return False
    return all(getattr(layer, "attention_type", "full_attention") == "full_attention" for layer in model.model.layers)


def lean_decoder(model, cache, matmul_dtype: Optional[torch.dtype] = None,
                 positions: int = 0) -> Optional[LeanDecoder]:
    """A ``LeanDecoder`` when the model and cache are of the checked kinds, else None. ``positions``:
    an upper bound on the positions decoded (0: the rotary module is called every step)."""
    if cache is None or not lean_supported(model):
        return None
    try:
        return LeanDecoder(model, cache, matmul_dtype, positions)
    except AttributeError:  # a variant whose modules are named differently
        return None


def grouped_decoder(model, prompt_cache, prompt_mask: Tensor, inverse: Tensor,
                    capacity: int, matmul_dtype: Optional[torch.dtype] = None,
                    positions: int = 0, kv_dtype: Optional[torch.dtype] = None) -> Optional[GroupedDecoder]:
    """A ``GroupedDecoder`` for U distinct prompts (``prompt_mask`` [U, P]; row r of the batch has
    prompt ``inverse[r]``) when the model is supported and every prompt has the same number of rows;
    else None. ``prompt_cache``: HF's prefill of the prompts (U rows), or None to call the decoder's
    ``prefill`` next."""
    counts = torch.bincount(inverse, minlength=prompt_mask.shape[0])  # [U]
    if not lean_supported(model) or not bool((counts == counts[0]).all()) or int(counts[0]) < 2:
        return None
    if prompt_cache is not None and not all(getattr(layer, "keys", None) is not None
                                            for layer in getattr(prompt_cache, "layers", [None])):
        return None
    try:
        return GroupedDecoder(model, prompt_cache, prompt_mask, inverse, capacity, matmul_dtype, positions,
                              kv_dtype=kv_dtype)
    except AttributeError:
        return None
