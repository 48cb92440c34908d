"""`bwarea search`: search over latent actions (MCTS, beam, best-of-N) for the completion a reward scores highest."""

from __future__ import annotations

import argparse
import json
import sys

from ..rl.settings import DEFAULT_TIMEOUT
from . import seed
from .inference import add_model_args, read_text
from .rl import add_reward_args, finite, positive_int, setting

EPILOG = """examples:
  bwarea search "The king said" --task sentiment --method mcts --budget 600
  bwarea search "The king said" --task keyword --keyword love --method best_of_n --budget 400 --json
  bwarea search "Once" --reward my_rewards.py:brevity --method beam --budget 800 --branches 4
  bwarea search "The king said" --task length --target-words 6 --method mcts --budget 1000 --cpuct 1.5 \\
                --root-branches 8 --rollout-action-temperature 0
  bwarea search "The king said" --task keyword --model runs/q --value q --budget 400   # learned Q, no rollouts
  bwarea search "The king said" --task keyword --expansion topk --budget 400   # 5/4 tokens per node, not 64

The budget counts world-model token evaluations: a sequence of k new tokens costs k, a fan-out (all the
actions' next tokens for one context, used to expand an MCTS node) costs the number of actions (64), a beam
step one per (beam, branch). Every method first writes and scores the policy's greedy sequence, paid from the
budget, and never returns anything the reward scores lower. A reward is any function reward(prompts,
completions, **kwargs) -> list[float] (TRL's signature, as `bwarea rl` takes), given as path/to/file.py:function,
package.module:function, or a built-in task (keyword, length, sentiment). See docs/search.md.
"""

# flag -> the methods it configures (a flag given for another method is an error, not ignored)
METHOD_FLAGS = {
    "n": ("best_of_n",), "action_temperature": ("best_of_n",),
    "beams": ("beam",), "branches": ("beam",),
    "cpuct": ("mcts",), "root_branches": ("mcts",), "lower_branches": ("mcts",), "rounds": ("mcts",),
    "rollout_action_temperature": ("mcts",), "expansion": ("mcts",),
    "value": ("mcts", "beam"),
}


def non_negative(text: str) -> float:
    value = finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def positive(text: str) -> float:
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser("search", help="search over actions (mcts, beam, best_of_n) for the best completion",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="prompt text; '-' or nothing reads stdin")
    add_model_args(p)
    r = add_reward_args(p)
    r.add_argument("--reward-timeout", type=setting("reward_timeout"), default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"longest a reward call may take (default {DEFAULT_TIMEOUT:g}; 0: no limit)")
    s = p.add_argument_group("search")
    s.add_argument("--method", choices=["mcts", "beam", "best_of_n"], default="mcts", help="default mcts")
    s.add_argument("--budget", type=positive_int, required=True, metavar="N",
                   help="world-model token evaluations the search may spend (at least --max-new-tokens)")
    s.add_argument("--max-new-tokens", type=positive_int, default=24, metavar="N",
                   help="completion length (default 24)")
    s.add_argument("--temperature", type=non_negative, default=0.0,
                   help="token temperature of the world model: 0 (default) writes its argmax token under each action")
    s.add_argument("--seed", type=seed, default=0, help="random seed, in [0, 2**32) (default 0)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("--top", type=positive_int, default=5, metavar="K",
                   help="alternatives listed: root children, or beams or samples (up to 10; default 5)")
    m = p.add_argument_group("mcts (defaults: CoLA's settings)")
    m.add_argument("--cpuct", type=non_negative, help="PUCT exploration constant (default 0.7)")
    m.add_argument("--root-branches", type=positive_int, help="children kept at the root (default 5)")
    m.add_argument("--lower-branches", type=positive_int, help="children kept below the root (default 4)")
    m.add_argument("--rounds", type=positive_int, help="most rounds (default: as many as the budget pays for)")
    m.add_argument("--rollout-action-temperature", type=non_negative,
                   help="action temperature of the policy's rollouts (default 1; 0: greedy rollouts)")
    m.add_argument("--expansion", choices=["fanout", "topk"],
                   help="fanout (default): one fan-out per node, 64 evaluations; topk: only the kept branches' "
                   "likeliest actions write a token, one evaluation each")
    m.add_argument("--value", choices=["q"], help="q: value new nodes (mcts) or rank candidates (beam) by the "
                   "model's learned action-value head (trained by `bwarea rl --algo q`) instead of rollouts")
    b = p.add_argument_group("beam")
    b.add_argument("--beams", type=positive_int, help="beam width (default: as many as the budget pays for)")
    b.add_argument("--branches", type=positive_int, help="actions tried per beam and step (default 4)")
    n = p.add_argument_group("best_of_n")
    n.add_argument("--n", type=positive_int, help="samples (default: as many as the budget pays for)")
    n.add_argument("--action-temperature", type=positive,
                   help="the policy's sampling temperature (default: the model's, as in `bwarea generate`)")
    p.set_defaults(func=run)


def method_options(args) -> dict:
    """The method's flags that were given; one given for another method is an error naming it."""
    options = {}
    for name, methods in METHOD_FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if args.method not in methods:
            raise ValueError(f"--{name.replace('_', '-')} applies to --method {' or '.join(methods)}, not "
                             f"{args.method}")
        options[name] = value
    return options


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from ..rl.rewards import build_reward_set
    from ..search import search
    from ..display import encode_prompt
    from .inference import load_model

    options = method_options(args)
    if args.budget < args.max_new_tokens:
        raise ValueError(f"--budget {args.budget} is below --max-new-tokens {args.max_new_tokens}: the search first "
                         "writes the policy's greedy sequence, so the budget must pay for at least that")
    prompt = read_text(args.prompt, "prompt")
    rewards = build_reward_set(args.rewards, args.reward_weight, args.reward_model, timeout=args.reward_timeout,
                               task_options={"keywords": args.keyword, "target_words": args.target_words},
                               label=args.reward_model_label)
    model, tokenizer = load_model(args)
    limit = model.config.max_position_embeddings - args.max_new_tokens
    if limit < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                         f"{model.config.max_position_embeddings} positions")
    ids = encode_prompt(tokenizer, prompt, limit)
    with tqdm(total=args.budget, desc=f"search {args.method}", unit="eval", file=sys.stderr, leave=False) as bar:
        result = search(model, torch.tensor(ids), tokenizer=tokenizer, reward=rewards, method=args.method,
                        budget=args.budget, max_new_tokens=args.max_new_tokens, seed=args.seed,
                        temperature=args.temperature, progress=lambda spent, total: bar.update(spent - bar.n),
                        **options)
    result.top = result.top[:args.top]
    if args.json:
        print(json.dumps({"prompt": prompt, **result.to_dict()}, ensure_ascii=False))
        return 0
    st = result.stats
    print(f"prompt: {prompt!r}")
    print(f"greedy  reward {result.greedy_reward:8.4f}  {result.greedy_completion!r}")
    print(f"search  reward {result.reward:8.4f}  {result.completion!r}")
    print(f"actions: {' '.join(map(str, result.actions))}")
    print(f"[{args.method}: {st.evaluations}/{st.budget} evaluations, {st.nodes} nodes, {st.rounds} rounds, "
          f"{st.fanouts} fan-outs, {st.sequences} sequences scored, {st.wall_time:.2f} s]")
    if not result.top:
        return 0
    if args.method == "mcts":
        print("top of the tree (root children by visits):")
        print(f"{'action':>6}  {'visits':>6}  {'value':>8}  {'prior':>6}  {'token':<12}  best found (reward)")
        for c in result.top:
            found = "-" if c["text"] is None else f"{c['text']!r} ({c['best_reward']:.4f})"
            print(f"{c['action']:>6}  {c['visits']:>6}  {c['value']:>8.4f}  {c['prior']:>6.1%}  "
                  f"{c['token']!r:<12}  {found}")
    else:
        print("final beams (by reward):" if args.method == "beam" else "best samples (by reward):")
        for c in result.top:
            print(f"  {c['reward']:8.4f}  {c['text']!r}")
    return 0
