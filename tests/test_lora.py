"""LoRA through peft on a small Llama and a small Qwen2 built here (issue 18, item 1).

After a few RL steps: only adapter parameters changed; the reference (same module, adapters
disabled) gives exactly the base model's log-probs; the saved adapter (``PeftModel``) and the
merged model (``AutoModelForCausalLM``) reproduce the trained policy's log-probs (atol 1e-5, fp32);
sampled log-probs equal teacher-forced ones (the lean decoder must not skip the adapters).
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tilt.config import ConfigError, load_config
from tilt.model import build_llama, load_policy
from tilt.rollout import sequence_logprobs
from tilt.trainer import build, rollout_step, save_final
from tilt.wiring.sampling import TrainStream

peft = pytest.importorskip("peft")

SETS = ["threads=1", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=6",
        "tasks.mix=addition:1", "optim.lr=0.02", "kl.beta=0.1", "train.minibatches=1",
        "model.lora.enabled=true", "model.lora.r=4", "model.lora.save_merged=true"]


def _qwen2(path, tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base_dir(request, tmp_path_factory, char_tok):
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        build_llama(len(char_tok), hidden=32, layers=2, heads=2, intermediate=64, seed=0).save_pretrained(str(d))
        char_tok.save_pretrained(str(d))
    else:
        _qwen2(d, char_tok)
    return d


def count_sevens(prompts, completions, **columns):
    """A reward that varies between the random model's completions, so advantages are not all 0."""
    return [float(c.count("7")) for c in completions]


def _logp(model, rb):
    with torch.no_grad():
        return sequence_logprobs(model, rb.prompt_ids, rb.prompt_mask, rb.completion_ids, rb.completion_mask)[0]


def test_lora_trains_only_adapters_and_saves_loadable_adapter_and_merged_model(base_dir, tmp_path):
    cfg = load_config(None, [f"model.path={base_dir}", *SETS])
    parts = build(cfg, reward_fns=[count_sevens])
    model = parts.policy.model
    assert isinstance(model, peft.PeftModel)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # peft's default targets for llama / qwen2 are q_proj and v_proj: 2 layers x 2 modules x (A, B)
    assert len(trainable) == 8 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    stream = TrainStream(cfg.tasks.mix, offset=0)
    for step in (1, 2, 3):
        batch, metrics, _ = rollout_step(parts, cfg, stream, step)
        parts.learner.update(batch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable  # only adapter weights moved (B starts at 0, A moves after B)
    assert any(".lora_B." in n for n in changed)

    rb = batch  # the last step's prompts and completions
    model.eval()
    pol = _logp(model, rb)  # [N, T]
    # sampling log-probs equal teacher-forced ones (the adapters are in the sampled distribution);
    # the last update moved the policy after sampling, so re-sample one batch with the final weights
    batch2, _, _ = rollout_step(parts, cfg, stream, 4)
    model.eval()
    m2 = batch2.completion_mask.bool()
    assert torch.allclose(_logp(model, batch2)[m2], batch2.old_logp[m2], atol=1e-5)

    base = load_policy(str(base_dir)).model
    ref = _logp(parts.ref_model, rb)
    # reference = base model: bit for bit at every completion position the model computes from the
    # KV cache; the first position's logits come from the LM head applied at the last prompt position
    # only (logits_to_keep=1), where peft's wrapped model rounds the last bit differently (1.2e-7 seen)
    assert torch.equal(ref[:, 1:], _logp(base, rb)[:, 1:])
    assert torch.allclose(ref, _logp(base, rb), rtol=0, atol=1e-6)
    m = rb.completion_mask.bool()
    assert (pol - ref)[m].abs().max() > 1e-3  # the adapters changed the policy

    final = save_final(parts, tmp_path, merged=cfg.model.lora.save_merged)
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(final)).eval()
    assert torch.allclose(_logp(loaded, rb)[m], pol[m], atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(str(final / "merged")).eval()
    assert torch.allclose(_logp(merged, rb)[m], pol[m], atol=1e-5)
    # `tilt eval RUN` loads final/ through load_policy: the adapter on its recorded base, merged
    assert torch.allclose(_logp(load_policy(str(final)).model, rb)[m], pol[m], atol=1e-5)
    # the merge worked on a copy: the policy is still a peft model with its adapters
    assert torch.equal(_logp(model, rb), pol)


def test_lora_checkpoint_holds_only_the_adapter(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    from tilt.checkpoint import save_checkpoint
    from tilt.models.lora import checkpoint_view

    parts = build(load_config(None, [f"model.path={tiny_llama_dir}", *SETS]))
    view = checkpoint_view(parts.policy.model)
    path = save_checkpoint(tmp_path, 1, model=view, optimizer=parts.learner.optimizer,
                           scheduler=parts.learner.scheduler, generator=parts.generator, trainer_state={})
    saved = load_file(str(path / "model.safetensors"))
    # tiny Llama: 2 layers x {q_proj, v_proj} x {lora_A, lora_B} = 8 tensors, nothing of the base
    assert len(saved) == 8 and all("lora_" in k for k in saved)
    # loading writes into the policy's own parameters
    name = next(k for k in saved if "lora_B" in k)
    saved[name] = torch.full_like(saved[name], 0.5)
    view.load_state_dict(saved)
    assert bool((dict(parts.policy.model.named_parameters())[name.removeprefix("adapter.").replace("/", ".")]
                 == 0.5).all())


def test_lora_unknown_target_module_is_a_config_error(tiny_llama_dir):
    cfg = load_config(None, [f"model.path={tiny_llama_dir}", *SETS, "model.lora.target_modules=[qkv_proj]"])
    with pytest.raises(ConfigError, match=r"(?s)target_modules.*qkv_proj.*not found.*q_proj"):
        build(cfg)


def test_lora_on_a_module_kind_peft_cannot_wrap_is_a_config_error(tiny_llama_dir):
    cfg = load_config(None, [f"model.path={tiny_llama_dir}", *SETS, "model.lora.target_modules=[input_layernorm]"])
    with pytest.raises(ConfigError, match=r"(?s)peft cannot wrap.*not supported"):
        build(cfg)


def test_lora_on_a_model_type_peft_has_no_defaults_for_is_a_config_error(tmp_path, char_tok):
    from transformers import Olmo2Config, Olmo2ForCausalLM

    Olmo2ForCausalLM(Olmo2Config(vocab_size=len(char_tok), hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=0)).save_pretrained(str(tmp_path))
    char_tok.save_pretrained(str(tmp_path))
    cfg = load_config(None, [f"model.path={tmp_path}", *SETS])
    with pytest.raises(ConfigError, match=r"(?s)peft cannot wrap.*olmo2.*target_modules.*q_proj"):
        build(cfg)


@pytest.mark.slow
def test_killed_lora_run_resumes_to_identical_metrics(tmp_path, tiny_llama_dir):
    """SIGKILL after step 3 (checkpoint of step 2 on disk), resume: metrics equal an uninterrupted run's."""
    import json
    import os
    import signal

    from test_resume import TIMING_KEYS, _cli, _wait_for

    (tmp_path / "lora_reward.py").write_text(
        "def count_sevens(prompts, completions, **columns):\n"
        "    return [float(c.count('7')) for c in completions]\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    args = [f"--set={s}" for s in SETS + [f"model.path={tiny_llama_dir}", "train.steps=5", "checkpoint.every=2",
                                          "tasks.eval_per_cell=2", "eval.every=0", "log.tensorboard=false",
                                          "log.plot=false", "reward.functions=[lora_reward:count_sevens]"]]

    def rows(run):
        return [{k: v for k, v in json.loads(ln).items() if k not in TIMING_KEYS}
                for ln in (run / "metrics.jsonl").read_text().splitlines()]

    _cli(args + ["--run-dir", str(tmp_path / "ref")], env)
    run = tmp_path / "killed"
    proc = _cli(args + ["--run-dir", str(run)], env, wait=False)
    try:
        _wait_for(lambda: (run / "metrics.jsonl").exists() and '"step": 3' in (run / "metrics.jsonl").read_text()
                  or proc.poll() is not None)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the child must have been killed, not finished"
    _cli(["--resume", str(run)], env)
    assert rows(run) == rows(tmp_path / "ref")
    assert [r["step"] for r in rows(run)] == [0, 1, 2, 3, 4, 5]
    assert any(r.get("kl/mean", 0) > 0 for r in rows(run))  # the adapters moved the policy off the reference
    assert (run / "final" / "adapter_model.safetensors").exists() and (run / "final" / "merged").is_dir()
