"""Bring-your-own data: file formats, held-out split, contamination, prompt rendering, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tilt.config import ConfigError, load_config
from tilt.data import build_source, in_heldout, prompt_hash, render
from tilt.data.seeds import data_offset
from tilt.rewards import check_signature, resolve_reward_fn
from tilt.wiring.sampling import TrainStream, row_columns

CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")


def rows(n: int = 12) -> list[dict]:
    """Reverse-a-digit-string rows; answer and level are ints, which every format keeps as int64."""
    return [{"prompt": f"rev {i}{i + 3}=", "answer": int(f"{i + 3}{i}"[::-1]) if i % 10 else i + 7,
             "level": i % 3} for i in range(1, n + 1)]


def write_all(tmp: Path, data: list[dict]) -> dict[str, Path]:
    from datasets import Dataset

    ds = Dataset.from_list(data)
    (tmp / "d.jsonl").write_text("\n".join(json.dumps(r) for r in data))
    ds.to_csv(str(tmp / "d.csv"), index=False)
    ds.to_parquet(str(tmp / "d.parquet"))
    ds.save_to_disk(str(tmp / "d_disk"))
    return {"jsonl": tmp / "d.jsonl", "csv": tmp / "d.csv", "parquet": tmp / "d.parquet", "disk": tmp / "d_disk"}


def cfg_for(path, **sets):
    over = [f"data.train.path={path}"] + [f"{k}={v}" for k, v in sets.items()]
    return load_config(None, over)


def test_formats_give_the_same_training_batches(tmp_path, char_tok):
    """JSONL, CSV, Parquet and save_to_disk of the same rows: same held-out rows, same train stream."""
    files = write_all(tmp_path, rows(20))
    seen = {}
    for fmt, path in files.items():
        src = build_source(cfg_for(path, **{"data.eval.fraction": 0.3}), char_tok)
        stream = TrainStream(src, offset=data_offset(1))
        batches = [row_columns(stream.take(4), 2) for _ in range(6)]  # 24 draws > 1 epoch of the train rows
        seen[fmt] = (batches, [(it.prompt, it.fields) for it in src.eval_items()])
    assert seen["csv"] == seen["jsonl"] and seen["parquet"] == seen["jsonl"] and seen["disk"] == seen["jsonl"]
    batches, heldout = seen["jsonl"]
    # item j of the stream and its G=2 copies are adjacent; columns carry every non-prompt column
    assert batches[0][0][0] == batches[0][0][1] and set(batches[0][1]) == {"answer", "level"}
    assert heldout and len(heldout) < 20


def test_heldout_fraction_is_a_deterministic_hash_split(tmp_path, char_tok):
    data = rows(40)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in data))
    src = build_source(cfg_for(path, **{"data.eval.fraction": 0.25}), char_tok)
    want = [r["prompt"] for r in data if in_heldout(r["prompt"], 0.25)]
    assert [it.prompt for it in src.eval_items()] == want
    train_prompts = {it.prompt for it in src.train}
    assert not train_prompts & set(want) and len(train_prompts) + len(want) == 40
    # the hash ignores case and spacing: "REV  12=" is the same prompt as "rev 12="
    assert prompt_hash("REV  12=") == prompt_hash("rev 12=") != prompt_hash("rev 13=")
    info = src.report(0, 8)["dataset"]
    assert info["eval_overlap_train"] == 0 and info["train_rows"] == 40 - len(want)


def test_overlapping_eval_source_is_refused_with_the_count(tmp_path, char_tok):
    data = rows(10)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in data))
    # 3 eval prompts repeat train prompts (one differs only in case/spacing), 2 are new
    ev = [data[0], dict(data[1], prompt=data[1]["prompt"].upper()), data[2], {"prompt": "rev 999=", "answer": 999,
          "level": 0}, {"prompt": "rev 998=", "answer": 899, "level": 1}]
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in ev))
    sets = {"data.eval.path": tmp_path / "eval.jsonl"}
    with pytest.raises(ConfigError, match="3 of 5 eval prompts also appear in the train source"):
        build_source(cfg_for(tmp_path / "train.jsonl", **sets), char_tok)
    src = build_source(cfg_for(tmp_path / "train.jsonl", **sets, **{"data.allow_contaminated": "true"}), char_tok)
    assert src.info["eval_overlap_train"] == 3 and src.info["contaminated"] is True


def test_breakdown_column_labels_eval_cells(tmp_path, char_tok):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows(30)))
    src = build_source(cfg_for(path, **{"data.eval.fraction": 0.5, "data.eval.breakdown": "level"}), char_tok)
    assert {it.task for it in src.eval_items()} <= {"level=0", "level=1", "level=2"}
    with pytest.raises(ConfigError, match="no column 'lvl'"):
        build_source(cfg_for(path, **{"data.eval.breakdown": "lvl"}), char_tok)


def test_conversational_prompt_renders_with_the_chat_template(tmp_path, char_tok):
    tok = char_tok.__class__.from_pretrained  # a copy with a chat template, the shared fixture untouched
    d = tmp_path / "tok"
    char_tok.save_pretrained(str(d))
    tok = tok(str(d))
    tok.chat_template = CHAT
    msgs = [{"role": "system", "content": "reverse the digits"}, {"role": "user", "content": "123"}]
    assert render(tok, msgs) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert render(tok, msgs) == "system: reverse the digits user: 123 assistant: "
    with pytest.raises(ConfigError, match="no chat_template"):
        render(char_tok, msgs)
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": msgs, "answer": "321"}, {"prompt": [msgs[1]], "answer": "321"}])
    ev = Dataset.from_list([{"prompt": [{"role": "user", "content": "45"}], "answer": "54"}])
    src = build_source(load_config(None, []), tok, train_dataset=ds, eval_dataset=ev)
    assert src.conversational and src.eval_items()[0].prompt == "user: 45 assistant: "
    assert src.eval_items()[0].prompt_value == [{"role": "user", "content": "45"}]


def test_unknown_characters_warn(tmp_path, char_tok):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows(8) + [{"prompt": "Reverse 12=", "answer": 21,
                                                                   "level": 0}]))
    src = build_source(cfg_for(path, **{"data.eval.fraction": 0.5}), char_tok)
    assert len(src.warnings) == 1 and "1 prompts contain characters" in src.warnings[0] and "'R'" in src.warnings[0]


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    ("", "empty"),
    ('{"question": "rev 12="}', "no prompt column 'prompt'; the columns are question"),
    ('{"prompt": "rev 12="}\n{"prompt": null}', "row 1 has an empty or null 'prompt'"),
    ('{"prompt": "rev 12="}\n{"prompt": [{"role": "user", "content": "12"}]}', "rows mix prompt types"),
    ('{"prompt": 12}', "must be a string or a list of"),
])
def test_bad_datasets_are_clear_errors(tmp_path, char_tok, content, match):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        build_source(cfg_for(path), char_tok)


def test_bad_reward_modules_and_signatures_are_clear_errors(tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_module_xyz\n")
    with pytest.raises(ValueError, match="could not be imported: ModuleNotFoundError"):
        resolve_reward_fn(f"{tmp_path / 'broken.py'}:reward")
    (tmp_path / "ok.py").write_text("def reward(prompts, completions, answer, **kw):\n"
                                    "    return [float(c == str(a)) for c, a in zip(completions, answer)]\n"
                                    "def narrow(prompts, completions):\n    return [0.0] * len(prompts)\n")
    fn = resolve_reward_fn(f"{tmp_path / 'ok.py'}:reward")
    assert fn(prompts=["p", "q"], completions=["21", "3"], answer=[21, 4]) == [1.0, 0.0]
    check_signature(fn, ["answer", "level"])
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        resolve_reward_fn(f"{tmp_path / 'ok.py'}:nope")
    with pytest.raises(ValueError, match="cannot be called as TRL and tilt call it"):
        check_signature(resolve_reward_fn(f"{tmp_path / 'ok.py'}:narrow"), ["answer"])
    with pytest.raises(ValueError, match="missing a required argument: 'answer'"):
        check_signature(fn, ["level"])  # the dataset has no answer column
