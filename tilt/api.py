"""The Python API: ``tilt.train`` and ``tilt.sft``, in the shape a TRL user knows.

``tilt.train(config, reward_funcs=[...], train_dataset=ds, eval_dataset=ds2)`` takes
``datasets.Dataset`` objects and reward callables written for ``trl.GRPOTrainer`` (they are called
with the same keyword arguments, tilt.rewards) and runs ``tilt train``'s loop on them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

from tilt.config import Config, ConfigError, load_config

ConfigLike = Union[Config, dict, str, Path, None]


def as_config(config: ConfigLike, overrides: Optional[list[str]] = None) -> Config:
    """A Config from a Config, a nested dict, a YAML path or None (defaults), plus ``--set`` overrides."""
    if isinstance(config, Config):
        config = config.model_dump(mode="json")
    if isinstance(config, dict):
        from tilt.config import merge_config, parse_set
        from pydantic import ValidationError

        try:
            return Config.model_validate(merge_config(config, parse_set(overrides or [])))
        except ValidationError as exc:
            from tilt.config import _format_error

            raise ConfigError(_format_error(exc, "dict passed to tilt.train")) from None
    return load_config(config, overrides)


def train(config: ConfigLike = None, *, reward_funcs: Optional[list[Union[str, Callable]]] = None,
          train_dataset=None, eval_dataset=None, run_dir: Optional[str] = None,
          echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train with RL; return the run summary (also in RUN/summary.json).

    Args:
        config: a ``tilt.config.Config``, a nested dict ({"train": {"steps": 50}}), a YAML path, or None.
        reward_funcs: callables ``f(prompts, completions, **kwargs) -> list[float]`` (TRL's
            convention) or names as in reward.functions; None = the config's reward.functions.
        train_dataset / eval_dataset: ``datasets.Dataset`` objects with a prompt column
            (data.prompt_column); None = the config's data.* (or the built-in tasks).
        run_dir: where the run writes (default: config run_dir, else runs/<timestamp>).
    A run from in-memory datasets or callables cannot be resumed with ``tilt train --resume``
    (its config.yaml does not hold them); call ``tilt.train`` again with a new run_dir instead.
    """
    from tilt.rewards import resolve_reward_fn
    from tilt.trainer import train as run_train

    cfg = as_config(config, [f"run_dir={run_dir}"] if run_dir else None)
    fns = None
    if reward_funcs is not None:
        fns = [resolve_reward_fn(f) if isinstance(f, str) else f for f in reward_funcs]
        bad = [f for f in fns if not callable(f)]
        if bad:
            raise ConfigError(f"reward_funcs must be callables or reward names, got {bad[0]!r}")
        if cfg.reward.weights is not None and len(cfg.reward.weights) != len(fns):
            raise ConfigError(f"reward.weights has {len(cfg.reward.weights)} entries for {len(fns)} reward_funcs")
    return run_train(cfg, reward_fns=fns, train_dataset=train_dataset, eval_dataset=eval_dataset, echo=echo)


def sft(dataset, out: Union[str, Path], *, model: str = "shipped", echo: Callable[[str], None] = print,
        **settings: Any) -> dict[str, Any]:
    """Supervised fine-tuning of ``model`` on ``dataset`` (a ``datasets.Dataset`` or a file path)
    with prompt/completion or messages columns; writes a HF model to ``out``. ``settings`` are
    fields of ``tilt.supervised.SFTCfg`` (epochs, lr, batch_size, seed, ...)."""
    from tilt.supervised import SFTCfg, sft as run_sft

    cfg = SFTCfg(model=model, **settings)
    if isinstance(dataset, (str, Path)):
        return run_sft(str(dataset), Path(out), cfg, echo=echo)
    return run_sft("<in-memory Dataset>", Path(out), cfg, dataset=dataset, echo=echo)
