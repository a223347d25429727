"""model.prompt_format / model.chat_template: the text each task prompt is written into."""
from __future__ import annotations

import pytest

from tilt.config import ConfigError, load_config
from tilt.model import load_train_policy
from tilt.rollout import encode_prompts


def test_prompt_format_is_what_gets_tokenized(tiny_llama_dir, char_tok):
    cfg = load_config(None, [f"model.path={tiny_llama_dir}", "model.prompt_format=q {prompt} a"])
    pol = load_train_policy(cfg.model)
    ids, mask = encode_prompts(pol.tokenizer, ["1+2=", "1+2=", "30+4="])
    # the char tokenizer adds BOS: "Q 1+2= A" is 1 + 8 ids, "q 30+4= a" 1 + 9 ids, left-padded to 10
    assert ids.shape == (3, 10) and mask.sum(-1).tolist() == [9, 9, 10]
    assert ids[2].tolist() == char_tok("q 30+4= a").input_ids
    assert pol.tokenizer.decode(ids[0, 1:].tolist(), skip_special_tokens=True) == "q 1+2= a"
    assert pol.tokenizer.eos_token_id == char_tok.eos_token_id  # the rest is the model's tokenizer


def test_chat_template_wraps_the_prompt_as_the_user_turn(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}" \
                        "{% if add_generation_prompt %}<bot>{% endif %}"
    d = tmp_path / "chat"
    tok.save_pretrained(str(d))
    for f in ("config.json", "model.safetensors"):
        (d / f).write_bytes((tiny_llama_dir / f).read_bytes())
    cfg = load_config(None, [f"model.path={d}", "model.chat_template=true", "model.prompt_format='[{prompt}]'"])
    pol = load_train_policy(cfg.model)
    assert pol.tokenizer.format_prompt("7+2=") == "<user>[7+2=]<bot>"


def test_bad_prompt_settings_are_config_errors(tiny_llama_dir):
    with pytest.raises(ConfigError, match=r"prompt_format.*must contain \"\{prompt\}\""):
        load_config(None, ["model.prompt_format=no placeholder"])
    cfg = load_config(None, [f"model.path={tiny_llama_dir}", "model.chat_template=true"])
    with pytest.raises(ConfigError, match=r"chat_template=true but the tokenizer .* has no chat template"):
        load_train_policy(cfg.model)


def test_tilt_eval_of_a_run_applies_the_runs_prompt_format(tiny_llama_dir, tmp_path, monkeypatch):
    import shutil

    import yaml

    import tilt.evaluation_cli as ev

    run = tmp_path / "run"
    shutil.copytree(tiny_llama_dir, run / "final")
    cfg = load_config(None, [f"model.path={tiny_llama_dir}", "model.prompt_format=q {prompt} a", "tasks.mix=addition:1"])
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    seen = {}

    def fake_evaluate(model, tokenizer, items, **kw):  # what the evaluator would tokenize
        seen["prompt"] = tokenizer.decode(encode_prompts(tokenizer, [items[0].prompt])[0][0, 1:].tolist(),
                                          skip_special_tokens=True)
        seen["item"] = items[0].prompt
        raise SystemExit(0)

    monkeypatch.setattr(ev, "evaluate_items", fake_evaluate)
    with pytest.raises(SystemExit):
        ev.run_eval(str(run), tasks=None, per_cell=1, n=1, k="1", split="eval", allow_contaminated=False,
                    out=None, seed=0, max_new_tokens=2)
    assert seen["prompt"] == f"q {seen['item']} a"
