"""`tilt decode` and `tilt train-value` (registered in tilt/cli.py); heavy imports stay inside the commands."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

DecodeOpt = typer.Option(None, "--decode", help="Decoder name (tilt.decoding.DECODERS); default the config's decode.name.")
KwargsOpt = typer.Option(None, "--decode-kwargs", help='Decoder kwargs as JSON, e.g. \'{"k": 20}\'.')
ValueOpt = typer.Option(None, "--value-model", help="Q model directory from `tilt train-value` (qsharp, controlled, "
                       "controlled_block, transfer_q, best_of_n, resample) or Q-probe directory from "
                       "`tilt train-probe` (qprobe).")


def decode_section(config: Optional[Path], set_: Optional[List[str]], name: Optional[str], kwargs: Optional[str],
                   value_model: Optional[str]):
    """The validated ``decode`` config section: defaults <- --config <- --set <- --decode/--decode-kwargs/--value-model."""
    from tilt.config import ConfigError, load_config

    overrides = list(set_ or [])
    cfg = load_config(config, overrides)
    data = cfg.decode.model_dump()
    if name is not None:
        data["name"] = name
    if kwargs is not None:
        try:
            data["kwargs"] = json.loads(kwargs)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--decode-kwargs must be a JSON object, got {kwargs!r}: {exc}") from None
        if not isinstance(data["kwargs"], dict):
            raise ConfigError(f"--decode-kwargs must be a JSON object, got {kwargs!r}")
    if value_model is not None:
        data["value_model"] = value_model
    from pydantic import ValidationError

    from tilt.config import DecodeCfg

    try:
        return cfg, DecodeCfg(**data)
    except ValidationError as exc:
        raise ConfigError("invalid decode section: " + "; ".join(e["msg"] for e in exc.errors())) from None


def run_decode(target: str, *, dcfg, tasks: str, per_cell: int, split: str, n: int, seed: int,
               max_new_tokens: int, out: Path) -> dict:
    """Write one JSON line per completion (prompt, completion, reward, KL estimate); return a summary."""
    import torch

    from tilt.decoding.lm import Decoding
    from tilt.evaluation_cli import _resolve
    from tilt.model import load_policy
    from tilt.rewards import verifier_reward
    from tilt.rollout import decode_completions, encode_prompts
    from tilt.tasks.mix import eval_items, parse_mix, sample_items

    model_path, _, _ = _resolve(target)
    mix = parse_mix(tasks)
    if split == "eval":
        items = eval_items(mix, per_cell=per_cell)
    elif split in ("train", "sft"):
        items = sample_items(mix, split=split, start=0, count=per_cell * len(mix))
    else:
        raise ValueError(f"unknown split {split!r}; valid splits: eval, train, sft")
    pol = load_policy(model_path)
    decoding = Decoding.build(dcfg.name, dcfg.kwargs, value_model=dcfg.value_model, model=pol.model,
                              tokenizer=pol.tokenizer)
    gen = torch.Generator().manual_seed(seed)
    rows = [it for it in items for _ in range(n)]
    ids, mask = encode_prompts(pol.tokenizer, [it.prompt for it in rows])
    batch, ref_logp = decoding.generate(pol.model, ids, mask, max_new_tokens=max_new_tokens, eos_id=pol.eos_id,
                                        pad_id=pol.pad_id, generator=gen)
    texts = decode_completions(pol.tokenizer, batch, pol.eos_id)
    rewards = verifier_reward([it.prompt for it in rows], texts, task=[it.task for it in rows],
                              columns=[it.columns for it in rows])
    kl = (batch.logprobs - ref_logp).sum(-1) if ref_logp is not None else None  # [N] one-sample KL estimates
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for i, (it, text, r) in enumerate(zip(rows, texts, rewards)):
            f.write(json.dumps({"task": it.task, "difficulty": it.difficulty, "seed": it.seed, "prompt": it.prompt,
                                "completion": text, "reward": r, "decoder": dcfg.name,
                                "kl_to_ref": None if kl is None else float(kl[i])}) + "\n")
    tokens = batch.completion_mask.sum(-1).float()
    return {"completions": len(rows), "mean_reward": sum(rewards) / len(rewards),
            "mean_tokens": float(tokens.mean()), "kl_to_ref": None if kl is None else float(kl.mean())}


def decode_cmd(target: str = typer.Argument(..., help="A run directory, a local HF model directory, or 'shipped'."),
               config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (its decode section)."),
               set_: Optional[List[str]] = typer.Option(None, "--set", "-s", help="Override a field, e.g. decode.kwargs.k=5."),
               decode: Optional[str] = DecodeOpt, decode_kwargs: Optional[str] = KwargsOpt,
               value_model: Optional[str] = ValueOpt,
               tasks: str = typer.Option("addition:1,multiplication:1,countdown:1,sorting:1-2", help="Task mix."),
               per_cell: int = typer.Option(8, help="Prompts per (task, difficulty) cell."),
               split: str = typer.Option("eval", help="Seed range: eval (held out), train or sft."),
               n: int = typer.Option(1, "--n", help="Completions per prompt."),
               seed: int = typer.Option(0, help="Sampling seed."),
               max_new_tokens: int = typer.Option(16, help="Generation budget per completion."),
               out: Path = typer.Option(Path("completions.jsonl"), "--out", help="JSONL output file.")) -> None:
    """Write completions of a decoder (catalogue E1-E7) for a task mix, with rewards and KL-to-reference estimates."""
    from tilt.cli import _user_errors, fail

    try:
        _, dcfg = decode_section(config, set_, decode, decode_kwargs, value_model)
        summary = run_decode(target, dcfg=dcfg, tasks=tasks, per_cell=per_cell, split=split, n=n, seed=seed,
                             max_new_tokens=max_new_tokens, out=out)
    except _user_errors() as exc:
        fail(str(exc))
    typer.echo(json.dumps(summary))
    typer.echo(f"wrote {out}")


def train_value_cmd(target: str = typer.Argument(..., help="The reference policy: run directory, HF model directory or 'shipped'."),
                    tasks: str = typer.Option("addition:1,multiplication:1,countdown:1,sorting:1-2", help="Task mix (train split)."),
                    rounds: int = typer.Option(3, help="Q♯ rounds (data aggregated across rounds)."),
                    prompts: int = typer.Option(1024, help="Roll-outs per round."),
                    beta: float = typer.Option(0.5, help="KL coefficient of the guidance used to roll in."),
                    top_k: Optional[int] = typer.Option(None, help="Guide only pi_ref's top-k tokens."),
                    epochs: int = typer.Option(300, help="Full-batch AdamW steps per refit."),
                    val_frac: float = typer.Option(0.2, help="Held-out fraction for early stopping of each refit "
                                                   "(0 = fit all data for all epochs)."),
                    max_new_tokens: int = typer.Option(16, help="Generation budget."),
                    seed: int = typer.Option(0, help="Seed of prompts and sampling."),
                    rollout_model: Optional[str] = typer.Option(None, "--rollout-model", help="Roll out with this "
                                                                "aligned policy (run or model dir, same tokenizer) "
                                                                "instead of the reference: Transfer Q* (decode with "
                                                                "transfer_q)."),
                    indirect: bool = typer.Option(False, "--indirect", help="The --rollout-model was aligned to "
                                                  "another reward: weight each roll-out by (pi_ref/rho_BL) "
                                                  "exp(r/beta) (Transfer Q*'s indirect transfer)."),
                    all_tokens: bool = typer.Option(False, "--all-tokens", help="Every roll-out token is a training "
                                                    "example, weighted 1/length per roll-out (the Q♯ reference "
                                                    "code's use_all_ref_tokens); default: a_h only."),
                    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default RUN/value_model "
                                                       "for a run, else ./value_model)."),
                    steps: bool = typer.Option(False, "--steps", help="Learn a step-level Q for `q_search` (E6) "
                                               "instead: MC return of the outcome reward at each step's last token, "
                                               "from --step-samples reference roll-outs of --prompts prompts."),
                    step_samples: int = typer.Option(4, help="--steps: reference roll-outs per prompt."),
                    step_rollouts: int = typer.Option(0, help="--steps: fresh reference continuations after each "
                                                      "step (0 = label a step with its own completion's reward)."),
                    step_label: str = typer.Option("mean", help="--steps with --step-rollouts: mean (MC estimate of "
                                                   "E[r | step]) or max (Q*'s best-of-roll-outs label)."),
                    delimiters: str = typer.Option(",>", help="--steps: characters that end a step.")) -> None:
    """Learn a Q♯ value model (a head on the reference's hidden states) from roll-in/roll-out data."""
    from tilt.cli import _user_errors, fail

    try:
        from tilt.decoding.train_value import train_value
        from tilt.decoding.value_model import save_q_head
        from tilt.evaluation_cli import _resolve
        from tilt.model import load_policy
        from tilt.tasks.mix import parse_mix, sample_items

        if not 0 <= val_frac < 1:
            raise ValueError(f"--val-frac must be in [0, 1), got {val_frac}")
        if rounds < 1 or prompts < 1:
            raise ValueError(f"train-value needs rounds >= 1 and prompts >= 1, got {rounds} and {prompts}")
        model_path, run_dir, _ = _resolve(target)
        pol = load_policy(model_path)
        mix = parse_mix(tasks)
        start = 50_000_000 + seed * 1_000_000  # train split, away from the trainer's data_offset(seed) range
        item_rounds = [sample_items(mix, split="train", start=start + r * prompts, count=prompts) for r in range(rounds)]
        if steps:
            from tilt.decoding.step_search import train_step_q

            head, info = train_step_q(pol, item_rounds[0], samples=step_samples, delimiters=delimiters,
                                      max_new_tokens=max_new_tokens, epochs=epochs, val_frac=val_frac, seed=seed,
                                      rollouts=step_rollouts, label=step_label)
            target_dir = out or ((run_dir / "value_model") if run_dir else Path("value_model"))
            save_q_head(head, target_dir, tokenizer=pol.tokenizer, base_model=str(model_path),
                        info={**info, "tasks": tasks, "val_frac": val_frac})
            typer.echo(f"step Q: {info['examples']} step examples, roll-out reward {info['rollout_reward']:.3f}, "
                       f"bce {info['bce']:.4f}")
            typer.echo(f"saved value model to {target_dir}")
            return
        roller = None
        if indirect and rollout_model is None:
            raise ValueError("--indirect needs --rollout-model (the baseline aligned to another reward)")
        if rollout_model is not None:
            from tilt.decoding.value_model import tokenizer_fingerprint

            aligned = load_policy(_resolve(rollout_model)[0])
            if tokenizer_fingerprint(aligned.tokenizer) != tokenizer_fingerprint(pol.tokenizer):
                raise ValueError(f"--rollout-model {rollout_model!r} has another tokenizer than {target!r}; "
                                 "Transfer Q* needs both on one vocabulary")
            roller = aligned.model
        head, stats = train_value(pol, item_rounds, beta=beta, top_k=top_k, max_new_tokens=max_new_tokens,
                                  epochs=epochs, val_frac=val_frac, seed=seed, rollout_model=roller,
                                  indirect=indirect, all_tokens=all_tokens, log=typer.echo)
        target_dir = out or ((run_dir / "value_model") if run_dir else Path("value_model"))
        save_q_head(head, target_dir, tokenizer=pol.tokenizer, base_model=str(model_path),
                    info={"beta": beta, "top_k": top_k, "tasks": tasks, "val_frac": val_frac,
                          "rollout_model": rollout_model, "indirect": indirect, "all_tokens": all_tokens,
                          "rounds": stats})
    except _user_errors() as exc:
        fail(str(exc))
    typer.echo(f"saved value model to {target_dir}")


def train_probe_cmd(target: str = typer.Argument(..., help="The reference policy: run directory, HF model directory "
                                                 "or 'shipped'."),
                    tasks: str = typer.Option("addition:1,multiplication:1,countdown:1,sorting:1-2",
                                              help="Task mix (train split)."),
                    prompts: int = typer.Option(256, help="Training prompts."),
                    k: int = typer.Option(8, "--k", help="pi_ref samples per prompt."),
                    objective: str = typer.Option("ce", help="mse (ridge reward regression), ce (logistic reward "
                                                  "classification) or pg (Q-Probe's importance-weighted policy "
                                                  "gradient)."),
                    beta: float = typer.Option(1.0, help="Softmax temperature of the pg objective (decode with the "
                                               "same beta)."),
                    l2: float = typer.Option(1e-3, help="L2 penalty on w."),
                    epochs: int = typer.Option(500, help="Full-batch Adam steps (ce, pg)."),
                    lr: float = typer.Option(1e-2, help="Adam learning rate (ce, pg)."),
                    max_new_tokens: int = typer.Option(16, help="Generation budget."),
                    seed: int = typer.Option(0, help="Seed of prompts and sampling."),
                    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default RUN/q_probe "
                                                       "for a run, else ./q_probe).")) -> None:
    """Fit a Q-Probe (E5): a linear probe on the reference's completion embeddings; decode with `qprobe`."""
    from tilt.cli import _user_errors, fail

    try:
        from tilt.decoding.train_probe import save_q_probe, train_probe
        from tilt.evaluation_cli import _resolve
        from tilt.model import load_policy
        from tilt.tasks.mix import parse_mix, sample_items

        if prompts < 1 or k < 1:
            raise ValueError(f"train-probe needs --prompts >= 1 and --k >= 1, got {prompts} and {k}")
        if objective not in ("mse", "ce", "pg"):
            raise ValueError(f"unknown --objective {objective!r}; valid: mse, ce, pg")
        model_path, run_dir, _ = _resolve(target)
        pol = load_policy(model_path)
        start = 60_000_000 + seed * 1_000_000  # train split, away from the trainer's and train-value's ranges
        items = sample_items(parse_mix(tasks), split="train", start=start, count=prompts)
        probe, stats = train_probe(pol, items, k=k, objective=objective, beta=beta, l2=l2, epochs=epochs, lr=lr,
                                   max_new_tokens=max_new_tokens, seed=seed)
        target_dir = out or ((run_dir / "q_probe") if run_dir else Path("q_probe"))
        save_q_probe(probe, target_dir, tokenizer=pol.tokenizer, base_model=str(model_path),
                     info={"objective": objective, "beta": beta, "l2": l2, "tasks": tasks, **stats})
    except _user_errors() as exc:
        fail(str(exc))
    typer.echo(json.dumps(stats))
    typer.echo(f"saved Q-probe to {target_dir}")
