"""The text a model writes, beside the shipped default model's: a judge's perplexity of the samples, their
diversity and repetition, and the samples themselves.

A retrained default model must not write worse text than the one it replaces. Held-out lm_ppl says how well a
model predicts text, not how its own samples read, so this script looks at the samples:
  - the same prompts for both models: --num-prompts lines of 4 words or more, evenly spaced through --prompts
    (default the held-out text shipped with the default model, which neither model was trained on);
  - each model writes --k continuations of each prompt, exactly --new-tokens tokens long (EOS is barred until
    then, so both are measured on the same length), under each setting:
      sampled  `bwarea generate`'s own defaults, read from its parser (tokens at temperature 0.8, top-p 0.95; the
               policy's actions sampled at the model's own action temperature, config.json's action_temperature,
               1 unless it sets one); --action-temperatures tries the candidate at each of several instead
      greedy   `bwarea generate --greedy` (argmax tokens and actions; one continuation per prompt: all k agree)
  - a judge (--judge: a Llama, e.g. the training script's baseline, or a BWArea folder) scores each continuation's
    text given its prompt's text, both tokenized by the judge (the two models' tokenizers may differ);
    judge_ppl = exp(summed NLL / judge tokens).

Reported per model and setting: judge_ppl; the candidate's judge_ppl over the reference's with a 95% interval
from a paired bootstrap over prompts; within each prompt's k continuations distinct-2/3 and self-BLEU (the
measures of bench_diversity.py); repetition, the share of a continuation's word 4-grams that already occurred
earlier in it (greedy loops show up here), averaged; with --train-text, copied, the share of the samples' word
6-grams found in the training text (a judge trained on that text favours text copied from it).
The candidate's text is "not worse" when, under every setting, the interval does not lie wholly above 1, its
repetition is at most the reference's + 0.02 and, where there are k continuations, its distinct-2 is at least the
reference's - 0.02 and its self-BLEU at most the reference's + 0.02 (a lower action temperature cannot buy a lower
judge perplexity with less diverse text).
With --action-temperatures T1 T2 ... the candidate's sampled text is written at each (the greedy setting takes
argmax actions, so it is written once) and the report names the highest T at which the text is not worse
(chosen_action_temperature): the temperature to ship the candidate with, in its config.json. The table, samples
and verdict are those at that T (at the last T tried when none passes).
Writes OUT.json, OUT.md (the table, then --samples prompts with both models' first sampled continuation) and
OUT.png.

    python benchmarks/bench_default_text.py --candidate runs/default-model/final --judge runs/default-model/llama
    python benchmarks/bench_default_text.py --candidate new/ --reference old/ --judge llama/ --num-prompts 64 --k 8
    python benchmarks/bench_default_text.py --candidate new/ --judge llama/ --action-temperatures 1 0.9 0.8 0.7
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_diversity import distinct_n, llama_scorer, ngrams, pick_prompts, self_bleu  # noqa: E402
from outputs import output  # noqa: E402

from bwarea import default_model  # noqa: E402
from bwarea.cli import build_parser  # noqa: E402
from bwarea.commands.inference import generation_options  # noqa: E402
from bwarea.evaluate import load_for_eval  # noqa: E402
from bwarea.loading import load  # noqa: E402
from bwarea.tokenizer import load_tokenizer  # noqa: E402

SETTINGS = {"sampled": [], "greedy": ["--greedy"]}  # `bwarea generate` flags; [] = its defaults
REPETITION_SLACK = 0.02
DIVERSITY_SLACK = 0.02  # on distinct-2 (not lower than the reference's by more) and self-BLEU (not higher)
COPY_N = 6  # word n-grams looked up in the training text: long enough that a hit is copying, not idiom


def training_ngrams(paths: list[Path], n: int = COPY_N) -> set[int]:
    """Hashes of every word n-gram of the text files in ``paths`` (a folder: its *.txt files)."""
    files = []
    for p in paths:
        if not p.exists():
            raise SystemExit(f"--train-text {p}: no such file or folder")
        files += sorted(p.glob("*.txt")) if p.is_dir() else [p]
    if not files:
        raise SystemExit(f"--train-text {' '.join(map(str, paths))}: no .txt files there")
    grams = set()
    for f in files:
        words = f.read_text(encoding="utf-8").split()
        grams.update(hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1))
    return grams


def copied(texts: list[list[str]], grams: set[int], n: int = COPY_N) -> float:
    """Share of the word n-grams of ``texts`` (word lists) found in ``grams`` (0 when there are none)."""
    mine = [hash(g) for words in texts for g in ngrams(words, n)]
    return sum(g in grams for g in mine) / len(mine) if mine else 0.0


def repetition(words: list[str], n: int = 4) -> float:
    """Share of the word n-grams of one text that already occurred earlier in it (0 when it has none)."""
    grams = ngrams(words, n)
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


@torch.no_grad()
def write(model, tokenizer, prompts: list[str], k: int, new_tokens: int, flags: list[str], seed: int) -> list:
    """Each prompt's k continuations (text), written with `bwarea generate`'s options for ``flags``."""
    args = build_parser().parse_args(["generate", "-", "--max-new-tokens", str(new_tokens), *flags])
    options = generation_options(args, model.config.num_actions)
    room = model.config.max_position_embeddings - new_tokens
    if room < 1:
        raise SystemExit(f"--new-tokens {new_tokens} leaves no room for a prompt in the model's positions")
    prompt_ids = [tokenizer(text).input_ids[-room:] for text in prompts]
    width = max(len(p) for p in prompt_ids)
    pad = model.config.pad_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):  # left padding, as generate wants
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    device = model.device
    ids, mask = ids.repeat_interleave(k, 0).to(device), mask.repeat_interleave(k, 0).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(ids, mask, min_new_tokens=new_tokens, generator=generator, **options)[:, width:].cpu()
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in out]
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


def judge_scorer(path: Path, tokenizer_path: Path, device):
    """-> (score(ids (1, T)) -> log-probabilities (1, T - 1) of each next token, tokenizer, max positions)."""
    if not (tokenizer_path / "tokenizer.json").is_file():
        raise SystemExit(f"{tokenizer_path} has no tokenizer.json: give the judge's with --judge-tokenizer")
    judge, kind = load_for_eval(path, device)
    score = llama_scorer(judge) if kind == "llama" else judge.lm_log_likelihood
    return score, load_tokenizer(tokenizer_path), judge.config.max_position_embeddings


@torch.no_grad()
def judge_nll(judge, prompt: str, continuation: str, device) -> tuple[float, int]:
    """Summed NLL of the continuation's judge tokens given the prompt's -> (nll, tokens)."""
    score, tokenizer, positions = judge
    cont = tokenizer(continuation, add_special_tokens=False).input_ids
    if not cont:
        return 0.0, 0
    head = tokenizer(prompt).input_ids[-max(1, positions - len(cont)):]
    ids = torch.tensor([head + cont], device=device)
    logp = score(ids)[0, len(head) - 1:]  # entry t scores token t + 1: the continuation's tokens
    return -logp.float().sum().item(), logp.numel()


def bootstrap_ratio(cand: np.ndarray, ref: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95% interval of judge_ppl(candidate) / judge_ppl(reference) over prompts resampled together.
    cand, ref: (prompts, 2) summed NLL and tokens per prompt."""
    if cand[:, 1].sum() == 0:
        return math.inf, math.inf  # it wrote nothing the judge could score: no text is not "not worse"
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(cand), size=(resamples, len(cand)))
    c, r = cand[picks].sum(1), ref[picks].sum(1)
    # A prompt can get an empty continuation (the model ended at once): a resample of only such prompts has no
    # tokens to average over, and is left out rather than turning the interval into nan.
    scored = (c[:, 1] > 0) & (r[:, 1] > 0)
    ratios = np.exp(c[scored, 0] / c[scored, 1] - r[scored, 0] / r[scored, 1])
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def measure(groups: list[list[str]], prompts: list[str], judge, device, progress: bool = True,
            train_grams: set[int] | None = None) -> tuple:
    """Metrics of one model under one setting -> (metrics, per-prompt (nll, tokens))."""
    per_prompt = np.array([[sum(x) for x in zip(*(judge_nll(judge, p, c, device) for c in group))]
                           for p, group in tqdm(list(zip(prompts, groups)), desc="judging", unit="prompt",
                                                disable=not progress)], dtype=float)
    words = [[c.split() for c in group] for group in groups]
    tokens = per_prompt[:, 1].sum()
    metrics = {"judge_ppl": math.exp(per_prompt[:, 0].sum() / tokens) if tokens else math.inf,
               "judge_tokens": int(tokens),
               "repetition": float(np.mean([repetition(w) for group in words for w in group]))}
    if train_grams is not None:
        metrics["copied"] = copied([w for group in words for w in group], train_grams)
    if len(groups[0]) > 1:
        metrics |= {"distinct_2": float(np.mean([distinct_n(g, 2) for g in words])),
                    "distinct_3": float(np.mean([distinct_n(g, 3) for g in words])),
                    "self_bleu": float(np.mean([self_bleu(g) for g in words]))}
    return metrics, per_prompt


def table(result: dict) -> str:
    names = result["models"]
    lines = ["| setting | model | judge ppl | / reference [95% interval] | distinct-2 | distinct-3 | self-BLEU "
             "| repetition | copied |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda m, key: f"{m[key]:.3f}" if key in m else "-"  # noqa: E731
    for setting, rows in result["settings"].items():
        for role in ("reference", "candidate"):
            m = rows[role]
            ratio = (f"{rows['ratio']:.3f} [{rows['ratio_interval'][0]:.3f}, {rows['ratio_interval'][1]:.3f}]"
                     if role == "candidate" else "1")
            lines.append(f"| {setting} | {role}: {names[role]} | {m['judge_ppl']:.2f} | {ratio} | "
                         f"{fmt(m, 'distinct_2')} | {fmt(m, 'distinct_3')} | {fmt(m, 'self_bleu')} | "
                         f"{m['repetition']:.3f} | {fmt(m, 'copied')} |")
    v = result["verdict"]
    lines.append(f"\nActions sampled at temperature {result['candidate_action_temperature']:g} (candidate) and "
                 f"{result['models_action_temperature']['reference']:g} (reference, its own).")
    lines.append(f"\ncandidate's text not worse: **{v['not_worse']}** ({v['rule']})")
    if result.get("action_temperatures"):
        lines += ["", "| candidate's action temperature | sampled: judge ppl / reference [95% interval] | distinct-2 "
                  "| self-BLEU | repetition | not worse |", "| --- | --- | --- | --- | --- | --- |"]
        for row in result["action_temperatures"]:
            m, (low, high) = row["sampled"]["candidate"], row["sampled"]["ratio_interval"]
            lines.append(f"| {row['action_temperature']:g} | {row['sampled']['ratio']:.3f} [{low:.3f}, {high:.3f}] | "
                         f"{m['distinct_2']:.3f} | {m['self_bleu']:.3f} | {m['repetition']:.3f} | {row['not_worse']} |")
        chosen = result["chosen_action_temperature"]
        lines.append(f"\nchosen action temperature: **{'none passes' if chosen is None else f'{chosen:g}'}** "
                     "(the highest at which the text is not worse)")
    return "\n".join(lines)


def samples_md(result: dict) -> str:
    out = ["## Samples", "", f"The first sampled continuation of each prompt ({result['setup']['new_tokens']} "
           "tokens, `bwarea generate`'s defaults, seed " f"{result['setup']['seed']}).", ""]
    for s in result["samples"]:
        out += [f"**Prompt:** `{s['prompt'].strip()}`", ""]
        for role in ("reference", "candidate"):
            out += [f"- {role}: {json.dumps(s[role], ensure_ascii=False)}"]
        out.append("")
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(result["settings"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "judge_ppl", "judge perplexity of the samples (lower: better)"),
                           (axes[1], "repetition", "repeated word 4-grams (lower: better)")):
        for j, role in enumerate(("reference", "candidate")):
            values = [result["settings"][s][role][key] for s in settings]
            ax.bar(np.arange(len(settings)) + (j - 0.5) * 0.38, values, 0.38,
                   label=f"{role}: {result['models'][role]}")
        ax.set_xticks(np.arange(len(settings)), settings)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    s = result["setup"]
    fig.suptitle(f"{s['num_prompts']} prompts x k={s['k']}, {s['new_tokens']} tokens; judge "
                 f"{result['judge']}; not worse: {result['verdict']['not_worse']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidate", type=Path, required=True, help="the BWArea model folder to judge")
    p.add_argument("--reference", type=Path, default=None, help="the model it would replace (default: the shipped)")
    p.add_argument("--judge", type=Path, required=True, help="the judge: a Llama (or BWArea) folder with tokenizer")
    p.add_argument("--judge-tokenizer", type=Path, default=None,
                   help="the folder of the judge's tokenizer (default: --judge's own)")
    p.add_argument("--prompts", type=Path, default=default_model.path() / "heldout.txt")
    # 128, not fewer: greedy writes one continuation per prompt, and at 32 prompts the same model's greedy
    # repetition measured 0.039 on one prompt set and 0.069 on another, more than REPETITION_SLACK apart.
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="sampled continuations per prompt (>= 2)")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--train-text", type=Path, nargs="+", default=None,
                   help="the training text (files or folders of .txt): report the share of copied word 6-grams")
    p.add_argument("--samples", type=int, default=6, help="prompts whose continuations OUT.md shows")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the prompts")
    p.add_argument("--action-temperatures", type=float, nargs="+", default=None, metavar="T",
                   help="write the candidate's sampled text at each action temperature T and name the highest at "
                        "which it is not worse (default: only the candidate's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/default_model_text"),
                   help="writes OUT.json, OUT.md and OUT.png")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    for name in ("num_prompts", "new_tokens", "bootstrap"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.k < 2:
        p.error("--k must be >= 2 (diversity is measured within each prompt's continuations)")
    temperatures = args.action_temperatures
    if temperatures is not None:
        if not all(math.isfinite(t) and t > 0 for t in temperatures):
            p.error(f"--action-temperatures must all be > 0, got {' '.join(map(str, temperatures))}")
        if len(set(temperatures)) != len(temperatures):
            p.error(f"--action-temperatures repeats a value: {' '.join(map(str, temperatures))}")
        temperatures = sorted(temperatures, reverse=True)  # the highest that passes is the one reported
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    prompts = pick_prompts(args.prompts, args.num_prompts)
    judge = judge_scorer(args.judge, args.judge_tokenizer or args.judge, device)
    train_grams = training_ngrams(args.train_text) if args.train_text else None
    paths = {"reference": args.reference or default_model.path(), "candidate": args.candidate}
    start = time.perf_counter()
    # (role, setting, T) -> continuations and (metrics, per-prompt NLL); T None = the model's own action temperature
    written, own_temperature = {}, {}
    for role, path in paths.items():
        model, tokenizer = load(path, device=device)
        own_temperature[role] = model.action_temperature
        for setting, flags in SETTINGS.items():
            k = 1 if setting == "greedy" else args.k
            tried = temperatures if role == "candidate" and setting == "sampled" and temperatures else [None]
            for t in tried:
                extra = [] if t is None else ["--action-temperature", str(t)]
                print(f"{role} ({path}), {setting}{'' if t is None else f' at action temperature {t}'}: "
                      f"{len(prompts)} prompts x {k}", flush=True)
                groups = write(model, tokenizer, prompts, k, args.new_tokens, flags + extra, args.seed)
                written[role, setting, t] = (groups, *measure(groups, prompts, judge, device, args.progress,
                                                              train_grams))
        del model

    @functools.cache  # the greedy setting's comparison is the same at every action temperature tried
    def compare_setting(setting, t):
        """-> (the setting's table rows, its checks), the candidate's text written at action temperature t."""
        ref, cand = written["reference", setting, None], written["candidate", setting, t]
        if ref[2][:, 1].sum() == 0:
            raise SystemExit(f"the reference {paths['reference']} wrote no text the judge could score under "
                             f"'{setting}' ({len(prompts)} prompts): nothing to compare the candidate with")
        rows = {"reference": ref[1], "candidate": cand[1]}
        rows["ratio"] = cand[1]["judge_ppl"] / ref[1]["judge_ppl"]
        rows["ratio_interval"] = bootstrap_ratio(cand[2], ref[2], args.bootstrap, args.seed)
        c, r = cand[1], ref[1]
        checks = {"judge_ppl_not_significantly_higher": rows["ratio_interval"][0] <= 1,
                  "repetition_within_slack": c["repetition"] <= r["repetition"] + REPETITION_SLACK}
        if "distinct_2" in r:
            checks |= {"distinct_2_within_slack": c["distinct_2"] >= r["distinct_2"] - DIVERSITY_SLACK,
                       "self_bleu_within_slack": c["self_bleu"] <= r["self_bleu"] + DIVERSITY_SLACK}
        return rows, checks

    def compare(t):
        """The settings table and the checks with the candidate's sampled text at action temperature t."""
        both = {setting: compare_setting(setting, t if setting == "sampled" else None) for setting in SETTINGS}
        settings = {setting: rows for setting, (rows, _) in both.items()}
        checks = {setting: checks for setting, (_, checks) in both.items()}
        return settings, checks, all(all(c.values()) for c in checks.values())

    tried = temperatures or [None]
    compared = {t: compare(t) for t in tried}
    passing = [t for t in tried if compared[t][2]]
    shown = passing[0] if passing else tried[-1]
    settings, checks, not_worse = compared[shown]
    texts = {(role, setting): written[role, setting, shown if role == "candidate" and setting == "sampled"
                                      else None][0] for role in paths for setting in SETTINGS}
    result = {
        "benchmark": "bench_default_text", "device": str(device), "platform": platform.platform(),
        "torch": torch.__version__, "seconds": round(time.perf_counter() - start, 1),
        "models": {role: str(path) for role, path in paths.items()}, "judge": str(args.judge),
        # The action temperature each model samples at by default (its config's), and the candidate's in the
        # table: the chosen one with --action-temperatures.
        "models_action_temperature": own_temperature,
        "candidate_action_temperature": own_temperature["candidate"] if shown is None else shown,
        "judge_tokenizer": str(args.judge_tokenizer or args.judge),
        "setup": {"prompts": str(args.prompts), "num_prompts": len(prompts), "k": args.k,
                  "new_tokens": args.new_tokens, "seed": args.seed, "bootstrap": args.bootstrap,
                  "train_text": [str(t) for t in args.train_text or []], "copied_ngram": COPY_N,
                  "settings": {s: (f or ["(bwarea generate defaults)"]) for s, f in SETTINGS.items()}},
        "settings": settings,
        "verdict": {"not_worse": not_worse, "checks": checks,
                    "rule": "under every setting: the 95% bootstrap interval of the judge-perplexity ratio "
                            "does not lie wholly above 1, and repetition <= the reference's + "
                            f"{REPETITION_SLACK}; with k continuations, distinct-2 >= the reference's - "
                            f"{DIVERSITY_SLACK} and self-BLEU <= the reference's + {DIVERSITY_SLACK}"},
        "action_temperatures": None if temperatures is None else [
            {"action_temperature": t, "not_worse": compared[t][2], "checks": compared[t][1],
             "sampled": {key: compared[t][0]["sampled"][key] for key in ("candidate", "ratio", "ratio_interval")}}
            for t in temperatures],
        "chosen_action_temperature": (passing[0] if passing else None) if temperatures else None,
        "samples": [{"prompt": prompts[i], "reference": texts["reference", "sampled"][i][0],
                     "candidate": texts["candidate", "sampled"][i][0]}
                    for i in range(min(args.samples, len(prompts)))],
        "texts": {f"{role}/{setting}": groups for (role, setting), groups in texts.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    output(args.out, ".json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    md = f"# The text the models write\n\n{table(result)}\n\n{samples_md(result)}"
    output(args.out, ".md").write_text(md)
    if args.no_plot:
        pass
    elif importlib.util.find_spec("matplotlib") is None:
        print("no plot: matplotlib is not installed (pip install matplotlib, or pass --no-plot)", flush=True)
    else:
        plot(result, output(args.out, ".png"))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
