"""The character tokenizer is built by code and loads with AutoTokenizer from disk (no network)."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st
from transformers import AutoTokenizer

from tilt.tokenizer import ALPHABET, build_char_tokenizer


def test_saved_tokenizer_loads_with_autotokenizer(tmp_path, char_tok):
    char_tok.save_pretrained(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert len(tok) == 4 + len(ALPHABET) == 53
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    # "47+85=" -> <bos> then one id per character: '4' is index 4 of the alphabet -> id 4 + 4 = 8
    assert tok("47+85=").input_ids == [1, 8, 11, 41, 12, 9, 44]
    assert tok.padding_side == "left"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=40))
def test_roundtrip_one_token_per_character(text):
    tok = build_char_tokenizer()
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


def test_unknown_characters_map_to_unk(char_tok):
    assert char_tok("A", add_special_tokens=False).input_ids == [char_tok.unk_token_id]
