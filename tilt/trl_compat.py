"""TRL ``GRPOConfig`` -> tilt config, field by field (``tilt config from-trl GRPOConfig.yaml``).

``TRL_DEFAULTS`` are trl 1.16's defaults (trl/trainer/grpo_config.py) of the fields mapped here;
a field missing from the YAML takes TRL's default, NOT tilt's, so the converted config means
what the TRL config meant (TRL's default loss is "dapo", its default beta 0.0 and
``use_bias_correction_kl`` True). ``from_trl`` returns the tilt overrides plus a list of notes
naming every TRL field it could not carry over (and why); ``MAPPING`` is the table the
README shows and tests/test_trl_compat.py checks against the code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tilt.config import ConfigError

TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # TRL's two-sided-clip branch (L3112)

TRL_DEFAULTS: dict[str, Any] = {
    "loss_type": "dapo", "beta": 0.0, "epsilon": 0.2, "epsilon_high": None, "delta": None,
    "importance_sampling_level": "token", "use_bias_correction_kl": True,
    "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05,
    "vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0,
    "scale_rewards": "group", "num_generations": 8, "max_completion_length": 512, "temperature": 1.0,
    "top_p": 1.0, "learning_rate": 1e-6, "num_iterations": 1, "max_steps": -1, "seed": 42,
    "max_grad_norm": 1.0, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
    "warmup_steps": 0, "lr_scheduler_type": "linear", "gradient_accumulation_steps": 1,
    "per_device_train_batch_size": 8, "steps_per_generation": None,
    "use_vllm": False, "vllm_importance_sampling_correction": True, "vllm_importance_sampling_mode": "sequence_mask",
    "vllm_importance_sampling_clip_max": 3.0, "vllm_importance_sampling_clip_min": None,
}

# TRL field -> tilt field it sets (the README table; tests/test_trl_compat.py checks each row).
MAPPING: dict[str, str] = {
    "loss_type": "loss.name",
    "epsilon": "loss.kwargs.eps_low (cispo: unused)",
    "epsilon_high": "loss.kwargs.eps_high (None: = epsilon); cispo: loss.kwargs.eps_max",
    "delta": "loss.kwargs.delta (clipped loss types)",
    "importance_sampling_level": "loss.kwargs.level (and kl.kwargs.level with k3_is)",
    "sapo_temperature_pos": "loss.kwargs.tau_pos", "sapo_temperature_neg": "loss.kwargs.tau_neg",
    "vespo_k_pos": "loss.kwargs.k_pos", "vespo_lambda_pos": "loss.kwargs.lambda_pos",
    "vespo_k_neg": "loss.kwargs.k_neg", "vespo_lambda_neg": "loss.kwargs.lambda_neg",
    "beta": "kl.beta (KL placed in the loss, as TRL)",
    "use_bias_correction_kl": "kl.estimator: k3_is if true, k3 if false",
    "scale_rewards": "advantage.name grpo with advantage.kwargs.scale_rewards (group | batch | none)",
    "num_generations": "rollout.group_size", "max_completion_length": "rollout.max_new_tokens",
    "temperature": "rollout.temperature", "top_p": "rollout.top_p",
    "learning_rate": "optim.lr", "weight_decay": "optim.weight_decay",
    "adam_beta1": "optim.betas[0]", "adam_beta2": "optim.betas[1]", "max_grad_norm": "optim.grad_clip",
    "warmup_steps": "optim.warmup_steps", "lr_scheduler_type": "optim.schedule (constant | linear | cosine)",
    "num_iterations": "train.epochs", "max_steps": "train.steps", "seed": "seed",
    "gradient_accumulation_steps": "train.grad_accum",
    "per_device_train_batch_size": "rollout.prompts_per_step = per_device_train_batch_size x steps_per_generation"
                                   " / num_generations (one process)",
    "steps_per_generation": "train.minibatches = steps_per_generation / gradient_accumulation_steps",
    "use_vllm": "with vllm_importance_sampling_correction: correction.name (else none)",
    "vllm_importance_sampling_correction": "correction.name none if false",
    "vllm_importance_sampling_mode": "correction.name: token_truncate -> token_tis, token_mask -> token_mis, "
                                     "sequence_truncate -> sequence_tis, sequence_mask -> sequence_mis",
    "vllm_importance_sampling_clip_max": "correction.kwargs.clip_max",
    "vllm_importance_sampling_clip_min": "correction.kwargs.clip_min",
}
IS_MODES = {"token_truncate": "token_tis", "token_mask": "token_mis", "sequence_truncate": "sequence_tis",
            "sequence_mask": "sequence_mis"}
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}


def _get(trl: dict[str, Any], key: str) -> Any:
    return trl.get(key, TRL_DEFAULTS[key])


def loss_settings(trl: dict[str, Any]) -> dict[str, Any]:
    """The tilt ``loss`` and ``kl`` sections that give TRL's ``_compute_loss`` for ``trl``'s fields.

    Returns {"loss": {"name", "kwargs"}, "kl": {"estimator", "beta", "placement", "kwargs"}}.
    Raises ConfigError on a loss_type or importance_sampling_level TRL 1.16 does not accept.
    """
    loss_type = _get(trl, "loss_type")
    if loss_type not in TRL_LOSS_TYPES:
        raise ConfigError(f"loss_type={loss_type!r} is not a TRL 1.16 loss type; valid: {', '.join(TRL_LOSS_TYPES)}")
    level = _get(trl, "importance_sampling_level")
    if level not in ("token", "sequence"):
        raise ConfigError(f"importance_sampling_level={level!r}; valid: 'token', 'sequence'")
    eps = float(_get(trl, "epsilon"))
    eps_high = _get(trl, "epsilon_high")
    eps_high = eps if eps_high is None else float(eps_high)
    kwargs: dict[str, Any] = {}
    if loss_type in CLIPPED:
        kwargs = {"eps_low": eps, "eps_high": eps_high, "level": level, "delta": _get(trl, "delta")}
    elif loss_type == "cispo":
        kwargs = {"eps_max": eps_high, "level": level}
    elif loss_type == "sapo":
        kwargs = {"tau_pos": float(_get(trl, "sapo_temperature_pos")),
                  "tau_neg": float(_get(trl, "sapo_temperature_neg")), "level": level}
    elif loss_type == "vespo":
        kwargs = {k: float(_get(trl, f"vespo_{k}")) for k in ("k_pos", "lambda_pos", "k_neg", "lambda_neg")}
    bias_corrected = bool(_get(trl, "use_bias_correction_kl"))
    kl = {"estimator": "k3_is" if bias_corrected else "k3", "beta": float(_get(trl, "beta")), "placement": "loss",
          "kwargs": {"level": level} if bias_corrected else {}}
    return {"loss": {"name": loss_type, "kwargs": kwargs}, "kl": kl}


def _advantage(trl: dict[str, Any]) -> dict[str, Any]:
    scale = _get(trl, "scale_rewards")
    scale = {True: "group", False: "none"}.get(scale, scale) if isinstance(scale, bool) else scale
    if scale not in ("group", "batch", "none"):
        raise ConfigError(f"scale_rewards={scale!r}; valid: group, batch, none, true, false")
    return {"name": "grpo", "kwargs": {"scale_rewards": scale}}


def _batch_shape(trl: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """rollout.group_size / prompts_per_step and train.grad_accum / minibatches from TRL's batch fields."""
    g = int(_get(trl, "num_generations"))
    accum = int(_get(trl, "gradient_accumulation_steps"))
    spg = _get(trl, "steps_per_generation")
    spg = accum if spg is None else int(spg)
    completions = int(_get(trl, "per_device_train_batch_size")) * spg  # one generation batch, one process
    if completions % g:
        raise ConfigError(f"per_device_train_batch_size x steps_per_generation = {completions} is not a multiple "
                          f"of num_generations = {g}")
    if spg % accum:
        raise ConfigError(f"steps_per_generation = {spg} is not a multiple of gradient_accumulation_steps = {accum}")
    rollout = {"group_size": g, "prompts_per_step": completions // g,
               "max_new_tokens": int(_get(trl, "max_completion_length")),
               "temperature": float(_get(trl, "temperature")), "top_p": float(_get(trl, "top_p"))}
    return rollout, {"grad_accum": accum, "minibatches": spg // accum, "epochs": int(_get(trl, "num_iterations"))}


def from_trl(trl: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A TRL ``GRPOConfig`` (as a dict of its fields) -> (tilt raw config dict, notes).

    Every field in ``MAPPING`` is carried over (missing ones take TRL's default); every other key
    present in ``trl`` gets a note saying it was not carried over. The result loads with
    ``tilt.config.Config.model_validate``.
    """
    notes = [f"{k}: not carried over (no tilt equivalent)" for k in trl if k not in MAPPING]
    settings = loss_settings(trl)
    rollout, train = _batch_shape(trl)
    schedule = _get(trl, "lr_scheduler_type")
    if schedule not in SCHEDULES:
        raise ConfigError(f"lr_scheduler_type={schedule!r} has no tilt schedule; valid: {', '.join(SCHEDULES)}")
    max_steps = int(_get(trl, "max_steps"))
    if max_steps > 0:
        train["steps"] = max_steps
    else:
        notes.append("max_steps <= 0 (TRL trains num_train_epochs over its dataset): train.steps keeps tilt's default")
    correction: dict[str, Any] = {"name": "none", "kwargs": {}}
    if _get(trl, "use_vllm") and _get(trl, "vllm_importance_sampling_correction"):
        mode = _get(trl, "vllm_importance_sampling_mode")
        if mode not in IS_MODES:
            raise ConfigError(f"vllm_importance_sampling_mode={mode!r}; valid: {', '.join(IS_MODES)}")
        correction = {"name": IS_MODES[mode], "kwargs": {
            "clip_max": _get(trl, "vllm_importance_sampling_clip_max"),
            "clip_min": _get(trl, "vllm_importance_sampling_clip_min")}}
    raw = {
        "seed": int(_get(trl, "seed")),
        "rollout": rollout,
        "loss": settings["loss"],
        "advantage": _advantage(trl),
        "kl": settings["kl"],
        "correction": correction,
        "optim": {"lr": float(_get(trl, "learning_rate")), "weight_decay": float(_get(trl, "weight_decay")),
                  "betas": [float(_get(trl, "adam_beta1")), float(_get(trl, "adam_beta2"))],
                  "grad_clip": float(_get(trl, "max_grad_norm")), "warmup_steps": int(_get(trl, "warmup_steps")),
                  "schedule": SCHEDULES[schedule]},
        "train": train,
    }
    return raw, notes


def convert_file(path: str | Path) -> tuple[str, list[str]]:
    """Read a GRPOConfig YAML, return (tilt YAML text, notes); the result is validated as a tilt Config."""
    from tilt.config import Config, dump_config, read_yaml_mapping

    raw, notes = from_trl(read_yaml_mapping(path, "TRL config file"))
    try:
        cfg = Config.model_validate(raw)
    except Exception as exc:  # pydantic's ValidationError names the field and value
        raise ConfigError(f"the converted config is not valid: {exc}") from exc
    return dump_config(cfg), notes
