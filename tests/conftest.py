"""Shared fixtures: tiny models the tests build and save themselves (no network)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tilt.model import build_llama
from tilt.tokenizer import build_char_tokenizer


@pytest.fixture(scope="session")
def char_tok():
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, char_tok) -> Path:
    """A randomly initialised 2-layer Llama + the char tokenizer, saved in HF format."""
    d = tmp_path_factory.mktemp("tiny_llama")
    model = build_llama(len(char_tok), hidden=32, layers=2, heads=2, intermediate=64, seed=0)
    model.save_pretrained(str(d))
    char_tok.save_pretrained(str(d))
    return d


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, char_tok) -> Path:
    """A second tiny Llama with other weights (a teacher equal to the student gives no KD gradient)."""
    d = tmp_path_factory.mktemp("teacher")
    build_llama(len(char_tok), hidden=32, layers=2, heads=2, intermediate=64, seed=1).save_pretrained(str(d))
    char_tok.save_pretrained(str(d))
    return d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
