"""Where prompts come from: data sources (built-in tasks or datasets), file formats, prompt rendering.

``build_source(cfg, tokenizer)`` builds the run's source from the ``data.*`` config section;
``SOURCES`` is the registry of kinds of source (a new kind is one entry + its test), ``FORMATS``
the registry of file formats; ``tilt.data.seeds`` holds the seed arithmetic
shared by training and evaluation.
"""
from tilt.data.files import FORMATS, check_rows, load_file
from tilt.data.prompts import in_heldout, is_conversational, prompt_hash, render
from tilt.data.seeds import EVAL_SEED_OFFSET, data_offset
from tilt.data.sources import SOURCES, RowSource, Source, TaskSource, build_source

__all__ = ["EVAL_SEED_OFFSET", "FORMATS", "SOURCES", "RowSource", "Source", "TaskSource", "build_source", "check_rows",
           "data_offset", "in_heldout", "is_conversational", "load_file", "prompt_hash", "render"]
