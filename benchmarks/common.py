"""Shared pieces of the tilt-vs-TRL benchmarks: models, prompts, the reward, and measurements.

Both sides get the same HF-format model directory, the same prompts in the same order and the
same reward function, so the only difference between a tilt step and a TRL step is the code
that runs it.
"""
from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from tilt.model import build_llama, shipped_model_dir
from tilt.rewards import verifier_reward
from tilt.tasks.mix import parse_mix, sample_items

MIX = "addition:1,multiplication:1,countdown:1,sorting:1-2"  # tilt's default task mix
# Model sizes of the grid. "1m" is the shipped base model; "10m"/"30m" are random-init Llamas with the
# shipped tokenizer (timing only); "smollm2" is the real SmolLM2-135M-Instruct (`make smollm2` installs it).
# Parameter counts are printed by the benchmark.
REAL = {"smollm2": "smollm2-135m-instruct"}
SIZES: dict[str, dict[str, int] | None] = {
    "1m": None,
    "smollm2": None,
    "10m": {"hidden": 256, "layers": 10, "heads": 8, "intermediate": 1024},
    "30m": {"hidden": 512, "layers": 9, "heads": 8, "intermediate": 1408},
}


def model_dir(size: str, cache: Path) -> Path:
    """HF-format model directory for a grid size (built once into ``cache``; deterministic)."""
    shape = SIZES[size]
    if size in REAL:
        from tilt.models.aliases import resolve_alias

        return resolve_alias(REAL[size])  # an error naming `tilt models install` when it is not installed
    if shape is None:
        return shipped_model_dir()
    out = cache / f"llama-{size}"
    if (out / "config.json").exists():
        return out
    tmp = cache / f".llama-{size}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shipped = shipped_model_dir()
    vocab = json.loads((shipped / "config.json").read_text())["vocab_size"]
    model = build_llama(vocab, max_positions=1024, seed=0, **shape)
    model.save_pretrained(tmp)
    for f in shipped.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


def train_items(count: int, start: int = 0) -> list:
    """The benchmark's prompts: items of tilt's default mix, train split, fixed order."""
    return sample_items(parse_mix(MIX), split="train", start=start, count=count)


def sampled_batch(size: str, cache: Path, tokens: int, prompts: int, group: int, lora: int = 0):
    """(model, tokenizer, prompt ids, prompt mask, sampled batch) for the teacher-forced-pass A/Bs: the
    grid model in float32 (with LoRA of rank ``lora`` on all linear layers, alpha = 2 r, B drawn at
    random so the adapters change the function), ``prompts`` x ``group`` rows of the benchmark's
    prompts, ``tokens`` new tokens forced, seed 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tilt.rollout import SamplingParams, generate, left_pad

    path = model_dir(size, cache)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    if lora:
        from tilt.config import LoraCfg
        from tilt.models.lora import apply_lora

        model = apply_lora(model, LoraCfg(enabled=True, r=lora, lora_alpha=2 * lora, target_modules="all-linear"),
                           where=str(path))
        with torch.no_grad():
            for n, q in model.named_parameters():
                if "lora_B" in n:
                    q.normal_(0, 0.01)
    rows = [tok(it.prompt)["input_ids"] for it in train_items(prompts) for _ in range(group)]
    ids, mask = left_pad(rows, tok.pad_token_id or 0)
    batch = generate(model, ids, mask, params=SamplingParams(tokens, min_new_tokens=tokens), eos_id=tok.eos_token_id,
                     pad_id=tok.pad_token_id or 0, generator=torch.Generator().manual_seed(0))
    return model, tok, ids, mask, batch


def trl_rows(items: list) -> list[dict[str, Any]]:
    """Dataset rows for TRL: the prompt plus what the verifier needs (columns as JSON text)."""
    return [{"prompt": it.prompt, "task": it.task, "columns_json": json.dumps(it.columns)} for it in items]


def trl_reward(prompts: list[str], completions: list[str], *, task: list[str], columns_json: list[str],
               **_: Any) -> list[float]:
    """tilt's verifier reward behind TRL's reward-function signature (same numbers on both sides)."""
    return verifier_reward(prompts, completions, task=task, columns=[json.loads(c) for c in columns_json])


def with_overrides(cfg: dict, overrides: list[str]) -> dict:
    """A tilt config dict with ``--set``-style overrides (``a.b=value``) merged in."""
    from tilt.config import merge_config, parse_set

    return merge_config(cfg, parse_set(overrides))


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_flops(model: torch.nn.Module, positions: int, seq_len: int, passes: float = 3.0) -> float:
    """FLOPs of the training phase: ``passes`` x (forward FLOPs) over ``positions`` token positions.

    Forward FLOPs per position: 2 x (Linear weights) + attention scores and mixing, 4 x seq_len x
    hidden per layer. passes = 3 for forward + backward (backward = 2 forwards), 4 with gradient
    checkpointing (the forward runs again during backward).
    """
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config
    attn = 4 * seq_len * cfg.hidden_size * cfg.num_hidden_layers
    return passes * positions * (2 * linear + attn)


def measure_read_bandwidth(threads: int, mib: int = 512, repeats: int = 6) -> float:
    """Best sustained read bandwidth of this machine at ``threads`` threads, bytes/s: a plain sum over a
    float32 tensor of ``mib`` MiB, far beyond the caches, as the decode attention streams its KV cache
    (a read of 8-96 MB runs from L3 on the issue-14 VMs, ~2x faster; of 192 MB and more at the memory's
    pace). The tensor is written once first, so no read pays for fresh pages."""
    torch.set_num_threads(threads)
    x = torch.ones(mib * 2 ** 20 // 4)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def decode_kv_bytes(config, rows: int, tokens: int, elem: int = 4, scale_bytes: int = 0) -> float:
    """Bytes of cached completion keys and values that tilt's decode attention reads while sampling
    ``tokens`` new tokens for ``rows`` rows: at step t every row reads its t + 1 keys and values in every
    layer, rows x layers x 2 x kv heads x (head size x elem + scale_bytes) x T (T + 1) / 2 (scale_bytes: an int8
    cache's scale per key and per value). The prompts' keys are left out (kept once per prompt and read by its
    G rows while in cache)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per = head_dim * elem + scale_bytes
    return float(rows * config.num_hidden_layers * 2 * heads * per * tokens * (tokens + 1) / 2)


def measure_matmul_peak(threads: int, n: int = 1024, repeats: int = 20, dtype: torch.dtype = torch.float32,
                        warm_s: float = 2.0) -> float:
    """Best sustained matmul throughput of this machine at ``threads`` threads in ``dtype``, FLOP/s.
    Multiplies for ``warm_s`` seconds first: on the 2-core VM of issue 14's seventh session the first
    second of a process read 106-109 GFLOP/s against 170-190 after it; the product goes into one
    preallocated output, so no call pays for fresh pages."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warm_s:
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best
