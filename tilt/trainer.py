"""The training loop: sample prompts, draw G completions, score, advantages, optimise.

Reads top to bottom like cleanrl/ppo.py. Every choice of method is a registry lookup made
once in ``build``; the loop itself only wires rollout -> reward -> advantage -> learner.
What a method needs beyond that (reference or teacher logits, a value head, pi_prev, process
rewards, Monte-Carlo values, V*, sample selection) is chosen once by ``tilt.wiring.method``.
"""
from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import time
from dataclasses import dataclass, field
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
from tilt.model import load_train_policy, reference_model
from tilt.models.lora import checkpoint_view, is_lora, save_merged
from tilt.rewards import resolve_reward_fn
from tilt.rollout import model_device, sequence_logprobs
from tilt.tasks.mix import eval_items, parse_mix, sample_items, seed_report
from tilt.tracking import MetricsLog, Progress, plot_curves
from tilt.value_head import ValueHead
from tilt.wiring.hooks import LoopHooks, checkpoint_module
from tilt.wiring.method import load_teacher, wire_method
from tilt.wiring.needs import Needs, resolve_needs
from tilt.wiring.sampling import Scored, TrainStream
from tilt.wiring.selection import Filter, SelectContext, keep_all
from tilt.wiring.signals import Probe, frozen_logits, token_logp
from tilt.wiring.stages import Stages, run_advantage_stages, run_learner_stages

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
    needs: Needs = field(default_factory=Needs)
    sample: Optional[Callable[[TrainStream], tuple[Scored, dict[str, float]]]] = None  # draws the step's groups
    probe: Callable[[Scored], Probe] = lambda sc: Probe()
    stages: Stages = field(default_factory=Stages)
    select: Filter = keep_all
    hooks: LoopHooks = field(default_factory=LoopHooks)
    value_head: Optional[torch.nn.Module] = None
    prev_model: Optional[torch.nn.Module] = None


def build(cfg: Config, reward_fns: Optional[list[Callable]] = None) -> Parts:
    """Load models and resolve every registry name of the config into a callable."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    needs = resolve_needs(cfg)
    dtype = DTYPES[cfg.model.dtype]
    policy = load_train_policy(cfg.model)
    entry = LOSSES.entry(cfg.loss.name)
    loss_needs = tuple(entry.meta.get("needs", ()))
    loss_fn = bind_kwargs(entry.fn, cfg.loss.kwargs, f"loss {cfg.loss.name!r}")
    adv_entry = ADVANTAGES.entry(cfg.advantage.name)
    adv_fn = bind_kwargs(adv_entry.fn, cfg.advantage.kwargs, f"advantage {cfg.advantage.name!r}")
    use_ref = cfg.kl.beta > 0 or "ref_logp" in loss_needs or "ref_logits" in loss_needs or needs.ref_logits
    kl_fn, ref_model = None, None
    if use_ref:
        kl_fn = KL_ESTIMATORS.get(cfg.kl.estimator)
        if cfg.kl.kwargs:
            kl_fn = bind_kwargs(kl_fn, cfg.kl.kwargs, f"kl estimator {cfg.kl.estimator!r}")
        ref_model = reference_model(policy, cfg.model)
    teacher = load_teacher(cfg, policy, dtype) if needs.teacher else None
    value_head = ValueHead(policy.model.config.hidden_size).to(model_device(policy.model), dtype) if needs.values else None
    params = [p for p in policy.model.parameters() if p.requires_grad]
    params += list(value_head.parameters()) if value_head is not None else []
    optimizer = adamw(params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    total = cfg.train.steps * cfg.train.epochs * cfg.train.minibatches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial_schedule(cfg, total))
    generator = torch.Generator().manual_seed(cfg.seed)
    learner = Learner(
        policy.model, optimizer, scheduler, loss_fn=loss_fn, loss_needs=loss_needs,
        reduction=cfg.loss.reduction or entry.meta.get("reduction", "token-mean"),
        max_len=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, kl_fn=kl_fn,
        kl_beta=cfg.kl.beta, kl_in_loss=cfg.kl.placement == "loss", epochs=cfg.train.epochs,
        minibatches=cfg.train.minibatches, grad_accum=cfg.train.grad_accum, grad_clip=cfg.optim.grad_clip,
        generator=generator, max_bad_steps=cfg.train.max_bad_steps, kl_needs_logits=needs.kl_logits,
        value_head=value_head, value_coef=cfg.value.coef, value_clip=cfg.value.clip_range,
        micro_batch_tokens=cfg.train.micro_batch_tokens, minibatch_by=cfg.train.minibatch_by)
    fns = reward_fns if reward_fns is not None else [resolve_reward_fn(n) for n in cfg.reward.functions]
    weights = cfg.reward.weights or [1.0] * len(fns)
    if len(weights) != len(fns):
        raise ConfigError(f"reward.weights has {len(weights)} entries for {len(fns)} reward functions")
    parts = Parts(policy, ref_model, learner, adv_fn, kl_fn, fns, weights, generator, needs=needs,
                  value_head=value_head)
    wire_method(parts, cfg, teacher)
    return parts


def partial_schedule(cfg: Config, total: int) -> Callable[[int], float]:
    """Multiplier of the learning rate at optimizer step s: linear warmup, then the schedule."""
    warm, kind = cfg.optim.warmup_steps, cfg.optim.schedule

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        frac = (s - warm) / max(total - warm, 1)
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[kind]

    return f


def reference_pass(parts: Parts, cfg: Config, rb) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """log pi_ref of the sampled tokens [N, T] and, when needed, the full reference logits [N, T, V]."""
    if parts.ref_model is None:
        return None, None
    if parts.needs.ref_logits:
        ref_logits = frozen_logits(parts.ref_model, rb, temperature=cfg.rollout.temperature)  # [N, T, V]
        return token_logp(ref_logits, rb.completion_ids, rb.completion_mask), ref_logits
    with torch.no_grad():
        ref_logp, _ = sequence_logprobs(parts.ref_model, rb.prompt_ids, rb.prompt_mask, rb.completion_ids,
                                        rb.completion_mask, temperature=cfg.rollout.temperature,
                                        chunk_tokens=cfg.train.micro_batch_tokens)  # [N, T]
    return ref_logp, None


def adamw(params: list, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel when torch has it for these tensors (the same update in one
    kernel per step; ~8x faster than the per-tensor loop at the shipped model's size), else the
    default implementation."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def rollout_step(parts: Parts, cfg: Config, stream: TrainStream, step: int = 1
                 ) -> tuple[LearnerBatch, dict[str, float], list[str]]:
    """Draw the step's prompts, sample G completions each, score them and compute advantages."""
    pol = parts.policy
    sc, select_metrics = parts.sample(stream)
    rb, r, B, G = sc.rb, sc.rewards, len(sc.items), sc.group_size
    cmask = rb.completion_mask  # [N, T]
    probe = parts.probe(sc)
    ref_logp, ref_logits = reference_pass(parts, cfg, rb)
    r_adv, token_rewards = r, None
    if parts.kl_fn is not None and cfg.kl.placement == "reward":
        kl_extra = {"ref_logits": ref_logits} if ref_logits is not None else {}
        kl_tok = parts.kl_fn(rb.logprobs, ref_logp, **kl_extra) * cmask  # [N, T] detached penalty
        token_rewards = -cfg.kl.beta * kl_tok
        # r - beta * sum_t kl_t, unless the estimator adds token_rewards itself (no double count)
        r_adv = r if parts.needs.adv_token_rewards else r + token_rewards.sum(-1)
    T = cmask.shape[1]
    extra, adv_kwargs = run_advantage_stages(parts.stages.advantage, sc, probe)
    ainp = AdvantageInput(
        rewards=r_adv.view(B, G), mask=cmask.view(B, G, T).float(),
        token_ids=rb.completion_ids.view(B, G, T),
        token_rewards=None if token_rewards is None else token_rewards.view(B, G, T), **extra)
    adv, ametrics = parts.adv_fn(ainp, **adv_kwargs)
    batch = LearnerBatch(
        prompt_ids=rb.prompt_ids, prompt_mask=rb.prompt_mask, completion_ids=rb.completion_ids,
        completion_mask=cmask, old_logp=rb.logprobs, advantages=adv.reshape(B * G, T).float(), rewards=r,
        group_index=torch.arange(B).repeat_interleave(G), ref_logp=ref_logp, ref_logits=ref_logits,
        **run_learner_stages(parts.stages.learner, sc, probe, ainp))
    batch, kept_metrics = parts.select(batch, SelectContext(adv, r.view(B, G), probe.entropy, step))
    lengths = cmask.sum(-1).float()
    ended = (rb.completion_ids == pol.eos_id).any(-1).float()
    metrics = {"reward/mean": float(r.mean()), "reward/std": float(r.std()) if len(r) > 1 else 0.0,
               "reward/accuracy": float((r >= 1.0 - 1e-6).float().mean()),
               "completion/mean_len": float(lengths.mean()), "completion/clipped_frac": float(1 - ended.mean()),
               **sc.rstats, **{k: float(v) for k, v in ametrics.items()}, **select_metrics, **kept_metrics}
    return batch, metrics, sc.messages


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


def save_final(parts: Parts, run_dir: Path, *, merged: bool = False) -> Path:
    """The final policy in Hugging Face format (a LoRA run: the peft adapter, plus ``merged/``
    on request), written to a temp dir and renamed."""
    final, tmp = run_dir / "final", run_dir / f".final_tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    parts.policy.model.save_pretrained(str(tmp))
    parts.policy.tokenizer.save_pretrained(str(tmp))
    if merged and is_lora(parts.policy.model):
        save_merged(parts.policy.model, parts.policy.tokenizer, tmp / "merged")
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
    ckpt_model = checkpoint_module(checkpoint_view(parts.policy.model), value_head=parts.value_head, prev_model=parts.prev_model)
    if resume is not None:
        ckpt = latest_checkpoint(ckpt_root)
        if ckpt is None:
            echo(f"no checkpoint in {ckpt_root}; starting {run_dir} from step 0")
        else:
            state = load_checkpoint(ckpt, model=ckpt_model, optimizer=parts.learner.optimizer,
                                    scheduler=parts.learner.scheduler, generator=parts.generator)
            parts.learner.bad_streak = state["bad_streak"]
            echo(f"resumed {run_dir} from {ckpt.name} (step {state['step']})")
    parts.hooks.init_state(state)
    stream = TrainStream(cfg.tasks.mix, offset=data_offset(cfg.seed), pos=state.get("data_pos", state["step"] * B))
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
            parts.hooks.before_step(step)
            batch, metrics, messages = rollout_step(parts, cfg, stream, step)
            state["data_pos"] = stream.pos
            for m in messages:
                echo(f"step {step}: reward {m}")
            try:
                metrics.update(parts.learner.update(batch, loss_kwargs=parts.hooks.loss_kwargs(state)))
            except NonFiniteLoss as exc:
                last = latest_checkpoint(ckpt_root)
                raise NonFiniteLoss(
                    f"stopping at step {step}: {exc} (loss {cfg.loss.name!r}, lr {cfg.optim.lr}). "
                    + (f"The last checkpoint {last} is intact; fix the cause, then "
                       f"`tilt train --resume {run_dir}`." if last else "No checkpoint was written yet.")) from None
            metrics.update(parts.hooks.after_update(state, metrics))
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
                save_checkpoint(ckpt_root, step, model=ckpt_model, optimizer=parts.learner.optimizer,
                                scheduler=parts.learner.scheduler, generator=parts.generator,
                                trainer_state=state, keep=cfg.checkpoint.keep)
                if cfg.log.plot:
                    plot_curves(run_dir)
    finally:
        progress.close()
        log.close()
    after = state.get("after") or heldout(parts, cfg, eval_set)
    if stream.pos > len(train_items):  # dynamic sampling drew extra prompts: record them all
        write_text_atomic(run_dir / "seeds.json", json.dumps({**seed_report(sample_items(
            mix, split="train", start=data_offset(cfg.seed), count=stream.pos)), **seed_report(eval_set)}, indent=1))
    save_final(parts, run_dir, merged=cfg.model.lora.save_merged)
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
