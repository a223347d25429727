"""``tilt config from-trl``: TRL GRPOConfig fields -> tilt config, field by field; TRL's defaults are TRL's;
a ported GRPOConfig YAML runs in tilt and its first step's loss equals TRL's ``_compute_loss`` on the
same model and batch."""
import contextlib
import dataclasses
import functools
import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tilt.cli import app
from tilt.config import Config, ConfigError, load_config
from tilt.trl_compat import MAPPING, TRL_DEFAULTS, from_trl

runner = CliRunner()

# (TRL field, a non-default value, tilt field path, expected tilt value). Every MAPPING row appears.
ROWS = [
    ("loss_type", "bnpo", "loss.name", "bnpo"),
    ("epsilon", 0.1, "loss.kwargs.eps_low", 0.1),
    ("epsilon_high", 0.28, "loss.kwargs.eps_high", 0.28),
    ("delta", 1.5, "loss.kwargs.delta", 1.5),
    ("importance_sampling_level", "sequence", "loss.kwargs.level", "sequence"),
    ("sapo_temperature_pos", 2.0, "loss.kwargs.tau_pos", 2.0),  # with loss_type=sapo (see _case)
    ("sapo_temperature_neg", 3.0, "loss.kwargs.tau_neg", 3.0),
    ("vespo_k_pos", 1.5, "loss.kwargs.k_pos", 1.5),  # with loss_type=vespo
    ("vespo_lambda_pos", 2.5, "loss.kwargs.lambda_pos", 2.5),
    ("vespo_k_neg", 4.0, "loss.kwargs.k_neg", 4.0),
    ("vespo_lambda_neg", 1.5, "loss.kwargs.lambda_neg", 1.5),
    ("beta", 0.04, "kl.beta", 0.04),
    ("use_bias_correction_kl", False, "kl.estimator", "k3"),
    ("scale_rewards", False, "advantage.kwargs.scale_rewards", "none"),
    ("num_generations", 4, "rollout.group_size", 4),  # 8 completions per batch / 4 -> 2 prompts
    ("max_completion_length", 64, "rollout.max_new_tokens", 64),
    ("temperature", 0.7, "rollout.temperature", 0.7),
    ("top_p", 0.9, "rollout.top_p", 0.9),
    ("learning_rate", 3e-6, "optim.lr", 3e-6),
    ("weight_decay", 0.1, "optim.weight_decay", 0.1),
    ("adam_beta1", 0.8, "optim.betas", (0.8, 0.999)),
    ("adam_beta2", 0.95, "optim.betas", (0.9, 0.95)),
    ("max_grad_norm", 0.5, "optim.grad_clip", 0.5),
    ("warmup_steps", 10, "optim.warmup_steps", 10),
    ("lr_scheduler_type", "cosine", "optim.schedule", "cosine"),
    ("num_iterations", 2, "train.epochs", 2),
    ("max_steps", 100, "train.steps", 100),
    ("seed", 7, "seed", 7),
    ("gradient_accumulation_steps", 2, "train.grad_accum", 2),  # 8 x 2 completions -> 2 prompts of 8
    ("per_device_train_batch_size", 16, "rollout.prompts_per_step", 2),  # 16 x 1 / 8
    ("steps_per_generation", 4, "train.minibatches", 4),  # 8 x 4 / 8 = 4 prompts; 4 / 1 minibatches
    ("use_vllm", True, "correction.name", "sequence_mis"),  # TRL's default mode once vLLM is on
    ("vllm_importance_sampling_correction", False, "correction.name", "none"),  # with use_vllm (see _case)
    ("vllm_importance_sampling_mode", "token_truncate", "correction.name", "token_tis"),
    ("vllm_importance_sampling_clip_max", 2.0, "correction.kwargs.clip_max", 2.0),
    ("vllm_importance_sampling_clip_min", 0.5, "correction.kwargs.clip_min", 0.5),
]
CONTEXT = {"sapo_temperature_pos": {"loss_type": "sapo"}, "sapo_temperature_neg": {"loss_type": "sapo"},
           **{f"vespo_{k}": {"loss_type": "vespo"} for k in ("k_pos", "lambda_pos", "k_neg", "lambda_neg")},
           **{k: {"use_vllm": True} for k in ("vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
                                              "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min")}}


def _get(cfg, path):
    for part in path.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


def test_every_mapping_row_is_checked():
    assert {r[0] for r in ROWS} == set(MAPPING)


def test_defaults_are_trls():
    trl = pytest.importorskip("trl")
    fields = {f.name: f for f in dataclasses.fields(trl.GRPOConfig)}
    for name, value in TRL_DEFAULTS.items():
        assert fields[name].default == value, name


@pytest.mark.parametrize("field,value,path,expected", ROWS, ids=[r[0] for r in ROWS])
def test_field_maps_to_tilt_field(field, value, path, expected):
    trl = {**CONTEXT.get(field, {}), field: value}
    raw, notes = from_trl(trl)
    cfg = Config.model_validate(raw)
    got = _get(cfg, path)
    assert got == (tuple(expected) if isinstance(got, tuple) else expected)
    base = Config.model_validate(from_trl(CONTEXT.get(field, {}))[0])
    assert _get(base, path) != got  # the field changed something
    assert not [n for n in notes if n.startswith(field)]


def test_unmapped_fields_are_named_and_bad_values_fail():
    _, notes = from_trl({"output_dir": "x", "bf16": True, "max_steps": 5})
    assert notes == ["output_dir: not carried over (no tilt equivalent)", "bf16: not carried over (no tilt equivalent)"]
    with pytest.raises(ConfigError, match="loss_type='ppo'.*valid: grpo"):
        from_trl({"loss_type": "ppo"})
    with pytest.raises(ConfigError, match="not a multiple of num_generations"):
        from_trl({"per_device_train_batch_size": 6, "num_generations": 4})


# The GRPO example of TRL's docs (docs/source/grpo_trainer.md "Quick start", as a YAML of GRPOConfig fields)
# with the batch shrunk for a CPU test.
TRL_YAML = """\
output_dir: Qwen2-0.5B-GRPO
learning_rate: 1.0e-6
per_device_train_batch_size: 4
num_generations: 4
max_completion_length: 8
loss_type: dr_grpo
beta: 0.04
epsilon_high: 0.28
scale_rewards: false
max_steps: 1
logging_steps: 10
"""


def test_cli_converts_and_the_converted_config_trains(tmp_path, tiny_llama_dir):
    src, dst = tmp_path / "grpo.yaml", tmp_path / "tilt.yaml"
    src.write_text(TRL_YAML)
    res = runner.invoke(app, ["config", "from-trl", str(src), "--out", str(dst)])
    assert res.exit_code == 0, res.output
    assert "output_dir: not carried over" in res.output
    raw = yaml.safe_load(dst.read_text())
    assert raw["loss"]["name"] == "dr_grpo" and raw["kl"]["estimator"] == "k3_is" and raw["train"]["steps"] == 1
    from tilt.trainer import train

    cfg = load_config(dst, [f"model.path={tiny_llama_dir}", f"run_dir={tmp_path / 'run'}", "tasks.mix=addition:1",
                            "tasks.eval_per_cell=1", "eval.n_samples=1", "eval.max_new_tokens=4", "threads=1",
                            "log.tensorboard=false", "log.plot=false", "log.progress=none"])
    train(cfg, reward_fns=[lambda prompts, completions, **_: [float(len(c) % 2) for c in completions]],
          echo=lambda _: None)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in rows if r["step"] == 1][0]
    assert torch.isfinite(torch.tensor(step["loss"])) and step["kl/mean"] >= 0
    assert runner.invoke(app, ["config", "from-trl", str(tmp_path / "missing.yaml")]).exit_code == 2


def test_first_step_loss_equals_trl_on_the_same_model_and_batch(tmp_path, tiny_llama_dir):
    """The learner built from the converted config and TRL's ``_compute_loss`` (on a stub holding the
    converted settings, with TRL's own ``_get_per_token_logps_and_entropies`` and fused LM head on the
    same model) give the same loss and gradient on one batch."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    trl_utils = pytest.importorskip("trl.trainer.utils")
    from tilt.learner import LearnerBatch
    from tilt.reduction import reduction_denominator
    from tilt.rollout import SamplingParams, generate
    from tilt.trainer import build

    src = tmp_path / "grpo.yaml"
    src.write_text(TRL_YAML)
    from tilt.trl_compat import convert_file

    text, _ = convert_file(src)
    (tmp_path / "tilt.yaml").write_text(text)
    cfg = load_config(tmp_path / "tilt.yaml", [f"model.path={tiny_llama_dir}", "model.dtype=float64", "threads=1",
                                               "train.micro_batch_tokens=null"])
    parts = build(cfg, reward_fns=[lambda prompts, completions, **_: [0.0] * len(completions)])
    model, tok = parts.policy.model, parts.policy.tokenizer
    prompts = [p for p in ["12+34=", "56+78="] for _ in range(4)]  # equal lengths: no prompt padding
    enc = tok(prompts, return_tensors="pt")
    ids, pmask = enc["input_ids"], enc["attention_mask"]
    rb = generate(model, ids, pmask, params=SamplingParams(8), eos_id=parts.policy.eos_id,
                  pad_id=parts.policy.pad_id, generator=torch.Generator().manual_seed(0))
    n, t = rb.completion_ids.shape
    adv = torch.tensor([1.0, -0.5, 0.3, -0.8, 0.6, -1.2, 0.2, 0.4], dtype=torch.float64)
    old = rb.logprobs.double() - 0.3 * torch.rand(n, t, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = rb.logprobs.double() + 0.2
    batch = LearnerBatch(prompt_ids=ids, prompt_mask=pmask, completion_ids=rb.completion_ids,
                         completion_mask=rb.completion_mask, old_logp=old * rb.completion_mask,
                         advantages=adv[:, None].expand(n, t) * rb.completion_mask, rewards=torch.zeros(n),
                         group_index=torch.arange(2).repeat_interleave(4), ref_logp=ref)
    learner = parts.learner
    mask = rb.completion_mask.double()
    loss, _ = learner.micro_loss(batch, reduction_denominator(mask, learner.reduction, max_len=learner.max_len))
    g_tilt = torch.autograd.grad(loss, list(model.parameters()))

    args = SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=1)
    stub = SimpleNamespace(
        args=args, loss_type="dr_grpo", beta=0.04, epsilon_low=0.2, epsilon_high=0.28, importance_sampling_level="token",
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, aux_loss_enabled=False, _entropy_bonus_enabled=False,
        max_completion_length=8, current_gradient_accumulation_steps=1, model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction="sum": x,
                                    autocast=contextlib.nullcontext, is_main_process=True),
        _metrics={"train": defaultdict(list)})
    # TRL's own log-prob pass: its fused LM head patched onto the same model (the plain forward is unchanged)
    trl_utils.add_fused_lm_head(model, temperature=cfg.rollout.temperature, outputs=("log_probs", "entropy"))
    stub._get_per_token_logps_and_entropies = functools.partial(
        trl_grpo.GRPOTrainer._get_per_token_logps_and_entropies, stub)
    inputs = {"prompt_ids": ids, "prompt_mask": pmask, "completion_ids": rb.completion_ids,
              "completion_mask": rb.completion_mask, "advantages": adv, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    trl_loss = trl_grpo.GRPOTrainer._compute_loss(stub, model, inputs)
    g_trl = torch.autograd.grad(trl_loss, list(model.parameters()))
    torch.testing.assert_close(loss.detach(), trl_loss.detach(), rtol=0, atol=1e-6)
    for a, b in zip(g_tilt, g_trl):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert max(float(g.abs().max()) for g in g_trl) > 1e-4


def test_docs_table_lists_every_mapping_row():
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "trl.md").read_text()
    for field, target in MAPPING.items():
        assert f"| `{field}` | `{TRL_DEFAULTS[field]!r}` | {target} |" in doc, field
