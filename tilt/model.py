"""Loading policies: the shipped base model, any local Hugging Face causal LM directory, a GGUF
file (converted once, ``tilt.models.gguf``) or a model alias (``tilt.models.aliases``).

No network: ``local_files_only=True`` everywhere, and a missing path is a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

SHIPPED = "shipped"


class ModelLoadError(RuntimeError):
    """The model path does not hold a loadable causal LM + tokenizer."""


def shipped_model_dir() -> Path:
    """Directory of the base model shipped inside the package (tilt/assets/base)."""
    return Path(str(resources.files("tilt") / "assets" / "base"))


def resolve_model_path(path: str, gguf_file: str | None = None) -> Path:
    """Map ``"shipped"`` to the packaged model, an alias or a ``.gguf`` file (or directory +
    ``gguf_file``) to its cached conversion; check that a local directory exists."""
    from tilt.models.aliases import ALIASES, resolve_alias
    from tilt.models.gguf import convert_gguf

    if path in ALIASES:
        return resolve_alias(path)
    p = shipped_model_dir() if path == SHIPPED else Path(path).expanduser()
    if gguf_file is not None:
        p = p / gguf_file
    if p.suffix.lower() == ".gguf":
        return convert_gguf(p)
    if not p.exists():
        hint = " (run `tilt pretrain` to build the shipped model)" if path == SHIPPED else ""
        raise ModelLoadError(f"model path {str(p)!r} does not exist{hint}; give a local directory holding "
                             f"config.json, weights and a tokenizer, a .gguf file, or an alias ({', '.join(ALIASES)})")
    if not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
        raise ModelLoadError(f"model path {str(p)!r} has no config.json; it is not a Hugging Face model directory")
    return p


@dataclass
class Policy:
    """A causal LM and its tokenizer, plus the ids the rollout needs."""

    model: torch.nn.Module
    tokenizer: object
    eos_id: int
    pad_id: int


def load_policy(path: str, *, dtype: torch.dtype = torch.float32, gguf_file: str | None = None,
                device: torch.device | str | None = None) -> Policy:
    """Load ``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local directory, "shipped", a GGUF
    file or an alias (see ``resolve_model_path``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per weight load is noise in a training log
    p = resolve_model_path(path, gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        if (p / "config.json").exists():
            model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=dtype)
        else:  # a LoRA run's final/: the peft adapter on its recorded base model, merged
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(str(p), local_files_only=True,
                                                             dtype=dtype).merge_and_unload()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load a causal LM from {str(p)!r}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - e.g. SafetensorError of a truncated or garbage weights file
        raise ModelLoadError(f"could not load the weights in {str(p)!r} ({type(exc).__name__}: {exc}); the weights "
                             "file is truncated or not a weights file: copy or save the model again") from None
    n_embed = model.get_input_embeddings().num_embeddings
    if len(tok) > n_embed:  # token ids up to len(tok) - 1 would index past the embedding table mid-run
        raise ModelLoadError(f"the tokenizer in {str(p)!r} has {len(tok)} tokens but the model's embedding has "
                             f"only {n_embed} rows; they do not belong together (resize the embeddings or use "
                             "the model's own tokenizer)")
    eos_id = tok.eos_token_id if tok.eos_token_id is not None else model.config.eos_token_id
    if eos_id is None:
        raise ModelLoadError(f"model at {str(p)!r} defines no EOS token; set eos_token in its tokenizer")
    if tok.pad_token_id is None:  # GPT-2 style tokenizers have none: pad with EOS (masked anyway)
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.config.use_cache = True
    if device is not None:
        model.to(device)
    model.eval()
    return Policy(model=model, tokenizer=tok, eos_id=int(eos_id), pad_id=int(tok.pad_token_id))


def build_llama(vocab_size: int, *, hidden: int = 128, layers: int = 4, heads: int = 4,
                intermediate: int = 384, max_positions: int = 128, bos_id: int = 1,
                eos_id: int = 2, pad_id: int = 0, seed: int = 0):
    """A freshly initialised Llama-architecture causal LM (used by ``tilt pretrain``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``model.device`` -> a torch device: "auto" = cuda when available, else cpu. ConfigError for
    cuda on a machine (or torch build) without it."""
    from tilt.config import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only build)"
        raise ConfigError(f"model.device='cuda' but no CUDA device is available (torch {torch.__version__}, "
                          f"{build}); use model.device=cpu or auto")
    return torch.device(name)


def load_train_policy(mcfg) -> Policy:
    """The policy to train from a ``tilt.config.ModelCfg``: loaded on ``model.device``, LoRA-wrapped
    if configured, with gradient checkpointing if asked, in train mode."""
    from tilt.models.lora import apply_lora
    from tilt.models.prompting import formatted

    device = resolve_device(mcfg.device)
    policy = load_policy(mcfg.path, dtype=DTYPES[mcfg.dtype], gguf_file=mcfg.gguf_file, device=device)
    policy.tokenizer = formatted(policy.tokenizer, mcfg)
    if mcfg.gradient_checkpointing:
        # non-reentrant: needs no input that requires grad (LoRA freezes the embeddings)
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mcfg.lora.enabled:
        policy.model = apply_lora(policy.model, mcfg.lora, where=mcfg.path)
    policy.model.train()
    return policy


def reference_model(policy: Policy, mcfg) -> torch.nn.Module:
    """The frozen reference pi_ref: the LoRA policy with its adapters disabled (no second copy of
    the weights), else a second load of ``model.path``."""
    from tilt.models.lora import AdapterDisabledRef, is_lora

    if is_lora(policy.model):
        return AdapterDisabledRef(policy.model)
    return load_policy(mcfg.path, dtype=DTYPES[mcfg.dtype], gguf_file=mcfg.gguf_file,
                       device=resolve_device(mcfg.device)).model.requires_grad_(False)
