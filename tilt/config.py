"""One typed, validated config tree (pydantic), loaded from YAML with ``--set a.b=value``.

Every field has a default and a docstring (shown by ``tilt config show`` and in errors). A
wrong key or value is a ``ConfigError`` naming the field, the value and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names field, value and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


def _check_name(registry_path: str, attr: str, name: str) -> str:
    import importlib

    reg = getattr(importlib.import_module(registry_path), attr)
    if name not in reg:
        raise ValueError(f"unknown name {name!r}; valid names: {', '.join(reg.names())}")
    return name


class LoraCfg(Section):
    enabled: bool = False
    """Train LoRA adapters (peft) instead of all weights; the reference is the base with adapters off."""
    r: int = Field(8, ge=1)
    """LoRA rank r (peft.LoraConfig.r)."""
    lora_alpha: float = Field(16.0, gt=0)
    """LoRA scale numerator: the update is (lora_alpha / r) B A (peft.LoraConfig.lora_alpha)."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter input during training (peft.LoraConfig.lora_dropout)."""
    target_modules: Optional[list[str] | str] = None
    """Module names to adapt, e.g. [q_proj, v_proj], or "all-linear"; None = peft's default for
    the architecture (peft.LoraConfig.target_modules)."""
    save_merged: bool = False
    """Also write final/merged: base + adapters merged into plain weights (AutoModelForCausalLM)."""


class ModelCfg(Section):
    path: str = "shipped"
    """Policy to train: "shipped" (the embedded base model), a local Hugging Face causal-LM directory,
    a .gguf file (converted once to safetensors in $TILT_MODEL_CACHE or ~/.cache/tilt/models), or a
    model alias (smollm2-135m-instruct; `tilt models install NAME`)."""
    gguf_file: Optional[str] = None
    """GGUF file name inside the directory model.path (alternative to giving the file as model.path)."""
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    """Parameter dtype of policy and reference. bfloat16 trains and samples with bf16 weights
    (log-probs still go through a float32 log-softmax); see docs/models.md for what is exact."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where policy, reference and teacher run: "auto" = cuda when available, else cpu."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (same gradients, more compute). Hugging Face turns the
    KV cache off while checkpointing, so the shared-prompt forward is lost: with long prompts shared by
    a group and a large vocabulary it can cost memory instead of saving it (docs/models.md)."""
    lora: LoraCfg = LoraCfg()
    """LoRA adapters (off by default: full fine-tuning)."""
    prompt_format: Optional[str] = None
    """Text each task prompt is written into before tokenizing, "{prompt}" marking its place (e.g. a
    chat-format few-shot prefix); None = the bare prompt. Used for sampling and held-out evaluation."""
    chat_template: bool = False
    """Make the (formatted) prompt the user turn of the tokenizer's chat template, assistant turn opened."""

    @field_validator("prompt_format")
    @classmethod
    def _placeholder(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and "{prompt}" not in v:
            raise ValueError('prompt_format must contain "{prompt}", where the task prompt goes')
        return v


class TasksCfg(Section):
    mix: str = "addition:1,multiplication:1,countdown:1,sorting:1-2"
    """Task mix, "task:difficulties[@weight],..." (difficulties "2", "1-3" or "1|3")."""
    eval_per_cell: int = Field(64, ge=1)
    """Held-out prompts per (task, difficulty) cell, from the eval seed range."""

    @field_validator("mix")
    @classmethod
    def _mix(cls, v: str) -> str:
        from tilt.tasks.mix import parse_mix

        parse_mix(v)
        return v


class RolloutCfg(Section):
    group_size: int = Field(8, ge=1)
    """G: completions sampled per prompt."""
    prompts_per_step: int = Field(16, ge=1)
    """B: prompts per RL step; the batch holds B*G completions."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature during training (log-probs use softmax(logits / temperature))."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass during training."""
    max_new_tokens: int = Field(16, ge=1)
    """Generation budget per completion (also L_max of the dr_grpo reduction)."""
    min_new_tokens: int = Field(0, ge=0)
    """EOS is masked out until a completion has this many tokens (benchmarks force lengths with it)."""

    @model_validator(mode="after")
    def _min_within_max(self) -> "RolloutCfg":
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        return self


class LossCfg(Section):
    name: str = "grpo"
    """Policy loss from the loss registry (tilt.losses.LOSSES)."""
    reduction: Optional[str] = None
    """Token-loss reduction mode; None = the loss's declared default (see tilt.reduction.MODES)."""
    kwargs: dict[str, Any] = {}
    """Keyword hyper-parameters passed to the loss (e.g. {eps_high: 0.28})."""
    prev_refresh: int = Field(10, ge=1)
    """haepo: copy the policy into the frozen previous policy pi_prev every this many RL steps (at steps 1, 1+N, ...)."""
    astar_samples: int = Field(8, ge=1)
    """astar_po stage 1: M samples from pi_ref per training prompt for V*(x) = beta log mean_j exp(r_j / beta)."""
    astar_beta: Optional[float] = Field(None, gt=0)
    """astar_po stage 1: beta of V* (the paper's beta_1); None = the loss's beta (then the fixed point is exact)."""
    aer_tau: float = Field(0.4, gt=0)
    """aer: target entropy H* = aer_tau * H_0, H_0 the entropy measured at the first step."""
    aer_lr: float = Field(1e-3, ge=0)
    """aer: step of the global coefficient controller, alpha <- clip(alpha + aer_lr (H* - H), 0, aer_alpha_max)."""
    aer_alpha_max: float = Field(1.0, ge=0)
    """aer: upper bound of the global coefficient alpha (its start value is loss.kwargs.alpha, default 1e-3)."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name("tilt.losses", "LOSSES", v)

    @field_validator("reduction")
    @classmethod
    def _reduction(cls, v: Optional[str]) -> Optional[str]:
        from tilt.reduction import MODES

        if v is not None and v not in MODES:
            raise ValueError(f"unknown reduction {v!r}; valid modes: {', '.join(MODES)}")
        return v


class AdvantageCfg(Section):
    name: str = "grpo"
    """Advantage estimator from tilt.advantages.ADVANTAGES."""
    kwargs: dict[str, Any] = {}
    """Keyword hyper-parameters passed to the estimator."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name("tilt.advantages", "ADVANTAGES", v)

    mc_continuations: int = Field(4, ge=1)
    """spo_chain: K Monte-Carlo continuations drawn from each segment-end prefix; their mean reward is V(prefix)."""
    spo_segments: int = Field(4, ge=1)
    """spo_chain: at most this many segments per completion (tilt.advantages.segment.cutpoints)."""


class KLCfg(Section):
    estimator: str = "k3"
    """KL estimator from tilt.kl.KL_ESTIMATORS (k1, k2, k3, low_var_kl, full, ...)."""
    placement: Literal["loss", "reward"] = "loss"
    """"loss": beta*KL added per token to the loss; "reward": -beta*KL subtracted from the reward."""
    beta: float = Field(0.04, ge=0)
    """KL coefficient beta of max E[r] - beta*KL(pi||pi_ref); 0 disables the reference model."""
    kwargs: dict[str, Any] = {}
    """Keyword hyper-parameters of the estimator (e.g. {q: 2.0} for tsallis, {base: k1} for critical)."""

    @field_validator("estimator")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name("tilt.kl", "KL_ESTIMATORS", v)


class TeacherCfg(Section):
    path: Optional[str] = None
    """Frozen teacher for distillation losses (kdrl, reverse_kl_distill, akl_distill): "shipped" or a local
    Hugging Face causal-LM directory with the policy's vocabulary; None = no teacher."""


class ValueCfg(Section):
    coef: float = Field(0.5, ge=0)
    """gae: weight of the value-head loss added to the policy loss (the head sits on the policy's last hidden states)."""
    clip_range: Optional[float] = Field(0.2, gt=0)
    """gae: clip of the value prediction around its rollout-time value (PPO value clipping); None = no clipping."""


class SelectionCfg(Section):
    name: str = "none"
    """Sample selector: "none" or a name from tilt.selection.SELECTORS (dynamic_sampling, d3s, pf_ppo)."""
    kwargs: dict[str, Any] = {}
    """Selector hyper-parameters: dynamic_sampling {max_draws: 4, eps, fill_with_dropped, oversample: 1.0};
    d3s {sample_start, token_start, end, min_samples}; pf_ppo {strategy}."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return v if v == "none" else _check_name("tilt.selection", "SELECTORS", v)


class RewardCfg(Section):
    functions: list[str] = ["verifier"]
    """Reward functions: registry names or "module:function" paths of f(prompts, completions, **columns)."""
    weights: Optional[list[float]] = None
    """Weight per reward function (default 1 each); the reward is the weighted sum."""
    timeout_s: float = Field(10.0, gt=0)
    """Seconds a reward call may take before its samples are scored 0 and counted."""


class OptimCfg(Section):
    lr: float = Field(1e-4, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup, in optimizer steps."""
    grad_clip: float = Field(1.0, gt=0)
    """Max global gradient norm."""


class TrainCfg(Section):
    steps: int = Field(300, ge=1)
    """RL steps (each: sample B*G completions, then optimizer steps on them)."""
    epochs: int = Field(1, ge=1)
    """Passes over each batch (PPO epochs)."""
    minibatches: int = Field(2, ge=1)
    """Optimizer steps per epoch; the batch is split into this many mini-batches."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step (memory only: the result is the same)."""
    minibatch_by: Literal["row", "group"] = "row"
    """How a batch is split into mini-batches: shuffled rows, or shuffled whole groups (each
    mini-batch then runs each of its prompts once in the shared-prompt forward)."""
    micro_batch_tokens: Optional[int] = Field(2048, ge=1)
    """Upper bound on rows x padded width per micro-batch (more micro-batches when exceeded): bounds
    activation memory without changing the update. None: only grad_accum splits."""
    max_bad_steps: int = Field(3, ge=1)
    """Consecutive non-finite losses after which the run stops (the last checkpoint stays)."""


class CheckpointCfg(Section):
    every: int = Field(50, ge=1)
    """Write a checkpoint every this many RL steps (and at the end)."""
    keep: int = Field(2, ge=1)
    """How many recent checkpoints to keep."""


class EvalCfg(Section):
    every: int = Field(100, ge=0)
    """Held-out evaluation every this many steps (0 = only before and after training)."""
    n_samples: int = Field(8, ge=1)
    """Samples per held-out prompt for pass@1 at T=1.0."""
    max_new_tokens: int = Field(16, ge=1)
    """Generation budget at evaluation."""
    batch_size: int = Field(512, ge=1)
    """Sequences per evaluation forward batch."""


class LogCfg(Section):
    every: int = Field(1, ge=1)
    """Log metrics every this many steps."""
    tensorboard: bool = True
    """Also write TensorBoard events."""
    plot: bool = True
    """Write curves.png (reward, accuracy, KL, entropy) at checkpoints and at the end."""
    progress: Literal["auto", "rich", "plain", "none"] = "auto"
    """Progress display: rich bar on a TTY, plain lines otherwise ("auto")."""


class Config(Section):
    seed: int = 0
    """Seed of sampling, initialisation and data order."""
    run_dir: Optional[str] = None
    """Run directory; default runs/<timestamp>."""
    threads: Optional[int] = None
    """torch intra-op threads (None = torch default)."""
    model: ModelCfg = ModelCfg()
    """Policy (and frozen reference) model."""
    tasks: TasksCfg = TasksCfg()
    """Training and held-out tasks."""
    rollout: RolloutCfg = RolloutCfg()
    """Sampling of completions."""
    loss: LossCfg = LossCfg()
    """Policy loss."""
    advantage: AdvantageCfg = AdvantageCfg()
    """Advantage estimator."""
    kl: KLCfg = KLCfg()
    """KL regularisation toward the reference."""
    teacher: TeacherCfg = TeacherCfg()
    """Frozen teacher model (distillation losses)."""
    value: ValueCfg = ValueCfg()
    """Value head (gae advantage)."""
    selection: SelectionCfg = SelectionCfg()
    """Sample / token selection (catalogue D1-D3)."""
    reward: RewardCfg = RewardCfg()
    """Reward functions."""
    optim: OptimCfg = OptimCfg()
    """Optimizer."""
    train: TrainCfg = TrainCfg()
    """Loop sizes."""
    checkpoint: CheckpointCfg = CheckpointCfg()
    """Checkpointing."""
    eval: EvalCfg = EvalCfg()
    """Held-out evaluation."""
    log: LogCfg = LogCfg()
    """Logging and progress."""


def _format_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            parent = Config
            for part in err["loc"][:-1]:
                ann = parent.model_fields.get(str(part))
                parent = ann.annotation if ann is not None and isinstance(ann.annotation, type) else None
                if parent is None or not issubclass(parent, BaseModel):
                    parent = None
                    break
            allowed = ", ".join(parent.model_fields) if parent is not None else "see `tilt config show`"
            lines.append(f"  unknown field {field!r} (value {value!r}); allowed fields here: {allowed}")
        else:
            lines.append(f"  field {field!r}: value {value!r} is not allowed: {err['msg']}")
    return "\n".join(lines)


def parse_set(items: list[str]) -> dict[str, Any]:
    """Turn ["a.b=1", "c=x"] into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not of the form a.b=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r} conflicts with another --set on {part!r}")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def merge_config(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Raw config dict ``base`` with ``over`` merged in, nested sections key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load and validate a config: defaults <- YAML file <- ``--set`` overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping, got {type(raw).__name__}")
        source = str(p)
    if overrides:
        raw = merge_config(raw, parse_set(overrides))
        source += " + --set"
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe(cfg: BaseModel, indent: int = 0) -> str:
    """The resolved tree with each field's docstring as a YAML comment."""
    out = []
    pad = "  " * indent
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        doc = (field.description or "").replace("\n", " ")
        if isinstance(value, BaseModel):
            out.append(f"{pad}{name}:  # {doc}")
            out.append(describe(value, indent + 1).rstrip("\n"))
        else:
            rendered = yaml.safe_dump(value if not isinstance(value, tuple) else list(value),
                                      default_flow_style=True).strip().removesuffix("...").strip()
            out.append(f"{pad}{name}: {rendered}  # {doc}")
    return "\n".join(out) + "\n"
