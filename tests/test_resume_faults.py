"""Resume never duplicates and never gives up on an intact older checkpoint (issue 16 cases 1, 3, 4, 5).

Each case starts from a copy of one finished reference run (4 steps, checkpoints at steps 2 and 4),
damages it the way a kill or a user would, resumes it in-process, and compares with the reference:
the rows of metrics.jsonl (timing keys excluded) and the final weights must be identical.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tilt.config import ConfigError, load_config
from tilt.tracking import TIMING_KEYS
from tilt.trainer import train

OVERRIDES = ["train.steps=4", "checkpoint.every=2", "checkpoint.keep=2", "rollout.prompts_per_step=2",
             "rollout.group_size=2", "tasks.eval_per_cell=1", "tasks.mix=addition:1", "threads=1",
             "log.tensorboard=false", "log.plot=false", "log.progress=none", "eval.every=0",
             "train.minibatches=1", "optim.lr=0.003"]


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    train(load_config(None, [f"model.path={tiny_llama_dir}", f"run_dir={run}", *OVERRIDES]), echo=lambda s: None)
    assert [r["step"] for r in _rows(run)] == [0, 1, 2, 3, 4]
    return run


def _interrupted_copy(reference: Path, tmp_path: Path) -> Path:
    """The reference run as a kill after its step-4 checkpoint leaves it: no summary, no final model."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()
    shutil.rmtree(run / "final")
    return run


def _resume(run: Path) -> list[str]:
    msgs: list[str] = []
    train(load_config(None, []), resume=run, echo=msgs.append)
    return msgs


def _assert_same_as(run: Path, reference: Path) -> None:
    assert _rows(run) == _rows(reference)
    ref_w, w = _weights(reference), _weights(run)
    assert ref_w.keys() == w.keys() and all(torch.equal(ref_w[k], w[k]) for k in ref_w)


def test_kill_between_first_eval_and_first_checkpoint_logs_step_0_once(reference, tmp_path):
    """Case 1: before-training eval row written, no checkpoint yet; the resume evaluates again and
    must replace that row, not add a second `step 0` row (old code: steps [0, 0, 1, 2, 3, 4])."""
    run = _interrupted_copy(reference, tmp_path)
    shutil.rmtree(run / "checkpoints")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n")  # only the step-0 eval row survived
    msgs = _resume(run)
    assert any("no checkpoint in" in m for m in msgs)
    assert [r["step"] for r in _rows(run)] == [0, 1, 2, 3, 4]
    _assert_same_as(run, reference)


def test_replayed_rows_past_the_checkpoint_are_not_duplicated(reference, tmp_path):
    """Rows of steps 3 and 4 exist beyond checkpoint step 2 (kill after logging, before saving)."""
    run = _interrupted_copy(reference, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    (run / "checkpoints" / "latest").write_text("step_0000002")
    _resume(run)
    assert [r["step"] for r in _rows(run)] == [0, 1, 2, 3, 4]
    _assert_same_as(run, reference)


@pytest.mark.parametrize("name", ["model.safetensors", "train_state.pt", "trainer_state.json"])
def test_truncated_latest_checkpoint_file_falls_back_to_the_older_one(reference, tmp_path, name):
    """Case 3: old code ended in SafetensorError / PytorchStreamReader tracebacks, or json's
    'Unterminated string' naming no file. Now: the file is named and step 2 is used."""
    run = _interrupted_copy(reference, tmp_path)
    f = run / "checkpoints" / "step_0000004" / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    msgs = _resume(run)
    bad = [m for m in msgs if "unreadable" in m]
    assert len(bad) == 1 and str(f) in bad[0] and "step_0000004" in bad[0], msgs
    assert any("resumed" in m and "step_0000002 (step 2)" in m for m in msgs), msgs
    _assert_same_as(run, reference)


def test_no_readable_checkpoint_is_an_error_naming_the_files(reference, tmp_path):
    run = _interrupted_copy(reference, tmp_path)
    for step in ("step_0000002", "step_0000004"):
        (run / "checkpoints" / step / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"no readable checkpoint.*step_0000004/model.safetensors.*"
                                          r"step_0000002/model.safetensors"):
        _resume(run)


def test_garbage_and_torn_lines_in_metrics_are_dropped_with_a_message_naming_the_file(reference, tmp_path):
    """Case 4: old code stopped with `Expecting value: line 1 column 1 (char 0)`, naming no file."""
    run = _interrupted_copy(reference, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    # garbage after row 1, and a torn (half-written) last line as a kill mid-write leaves it
    damaged = [lines[0], lines[1], "#!garbage", lines[2], lines[3][: len(lines[3]) // 2]]
    (run / "metrics.jsonl").write_text("\n".join(damaged))
    msgs = _resume(run)
    note = [m for m in msgs if "dropped 2 line(s)" in m]
    assert len(note) == 1 and str(run / "metrics.jsonl") in note[0] and "line 3, 5" in note[0], msgs
    assert (run / "metrics.jsonl.dropped").read_text().splitlines()[0] == "#!garbage"
    _assert_same_as(run, reference)


@pytest.mark.parametrize("edit,field", [("optim.lr: 0.003", "optim.lr: 0.003 -> 0.01"),
                                        ("name: grpo", "advantage.name: 'grpo' -> 'gae'")])
def test_edited_config_is_refused_naming_the_fields(reference, tmp_path, edit, field):
    """Case 5: a changed lr was silently overridden by the optimizer state; a changed method ended
    in `Unexpected key(s) in state_dict`. Now both are refused before anything loads."""
    run = _interrupted_copy(reference, tmp_path)
    text = (run / "config.yaml").read_text()
    if edit.startswith("optim"):
        new = text.replace("lr: 0.003", "lr: 0.01")
    else:  # the advantage section's name (the loss section has its own `name: grpo` first)
        head, _, tail = text.partition("advantage:")
        new = head + "advantage:" + tail.replace("name: grpo", "name: gae", 1)
    assert new != text
    (run / "config.yaml").write_text(new)
    with pytest.raises(ConfigError, match="config.yaml differs") as err:
        _resume(run)
    assert field in str(err.value)
    assert not (run / "summary.json").exists()


def test_fields_that_do_not_shape_the_run_may_change_on_resume(reference, tmp_path):
    run = _interrupted_copy(reference, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("timeout_s: 10.0", "timeout_s: 30.0"))
    _resume(run)
    _assert_same_as(run, reference)


def test_fresh_start_on_a_run_killed_before_its_first_checkpoint_starts_over(reference, tmp_path, tiny_llama_dir):
    """`tilt compare` relaunches such a run fresh (no checkpoints/): its step-0 row must not be doubled."""
    run = _interrupted_copy(reference, tmp_path)
    shutil.rmtree(run / "checkpoints")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0] + "\n")
    train(load_config(None, [f"model.path={tiny_llama_dir}", f"run_dir={run}", *OVERRIDES]), echo=lambda s: None)
    _assert_same_as(run, reference)
