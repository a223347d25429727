"""One side of the step-time benchmark in its own process: ``python workers.py {tilt,trl} ...``.

The driver (``step_time.py``) starts one tilt and one TRL worker per grid point and alternates
them: it sends ``go`` on stdin, the worker runs exactly one RL step and answers one JSON line of
phase timings on the protocol stream (the original stdout; everything the libraries print goes
to stderr). ``exit`` makes the worker answer with its peak RSS and stop. Separate processes make
peak RSS per side meaningful; strict alternation means the two never run at the same time.

Phases (seconds): ``generate`` (the sampling loop: tilt ``rollout.generate``, TRL
``model.generate``), ``ref`` (reference log-probs), ``fwd_bwd`` (policy forward, loss and
backward), ``optimizer`` (gradient clipping and the optimizer step), ``step`` (the whole RL step).

TRL runs in one of two presets (``--trl-preset``): ``default`` is ``GRPOConfig``'s defaults for
everything the benchmark does not fix (notably ``gradient_checkpointing=True``, which recomputes the
forward in the backward); ``best`` is what a user who wants speed at these model sizes sets:
gradient checkpointing off (the activations of these models fit easily, so the recompute buys
nothing). ``--trl-compile`` adds ``torch_compile=True`` to either preset (see benchmarks/README.md
for why it is not part of ``best``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MIX, peak_rss_mb, train_items, trl_reward, trl_rows  # noqa: E402


class Protocol:
    """JSON lines out on the original stdout; commands in on stdin."""

    def __init__(self):
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # library prints go to stderr from now on

    def send(self, **msg) -> None:
        self.out.write(json.dumps(msg) + "\n")

    def wait(self) -> str:
        line = sys.stdin.readline().strip()
        if not line:
            raise SystemExit("driver went away")
        return line


def timed(fn, box: dict, key: str):
    """Wrap ``fn`` so each call adds its wall time to ``box[key]``."""
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            box[key] = box.get(key, 0.0) + time.perf_counter() - t
    return wrapper


def tilt_worker(a: argparse.Namespace, proto: Protocol) -> None:
    import tilt.learner
    import tilt.trainer
    import tilt.wiring.sampling
    from tilt.config import Config
    from tilt.providers.frozen import Reference
    from tilt.rollout import unique_prompts
    from tilt.trainer import build, data_offset, rollout_step
    from tilt.wiring.sampling import TrainStream

    model_cfg: dict = {"path": a.model}
    if a.lora:
        model_cfg["lora"] = {"enabled": True, "r": a.lora, "lora_alpha": 2 * a.lora, "target_modules": "all-linear"}
    rollout = {"group_size": a.group, "prompts_per_step": a.prompts, "max_new_tokens": a.tokens,
               "min_new_tokens": a.tokens if a.force_length else 0, "temperature": 1.0}
    extra: dict = {}
    if a.decode_dtype != "model":  # bf16 decode products; the learner corrects with truncated IS
        rollout["decode_dtype"] = a.decode_dtype
        extra["correction"] = {"name": "token_tis"}
    if a.kv_cache_dtype != "model":  # float16 or int8 completion KV cache; corrected the same way
        rollout["kv_cache_dtype"] = a.kv_cache_dtype
        extra["correction"] = {"name": "token_tis"}
    cfg = Config.model_validate({
        "seed": 0, "threads": a.threads, "model": model_cfg,
        "tasks": {"mix": MIX}, "rollout": rollout,
        "loss": {"name": a.loss}, "kl": {"estimator": "k3", "placement": "loss", "beta": a.beta},
        "optim": {"lr": a.lr, "betas": [0.9, 0.999], "weight_decay": 0.0, "schedule": "constant", "grad_clip": 1.0},
        "train": {"steps": a.steps, "minibatches": 1, "epochs": 1, "grad_accum": 1}, **extra,
    })
    parts = build(cfg)
    box: dict[str, float] = {}
    tilt.wiring.sampling.generate = timed(tilt.wiring.sampling.generate, box, "generate")
    Reference.rollout = timed(Reference.rollout, box, "ref")  # the reference pass (tilt/providers/frozen.py)
    stream = TrainStream(cfg.tasks.mix, offset=data_offset(cfg.seed))
    proto.send(ready=True, params=sum(p.numel() for p in parts.policy.model.parameters()))
    for step in range(1, a.steps + 1):
        proto.wait()
        box.clear()
        t0 = time.perf_counter()
        batch, metrics, _ = rollout_step(parts, cfg, stream, step)
        metrics.update(parts.learner.update(batch))
        step_s = time.perf_counter() - t0
        proto.send(step=step, generate=box.get("generate", 0.0), ref=box.get("ref", 0.0),
                   fwd_bwd=metrics["time/fwd_bwd_s"], optimizer=metrics["time/optimizer_s"], step_s=step_s,
                   tokens=int(batch.completion_mask.sum()), width=int(batch.completion_ids.shape[1]),
                   seq_len=int(batch.prompt_ids.shape[1] + batch.completion_ids.shape[1]),
                   # positions through the training forward: each distinct prompt once, then every completion
                   train_positions=int(unique_prompts(batch.prompt_ids, batch.prompt_mask)[0].numel()
                                       + batch.completion_ids.numel()), passes=2.0 if a.lora else 3.0,
                   reward=float(metrics["reward/mean"]))
    proto.wait()
    proto.send(rss_mb=peak_rss_mb())


def trl_preset(preset: str, compile_model: bool = False) -> dict:
    """``GRPOConfig`` arguments of a TRL preset: ``default`` (GRPOConfig's own defaults) or ``best``
    (gradient checkpointing off); ``compile_model`` adds ``torch_compile=True``."""
    if preset not in ("default", "best"):
        raise ValueError(f"unknown TRL preset {preset!r}; valid: default, best")
    kw: dict = {} if preset == "default" else {"gradient_checkpointing": False}
    if compile_model:
        kw["torch_compile"] = True
    return kw


def trl_worker(a: argparse.Namespace, proto: Protocol) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    ds = Dataset.from_list(trl_rows(train_items(a.steps * a.prompts)))
    peft_config = None
    if a.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=a.lora, lora_alpha=2 * a.lora, target_modules="all-linear", task_type="CAUSAL_LM")
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=a.prompts * a.group,
        num_generations=a.group, max_completion_length=a.tokens, learning_rate=a.lr, beta=a.beta,
        loss_type=a.loss, lr_scheduler_type="constant", max_steps=a.steps, save_strategy="no",
        report_to=[], use_cpu=True, bf16=False, shuffle_dataset=False, seed=0, temperature=1.0,
        disable_tqdm=True, gradient_accumulation_steps=1, steps_per_generation=1, max_grad_norm=1.0,
        optim="adamw_torch_fused", adam_beta2=0.999, weight_decay=0.0,
        generation_kwargs={"min_new_tokens": a.tokens} if a.force_length else None,
        **trl_preset(a.trl_preset, a.trl_compile))
    box: dict[str, float] = {}
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=trl_reward, args=args, train_dataset=ds,
                          peft_config=peft_config)
    model.generate = timed(model.generate, box, "generate")
    inner = trainer._get_per_token_logps_and_entropies

    def logps(m, *x, **k):
        # with LoRA TRL has no ref_model: the reference is the policy with its adapter off, run without grad
        ref = m is trainer.ref_model or (trainer.ref_model is None and not torch.is_grad_enabled())
        return timed(inner, box, "ref" if ref else "policy_logps")(m, *x, **k)

    trainer._get_per_token_logps_and_entropies = logps
    trainer.compute_loss = timed(trainer.compute_loss, box, "fwd")
    backward = trainer.accelerator.backward

    def timed_backward(loss, **k):
        timed(backward, box, "bwd")(loss, **k)
        box["bwd_end"] = time.perf_counter()

    trainer.accelerator.backward = timed_backward
    n_seen = {"tokens": 0, "width": 0, "seq": 0}
    reward_inner = trainer._generate_and_score_completions

    def gen_and_score(inputs):
        out = reward_inner(inputs)
        n_seen["tokens"] = int(out["completion_mask"].sum())
        n_seen["width"] = int(out["completion_ids"].shape[1])
        n_seen["seq"] = int(out["prompt_ids"].shape[1] + out["completion_ids"].shape[1])
        return out

    trainer._generate_and_score_completions = gen_and_score

    class Pace(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            proto.wait()
            box.clear()
            box["t0"] = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kw):
            box["optimizer"] = time.perf_counter() - box["bwd_end"]

        def on_step_end(self, args, state, control, **kw):
            step_s = time.perf_counter() - box["t0"]
            proto.send(step=state.global_step, generate=box.get("generate", 0.0), ref=box.get("ref", 0.0),
                       fwd_bwd=box.get("fwd", 0.0) + box.get("bwd", 0.0), optimizer=box["optimizer"],
                       step_s=step_s, tokens=n_seen["tokens"], width=n_seen["width"], seq_len=n_seen["seq"],
                       train_positions=a.prompts * a.group * n_seen["seq"],
                       # LoRA: frozen base weights get no weight gradient, so the backward is ~1 forward
                       passes=(4.0 if args.gradient_checkpointing else 3.0) - (1.0 if a.lora else 0.0))

    trainer.add_callback(Pace())
    proto.send(ready=True, params=sum(p.numel() for p in model.parameters()))
    trainer.train()
    proto.wait()
    proto.send(rss_mb=peak_rss_mb())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("side", choices=["tilt", "trl"])
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--loss", default="dapo")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force-length", action="store_true")
    p.add_argument("--trl-preset", default="best", choices=["best", "default"],
                   help="TRL side: best = gradient checkpointing off; default = GRPOConfig's defaults")
    p.add_argument("--trl-compile", action="store_true", help="TRL side: torch_compile=True as well")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank on all linear layers (alpha = 2 r); 0 = full")
    p.add_argument("--decode-dtype", default="model", choices=["model", "bfloat16"],
                   help="tilt side: rollout.decode_dtype (bfloat16 adds correction token_tis)")
    p.add_argument("--kv-cache-dtype", default="model", choices=["model", "float16", "int8"],
                   help="tilt side: rollout.kv_cache_dtype (float16 or int8 adds correction token_tis)")
    a = p.parse_args()
    proto = Protocol()
    (tilt_worker if a.side == "tilt" else trl_worker)(a, proto)


if __name__ == "__main__":
    main()
