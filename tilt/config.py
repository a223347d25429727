"""One typed, validated config tree (pydantic), loaded from YAML with ``--set a.b=value``.

Every field has a default and a docstring (shown by ``tilt config show`` and in errors). A
wrong key or value is a ``ConfigError`` naming the field, the value and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

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


class DataSourceCfg(Section):
    path: Optional[str] = None
    """Local dataset: a .jsonl / .json / .csv / .parquet file or a save_to_disk folder, read with the
    `datasets` library. None = the built-in procedural tasks of tasks.mix (train) / a held-out fraction (eval)."""
    split: Optional[str] = None
    """Split to read: a DatasetDict split of a save_to_disk folder, or a datasets slice like "train[:80%]"
    of a file (None = "train")."""
    format: Literal["auto", "json", "csv", "parquet", "disk"] = "auto"
    """File format (tilt.data.FORMATS); "auto" = from the suffix, a folder is "disk"."""


class EvalSourceCfg(DataSourceCfg):
    fraction: float = Field(0.1, gt=0, lt=1)
    """Without an eval path: the share of train rows held out for evaluation, chosen by hashing each
    normalised prompt (the same prompt always lands on the same side, whatever the seed)."""
    max_rows: Optional[int] = Field(256, ge=1)
    """Evaluate at most this many held-out rows (the first ones, in file order); None = all."""
    breakdown: Optional[str] = None
    """A column of the eval rows to break held-out scores down by (one cell per value), e.g. "level"."""


class DataCfg(Section):
    source: str = "auto"
    """Kind of source from tilt.data.SOURCES ("tasks": the built-in tasks of tasks.mix; "dataset": rows of
    data.train.path; "reasoning_gym": a reasoning-gym generator, set by data.kwargs); "auto" = "dataset"
    when data.train.path is set, else "tasks"."""
    train: DataSourceCfg = DataSourceCfg()
    """Train prompts: a dataset file, or None for the built-in tasks of tasks.mix."""
    eval: EvalSourceCfg = EvalSourceCfg()
    """Held-out prompts of a dataset run: a second file / split, or a hashed fraction of the train rows."""
    prompt_column: str = "prompt"
    """Column holding the prompt: a string, or a list of {"role", "content"} messages (rendered with the
    tokenizer's chat template). Every other column reaches the reward functions as a keyword list (TRL's convention)."""
    kwargs: dict[str, Any] = {}
    """Keyword arguments of a generated source, e.g. data.source=reasoning_gym: {generator: chain_sum,
    size: 1000, eval_size: 64, chat: false, <the generator's own keywords>}."""
    allow_contaminated: bool = False
    """Accept eval prompts that also appear in the train rows (normalised-prompt hash); the overlap
    is recorded in seeds.json and the run is marked contaminated."""

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return v if v == "auto" else _check_name("tilt.data.sources", "SOURCES", v)


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
    decode_dtype: Literal["model", "bfloat16"] = "model"
    """Precision of the sampler's decode-step matmuls. "model": the model's dtype (the sampler and the learner
    agree to float rounding). "bfloat16": the weights are cast once per generate call and every decode step's
    matmuls run in bf16 (2.5-4x faster products on CPUs with AVX-512 BF16/AMX); norms, attention and sampling
    stay in the model's dtype. The sampler then differs from the learner, so a correction is required
    (correction.name, e.g. token_tis). Training-time sampling only (evaluation samples in the model's
    dtype); needs a float32 Llama/Qwen2/Mistral policy, LoRA included (adapters merged into the bf16 copy;
    tilt.fastdecode)."""
    kv_cache_dtype: Literal["model", "float16", "int8"] = "model"
    """Precision of the sampler's cache of completion keys and values. "model": the model's dtype. "float16": each
    new key and value is rounded to half precision as it is cached and read back as float, so the decode attention
    reads half the bytes (it reads the whole cache for every new token and is bound by the memory's read rate:
    about 1.7 of 2.8 s of sampling at 10M parameters x 256 tokens; benchmarks/README.md, speed work 44). "int8": each
    new key and value vector (one head's) is kept as 8-bit integers and one float scale, round(x 127 / max|x|) and
    max|x| / 127 (tilt.kernels.quantize_int8): 36 bytes for a 32-value head against 64 in float16 and 128 in
    float32 (speed work 47). Products, norms and sampling stay in the model's dtype. The sampler then differs from
    the learner by that rounding (float16: log-probs 1e-5 to 1e-2 apart, by the model, mismatch/k3 ~1e-8 over the
    demo; int8: larger, docs/models.md), so a correction is required (correction.name, e.g. token_tis); with
    float16 a key or value beyond its range (65504) stops the run with an error naming this setting. Training-time
    sampling only; needs tilt's grouped decoder (a float32 Llama/Qwen2/Mistral policy, LoRA included,
    group_size >= 2)."""

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
    """Keyword arguments of the loss and of what it needs (its providers' and state's settings), e.g.
    {eps_high: 0.28}; haepo {prev_refresh}, astar_po {v_star_samples, v_star_beta}, aer {tau,
    controller_lr, alpha_max}. Checked against the annotated signatures when the run is built."""

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
    """Keyword arguments of the estimator and of what it needs, e.g. gae {gamma, lam, value_coef,
    value_clip}, spo_chain {prob_threshold, continuations, max_segments}, infalign {base, base_kwargs,
    transform, t, ref_samples}."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name("tilt.advantages", "ADVANTAGES", v)


class KLCfg(Section):
    estimator: str = "k3"
    """KL estimator from tilt.kl.KL_ESTIMATORS (k1, k2, k3, low_var_kl, full, ...)."""
    placement: Literal["loss", "reward"] = "loss"
    """"loss": beta*KL added per token to the loss; "reward": -beta*KL subtracted from the reward."""
    beta: float = Field(0.04, ge=0)
    """KL coefficient beta; 0 disables the reference model. It is the beta of max E[r] - beta*KL(pi||pi_ref)
    (fixed point pi_ref*exp(r/beta)/Z) only when the advantage is not std-normalised and the estimator has
    the reverse-KL gradient (k1 in the reward, or k3_is / full in the loss). GRPO's advantage divides by
    the group std sigma_x, which scales the effective coefficient to beta*sigma_x(pi) (a near-greedy policy
    at beta=0.3 on a bandit), and k3 in the loss has the forward-KL gradient: the default job (grpo advantage,
    grpo loss, k3 in the loss) reaches neither pi* nor the forward-KL optimum at beta
    (tests/test_losses_peers.py::test_grpo_std_normalisation_scales_the_effective_kl_coefficient)."""
    kwargs: dict[str, Any] = {}
    """Keyword hyper-parameters of the estimator (e.g. {q: 2.0} for tsallis, {base: k1} for critical, which
    reaches its certainty-scaled target with kl.placement=reward only with base k1; {level: sequence} for k3_is)."""

    @field_validator("estimator")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name("tilt.kl", "KL_ESTIMATORS", v)


class CorrectionCfg(Section):
    name: str = "none"
    """Training-inference correction from tilt.corrections.CORRECTIONS (token_tis, sequence_mis, icepop, ...).
    Anything but "none" recomputes the learner's own log-probs of the sampled tokens after each rollout
    and weights the per-token policy loss by the correction of sampler vs learner; "none" costs nothing."""
    kwargs: dict[str, Any] = {}
    """Keyword hyper-parameters of the correction (e.g. {clip_max: 2.0})."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name("tilt.corrections", "CORRECTIONS", v)


class TeacherCfg(Section):
    path: Optional[str] = None
    """Frozen teacher for distillation losses (kdrl, reverse_kl_distill, akl_distill): "shipped" or a local
    Hugging Face causal-LM directory with the policy's vocabulary; None = no teacher."""


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
    """Reward functions: registry names, "package.module:function" or "path/to/file.py:function", each
    f(prompts, completions, completion_ids, **columns) -> list[float] as for trl.GRPOTrainer."""
    weights: Optional[list[float]] = None
    """Weight per reward function (default 1 each); the reward is the weighted sum."""
    timeout_s: float = Field(10.0, gt=0)
    """Seconds a reward call may take before its worker process is killed and its samples are scored 0
    and counted (reward/timeouts)."""


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
    micro_batch_tokens: Union[int, Literal["auto"], None] = "auto"
    """Upper bound on the positions one micro-batch's forward runs (more micro-batches when exceeded; a
    prompt shared by a micro-batch's rows counts once, as the shared-prompt forward runs it once): bounds
    activation memory without changing the update. Also chunks the reference pass. "auto": as many
    positions as estimated activations of an eighth of the machine's memory (2-8 GiB) allow for this model
    (tilt.rollout.auto_micro_batch_tokens; with 3 GiB on a 24 GiB machine: ~14,000 at 10M, ~2,400 on
    SmolLM2-135M with its 49k vocabulary). None: only grad_accum splits."""

    @field_validator("micro_batch_tokens")
    @classmethod
    def _budget(cls, v):
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError(f"micro_batch_tokens must be >= 1, 'auto' or null, got {v}")
        return v
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


class DecodeCfg(Section):
    name: str = "sample"
    """Decoder of the held-out samples (tilt.decoding.DECODERS): sample, greedy, top_k, top_p, min_p, bregman,
    exclude, qsharp, controlled, transfer_q (token-level), best_of_n, resample (one of kwargs.n reference samples,
    scored by the value model), controlled_block (blockwise CD: best of kwargs.k reference blocks of
    kwargs.block_len tokens), qprobe (one of kwargs.k reference samples ∝ exp(Q-probe / beta)), q_search (E6
    best-first search over LM-proposed steps scored by a step-level Q from `tilt train-value --steps`). "sample"
    is plain sampling at T=1."""
    kwargs: dict[str, Any] = {}
    """The decoder's keyword arguments, e.g. {k: 20} for top_k, {beta: 0.5, top_k: 20} for qsharp."""
    value_model: Optional[str] = None
    """Directory of a Q model saved by `tilt train-value` (qsharp, controlled, controlled_block, transfer_q,
    best_of_n, resample) or of a Q-probe saved by `tilt train-probe` (qprobe)."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name("tilt.decoding", "DECODERS", v)

    @model_validator(mode="after")
    def _needs(self) -> "DecodeCfg":
        if self.name == "sample" and self.value_model is None:  # the default: no registry (torch) import
            return self
        from tilt.decoding import DECODERS

        entry = DECODERS.entry(self.name)
        if "values" in entry.meta["needs"] and self.value_model is None:
            maker = "`tilt train-probe`" if entry.meta["values"] == "probe" else "`tilt train-value`"
            raise ValueError(f"decoder {self.name!r} needs a value model: set decode.value_model to a directory "
                             f"written by {maker}")
        return self


class LogCfg(Section):
    every: int = Field(1, ge=1)
    """Log metrics every this many steps."""
    tensorboard: bool = True
    """Also write TensorBoard events."""
    plot: bool = True
    """Write curves.png (reward, accuracy, KL, entropy) at checkpoints and at the end."""
    progress: Literal["auto", "rich", "plain", "none"] = "auto"
    """Progress display: rich bar on a TTY, plain lines otherwise ("auto")."""
    no_signal_steps: int = Field(10, ge=0)
    """Warn when this many consecutive steps had every advantage zero (no learning signal); 0 = never."""
    backends: list[str] = []
    """Extra logging backends beside metrics.jsonl / TensorBoard, each sent the same rows: "wandb" (offline with
    WANDB_MODE=offline), "trackio" (local store in $TRACKIO_DIR). Optional extras: pip install 'tilt[wandb]'."""


class Config(Section):
    seed: int = 0
    """Seed of sampling, initialisation and data order."""
    run_dir: Optional[str] = None
    """Run directory; default runs/<timestamp>."""
    threads: Optional[int] = Field(None, ge=1)
    """torch intra-op threads, at least 1 (None = torch default)."""
    keep_freed_memory: bool = True
    """Keep freed memory in the process for the next step's tensors instead of returning it to the kernel
    (glibc malloc on Linux; tilt.heap): large tensors then skip the page faults of fresh memory. Resident
    memory stays at its peak between steps. Once applied it holds for the rest of the process. No effect
    without glibc."""
    model: ModelCfg = ModelCfg()
    """Policy (and frozen reference) model."""
    tasks: TasksCfg = TasksCfg()
    """Training and held-out tasks."""
    data: DataCfg = DataCfg()
    """Bring-your-own dataset (overrides tasks.mix when data.train.path is set)."""
    rollout: RolloutCfg = RolloutCfg()
    """Sampling of completions."""
    loss: LossCfg = LossCfg()
    """Policy loss."""
    advantage: AdvantageCfg = AdvantageCfg()
    """Advantage estimator."""
    kl: KLCfg = KLCfg()
    """KL regularisation toward the reference."""
    correction: CorrectionCfg = CorrectionCfg()
    """Training-inference correction of the sampler's vs the learner's log-probs (off by default)."""
    teacher: TeacherCfg = TeacherCfg()
    """Frozen teacher model (distillation losses)."""
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
    decode: DecodeCfg = DecodeCfg()
    """Decoder of held-out evaluation (catalogue E1-E7)."""
    plugins: list[str] = []
    """Modules ("mypkg.methods") or Python files ("path/methods.py") imported before the config's
    names are checked, to register methods, providers or reward functions from outside tilt."""

    @model_validator(mode="after")
    def _sampler_mismatch_corrected(self) -> "Config":
        """A sampler in another precision than the learner needs a correction (issue 14's bf16 sampling)."""
        if self.rollout.decode_dtype != "model" and self.correction.name == "none":
            raise ValueError(f"rollout.decode_dtype={self.rollout.decode_dtype!r} samples from a lower-precision copy "
                             f"of the policy, so the learner must correct for the mismatch: set correction.name (e.g. "
                             f"token_tis; tilt.corrections)")
        if self.rollout.kv_cache_dtype != "model" and self.correction.name == "none":
            raise ValueError(f"rollout.kv_cache_dtype={self.rollout.kv_cache_dtype!r} samples with rounded keys and "
                             f"values, so the learner must correct for the mismatch: set correction.name (e.g. "
                             f"token_tis; tilt.corrections)")
        if self.rollout.kv_cache_dtype != "model" and self.rollout.group_size < 2:
            raise ValueError(f"rollout.kv_cache_dtype={self.rollout.kv_cache_dtype!r} needs tilt's grouped decoder, "
                             f"which samples G >= 2 completions per prompt: rollout.group_size is "
                             f"{self.rollout.group_size}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _before(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        plugins = raw.get("plugins") or []
        if isinstance(plugins, str):
            plugins = [plugins]
        if isinstance(plugins, list) and all(isinstance(p, str) for p in plugins):
            from tilt.plugins import import_plugins

            import_plugins(plugins)  # before the sections validate registry names
            raw = {**raw, "plugins": plugins} if "plugins" in raw else raw
        from tilt.legacy_config import translate_moved

        return translate_moved(raw)


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


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds; ConfigError naming ``what`` and the file otherwise."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {str(p)!r} must hold a mapping, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load and validate a config: defaults <- YAML file <- ``--set`` overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        raw, source = read_yaml_mapping(path, "config file"), str(path)
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
