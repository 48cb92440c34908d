"""Generation speed: BWArea's cached decoding against transformers' LlamaForCausalLM.generate, and the fan-out.

Setup: a random-weight BWArea of hidden 256 (8 world-model layers, 4 inverse, 8 policy), 8 heads,
4 KV heads, intermediate 688, vocab 4096, float32, 2 threads; a 32-token prompt, 128 new tokens forced with
min_new_tokens, greedy tokens and greedy actions, batch 1 and 8. The comparison is transformers'
LlamaForCausalLM.generate with world+policy layers (16: the same per-token compute as BWArea's decode step)
and with world layers only (8). Runs are interleaved and repeated; the table reports medians, because a
shared machine's absolute times drift. Targets: BWArea / Llama-16 <= 0.5 at batch 1, <= 0.6 at batch 8;
fan-out over 64 actions at a 128-token context >= 30x faster than 64 separate forward passes.
``--shape released-2.7b`` loads a checkpoint of the released 2.7B shape and format (random bf16 weights, written
once to --cache-dir) and compares it with Llama-44 in bf16. Target: BWArea / Llama-44 <= 0.8 at batch 1.

With --busy, the same decode comparison (BWArea and Llama-16, batch 1 and 8) runs while a second BWArea process
generates in a loop beside it (batch 1, the same shape and threads: a server beside a CLI generate, or two
workers), writing generation-<shape>-<device>-busy.json with that process's throughput and the load average
before, during and after. Target: BWArea / Llama-16 <= 0.8 at batch 1 and 8.

Examples:
  python benchmarks/bench_generation.py                                  # CPU, the issue's setup
  python benchmarks/bench_generation.py --repeats 9 --batch 1            # more repeats, batch 1 only
  python benchmarks/bench_generation.py --device cuda --dtype bfloat16 --shape tinyllama   # 1.1B shape on a GPU
  python benchmarks/bench_generation.py --busy --repeats 5               # beside a second bwarea process
  python benchmarks/bench_generation.py --shape released-2.7b --dtype bfloat16 --batch 1 --new 32 --repeats 3
      # the released 2.7B shape and format on CPU (random weights written once to --cache-dir, 5.4 GB)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from bwarea import BWAreaConfig, BWAreaForCausalLM

SHAPES = {
    "bench": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=8, inverse_layers=4,
                  policy_layers=8, num_attention_heads=8, num_key_value_heads=4),
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      inverse_layers=11, policy_layers=22, num_attention_heads=32, num_key_value_heads=4),
}
# The released checkpoint's shape (world model 1.1B, inverse dynamics 0.5B, policy 1.1B), loaded from a checkpoint
# in the released format with random bf16 weights, written on first use and cached (--cache-dir).
SHAPES["released-2.7b"] = SHAPES["tinyllama"]
RELEASED_SHAPES = {"released-2.7b"}
# HBM bandwidth of the GPUs this runs on, GB/s (vendor figures), to put the achieved number in context.
PEAK_BANDWIDTH_GBS = {"H100": 3350, "H200": 4800, "A100": 2039}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bwarea-bench"


def released_checkpoint(shape: str, cache_dir: Path) -> Path:
    """A released-format checkpoint (``IntentionForCausalLM`` config and keys) of ``shape`` with random bf16
    weights, written once under ``cache_dir`` and reused: what a user downloading the release loads."""
    from safetensors.torch import save_file

    from bwarea import compat

    folder = cache_dir / f"{shape}-released-format"
    if (folder / "model.safetensors").is_file():
        return folder
    s = SHAPES[shape]
    config = BWAreaConfig(**s, max_position_embeddings=2048)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in BWAreaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
             for k, shape in shapes.items()}
    state = compat.to_released_state_dict(state, config)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["IntentionForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": s["vocab_size"], "hidden_size": s["hidden_size"], "intermediate_size": s["intermediate_size"],
        "num_hidden_layers": s["num_hidden_layers"], "num_attention_heads": s["num_attention_heads"],
        "num_key_value_heads": s["num_key_value_heads"], "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "num_code": 64, "num_dim": config.codebook_dim, "bos_token_id": 1,
        "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}, indent=2))
    tmp.replace(folder / "model.safetensors")
    return folder


def build_models(shape: str, dtype, device, max_len: int, only: str | None = None,
                 cache_dir: Path | None = None) -> dict:
    """-> {"BWArea": model, ["BWArea-rowmajor": model,] "Llama-<W+P>": model, "Llama-<W>": model}, random
    weights, eval mode (``only``: just that one). On CPU "BWArea" has its decode weights column-major
    (``optimize_for_cpu_decoding``, as the CLI and server load it) and "BWArea-rowmajor" is the same model as
    stored."""
    s = SHAPES[shape]
    models = {}
    released = shape in RELEASED_SHAPES
    if only is None or only.startswith("BWArea"):
        torch.manual_seed(0)
        if released:
            folder = released_checkpoint(shape, cache_dir or DEFAULT_CACHE)
            bwarea = BWAreaForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        else:
            with torch.device(device):
                bwarea = BWAreaForCausalLM(BWAreaConfig(**s, max_position_embeddings=max_len)).to(dtype).eval()
        if device.type == "cpu" and only in (None, "BWArea-rowmajor") and not released:
            models["BWArea-rowmajor"] = copy.deepcopy(bwarea) if only is None else bwarea
        if only in (None, "BWArea"):
            models["BWArea"] = bwarea.optimize_for_cpu_decoding()
    # At the released scale only the same-compute Llama (world + policy layers): two more would not fit in memory.
    for layers in (s["num_hidden_layers"] + s["policy_layers"],) + (() if released else (s["num_hidden_layers"],)):
        if only not in (None, f"Llama-{layers}"):
            continue
        config = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                             intermediate_size=s["intermediate_size"], num_hidden_layers=layers,
                             num_attention_heads=s["num_attention_heads"],
                             num_key_value_heads=s["num_key_value_heads"], max_position_embeddings=max_len)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # initialise in the benchmark's dtype: no float32 copy of a large model
        try:
            with torch.device(device):
                models[f"Llama-{layers}"] = LlamaForCausalLM(config).to(dtype).eval()
        finally:
            torch.set_default_dtype(default)
    return {name: models[name] for name in ("BWArea", "BWArea-rowmajor") if name in models} | {
        name: m for name, m in models.items() if name.startswith("Llama")}


BACKEND = None  # --backend: the BWArea decode backend (None: the device's default)


def generate(name, model, ids, new_tokens):
    if name.startswith("BWArea"):
        return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, action_greedy=True,
                              backend=BACKEND)
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_weight_bytes(model: BWAreaForCausalLM) -> int:
    """Bytes of weights one decode step reads: the policy and world-model trunks (one embedding row each)."""
    total = 0
    for trunk in (model.policy, model.world_model):
        for name, p in trunk.named_parameters():
            rows = 1 if "embed_tokens" in name else p.shape[0]
            total += rows * p[0].numel() * p.element_size() if p.dim() > 1 else p.numel() * p.element_size()
    return total


def bench_generation(models, args, device) -> list[dict]:
    rows = []
    for batch in args.batch:
        ids = torch.randint(3, SHAPES[args.shape]["vocab_size"], (batch, args.prompt), device=device)
        with torch.inference_mode():
            for name, model in models.items():  # warm-up: first calls pay for kernel and allocator set-up
                for _ in range(2):
                    generate(name, model, ids, 8)
            full, prefill = {n: [] for n in models}, {n: [] for n in models}
            names = list(models)
            for r in range(args.repeats):
                order = names[r % len(names):] + names[:r % len(names)]  # rotate so no model always runs first
                for name in order:
                    full[name].append(timed(lambda: generate(name, models[name], ids, args.new), device))
                    prefill[name].append(timed(lambda: generate(name, models[name], ids, 1), device))
        for name in names:
            total, first = statistics.median(full[name]), statistics.median(prefill[name])
            rows.append(dict(batch=batch, model=name, seconds=total, ms_per_token=1e3 * total / args.new,
                             tokens_per_s=batch * args.new / total, prefill_ms=1e3 * first,
                             decode_step_ms=1e3 * (total - first) / (args.new - 1), runs=full[name]))
        base = {r["model"]: r["seconds"] for r in rows if r["batch"] == batch}
        for r in rows:
            if r["batch"] == batch:
                r.update({f"ratio_vs_{n}": r["seconds"] / base[n] for n in names if n.startswith("Llama")})
    return rows


def peak_memory(models, args, device, rows) -> None:
    """Peak memory of one full generate per (model, batch): CUDA allocator peak, or on CPU the peak RSS growth of
    a fresh process (weights excluded), since CPU tensors have no allocator statistics."""
    for r in rows:
        if device.type == "cuda":
            ids = torch.randint(3, SHAPES[args.shape]["vocab_size"], (r["batch"], args.prompt), device=device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            with torch.inference_mode():
                generate(r["model"], models[r["model"]], ids, args.new)
            r["peak_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
            r["peak_mb_note"] = "CUDA allocator peak during generate, above the weights"
        else:
            probe = [sys.executable, __file__, "--probe", r["model"], str(r["batch"]), "--shape", args.shape,
                     "--cache-dir", str(args.cache_dir),
                     "--dtype", args.dtype, "--prompt", str(args.prompt), "--new", str(args.new),
                     "--threads", str(args.threads)]
            out = subprocess.run(probe, capture_output=True, text=True, check=True)
            r["peak_mb"] = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mb"]
            r["peak_mb_note"] = ("peak RSS growth of a fresh process holding only this model, during its first "
                                 "generate: caches, activations, decode weight copies, libraries' first-use buffers")


def memory_probe(args) -> None:
    """--probe MODEL BATCH: build that model alone, then report the peak RSS growth of one generate: its caches,
    activations and any weight copies it keeps (BWArea's packed or stacked decode weights), and the libraries'
    first-use buffers, which a user's first call pays too."""
    device = torch.device("cpu")
    name, batch = args.probe[0], int(args.probe[1])
    model = build_models(args.shape, DTYPES[args.dtype], device, args.prompt + args.new + 8, only=name, cache_dir=args.cache_dir)[name]
    ids = torch.randint(3, SHAPES[args.shape]["vocab_size"], (batch, args.prompt))
    before = _rss_mb()
    reset = _reset_peak_rss()  # building the model peaked higher: restart the mark from here (Linux)
    with torch.inference_mode():
        generate(name, model, ids, args.new)
    peak = _peak_rss_mb() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_growth_mb": max(0.0, peak - before)}))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def bench_fanout(model, args, device) -> dict:
    """fanout over every action at a --fanout-context context, against one forward pass per action."""
    n = model.config.num_actions
    ids = torch.randint(3, model.config.vocab_size, (1, args.fanout_context), device=device)
    with torch.inference_mode():
        inverse = model.infer_actions(ids)[0][:, :-1]

        def separate():
            for a in range(n):
                model(ids, action_idx=torch.cat([inverse, torch.full_like(inverse[:, :1], a)], dim=1))

        model.fanout(ids)
        separate()
        fan = [timed(lambda: model.fanout(ids), device) for _ in range(args.repeats)]
        sep = [timed(separate, device) for _ in range(max(1, args.repeats // 2))]
    return dict(context=args.fanout_context, actions=n, fanout_ms=1e3 * statistics.median(fan),
                separate_ms=1e3 * statistics.median(sep), speedup=statistics.median(sep) / statistics.median(fan))


def neighbour(args) -> None:
    """--neighbour SECONDS: the second process of --busy. Builds the BWArea model and generates (batch 1, --new
    tokens) in a loop until SIGTERM, until its parent exits, or for SECONDS at most; prints "ready" after its
    first generate, and at the end a JSON line with its generate calls and tokens/s after that first one."""
    device = torch.device("cpu")
    model = build_models(args.shape, DTYPES[args.dtype], device, args.prompt + args.new + 8, only="BWArea", cache_dir=args.cache_dir)["BWArea"]
    ids = torch.randint(3, SHAPES[args.shape]["vocab_size"], (1, args.prompt))
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))  # finish the generate under way, then report
    parent, deadline = os.getppid(), time.monotonic() + args.neighbour
    calls, start = 0, None
    with torch.inference_mode():
        while not stop and os.getppid() == parent and time.monotonic() < deadline:
            generate("BWArea", model, ids, args.new)
            if start is None:
                print("ready", flush=True)
                start = time.perf_counter()
            else:
                calls += 1
    seconds = time.perf_counter() - start if start is not None else 0.0
    print(json.dumps({"generate_calls": calls, "seconds": seconds,
                      "tokens_per_s": calls * args.new / seconds if seconds else 0.0}), flush=True)


def bench_busy(models, args, device) -> tuple[list[dict], dict]:
    """``bench_generation`` while a ``neighbour`` process generates beside it -> (rows, the load: what ran beside,
    its throughput, the load average before it started, when it was ready, and when the timing ended)."""
    command = [sys.executable, __file__, "--neighbour", str(args.busy_seconds), "--shape", args.shape,
               "--cache-dir", str(args.cache_dir),
               "--dtype", args.dtype, "--threads", str(args.threads), "--prompt", str(args.prompt),
               "--new", str(args.new)]
    load = dict(beside=f"a second bwarea process: BWArea '{args.shape}' generate, batch 1, prompt {args.prompt}, "
                       f"{args.new} new tokens, {args.threads} threads, in a loop",
                cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                load_average_before=os.getloadavg())
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the --busy neighbour process stopped before generating (exit code {proc.wait()})")
        load["load_average_ready"] = os.getloadavg()
        rows = bench_generation(models, args, device)
        load["load_average_end"] = os.getloadavg()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out = proc.communicate(timeout=600)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"the --busy neighbour process failed (exit code {proc.returncode})")
    load["neighbour"] = json.loads(lines[-1])
    return rows, load


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("Examples:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--shape", default="bench", choices=sorted(SHAPES))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="new tokens, forced with min_new_tokens")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed runs per model (median kept)")
    parser.add_argument("--fanout-context", type=int, default=128)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-fanout", action="store_true", help="skip the fan-out measurement")
    parser.add_argument("--backend", default=None, help="BWArea decode backend (default: the device's own)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"where --shape released-2.7b keeps its random checkpoint (default {DEFAULT_CACHE})")
    parser.add_argument("--busy", action="store_true",
                        help="time BWArea and Llama-16 decoding while a second bwarea process generates in a loop "
                             "(no fan-out or memory measurement)")
    parser.add_argument("--busy-seconds", type=float, default=3600,
                        help="with --busy: the second process stops after this many seconds at most (default 3600)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default benchmarks/results/generation-<shape>-<device>[-busy].json)")
    parser.add_argument("--probe", nargs=2, metavar=("MODEL", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--neighbour", type=float, metavar="SECONDS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global BACKEND
    BACKEND = args.backend
    torch.set_num_threads(args.threads)
    if args.probe:
        return memory_probe(args)
    if args.neighbour is not None:
        return neighbour(args)
    if args.new < 2:
        parser.error("--new must be at least 2")
    device = torch.device(args.device)
    if args.busy and device.type != "cpu":
        parser.error("--busy measures CPU decoding beside a second CPU process: use --device cpu")
    if args.busy_seconds <= 0:
        parser.error("--busy-seconds must be > 0")
    load_before = os.getloadavg()
    shape, max_len = SHAPES[args.shape], args.prompt + args.new + 8
    llama_big = f"Llama-{shape['num_hidden_layers'] + shape['policy_layers']}"
    if args.busy:
        models = {name: build_models(args.shape, DTYPES[args.dtype], device, max_len, only=name, cache_dir=args.cache_dir)[name]
                  for name in ("BWArea", llama_big)}
        rows, load = bench_busy(models, args, device)
        fan = None
    else:
        models = build_models(args.shape, DTYPES[args.dtype], device, max_len, cache_dir=args.cache_dir)
        rows = bench_generation(models, args, device)
        if not args.no_memory:
            peak_memory(models, args, device, rows)
        fan = None if args.no_fanout else bench_fanout(models["BWArea"], args, device)
        load = dict(beside="nothing started by this benchmark", load_average_before=load_before,
                    load_average_end=os.getloadavg())
    bw = models["BWArea"]
    weight_bytes = decode_weight_bytes(bw)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak_bw = next((v for k, v in PEAK_BANDWIDTH_GBS.items() if k in device_name), None)
    for r in rows:
        if r["model"].startswith("BWArea"):
            r["achieved_weight_bandwidth_gbs"] = weight_bytes / (r["decode_step_ms"] / 1e3) / 1e9
            if peak_bw:
                r["fraction_of_peak_bandwidth"] = r["achieved_weight_bandwidth_gbs"] / peak_bw
    # The goals: the bench shape at 0.5 / 0.6 of Llama's time (0.8 beside a second process); the released
    # 2.7B shape at 0.8, where decoding streams 3.8 GB of weights a step.
    targets = {1: 0.8, 8: 0.8} if args.busy or args.shape in RELEASED_SHAPES else {1: 0.5, 8: 0.6}
    report = dict(
        setup=dict(shape=args.shape, **SHAPES[args.shape], dtype=args.dtype, device=device_name,
                   threads=args.threads, backend=args.backend or "default", prompt=args.prompt,
                   new_tokens=args.new, repeats=args.repeats,
                   decode_weight_mb=weight_bytes / 2**20, peak_bandwidth_gbs=peak_bw,
                   torch=torch.__version__, transformers=transformers.__version__,
                   command="python benchmarks/bench_generation.py " + " ".join(sys.argv[1:] if argv is None else argv)),
        load=load, generation=rows, fanout=fan,
        targets={f"batch {b}: BWArea / {llama_big} <= {t}": next(
            (r[f"ratio_vs_{llama_big}"] <= t for r in rows if r["model"] == "BWArea" and r["batch"] == b), None)
            for b, t in targets.items()} | ({} if fan is None else {"fanout speedup >= 30": fan["speedup"] >= 30}))
    print_table(report, llama_big)
    suffix = "-busy" if args.busy else ""
    out = args.out or Path(__file__).parent / "results" / f"generation-{args.shape}-{device.type}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def print_table(report, llama_big) -> None:
    s = report["setup"]
    print(f"{s['shape']} shape, {s['dtype']}, {s['device']}, {s['threads']} threads; prompt {s['prompt']}, "
          f"{s['new_tokens']} new tokens, median of {s['repeats']}")
    names = [k for k in report["generation"][0] if k.startswith("ratio_vs_")]
    head = f"{'batch':>5} {'model':<15} {'total s':>8} {'ms/tok':>7} {'tok/s':>8} {'prefill ms':>10} " \
           f"{'step ms':>8} {'peak MB':>8} " + " ".join(f"{'/' + n[9:]:>10}" for n in names)
    print(head)
    for r in report["generation"]:
        peak = f"{r['peak_mb']:8.1f}" if "peak_mb" in r else f"{'-':>8}"
        print(f"{r['batch']:>5} {r['model']:<15} {r['seconds']:8.3f} {r['ms_per_token']:7.2f} {r['tokens_per_s']:8.1f} "
              f"{r['prefill_ms']:10.1f} {r['decode_step_ms']:8.2f} {peak} "
              + " ".join(f"{r[n]:10.3f}" for n in names))
    for r in report["generation"]:
        if "achieved_weight_bandwidth_gbs" in r:
            extra = f" ({100 * r['fraction_of_peak_bandwidth']:.0f}% of {s['peak_bandwidth_gbs']} GB/s)" \
                if "fraction_of_peak_bandwidth" in r else ""
            print(f"batch {r['batch']} {r['model']}: decode reads {s['decode_weight_mb']:.0f} MB of weights per step: "
                  f"{r['achieved_weight_bandwidth_gbs']:.1f} GB/s{extra}")
    load = report["load"]
    print(f"beside: {load['beside']}; load average {load['load_average_before'][0]:.2f} before, "
          f"{load['load_average_end'][0]:.2f} at the end")
    if "neighbour" in load:
        n = load["neighbour"]
        print(f"the second process ran {n['generate_calls']} generates, {n['tokens_per_s']:.1f} tokens/s")
    f = report["fanout"]
    if f is not None:
        print(f"fanout over {f['actions']} actions at context {f['context']}: {f['fanout_ms']:.1f} ms vs "
              f"{f['separate_ms']:.1f} ms for separate passes: {f['speedup']:.1f}x")
    for name, ok in report["targets"].items():
        print(f"  {'not run' if ok is None else 'PASS' if ok else 'FAIL'}  {name}")


if __name__ == "__main__":
    main()
