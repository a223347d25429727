"""A method added from outside the package, trained from the CLI config with no change to tilt
(docs/adding_a_method.md walks through this example), and how its needs and settings are checked."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tilt.config import ConfigError, load_config
from tilt.legacy_config import MovedFieldWarning
from tilt.tracking import TIMING_KEYS
from tilt.wiring.resolve import resolve

PLUGIN = str(Path(__file__).parent / "plugins" / "teacher_anchored.py")
SETS = ["train.steps=4", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=6",
        "tasks.mix=addition:1", "tasks.eval_per_cell=1", "eval.n_samples=1", "eval.max_new_tokens=6",
        "log.tensorboard=false", "log.plot=false", "log.progress=none", "threads=1", "optim.lr=0.01",
        "checkpoint.every=2", "checkpoint.keep=3", "kl.beta=0", f"plugins=[{PLUGIN}]",
        "loss.name=teacher_anchored_pg", "loss.kwargs={coef: 0.2, target_kl: 0.05}"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tilt.cli", *args], capture_output=True, text=True, timeout=600)


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMING_KEYS}
            for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_plugin_method_trains_from_the_cli_and_resumes_exactly(tmp_path, tiny_llama_dir, teacher_dir):
    full = tmp_path / "full"
    args = [f"--set={s}" for s in SETS + [f"model.path={tiny_llama_dir}", f"teacher.path={teacher_dir}"]]
    out = cli("train", "--run-dir", str(full), *args)
    assert out.returncode == 0, out.stderr[-2000:]
    got = [r for r in rows(full) if r["step"] > 0]
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    # the state moved as the controller says: c_s = c_{s-1} (1 + 0.1 clip(KL_s / 0.05 - 1, -0.2, 0.2))
    coef = 0.2
    for r in got:
        coef *= 1 + 0.1 * min(max(r["teacher/kl"] / 0.05 - 1, -0.2), 0.2)
        assert r["teacher/coef"] == pytest.approx(coef, rel=1e-12)
    assert got[0]["teacher/kl"] > 0  # the teacher's logits reached the loss
    before, after = load_file(str(tiny_llama_dir / "model.safetensors")), load_file(str(full / "final" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    state = json.loads((full / "checkpoints" / "step_0000002" / "trainer_state.json").read_text())
    assert state["teacher_anchored"]["coef"] == pytest.approx(got[1]["teacher/coef"], rel=1e-12)
    # killed right after checkpoint 2, then resumed from the CLI: the same metrics as uninterrupted
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for d in (cut / "checkpoints").glob("step_*"):
        if d.name != "step_0000002":
            shutil.rmtree(d)
    (cut / "checkpoints" / "latest").write_text("step_0000002")
    shutil.rmtree(cut / "final")
    (cut / "summary.json").unlink()
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(ln for ln in lines if json.loads(ln)["step"] <= 2) + "\n")
    out = cli("train", "--resume", str(cut))
    assert out.returncode == 0, out.stderr[-2000:]
    assert rows(cut) == rows(full)


def test_a_need_no_provider_supplies_names_the_need_and_the_method():
    cfg = load_config(None, [f"plugins=[{PLUGIN}]", "loss.name=needs_an_unknown_input"])
    with pytest.raises(ConfigError, match="loss 'needs_an_unknown_input' needs 'gold_logits', which no provider "
                                          "supplies .*register one with tilt.providers.provides"):
        resolve(cfg)


def test_teacher_need_without_teacher_path_says_what_to_set():
    cfg = load_config(None, [f"plugins=[{PLUGIN}]", "loss.name=teacher_anchored_pg"])
    with pytest.raises(ConfigError, match="loss 'teacher_anchored_pg' needs teacher logits: set teacher.path"):
        resolve(cfg)


def test_method_settings_are_checked_against_function_provider_and_state_signatures():
    base = [f"plugins=[{PLUGIN}]", "loss.name=teacher_anchored_pg", "teacher.path=shipped"]
    plan = resolve(load_config(None, base + ["loss.kwargs={coef: 0.3, gain: 0.5}"]))
    state = plan.methods["loss"].state
    assert (state.coef, state.target, state.gain) == (0.3, 0.5, 0.5)  # coef shared with the loss; target default
    assert plan.methods["loss"].fn_kwargs == {"coef": 0.3}  # gain goes to the state only
    with pytest.raises(ConfigError, match="unknown keyword 'gian'.*allowed: coef, eps, target_kl, gain"):
        resolve(load_config(None, base + ["loss.kwargs={gian: 0.5}"]))
    with pytest.raises(ConfigError, match="loss.kwargs.target_kl: 'teacher_anchored_pg' expects float, got 'big'"):
        resolve(load_config(None, base + ["loss.kwargs={target_kl: big}"]))
    with pytest.raises(ConfigError, match="target_kl must be > 0"):
        resolve(load_config(None, base + ["loss.kwargs={target_kl: -1.0}"]))


def test_provider_settings_come_from_the_method_kwargs_with_shared_defaults():
    plan = resolve(load_config(None, ["advantage.name=spo_chain", "advantage.kwargs={continuations: 2}", "kl.beta=0"]))
    [(cls, names, settings)] = plan.providers
    # continuations configured; prob_threshold is also spo_chain's own keyword: its default (0.9) is shared
    assert names == {"mc_values"} and settings == {"continuations": 2, "prob_threshold": 0.9}
    plan = resolve(load_config(None, ["loss.name=astar_po", "loss.kwargs={beta: 0.3}", "kl.beta=0"]))
    settings = {cls.__name__: s for cls, _, s in plan.providers}["OptimalValue"]
    assert settings == {"beta": 0.3}  # V*'s beta defaults to the loss's beta


def test_moved_config_fields_are_translated_with_a_warning_or_dropped_at_their_old_default(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("loss: {name: aer, aer_tau: 2.0, aer_lr: 0.001, prev_refresh: 10}\n"
                    "advantage: {name: gae}\nvalue: {coef: 0.25, clip_range: 0.2}\n")
    with pytest.warns(MovedFieldWarning) as caught:
        cfg = load_config(path)
    messages = sorted(str(w.message) for w in caught)
    assert messages == ["config field loss.aer_tau moved to loss.kwargs.tau; translated (loss.kwargs.tau=2.0); "
                        "update the config",
                        "config field value.coef moved to advantage.kwargs.value_coef; translated "
                        "(advantage.kwargs.value_coef=0.25); update the config"]
    assert cfg.loss.kwargs == {"tau": 2.0} and cfg.advantage.kwargs == {"value_coef": 0.25}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve(cfg)  # the translated settings are valid for aer's state and gae's value head
