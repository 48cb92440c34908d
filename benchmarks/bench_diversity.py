"""Diversity at equal quality: sampling the latent actions against sampling the tokens.

CoLA, BWArea's follow-up, reports that sampling in the latent-action space gives more diverse text than sampling
tokens at the same quality. Here, for the same prompts, k continuations each by:
  (a) action sampling: the policy samples actions at temperature tau_a (`action_greedy=False,
      action_temperature=tau_a`), tokens greedy (or at --action-token-temperature);
  (b) token sampling: the policy picks its most likely action (`action_greedy=True`), tokens sampled at tau
      (`do_sample=True, temperature=tau`).
tau_a and tau are swept; 0 means greedy, and both curves start at the all-greedy point.

    python benchmarks/bench_diversity.py                          # shipped model; trains the Llama on first use
    python benchmarks/bench_diversity.py --k 16 --new-tokens 64 --action-temps 0.5 1 2 --token-temps 0.5 1
    python benchmarks/bench_diversity.py --quick --model runs/x/bc --baseline runs/x/llama --prompts heldout.txt

Prompts: --num-prompts lines (4 words or more) taken evenly from --prompts (default the held-out text shipped
with the default model, src/bwarea/default_model/heldout.txt), each line plus its newline (cut to its last
tokens if prompt and continuation would not fit the models' positions). Every continuation is
exactly --new-tokens long (EOS is barred until then), so all groups are measured on the same length.

Diversity, within each prompt's k continuations (words: the decoded text split on whitespace), averaged over
prompts:
  distinct-n   distinct word n-grams / all word n-grams of the k continuations (n = 2, 3; higher = more diverse);
  self-BLEU    each continuation's BLEU-4 against the other k - 1 as references, averaged (lower = more
               diverse). Implemented here (no sacrebleu on the CPU machines): clipped n-gram precisions for
               n = 1..4, add-one smoothing for n >= 2 (Lin and Och 2004), brevity penalty against the closest
               reference length, uniform weights.
Quality of the samples (continuation tokens only, given the prompt):
  llama_ppl    perplexity under a Llama of the world model's shape trained on the same data and tokenizer
               (`bwarea pretrain --baseline llama`; --baseline DIR, trained there on first use: the corpora's
               first 97% of lines, the shipped model's recipe, 1200 steps of 64 x 256 tokens, which wants a GPU:
               on 2 CPU cores use --baseline-steps 300 or so and say so);
  bwarea_ppl   BWArea's own exact LM perplexity (`model.lm_log_likelihood`) of them.
"Action sampling dominates" when, at every quality where both curves have points (the action point's llama_ppl
inside the token curve's range, diversity interpolated linearly there), action sampling is the more diverse by
both distinct-2 and self-BLEU. With several --seeds every setting is sampled once per seed: the curves are the
means over seeds (perplexities pooled over all their tokens) with the standard deviation across seeds, and the
verdict is given for the mean curves and for each seed alone. Writes OUT.json and OUT.png (diversity against
quality, both curves, the spread across seeds as error bars).

    python benchmarks/bench_diversity.py --seeds 0 1 2             # three seeds: means, spread, verdict per seed
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training_quality import split_lines  # noqa: E402  the shipped model's held-out split
from outputs import output  # noqa: E402

from bwarea import default_model  # noqa: E402
from bwarea.loading import load  # noqa: E402
from bwarea.train import BaselineStage, PretrainConfig, train  # noqa: E402

CORPORA = Path(__file__).resolve().parents[1].parent / "shared" / "corpora"


# ----------------------------------------------------------------------------------------------------------------
# Diversity measures

def ngrams(words: list[str], n: int) -> list[tuple]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[list[str]], n: int) -> float:
    """Distinct n-grams / all n-grams over the word lists ``texts`` (0 when there are none)."""
    grams = [g for words in texts for g in ngrams(words, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bleu(hypothesis: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Sentence BLEU-4 of a word list against reference word lists: clipped n-gram precisions (add-one smoothed
    for n >= 2), geometric mean, brevity penalty from the reference length closest to the hypothesis's."""
    if not hypothesis:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        counts = Counter(ngrams(hypothesis, n))
        most = Counter()
        for ref in references:
            for gram, c in Counter(ngrams(ref, n)).items():
                most[gram] = max(most[gram], c)
        matches = sum(min(c, most[gram]) for gram, c in counts.items())
        total = sum(counts.values())
        if n == 1:
            if matches == 0:
                return 0.0
            log_precision += math.log(matches / total)
        else:
            log_precision += math.log((matches + 1) / (total + 1))
    closest = min((len(r) for r in references), key=lambda r: (abs(r - len(hypothesis)), r))
    brevity = 1.0 if len(hypothesis) > closest else math.exp(1 - closest / len(hypothesis))
    return brevity * math.exp(log_precision / max_n)


def self_bleu(texts: list[list[str]]) -> float:
    """Mean BLEU of each text against all the others (needs at least two texts)."""
    if len(texts) < 2:
        raise ValueError("self-BLEU needs at least two texts per group")
    return sum(bleu(t, texts[:i] + texts[i + 1:]) for i, t in enumerate(texts)) / len(texts)


def diversity(groups: list[list[str]]) -> dict:
    """groups: per prompt, its k continuations as text -> mean distinct-2, distinct-3 and self-BLEU."""
    words = [[text.split() for text in group] for group in groups]
    return {"distinct_2": float(np.mean([distinct_n(w, 2) for w in words])),
            "distinct_3": float(np.mean([distinct_n(w, 3) for w in words])),
            "self_bleu": float(np.mean([self_bleu(w) for w in words]))}


# ----------------------------------------------------------------------------------------------------------------
# Prompts, the baseline, sampling and scoring

def pick_prompts(path: Path, count: int) -> list[str]:
    """``count`` lines of 4 words or more, evenly spaced through the file, each with its newline."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if len(line.split()) >= 4]
    if len(lines) < count:
        raise SystemExit(f"--prompts {path} has {len(lines)} lines of 4 words or more; --num-prompts asks {count}")
    return [lines[int(i)] + "\n" for i in np.linspace(0, len(lines) - 1, count)]


def train_baseline(args, model_dir: Path, config) -> None:
    """The Llama of the model's world-model shape, with its tokenizer, on the corpora's training split."""
    train_files, held_out = split_lines(args.train_data, args.holdout_percent, args.work / "data")
    train(BaselineStage(), PretrainConfig(
        data=train_files, val_data=held_out, tokenizer=str(model_dir), out=str(args.baseline),
        hidden_size=config.hidden_size, layers=config.num_hidden_layers, heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads, intermediate_size=config.intermediate_size,
        block_size=args.baseline_block_size, batch_size=args.baseline_batch_size, max_steps=args.baseline_steps,
        lr=args.baseline_lr, warmup_steps=min(100, args.baseline_steps // 10), save_every=10**9,
        log_every=max(1, args.baseline_steps // 20), eval_blocks=64, cache_dir=str(args.work / "cache"),
        seed=args.seeds[0], save_dtype="bfloat16", overwrite=True, progress=args.progress))


def encode_prompts(tokenizer, prompts: list[str], room: int) -> list[torch.Tensor]:
    """Each prompt's token ids (P,), cut to its last ``room`` tokens where longer (the model's positions must hold
    prompt and continuation)."""
    if room < 1:
        raise SystemExit(f"--new-tokens leaves no room for a prompt in the model's {room} remaining positions")
    return [torch.tensor(tokenizer(text).input_ids[-room:]) for text in prompts]


@torch.no_grad()
def sample(model, pad_id: int, prompt_ids: list[torch.Tensor], k: int, new_tokens: int, mode: str,
           temperature: float, token_temperature: float, seed: int) -> list[torch.Tensor]:
    """k continuations of each prompt (ids (P,)) -> per prompt its continuations (k, new_tokens).

    mode "action": the policy samples at ``temperature`` (0: greedy), tokens at ``token_temperature`` (0: greedy);
    mode "token": the policy greedy, tokens at ``temperature`` (0: greedy).
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompt_ids):  # left padding, as generate wants
        ids[i, width - len(prompt):], mask[i, width - len(prompt):] = prompt, 1
    ids = ids.repeat_interleave(k, 0).to(device)  # rows: prompt 0 k times, prompt 1 k times, ...
    mask = mask.repeat_interleave(k, 0).to(device)
    token_t = token_temperature if mode == "action" else temperature
    action_t = temperature if mode == "action" else 0.0
    options = dict(do_sample=token_t > 0, action_greedy=action_t == 0)
    if token_t > 0:
        options["temperature"] = token_t
    if action_t > 0:
        options["action_temperature"] = action_t
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(ids, mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, generator=generator,
                         **options)
    return [out[i * k:(i + 1) * k, width:].cpu() for i in range(len(prompt_ids))]


@torch.no_grad()
def continuation_nll(score, prompt_ids: list[torch.Tensor], continuations: list[torch.Tensor], device) -> tuple:
    """Summed NLL of the continuation tokens given their prompt -> (nll, tokens). ``score(ids (k, T))`` gives the
    log-probability of each next token, (k, T - 1)."""
    nll, tokens = 0.0, 0
    for prompt, cont in zip(prompt_ids, continuations):
        ids = torch.cat([prompt.expand(cont.shape[0], -1), cont], dim=1).to(device)
        logp = score(ids)[:, prompt.shape[0] - 1:]  # entry t scores token t + 1: from the first new token on
        nll -= logp.sum().item()
        tokens += logp.numel()
    return nll, tokens


def llama_scorer(llama):
    def score(ids):
        logits = llama(input_ids=ids).logits[:, :-1].float()
        return torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:, None])[..., 0]
    return score


def interpolated(curve: list[dict], x: float, key: str) -> float | None:
    """The token-sampling curve's ``key`` at llama_ppl ``x`` (linear between its points), None outside its range."""
    points = sorted((p["llama_ppl"], p[key]) for p in curve)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if not xs[0] <= x <= xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def dominance(action: list[dict], token: list[dict]) -> dict:
    """Compare each action-sampling point with the token-sampling curve at the same llama_ppl."""
    rows = []
    for point in action:
        d2 = interpolated(token, point["llama_ppl"], "distinct_2")
        sb = interpolated(token, point["llama_ppl"], "self_bleu")
        if d2 is None or point["temperature"] == 0:  # the shared greedy point compares with itself
            continue
        rows.append({"action_temperature": point["temperature"], "llama_ppl": point["llama_ppl"],
                     "distinct_2_action": point["distinct_2"], "distinct_2_token_at_same_ppl": d2,
                     "self_bleu_action": point["self_bleu"], "self_bleu_token_at_same_ppl": sb,
                     "action_more_diverse": point["distinct_2"] > d2 and point["self_bleu"] < sb})
    outside = [p["temperature"] for p in action
               if p["temperature"] > 0 and interpolated(token, p["llama_ppl"], "distinct_2") is None]
    verdict = all(r["action_more_diverse"] for r in rows) if rows else None
    return {"action_sampling_dominates": verdict, "compared": rows,
            "action_temperatures_outside_token_curve": outside,
            "rule": "at every action-sampling point whose llama_ppl lies within the token-sampling curve's range, "
                    "distinct-2 higher and self-BLEU lower than the token curve interpolated at that llama_ppl"}


MEASURES = ("distinct_2", "distinct_3", "self_bleu", "llama_ppl", "bwarea_ppl")


def mean_over_seeds(points: list[dict]) -> dict:
    """One setting's points, one per seed -> their mean (perplexities: pooled over all the seeds' tokens, i.e.
    exp of the token-weighted mean log) and, for two seeds or more, each measure's standard deviation across
    seeds (``<measure>_sd``, ddof 1)."""
    tokens = np.array([p["tokens"] for p in points], dtype=float)
    mean = {"temperature": points[0]["temperature"], "tokens": int(tokens.sum()), "seeds": len(points)}
    for key in MEASURES:
        values = np.array([p[key] for p in points], dtype=float)
        if key.endswith("_ppl"):
            mean[key] = float(np.exp(np.sum(np.log(values) * tokens) / tokens.sum()))
        else:
            mean[key] = float(values.mean())
        if len(points) > 1:
            mean[f"{key}_sd"] = float(values.std(ddof=1))
    return mean


def reusable_points(path: Path, fingerprint: dict) -> tuple[dict, dict]:
    """Points of an earlier run in ``path`` with the same ``fingerprint`` -> ({(seed, policy t, token t): point},
    examples); nothing (and a message saying why) if the file is missing or differs. Seeds the earlier run did
    not sample are sampled anew."""
    if not path.is_file():
        print(f"--reuse: no earlier {path}; sampling every setting", flush=True)
        return {}, {}
    old = json.loads(path.read_text())
    if "per_seed" not in old:
        print(f"--reuse: {path} was written by an older version (no per_seed); sampling every setting", flush=True)
        return {}, {}
    differing = [k for k, v in fingerprint.items() if old["setup"].get(k) != v]
    if differing:
        print(f"--reuse: {path} differs in {', '.join(differing)}; sampling every setting", flush=True)
        return {}, {}
    t = fingerprint["action_token_temperature"]
    points = {}
    for seed, curves in old["per_seed"].items():
        points |= {(int(seed), p["temperature"], t): p for p in curves["action"]}
        points |= {(int(seed), 0.0, p["temperature"]): p for p in curves["token"]}
    print(f"--reuse: {len(points)} settings from {path}", flush=True)
    return points, old.get("examples", {})


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [("llama_ppl", "distinct_2", "distinct-2 (higher: more diverse)"),
              ("llama_ppl", "self_bleu", "self-BLEU (lower: more diverse)"),
              ("bwarea_ppl", "distinct_2", "distinct-2 (higher: more diverse)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (x, y, label) in zip(axes, panels):
        for mode, style, name in (("action", "o-", "action sampling (tau_a; tokens greedy)"),
                                  ("token", "s--", "token sampling (tau; policy greedy)")):
            points = sorted(result["curves"][mode], key=lambda p: p["temperature"])
            spread = [p.get(f"{y}_sd", 0.0) for p in points]  # across seeds; absent for one seed
            ax.errorbar([p[x] for p in points], [p[y] for p in points], yerr=spread if any(spread) else None,
                        fmt=style, capsize=3, label=name)
            for p in points:
                ax.annotate(f"{p['temperature']:g}", (p[x], p[y]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        xlabel = "Llama baseline perplexity of the samples" if x == "llama_ppl" else "BWArea lm_ppl of the samples"
        ax.set(xlabel=xlabel + " (lower: better)", ylabel=label)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    s = result["setup"]
    seeds = s.get("seeds", [s.get("seed")])
    fig.suptitle(f"Diversity vs quality: {s['num_prompts']} prompts x k={s['k']}, {s['new_tokens']} new tokens; "
                 f"model {Path(s['model']).name}; seeds {', '.join(map(str, seeds))}"
                 f"{' (mean, bars: sd across seeds)' if len(seeds) > 1 else ''}; {result['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result: dict) -> str:
    """The curves as a markdown table (means ± sd across seeds where there are several) and the verdicts."""
    def cell(p, key, digits):
        sd = f" ± {p[key + '_sd']:.{digits}f}" if f"{key}_sd" in p else ""
        return f"{p[key]:.{digits}f}{sd}"

    lines = ["| sampling | temperature | distinct-2 | distinct-3 | self-BLEU | Llama ppl | BWArea lm_ppl |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode in ("action", "token"):
        for p in result["curves"][mode]:
            lines.append(f"| {mode} | {p['temperature']:g} | {cell(p, 'distinct_2', 3)} | "
                         f"{cell(p, 'distinct_3', 3)} | {cell(p, 'self_bleu', 3)} | {cell(p, 'llama_ppl', 2)} | "
                         f"{cell(p, 'bwarea_ppl', 2)} |")
    d = result["dominance"]
    lines.append(f"\naction sampling dominates: {d['action_sampling_dominates']} ({len(d['compared'])} points "
                 f"compared; outside the token curve's quality range: {d['action_temperatures_outside_token_curve']})")
    if len(d.get("per_seed", {})) > 1:
        lines.append("per seed: " + ", ".join(f"seed {s}: {v}" for s, v in d["per_seed"].items()))
    return "\n".join(lines)


QUICK = dict(num_prompts=3, k=3, new_tokens=8, action_temps=[0.0, 1.0, 2.0], token_temps=[0.0, 1.0, 2.0],
             baseline_steps=3, baseline_batch_size=2, baseline_block_size=32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="BWArea model folder (default: the shipped model)")
    p.add_argument("--baseline", type=Path, default=Path("runs/bench-diversity/llama"),
                   help="the Llama baseline's folder; trained there if it holds no model")
    p.add_argument("--prompts", type=Path, default=None,
                   help="text file the prompt lines come from (default: the shipped model's heldout.txt)")
    p.add_argument("--num-prompts", type=int, default=20)
    p.add_argument("--k", type=int, default=8, help="continuations per prompt and setting")
    p.add_argument("--new-tokens", type=int, default=40, help="tokens per continuation")
    p.add_argument("--action-temps", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0],
                   help="policy temperatures tau_a for action sampling (0: greedy)")
    p.add_argument("--token-temps", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0],
                   help="token temperatures tau for token sampling (0: greedy)")
    p.add_argument("--action-token-temperature", type=float, default=0.0,
                   help="token temperature under action sampling (0: greedy tokens)")
    p.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+", default=[0],
                   help="sampling seeds: each setting is sampled once per seed (default: 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--work", type=Path, default=Path("runs/bench-diversity"), help="the baseline's data split")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/diversity"),
                   help="output prefix: writes PREFIX.json and PREFIX.png")
    g = p.add_argument_group("the Llama baseline, when --baseline holds none (the shipped model's recipe)")
    g.add_argument("--train-data", type=Path, nargs="+",
                   default=[CORPORA / "shakespeare.txt", CORPORA / "kjv.txt"], help="its corpora")
    g.add_argument("--holdout-percent", type=float, default=3.0, help="last P%% of each file's lines not trained on")
    g.add_argument("--baseline-steps", type=int, default=1200)
    g.add_argument("--baseline-batch-size", type=int, default=64)
    g.add_argument("--baseline-block-size", type=int, default=256)
    g.add_argument("--baseline-lr", type=float, default=2e-3)
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    p.add_argument("--reuse", action="store_true",
                   help="take the settings already in OUT.json (same model, baseline, prompts, k, length, seed) "
                        "from there; sample only the new ones")
    p.add_argument("--plot-only", action="store_true", help="no sampling: redraw OUT.png from OUT.json")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--quick", action="store_true",
                   help="toy scale for tests: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.k < 2:
        p.error(f"--k must be >= 2 (self-BLEU compares continuations), got {args.k}")
    for name in ("action_temps", "token_temps"):
        if any(t < 0 for t in getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.action_token_temperature < 0:
        p.error(f"--action-token-temperature must be >= 0, got {args.action_token_temperature}")
    if len(set(args.seeds)) < len(args.seeds):
        p.error(f"--seeds repeats a seed: {args.seeds}")

    if args.plot_only:
        if not output(args.out, ".json").is_file():
            p.error(f"--plot-only reads {output(args.out, '.json')}, which does not exist")
        result = json.loads(output(args.out, ".json").read_text())
        plot(result, output(args.out, ".png"))
        print(table(result))
        return 0

    start = time.perf_counter()
    torch.manual_seed(args.seeds[0])
    model_dir = Path(args.model) if args.model is not None else default_model.path()
    prompts = pick_prompts(args.prompts or default_model.DIR / "heldout.txt", args.num_prompts)
    model, tokenizer = load(model_dir, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device = next(model.parameters()).device
    if not (args.baseline / "model.safetensors").is_file():
        print(f"no Llama baseline in {args.baseline}: training one ({args.baseline_steps} steps)", flush=True)
        for f in args.train_data:
            if not f.is_file():
                p.error(f"--train-data {f} is not a file (the baseline trains on it)")
        train_baseline(args, model_dir, model.config)
    from transformers import LlamaForCausalLM
    llama = LlamaForCausalLM.from_pretrained(str(args.baseline), dtype=torch.float32).to(device).eval()
    if llama.config.vocab_size < len(tokenizer):
        raise SystemExit(f"--baseline {args.baseline} has a {llama.config.vocab_size}-token vocabulary, the model's "
                         f"tokenizer {len(tokenizer)}: train the baseline with the model's tokenizer")

    prompt_ids = encode_prompts(tokenizer, prompts, min(model.config.max_position_embeddings,
                                                        llama.config.max_position_embeddings) - args.new_tokens)
    weights = Path(model_dir) / "model.safetensors"
    # What a sampled point depends on: --reuse takes points from an earlier OUT.json only where all of it agrees.
    fingerprint = {
        "model_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.is_file() else None,
        "baseline_training": json.loads((args.baseline / "training.json").read_text())
        if (args.baseline / "training.json").is_file() else None,
        "prompts": prompts, "k": args.k, "new_tokens": args.new_tokens,
        "action_token_temperature": args.action_token_temperature}
    # (seed, policy temperature, token temperature) -> point; the all-greedy point is in both curves
    done, examples = {}, {}
    if args.reuse:
        done, examples = reusable_points(output(args.out, ".json"), fingerprint)
    settings = [("action", t) for t in args.action_temps] + [("token", t) for t in args.token_temps]
    per_seed = {seed: {"action": [], "token": []} for seed in args.seeds}
    jobs = [(seed, mode, t) for seed in args.seeds for mode, t in settings]
    for seed, mode, temperature in tqdm(jobs, desc="sampling", disable=not args.progress):
        key = (seed, temperature, args.action_token_temperature) if mode == "action" else (seed, 0.0, temperature)
        if key not in done:
            conts = sample(model, tokenizer.pad_token_id, prompt_ids, args.k, args.new_tokens, mode, temperature,
                           args.action_token_temperature, seed)
            texts = [[tokenizer.decode(row, skip_special_tokens=True) for row in group] for group in conts]
            llama_nll, n = continuation_nll(llama_scorer(llama), prompt_ids, conts, device)
            bwarea_nll, _ = continuation_nll(model.lm_log_likelihood, prompt_ids, conts, device)
            done[key] = {"temperature": temperature, **diversity(texts), "llama_ppl": math.exp(llama_nll / n),
                         "bwarea_ppl": math.exp(bwarea_nll / n), "tokens": n}
            if seed == args.seeds[0]:
                examples[f"{mode}@{temperature:g}"] = {"prompt": prompts[0], "continuations": texts[0][:3]}
        per_seed[seed][mode].append({**done[key], "temperature": temperature})
    curves = {mode: [mean_over_seeds([per_seed[seed][mode][i] for seed in args.seeds])
                     for i in range(len(per_seed[args.seeds[0]][mode]))] for mode in ("action", "token")}

    result = {
        "claim": "sampling in the latent-action space gives more diverse text than sampling tokens at equal "
                 "quality (CoLA, the follow-up of arXiv 2405.17039)",
        "setup": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("out", "progress", "no_plot", "train_data", "reuse", "plot_only")},
                  "model": str(model_dir), "train_data": [str(f) for f in args.train_data], **fingerprint},
        "measures": {"distinct_n": "distinct word n-grams / all word n-grams within a prompt's k continuations, "
                                   "mean over prompts",
                     "self_bleu": "BLEU-4 of each continuation against the other k-1 (clipped precisions, add-one "
                                  "smoothing for n >= 2, brevity penalty), mean over continuations and prompts",
                     "llama_ppl": "perplexity of the continuation tokens given the prompt under the Llama baseline",
                     "bwarea_ppl": "BWArea's exact LM perplexity (lm_log_likelihood) of the same tokens"},
        "curves": curves,
        "per_seed": {str(seed): c for seed, c in per_seed.items()},
        "examples": examples,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "seconds": round(time.perf_counter() - start, 1),
    }
    # The verdict on the mean curves, and for each seed alone: a claim that holds only on average is weaker.
    result["dominance"] = dominance(curves["action"], curves["token"])
    result["dominance"]["per_seed"] = {str(seed): dominance(c["action"], c["token"])["action_sampling_dominates"]
                                       for seed, c in per_seed.items()}
    verdicts = list(result["dominance"]["per_seed"].values())
    result["dominance"]["in_every_seed"] = all(verdicts) if None not in verdicts else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    output(args.out, ".json").write_text(json.dumps(result, indent=1))
    if not args.no_plot:
        plot(result, output(args.out, ".png"))
    print(table(result))
    print(f"wrote {output(args.out, '.json')}" + ("" if args.no_plot else f" and {output(args.out, '.png')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
