"""Where prompts come from: data sources (built-in tasks or datasets), file formats, prompt rendering.

``build_source(cfg, tokenizer)`` picks the run's source from the ``data.*`` config section;
``FORMATS`` is the registry of file formats; ``tilt.data.seeds`` holds the seed arithmetic
shared by training and evaluation.
"""
from tilt.data.files import FORMATS, check_rows, load_file
from tilt.data.prompts import in_heldout, is_conversational, prompt_hash, render
from tilt.data.seeds import EVAL_SEED_OFFSET, data_offset
from tilt.data.sources import RowSource, Source, TaskSource, build_source

__all__ = ["EVAL_SEED_OFFSET", "FORMATS", "RowSource", "Source", "TaskSource", "build_source", "check_rows",
           "data_offset", "in_heldout", "is_conversational", "load_file", "prompt_hash", "render"]
