"""The shipped model's held-out perplexity through every evaluation route a user has, side by side.

    python benchmarks/eval_routes.py                       # all four routes, windows of 256 tokens
    python benchmarks/eval_routes.py --routes hflm,cli --lines-per-doc 40 --max-length 256

Routes: ``bwarea eval --data`` (packed blocks, ``lm_ppl``), lm-evaluation-harness's ``HFLM`` in this process,
the ``lm_eval --model hf ... trust_remote_code=True`` command in a fresh process that never imports bwarea, and
lm-eval's ``local-completions`` against a ``bwarea serve`` app on loopback (``tokenized_requests=True``). The
three lm-eval routes score one rolling-perplexity task over the held-out text cut into documents of
``--lines-per-doc`` lines, each document's tokens after one BOS (``add_bos_token=False`` for the Hugging Face
routes: by default HFLM lets the tokenizer add a BOS to the document too and also scores that BOS after lm-eval's
own BOS prefix, which ``local-completions`` does not). They must agree with each other, and their token
perplexity with ``bwarea eval``'s ``lm_ppl`` up to the tokens each one scores (``bwarea eval`` packs the text
into blocks and scores every token but each block's first). Writes
``benchmarks/results/eval-routes.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROUTES = ("bwarea-eval", "hflm", "cli", "local-completions")
TASK = "bw_heldout_rolling"


def write_task(folder: Path, docs: list[str]) -> None:
    data = folder / "heldout.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (folder / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")


def summarise(metrics: dict, docs: list[str], tokenizer) -> dict:
    """lm-eval's rolling metrics -> the same plus the total log-likelihood and the per-token perplexity."""
    words = sum(len(d.split()) for d in docs)
    tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs)
    total = -math.log(metrics["word_perplexity,none"]) * words
    return {"word_perplexity": metrics["word_perplexity,none"], "byte_perplexity": metrics["byte_perplexity,none"],
            "bits_per_byte": metrics["bits_per_byte,none"], "loglikelihood": total, "tokens": tokens,
            "token_perplexity": math.exp(-total / tokens)}


def serve_in_thread(app):
    import uvicorn
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routes", default=",".join(ROUTES), help=f"comma-separated subset of {', '.join(ROUTES)}")
    parser.add_argument("--max-length", type=int, default=256,
                        help="lm-eval's window (default 256: the block size the shipped model was trained on)")
    parser.add_argument("--lines-per-doc", type=int, default=20, help="held-out lines per lm-eval document")
    parser.add_argument("--max-docs", type=int, default=None, help="only the first N documents (a quick run)")
    parser.add_argument("--out", type=Path, default=RESULTS / "eval-routes.json")
    args = parser.parse_args(argv)
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    unknown = sorted(set(routes) - set(ROUTES))
    if unknown:
        parser.error(f"unknown routes {unknown}: choose from {', '.join(ROUTES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import torch
    from bwarea import default_model, evaluate
    from bwarea.loading import load

    model_dir = default_model.path()
    lines = Path(model_dir, "heldout.txt").read_text().splitlines()
    docs = ["\n".join(lines[i:i + args.lines_per_doc]) for i in range(0, len(lines), args.lines_per_doc)]
    docs = docs[:args.max_docs] if args.max_docs else docs
    model, tokenizer = load()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_task(tmp, docs)
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "datasets")
        for route in routes:
            start = time.perf_counter()
            print(f"route {route} ...", file=sys.stderr, flush=True)
            if route == "bwarea-eval":
                text = tmp / "heldout.txt"
                text.write_text("\n".join(docs) + "\n")
                out = evaluate.evaluate(None, text, block_size=args.max_length, progress=False)
                row = {"token_perplexity": out["lm_ppl"], "tokens": out["tokens"], "id_ppl": out["id_ppl"],
                       "note": "packed blocks; each block's first token is context only"}
            elif route == "hflm":
                import lm_eval
                from lm_eval.models.huggingface import HFLM
                from lm_eval.tasks import TaskManager
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, max_length=args.max_length,
                          add_bos_token=False)
                res = lm_eval.simple_evaluate(model=lm, tasks=[TASK], log_samples=False, bootstrap_iters=0,
                                              task_manager=TaskManager(include_path=str(tmp), include_defaults=False))
                row = summarise(res["results"][TASK], docs, tokenizer)
            elif route == "cli":
                lm_eval_exe = Path(sys.executable).with_name("lm_eval")
                cmd = [str(lm_eval_exe), "--model", "hf", "--model_args",
                       f"pretrained={model_dir},trust_remote_code=True,dtype=float32,max_length={args.max_length},"
                       "add_bos_token=False",
                       "--tasks", TASK, "--include_path", str(tmp), "--device", "cpu", "--batch_size", "8",
                       "--output_path", str(tmp / "cli-out")]
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
                if done.returncode != 0:
                    raise RuntimeError(f"lm_eval exited {done.returncode}:\n{done.stderr[-3000:]}")
                found = sorted((tmp / "cli-out").rglob("results*.json"))
                res = json.loads(found[-1].read_text())
                row = summarise(res["results"][TASK], docs, tokenizer)
            else:  # local-completions against the server
                import lm_eval
                from lm_eval.tasks import TaskManager
                from bwarea.serve import create_app
                # lm-eval's API models cut rolling windows of max_length - 2 tokens (one kept for generation,
                # one for context) where HFLM cuts max_length: + 2 gives both routes the same windows.
                app = create_app(model, tokenizer, model_id="bwarea-default", allowed_hosts=["127.0.0.1"])
                server, thread, base = serve_in_thread(app)
                try:
                    res = lm_eval.simple_evaluate(
                        model="local-completions",
                        model_args=f"base_url={base}/v1/completions,model=bwarea-default,tokenizer={model_dir},"
                                   f"tokenizer_backend=huggingface,max_length={args.max_length + 2},"
                                   "tokenized_requests=True",
                        tasks=[TASK], task_manager=TaskManager(include_path=str(tmp), include_defaults=False),
                        bootstrap_iters=0)
                finally:
                    server.should_exit = True
                    thread.join(30)
                row = summarise(res["results"][TASK], docs, tokenizer)
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows[route] = row
            print(f"  {route}: token ppl {row['token_perplexity']:.3f}  ({row['seconds']} s)", file=sys.stderr)

    print(f"\nheld-out text of the shipped model, windows of {args.max_length} tokens, {len(docs)} documents")
    print(f"{'route':<18} {'token ppl':>10} {'word ppl':>10} {'byte ppl':>9} {'tokens':>7} {'seconds':>8}")
    for route, r in rows.items():
        word = f"{r['word_perplexity']:.2f}" if "word_perplexity" in r else "-"
        byte = f"{r['byte_perplexity']:.4f}" if "byte_perplexity" in r else "-"
        print(f"{route:<18} {r['token_perplexity']:>10.3f} {word:>10} {byte:>9} {r['tokens']:>7} {r['seconds']:>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.is_file():  # a run of some routes updates theirs and keeps the others measured on the same text
        old = json.loads(args.out.read_text())
        if (old.get("max_length"), old.get("documents"), old.get("lines_per_doc")) == \
                (args.max_length, len(docs), args.lines_per_doc):
            rows = {**old.get("routes", {}), **rows}
    record = {"model": "shipped default", "max_length": args.max_length, "documents": len(docs),
              "lines_per_doc": args.lines_per_doc, "torch_threads": torch.get_num_threads(),
              "load_average": os.getloadavg(), "routes": rows}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
