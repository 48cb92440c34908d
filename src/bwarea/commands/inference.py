"""The verbs that use a model: `generate`, `actions`, `explore`, and `convert` for released checkpoints."""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import seed

MODEL_HELP = "model folder (bwarea or released format); default: the shipped model"


def register(subparsers) -> None:
    p = _verb(subparsers, "generate", "generate text, streamed to the terminal", """examples:
  bwarea generate "The king said"                          # sampled tokens, policy-chosen actions
  echo "The king said" | bwarea generate --greedy          # prompt from stdin, argmax tokens and actions
  bwarea generate "The king said" --action 17 --show-actions   # action 17 for every new token
  bwarea generate "Once" --schedule 3,3,-1,5 --allowed-actions 0-15 --seed 1""")
    p.add_argument("prompt", nargs="?", help="prompt text; '-' or nothing reads stdin")
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="token sampling temperature (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens only")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style penalty (default 1: off)")
    p.add_argument("--greedy", action="store_true", help="argmax tokens (and actions, unless --action-temperature)")
    p.add_argument("--seed", type=seed, default=None, help="seed for reproducible sampling, in [0, 2**32)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    add_action_args(p)
    p.add_argument("--prompt-actions", choices=["inverse", "policy"], default="inverse",
                   help="who labels the prompt: the inverse dynamics (default) or the policy (the released generate)")
    p.add_argument("--show-actions", action="store_true", help="print each new token on a line with its action")
    p.set_defaults(func=run_generate)

    p = _verb(subparsers, "actions", "label a text with its inverse-dynamics actions", """examples:
  bwarea actions "I like eating"            # a table: position, token id, action, token, text
  bwarea actions "I like eating" --json     # the same as JSON
  cat story.txt | bwarea actions -          # text from stdin

The action of a token is the action that produced it (the inverse dynamics' label of the position before it);
the first token has none.""")
    p.add_argument("text", nargs="?", help="text to label; '-' or nothing reads stdin")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_actions)

    p = _verb(subparsers, "explore", "the top next tokens under each action (fan-out)", """examples:
  bwarea explore "The king said"                     # top 3 next tokens under each of the actions
  bwarea explore "The king said" --sort policy       # the policy's favourite actions first
  bwarea explore "The king said" --actions 0-7 --top 5 --json""")
    p.add_argument("text", nargs="?", help="the context; '-' or nothing reads stdin")
    add_model_args(p)
    p.add_argument("--top", type=int, default=3, metavar="K", help="tokens listed per action (default 3)")
    p.add_argument("--actions", type=parse_action_list, default=None, metavar="LIST",
                   help="which actions to list, e.g. 0-7,12 (default all)")
    p.add_argument("--sort", choices=["action", "policy"], default="action",
                   help="order by action number (default) or by the policy's probability")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_explore)

    p = _verb(subparsers, "convert", "convert a released BWArea checkpoint to the bwarea format", """examples:
  bwarea convert ../intention_pretrained_2.7B_30G ./bwarea-2.7b
  bwarea convert released/ converted/ --dtype bfloat16 --force

Weights are renamed and fused (no numbers change, unless --dtype casts them); the tokenizer files are copied.
A pickle checkpoint (pytorch_model.bin) is only read with --allow-pickle. A file in DST with a name convert
writes is replaced only with --force; nothing else in DST is touched.""")
    p.add_argument("src", help="released checkpoint folder (config.json with num_code, weights, tokenizer)")
    p.add_argument("dst", help="folder to write")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype to write (default auto: as stored)")
    p.add_argument("--allow-pickle", action="store_true", help="read pytorch_model.bin files (trusted sources only)")
    p.add_argument("--force", action="store_true",
                   help="replace files of the names convert writes that DST already holds (nothing else)")
    p.set_defaults(func=run_convert)


def _verb(subparsers, name: str, help_text: str, epilog: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                                 epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH", help=MODEL_HELP)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default float32)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default cpu)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a pytorch_model.bin checkpoint (pickle: trusted sources only)")


def add_action_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("actions")
    fixed = g.add_mutually_exclusive_group()
    fixed.add_argument("--action", type=int, default=None, metavar="N", help="use action N for every new token")
    fixed.add_argument("--schedule", type=parse_schedule, default=None, metavar="LIST",
                       help="one action per new token, e.g. 3,3,-1,5 (-1: the policy chooses; after the list too)")
    g.add_argument("--allowed-actions", type=parse_action_list, default=None, metavar="LIST",
                   help="only these actions are used, e.g. 0-15,40 (fixed ones must be among them)")
    g.add_argument("--action-temperature", type=float, default=None, metavar="T",
                   help="sample the policy's actions at temperature T (default: the "
                   "model's, config.json's action_temperature; 1 unless it sets one)")
    g.add_argument("--action-greedy", action="store_true", help="the policy's argmax action at every step")


def parse_schedule(text: str) -> list[int]:
    """'3,3,-1,5' -> [3, 3, -1, 5]."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of actions (e.g. 3,3,-1,5)")


def parse_action_list(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    out = []
    try:
        for part in (x.strip() for x in text.split(",")):
            if "-" in part[1:]:
                low, high = (int(x) for x in part.split("-", 1))
                if high < low:
                    raise ValueError
                out.extend(range(low, high + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of actions such as 0-15,40")
    return out


def read_text(arg: str | None, what: str) -> str:
    if arg is not None and arg != "-":
        return arg
    if sys.stdin is None or sys.stdin.isatty():
        raise ValueError(f"give the {what} as an argument or pipe it on stdin")
    return sys.stdin.read().rstrip("\n")


def load_model(args):
    """--model/--dtype/--device -> (model, tokenizer)."""
    import torch

    from bwarea.loading import load

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load(args.model, dtype=dtype, device=args.device, allow_pickle=args.allow_pickle)


def generation_options(args, num_actions: int) -> dict:
    """The sampling and action keyword arguments of ``model.generate`` from the parsed options."""
    from bwarea.generation.controls import check_request

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    if not args.greedy and args.temperature <= 0:
        raise ValueError("--temperature must be > 0 (use --greedy for argmax tokens)")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.repetition_penalty <= 0:
        raise ValueError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.action_temperature is not None and args.action_temperature <= 0:
        raise ValueError("--action-temperature must be > 0 (use --action-greedy for argmax actions)")
    actions = args.action if args.action is not None else args.schedule
    check_request(num_actions, actions, args.allowed_actions, args.max_new_tokens)
    if isinstance(actions, list):  # generate takes one entry per new token: the policy chooses after the list
        actions = actions + [-1] * (args.max_new_tokens - len(actions))
    # Argmax tokens come with argmax actions unless an action temperature asks for sampling, so --greedy is
    # deterministic on its own.
    action_greedy = args.action_greedy or (args.greedy and args.action_temperature is None)
    return dict(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                actions=actions, allowed_actions=args.allowed_actions, action_greedy=action_greedy,
                action_temperature=args.action_temperature, prompt_actions=args.prompt_actions)


def run_generate(args) -> int:
    import torch

    from bwarea.display import TextStream, encode_prompt

    prompt = read_text(args.prompt, "prompt")
    model, tokenizer = load_model(args)
    options = generation_options(args, model.config.num_actions)
    limit = model.config.max_position_embeddings - args.max_new_tokens
    if limit < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                         f"{model.config.max_position_embeddings} positions")
    ids = encode_prompt(tokenizer, prompt, limit)
    generator = None
    if args.seed is not None:
        torch.manual_seed(args.seed)
        generator = torch.Generator(device=model.device).manual_seed(args.seed)
    stream = TextStream(tokenizer, ids, args.stop)
    out = sys.stdout
    eos = model.config.eos_token_id
    count = 0

    def on_step(step, tokens, actions):
        nonlocal count
        token, action = int(tokens[0]), int(actions[0])
        count += 1
        piece, shown = stream.push(token)
        if args.show_actions:
            out.write(f"{step:>5}  {action:>6}  {token:>7}  {piece!r}\n")
        else:
            out.write(shown)
        out.flush()
        return token == eos or stream.stopped

    if args.show_actions:
        out.write(f"prompt: {prompt!r}\n {'step':>4}  {'action':>6}  {'token':>7}  text\n")
    else:
        out.write(prompt)
    out.flush()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(torch.tensor([ids], device=model.device), generator=generator, step_callback=on_step,
                       **options)
    seconds = time.perf_counter() - start
    tail = stream.flush()
    out.write(f"\n{prompt}{stream.text}\n" if args.show_actions else tail + "\n")
    out.flush()
    print(f"[{count} tokens in {seconds:.2f} s, {count / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def run_actions(args) -> int:
    from bwarea.display import encode_prompt, label_actions

    text = read_text(args.text, "text")
    model, tokenizer = load_model(args)
    rows = label_actions(model, tokenizer, encode_prompt(tokenizer, text, model.config.max_position_embeddings))
    if args.json:
        print(json.dumps({"text": text, "tokens": rows}, ensure_ascii=False))
        return 0
    print(f"{'pos':>4}  {'id':>7}  {'action':>6}  {'token':<16}  text")
    for r in rows:
        action = "-" if r["action"] is None else r["action"]
        print(f"{r['position']:>4}  {r['id']:>7}  {action:>6}  {r['token']:<16}  {r['text']!r}")
    return 0


def run_explore(args) -> int:
    from bwarea.display import encode_prompt, fanout_table

    text = read_text(args.text, "text")
    model, tokenizer = load_model(args)
    ids = encode_prompt(tokenizer, text, model.config.max_position_embeddings)
    table = fanout_table(model, tokenizer, ids, top_k=args.top, actions=args.actions)
    if args.sort == "policy":
        table["actions"].sort(key=lambda r: -r["policy_prob"])
    if args.json:
        print(json.dumps({"text": text, **table}, ensure_ascii=False))
        return 0
    print(f"context: {text!r}  ({len(ids)} tokens)")
    print(f"{'action':>6}  {'policy':>7}  next tokens (probability)")
    for r in table["actions"]:
        tokens = "  ".join(f"{t['text'] or t['token']!r} {t['prob']:.2f}" for t in r["top"])
        print(f"{r['action']:>6}  {r['policy_prob']:>7.1%}  {tokens}")
    return 0


def run_convert(args) -> int:
    import os
    from pathlib import Path

    from bwarea.checkpoint import convert_released_checkpoint, converted_file_names, read_config

    _, fmt = read_config(args.src)
    if fmt != "released":
        raise ValueError(f"{args.src} is already a bwarea checkpoint; nothing to convert")
    dst = Path(args.dst)
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"DST {str(dst)!r} is a file, not a folder: give a folder to write the checkpoint into")
    parent = next(p for p in (dst.absolute(), *dst.absolute().parents) if p.exists())
    if not parent.is_dir():
        raise ValueError(f"cannot create DST {str(dst)!r}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write DST {str(dst)!r}: {parent} is not writable")
    if dst.resolve() == Path(args.src).resolve():
        raise ValueError("DST must differ from SRC: the released files would be overwritten while being read")
    names = converted_file_names(args.src)
    # Only the files convert writes are ever replaced, and only with --force; anything else in DST stays.
    taken = [name for name in names if (dst / name).exists() or (dst / name).is_symlink()]
    if taken and not args.force:
        raise ValueError(f"{dst} already holds {', '.join(taken)}; pass --force to overwrite "
                         f"{'it' if len(taken) == 1 else 'them'} (nothing else in {dst} is touched)")
    not_files = [name for name in taken if (dst / name).is_dir()]
    if not_files:
        raise ValueError(f"{dst / not_files[0]} is a folder; convert writes a file of that name")
    start = time.perf_counter()
    convert_released_checkpoint(args.src, dst, dtype=args.dtype, allow_pickle=args.allow_pickle)
    print(f"wrote {dst} in {time.perf_counter() - start:.1f} s: {', '.join(names)}")
    return 0
