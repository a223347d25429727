"""The training loop: sample prompts, draw G completions, score, advantages, optimise.

Reads top to bottom like cleanrl/ppo.py. Every choice of method is a registry lookup made
once in ``build``; the loop itself only wires rollout -> reward -> advantage -> learner.
"""
from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from tilt.advantages import ADVANTAGES
from tilt.batch import AdvantageInput
from tilt.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_text_atomic
from tilt.config import Config, ConfigError, dump_config, load_config
from tilt.evaluate import evaluate_items, summarize
from tilt.evaluation_cli import EVAL_SEED_OFFSET
from tilt.kl import KL_ESTIMATORS
from tilt.learner import Learner, LearnerBatch, NonFiniteLoss, bind_kwargs
from tilt.losses import LOSSES
from tilt.model import load_policy
from tilt.rewards import resolve_reward_fn, score
from tilt.rollout import SamplingParams, decode_completions, encode_prompts, generate, sequence_logprobs
from tilt.tasks.mix import eval_items, parse_mix, sample_items, seed_report
from tilt.tracking import MetricsLog, Progress, plot_curves

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass
class Parts:
    """Everything ``build`` resolved from the config."""

    policy: Any
    ref_model: Optional[torch.nn.Module]
    learner: Learner
    adv_fn: Callable
    kl_fn: Optional[Callable]
    reward_fns: list[Callable]
    reward_weights: list[float]
    generator: torch.Generator


def build(cfg: Config, reward_fns: Optional[list[Callable]] = None) -> Parts:
    """Load models and resolve every registry name of the config into a callable."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = DTYPES[cfg.model.dtype]
    policy = load_policy(cfg.model.path, dtype=dtype)
    policy.model.train()
    entry = LOSSES.entry(cfg.loss.name)
    needs = tuple(entry.meta.get("needs", ()))
    loss_fn = bind_kwargs(entry.fn, cfg.loss.kwargs, f"loss {cfg.loss.name!r}")
    adv_entry = ADVANTAGES.entry(cfg.advantage.name)
    adv_fn = bind_kwargs(adv_entry.fn, cfg.advantage.kwargs, f"advantage {cfg.advantage.name!r}")
    use_ref = cfg.kl.beta > 0 or "ref_logp" in needs or "ref_logits" in needs
    kl_fn = KL_ESTIMATORS.get(cfg.kl.estimator) if use_ref else None
    ref_model = None
    if use_ref:
        ref_model = load_policy(cfg.model.path, dtype=dtype).model
        ref_model.requires_grad_(False)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay)
    total = cfg.train.steps * cfg.train.epochs * cfg.train.minibatches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial_schedule(cfg, total))
    generator = torch.Generator().manual_seed(cfg.seed)
    learner = Learner(
        policy.model, optimizer, scheduler, loss_fn=loss_fn, loss_needs=needs,
        reduction=cfg.loss.reduction or entry.meta.get("reduction", "token-mean"),
        max_len=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, kl_fn=kl_fn,
        kl_beta=cfg.kl.beta, kl_in_loss=cfg.kl.placement == "loss", epochs=cfg.train.epochs,
        minibatches=cfg.train.minibatches, grad_accum=cfg.train.grad_accum, grad_clip=cfg.optim.grad_clip,
        generator=generator, max_bad_steps=cfg.train.max_bad_steps)
    fns = reward_fns if reward_fns is not None else [resolve_reward_fn(n) for n in cfg.reward.functions]
    weights = cfg.reward.weights or [1.0] * len(fns)
    if len(weights) != len(fns):
        raise ConfigError(f"reward.weights has {len(weights)} entries for {len(fns)} reward functions")
    return Parts(policy, ref_model, learner, adv_fn, kl_fn, fns, weights, generator)


def partial_schedule(cfg: Config, total: int) -> Callable[[int], float]:
    """Multiplier of the learning rate at optimizer step s: linear warmup, then the schedule."""
    warm, kind = cfg.optim.warmup_steps, cfg.optim.schedule

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        frac = (s - warm) / max(total - warm, 1)
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[kind]

    return f


def rollout_step(parts: Parts, cfg: Config, items: list) -> tuple[LearnerBatch, dict[str, float], list[str]]:
    """Sample G completions per item, score them and compute advantages."""
    pol, G, B = parts.policy, cfg.rollout.group_size, len(items)
    prompts = [it.prompt for it in items for _ in range(G)]
    ids, mask = encode_prompts(pol.tokenizer, prompts)  # [N, P]
    params = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p)
    pol.model.eval()
    rb = generate(pol.model, ids, mask, params=params, eos_id=pol.eos_id, pad_id=pol.pad_id,
                  generator=parts.generator)
    pol.model.train()
    texts = decode_completions(pol.tokenizer, rb, pol.eos_id)
    columns = {"task": [it.task for it in items for _ in range(G)],
               "difficulty": [it.difficulty for it in items for _ in range(G)],
               "columns": [it.columns for it in items for _ in range(G)]}
    rewards, rstats, messages = score(parts.reward_fns, parts.reward_weights, prompts, texts, columns,
                                      timeout=cfg.reward.timeout_s)
    r = torch.tensor(rewards, dtype=torch.float32)  # [N]
    cmask = rb.completion_mask  # [N, T]
    ref_logp = None
    if parts.ref_model is not None:
        with torch.no_grad():
            ref_logp, _ = sequence_logprobs(parts.ref_model, ids, mask, rb.completion_ids, cmask,
                                            temperature=cfg.rollout.temperature)  # [N, T]
    r_adv, token_rewards = r, None
    if parts.kl_fn is not None and cfg.kl.placement == "reward":
        kl_tok = parts.kl_fn(rb.logprobs, ref_logp) * cmask  # [N, T] detached penalty
        token_rewards = -cfg.kl.beta * kl_tok
        r_adv = r + token_rewards.sum(-1)  # r - beta * sum_t kl_t
    T = cmask.shape[1]
    adv, ametrics = parts.adv_fn(AdvantageInput(
        rewards=r_adv.view(B, G), mask=cmask.view(B, G, T).float(),
        token_ids=rb.completion_ids.view(B, G, T),
        token_rewards=None if token_rewards is None else token_rewards.view(B, G, T)))
    batch = LearnerBatch(
        prompt_ids=ids, prompt_mask=mask, completion_ids=rb.completion_ids, completion_mask=cmask,
        old_logp=rb.logprobs, advantages=adv.reshape(B * G, T).float(), rewards=r,
        group_index=torch.arange(B).repeat_interleave(G), ref_logp=ref_logp)
    lengths = cmask.sum(-1).float()
    ended = (rb.completion_ids == pol.eos_id).any(-1).float()
    metrics = {"reward/mean": float(r.mean()), "reward/std": float(r.std()) if len(r) > 1 else 0.0,
               "reward/accuracy": float((r >= 1.0 - 1e-6).float().mean()),
               "completion/mean_len": float(lengths.mean()), "completion/clipped_frac": float(1 - ended.mean()),
               **rstats, **{k: float(v) for k, v in ametrics.items()}}
    return batch, metrics, messages


def heldout(parts: Parts, cfg: Config, items: list) -> dict:
    """pass@1 at T=1.0 (mean over n samples) and greedy accuracy on the held-out items."""
    pol = parts.policy
    pol.model.eval()
    res = evaluate_items(pol.model, pol.tokenizer, items, n_samples=cfg.eval.n_samples, temperature=1.0,
                         max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                         seed=cfg.seed + EVAL_SEED_OFFSET)
    pol.model.train()
    return summarize(res)


def prepare_run_dir(cfg: Config, resume: Optional[Path]) -> tuple[Config, Path]:
    """New run: create the directory and write config.yaml. Resume: reload that config."""
    if resume is not None:
        if not (resume / "config.yaml").exists():
            raise ConfigError(f"cannot resume: {str(resume)!r} is not a run directory (no config.yaml)")
        return load_config(resume / "config.yaml"), resume
    run_dir = Path(cfg.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.loss.name}")
    if (run_dir / "checkpoints").exists():
        raise ConfigError(f"run directory {str(run_dir)!r} already holds a run; "
                          f"resume it with `tilt train --resume {run_dir}` or choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
    return cfg, run_dir


def save_final(parts: Parts, run_dir: Path) -> Path:
    """The final policy in Hugging Face format, written to a temp dir and renamed."""
    final, tmp = run_dir / "final", run_dir / f".final_tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    parts.policy.model.save_pretrained(str(tmp))
    parts.policy.tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return final


def versions() -> dict[str, str]:
    import transformers

    import tilt

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tilt": tilt.__version__}


def train(cfg: Config, *, resume: Optional[Path] = None, reward_fns: Optional[list[Callable]] = None,
          echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) one training run; return its summary (also written to summary.json)."""
    cfg, run_dir = prepare_run_dir(cfg, Path(resume) if resume is not None else None)
    parts = build(cfg, reward_fns)
    mix = parse_mix(cfg.tasks.mix)
    B = cfg.rollout.prompts_per_step
    eval_set = eval_items(mix, per_cell=cfg.tasks.eval_per_cell)
    state: dict[str, Any] = {"step": 0, "bad_streak": 0, "before": None, "skipped_total": 0}
    ckpt_root = run_dir / "checkpoints"
    if resume is not None:
        ckpt = latest_checkpoint(ckpt_root)
        if ckpt is None:
            echo(f"no checkpoint in {ckpt_root}; starting {run_dir} from step 0")
        else:
            state = load_checkpoint(ckpt, model=parts.policy.model, optimizer=parts.learner.optimizer,
                                    scheduler=parts.learner.scheduler, generator=parts.generator)
            parts.learner.bad_streak = state["bad_streak"]
            echo(f"resumed {run_dir} from {ckpt.name} (step {state['step']})")
    log = MetricsLog(run_dir, tensorboard=cfg.log.tensorboard, resume_step=state["step"] if resume else None)
    if state["before"] is None:
        state["before"] = heldout(parts, cfg, eval_set)
        log.log(0, {"eval/pass1": state["before"]["pass1"], "eval/greedy": state["before"]["greedy"]})
    train_items = sample_items(mix, split="train", start=data_offset(cfg.seed), count=cfg.train.steps * B)
    write_text_atomic(run_dir / "seeds.json", json.dumps(  # {"train": {task: range}, "eval": {...}}
        {**seed_report(train_items), **seed_report(eval_set)}, indent=1))
    progress = Progress(cfg.train.steps, state["step"], cfg.log.progress, cfg.log.every)
    try:
        for step in range(state["step"] + 1, cfg.train.steps + 1):
            t0 = time.time()
            items = train_items[(step - 1) * B: step * B]
            batch, metrics, messages = rollout_step(parts, cfg, items)
            for m in messages:
                echo(f"step {step}: reward {m}")
            try:
                metrics.update(parts.learner.update(batch))
            except NonFiniteLoss as exc:
                last = latest_checkpoint(ckpt_root)
                raise NonFiniteLoss(
                    f"stopping at step {step}: {exc} (loss {cfg.loss.name!r}, lr {cfg.optim.lr}). "
                    + (f"The last checkpoint {last} is intact; fix the cause, then "
                       f"`tilt train --resume {run_dir}`." if last else "No checkpoint was written yet.")) from None
            skipped = int(metrics["train/skipped"])
            state["skipped_total"] += skipped
            state["bad_streak"] = parts.learner.bad_streak
            if skipped:
                echo(f"step {step}: skipped {skipped} optimizer step(s) with a non-finite loss or gradient")
            dt = time.time() - t0
            metrics.update({"tokens_per_s": float(batch.completion_mask.sum()) / dt, "time/step_s": dt,
                            "train/skipped_total": float(state["skipped_total"])})
            if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.train.steps:
                ev = heldout(parts, cfg, eval_set)
                metrics.update({"eval/pass1": ev["pass1"], "eval/greedy": ev["greedy"]})
            if step == cfg.train.steps:
                state["after"] = heldout(parts, cfg, eval_set)
                metrics.update({"eval/pass1": state["after"]["pass1"], "eval/greedy": state["after"]["greedy"]})
            if step % cfg.log.every == 0 or step == cfg.train.steps or "eval/pass1" in metrics:
                log.log(step, metrics)
            progress.update(step, metrics)
            state["step"] = step
            if step % cfg.checkpoint.every == 0 or step == cfg.train.steps:
                save_checkpoint(ckpt_root, step, model=parts.policy.model, optimizer=parts.learner.optimizer,
                                scheduler=parts.learner.scheduler, generator=parts.generator,
                                trainer_state=state, keep=cfg.checkpoint.keep)
                if cfg.log.plot:
                    plot_curves(run_dir)
    finally:
        progress.close()
        log.close()
    after = state.get("after") or heldout(parts, cfg, eval_set)
    save_final(parts, run_dir)
    summary = {"complete": True, "steps": cfg.train.steps, "run_dir": str(run_dir),
               "heldout": {"pass1_before": state["before"]["pass1"], "pass1_after": after["pass1"],
                           "greedy_before": state["before"]["greedy"], "greedy_after": after["greedy"],
                           "per_cell_before": state["before"]["per_cell"], "per_cell": after["per_cell"]},
               "config_hash": config_hash(cfg), "versions": versions()}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
    echo(f"held-out pass@1 (T=1.0): {state['before']['pass1']:.3f} -> {after['pass1']:.3f}")
    echo(f"held-out greedy: {state['before']['greedy']:.3f} -> {after['greedy']:.3f}")
    return summary


def data_offset(seed: int) -> int:
    """Where seed ``seed`` starts reading the train split: each seed sees different prompts."""
    return (seed % 97) * 10_000_000


def config_hash(cfg: Config) -> str:
    """sha256 of the resolved config minus run_dir (same method + seed -> same hash)."""
    import hashlib

    d = cfg.model_dump(mode="json")
    d.pop("run_dir", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
