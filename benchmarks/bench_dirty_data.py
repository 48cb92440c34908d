"""Dirty data: does BWArea pretraining degrade more than a plain Llama's when training lines are corrupted?

The BWArea paper (arXiv 2405.17039) says its pretraining "does not degenerate" on dirty data. Here, for each noise
rate, the same corrupted training text trains BWArea (stage 1, then behaviour cloning: `bwarea pretrain` then
`bwarea bc` with their default objectives) and the Llama of the world model's shape (`bwarea pretrain --baseline
llama`), and both are scored on CLEAN held-out text: BWArea by its exact LM perplexity (lm_ppl, as `bwarea eval`
gives it), the Llama by its ordinary perplexity. Same tokens, steps, batch and learning rate for both.

    python benchmarks/bench_dirty_data.py    # 0/20/50% noise: 290 s on one H200, est. 15-20 min on 2 idle CPUs
    python benchmarks/bench_dirty_data.py --rates 0 0.5 --steps 300 --bc-steps 300
    python benchmarks/bench_dirty_data.py --seed 1 --out benchmarks/results/dirty_data_seed1 --work runs/dd-seed1
    python benchmarks/bench_dirty_data.py --plot-only --overlay benchmarks/results/dirty_data_seed1.json
    python benchmarks/bench_dirty_data.py --quick --data corpus.txt --other other.txt --work /tmp/dd --out /tmp/dd

Data: --data (default ../shared/corpora/shakespeare.txt) is split by lines: the last --holdout-percent (3%) is the
clean held-out text, the rest the training text (as bench_training_quality.py's split_lines does). One byte-level
BPE is trained on the CLEAN training split and used at every noise rate, so held-out perplexities are per the same
tokens and comparable across rates (the corruption changes what the models learn from, not how text is cut).

Corruption: a share --rates of the non-blank training lines (exactly round(rate x n) of them, chosen at random with
--seed) is replaced, the three kinds mixed equally (a third each, give or take one line):
  random   every word of the line replaced by a word drawn uniformly from the training text's word list (real
           tokens, no sentence; word count kept);
  shuffle  the line's words in a random order that differs from the original (given only to lines with two
           distinct words or more; the JSON counts the kinds actually used);
  other    text of another kind: half the time a random line of --other (default ../shared/corpora/kjv.txt: the King
           James Bible, prose of another register), half a synthetic code or number line (`x_12 = f(403, 77) + 0.58`,
           `2024-05-13,17.42,880,0.031`).
Leading indentation is kept. The JSON holds each rate's counts per kind and a few examples.

Writes OUT.json (setup, corruption counts, per rate both models' held-out perplexities and BWArea's ratio to the
Llama) and OUT.png (held-out perplexity against the noise rate, both models). Finished runs under --work are
reused with --reuse (a run counts as finished when its model.safetensors and training.json exist with the asked
steps).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training_quality import split_lines  # noqa: E402  the same held-out split as the other benchmarks
from outputs import output  # noqa: E402

from bwarea.evaluate import evaluate  # noqa: E402
from bwarea.tokenizer_train import train_tokenizer  # noqa: E402
from bwarea.train import BaselineStage, BCConfig, BCStage, PretrainConfig, PretrainStage, train  # noqa: E402

KINDS = ("random", "shuffle", "other")
KIND_DOCS = {
    "random": "every word replaced by a word drawn uniformly from the training text's word list (word count kept)",
    "shuffle": "the line's words in a random order different from the original (only lines with >= 2 distinct words)",
    "other": "text of another kind: half a random line of --other (default the King James Bible), half a synthetic "
             "code or number line",
}
CORPORA = Path(__file__).resolve().parents[1].parent / "shared" / "corpora"


# ----------------------------------------------------------------------------------------------------------------
# Corruption

def synthetic_line(rng: random.Random) -> str:
    """A line of code or numbers: text unlike anything in a play."""
    name = rng.choice(["x", "total", "buf", "idx", "acc", "node", "tmp"]) + f"_{rng.randrange(100)}"
    templates = [
        lambda: f"{name} = {rng.choice(['f', 'load', 'mix', 'step'])}({rng.randrange(1000)}, {rng.randrange(100)})"
                f" + {rng.random():.2f}",
        lambda: f"for i in range({rng.randrange(2, 64)}): {name}[i] += i * {rng.randrange(10)}",
        lambda: f"if ({name} > {rng.randrange(100)}) {{ return {name} >> {rng.randrange(1, 8)}; }}",
        lambda: f"{2000 + rng.randrange(30)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d},"
                f"{rng.uniform(0, 100):.2f},{rng.randrange(10000)},{rng.random():.3f}",
        lambda: " ".join(f"{rng.randrange(256):02x}" for _ in range(rng.randrange(6, 16))),
    ]
    return rng.choice(templates)()


def corrupt_line(line: str, kind: str, rng: random.Random, vocabulary: list[str], other: list[str]) -> tuple[str, str]:
    """One line -> (corrupted line, the kind actually applied). Keeps the line's indentation and line ending."""
    body = line.rstrip("\r\n")
    ending = line[len(body):]
    indent = body[: len(body) - len(body.lstrip())]
    words = body.split()
    if kind == "shuffle" and len(set(words)) < 2:
        kind = "random"  # one distinct word has no other order
    if kind == "shuffle":
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        new = " ".join(shuffled)
    elif kind == "random":
        new = " ".join(rng.choice(vocabulary) for _ in words)
    elif kind == "other":
        new = rng.choice(other).strip() if other and rng.random() < 0.5 else synthetic_line(rng)
    else:
        raise ValueError(f"unknown corruption kind {kind!r}: use one of {', '.join(KINDS)}")
    if new == body.strip():  # a random draw can repeat the line; corrupted must mean changed
        new = synthetic_line(rng)
    return indent + new + ending, kind


def corrupt_lines(lines: list[str], rate: float, other: list[str], seed: int) -> tuple[list[str], dict]:
    """Corrupt round(rate x non-blank lines) of ``lines`` (kinds mixed equally) -> (new lines, record for the JSON).

    The record says how many lines were eligible (non-blank), asked for, corrupted per kind, and gives examples.
    """
    if not 0 <= rate < 1:
        raise ValueError(f"a noise rate must lie in [0, 1), got {rate}")
    rng = random.Random(seed)
    eligible = [i for i, line in enumerate(lines) if line.strip()]
    count = round(rate * len(eligible))
    chosen = rng.sample(eligible, count)
    vocabulary = sorted({w for line in lines for w in line.split()})
    other = [line for line in other if line.strip()]
    # Equal thirds; `shuffle` goes to lines with two distinct words or more (many lines are one word: "KING."), and
    # the rest alternate between `random` and `other`. chosen is in random order, so each kind gets random lines.
    shufflable = [i for i in chosen if len(set(lines[i].split())) >= 2][: (count + 2) // 3]
    rest = [i for i in chosen if i not in set(shufflable)]
    plan = {i: "shuffle" for i in shufflable} | {i: ("random", "other")[n % 2] for n, i in enumerate(rest)}
    out = list(lines)
    used = {kind: 0 for kind in KINDS}
    examples = {kind: [] for kind in KINDS}
    for index in chosen:
        out[index], kind = corrupt_line(lines[index], plan[index], rng, vocabulary, other)
        used[kind] += 1
        if len(examples[kind]) < 3:
            examples[kind].append({"clean": lines[index].strip(), "corrupted": out[index].strip()})
    changed = sum(a != b for a, b in zip(lines, out))
    record = {"rate_asked": rate, "eligible_lines": len(eligible), "corrupted_lines": count, "changed_lines": changed,
              "rate_actual": count / len(eligible) if eligible else 0.0, "kinds": used, "examples": examples}
    return out, record


def write_corrupted(train_file: Path, other_file: Path | None, rate: float, seed: int, out: Path) -> dict:
    """The corrupted copy of ``train_file`` at ``rate`` -> out/<name>; -> corrupt_lines' record."""
    lines = train_file.read_text(encoding="utf-8").splitlines(keepends=True)
    other = other_file.read_text(encoding="utf-8").splitlines() if other_file else []
    new, record = corrupt_lines(lines, rate, other, seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / train_file.name).write_text("".join(new), encoding="utf-8")
    return record


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation

def finished(run: Path, steps: int) -> bool:
    """True if ``run`` holds a finished model trained for ``steps`` steps (for --reuse)."""
    info = run / "training.json"
    return (run / "model.safetensors").is_file() and info.is_file() and json.loads(info.read_text())["steps"] == steps


def train_rate(args, tokenizer: Path, data: Path, held_out: list[str], runs: Path) -> None:
    """Stage 1, the Llama and BC on ``data`` (a folder of training text) into runs/{s1,llama,bc}."""
    shape = dict(hidden_size=args.hidden_size, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                 intermediate_size=args.intermediate_size)
    common = dict(data=[str(data)], val_data=held_out, block_size=args.block_size, batch_size=args.batch_size,
                  log_every=args.log_every, save_every=10**9, eval_blocks=args.eval_blocks, lr=args.lr,
                  cache_dir=str(args.work / "cache"), overwrite=True, seed=args.seed, progress=args.progress)
    for name, stage in (("s1", PretrainStage()), ("llama", BaselineStage())):
        if not (args.reuse and finished(runs / name, args.steps)):
            train(stage, PretrainConfig(out=str(runs / name), tokenizer=str(tokenizer), max_steps=args.steps,
                                        warmup_steps=min(100, args.steps // 10), **shape, **common))
    if not (args.reuse and finished(runs / "bc", args.bc_steps)):
        # Behaviour cloning of the inverse-dynamics actions, policy started from the world model, no posterior phase:
        # `bwarea bc`'s default when these results were made (it has a posterior phase since).
        train(BCStage(), BCConfig(out=str(runs / "bc"), model=str(runs / "s1"), max_steps=args.bc_steps,
                                  warmup_steps=min(100, args.bc_steps // 10), policy_init="world", targets="inverse",
                                  posterior_fraction=0.0, **common))


def evaluate_rate(args, held_out: list[str], runs: Path) -> dict:
    """Clean held-out numbers of the rate's BWArea (bc) and Llama runs."""
    common = dict(data=held_out, max_blocks=args.max_blocks, cache_dir=args.work / "cache", progress=args.progress)
    bwarea = evaluate(runs / "bc", **common)
    llama = evaluate(runs / "llama", **common)
    keep = ("lm_ppl", "id_ppl", "bc_accuracy", "codes_used", "code_perplexity", "tokens")
    return {"bwarea": {k: bwarea[k] for k in keep}, "llama": {"ppl": llama["lm_ppl"], "tokens": llama["tokens"]},
            "lm_ppl_ratio": bwarea["lm_ppl"] / llama["lm_ppl"]}


def verdict(rows: list[dict], tolerance: float) -> dict:
    """Does BWArea degrade no more than the Llama? Compares each rate's growth of held-out perplexity over the
    clean (rate 0) run: BWArea's growth / the Llama's growth <= 1 + tolerance at every rate."""
    clean = next((r for r in rows if r["rate"] == 0), None)
    if clean is None:
        return {"holds": None, "why": "no rate-0 run to compare against"}
    growth = []
    for r in rows:
        if r["rate"] == 0:
            continue
        b = r["bwarea"]["lm_ppl"] / clean["bwarea"]["lm_ppl"]
        q = r["llama"]["ppl"] / clean["llama"]["ppl"]
        growth.append({"rate": r["rate"], "bwarea_growth": b, "llama_growth": q, "relative": b / q})
    holds = all(g["relative"] <= 1 + tolerance for g in growth) if growth else None
    return {"holds": holds, "tolerance": tolerance, "growth": growth,
            "rule": f"BWArea's held-out lm_ppl grows with the noise rate by at most (1 + {tolerance}) x the Llama's "
                    "growth, at every rate (growth = ppl at the rate / ppl at rate 0)"}


def plot(results: list[dict], path: Path) -> None:
    """Held-out perplexity against the noise rate for both models, and BWArea's ratio to the Llama; one line per
    result (seed), the first solid and labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ratio) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    for n, result in enumerate(results):
        rates = [100 * r["rate"] for r in result["rows"]]
        seed = f" seed {result['setup']['seed']}" if len(results) > 1 else ""
        style = dict(alpha=1.0 if n == 0 else 0.5, lw=1.8 if n == 0 else 1.0)
        ax.plot(rates, [r["bwarea"]["lm_ppl"] for r in result["rows"]], "o-", color="C0",
                label=f"BWArea (exact lm_ppl){seed}", **style)
        ax.plot(rates, [r["llama"]["ppl"] for r in result["rows"]], "s--", color="C1",
                label=f"Llama, same shape (ppl){seed}", **style)
        ratio.plot(rates, [r["lm_ppl_ratio"] for r in result["rows"]], "o-", color="C2", label=seed.strip() or None,
                   **style)
    ax.set(xlabel="corrupted training lines (%)", ylabel="perplexity on clean held-out text",
           title="Dirty pretraining data")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ratio.axhline(1.0, color="grey", lw=0.8)
    ratio.set(xlabel="corrupted training lines (%)", ylabel="BWArea lm_ppl / Llama ppl", title="Ratio")
    ratio.grid(alpha=0.3)
    if len(results) > 1:
        ratio.legend(fontsize=8)
    s, device = results[0]["setup"], results[0]["device"]
    fig.suptitle(f"hidden {s['hidden_size']}, {s['layers']} layers, {s['steps']}+{s['bc_steps']} steps, "
                 f"batch {s['batch_size']}x{s['block_size']}, {device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result: dict) -> str:
    lines = ["| noise | corrupted lines | BWArea lm_ppl | Llama ppl | ratio | codes used |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        c = r["corruption"]
        lines.append(f"| {100 * r['rate']:.0f}% | {c['corrupted_lines']} of {c['eligible_lines']} | "
                     f"{r['bwarea']['lm_ppl']:.2f} | {r['llama']['ppl']:.2f} | {r['lm_ppl_ratio']:.3f} | "
                     f"{r['bwarea']['codes_used']} |")
    v = result["verdict"]
    lines.append("")
    lines.append(f"claim holds here: {v['holds']}  ({v.get('rule', v.get('why'))})")
    for g in v.get("growth", []):
        lines.append(f"  {100 * g['rate']:.0f}%: BWArea ppl x{g['bwarea_growth']:.3f}, Llama x{g['llama_growth']:.3f}")
    return "\n".join(lines)


QUICK = dict(steps=4, bc_steps=3, batch_size=2, block_size=32, hidden_size=32, layers=2, heads=2,
             intermediate_size=64, vocab_size=300, eval_blocks=2, log_every=1, max_blocks=4)


def report(args, rows: list[dict], seconds: float) -> dict:
    """The result so far -> written to OUT.json and returned."""
    result = {
        "claim": "BWArea pretraining does not degenerate when dirty data appears (arXiv 2405.17039)",
        "setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                  if k not in ("out", "reuse", "progress", "no_plot", "overlay", "plot_only")},
        "corruption_kinds": KIND_DOCS,
        "rows": rows,
        "verdict": verdict(rows, args.tolerance),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "seconds": round(seconds, 1),
        "complete": len(rows) == len(args.rates),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    output(args.out, ".json").write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=CORPORA / "shakespeare.txt", help="the corpus (one text file)")
    p.add_argument("--other", type=Path, default=CORPORA / "kjv.txt",
                   help="text of another kind for the 'other' corruption (half its lines; the rest synthetic)")
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.2, 0.5], help="shares of corrupted lines")
    p.add_argument("--holdout-percent", type=float, default=3.0, help="the last P%% of --data's lines, held out")
    p.add_argument("--work", type=Path, default=Path("runs/bench-dirty-data"), help="data, tokenizer and runs")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/dirty_data"),
                   help="output prefix: writes PREFIX.json and PREFIX.png")
    p.add_argument("--steps", type=int, default=600, help="stage-1 and Llama steps")
    p.add_argument("--bc-steps", type=int, default=600, help="behaviour-cloning steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--intermediate-size", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="seed for the corruption, init and data order")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-blocks", type=int, default=64, help="validation blocks at the end of each training run")
    p.add_argument("--max-blocks", type=int, default=None, help="score at most N held-out blocks (default all)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="the verdict's slack: BWArea's perplexity growth may exceed the Llama's by this share")
    p.add_argument("--reuse", action="store_true", help="keep finished runs under --work instead of retraining")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    p.add_argument("--overlay", nargs="+", default=[], metavar="JSON",
                   help="other runs' JSON (e.g. other --seed) drawn in the same plot")
    p.add_argument("--plot-only", action="store_true",
                   help="no training: redraw OUT.png from OUT.json (and --overlay) and print the table")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--quick", action="store_true",
                   help="toy scale for tests: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for name in ("data", "other"):
        if getattr(args, name) is not None and not getattr(args, name).is_file():
            p.error(f"--{name} {getattr(args, name)} is not a file")
    if sorted(set(args.rates)) != sorted(args.rates):
        p.error(f"--rates has a repeated rate: {args.rates}")
    for rate in args.rates:
        if not 0 <= rate < 1:
            p.error(f"--rates must lie in [0, 1), got {rate}")

    for f in args.overlay:
        if not Path(f).is_file():
            p.error(f"--overlay {f} is not a file")
    if args.plot_only:
        if not output(args.out, ".json").is_file():
            p.error(f"--plot-only reads {output(args.out, '.json')}, which does not exist")
        result = json.loads(output(args.out, ".json").read_text())
        plot([result] + [json.loads(Path(f).read_text()) for f in args.overlay], output(args.out, ".png"))
        print(table(result))
        return 0

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    train_files, held_out = split_lines([args.data], args.holdout_percent, args.work / "data")
    tokenizer = args.work / "tokenizer"
    # One tokenizer, from the clean training text, for every rate: perplexities are then per the same tokens.
    train_tokenizer(train_files, args.vocab_size, tokenizer)
    rows = []
    for rate in sorted(args.rates):
        tag = f"noise-{round(100 * rate):02d}"
        print(f"== {tag}: {100 * rate:.0f}% of training lines corrupted", flush=True)
        record = write_corrupted(Path(train_files[0]), args.other, rate, args.seed, args.work / "data" / tag)
        runs = args.work / tag
        train_rate(args, tokenizer, args.work / "data" / tag, held_out, runs)
        rows.append({"rate": rate, "corruption": record, **evaluate_rate(args, held_out, runs)})
        result = report(args, rows, time.perf_counter() - start)  # after every rate: a cut-off run keeps its rows
    if not args.no_plot:
        plot([result] + [json.loads(Path(f).read_text()) for f in args.overlay], output(args.out, ".png"))
    print(table(result))
    print(f"wrote {output(args.out, '.json')}" + ("" if args.no_plot else f" and {output(args.out, '.png')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
