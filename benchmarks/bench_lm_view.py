"""The language-model view's cost: ``model(ids)`` (the exact mixture over the 64 actions) against one plain forward.

Setup: the shipped model (float32), a batch of --batch rows of --tokens tokens from its held-out text. Timed side
by side, interleaved, median of --repeats:

  plain      model(ids, action_idx=0): the world model once under one action (what a Llama-style LM costs)
  inverse    model.forward_inverse(ids): the training view (inverse dynamics + world model)
  mixture    model(ids): lm_logprobs, log sum_a pi(a | x_<=t) p_world(. | x_<=t, a) at every position
  chunk=N    lm_logprobs with N actions per chunk (memory against speed; the default picks the chunk)

The mixture runs the world model's upper half (from the action layer on) and the LM head once per (position,
action); the inverse dynamics, the policy, the lower half and the context's keys/values run once. Its floor is
therefore about num_actions x (upper half + LM head) / (whole world model) in products alone.

Examples:
  python benchmarks/bench_lm_view.py                          # batch 4 x 128 tokens, 2 threads
  python benchmarks/bench_lm_view.py --batch 1 --tokens 512 --chunks 1 8 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from bwarea import default_model
from bwarea.loading import load


def held_out_ids(tokenizer, batch: int, tokens: int) -> torch.Tensor:
    """(batch, tokens) ids: consecutive windows of the shipped held-out text (repeated if it is short)."""
    text = (default_model.path() / "heldout.txt").read_text()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    need = batch * tokens
    ids = (ids * (need // max(1, len(ids)) + 1))[:need]
    return torch.tensor(ids).view(batch, tokens)


def upper_fraction(model) -> float:
    """Products per token of (upper half + LM head) over those of the whole world model (+ LM head)."""
    w = model.world_model
    block = sum(p.numel() for p in w.layers[0].parameters() if p.dim() == 2)
    head = w.lm_head.weight.numel()
    upper = (len(w.layers) - w.action_layer) * block + head
    return upper / (len(w.layers) * block + head)


def peak_mb(args, variant: str) -> float:
    """Peak resident memory that ``variant`` adds over the model after one plain forward, in MB, in a fresh
    process (freed buffers stay with the allocator, so each variant needs its own)."""
    out = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--tokens", str(args.tokens),
                          "--threads", str(args.threads), "--probe", variant], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def probe(args, model, ids) -> None:
    """Print the peak resident memory above the resting level while ``args.probe`` runs (sampled every ms)."""
    run = (lambda: model(ids)) if args.probe == "mixture" else (
        lambda: model.lm_logprobs(ids, actions_per_chunk=int(args.probe[6:])))
    with torch.no_grad():
        model(ids, action_idx=0)
        before, peak, done = resident_mb(), [0.0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], resident_mb())
                time.sleep(0.001)
        sampler = threading.Thread(target=sample)
        sampler.start()
        run()
        done.set()
        sampler.join()
    print(max(0.0, peak[0] - before))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("Examples:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed runs per variant (median kept)")
    parser.add_argument("--chunks", type=int, nargs="*", default=[], help="also time these actions_per_chunk")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lm-view-cpu.json")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load()
    ids = held_out_ids(tokenizer, args.batch, args.tokens)
    if args.probe:
        return probe(args, model, ids)
    variants = {
        "plain": lambda: model(ids, action_idx=0),
        "inverse": lambda: model.forward_inverse(ids),
        "mixture": lambda: model(ids),
    } | {f"chunk={c}": (lambda c=c: model.lm_logprobs(ids, actions_per_chunk=c)) for c in args.chunks}
    times = {name: [] for name in variants}
    with torch.no_grad():
        for run in variants.values():
            run()  # warm-up
        for _ in range(args.repeats):
            for name, run in variants.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    plain = medians["plain"]
    n = model.config.num_actions
    buffer_mb = args.batch * args.tokens * model.config.vocab_size * 4 / 2**20
    rows = [dict(variant=name, ms=1e3 * m, ratio_vs_plain=m / plain, runs_ms=[1e3 * t for t in times[name]])
            for name, m in medians.items()]
    if not args.no_memory:
        for r in rows:
            if r["variant"] == "mixture" or r["variant"].startswith("chunk="):
                r["extra_peak_mb"] = peak_mb(args, r["variant"])
    report = dict(
        setup=dict(model="shipped default", batch=args.batch, tokens=args.tokens, threads=args.threads,
                   repeats=args.repeats, dtype="float32", num_actions=n, vocab_size=model.config.vocab_size,
                   logits_buffer_mb=buffer_mb, device=platform.processor() or "cpu", torch=torch.__version__,
                   load_average=list(os.getloadavg())),
        rows=rows,
        floor_ratio_products=n * upper_fraction(model),
    )
    print(f"shipped model, batch {args.batch} x {args.tokens} tokens, {args.threads} threads, median of "
          f"{args.repeats}; one (batch, seq, vocab) float32 buffer is {buffer_mb:.1f} MB")
    print(f"{'variant':<10} {'ms':>10} {'x plain':>8} {'+peak MB':>9}")
    for r in report["rows"]:
        peak = f"{r['extra_peak_mb']:9.1f}" if "extra_peak_mb" in r else f"{'-':>9}"
        print(f"{r['variant']:<10} {r['ms']:10.1f} {r['ratio_vs_plain']:8.1f} {peak}")
    print(f"products alone: the mixture does {report['floor_ratio_products']:.1f}x a plain forward's")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
