"""Training quality: BWArea against a plain Llama of the world model's shape, same data, tokens and settings.

    python benchmarks/bench_training_quality.py --data corpus.txt --val-data heldout.txt   # train, then compare
    python benchmarks/bench_training_quality.py --data ../shared/corpora/shakespeare.txt --holdout-percent 3
    python benchmarks/bench_training_quality.py --runs runs/default-model --data heldout/  # compare finished runs

Training mode runs, in this process: tokenizer, stage 1, the Llama baseline, BC (inverse targets) and BC continued
on the world model's posterior. Its defaults are the training-quality scale (hidden 128, 4 world layers, a 2048-token
BPE, batch 16 x 128, 600 steps each; about 36 minutes on 2 CPU cores, most of it the posterior stage, which scores
all 64 actions at every position). Runs mode reads the folders s1, llama, bc and (if present) bc-posterior under
--runs (scripts/train_default_model.sh writes them). Both evaluate on the held-out --data / --val-data and write
a table (.md) and JSON with the targets:

    lm_ppl <= 1.10 x baseline ppl      id_ppl < baseline ppl      codes_used >= 48, code_perplexity >= 24
    BC accuracy reported               stage-1 tokens/s >= 0.6 x the baseline's (stage 1 runs 1.5x the layers)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from bwarea.evaluate import evaluate
from bwarea.tokenizer_train import train_tokenizer
from bwarea.train import BaselineStage, BCConfig, BCStage, PretrainConfig, PretrainStage, train
from outputs import output  # benchmarks/outputs.py, beside this script


def throughput(run: Path) -> float:
    """Median training tokens/s of a run, leaving out its first logged window (warm-up)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r["split"] == "train"]
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def split_lines(files, percent: float, out: Path) -> tuple[list[str], list[str]]:
    """Each text file's first (100 - percent)% of lines to out/train, the rest to out/heldout (as
    scripts/train_default_model.sh splits the default model's data) -> (train files, held-out files)."""
    if not 0 < percent < 100:
        raise SystemExit(f"--holdout-percent must lie in (0, 100), got {percent}")
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    train, held_out = [], []
    for name in files:
        src = Path(name)
        if not src.is_file():
            raise SystemExit(f"--holdout-percent splits files, and {src} is not a file")
        lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
        cut = int(len(lines) * (1 - percent / 100))
        for part, chunk, paths in (("train", lines[:cut], train), ("heldout", lines[cut:], held_out)):
            (out / part / src.name).write_text("".join(chunk), encoding="utf-8")
            paths.append(str(out / part / src.name))
    return train, held_out


def train_runs(args, runs: Path) -> None:
    """Train the four runs under ``runs`` with the same data, tokens and world-model shape."""
    tokenizer = runs / "tokenizer"
    train_tokenizer(args.data, args.vocab_size, tokenizer)
    shape = dict(hidden_size=args.hidden_size, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                 intermediate_size=args.intermediate_size)
    common = dict(data=args.data, val_data=args.val_data, tokenizer=str(tokenizer), block_size=args.block_size,
                  batch_size=args.batch_size, warmup_steps=min(100, args.steps // 10), log_every=args.log_every,
                  save_every=10**9, eval_blocks=args.eval_blocks, cache_dir=str(runs / "cache"), overwrite=True,
                  lr=args.lr, seed=args.seed)
    train(PretrainStage(), PretrainConfig(out=str(runs / "s1"), max_steps=args.steps, **shape, **common))
    train(BaselineStage(), PretrainConfig(out=str(runs / "llama"), max_steps=args.steps, **shape, **common))
    common.pop("tokenizer")
    # posterior_fraction=0: this benchmark's "BC only" row is plain cloning (bc's default adds a posterior phase).
    train(BCStage(), BCConfig(out=str(runs / "bc"), model=str(runs / "s1"), max_steps=args.bc_steps,
                              policy_init="world", posterior_fraction=0.0, **common))
    if args.posterior_steps:
        # The posterior stage optimises the LM likelihood itself, at BC's peak rate: at a quarter of it, 150 steps
        # cut held-out lm_ppl by 2.0%; 300 more at the full rate cut another 3.3% (docs/training.md).
        common.update(lr=args.lr * args.posterior_lr_scale, warmup_steps=min(20, args.posterior_steps // 10))
        train(BCStage(), BCConfig(out=str(runs / "bc-posterior"), model=str(runs / "bc"),
                                  max_steps=args.posterior_steps, policy_init="keep", targets="posterior", **common))


def compare(runs: Path, data, max_blocks: int | None, final_name: str | None = None,
            final_eval: Path | None = None) -> dict:
    """Evaluate the finished runs on held-out ``data`` -> the result row with ratios and target checks.

    final_name: the run folder of the finished BWArea model (default: bc-posterior if it exists, else bc).
    final_eval: `bwarea eval --json` output of that model on the same data, used instead of evaluating it again
    (the exact evaluation scores all 64 actions at every position: on a CPU it is the slow part).
    """
    if final_name is None:
        final_name = "bc-posterior" if (runs / "bc-posterior" / "model.safetensors").is_file() else "bc"
    final = runs / final_name
    common = dict(data=data, max_blocks=max_blocks, cache_dir=runs / "cache", progress=False)
    llama = evaluate(runs / "llama", **common)
    bwarea = reuse_eval(final_eval, final, llama) if final_eval else evaluate(final, **common)
    bc_only = evaluate(runs / "bc", **common) if final.resolve() != (runs / "bc").resolve() else bwarea
    s1_rate, llama_rate = throughput(runs / "s1"), throughput(runs / "llama")
    base = llama["lm_ppl"]
    result = {
        "model": str(final), "baseline_ppl": base, "lm_ppl": bwarea["lm_ppl"], "lm_ppl_ratio": bwarea["lm_ppl"] / base,
        "lm_ppl_bc_only": bc_only["lm_ppl"], "lm_ppl_ratio_bc_only": bc_only["lm_ppl"] / base,
        "id_ppl": bwarea["id_ppl"], "codes_used": bwarea["codes_used"], "code_perplexity": bwarea["code_perplexity"],
        "bc_accuracy": bwarea["bc_accuracy"], "bc_accuracy_bc_only": bc_only["bc_accuracy"],
        "stage1_tokens_per_s": s1_rate, "baseline_tokens_per_s": llama_rate, "throughput_ratio": s1_rate / llama_rate,
        "eval_tokens": bwarea["tokens"], "device": torch.cuda.get_device_name() if torch.cuda.is_available()
        else platform.processor() or "cpu",
        "runs": {name: json.loads((runs / name / "training.json").read_text())
                 for name in ("s1", "llama", "bc", "bc-posterior") if (runs / name / "training.json").is_file()},
    }
    result["targets"] = {
        "lm_ppl <= 1.10 x baseline": result["lm_ppl_ratio"] <= 1.10,
        "id_ppl < baseline": result["id_ppl"] < base,
        "codes_used >= 48": result["codes_used"] >= 48,
        "code_perplexity >= 24": result["code_perplexity"] >= 24,
        "stage-1 throughput >= 0.6 x baseline": result["throughput_ratio"] >= 0.6,
    }
    return result


def reuse_eval(path: Path, model: Path, llama: dict) -> dict:
    """The last JSON line of ``path`` (`bwarea eval --json`), checked to be ``model``'s on the data ``llama`` was
    evaluated on (same tokenizer and block size, so the same token count)."""
    lines = path.read_text().strip().splitlines()
    if not lines:
        raise SystemExit(f"--final-eval {path} is empty")
    result = json.loads(lines[-1])
    if Path(result.get("model", "")).resolve() != model.resolve():
        raise SystemExit(f"--final-eval {path} evaluated {result.get('model')}, not the final model {model}")
    if result.get("tokens") != llama["tokens"]:
        raise SystemExit(f"--final-eval {path} scored {result.get('tokens')} tokens, but the held-out data here "
                         f"has {llama['tokens']}: it was evaluated on other data or blocks")
    return result


def table(r: dict) -> str:
    rows = [
        ("baseline (Llama) ppl", f"{r['baseline_ppl']:.2f}", ""),
        ("BWArea lm_ppl", f"{r['lm_ppl']:.2f}", f"{r['lm_ppl_ratio']:.3f}x baseline (target <= 1.10)"),
        ("BWArea lm_ppl, BC only", f"{r['lm_ppl_bc_only']:.2f}", f"{r['lm_ppl_ratio_bc_only']:.3f}x baseline"),
        ("id_ppl", f"{r['id_ppl']:.2f}", "target < baseline ppl"),
        ("codes_used", f"{r['codes_used']}", "of 64 (target >= 48)"),
        ("code_perplexity", f"{r['code_perplexity']:.1f}", "target >= 24"),
        ("bc_accuracy", f"{r['bc_accuracy']:.3f}", f"BC only: {r['bc_accuracy_bc_only']:.3f}"),
        ("stage-1 tokens/s", f"{r['stage1_tokens_per_s']:.0f}",
         f"{r['throughput_ratio']:.2f}x baseline {r['baseline_tokens_per_s']:.0f} (target >= 0.6)"),
    ]
    lines = ["| metric | value | note |", "| --- | --- | --- |", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    lines.append("")
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in r["targets"].items()]
    lines.append(f"\n{r['eval_tokens']} held-out tokens; device: {r['device']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="training text (training mode) or held-out text (--runs)")
    p.add_argument("--val-data", nargs="+", help="held-out text (training mode)")
    p.add_argument("--runs", type=Path, help="compare the finished runs in this folder instead of training")
    p.add_argument("--final", help="run folder of the finished BWArea model (default bc-posterior if present, else bc)")
    p.add_argument("--final-eval", type=Path, default=None,
                   help="--runs mode: `bwarea eval --json` output of the final model on the same --data, used "
                        "instead of evaluating it again")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/training_quality"),
                   help="output prefix: writes PREFIX.json and PREFIX.md")
    p.add_argument("--work", type=Path, default=Path("runs/bench-training-quality"), help="training mode's runs")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--bc-steps", type=int, default=600)
    p.add_argument("--posterior-steps", type=int, default=450,
                   help="BC continued on the world model's posterior (the exact LM likelihood); 0 skips it")
    p.add_argument("--posterior-lr-scale", type=float, default=1.0, help="its peak learning rate, times --lr")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--intermediate-size", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--eval-blocks", type=int, default=64)
    p.add_argument("--max-blocks", type=int, default=None, help="evaluate at most N held-out blocks")
    p.add_argument("--holdout-percent", type=float, default=None,
                   help="training mode without --val-data: hold out the last P%% of each --data file's lines")
    args = p.parse_args(argv)
    if args.runs is None:
        if args.holdout_percent is not None and not args.val_data:
            args.data, args.val_data = split_lines(args.data, args.holdout_percent, args.work / "data")
        if not args.val_data:
            p.error("training mode needs --val-data (held-out text) or --holdout-percent")
        train_runs(args, args.work)
        runs, held_out = args.work, args.val_data
    else:
        runs, held_out = args.runs, args.data
    if args.final_eval is not None and args.runs is None:
        p.error("--final-eval is read in --runs mode only (training mode evaluates what it trains)")
    result = compare(runs, held_out, args.max_blocks, args.final, args.final_eval)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    output(args.out, ".json").write_text(json.dumps(result, indent=1))
    text = table(result)
    output(args.out, ".md").write_text(text + "\n")
    print(text)
    return 0 if all(result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
