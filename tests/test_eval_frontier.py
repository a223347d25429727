"""`tilt eval --decoders`: pass@1 against KL(decoder || pi_ref) and tokens per prompt, as a table and a PNG."""
import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from tilt.cli import app
from tilt.evaluation.frontier import parse_decoders
from tilt.model import load_policy
from tilt.rollout import SamplingParams, encode_prompts, generate, sequence_logprobs
from tilt.tasks.mix import eval_items, parse_mix

PNG = b"\x89PNG\r\n\x1a\n"


def test_parse_decoders_by_hand():
    got = parse_decoders("sample, top_k:k=5,temperature=0.7,qsharp:beta=0.5,top_k=20,greedy,q_search:delimiters=>")
    # "top_k=20" has no ":" so it is qsharp's kwarg, not the top_k decoder; a non-JSON value stays a string
    assert got == [("sample", "sample", {}), ("top_k:k=5,temperature=0.7", "top_k", {"k": 5, "temperature": 0.7}),
                   ("qsharp:beta=0.5,top_k=20", "qsharp", {"beta": 0.5, "top_k": 20}), ("greedy", "greedy", {}),
                   ("q_search:delimiters=>", "q_search", {"delimiters": ">"})]
    with pytest.raises(ValueError, match="before any decoder"):
        parse_decoders("k=5,top_k")
    with pytest.raises(ValueError, match="not key=value"):
        parse_decoders("top_k:k")
    with pytest.raises(ValueError, match="names no decoder"):
        parse_decoders(" , ")


def test_eval_decoders_writes_the_picture(tiny_llama_dir, tmp_path):
    n, seed, max_new = 2, 7, 6
    res = CliRunner().invoke(app, ["eval", str(tiny_llama_dir), "--tasks", "addition:1", "--per-cell", "2",
                                   "--n", str(n), "--seed", str(seed), "--max-new-tokens", str(max_new),
                                   "--decoders", "sample,greedy,top_k:k=3", "--out", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    assert "decoders.png" in res.output
    png = (tmp_path / "decoders.png").read_bytes()
    assert png[:8] == PNG and len(png) > 1000
    import matplotlib.image

    assert matplotlib.image.imread(str(tmp_path / "decoders.png")).ndim == 3  # decodes as an image
    rows = {r["decoder"]: r for r in json.loads((tmp_path / "decoders.json").read_text())}
    table = list(csv.DictReader((tmp_path / "decoders.csv").open()))
    assert [r["decoder"] for r in table] == ["sample", "greedy", "top_k:k=3"]
    assert rows["sample"]["kl"] == 0.0  # q = pi_ref: log q - log pi_ref is 0 token by token, exactly
    assert rows["greedy"]["kl"] > 0 and rows["top_k:k=3"]["kl"] > 0
    assert all(r["pass1"] == pytest.approx(sum(r["per_cell"].values()) / len(r["per_cell"])) for r in rows.values())

    # Count the tokens (and greedy's KL) independently, with the same rows [item x n] and generator seed.
    pol = load_policy(str(tiny_llama_dir))
    items = eval_items(parse_mix("addition:1"), per_cell=2)
    ids, mask = encode_prompts(pol.tokenizer, [it.prompt for it in items for _ in range(n)])
    for name, temp in (("sample", 1.0), ("greedy", 0.0)):
        batch = generate(pol.model, ids, mask, params=SamplingParams(max_new, temp), eos_id=pol.eos_id,
                         pad_id=pol.pad_id, generator=torch.Generator().manual_seed(seed))
        counted = int(batch.completion_mask.sum()) / len(ids)
        assert rows[name]["tokens_per_prompt"] == pytest.approx(counted, abs=1e-12)
        assert rows[name]["kept_tokens_per_prompt"] == pytest.approx(counted, abs=1e-12)
    # greedy: log q = 0 on the argmax token, so KL per completion = -sum_t log pi_ref(y_t), teacher-forced here
    ref = sequence_logprobs(pol.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                            batch.completion_mask)[0]  # [N, T]
    want = float(-(ref * batch.completion_mask).sum().detach() / len(ids))
    assert rows["greedy"]["kl"] == pytest.approx(want, rel=1e-4)


def test_sequence_decoder_tokens_count_every_candidate(tiny_llama_dir, tmp_path):
    from tilt.decoding.value_model import QHead, save_q_head

    pol = load_policy(str(tiny_llama_dir))
    save_q_head(QHead(pol.model.config.hidden_size, pol.model.config.vocab_size), tmp_path / "vm",
                tokenizer=pol.tokenizer, base_model="tiny")
    res = CliRunner().invoke(app, ["eval", str(tiny_llama_dir), "--tasks", "addition:1", "--per-cell", "2", "--n", "1",
                                   "--seed", "3", "--max-new-tokens", "5", "--decoders", "best_of_n:n=3",
                                   "--value-model", str(tmp_path / "vm"), "--out", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "decoders.json").read_text())[0]
    items = eval_items(parse_mix("addition:1"), per_cell=2)
    ids, mask = encode_prompts(pol.tokenizer, [it.prompt for it in items])
    cands = generate(pol.model, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0),
                     params=SamplingParams(5, 1.0), eos_id=pol.eos_id, pad_id=pol.pad_id,
                     generator=torch.Generator().manual_seed(3))  # the 3 candidates per prompt best_of_n draws
    assert row["kl"] is None
    assert row["tokens_per_prompt"] == pytest.approx(int(cands.completion_mask.sum()) / len(items), abs=1e-12)
    # the zero head scores all candidates alike, so the first of each 3 is kept
    assert row["kept_tokens_per_prompt"] == pytest.approx(int(cands.completion_mask[::3].sum()) / len(items))


def test_eval_decoders_bad_input(tiny_llama_dir, tmp_path):
    runner = CliRunner()
    base = ["eval", str(tiny_llama_dir), "--tasks", "addition:1", "--per-cell", "1", "--n", "1",
            "--max-new-tokens", "2", "--out", str(tmp_path / "e.json")]
    bad = runner.invoke(app, base + ["--decoders", "sample,beam"])
    assert bad.exit_code == 2 and "valid" in bad.output and "beam" in bad.output
    missing = runner.invoke(app, base + ["--decoders", "sample,qsharp:beta=0.5"])
    assert missing.exit_code == 2 and "needs a value model" in missing.output
    assert not (tmp_path / "decoders.png").exists()  # every decoder is checked before any generation
    both = runner.invoke(app, base + ["--decoders", "sample", "--decode", "greedy"])
    assert both.exit_code == 2 and "--decoders lists the decoders" in both.output
