"""The training loop: sample prompts, draw G completions, score, advantages, optimise.

Reads top to bottom like cleanrl/ppo.py. Every choice of method is a registry lookup made
once in ``build``; what a method reads beyond the default loop (reference or teacher logits, a
value head, pi_prev, process rewards, Monte-Carlo values, V*, a token choice) it declares in its
registry entry, and the provider of each named input (``tilt.wiring.providers``) computes it at
its stage of ``rollout_step``: rollout -> advantage -> batch -> selected.
"""
from __future__ import annotations

import json
import math
import platform
import random
import time
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from tilt.alerts import SignalWatch, throttled
from tilt.batch import AdvantageInput
from tilt.checkpoint import latest_checkpoint, save_checkpoint, save_pretrained_atomic, write_text_atomic
from tilt.config import Config, ConfigError, dump_config, load_config
from tilt.data import EVAL_SEED_OFFSET, build_source, data_offset
from tilt.evaluate import evaluate_items, summarize
from tilt.learner import Learner, LearnerBatch, NonFiniteLoss
from tilt.model import DTYPES, load_train_policy
from tilt.models.lora import checkpoint_view, is_lora, save_merged
from tilt.providers import INTRINSIC, STAGES, Provider, Run, StepData
from tilt.providers.frozen import RESOURCES
from tilt.resume import check_config_unchanged, restore_newest_intact
from tilt.rewards import RewardState, check_signature, resolve_reward_fn, score
from tilt.fastdecode import lean_supported
from tilt.heap import keep_freed_memory
from tilt.rollout import SamplingParams, auto_micro_batch_tokens
from tilt.run_checks import check_batch_shape
from tilt.run_lock import RunLock
from tilt.state import Component, checkpoint_module
from tilt.trackers import make_trackers
from tilt.tracking import MetricsLog, Progress, plot_curves
from tilt.wiring.resolve import Plan, keyword_params, resolve
from tilt.wiring.sampling import Scored, TrainStream, sample_scored
from tilt.wiring.selection import Filter, SelectContext, make_filter

ADV_FIELDS = {f.name for f in fields(AdvantageInput)}
BATCH_FIELDS = {f.name for f in fields(LearnerBatch)} - {"extras"}


@dataclass
class Parts:
    """Everything ``build`` resolved from the config."""

    policy: Any
    run: Run  # what providers read: models, sampling settings, the reward
    plan: Plan  # the configured methods and their keyword arguments
    learner: Learner
    adv_fn: Callable
    kl_fn: Optional[Callable]
    reward_fns: list[Callable]
    reward_weights: list[float]
    generator: torch.Generator
    providers: list[Provider]  # one per provider class the methods need, in resolution order
    components: list[Component]  # providers + per-method state: hooks and checkpointed state
    select: Filter  # the selector's batch filter (keep_all by default)
    draw: Optional[Callable] = None  # a selector's draw rule (meta "draw", e.g. dynamic sampling), with its kwargs
    adv_keywords: frozenset[str] = frozenset()  # estimator keywords a provider fills (not configured ones)
    reward_state: RewardState = field(default_factory=RewardState)  # trainer_state of reward functions

    @property
    def ref_model(self) -> Optional[torch.nn.Module]:
        return self.run.ref_model


# rollout.kv_cache_dtype: the sampler's completion cache dtype (None: the model's)
KV_DTYPES = {"model": None, "float16": torch.float16, "int8": torch.int8}


def build(cfg: Config, reward_fns: Optional[list[Callable]] = None) -> Parts:
    """Load models, resolve every registry name of the config and the providers its methods need."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.keep_freed_memory:
        keep_freed_memory()
    plan = resolve(cfg)  # methods, their needs -> providers, settings; ConfigError if unmet
    dtype = DTYPES[cfg.model.dtype]
    policy = load_train_policy(cfg.model)  # on model.device, in model.dtype, LoRA-wrapped when configured
    for key in ("decode_dtype", "kv_cache_dtype"):
        value = getattr(cfg.rollout, key)
        if value != "model" and not lean_supported(policy.model):
            raise ConfigError(f"rollout.{key}={value!r} needs tilt's lean decoder, which runs float32/float64 "
                              f"Llama/Qwen2/Mistral policies (LoRA included: vanilla adapters without dropout); this "
                              f"policy is {type(policy.model).__name__} (model.dtype={cfg.model.dtype}, "
                              f"lora={cfg.model.lora.enabled}): leave rollout.{key}='model'")
    fns = reward_fns if reward_fns is not None else [resolve_reward_fn(n) for n in cfg.reward.functions]
    weights = cfg.reward.weights or [1.0] * len(fns)
    if len(weights) != len(fns):
        raise ConfigError(f"reward.weights has {len(weights)} entries for {len(fns)} reward functions")

    reward_state = RewardState()  # what reward functions get as trainer_state

    def rewards_fn(prompts: list[str], texts: list[str], columns: dict) -> torch.Tensor:
        r, _, _ = score(fns, weights, prompts, texts, columns, timeout=cfg.reward.timeout_s, trainer_state=reward_state)
        return torch.tensor(r, dtype=torch.float32)

    generator = torch.Generator().manual_seed(cfg.seed)
    params = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p,
                            min_new_tokens=cfg.rollout.min_new_tokens,
                            matmul_dtype=None if cfg.rollout.decode_dtype == "model" else DTYPES[cfg.rollout.decode_dtype],
                            kv_dtype=KV_DTYPES[cfg.rollout.kv_cache_dtype])
    run = Run(cfg, policy, generator, params, rewards_fn)
    run.chunk_tokens = (auto_micro_batch_tokens(policy.model) if cfg.train.micro_batch_tokens == "auto"
                        else cfg.train.micro_batch_tokens)
    for name in sorted(plan.resources):  # frozen models the providers read (reference, teacher)
        setattr(run, name, RESOURCES[name](cfg, policy, dtype))
    providers = [cls(run, names, **settings) for cls, names, settings in plan.providers]
    components = providers + [m.state for m in plan.methods.values() if m.state is not None]
    params_ = [p for p in policy.model.parameters() if p.requires_grad]
    params_ += [p for c in components for mod in c.modules().values() for p in mod.parameters() if p.requires_grad]
    optimizer = adamw(params_, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    total = cfg.train.steps * cfg.train.epochs * cfg.train.minibatches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial_schedule(cfg, total))
    loss, adv, kl, corr = (plan.methods.get(a) for a in ("loss", "advantage", "kl", "correction"))
    learner = Learner(
        policy.model, optimizer, scheduler, loss_fn=loss.bound(), loss_needs=loss.needs,
        reduction=cfg.loss.reduction or loss.entry.meta.get("reduction", "token-mean"),
        max_len=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
        kl_fn=kl.bound() if kl else None, kl_beta=cfg.kl.beta, kl_in_loss=cfg.kl.placement == "loss",
        epochs=cfg.train.epochs, minibatches=cfg.train.minibatches, grad_accum=cfg.train.grad_accum,
        grad_clip=cfg.optim.grad_clip, generator=generator, max_bad_steps=cfg.train.max_bad_steps,
        kl_needs_logits="logits" in plan.reads("kl"), micro_batch_tokens=run.chunk_tokens,
        kl_inputs=tuple(n for n in plan.reads("kl") if n in INTRINSIC["kl"] - {"logits"}),
        correction_fn=corr.bound() if corr else None,
        minibatch_by=cfg.train.minibatch_by, **{k: v for c in components for k, v in c.learner_kwargs().items()})
    selector = plan.methods.get("selector")
    draw = selector.entry.meta.get("draw") if selector is not None else None
    return Parts(policy, run, plan, learner, adv.bound(), kl.bound() if kl else None, fns,
                 weights, generator, providers, components, make_filter(selector),
                 draw=None if draw is None else partial(draw, **selector.fn_kwargs),
                 adv_keywords=frozenset(keyword_params(adv.entry.fn)) - set(adv.fn_kwargs) - ADV_FIELDS,
                 reward_state=reward_state)


def partial_schedule(cfg: Config, total: int) -> Callable[[int], float]:
    """Multiplier of the learning rate at optimizer step s: linear warmup, then the schedule."""
    warm, kind = cfg.optim.warmup_steps, cfg.optim.schedule

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        frac = (s - warm) / max(total - warm, 1)
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[kind]

    return f


def adamw(params: list, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel when torch has it for these tensors (the same update in one
    kernel per step; ~8x faster than the per-tensor loop at the shipped model's size), else the
    default implementation."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def draw_groups(parts: Parts, cfg: Config, stream: TrainStream) -> tuple[Scored, dict[str, float]]:
    """The step's B prompts from the stream, G sampled and scored completions each (a selector
    with a ``draw`` rule, e.g. dynamic sampling, decides how many prompts are drawn)."""
    def sample(n: int) -> Scored:
        def score_fn(prompts, texts, columns, **kw):  # kw: completion_ids (tilt.rewards.score)
            return score(parts.reward_fns, parts.reward_weights, prompts, texts, columns, timeout=cfg.reward.timeout_s,
                         trainer_state=parts.reward_state, **kw)

        return sample_scored(parts.policy, stream.take(n), group_size=cfg.rollout.group_size, params=parts.run.params,
                             generator=parts.generator, score_fn=score_fn)

    B = cfg.rollout.prompts_per_step
    if parts.draw is None:
        return sample(B), {}
    return parts.draw(sample, batch_size=B, pad_id=parts.policy.pad_id)  # e.g. dynamic sampling's refill


def provide(parts: Parts, stage: str, data: StepData) -> dict[str, torch.Tensor]:
    """Every provider's outputs at ``stage`` (one of STAGES), added to ``data.outputs``."""
    assert stage in STAGES
    out: dict[str, torch.Tensor] = {}
    for p in parts.providers:
        for k, v in getattr(p, stage)(data).items():
            if k in out or k in data.outputs:
                raise RuntimeError(f"two providers give {k!r} at the {stage} stage")
            out[k] = v
    data.outputs.update(out)
    return out


def rollout_step(parts: Parts, cfg: Config, stream: TrainStream, step: int = 1
                 ) -> tuple[LearnerBatch, dict[str, float], list[str]]:
    """Draw the step's prompts, sample G completions each, score them, compute what the methods
    read and the advantages, filter; returns the learner's batch."""
    pol = parts.policy
    sc, select_metrics = draw_groups(parts, cfg, stream)
    rb, r, B, G = sc.rb, sc.rewards, len(sc.items), sc.group_size
    cmask = rb.completion_mask  # [N, T]
    data = StepData(step, sc)
    rolled = provide(parts, "rollout", data)  # e.g. log pi_ref, sampling entropy, value-head values
    r_adv, token_rewards = r, None
    if parts.kl_fn is not None and cfg.kl.placement == "reward":
        kl_extra = {"ref_logits": rolled["ref_logits"]} if "ref_logits" in rolled else {}
        kl_tok = parts.kl_fn(rb.logprobs, rolled["ref_logp"], **kl_extra) * cmask  # [N, T] detached penalty
        token_rewards = -cfg.kl.beta * kl_tok
        # r - beta * sum_t kl_t, unless the estimator adds token_rewards itself (no double count)
        adds_tokens = "token_rewards" in parts.plan.methods["advantage"].entry.meta.get("optional", ())
        r_adv = r if adds_tokens else r + token_rewards.sum(-1)
    provide(parts, "advantage", data)  # e.g. process-reward steps, Monte-Carlo segment values
    T = cmask.shape[1]
    ainp = AdvantageInput(
        rewards=r_adv.view(B, G), mask=cmask.view(B, G, T).float(), token_ids=rb.completion_ids.view(B, G, T),
        token_rewards=None if token_rewards is None else token_rewards.view(B, G, T),
        **{k: v.view(B, G, *v.shape[1:]) for k, v in data.outputs.items() if k in ADV_FIELDS})
    adv_kwargs = {k: v.view(B, G, *v.shape[1:]) for k, v in data.outputs.items() if k in parts.adv_keywords}
    adv, ametrics = parts.adv_fn(ainp, **adv_kwargs)
    data.adv_input = ainp
    batched = provide(parts, "batch", data)  # e.g. teacher logits, pi_prev log-probs, V*, GAE returns
    learner_inputs = {**{k: v for k, v in rolled.items() if k in BATCH_FIELDS}, **batched}
    batch = LearnerBatch(**{  # a provider may replace a default field (old_logp: the learner's own log-probs)
        "prompt_ids": rb.prompt_ids, "prompt_mask": rb.prompt_mask, "completion_ids": rb.completion_ids,
        "completion_mask": cmask, "old_logp": rb.logprobs, "advantages": adv.reshape(B * G, T).float(),
        "rewards": r, "group_index": torch.arange(B).repeat_interleave(G),
        **{k: v for k, v in learner_inputs.items() if k in BATCH_FIELDS}},
        extras={k: v for k, v in learner_inputs.items() if k not in BATCH_FIELDS})
    batch, kept_metrics = parts.select(batch, SelectContext(adv, r.view(B, G), rolled.get("entropy"), step,
                                                            cfg.train.steps, parts.generator))
    data.batch = batch
    chosen = provide(parts, "selected", data)  # e.g. Lp-Reg's token choice over the kept batch
    batch = replace(batch, **{k: v for k, v in chosen.items() if k in BATCH_FIELDS},
                    extras={**batch.extras, **{k: v for k, v in chosen.items() if k not in BATCH_FIELDS}})
    lengths = cmask.sum(-1).float()
    ended = (rb.completion_ids == pol.eos_id).any(-1).float()
    metrics = {"reward/mean": float(r.mean()), "reward/std": float(r.std()) if len(r) > 1 else 0.0,
               "reward/accuracy": float((r >= 1.0 - 1e-6).float().mean()),
               "completion/mean_len": float(lengths.mean()), "completion/clipped_frac": float(1 - ended.mean()),
               **sc.rstats, **{k: float(v) for k, v in ametrics.items()}, **select_metrics, **kept_metrics}
    return batch, metrics, sc.messages


def heldout(parts: Parts, cfg: Config, items: list, progress: Optional[Callable[[str], None]] = None) -> dict:
    """pass@1 at T=1.0 (mean over n samples) and greedy reward on the held-out items, scored with
    the run's own reward functions."""
    pol = parts.policy
    pol.model.eval()
    from tilt.decoding.lm import decoding_from_config

    res = evaluate_items(pol.model, pol.tokenizer, items, n_samples=cfg.eval.n_samples, temperature=1.0,
                         max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                         seed=cfg.seed + EVAL_SEED_OFFSET, reward_fns=parts.reward_fns,
                         weights=parts.reward_weights, timeout=cfg.reward.timeout_s, progress=progress,
                         trainer_state=parts.reward_state, decoding=decoding_from_config(cfg.decode, pol))
    pol.model.train()
    return summarize(res)


def prepare_run_dir(cfg: Config, resume: Optional[Path]) -> tuple[Config, Path, RunLock]:
    """New run: create the directory, lock it, write config.yaml. Resume: lock it, reload that config
    and refuse it if edited since the last checkpoint. The lock is held until released (or death)."""
    if resume is not None:
        if not (resume / "config.yaml").exists():
            raise ConfigError(f"cannot resume: {str(resume)!r} is not a run directory (no config.yaml)")
        lock = RunLock(resume)
        try:
            cfg = load_config(resume / "config.yaml")
            check_config_unchanged(resume, cfg.model_dump(mode="json"))
        except BaseException:
            lock.release()
            raise
        return cfg, resume, lock
    run_dir = Path(cfg.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.loss.name}")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} is an existing file, not a directory; "
                          "choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    if (run_dir / "checkpoints").exists():
        lock.release()
        raise ConfigError(f"run directory {str(run_dir)!r} already holds a run; "
                          f"resume it with `tilt train --resume {run_dir}` or choose another --run-dir")
    # a run killed before its first checkpoint starts over, as its --resume would: no stale rows
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
    return cfg, run_dir, lock


def save_final(parts: Parts, run_dir: Path, *, merged: bool = False) -> Path:
    """The final policy in Hugging Face format (a LoRA run: the peft adapter, plus ``merged/``
    on request), written to a temp dir and renamed."""
    model, tok = parts.policy.model, parts.policy.tokenizer
    also = (lambda tmp: save_merged(model, tok, tmp / "merged")) if merged and is_lora(model) else None
    return save_pretrained_atomic(model, tok, run_dir / "final", also=also)


def versions() -> dict[str, str]:
    import transformers

    import tilt

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tilt": tilt.__version__}


def train(cfg: Config, *, resume: Optional[Path] = None, reward_fns: Optional[list[Callable]] = None,
          train_dataset=None, eval_dataset=None, echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) one training run; return its summary (also written to summary.json).

    ``train_dataset`` / ``eval_dataset`` (``datasets.Dataset`` objects) replace data.train /
    data.eval; ``reward_fns`` (callables) replace reward.functions (the Python API, tilt.api).
    The run directory is locked for the whole run: a second trainer on it is refused."""
    notes = check_batch_shape(cfg) if resume is None else None  # a fresh run: before its directory is made
    cfg, run_dir, lock = prepare_run_dir(cfg, Path(resume) if resume is not None else None)
    with lock:
        for note in notes if notes is not None else check_batch_shape(cfg):
            echo(f"warning: {note}")
        return _train_locked(cfg, run_dir, resume=resume, reward_fns=reward_fns, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, echo=echo)


def _train_locked(cfg: Config, run_dir: Path, *, resume: Optional[Path], reward_fns: Optional[list[Callable]],
                  train_dataset, eval_dataset, echo: Callable[[str], None]) -> dict:
    parts = build(cfg, reward_fns)
    source = build_source(cfg, parts.policy.tokenizer, train_dataset=train_dataset, eval_dataset=eval_dataset)
    for line in source.warnings:
        echo(line)
    B = cfg.rollout.prompts_per_step
    eval_set = source.eval_items()
    for fn in parts.reward_fns:  # a wrong signature would score 0 silently at every step
        check_signature(fn, list(source.train_items(0, 1)[0].reward_columns()))
    parts.reward_state.max_steps = cfg.train.steps
    state: dict[str, Any] = {"step": 0, "bad_streak": 0, "before": None, "skipped_total": 0}
    ckpt_root = run_dir / "checkpoints"
    ckpt_model = checkpoint_module(checkpoint_view(parts.policy.model), parts.components)  # LoRA: the adapter only
    if resume is not None:
        ckpt, loaded = restore_newest_intact(ckpt_root, model=ckpt_model, optimizer=parts.learner.optimizer,
                                             scheduler=parts.learner.scheduler, generator=parts.generator, echo=echo)
        if ckpt is None:
            echo(f"no checkpoint in {ckpt_root}; starting {run_dir} from step 0")
        else:
            state = loaded
            parts.learner.bad_streak = state["bad_streak"]
            echo(f"resumed {run_dir} from {ckpt.name} (step {state['step']})")
    for c in parts.components:  # per-method state restored from the trainer state
        if c.state_key is not None and c.state_key in state:
            c.load_state_dict(state[c.state_key])
    stream = TrainStream(source, offset=data_offset(cfg.seed), pos=state.get("data_pos", state["step"] * B))
    # rows after the checkpoint are logged again; with no checkpoint, all of them (from the step-0 eval)
    keep_through = (state["step"] if state["before"] is not None else -1) if resume else None
    log = MetricsLog(run_dir, tensorboard=cfg.log.tensorboard, resume_step=keep_through, echo=echo,
                     trackers=make_trackers(cfg.log.backends, run_dir, cfg.model_dump(mode="json")))
    if state["before"] is None:
        echo(f"evaluating before training: {len(eval_set)} held-out prompts x (1 greedy + "
             f"{cfg.eval.n_samples} samples)")
        state["before"] = heldout(parts, cfg, eval_set, progress=throttled(echo))
        log.log(0, {"eval/pass1": state["before"]["pass1"], "eval/greedy": state["before"]["greedy"]})
    n_train = cfg.train.steps * B
    # built-in tasks: {"train": {task: seed range}, "eval": {...}}; a dataset: {"dataset": {...}}
    write_text_atomic(run_dir / "seeds.json", json.dumps(source.report(data_offset(cfg.seed), n_train), indent=1))
    progress = Progress(cfg.train.steps, state["step"], cfg.log.progress, cfg.log.every)
    watch = SignalWatch(cfg.log.no_signal_steps)
    said: set[str] = set()
    try:
        for step in range(state["step"] + 1, cfg.train.steps + 1):
            t0 = time.time()
            for c in parts.components:
                c.before_step(step)
            parts.reward_state.global_step = step - 1  # as TRL: optimizer steps completed so far
            batch, metrics, messages = rollout_step(parts, cfg, stream, step)
            metrics.update(parts.reward_state.pop_logged())
            state["data_pos"] = stream.pos
            for m in messages:
                if m not in said:  # a reward function's same complaint is shown once per run
                    said.add(m)
                    echo(f"step {step}: reward {m}")
            warning = watch.update(batch.advantages, metrics)
            if warning:
                echo(f"step {step}: {warning}")
            try:
                loss_kwargs = {k: v for c in parts.components for k, v in c.loss_kwargs().items()}
                metrics.update(parts.learner.update(batch, loss_kwargs=loss_kwargs))
            except NonFiniteLoss as exc:
                last = latest_checkpoint(ckpt_root)
                raise NonFiniteLoss(
                    f"stopping at step {step}: {exc} (loss {cfg.loss.name!r}, lr {cfg.optim.lr}). "
                    + (f"The last checkpoint {last} is intact; fix the cause, then "
                       f"`tilt train --resume {run_dir}`." if last else "No checkpoint was written yet.")) from None
            for c in parts.components:
                metrics.update(c.after_update(metrics))
                if c.state_key is not None:
                    state[c.state_key] = c.state_dict()
            skipped = int(metrics["train/skipped"])
            state["skipped_total"] += skipped
            state["bad_streak"] = parts.learner.bad_streak
            if skipped:
                echo(f"step {step}: skipped {skipped} optimizer step(s) with a non-finite loss or gradient")
            dt = time.time() - t0
            parts.reward_state.global_step = step
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
                                trainer_state=state, keep=cfg.checkpoint.keep, config=cfg.model_dump(mode="json"))
                if cfg.log.plot:
                    plot_curves(run_dir)
    finally:
        progress.close()
        log.close()
    after = state.get("after") or heldout(parts, cfg, eval_set)
    if stream.pos > n_train:  # dynamic sampling drew extra prompts: record them all
        write_text_atomic(run_dir / "seeds.json", json.dumps(source.report(data_offset(cfg.seed), stream.pos), indent=1))
    save_final(parts, run_dir, merged=cfg.model.lora.save_merged)
    summary = {"complete": True, "steps": cfg.train.steps, "run_dir": str(run_dir),
               "heldout": {"pass1_before": state["before"]["pass1"], "pass1_after": after["pass1"],
                           "greedy_before": state["before"]["greedy"], "greedy_after": after["greedy"],
                           "per_cell_before": state["before"]["per_cell"], "per_cell": after["per_cell"]},
               "config_hash": config_hash(cfg), "versions": versions()}
    if getattr(source, "info", None):
        summary["dataset"] = source.info
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1))
    echo(f"held-out pass@1 (T=1.0): {state['before']['pass1']:.3f} -> {after['pass1']:.3f}")
    echo(f"held-out greedy: {state['before']['greedy']:.3f} -> {after['greedy']:.3f}")
    return summary


def config_hash(cfg: Config) -> str:
    """sha256 of the resolved config minus run_dir (same method + seed -> same hash)."""
    import hashlib

    d = cfg.model_dump(mode="json")
    d.pop("run_dir", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
