"""`tilt compare`: spec validation, the parallel resumable runner (with a fake trainer) and the report."""
from __future__ import annotations

import io
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console

from tilt.compare import SpecError, expand_grid, load_spec, parse_spec, run_compare, run_grid
from tilt.compare.report import collect_runs, write_report
from tilt.compare.runner import ProgressDisplay, check_overrides, run_status, train_args
from tilt.config import parse_set

REPO = Path(__file__).resolve().parents[1]

# A stand-in for `python -m tilt.cli train`: stdlib only, so it starts in milliseconds.
FAKE_TRAINER = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path

    args = sys.argv[1:]
    assert args[0] == "train", args
    resume = "--resume" in args
    run_dir = Path(args[args.index("--resume" if resume else "--run-dir") + 1])
    out = run_dir.parent.parent
    with open(out / "calls.txt", "a") as f:
        f.write(f"{'resume' if resume else 'start'} {run_dir.name}\\n")
    if resume:
        sets = json.loads((run_dir / "config.yaml").read_text())
    else:
        sets = dict(a.split("=", 1) for a in args[args.index("--run-dir") + 2:] if a != "--set")
        (run_dir / "config.yaml").write_text(json.dumps(sets))
    print(f"fake trainer: {run_dir.name} sets={sets}", flush=True)
    barrier = os.environ.get("FAKE_BARRIER")
    if barrier:  # wait until `barrier` runs are alive at once: proves they run in parallel
        (out / "started").mkdir(exist_ok=True)
        (out / "started" / run_dir.name).touch()
        deadline = time.time() + 20
        while len(list((out / "started").iterdir())) < int(barrier):
            if time.time() > deadline:
                print("barrier timeout: runs are not running in parallel"); sys.exit(4)
            time.sleep(0.02)
    if sets.get("loss.name") == "broken":
        print("ValueError: unknown loss 'broken'"); sys.exit(2)
    if (out / "crash_once").exists() and not resume and sets.get("seed") == "1":
        (run_dir / "checkpoints" / "step_1").mkdir(parents=True)
        print("simulated crash after step 1"); sys.exit(3)
    score = float(sets.get("kl.beta", 0.0)) + 0.01 * int(sets["seed"])
    cells = {"addition:1": {"greedy": score, "pass1": score / 2, "n": 4},
             "addition:2": {"greedy": score + 0.1, "pass1": score / 2, "n": 4}}
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "eval/greedy": 0.0, "eval/pass1": 0.0}) + "\\n")
        f.write(json.dumps({"step": 1, "reward/mean": 0.3}) + "\\n")
        f.write(json.dumps({"step": 2, "eval/greedy": score, "eval/pass1": score / 2}) + "\\n")
    (run_dir / "seeds.json").write_text(json.dumps({
        "train": {"addition": {"min_seed": 1000000, "max_seed": 1000063, "count": 64, "difficulties": [1, 2]}},
        "eval": {"addition": {"min_seed": 1000000000, "max_seed": 1001000003, "count": 8, "difficulties": [1, 2]}}}))
    (run_dir / "summary.json").write_text(json.dumps({
        "complete": True, "steps": 2, "heldout": {"per_cell": cells, "greedy_after": score, "pass1_after": score / 2},
        "config_hash": "hash-" + run_dir.name, "versions": {"python": "3.x", "torch": "fake", "tilt": "0"}}))
''')


def _spec(**changes) -> dict:
    spec = {
        "name": "unit",
        "methods": {"base": {"overrides": {"kl.beta": 0.5}}, "better": {"overrides": {"kl.beta": 0.7}}},
        "seeds": [0, 1],
        "tasks": ["addition:1-2"],
        "baseline": "base",
        "metric": "greedy",
    }
    spec.update(changes)
    return spec


@pytest.fixture
def fake(tmp_path) -> tuple[str, str]:
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    return (sys.executable, str(path))


def _calls(out: Path) -> list[str]:
    return (out / "calls.txt").read_text().splitlines() if (out / "calls.txt").exists() else []


# ---------------------------------------------------------------- spec


@pytest.mark.parametrize(
    "changes, field, value",
    [
        ({"wrkers": 2}, "'wrkers'", "2"),  # misspelt top-level key
        ({"methods": {"base": {"overides": {}}}}, "'methods.base.overides'", "{}"),  # misspelt method key
        ({"baseline": "nope"}, "baseline 'nope'", "base, better"),  # unknown baseline lists the methods
        ({"seeds": []}, "'seeds'", "[]"),
        ({"seeds": "abc"}, "'seeds'", "'abc'"),  # bad type
        ({"workers": 0}, "'workers'", "0"),
        ({"metric": "best"}, "'metric'", "'best'"),
        ({"tasks": ["additon:1"]}, "'tasks'", "additon"),  # unknown task names the valid ones
        ({"tasks": ["addition:1", "addition:1"]}, "'tasks'", "not distinct"),
        ({"methods": {"a__b": {}}, "baseline": "a__b"}, "'methods'", "a__b"),
        ({"methods": {"base": {"overrides": {"seed": 3}}}}, "'methods.base.overrides'", "set per run by the grid"),
    ],
)
def test_spec_errors_name_field_and_value(changes, field, value):
    with pytest.raises(SpecError) as exc:
        parse_spec(_spec(**changes))
    assert field in str(exc.value) and value in str(exc.value)


def test_spec_file_errors_and_base_config_relative_to_spec(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "train.yaml").write_text("seed: 0\n")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(_spec(base_config="train.yaml")))
    assert load_spec(tmp_path / "spec.yaml").base_config == (tmp_path / "train.yaml").resolve()
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(_spec(base_config="nope.yaml")))
    with pytest.raises(SpecError, match="'base_config': value 'nope.yaml'"):
        load_spec(tmp_path / "bad.yaml")


def test_shipped_default_spec_loads_and_its_overrides_pass_the_trainer_config():
    spec = load_spec(REPO / "configs" / "compare" / "default.yaml")
    assert spec.baseline in spec.methods and len(spec.seeds) == 3
    check_overrides(spec)  # every loss / advantage name exists in the registries
    bad = parse_spec(_spec(methods={"base": {"overrides": {"loss.nmae": "grpo"}}}))
    with pytest.raises(SpecError, match="(?s)method .base. has overrides.*unknown field .loss.nmae."):
        check_overrides(bad)


def test_grid_names_and_train_arguments_round_trip(tmp_path):
    spec = parse_spec(_spec(tasks=["addition:1-2", "sorting:1"], steps=7,
                            methods={"base": {"overrides": {"loss.kwargs": {"clip_eps": 0.2}, "log.plot": False}}}))
    runs = expand_grid(spec, tmp_path)
    assert [r.name for r in runs] == ["base__addition-1-2__seed0", "base__addition-1-2__seed1",
                                      "base__sorting-1__seed0", "base__sorting-1__seed1"]
    args = train_args(runs[2], resume=False)
    assert args[:3] == ["train", "--run-dir", str(tmp_path / "runs" / "base__sorting-1__seed0")]
    sets = [a for a in args[3:] if a != "--set"]
    # the trainer's own --set parser gets back exactly the values of the spec
    assert parse_set(sets) == {"loss": {"kwargs": {"clip_eps": 0.2}}, "log": {"plot": False}, "seed": 0,
                               "tasks": {"mix": "sorting:1"}, "train": {"steps": 7}}
    assert train_args(runs[2], resume=True) == ["train", "--resume", str(runs[2].run_dir)]


# ---------------------------------------------------------------- runner


def test_runs_in_parallel_and_second_invocation_skips_finished_runs(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("FAKE_BARRIER", "3")  # each fake run waits until 3 runs are alive at once
    spec = parse_spec(_spec(seeds=[0, 1, 2], methods={"base": {"overrides": {"kl.beta": 0.5}}}))
    out = tmp_path / "out"
    first = run_grid(spec, out, command=fake, workers=3, progress=lambda *a: None)
    assert first.failed == {} and sorted(first.finished) == [f"base__addition-1-2__seed{s}" for s in range(3)]
    assert first.exit_code == 0 and len(_calls(out)) == 3
    assert all(run_status(r.run_dir) == "done" for r in expand_grid(spec, out))
    second = run_grid(spec, out, command=fake, workers=3, progress=lambda *a: None)
    assert second.finished == [] and len(second.skipped) == 3
    assert len(_calls(out)) == 3  # nothing was launched again


def test_killed_run_is_resumed_and_failing_run_does_not_stop_others(tmp_path, fake):
    out = tmp_path / "out"
    out.mkdir()
    (out / "crash_once").touch()  # seed-1 runs write checkpoints/ then die on their first attempt
    spec = parse_spec(_spec(methods={"base": {"overrides": {"kl.beta": 0.5}},
                                     "broken": {"overrides": {"loss.name": "broken"}}}))
    first = run_grid(spec, out, command=fake, workers=2, progress=lambda *a: None)
    assert first.exit_code == 1
    assert first.finished == ["base__addition-1-2__seed0"]
    assert set(first.failed) == {"base__addition-1-2__seed1", "broken__addition-1-2__seed0",
                                 "broken__addition-1-2__seed1"}
    assert "exit code 3" in first.failed["base__addition-1-2__seed1"]
    assert "simulated crash after step 1" in first.failed["base__addition-1-2__seed1"]  # tail of log.txt
    assert "unknown loss 'broken'" in first.failed["broken__addition-1-2__seed0"]
    crashed = out / "runs" / "base__addition-1-2__seed1"
    assert run_status(crashed) == "interrupted"

    second = run_grid(spec, out, command=fake, workers=2, progress=lambda *a: None)
    assert "base__addition-1-2__seed1" in second.finished and second.skipped == ["base__addition-1-2__seed0"]
    assert "resume base__addition-1-2__seed1" in _calls(out)
    assert "--resume" in (crashed / "log.txt").read_text()  # both attempts are in the log
    assert run_status(crashed) == "done" and second.exit_code == 1  # "broken" still fails


def test_reusing_an_output_directory_for_a_different_spec_is_refused(tmp_path, fake):
    spec = parse_spec(_spec(seeds=[0], methods={"base": {"overrides": {"kl.beta": 0.5}}}))
    run_grid(spec, tmp_path, command=fake, workers=1, progress=lambda *a: None)
    changed = parse_spec(_spec(seeds=[0], methods={"base": {"overrides": {"kl.beta": 0.9}}}))
    with pytest.raises(SpecError, match="made by a different compare spec"):
        run_grid(changed, tmp_path, command=fake, workers=1, progress=lambda *a: None)


@pytest.mark.parametrize("tty", [False, True])
def test_progress_display_plain_lines_without_tty_and_rich_bar_with_one(tmp_path, fake, tty):
    spec = parse_spec(_spec(seeds=[0], methods={"base": {"overrides": {"kl.beta": 0.5}},
                                                "broken": {"overrides": {"loss.name": "broken"}}}))
    buf = io.StringIO()
    display = ProgressDisplay(2, 0, console=Console(file=buf, force_terminal=tty, width=200))
    result = run_grid(spec, tmp_path, command=fake, workers=1, progress=display)
    display.close()
    text = buf.getvalue()
    assert result.exit_code == 1 and "FAILED broken__addition-1-2__seed0" in text
    if tty:
        assert "2/2" in text  # the bar's runs done / total
    else:
        assert "[1/2] done base__addition-1-2__seed0 (0 running)" in text


# ---------------------------------------------------------------- report


def _hand_made_runs(out: Path, spec) -> None:
    """4 seeds x 1 task per method; method a scores 0.1..0.4, method b 0.5..0.8 (greedy)."""
    scores = {"a": [0.1, 0.2, 0.3, 0.4], "b": [0.5, 0.6, 0.7, 0.8]}
    for run in expand_grid(spec, out):
        if (run.method, run.seed) == ("b", 3):
            continue  # not finished: b keeps seeds 0-2 only
        s = scores[run.method][run.seed]
        run.run_dir.mkdir(parents=True)
        # two cells averaging to s: (s - 0.05 + s + 0.05) / 2 = s
        cells = {"addition:1": {"greedy": s - 0.05, "pass1": 0.0}, "addition:2": {"greedy": s + 0.05, "pass1": 0.0}}
        # before training: a starts 0.1 below its final score, b at 0.5 on every seed
        b0 = s - 0.1 if run.method == "a" else 0.5
        before = {"addition:1": {"greedy": b0 - 0.02, "pass1": 0.0}, "addition:2": {"greedy": b0 + 0.02, "pass1": 0.0}}
        (run.run_dir / "summary.json").write_text(json.dumps({
            "complete": True, "heldout": {"per_cell": cells, "per_cell_before": before}, "config_hash": f"h{run.method}{run.seed}",
            "versions": {"torch": "x"}}))
        (run.run_dir / "metrics.jsonl").write_text(
            json.dumps({"step": 0, "eval/greedy": 0.0}) + "\n" + json.dumps({"step": 5, "eval/greedy": s}) + "\n")
        (run.run_dir / "seeds.json").write_text(json.dumps({
            "train": {"addition": {"min_seed": 10, "max_seed": 19, "count": 10}},
            "eval": {"addition": {"min_seed": 100, "max_seed": 103, "count": 4}}}))


def test_report_tables_hold_hand_computed_numbers_and_pngs_are_written(tmp_path):
    spec = parse_spec(_spec(methods={"a": {}, "b": {}}, baseline="a", seeds=[0, 1, 2, 3], tasks=["addition:1-2"]))
    _hand_made_runs(tmp_path, spec)
    col = collect_runs(spec, tmp_path)
    assert col.missing == ["b__addition-1-2__seed3"] and col.seeds["b"] == [0, 1, 2]
    np.testing.assert_allclose(col.scores["a"][:, 0], [0.1, 0.2, 0.3, 0.4])
    res = write_report(spec, tmp_path, reps=50)
    md = (tmp_path / "report.md").read_text()
    # a: IQM of (0.1, 0.2, 0.3, 0.4) trims one value per end: (0.2 + 0.3)/2 = 0.25;
    #    optimality gap 1 - mean = 1 - 0.25 = 0.75
    assert "| a | 4 x 1 | 0.250 |" in md and "| 0.750 |" in md
    # b (seeds 0-2: 0.5, 0.6, 0.7): IQM trims int(0.25 * 3) = 0 -> mean 0.6; gap 1 - 0.6 = 0.4
    assert "| b | 3 x 1 | 0.600 |" in md and "| 0.400 |" in md
    # every b run beats every a run: P(b > a) = 1 with CI [1, 1]
    assert "| b | 1.000 | [1.000, 1.000] |" in md
    assert "| a | 0.250 |" in md and "| b | 0.600 |" in md  # per-task means
    # paired change: a gains exactly 0.1 on every run -> every bootstrap mean is 0.1, CI [0.1, 0.1];
    # a before = mean(0.0, 0.1, 0.2, 0.3) = 0.15, after 0.25. b gains 0.0, 0.1, 0.2: mean 0.1, CI inside [0, 0.2]
    assert "| a | 0.150 | 0.250 | 0.100 | [0.100, 0.100] | yes |" in md
    assert "| b | 0.500 | 0.600 | 0.100 |" in md
    low, high = res["stats"]["change"]["b"]["low"], res["stats"]["change"]["b"]["high"]
    assert 0.0 <= low < 0.1 < high <= 0.2 + 1e-12
    assert "| b__addition-1-2__seed2 | b | addition:1-2 | 2 | 0.700 | hb2 |" in md
    assert "| eval | addition | 100..103 | 4 | 7 | no |" in md and "| train | addition | 10..19 |" in md
    assert "b__addition-1-2__seed3" in md.split("## Not finished")[1]
    assert "Report written with: python" in md and '{"torch": "x"}' in md
    assert res["curves"]["a"]["steps"] == [0, 5]
    # learning-curve IQM at step 5 is the final IQM 0.25; at step 0 every run logged 0
    assert res["curves"]["a"]["iqm"] == pytest.approx([0.0, 0.25])
    for png in ("learning_curves.png", "final_iqm.png", "improvement.png", "performance_profiles.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
        assert f"]({png})" in md
    json.loads((tmp_path / "report.json").read_text())


def test_run_compare_end_to_end_with_fake_trainer(tmp_path, fake):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(workers=2)))
    out = tmp_path / "out"
    lines: list[str] = []
    code = run_compare(spec_path, out, command=fake, reps=30, validate=False, echo=lines.append)
    assert code == 0 and "4 runs: 0 already finished, 4 finished now, 0 failed" in lines
    md = (out / "report.md").read_text()
    # fake score = kl.beta + 0.01 * seed, cells +0 / +0.1 -> run score = beta + 0.01 * seed + 0.05
    # base: 0.55, 0.56 -> per-task mean 0.555; better: 0.75, 0.76 -> 0.755
    assert "| base | 0.555 |" in md and "| better | 0.755 |" in md
    assert run_compare(spec_path, out, command=fake, reps=30, validate=False, echo=lines.append) == 0
    assert "4 runs: 4 already finished, 0 finished now, 0 failed" in lines
