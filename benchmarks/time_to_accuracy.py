"""Wall-clock to reach TRL's best held-out accuracy: tilt (its defaults) vs TRL's GRPOTrainer.

    python benchmarks/time_to_accuracy.py                 # TRL at lr 1e-4, 3e-5, 1e-5, then tilt
    python benchmarks/time_to_accuracy.py --steps 20 --eval-every 10 --lrs 1e-5   # smoke
    python benchmarks/time_to_accuracy.py --reuse-trl benchmarks/results/time_to_accuracy.json \
        --tilt-config configs/fast.yaml --tilt-seeds 0,1,2,3,4,5   # tilt's fast config, TRL's curves reused

Both sides start from the shipped base model on tilt's default task mix, with the same G, B,
max new tokens, KL beta and sampling temperature; each keeps its own defaults otherwise (TRL:
its default loss ``dapo``, gradient checkpointing, linear decay; tilt: ``tilt train``'s config, or
``--tilt-config`` / ``--tilt-set`` on top of it).
Held-out accuracy is pass@1 at T=1.0 (mean of 8 samples) on the same 320 held-out prompts,
scored by the same code (``tilt.evaluate``) for both. The clock counts training only: it is
paused while evaluating. TRL's target is its best accuracy over the three learning rates; each
side's time is the first evaluation at or above it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import MIX, train_items, trl_reward, trl_rows, with_overrides  # noqa: E402
from workers import trl_preset  # noqa: E402


def heldout_pass1(model, tokenizer, items, seed: int) -> float:
    from tilt.evaluate import evaluate_items, summarize

    was_training = model.training
    model.eval()
    res = summarize(evaluate_items(model, tokenizer, items, n_samples=8, temperature=1.0, max_new_tokens=16,
                                   seed=seed))
    model.train(was_training)
    return res["pass1"]


def run_trl(lr: float, a: argparse.Namespace, eval_set) -> list[dict]:
    """One TRL run; returns [{step, train_s, pass1}] including step 0."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tilt.evaluation_cli import EVAL_SEED_OFFSET
    from tilt.model import shipped_model_dir

    torch.manual_seed(0)
    path = str(shipped_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ds = Dataset.from_list(trl_rows(train_items(a.steps * a.prompts)))
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-tta-"), per_device_train_batch_size=a.prompts * a.group,
                      num_generations=a.group, max_completion_length=a.tokens, learning_rate=lr, beta=a.beta,
                      max_steps=a.steps, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                      seed=0, temperature=1.0, disable_tqdm=True, **trl_preset(a.trl_preset))
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=trl_reward, args=args, train_dataset=ds)
    seed = EVAL_SEED_OFFSET
    curve = [{"step": 0, "train_s": 0.0, "pass1": heldout_pass1(model, tok, eval_set, seed)}]
    clock = {"total": 0.0}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            clock["total"] += time.perf_counter() - clock["t0"]
            if state.global_step % a.eval_every == 0:
                p1 = heldout_pass1(model, tok, eval_set, seed)
                curve.append({"step": state.global_step, "train_s": clock["total"], "pass1": p1})
                print(f"  TRL lr {lr:g} step {state.global_step}: pass@1 {p1:.3f} ({clock['total']:.0f}s)", flush=True)

    trainer.add_callback(Clock())
    torch.set_num_threads(a.threads)
    trainer.train()
    return curve


def run_tilt(a: argparse.Namespace, out_dir: Path, seed: int = 0) -> tuple[list[dict], dict]:
    """tilt's config (defaults, ``--tilt-config``, ``--tilt-set``) with the same G, B, tokens, beta;
    returns ([{step, train_s, pass1}], the resolved config)."""
    from tilt.config import Config, merge_config
    from tilt.trainer import train

    base = yaml.safe_load(Path(a.tilt_config).read_text()) if a.tilt_config else {}
    cfg = Config.model_validate(with_overrides(merge_config(base, {
        "seed": seed, "threads": a.threads, "run_dir": str(out_dir / "tilt-run"),
        "rollout": {"group_size": a.group, "prompts_per_step": a.prompts, "max_new_tokens": a.tokens},
        "kl": {"beta": a.beta}, "train": {"steps": a.tilt_steps or a.steps},
        "eval": {"every": a.eval_every}, "tasks": {"mix": MIX, "eval_per_cell": a.eval_per_cell},
        "log": {"progress": "none", "every": 1, "tensorboard": False, "plot": False},
        "checkpoint": {"every": a.tilt_steps or a.steps}}), a.tilt_set))
    train(cfg, echo=lambda s: None)
    rows = [json.loads(x) for x in (out_dir / "tilt-run" / "metrics.jsonl").read_text().splitlines()]
    curve, total = [], 0.0
    for r in rows:
        total += r.get("time/step_s", 0.0)
        if "eval/pass1" in r:
            curve.append({"step": r["step"], "train_s": total, "pass1": r["eval/pass1"]})
    return curve, cfg.model_dump(mode="json")


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next((c for c in curve if c["pass1"] >= target - 1e-9), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tilt-steps", type=int, default=None, help="tilt's run length (default: --steps)")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--trl-preset", default="best", choices=["best", "default"],
                   help="TRL's speed settings: best = gradient checkpointing off (same updates, faster at these "
                        "sizes); default = GRPOConfig's defaults (gradient checkpointing on)")
    p.add_argument("--lrs", default="1e-4,3e-5,1e-5")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-per-cell", type=int, default=64, help="held-out prompts per task cell (5 cells)")
    p.add_argument("--tilt-set", nargs="*", default=[],
                   help="tilt config overrides on top of its defaults, e.g. optim.lr=2e-4 train.minibatches=4")
    p.add_argument("--tilt-config", default=None,
                   help="a tilt YAML config (e.g. configs/fast.yaml) under the benchmark's fixed G, B, tokens, beta")
    p.add_argument("--tilt-seeds", default="0", help="tilt runs, one per seed; the median ratio is reported")
    p.add_argument("--reuse-trl", default=None, help="take TRL's curves from an earlier result JSON instead of rerunning")
    p.add_argument("--out", default=str(HERE / "results" / "time_to_accuracy.json"))
    a = p.parse_args()
    from tilt.tasks.mix import eval_items, parse_mix

    eval_set = eval_items(parse_mix(MIX), per_cell=a.eval_per_cell)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.reuse_trl:
        trl = json.loads(Path(a.reuse_trl).read_text())["trl_curves"]
    else:
        trl = {f"{lr:g}": run_trl(lr, a, eval_set) for lr in (float(x) for x in a.lrs.split(","))}
    best_lr, best = max(((lr, max(c["pass1"] for c in curve)) for lr, curve in trl.items()), key=lambda x: x[1])
    trl_hit = first_reaching(trl[best_lr], best)
    print(f"TRL best held-out pass@1 {best:.3f} (lr {best_lr}) at step {trl_hit['step']} after {trl_hit['train_s']:.1f}s")
    if trl_hit["step"] == 0:
        print("TRL never rose above the base model's accuracy: no time-to-accuracy ratio")
    runs = []
    for seed in (int(x) for x in a.tilt_seeds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            curve, resolved = run_tilt(a, Path(tmp), seed)
        hit = first_reaching(curve, best)
        ratio = hit["train_s"] / trl_hit["train_s"] if hit and trl_hit["train_s"] > 0 else None
        runs.append({"seed": seed, "hit": hit, "ratio": ratio, "curve": curve, "config": resolved})
        if hit:
            print(f"tilt seed {seed} reaches it at step {hit['step']} after {hit['train_s']:.1f}s: ratio "
                  + (f"{ratio:.3f}" if ratio is not None else "n/a"))
        else:
            print(f"tilt seed {seed} does not reach {best:.3f} in {a.tilt_steps or a.steps} steps "
                  f"(best {max(c['pass1'] for c in curve):.3f})")
    ratios = [r["ratio"] if r["ratio"] is not None else float("inf") for r in runs]
    median = statistics.median(ratios)
    print(f"median ratio over {len(runs)} tilt seed(s): {median:.3f}")
    result = {"target_pass1": best, "trl_best_lr": best_lr, "trl_hit": trl_hit, "tilt_runs": runs,
              "median_ratio": median, "trl_curves": trl, "args": vars(a)}
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
