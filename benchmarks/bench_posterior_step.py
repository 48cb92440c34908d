"""What one posterior training step of `bwarea bc` costs, scoring every position or a random few per block
(`--posterior-positions K`), against one behaviour-cloning step of the same batch.

A posterior step scores all 64 actions at each scored position (the world model's upper half and LM head once per
action), then back-propagates -log sum_a pi(a) p_world(x_t+1 | a) into the policy. The cloning step runs the
inverse dynamics and the policy only. Timed side by side, interleaved, median of --repeats, each a full
forward + backward of bc's own objective (`PolicyCloning`) on one batch.

  python benchmarks/bench_posterior_step.py                                   # the shipped model, batch 16 x 256
  python benchmarks/bench_posterior_step.py --model runs/s1 --batch 16 --positions 16 32 64

Writes --out (JSON): seconds per step for each variant and its ratio to a cloning step.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from bwarea import default_model
from bwarea.model import BWAreaForCausalLM
from bwarea.train.bc import PolicyCloning


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model.path()), help="a bwarea model folder (default: shipped)")
    parser.add_argument("--batch", type=int, default=16, help="blocks per step (bc's default 16)")
    parser.add_argument("--block", type=int, default=256, help="tokens per block")
    parser.add_argument("--positions", type=int, nargs="*", default=[16, 32, 64],
                        help="posterior positions per block to time, besides all of them")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed steps per variant (median kept)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "posterior-step-cpu.json")
    args = parser.parse_args(argv)
    if any(k < 1 or k >= args.block - 1 for k in args.positions):
        parser.error(f"--positions must lie in [1, {args.block - 2}] for blocks of {args.block}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = BWAreaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ids = torch.randint(4, model.config.vocab_size, (args.batch, args.block))
    variants = {"cloning": PolicyCloning(model, "inverse"),
                "posterior, all positions": PolicyCloning(model, "posterior"),
                **{f"posterior, {k} positions": PolicyCloning(model, "posterior", posterior_positions=k)
                   for k in args.positions}}

    def step(objective) -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        objective(ids)["loss"].backward()
        return time.perf_counter() - start

    times = {name: [] for name in variants}
    for objective in variants.values():  # warm-up: first calls allocate and pick kernels
        objective.train()
        step(objective)
    for _ in range(args.repeats):
        for name, objective in variants.items():
            times[name].append(step(objective))
    base = statistics.median(times["cloning"])
    rows = [{"variant": name, "seconds": statistics.median(t), "x_cloning_step": statistics.median(t) / base}
            for name, t in times.items()]
    result = {"model": args.model, "batch": args.batch, "block": args.block, "threads": args.threads,
              "repeats": args.repeats, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "rows": rows}
    print(f"{'variant':<28} {'s/step':>8} {'x cloning':>10}")
    for row in rows:
        print(f"{row['variant']:<28} {row['seconds']:8.3f} {row['x_cloning_step']:10.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
