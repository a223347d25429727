"""`tilt sft`: pairs from prompt/completion or messages rows, loss mask on completion tokens only."""
from __future__ import annotations

import json

import pytest
import torch

from tilt.config import ConfigError
from tilt.supervised import SFTCfg, encode_pairs, sft, sft_pairs

CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}a: {% endif %}"


def test_loss_mask_covers_completion_and_eos_only(char_tok):
    ids, attn, lm = encode_pairs(char_tok, ["12=", "7="], ["3", "77"], chat=False)
    # row 0: <bos> 1 2 = | 3 <eos>  -> 6 tokens, loss on the last 2
    # row 1: <bos> 7 = | 7 7 <eos>  -> 6 tokens, loss on the last 3
    assert ids.shape == (2, 6)
    assert lm.tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert attn.tolist() == [[1] * 6, [1] * 6]
    assert ids[0, 0] == char_tok.bos_token_id and ids[0, -1] == char_tok.eos_token_id
    assert char_tok.decode(ids[1, 3:5]) == "77"


def test_messages_rows_split_into_prompt_and_last_assistant_turn(tmp_path, char_tok):
    char_tok.save_pretrained(str(tmp_path))
    tok = char_tok.__class__.from_pretrained(str(tmp_path))
    tok.chat_template = CHAT
    rows = [{"messages": [{"role": "user", "content": "12"}, {"role": "assistant", "content": "21"}]}]
    prompts, comps, chat = sft_pairs(rows, tok, SFTCfg(), "d")
    assert prompts == ["user: 12 a: "] and comps == ["21"] and chat
    ids, _, lm = encode_pairs(tok, prompts, comps, chat=True)
    assert ids[0, 0] != tok.bos_token_id  # the template's text, no extra BOS (as the rollout encodes it)
    assert lm[0].sum() == 3  # "2", "1", <eos>
    with pytest.raises(ConfigError, match="ending with the assistant's"):
        sft_pairs([{"messages": rows[0]["messages"][:1]}], tok, SFTCfg(), "d")
    with pytest.raises(ConfigError, match="needs columns 'prompt' and 'completion', or 'messages'"):
        sft_pairs([{"question": "x"}], tok, SFTCfg(), "d")


def test_sft_lowers_the_completion_loss_and_writes_a_loadable_model(tmp_path, tiny_llama_dir):
    from tilt.model import load_policy

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{n}=", "completion": str(n)[::-1]}) for n in range(10, 42)))
    info = sft(str(data), tmp_path / "out", SFTCfg(model=str(tiny_llama_dir), epochs=3, lr=3e-3, batch_size=8),
               echo=lambda s: None)
    losses = info["epoch_losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    pol = load_policy(str(tmp_path / "out"))
    assert isinstance(pol.model, torch.nn.Module) and (tmp_path / "out" / "tilt_sft.json").exists()
