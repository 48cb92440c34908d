"""GPU decoding at the released BWArea shape, against transformers' Llama and the card's memory bandwidth.

The released checkpoint's shape (world model of TinyLlama-1.1B's shape, inverse dynamics of half its depth, a
policy of the world model's shape; 64 actions), random weights, bf16. For batch 1, 8 and 64 (prompt --prompt,
--new new tokens forced with min_new_tokens, greedy):

* BWArea ``generate`` on each decode backend: ``cuda`` (CUDA graphs), ``cuda-compile`` (torch.compile, then
  graphs) and ``eager`` (the model's blocks, launched one by one);
* transformers' ``LlamaForCausalLM.generate`` with world + policy layers (44: the same per-token compute as a
  BWArea decode step), eager (its dynamic cache), and with its static cache, which transformers compiles;
* the bandwidth limit: the bytes of policy and world-model weights a decode step reads, over the card's
  bandwidth (measured with a device-to-device copy, and the vendor's figure).

Then prefill tokens/s at --prefill tokens, the peak memory of the largest batch, one GRPO rollout-plus-update step
on the policy (``bwarea.rl``), and bf16 agreement of each backend with eager at this scale. Every section is
timed against --budget seconds; a section that would not fit is skipped and says so. The JSON is rewritten
after every section, so a run cut short keeps what it measured.

Examples:
  python benchmarks/bench_gpu.py                                    # the whole run (about 5 minutes on an H200)
  python benchmarks/bench_gpu.py --budget 120 --batch 1             # batch 1 only, two minutes at most
  python benchmarks/bench_gpu.py --quick --device cpu               # a smoke run of the script, tiny shape
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from bench_generation import PEAK_BANDWIDTH_GBS, decode_weight_bytes  # noqa: E402

from bwarea import BWAreaConfig, BWAreaForCausalLM  # noqa: E402

SHAPES = {
    "released-2.7b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                          inverse_layers=11, policy_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, inverse_layers=2,
                 policy_layers=4, num_attention_heads=4, num_key_value_heads=2),
}


class Report:
    """The JSON report, written after every section."""

    def __init__(self, path: Path, budget: float):
        self.path, self.start, self.budget = path, time.monotonic(), budget
        self.data = {"sections": {}, "skipped": [], "errors": []}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def section(self, name, fn, needs: float):
        """Run fn() -> dict if ``needs`` seconds are left; keep its result or its error."""
        if self.left() < needs:
            self.data["skipped"].append(f"{name}: needs ~{needs:.0f} s, {self.left():.0f} s left")
            print(f"-- skipped {name} (budget)", flush=True)
            return None
        print(f"-- {name} ({self.left():.0f} s left)", flush=True)
        began = time.monotonic()
        try:
            result = fn()
            self.data["sections"][name] = result
            return result
        except Exception as err:  # one broken section must not cost the others' numbers
            self.data["errors"].append({"section": name, "error": f"{type(err).__name__}: {err}",
                                        "trace": traceback.format_exc()[-3000:]})
            print(f"!! {name}: {type(err).__name__}: {err}", flush=True)
            return None
        finally:
            print(f"   {name}: {time.monotonic() - began:.1f} s", flush=True)
            self.write()

    def write(self):
        self.data["seconds"] = time.monotonic() - self.start
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def build(shape, dtype, device, max_len):
    s = SHAPES[shape]
    torch.manual_seed(0)
    with torch.device(device):
        bwarea = BWAreaForCausalLM(BWAreaConfig(**s, max_position_embeddings=max_len)).to(dtype).eval()
        layers = s["num_hidden_layers"] + s["policy_layers"]
        llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
            num_hidden_layers=layers, num_attention_heads=s["num_attention_heads"],
            num_key_value_heads=s["num_key_value_heads"], max_position_embeddings=max_len)).to(dtype).eval()
    return bwarea, llama, f"Llama-{layers}"


def bw_generate(model, backend, ids, new):
    return model.generate(ids, max_new_tokens=new, min_new_tokens=new, action_greedy=True, backend=backend)


def llama_generate(model, ids, new, static):
    extra = {"cache_implementation": "static"} if static else {}
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0, **extra)


def decode_rows(name, fn, ids, args, device) -> dict:
    """Warm up (a compile, a capture), then the median of --repeats full runs and of 2-token runs: tokens/s,
    the decode step and the prefill it contains."""
    with torch.inference_mode():
        fn(ids, 4)
        fn(ids, 4)
        full = [timed(lambda: fn(ids, args.new), device) for _ in range(args.repeats)]
        short = [timed(lambda: fn(ids, 2), device) for _ in range(args.repeats)]
    total, two = statistics.median(full), statistics.median(short)
    step = (total - two) / (args.new - 2)
    return dict(model=name, batch=ids.shape[0], seconds=total, tokens_per_s=ids.shape[0] * args.new / total,
                decode_step_ms=1e3 * step, decode_tokens_per_s=ids.shape[0] / step, runs=full)


def copy_bandwidth_gbs(device) -> float | None:
    """Device-to-device copy of 2 GiB, bytes read + written per second (what a weight-streaming step can get)."""
    if device.type != "cuda":
        return None
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    times = [timed(lambda: y.copy_(x), device) for _ in range(5)]
    return 2 * x.numel() / min(times) / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("Examples:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="the tiny shape, float32, few tokens: a smoke run")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=420, help="seconds for the whole run (default 420)")
    parser.add_argument("--compiled-batches", type=int, nargs="*", default=[1, 8],
                        help="batches for the compiled paths (cuda-compile, Llama static), which compile per "
                             "shape (default 1 8)")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/gpu-<card>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = "tiny" if args.quick else "released-2.7b"
    dtype = torch.float32 if args.quick else torch.bfloat16
    if args.quick:
        args.new, args.prompt, args.prefill, args.repeats = 8, 8, 64, 1
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    out = args.out or Path(__file__).parent / "results" / f"gpu-{card.split()[-1].lower()}.json"
    report = Report(out, args.budget)
    max_len = max(args.prompt + args.new, args.prefill) + 8
    bwarea, llama, llama_name = build(shape, dtype, device, max_len)
    backends = ["cuda", "cuda-compile", "eager"] if device.type == "cuda" else ["static", "eager"]
    weight_bytes = decode_weight_bytes(bwarea)
    copy_gbs = copy_bandwidth_gbs(device)
    vendor = next((v for k, v in PEAK_BANDWIDTH_GBS.items() if k in card), None)
    report.data["setup"] = dict(shape=shape, **SHAPES[shape], dtype=str(dtype), device=card, prompt=args.prompt,
                                new_tokens=args.new, repeats=args.repeats, torch=torch.__version__,
                                transformers=transformers.__version__, decode_weight_gb=weight_bytes / 1e9,
                                copy_bandwidth_gbs=copy_gbs, vendor_bandwidth_gbs=vendor,
                                command="python benchmarks/bench_gpu.py " + " ".join(
                                    sys.argv[1:] if argv is None else argv))
    limits = {}
    for name, gbs in (("copy", copy_gbs), ("vendor", vendor)):
        if gbs:
            limits[name] = dict(step_ms=1e3 * weight_bytes / (gbs * 1e9), tokens_per_s_batch1=gbs * 1e9 / weight_bytes)
    report.data["bandwidth_limit"] = limits
    report.write()
    rows = []

    def decode(batch, which):
        ids = torch.randint(3, bwarea.config.vocab_size, (batch, args.prompt), device=device)
        if which == "llama-eager":
            return decode_rows(f"{llama_name} eager", lambda i, n: llama_generate(llama, i, n, False), ids, args, device)
        if which == "llama-static":
            return decode_rows(f"{llama_name} static+compile", lambda i, n: llama_generate(llama, i, n, True), ids,
                               args, device)
        return decode_rows(f"BWArea {which}", lambda i, n: bw_generate(bwarea, which, i, n), ids, args, device)

    def run_decode(batch, which, needs):
        row = report.section(f"decode b{batch} {which}", lambda: decode(batch, which), needs)
        if row:
            rows.append(row)
            if row["model"].startswith("BWArea") and limits:
                row["fraction_of_bandwidth_limit"] = {k: v["step_ms"] / row["decode_step_ms"] for k, v in limits.items()}
            report.data["decode"] = rows
            report.write()

    def prefill():
        ids = torch.randint(3, bwarea.config.vocab_size, (1, args.prefill), device=device)
        with torch.inference_mode():
            bw_generate(bwarea, backends[0], ids, 1)
            llama(ids)
            bw = statistics.median(timed(lambda: bw_generate(bwarea, backends[0], ids, 1), device) for _ in range(3))
            ll = statistics.median(timed(lambda: llama(ids), device) for _ in range(3))
        return {"tokens": args.prefill, "BWArea_tokens_per_s": args.prefill / bw,
                f"{llama_name}_forward_tokens_per_s": args.prefill / ll, "ratio_time": bw / ll,
                "note": "BWArea's prefill runs the inverse dynamics, policy and world model over the prompt"}

    def memory():
        batch = max(args.batch)
        ids = torch.randint(3, bwarea.config.vocab_size, (batch, args.prompt), device=device)
        result = {}
        for name, fn in (("BWArea", lambda: bw_generate(bwarea, backends[0], ids, args.new)),
                         (llama_name, lambda: llama_generate(llama, ids, args.new, False))):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            with torch.inference_mode():
                fn()
            if device.type == "cuda":
                result[name] = {"peak_above_weights_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
        result["batch"], result["weights_mb"] = batch, sum(p.numel() * p.element_size()
                                                           for p in bwarea.parameters()) / 2**20
        return result

    # Cheapest and most telling first: the default backend against Llama's eager generate at every batch; the
    # compiled paths at batch 1; the eager backend; the other sections; the compiled paths at larger batches.
    compiled = [b for b in args.batch if b in args.compiled_batches] if device.type == "cuda" else []
    for batch in args.batch:
        run_decode(batch, backends[0], 30)
        run_decode(batch, "llama-eager", 30)
    for batch in compiled[:1]:
        run_decode(batch, "llama-static", 100)
        run_decode(batch, "cuda-compile", 100)
    for batch in args.batch:
        run_decode(batch, "eager", 30)
    report.section("prefill", prefill, 20)
    report.section("peak memory", memory, 20)
    report.section("grpo step", lambda: grpo_step(bwarea, device, args), 60)
    report.section("bf16 agreement", lambda: agreement(bwarea, backends, device, args), 40)
    for batch in compiled[1:]:
        run_decode(batch, "llama-static", 100)
        run_decode(batch, "cuda-compile", 100)
    report.write()
    print(json.dumps({k: report.data[k] for k in ("bandwidth_limit", "skipped", "errors")}, indent=1))
    for r in rows:
        frac = r.get("fraction_of_bandwidth_limit", {})
        print(f"b{r['batch']:<3} {r['model']:<28} {r['tokens_per_s']:9.1f} tok/s  step {r['decode_step_ms']:7.2f} ms"
              + (f"  {100 * frac.get('vendor', 0):.0f}% of vendor bandwidth" if frac else ""))
    print(f"wrote {out}")


def word_tokenizer(vocab: int):
    """A word-level tokenizer over the model's whole vocabulary ("w0" .. "w<vocab-1>"): random weights write any
    id, and every one must decode for the reward."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w1", eos_token="w2", pad_token="w3",
                                   unk_token="w0")
    fast.padding_side = "left"
    return fast


def grpo_step(model, device, args) -> dict:
    """One GRPO step of ``bwarea.rl`` on the policy: 8 prompts x 8 samples, --new tokens each, the rest frozen."""
    from bwarea.rl import RLConfig, RLTrainer, build_reward_set

    tokenizer = word_tokenizer(model.config.vocab_size)
    prompts = [{"prompt": " ".join(f"w{(7 * i + j) % 500 + 4}" for j in range(16))} for i in range(8)]
    config = RLConfig(algo="grpo", steps=3, batch_size=8, group_size=8, max_new_tokens=min(args.new, 64),
                      tensorboard=False, lr=1e-6)
    rewards = build_reward_set(["length"], task_options={"target_words": 20})
    model.requires_grad_(False)
    with tempfile.TemporaryDirectory() as out:
        trainer = RLTrainer(model, tokenizer, config, out, rewards=rewards, prompts=prompts)
        trainer.step()  # warm-up: captures, allocator, optimiser state
        sync(device)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            metrics = trainer.step()
            sync(device)
            times.append(time.perf_counter() - start)
    return {"rows": 64, "new_tokens": config.max_new_tokens, "step_seconds": min(times),
            "last_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def agreement(model, backends, device, args) -> dict:
    """Greedy 32 tokens at batch 8 on each backend against eager at this scale and dtype: the share of equal
    tokens, the step where each row first differs, and the largest action log-prob difference."""
    ids = torch.randint(3, model.config.vocab_size, (8, args.prompt), device=device)
    kw = dict(max_new_tokens=32, min_new_tokens=32, action_greedy=True, return_dict_in_generate=True)
    with torch.inference_mode():
        ref = model.generate(ids, backend="eager", **kw)
        result = {}
        for b in backends:
            if b == "eager":
                continue
            out = model.generate(ids, backend=b, **kw)
            new, ref_new = out.sequences[:, args.prompt:], ref.sequences[:, args.prompt:]
            differs = (new != ref_new).int()
            first = [int(d.argmax()) if bool(d.any()) else None for d in differs]
            result[b] = {"equal_tokens": float((new == ref_new).float().mean()),
                         "first_difference_per_row": first,
                         "max_action_logprob_diff": float((out.action_logprobs - ref.action_logprobs).abs().max())}
    return result


if __name__ == "__main__":
    main()
