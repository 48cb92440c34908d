"""The defaults a user gets: `bwarea pretrain` then `bwarea bc` with their default flags, against a Llama of the
world model's shape (`bwarea pretrain --baseline llama`, the same flags), scored on held-out text by another
author.

    python benchmarks/bench_defaults.py                       # Shakespeare to train, the King James Bible to score
    python benchmarks/bench_defaults.py --variant lr2e-3="--lr 2e-3" --variant no-posterior="--posterior-fraction 0"
    python benchmarks/bench_defaults.py --quick --work /tmp/q --out /tmp/q/defaults   # toy sizes, seconds

The runs are the CLI's own commands (subprocesses), so "default flags" means exactly what a user types: only the
shape (hidden 128, 4 layers), the step counts (600 + 600), the data and the run folders are given. The training
text is the first 97% of the lines of --data (its last 3% is the validation text the runs report on); the score is
the exact LM perplexity on the last 3% of the lines of --other, which no run sees. Each --variant NAME="FLAGS" adds a
bc run from the same stage-1 model with FLAGS on top of the defaults (an ablation). A run whose folder already
holds a finished run of the same command is reused (--fresh trains everything again).

Writes PREFIX.json (every command, number and timing), PREFIX.md (the table) and PREFIX.png (the ratios). Exit status 0 when the default
path meets the target lm_ppl <= 1.10 x the baseline on the other author's text, 1 when it does not.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_training_quality import split_lines  # noqa: E402  the benchmark's line split
from outputs import output  # noqa: E402

TARGET = 1.10
DONE = "bench_command.json"  # written beside a finished run: the command that made it (for reuse)


def run_cli(args: list[str], out: Path | None, fresh: bool, log: Path) -> tuple[dict, float, bool]:
    """Run `bwarea ARGS` (writing run folder ``out``), or reuse ``out`` when it holds this command's finished run.
    -> (the command's last JSON line, or {} ; seconds; reused)."""
    command = [sys.executable, "-m", "bwarea.cli", *args]
    shown = "bwarea " + shlex.join(args)
    if out is not None and not fresh and (out / DONE).is_file():
        done = json.loads((out / DONE).read_text())
        if done["command"] == shown:
            print(f"reusing {out} ({shown})", flush=True)
            return done.get("result", {}), done["seconds"], True
    if out is not None:
        (out / DONE).unlink(missing_ok=True)  # until this command finishes, the folder holds no finished run of it
    print(f"$ {shown}", flush=True)
    start = time.perf_counter()
    with open(log, "a") as sink:
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=sink, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"`{shown}` failed (exit {proc.returncode}); its messages are in {log}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if out is not None:
        (out / DONE).write_text(json.dumps({"command": shown, "seconds": round(seconds, 1), "result": result}))
    return result, seconds, False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HERE.parent.parent / "shared/corpora/shakespeare.txt",
                   help="training text: one file, split by lines (default ../shared/corpora/shakespeare.txt)")
    p.add_argument("--other", type=Path, default=HERE.parent.parent / "shared/corpora/kjv.txt",
                   help="another author's text: its last --holdout-percent of lines score both models "
                        "(default ../shared/corpora/kjv.txt)")
    p.add_argument("--holdout-percent", type=float, default=3.0, help="lines held out at the end of each file")
    p.add_argument("--work", type=Path, default=Path("runs/bench-defaults"), help="run folders, data and logs")
    p.add_argument("--out", type=Path, default=HERE / "results/defaults", help="writes PREFIX.json and PREFIX.md")
    p.add_argument("--steps", type=int, default=600, help="pretrain (and baseline) steps")
    p.add_argument("--bc-steps", type=int, default=600, help="bc steps")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=2048, help="the BPE tokenizer's size")
    p.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                   help="an extra bc run with these flags added to the defaults (repeatable)")
    p.add_argument("--max-blocks", type=int, help="score at most N held-out blocks (default: all)")
    p.add_argument("--fresh", action="store_true", help="train every run again, even if a finished one is there")
    p.add_argument("--no-plot", action="store_true", help="skip PREFIX.png")
    p.add_argument("--quick", action="store_true",
                   help="toy sizes for a test (hidden 32, 2 layers, 4 + 4 steps, blocks of 32): checks the plumbing, "
                        "not the defaults' quality")
    args = p.parse_args(argv)
    for name in ("data", "other"):
        if not getattr(args, name).is_file():
            p.error(f"--{name} {getattr(args, name)} is not a file")
    variants = {}
    for spec in args.variant:
        name, sep, flags = spec.partition("=")
        if not sep or not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            p.error(f"--variant {spec!r}: give NAME=\"FLAGS\" with a NAME of letters, digits, '-', '_', '.'")
        if name == "default" or name in variants:
            p.error(f"--variant {name!r}: the name is taken")
        variants[name] = shlex.split(flags)

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    train, held = split_lines([args.data], args.holdout_percent, work / "data")
    _, other = split_lines([args.other], args.holdout_percent, work / "other")
    tokenizer = work / "tokenizer"
    # Toy sizes are flags a user would give too; the recipe's own settings (lr, warm-up, targets...) stay default.
    size = ["--block-size", "32", "--batch-size", "4", "--heads", "2", "--intermediate-size", "64"] if args.quick else []
    steps, bc_steps = (4, 4) if args.quick else (args.steps, args.bc_steps)
    hidden, layers = (32, 2) if args.quick else (args.hidden_size, args.layers)
    vocab = 300 if args.quick else args.vocab_size
    data = ["--data", *train, "--val-data", *held, "--cache-dir", str(work / "cache")]
    quiet = ["--no-progress"]

    run_cli(["tokenizer", "train", "--data", *train, "--vocab-size", str(vocab), "--out", str(tokenizer)],
            None, args.fresh, log)
    shape = ["--hidden-size", str(hidden), "--layers", str(layers), *size]
    runs = {}
    for name, extra in (("s1", []), ("llama", ["--baseline", "llama"])):
        out = work / name
        cmd = ["pretrain", *extra, *data, "--tokenizer", str(tokenizer), *shape, "--max-steps", str(steps),
               "--out", str(out), *quiet, "--overwrite"]
        _, seconds, reused = run_cli(cmd, out, args.fresh, log)
        runs[name] = {"command": "bwarea " + shlex.join(cmd), "seconds": round(seconds, 1), "reused": reused}
    bc_size = ["--batch-size", "4"] if args.quick else []
    for name, extra in {"default": [], **variants}.items():
        out = work / ("bc" if name == "default" else f"bc-{name}")
        cmd = ["bc", "--model", str(work / "s1"), *data, *bc_size, "--max-steps", str(bc_steps), *extra,
               "--out", str(out), *quiet, "--overwrite"]
        _, seconds, reused = run_cli(cmd, out, args.fresh, log)
        runs[name] = {"command": "bwarea " + shlex.join(cmd), "seconds": round(seconds, 1), "reused": reused,
                      "flags": shlex.join(extra)}

    # Score every model on both held-out texts with `bwarea eval` (the exact LM perplexity).
    limit = ["--max-blocks", str(args.max_blocks)] if args.max_blocks else (["--max-blocks", "4"] if args.quick else [])
    scores = {}
    for name in runs:
        folder = work / {"s1": "s1", "llama": "llama", "default": "bc"}.get(name, f"bc-{name}")
        if name == "s1":
            continue  # stage 1's policy is untrained: not a model anyone would use
        scores[name] = {}
        for text, paths in (("other", other), ("same", held)):
            result, _, _ = run_cli(["eval", str(folder), "--data", *paths, "--cache-dir", str(work / "cache"),
                                    *limit, "--json"], None, True, log)
            scores[name][text] = result
    base = scores.pop("llama")
    rows = []
    for name, score in scores.items():
        rows.append({"name": name, "flags": runs[name]["flags"], "command": runs[name]["command"],
                     "bc_seconds": runs[name]["seconds"],
                     "other_lm_ppl": score["other"]["lm_ppl"], "other_ratio": score["other"]["lm_ppl"] / base["other"]["lm_ppl"],
                     "same_lm_ppl": score["same"]["lm_ppl"], "same_ratio": score["same"]["lm_ppl"] / base["same"]["lm_ppl"],
                     "codes_used": score["other"]["codes_used"], "code_perplexity": score["other"]["code_perplexity"],
                     "bc_accuracy": score["other"]["bc_accuracy"]})
    default = rows[0]
    result = {
        "setup": {"data": str(args.data), "other": str(args.other), "holdout_percent": args.holdout_percent,
                  "steps": steps, "bc_steps": bc_steps, "hidden_size": hidden, "layers": layers, "vocab_size": vocab,
                  "quick": args.quick, "other_tokens": base["other"]["tokens"], "same_tokens": base["same"]["tokens"]},
        "baseline": {"command": runs["llama"]["command"], "seconds": runs["llama"]["seconds"],
                     "other_ppl": base["other"]["lm_ppl"], "same_ppl": base["same"]["lm_ppl"]},
        "stage1": runs["s1"], "rows": rows,
        "target": f"default path: lm_ppl <= {TARGET} x baseline on the other author's text",
        "target_met": default["other_ratio"] <= TARGET,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    output(args.out, ".json").write_text(json.dumps(result, indent=1))
    text = table(result)
    output(args.out, ".md").write_text(text + "\n")
    if not args.no_plot:
        plot(result, output(args.out, ".png"))
    print(text)
    return 0 if result["target_met"] else 1


def plot(r: dict, path: Path) -> None:
    """PREFIX.png: each bc run's lm_ppl / the baseline's, on the other author's text and on the same author's,
    with the target line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, width = r["rows"], 0.38
    fig, ax = plt.subplots(figsize=(max(5.5, 1.6 + 1.5 * len(rows)), 3.8))
    for i, (key, label) in enumerate((("other_ratio", f"{Path(r['setup']['other']).name} (other author)"),
                                      ("same_ratio", f"{Path(r['setup']['data']).name} (held-out lines)"))):
        xs = [j + (i - 0.5) * width for j in range(len(rows))]
        bars = ax.bar(xs, [row[key] for row in rows], width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.axhline(TARGET, color="black", linestyle="--", linewidth=1, label=f"target {TARGET} (other author)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [row["name"] for row in rows])
    ax.set_ylim(0.9, max(TARGET, *(row[k] for row in rows for k in ("other_ratio", "same_ratio"))) + 0.15)
    ax.set_ylabel("BWArea lm_ppl / Llama ppl")
    s = r["setup"]
    ax.set_title(f"pretrain + bc at default flags (hidden {s['hidden_size']}, {s['layers']} layers, "
                 f"{s['steps']} + {s['bc_steps']} steps)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(r: dict) -> str:
    s = r["setup"]
    lines = [f"Baseline (Llama, same flags): ppl {r['baseline']['other_ppl']:.2f} on {Path(s['other']).name}'s last "
             f"{s['holdout_percent']:g}% ({s['other_tokens']} tokens), {r['baseline']['same_ppl']:.2f} on "
             f"{Path(s['data']).name}'s ({s['same_tokens']} tokens).", "",
             "| bc run | extra flags | lm_ppl, other author | / baseline | lm_ppl, same author | / baseline | "
             "codes | code ppl | bc time (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        lines.append(f"| {row['name']} | {row['flags'] or '(none)'} | {row['other_lm_ppl']:.2f} | "
                     f"{row['other_ratio']:.3f} | {row['same_lm_ppl']:.2f} | {row['same_ratio']:.3f} | "
                     f"{row['codes_used']} | {row['code_perplexity']:.1f} | {row['bc_seconds']:.0f} |")
    lines += ["", f"- {'PASS' if r['target_met'] else 'FAIL'}: {r['target']} "
                  f"({r['rows'][0]['other_ratio']:.3f})", "", "Commands:", "",
              "```", r["stage1"]["command"], r["baseline"]["command"], r["rows"][0]["command"], "```"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
