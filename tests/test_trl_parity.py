"""tilt's loss = TRL 1.16's own ``GRPOTrainer._compute_loss``, value and gradient, for every loss type.

TRL's method is called unbound on a stub holding only the attributes it reads; its model forward
(``_get_per_token_logps_and_entropies``) is replaced by one returning log-probs computed from a
float64 logits leaf, and tilt computes its loss from the same leaf through ``tilt.trl_compat``'s
mapping (loss by TRL's name + beta * KL estimator in the loss, reduced as the learner does).
Grid: every ``loss_type`` in TRL's source x use_bias_correction_kl x beta in {0, 0.04} x
on-/off-policy (off-policy ratios in [0.5, 2], so clipping binds on both sides) x
importance_sampling_level (token, sequence), plus two-sided clipping ``delta``.
"""
import inspect
import math
import re
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

from tilt.batch import PolicyLossInput  # noqa: E402
from tilt.kl import KL_ESTIMATORS  # noqa: E402
from tilt.losses import LOSSES  # noqa: E402
from tilt.reduction import reduce_tokens, reduction_denominator  # noqa: E402
from tilt.trl_compat import TRL_LOSS_TYPES, loss_settings  # noqa: E402

D = torch.float64
N, T, V, L_MAX = 6, 5, 7, 8
LENGTHS = [5, 3, 4, 1, 5, 2]


def trl_loss_types() -> set[str]:
    """Every loss type ``_compute_loss`` branches on, read from TRL's source."""
    src = inspect.getsource(trl_grpo.GRPOTrainer._compute_loss)
    found = set()
    for clause in re.findall(r"self\.loss_type (?:==|in) (\[[^\]]*\]|\"[a-z_]+\")", src):
        found |= set(re.findall(r"\"([a-z_]+)\"", clause))
    return found


def test_every_trl_loss_type_is_covered():
    assert trl_loss_types() == set(TRL_LOSS_TYPES)
    assert set(TRL_LOSS_TYPES) <= set(LOSSES.names())


def _data(off_policy: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in LENGTHS])  # [N, T] long, as TRL's
    tokens = torch.randint(0, V, (N, T), generator=g)
    logits = torch.randn(N, T, V, generator=g, dtype=D)
    logp0 = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)  # [N, T]
    # off-policy: log pi/pi_old uniform in [-0.7, 0.7] (ratios 0.5..2); sequence means reach past log 1.2
    offset = (1.4 * torch.rand(N, T, generator=g, dtype=D) - 0.7) if off_policy else None
    return dict(
        mask=mask, tokens=tokens, logits=logits,
        old=None if offset is None else logp0 - offset,  # so that log ratio = offset at the start
        ref=logp0 + 0.5 * torch.randn(N, T, generator=g, dtype=D),
        adv=torch.tensor([1.3, -0.7, 0.4, -1.1, 0.9, -0.2], dtype=D),
    )


def _logp(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp_all = torch.log_softmax(logits, -1)  # [N, T, V]
    return logp_all.gather(-1, tokens[..., None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def trl_value_and_grad(d: dict, trl_args: dict, is_ratio=None) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``_compute_loss`` on a stub trainer; returns (loss, d loss / d logits). ``is_ratio``: TRL's
    vLLM importance-sampling ratio (turns on ``use_vllm`` and its correction)."""
    args = SimpleNamespace(**trl_args, steps_per_generation=1)
    for k in ("delta", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos",
              "vespo_k_neg", "vespo_lambda_neg", "use_bias_correction_kl"):
        if not hasattr(args, k):
            setattr(args, k, trl_grpo.GRPOConfig.__dataclass_fields__[k].default)
    eps = trl_args.get("epsilon", 0.2)
    eps_high = trl_args.get("epsilon_high")
    leaf = d["logits"].clone().requires_grad_(True)

    def forward(model, input_ids, attention_mask, logits_to_keep, **kw):
        logp, ent = _logp(leaf, d["tokens"])
        return logp, ent, None

    acc = SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                          reduce=lambda x, reduction="sum": x, sync_gradients=True)
    stub = SimpleNamespace(
        args=args, loss_type=trl_args["loss_type"], beta=trl_args.get("beta", 0.0),
        epsilon_low=eps, epsilon_high=eps if eps_high is None else eps_high,
        importance_sampling_level=trl_args.get("importance_sampling_level", "token"),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=is_ratio is not None, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, max_completion_length=L_MAX, current_gradient_accumulation_steps=1, accelerator=acc,
        model=SimpleNamespace(training=True), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=forward,
        get_off_policy_mask=trl_grpo.GRPOTrainer.get_off_policy_mask,
        get_gamma_weights=trl_grpo.GRPOTrainer.get_gamma_weights,
    )
    inputs = {"prompt_ids": torch.zeros(N, 1, dtype=torch.long), "prompt_mask": torch.ones(N, 1, dtype=torch.long),
              "completion_ids": d["tokens"], "completion_mask": d["mask"], "advantages": d["adv"],
              "num_items_in_batch": d["mask"].sum()}
    if d["old"] is not None:
        inputs["old_per_token_logps"] = d["old"]
    if stub.beta != 0.0:
        inputs["ref_per_token_logps"] = d["ref"]
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = trl_grpo.GRPOTrainer._compute_loss(stub, None, inputs)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def tilt_value_and_grad(d: dict, trl_args: dict, weight=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """tilt's loss from ``loss_settings(trl_args)``, composed as tilt.learner.Learner.micro_loss:
    per-token loss (x the correction ``weight`` [N, T] if given) + beta * KL estimator, then the
    loss's reduction over the batch."""
    s = loss_settings(trl_args)
    entry = LOSSES.entry(s["loss"]["name"])
    leaf = d["logits"].clone().requires_grad_(True)
    logp, ent = _logp(leaf, d["tokens"])
    mask = d["mask"].to(D)
    old = logp.detach() if d["old"] is None else d["old"]
    inp = PolicyLossInput(logp=logp, old_logp=old, advantages=d["adv"][:, None].expand(N, T), mask=mask,
                          ref_logp=d["ref"], entropy=ent)
    per_token, metrics = entry.fn(inp, **s["loss"]["kwargs"])  # [N, T]
    if weight is not None:
        per_token = per_token * weight
    kl_cfg = s["kl"]
    if kl_cfg["beta"] > 0:
        kl_entry = KL_ESTIMATORS.entry(kl_cfg["estimator"])
        extra = {k: getattr(inp, k) for k in kl_entry.meta.get("needs", ())}
        per_token = per_token + kl_cfg["beta"] * kl_entry.fn(logp, d["ref"], **extra, **kl_cfg["kwargs"])
    mode = entry.meta["reduction"]
    loss = reduce_tokens(per_token, mask, mode=mode, denominator=reduction_denominator(mask, mode, max_len=L_MAX))
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, metrics


def _grid():
    for loss_type in TRL_LOSS_TYPES:
        levels = ("token",) if loss_type == "vespo" else ("token", "sequence")  # TRL: vespo is token-level
        for level in levels:
            for bias in (True, False):
                for beta in (0.0, 0.04):
                    for off in (False, True):
                        yield loss_type, level, bias, beta, off


@pytest.mark.parametrize("loss_type,level,bias,beta,off", list(_grid()))
def test_loss_and_gradient_equal_trl(loss_type, level, bias, beta, off):
    trl_args = {"loss_type": loss_type, "importance_sampling_level": level, "use_bias_correction_kl": bias,
                "beta": beta, "epsilon": 0.2, "epsilon_high": 0.28 if loss_type != "cispo" else 1.1,
                "max_completion_length": L_MAX}
    d = _data(off)
    v_trl, g_trl = trl_value_and_grad(d, trl_args)
    v_tilt, g_tilt, metrics = tilt_value_and_grad(d, trl_args)
    torch.testing.assert_close(v_tilt, v_trl, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_tilt, g_trl, rtol=0, atol=1e-6)
    assert g_trl.abs().max() > 1e-3  # a real gradient, not two zeros
    if off and loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo"):
        assert metrics["clip/frac"] > 0  # the clip binds somewhere


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_two_sided_clipping_delta_equals_trl(loss_type):
    """INTELLECT-2's delta (TRL ``GRPOConfig.delta``) caps the ratio of negative-advantage tokens."""
    trl_args = {"loss_type": loss_type, "delta": 1.3, "beta": 0.04, "epsilon_high": 0.28,
                "max_completion_length": L_MAX}
    d = _data(True, seed=3)
    v_trl, g_trl = trl_value_and_grad(d, trl_args)
    v_tilt, g_tilt, _ = tilt_value_and_grad(d, trl_args)
    torch.testing.assert_close(v_tilt, v_trl, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_tilt, g_trl, rtol=0, atol=1e-6)
    no_delta = tilt_value_and_grad(d, {**trl_args, "delta": None})[0]
    assert not math.isclose(float(no_delta), float(v_tilt), abs_tol=1e-6)  # delta binds on this batch


@pytest.mark.parametrize("mode", ["token_tis", "token_mis", "sequence_tis", "sequence_mis"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_correction_placement_equals_trl_vllm_importance_sampling(loss_type, mode):
    """TRL multiplies the per-token loss by its vLLM IS ratio before adding the KL term; tilt's learner
    multiplies by the correction weight at the same place. Same weights in -> same loss and gradient."""
    from tilt.corrections import CORRECTIONS

    d = _data(True, seed=5)
    g = torch.Generator().manual_seed(9)
    sampler = d["old"] + 0.4 * torch.randn(N, T, generator=g, dtype=D)  # the engine's log-probs
    mask = d["mask"].to(D)
    weight, _ = CORRECTIONS.get(mode)(d["old"], sampler, mask, clip_max=1.5)  # [N, T]
    assert (weight * mask != mask).any()  # the correction changes something
    is_ratio = weight[:, :1] if mode.startswith("sequence") else weight  # TRL's [N, 1] for sequence modes
    trl_args = {"loss_type": loss_type, "beta": 0.04, "epsilon_high": 0.28 if loss_type != "cispo" else 1.5,
                "max_completion_length": L_MAX}
    v_trl, g_trl = trl_value_and_grad(d, trl_args, is_ratio=is_ratio)
    v_tilt, g_tilt, _ = tilt_value_and_grad(d, trl_args, weight=weight)
    torch.testing.assert_close(v_tilt, v_trl, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_tilt, g_trl, rtol=0, atol=1e-6)
