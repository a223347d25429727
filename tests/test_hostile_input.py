"""Tracebacks and silent acceptance turned into clear errors and warnings (issue 16 cases 9, 10)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tilt.config import ConfigError, load_config
from tilt.model import ModelLoadError, build_llama, load_policy
from tilt.run_checks import check_batch_shape
from tilt.trainer import train

TINY = ["train.steps=1", "rollout.prompts_per_step=2", "tasks.eval_per_cell=1", "tasks.mix=addition:1",
        "log.tensorboard=false", "log.plot=false", "log.progress=none", "threads=1", "eval.every=0"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tilt.cli", *args], capture_output=True, text=True, timeout=300)


def test_negative_threads_is_a_config_error_not_a_runtime_traceback():
    out = _cli("train", "--set", "threads=-1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "threads" in out.stderr and "-1" in out.stderr and "greater than or equal to 1" in out.stderr


def test_run_dir_naming_a_file_is_a_clear_error(tmp_path, tiny_llama_dir):
    f = tmp_path / "afile"
    f.write_text("x")
    out = _cli("train", "--set", f"model.path={tiny_llama_dir}", "--run-dir", str(f))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"run directory {str(f)!r} is an existing file" in out.stderr


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_model_dir_with_damaged_weights_is_a_model_load_error(tmp_path, tiny_llama_dir, damage):
    d = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2] if damage == "truncated" else bytes(range(256)) * 40)
    with pytest.raises(ModelLoadError, match="could not load the weights in .*model.*the weights file is truncated"):
        load_policy(str(d))
    out = _cli("train", "--set", f"model.path={d}", "--run-dir", str(tmp_path / "r"))
    assert out.returncode == 2 and "Traceback" not in out.stderr and "could not load the weights" in out.stderr


def test_tokenizer_larger_than_the_embedding_is_refused_at_load(tmp_path, char_tok):
    d = tmp_path / "model"
    build_llama(len(char_tok) - 5, hidden=32, layers=1, heads=2, intermediate=64).save_pretrained(str(d))
    char_tok.save_pretrained(str(d))
    with pytest.raises(ModelLoadError, match=f"has {len(char_tok)} tokens but the model's embedding has only "
                                             f"{len(char_tok) - 5} rows"):
        load_policy(str(d))


def test_group_size_one_with_group_relative_advantage_warns(tmp_path, tiny_llama_dir):
    msgs: list[str] = []
    cfg = load_config(None, [f"model.path={tiny_llama_dir}", f"run_dir={tmp_path / 'r'}", "rollout.group_size=1",
                             "train.minibatches=1", *TINY])
    train(cfg, echo=msgs.append)
    warn = [m for m in msgs if m.startswith("warning:")]
    assert len(warn) == 1 and "group-relative advantage 'grpo'" in warn[0] and "every advantage is 0" in warn[0]


@pytest.mark.parametrize("adv,warns", [("grpo", True), ("rloo", True), ("dr_grpo", True), ("reinforce_pp", False),
                                       ("reinforce_pp_baseline", False), ("gae", False)])
def test_which_advantages_count_as_group_relative(adv, warns):
    """Measured: two one-completion groups with rewards 1 and 0. grpo/dr_grpo: r - mean_g r = 0;
    rloo: mean over G-1 = 0 others is NaN; reinforce_pp whitens over the batch: (1-0.5)/0.707 != 0;
    reinforce_pp_baseline keeps baseline 0 for a single completion, so r survives."""
    cfg = load_config(None, ["rollout.group_size=1", "train.minibatches=1", f"advantage.name={adv}"])
    assert bool(check_batch_shape(cfg)) is warns


@pytest.mark.parametrize("by,rows", [("row", 4), ("group", 2)])
def test_more_minibatches_than_rows_is_an_error_before_the_run_dir_exists(tmp_path, tiny_llama_dir, by, rows):
    run = tmp_path / "r"
    # prompts_per_step=2 x group_size=2: 4 rows, or 2 groups when minibatching by group
    cfg = load_config(None, [f"model.path={tiny_llama_dir}", f"run_dir={run}", "rollout.group_size=2",
                             f"train.minibatch_by={by}", "train.minibatches=5", *TINY])
    with pytest.raises(ConfigError, match=f"train.minibatches=5 exceeds the {rows} .* at most {rows}"):
        train(cfg, echo=lambda s: None)
    assert not run.exists()
