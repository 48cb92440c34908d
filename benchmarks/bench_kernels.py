"""CPU matrix products: torch's F.linear (MKL) against bwarea.kernels (oneDNN), unpacked and packed.

For the generation benchmark's matrices (hidden 256, intermediate 688, vocab 4096; float32) at the row counts
of a decode step (1-8), a batch of prompts (16-1024) and a long evaluation (4096), this times
``F.linear(x, W)``, ``kernels.linear(x, W)`` (oneDNN from kernels.MIN_ROWS rows, else F.linear) and
``kernels.packed_linear(x, pack(W))`` (what decoding uses from 4 rows), and a one-core GFLOP/s figure for MKL
and oneDNN on a large product, which shows which kernels each library picked on this CPU. It prints a table
and writes JSON.

Examples:
  python benchmarks/bench_kernels.py                      # 2 threads, as the generation benchmark
  python benchmarks/bench_kernels.py --threads 1 --repeats 200
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bwarea import kernels

MATRICES = {"qkv": (512, 256), "o": (256, 256), "gate_up": (1376, 256), "down": (256, 688), "lm_head": (4096, 256)}
ROWS = [1, 4, 8, 16, 64, 256, 1024, 4096]


def per_call_us(fn, repeats: int) -> float:
    """Median over 5 rounds of the mean time of ``repeats`` calls, in microseconds."""
    for _ in range(max(3, repeats // 10)):
        fn()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        rounds.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(rounds)


def one_core_gflops(fn, n: int) -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return 2 * n ** 3 / per_call_us(fn, 5) / 1e3
    finally:
        torch.set_num_threads(before)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("Examples:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--rows", type=int, nargs="+", default=ROWS)
    parser.add_argument("--repeats", type=int, default=50, help="calls per timing round (fewer for big products)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels-cpu.json")
    args = parser.parse_args(argv)
    if not kernels.onednn_available():
        raise SystemExit("oneDNN is not usable in this torch build (or BWAREA_ONEDNN=0): nothing to compare")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    big = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    results = []
    with torch.inference_mode():
        gflops = {"mkl": one_core_gflops(lambda: F.linear(*big), 1024),
                  "onednn": one_core_gflops(lambda: torch.ops.mkldnn._linear_pointwise(*big, None, "none", [], ""),
                                            1024)}
        for name, (out_f, in_f) in MATRICES.items():
            w = torch.randn(out_f, in_f, generator=g)
            packed = kernels.pack(w)
            for rows in args.rows:
                x = torch.randn(rows, in_f, generator=g)
                reps = max(3, min(args.repeats, int(args.repeats * 64 / rows)))
                t = {"f_linear_us": per_call_us(lambda: F.linear(x, w), reps),
                     "kernels_linear_us": per_call_us(lambda: kernels.linear(x, w), reps),
                     "packed_linear_us": per_call_us(lambda: kernels.packed_linear(x, packed), reps)}
                results.append(dict(matrix=name, out=out_f, inp=in_f, rows=rows, **t,
                                    speedup_linear=t["f_linear_us"] / t["kernels_linear_us"],
                                    speedup_packed=t["f_linear_us"] / t["packed_linear_us"]))
    report = dict(setup=dict(threads=args.threads, dtype="float32", cpu=platform.processor() or "cpu",
                             torch=torch.__version__, min_rows=kernels.MIN_ROWS),
                  one_core_gflops=gflops, products=results)
    print(f"one core, 1024^3 float32 product: MKL {gflops['mkl']:.0f} GFLOP/s, oneDNN {gflops['onednn']:.0f} GFLOP/s")
    print(f"{'matrix':<8} {'out x in':>11} {'rows':>5} {'F.linear us':>12} {'kernels us':>11} {'packed us':>10} "
          f"{'x linear':>9} {'x packed':>9}")
    for r in results:
        print(f"{r['matrix']:<8} {r['out']:>5} x {r['inp']:<4} {r['rows']:>5} {r['f_linear_us']:12.1f} "
              f"{r['kernels_linear_us']:11.1f} {r['packed_linear_us']:10.1f} {r['speedup_linear']:9.2f} "
              f"{r['speedup_packed']:9.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
