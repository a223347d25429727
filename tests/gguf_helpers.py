"""Write tiny Llama GGUF files with the ``gguf`` package (tests build their own models: no network)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_llama_cpp_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's per-head [first halves; second halves] rotary row order -> llama.cpp's interleaved pairs.

    Row (h, half, i) moves to (h, i, half): reshape [n_head, 2, d/2, in], swap axes 1 and 2. The
    inverse is what transformers applies when it reads attn_q / attn_k from GGUF.
    """
    d2 = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, d2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """Tokens (2 specials + the 256 byte-level symbols + 2 merges) and the merges."""
    from tokenizers import pre_tokenizers

    merges = ["1 +", "= 1"]
    tokens = ["<|endoftext|>", "<|pad|>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "1+", "=1"]
    return tokens, merges


def write_tiny_llama_gguf(path: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4,
                          kv_heads: int = 2, inter: int = 64):
    """A random tiny Llama (tied embeddings) written as GGUF (F32 tensors); returns the HF model."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, merges = byte_level_vocab()
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))  # 3 = control, 1 = normal
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_pad_token_id(1)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = to_llama_cpp_rows(t, heads)
            elif gg == "attn_k":
                t = to_llama_cpp_rows(t, kv_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model
