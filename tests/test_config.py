"""The config tree: documented defaults, YAML + --set, errors naming field, value and what is allowed."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from tilt.config import Config, ConfigError, describe, dump_config, load_config, parse_set

REPO = Path(__file__).resolve().parents[1]


def _walk(model_cls: type[BaseModel], prefix: str = ""):
    for name, field in model_cls.model_fields.items():
        yield f"{prefix}{name}", field
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _walk(ann, f"{prefix}{name}.")


def test_every_field_has_docstring_and_default():
    for path, field in _walk(Config):
        assert field.description, f"{path} has no docstring"
        assert not field.is_required(), f"{path} has no default"


def test_set_overrides_parse_as_yaml_scalars():
    cfg = load_config(None, ["optim.lr=1e-4", "rollout.group_size=4", "log.tensorboard=false",
                             "loss.kwargs={eps_low: 0.1}"])
    assert cfg.optim.lr == 1e-4 and cfg.rollout.group_size == 4 and cfg.log.tensorboard is False
    assert cfg.loss.kwargs == {"eps_low": 0.1}


def test_yaml_then_set(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.01\nrollout:\n  group_size: 3\n")
    cfg = load_config(p, ["rollout.group_size=5"])
    assert cfg.optim.lr == 0.01 and cfg.rollout.group_size == 5


def test_unknown_key_names_field_value_and_allowed():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lrr=0.1"])
    msg = str(e.value)
    assert "optim.lrr" in msg and "0.1" in msg and "lr, weight_decay" in msg


def test_unknown_top_level_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sed: 3\n")
    with pytest.raises(ConfigError, match="unknown field 'sed'.*allowed fields here: seed"):
        load_config(p)


def test_invalid_value_names_field_and_constraint():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rollout.group_size=0"])
    assert "rollout.group_size" in str(e.value) and "0" in str(e.value) and "greater than or equal to 1" in str(e.value)


def test_bad_literal_lists_allowed():
    with pytest.raises(ConfigError, match=r"kl.placement.*'loss' or 'reward'"):
        load_config(None, ["kl.placement=everywhere"])


def test_unknown_registry_names_list_valid_ones():
    with pytest.raises(ConfigError, match=r"loss.name.*'grpoo'.*valid names:.*grpo"):
        load_config(None, ["loss.name=grpoo"])
    with pytest.raises(ConfigError, match=r"advantage.name.*valid names:.*rloo"):
        load_config(None, ["advantage.name=nope"])
    with pytest.raises(ConfigError, match=r"kl.estimator.*valid names:.*k3"):
        load_config(None, ["kl.estimator=k9"])


def test_bad_task_mix_is_an_error():
    with pytest.raises(ConfigError, match="tasks.mix"):
        load_config(None, ["tasks.mix=additon:1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(lst)


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="a.b=value"):
        parse_set(["optim.lr"])


def test_dump_roundtrip(tmp_path):
    cfg = load_config(None, ["seed=7", "loss.name=dapo"])
    p = tmp_path / "r.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg
    assert "# AdamW learning rate." in describe(cfg)


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    """Training configs load as Config; compare specs (they have `methods`) load as CompareSpec."""
    import yaml

    if "methods" in (yaml.safe_load(path.read_text()) or {}):
        from tilt.compare.spec import load_spec

        spec = load_spec(path)
        if spec.base_config is not None:
            load_config(spec.base_config)
    else:
        load_config(path)


def test_shipped_yamls_exist():
    assert list((REPO / "configs").rglob("*.yaml")), "the repo ships example configs"


def test_min_new_tokens_above_max_is_refused():
    with pytest.raises(ConfigError, match=r"rollout.*min_new_tokens \(20\) exceeds max_new_tokens \(16\)"):
        load_config(None, ["rollout.min_new_tokens=20"])
    assert load_config(None, ["rollout.min_new_tokens=16"]).rollout.min_new_tokens == 16
