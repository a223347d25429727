"""The embedded character-level tokenizer, built by code and saved in Hugging Face format.

One token per character of a small fixed alphabet plus four specials. Saved as a
``tokenizer.json`` that ``transformers.AutoTokenizer.from_pretrained`` loads with no network.
"""
from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
ALPHABET = string.digits + string.ascii_lowercase + " +-*=():>,./?"


def build_char_tokenizer():
    """Build the character tokenizer as a ``PreTrainedTokenizerFast``.

    Ids: <pad>=0, <bos>=1, <eos>=2, <unk>=3, then the alphabet in order. Encoding a text
    adds <bos> in front (so a prompt is ``<bos> + chars``); completions are encoded with
    ``add_special_tokens=False``.
    """
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def save_char_tokenizer(path: str | Path) -> None:
    """Write the tokenizer to ``path`` in Hugging Face format."""
    build_char_tokenizer().save_pretrained(str(path))
