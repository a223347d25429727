"""The `tilt` command: --help everywhere, config show, eval refusal of contaminated seeds."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tilt.cli import app

runner = CliRunner()
SUBCOMMANDS = [["train"], ["pretrain"], ["eval"], ["compare"], ["config"], ["config", "show"], ["decode"], ["train-value"]]


@pytest.mark.parametrize("cmd", SUBCOMMANDS, ids=lambda c: " ".join(c))
def test_help_on_every_subcommand(cmd):
    out = runner.invoke(app, [*cmd, "--help"])
    assert out.exit_code == 0, out.output
    assert "Usage" in out.output and len(out.output) > 200


def test_top_level_help_lists_subcommands():
    out = runner.invoke(app, ["--help"])
    for name in ("train", "pretrain", "eval", "compare", "config"):
        assert name in out.output


def test_config_show_prints_resolved_tree_with_overrides():
    out = runner.invoke(app, ["config", "show", "--set", "optim.lr=0.0005", "--set", "loss.name=dapo"])
    assert out.exit_code == 0, out.output
    assert "lr: 0.0005" in out.output and "name: dapo" in out.output
    docs = runner.invoke(app, ["config", "show", "--docs"])
    assert "# G: completions sampled per prompt." in docs.output


def test_config_show_bad_key_is_an_error():
    out = runner.invoke(app, ["config", "show", "--set", "rollout.groupsize=4"])
    assert out.exit_code == 2 and "rollout.groupsize" in out.output and "group_size" in out.output


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama_dir):
    from tilt.config import load_config
    from tilt.trainer import train

    run = tmp_path_factory.mktemp("run") / "r"
    cfg = load_config(None, [f"model.path={tiny_llama_dir}", f"run_dir={run}", "train.steps=2",
                             "rollout.prompts_per_step=2", "rollout.group_size=2", "tasks.eval_per_cell=3",
                             "tasks.mix=addition:1,sorting:1", "log.tensorboard=false", "log.progress=none"])
    train(cfg, echo=lambda s: None)
    return run


def test_eval_reproduces_the_runs_final_heldout_numbers(tiny_run):
    out = runner.invoke(app, ["eval", str(tiny_run), "--k", "1"])
    assert out.exit_code == 0, out.output
    report = json.loads((tiny_run / "eval.json").read_text())
    summary = json.loads((tiny_run / "summary.json").read_text())["heldout"]
    for cell, vals in summary["per_cell"].items():
        assert report["per_cell"][cell]["greedy"] == pytest.approx(vals["greedy"])
        assert report["per_cell"][cell]["pass1"] == pytest.approx(vals["pass1"])
    assert report["contaminated"] is False


def test_eval_refuses_trained_seeds_and_explains(tiny_run):
    out = runner.invoke(app, ["eval", str(tiny_run), "--split", "train"])
    assert out.exit_code == 2
    assert "refused" in out.output and "trained" in out.output and "--allow-contaminated" in out.output
    forced = runner.invoke(app, ["eval", str(tiny_run), "--split", "train", "--allow-contaminated",
                                 "--out", str(tiny_run / "contaminated.json")])
    assert forced.exit_code == 0, forced.output
    assert json.loads((tiny_run / "contaminated.json").read_text())["contaminated"] is True


def test_eval_refuses_sft_seeds_for_any_model(tiny_llama_dir):
    out = runner.invoke(app, ["eval", str(tiny_llama_dir), "--split", "sft", "--tasks", "addition:1"])
    assert out.exit_code == 2 and "refused" in out.output


def test_eval_errors(tmp_path, tiny_llama_dir):
    missing = runner.invoke(app, ["eval", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    bad_task = runner.invoke(app, ["eval", str(tiny_llama_dir), "--tasks", "divison:1"])
    assert bad_task.exit_code == 2 and "divison" in bad_task.output and "valid tasks" in bad_task.output
    unfinished = tmp_path / "run"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("seed: 0\n")
    out = runner.invoke(app, ["eval", str(unfinished)])
    assert out.exit_code == 2 and "no final model" in out.output


def test_compare_errors(tmp_path):
    missing = runner.invoke(app, ["compare", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: {a: {overrides: {}}}\nseeds: [0]\ntasks: ['addition:1']\nbaseline: zzz\n")
    out = runner.invoke(app, ["compare", str(bad), "--out", str(tmp_path / "o")])
    assert out.exit_code == 2 and "zzz" in out.output
