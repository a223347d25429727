"""`model: PATH` works for any local AutoModelForCausalLM directory with its tokenizer.

The tests build and save tiny Qwen2 and GPT-2 models themselves (GPT-2 with a byte-level BPE
tokenizer trained here on task text), train them for two steps, and check the final model loads
with ``AutoModelForCausalLM.from_pretrained`` and generates.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tilt.config import load_config
from tilt.model import ModelLoadError, load_policy
from tilt.rollout import SamplingParams, encode_prompts, generate, sequence_logprobs
from tilt.tasks.mix import parse_mix, sample_items
from tilt.trainer import train


def _qwen2(path, char_tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(char_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(str(path))
    char_tok.save_pretrained(str(path))


def _gpt2(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    items = sample_items(parse_mix("addition:1-3,countdown:1-2,sorting:1"), split="sft", start=0, count=300)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([it.prompt + it.answer for it in items],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    eos = hf_tok.eos_token_id
    cfg = GPT2Config(vocab_size=len(hf_tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                     bos_token_id=eos, eos_token_id=eos)
    GPT2LMHeadModel(cfg).save_pretrained(str(path))
    hf_tok.save_pretrained(str(path))


@pytest.fixture(scope="module", params=["qwen2", "gpt2"])
def hf_dir(request, tmp_path_factory, char_tok):
    d = tmp_path_factory.mktemp(request.param)
    _qwen2(d, char_tok) if request.param == "qwen2" else _gpt2(d)
    return d


def test_rollout_logprobs_match_forward(hf_dir):
    """Left padding + position ids work for each architecture (GPT-2 has absolute positions)."""
    pol = load_policy(str(hf_dir))
    ids, mask = encode_prompts(pol.tokenizer, ["47+85=", "cd 3 5 7>22:", "5+4="])
    b = generate(pol.model, ids, mask, params=SamplingParams(8), eos_id=pol.eos_id, pad_id=pol.pad_id,
                 generator=torch.Generator().manual_seed(0))
    lp, _ = sequence_logprobs(pol.model, ids, mask, b.completion_ids, b.completion_mask)
    torch.testing.assert_close(lp * b.completion_mask, b.logprobs, atol=1e-5, rtol=0)


def test_train_from_local_hf_dir_and_reload_final(hf_dir, tmp_path):
    cfg = load_config(None, [f"model.path={hf_dir}", f"run_dir={tmp_path / 'run'}", "train.steps=2",
                             "rollout.prompts_per_step=2", "rollout.group_size=2", "tasks.eval_per_cell=1",
                             "tasks.mix=addition:1", "log.tensorboard=false", "log.progress=none"])
    summary = train(cfg, echo=lambda s: None)
    assert summary["complete"]
    final = tmp_path / "run" / "final"
    model = AutoModelForCausalLM.from_pretrained(str(final), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(final), local_files_only=True)
    assert type(model).__name__ == json.loads((hf_dir / "config.json").read_text())["architectures"][0]
    enc = tok("47+85=", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] > enc.input_ids.shape[1]


def test_missing_model_path_is_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_policy(str(tmp_path / "no_model_here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_policy(str(tmp_path / "empty"))


def test_shared_prompt_forward_equals_plain_forward(hf_dir):
    """The shared-prompt forward (KV cache of each distinct prompt indexed out to its rows) is
    exact for Qwen2 and GPT-2 too: values and gradients."""
    from shared_prefix import assert_shared_prefix_forward_is_exact

    assert_shared_prefix_forward_is_exact(load_policy(str(hf_dir)), ["47+85=", "cd 3 5 7>22:", "5+4="])


def test_lean_decoder_covers_qwen2_not_gpt2(hf_dir):
    """Qwen2 (q/k/v biases) decodes through tilt.fastdecode with the same samples as HF's
    forward; GPT-2 is not a supported type and keeps HF's forward."""
    from tilt.fastdecode import lean_decoder
    from tilt.rollout import preallocated_cache

    pol = load_policy(str(hf_dir))
    dec = lean_decoder(pol.model, preallocated_cache(pol.model, 8))
    assert (dec is not None) == (pol.model.config.model_type == "qwen2")
    ids, mask = encode_prompts(pol.tokenizer, ["47+85=", "cd 3 5 7>22:", "5+4="] * 2)
    run = [generate(pol.model, ids, mask, params=SamplingParams(8, lean=lean), eos_id=pol.eos_id,
                    pad_id=pol.pad_id, generator=torch.Generator().manual_seed(0)) for lean in (True, False)]
    assert torch.equal(run[0].completion_ids, run[1].completion_ids)
    torch.testing.assert_close(run[0].logprobs, run[1].logprobs, atol=1e-5, rtol=0)


def test_lean_decoders_read_grouped_query_keys_in_place(tmp_path_factory, char_tok):
    """Qwen2 with 2 query heads per key head: the per-row decoder (distinct prompts, SDPA reading the
    grouped keys in place) and the grouped decoder (prompts shared by 4 rows; each key head's rows
    and query heads in one product) sample what HF's forward samples, log-probs to 1e-5."""
    import tilt.fastdecode as fastdecode
    import tilt.rollout as rollout

    d = tmp_path_factory.mktemp("qwen2_gqa")
    _qwen2(d, char_tok)
    pol = load_policy(str(d))
    assert pol.model.config.num_attention_heads == 2 * pol.model.config.num_key_value_heads
    made = []
    orig = {name: getattr(rollout, name) for name in ("grouped_decoder", "lean_decoder")}

    def spy(name):
        def f(*a, **k):
            made.append(orig[name](*a, **k))
            return made[-1]
        return f

    for prompts in (["47+85=", "cd 3 5 7>22:", "5+4=", "sort 53 7 21:"], ["47+85=", "cd 3 5 7>22:"] * 4):
        ids, mask = encode_prompts(pol.tokenizer, prompts)
        made.clear()
        for name in orig:
            setattr(rollout, name, spy(name))
        try:
            run = [generate(pol.model, ids, mask, params=SamplingParams(10, lean=lean), eos_id=pol.eos_id,
                            pad_id=pol.pad_id, generator=torch.Generator().manual_seed(3)) for lean in (True, False)]
        finally:
            for name, f in orig.items():
                setattr(rollout, name, f)
        kind = fastdecode.GroupedDecoder if len(set(prompts)) < len(prompts) else fastdecode.LeanDecoder
        assert len(made) == 1 and type(made[0]) is kind
        assert torch.equal(run[0].completion_ids, run[1].completion_ids)
        torch.testing.assert_close(run[0].logprobs, run[1].logprobs, atol=1e-5, rtol=0)
        if kind is fastdecode.GroupedDecoder:  # its fused step in one library call a token or one call each: bit-equal
            fastdecode.ONE_CALL = False
            try:
                each = generate(pol.model, ids, mask, params=SamplingParams(10), eos_id=pol.eos_id, pad_id=pol.pad_id,
                                generator=torch.Generator().manual_seed(3))
            finally:
                fastdecode.ONE_CALL = True
            assert torch.equal(each.completion_ids, run[0].completion_ids) and torch.equal(each.logprobs, run[0].logprobs)
