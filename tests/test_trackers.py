"""W&B and trackio backends, in their offline modes: each records exactly metrics.jsonl's keys."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tilt.config import ConfigError
from tilt.trackers import make_trackers


def wandb_history(path: Path) -> list[dict]:
    """History rows of an offline ``run-*.wandb`` file: W&B's LevelDB-style log of protobuf Records
    (7-byte file header; records in 32 KiB blocks, each with a 7-byte header of crc32 (4), length (2,
    little-endian) and kind (1: full, 2: first, 3: middle, 4: last fragment))."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf, rows = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: zero padding
            pos += block - pos % block
            continue
        n, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


@pytest.mark.slow
def test_cli_run_with_wandb_and_trackio_offline_logs_the_jsonl_keys(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp_path / "trackio"),
           "TILT_PROJECT": "tilt-test", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "tilt.cli", "train", "--run-dir", str(run), "--set", "train.steps=3",
           "--set", "rollout.prompts_per_step=2", "--set", "rollout.group_size=2", "--set", "tasks.eval_per_cell=2",
           "--set", "tasks.mix=addition:1", "--set", "log.tensorboard=false", "--set", "log.progress=none",
           "--set", "threads=1", "--set", "log.backends=[wandb, trackio]"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: set(r) - {"step"} for r in rows}  # step 0 (eval before training), then 1..3
    assert sorted(by_step) == [0, 1, 2, 3]

    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    hist = wandb_history(files[0])
    assert {h["_step"]: {k for k in h if not k.startswith("_")} for h in hist} == by_step

    code = ("import json; from trackio.sqlite_storage import SQLiteStorage as S; "
            f"print(json.dumps(S.get_logs('tilt-test', {run.name!r}), default=str))")
    logs = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     timeout=120).stdout)
    assert {g["step"]: set(g) - {"step", "timestamp"} for g in logs} == by_step


def test_unknown_backend_lists_valid_names(tmp_path):
    with pytest.raises(ConfigError, match="unknown backend\\(s\\) \\['mlflow'\\]; valid names: trackio, wandb"):
        make_trackers(["mlflow"], tmp_path, {})


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_missing_extra_names_it(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # as if the package were not installed
    with pytest.raises(ImportError, match=f"pip install 'tilt\\[{name}\\]'"):
        make_trackers([name], tmp_path, {})
