"""What a config needs beyond the default loop, resolved once before training.

Each loss, advantage estimator, KL estimator and selector declares the optional inputs it
reads (registry meta ``needs``; KL estimators in ``KL_NEEDS`` below). ``resolve_needs`` turns
them into flags for ``tilt.trainer.build`` and raises a ``ConfigError`` naming the missing
piece (e.g. ``teacher.path``) when one cannot be supplied.
"""
from __future__ import annotations

from dataclasses import dataclass

from tilt.advantages import ADVANTAGES
from tilt.config import Config, ConfigError
from tilt.losses import LOSSES
from tilt.selection import SELECTORS
from tilt.tasks import get_task
from tilt.tasks.mix import parse_mix

# KL estimators reading full logits (the per-token ones read only log-probs).
KL_NEEDS: dict[str, tuple[str, ...]] = {"full": ("logits", "ref_logits"), "critical": ("ref_logits",)}


@dataclass(frozen=True)
class Needs:
    """Flags of the extra inputs a run must supply (all False on the default path)."""

    ref_logp: bool = False  # a loss reads log pi_ref (the reference model is loaded)
    ref_logits: bool = False  # full reference logits [N, T, V] (full / critical KL)
    kl_logits: bool = False  # the KL estimator reads the policy's logits
    teacher: bool = False  # teacher logits (distillation)
    prev_logp: bool = False  # log-probs of a frozen previous policy (haepo)
    baseline_v: bool = False  # offline V*(x) (astar_po)
    aer: bool = False  # AER's coefficient controller
    lp_select: bool = False  # Lp-Reg's token selection, decided once per batch (lp_reg)
    entropy: bool = False  # sampling-policy entropy at rollout (canon metric=entropy, d3s)
    values: bool = False  # value head (gae)
    steps: bool = False  # process rewards per step (pure)
    spo: bool = False  # Monte-Carlo segment values (spo_chain)
    adv_token_rewards: bool = False  # the estimator adds AdvantageInput.token_rewards to the outcome itself

    @property
    def probe(self) -> bool:
        """A no-grad teacher-forced pass of the policy at rollout time is needed."""
        return self.entropy or self.values


def kl_needs(cfg: Config) -> tuple[str, ...]:
    """Inputs of the configured KL estimator (``critical`` with base=full also reads logits)."""
    out = KL_NEEDS.get(cfg.kl.estimator, ())
    if cfg.kl.estimator == "critical" and cfg.kl.kwargs.get("base") in KL_NEEDS:
        out = out + KL_NEEDS[cfg.kl.kwargs["base"]]
    return out


def step_task_names(cfg: Config) -> list[str]:
    """Tasks of the mix that provide per-step process rewards (``step_rewards`` and ``step_char_ends``)."""
    names = {task for task, _, _ in parse_mix(cfg.tasks.mix)}
    return sorted(n for n in names if hasattr(get_task(n), "step_rewards") and hasattr(get_task(n), "step_char_ends"))


def resolve_needs(cfg: Config) -> Needs:
    """The extra inputs of the configured loss, KL, advantage and selector; ConfigError if unmet."""
    loss = set(LOSSES.entry(cfg.loss.name).meta.get("needs", ()))
    adv = ADVANTAGES.entry(cfg.advantage.name)
    adv_reads = set(adv.meta.get("needs", ())) | set(adv.meta.get("optional", ()))
    sel = set(SELECTORS.entry(cfg.selection.name).meta.get("needs", ())) if cfg.selection.name != "none" else set()
    kl = set(kl_needs(cfg)) if cfg.kl.beta > 0 or "ref_logp" in loss else set()
    needs = Needs(
        ref_logp="ref_logp" in loss, ref_logits="ref_logits" in kl | loss, kl_logits="logits" in kl,
        teacher="teacher_logits" in loss, prev_logp="prev_logp" in loss, baseline_v="baseline_v" in loss,
        aer=cfg.loss.name == "aer", lp_select=cfg.loss.name == "lp_reg",
        entropy=("entropy" in adv_reads and cfg.advantage.kwargs.get("metric", "entropy") == "entropy")
        or "entropy" in sel,
        values=cfg.advantage.name == "gae", steps="step_rewards" in adv_reads, spo=cfg.advantage.name == "spo_chain",
        adv_token_rewards="token_rewards" in adv_reads)
    if needs.teacher and cfg.teacher.path is None:
        raise ConfigError(f"loss {cfg.loss.name!r} needs teacher logits: set teacher.path "
                          f"(\"shipped\" or a local Hugging Face model directory with the policy's vocabulary)")
    if needs.steps and not step_task_names(cfg):
        raise ConfigError(f"advantage {cfg.advantage.name!r} needs per-step process rewards, but the task mix "
                          f"{cfg.tasks.mix!r} has no step-wise task; add one, e.g. tasks.mix=addition_steps:1-2")
    if needs.kl_logits and cfg.kl.placement == "reward":
        raise ConfigError(f"kl.estimator={cfg.kl.estimator!r} reads full logits and runs only with "
                          f"kl.placement='loss'")
    return needs
