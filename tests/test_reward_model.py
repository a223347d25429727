"""A local sequence-classification model as a reward: batched scores equal a direct HF call."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from tilt.config import ConfigError
from tilt.rewards import resolve_reward_fn, score
from tilt.verifiers.reward_model import make_reward_model, render

PROMPTS = ["1+1=", "12+30=", "7*8=", "9-3=", "100+1="]
COMPLETIONS = ["2", "42", "56 and more words", "", "101"]
TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}"
            "{% if not loop.last %} {% endif %}{% endfor %}")  # "u:1+1= a:2" in the char alphabet


def _save_classifier(path, char_tok, *, chat_template=None):
    cfg = LlamaConfig(vocab_size=len(char_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      num_labels=1, pad_token_id=char_tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(str(path))
    char_tok.save_pretrained(str(path))  # then reload: the session fixture itself stays unchanged
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = chat_template
    tok.save_pretrained(str(path))
    return path


def _direct(path, texts):
    """One unpadded AutoModelForSequenceClassification call per text: logit 0."""
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    with torch.no_grad():
        return [float(model(**tok(t, return_tensors="pt")).logits[0, 0]) for t in texts]


@pytest.mark.parametrize("template", [None, TEMPLATE])
def test_batched_scores_equal_a_direct_classifier_call(tmp_path, char_tok, template):
    path = _save_classifier(tmp_path / "rm", char_tok, chat_template=template)
    fn = make_reward_model(str(path), batch_size=2)  # 5 texts -> batches of 2, 2, 1 (padding matters)
    tok = AutoTokenizer.from_pretrained(str(path))
    texts = [render(tok, p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
    if template:
        assert texts[0] == "u:1+1= a:2"  # the chat template was applied, user then assistant
    else:
        assert texts[1] == "12+30=42"
    got = fn(PROMPTS, COMPLETIONS)
    want = _direct(path, texts)
    assert got == pytest.approx(want, abs=1e-5)
    assert len(set(round(x, 4) for x in got)) == len(got)  # a random classifier: distinct scores, not a constant


def test_reward_model_by_name_in_the_scoring_path(tmp_path, char_tok):
    path = _save_classifier(tmp_path / "rm", char_tok)
    fn = resolve_reward_fn(f"reward_model={path}")
    r, counts, msgs = score([fn], [1.0], PROMPTS, COMPLETIONS, {}, timeout=60)
    assert r == pytest.approx(_direct(path, [p + c for p, c in zip(PROMPTS, COMPLETIONS)]), abs=1e-5)
    assert not msgs


def test_a_path_that_is_not_a_classifier_is_a_clear_error(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="is not a sequence classifier \\(architectures: \\['LlamaForCausalLM'\\]\\)"):
        make_reward_model(str(tiny_llama_dir))
    with pytest.raises(ConfigError, match="is not a directory"):
        resolve_reward_fn(f"reward_model={tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="needs an argument: 'reward_model=/path/to/classifier'"):
        resolve_reward_fn("reward_model")
