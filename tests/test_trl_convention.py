"""tilt calls reward functions with the arguments TRL 1.16's GRPOTrainer._calculate_rewards passes.

Both sides score the same batch (B=2 prompts x G=2 completions) with recording reward
functions; the recorded keyword arguments must be equal, key for key, except the three
trainer objects (trainer_state, log_extra, log_metric), which must be present on both sides.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")

from tilt.data import build_source  # noqa: E402
from tilt.config import load_config  # noqa: E402
from tilt.rewards import score  # noqa: E402
from tilt.wiring.sampling import row_columns  # noqa: E402

OBJECTS = ("trainer_state", "log_extra", "log_metric")
CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}a: {% endif %}"


def recorder(calls: list):
    def reward(prompts, completions, **kwargs):  # the signature TRL's docs use
        calls.append({"prompts": prompts, "completions": completions, **kwargs})
        return [float(len(str(c))) for c in completions]
    reward.tilt_in_process = True  # records into this process's list (tilt.reward_pool would run it in a worker)
    return reward


def trl_call(inputs: list[dict], completions_text: list[str], completion_ids: list[list[int]]):
    """Run TRL's own _calculate_rewards on a stub trainer holding only what the method reads."""
    from trl import GRPOTrainer
    from trl.data_utils import is_conversational

    calls: list = []
    fn = recorder(calls)
    stub = SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu"), is_main_process=True), reward_funcs=[fn],
                           reward_processing_classes=[None], reward_func_names=["reward"], environments=None,
                           state=SimpleNamespace(global_step=0), _log_completion_extra=lambda *a: None,
                           _log_metric=lambda *a: None, args=SimpleNamespace(report_to=[]))
    prompts = [x["prompt"] for x in inputs]
    if is_conversational(inputs[0]):  # as _generate_single_turn decodes without a response parser
        completions = [[{"role": "assistant", "content": c}] for c in completions_text]
    else:
        completions = completions_text
    out = GRPOTrainer._calculate_rewards(stub, inputs, prompts, completions, completion_ids)
    return calls[0], out[:, 0].tolist()


def tilt_call(items, G: int, completions_text, completion_ids):
    calls: list = []
    prompts, columns = row_columns(items, G)
    r, _, _ = score([recorder(calls)], [1.0], prompts, completions_text, columns, timeout=10,
                    completion_ids=completion_ids)
    return calls[0], r


@pytest.mark.parametrize("conversational", [False, True])
def test_tilt_passes_trl_the_same_reward_arguments(tmp_path, char_tok, conversational):
    from datasets import Dataset

    tok = char_tok.__class__.from_pretrained
    char_tok.save_pretrained(str(tmp_path / "tok"))
    tok = tok(str(tmp_path / "tok"))
    tok.chat_template = CHAT
    rows = [{"prompt": "rev 12=", "answer": "21", "level": 1, "meta": {"src": "a"}},
            {"prompt": "rev 345=", "answer": "543", "level": 2, "meta": {"src": "b"}}]
    if conversational:
        rows = [dict(r, prompt=[{"role": "user", "content": r["prompt"]}]) for r in rows]
    heldout = [dict(rows[0], prompt="rev 9=" if not conversational else [{"role": "user", "content": "9"}])]
    src = build_source(load_config(None, []), tok, train_dataset=Dataset.from_list(rows),
                       eval_dataset=Dataset.from_list(heldout))
    items = src.train_items(0, 2)
    G = 2
    texts = ["21", "12", "543", "5"]
    ids = [[5, 4, 2], [4, 5, 2], [8, 7, 6, 2], [8]]
    # TRL's inputs: each dataset row repeated G times (RepeatSampler), in the order tilt drew them
    by_prompt = {str(r["prompt"]): r for r in Dataset.from_list(rows)}
    inputs = [dict(by_prompt[str(it.prompt_value)]) for it in items for _ in range(G)]
    theirs, r_trl = trl_call(inputs, texts, ids)
    ours, r_tilt = tilt_call(items, G, texts, ids)
    assert set(theirs) == set(ours)
    for key in OBJECTS:
        assert key in ours
    assert {k: v for k, v in ours.items() if k not in OBJECTS} == {k: v for k, v in theirs.items() if k not in OBJECTS}
    assert r_tilt == r_trl
    if conversational:
        assert ours["completions"][0] == [{"role": "assistant", "content": "21"}]
    assert set(ours) - set(OBJECTS) == {"prompts", "completions", "completion_ids", "answer", "level", "meta"}
