"""`bwarea rl`: train the policy alone against a reward (REINFORCE, RLOO, GRPO or PPO), world model frozen."""

from __future__ import annotations

import argparse
import sys

from ..rl.settings import FLOAT_SETTINGS, INT_SETTINGS, RLConfig, check_setting
from ..train.settings import add_flags, build_config, finite_number as finite
from . import seed

EPILOG = """examples:
  bwarea rl --task keyword --keyword love --out runs/love             # GRPO on the shipped model
  bwarea rl --reward my_rewards.py:brevity --reward keyword --reward-weight 1 --reward-weight 0.5 \\
            --algo ppo --steps 200 --prompts prompts.jsonl --out runs/mix
  bwarea rl --reward-model ./sentiment-classifier --algo reinforce --out runs/rm
  bwarea rl --env letters --max-turns 3 --out runs/letters             # multi-turn text game
  bwarea rl --env textworld --games games/ --max-turns 8 --max-new-tokens 12 --model runs/bc --out runs/tw
                                                     # TextWorld games (pip install 'bwarea[textworld]')
  bwarea rl --task keyword --out runs/love --resume                    # continue from the last checkpoint
  bwarea rl --config rl.yaml --task keyword --out runs/cfg --steps 50  # settings from a file, one overridden
  torchrun --nproc_per_node 2 -m bwarea.cli rl --task length --out runs/len   # 2 CPU processes (gloo)
  accelerate launch --multi_gpu --num_processes 2 -m bwarea.cli rl --task length --out runs/len   # 2 GPUs

A reward is any function reward(prompts, completions, **kwargs) -> list[float] (TRL's signature), given as
path/to/file.py:function, package.module:function, or a built-in task (keyword, length, sentiment).
OUT gets metrics.jsonl (one JSON per step), tensorboard/, checkpoints/, and the trained model, which
loads with BWAreaForCausalLM.from_pretrained(OUT) or `bwarea generate --model OUT`. OUT must be a new or empty
folder, or a bwarea run continued with --resume or started again with --overwrite (as for pretraining).

A bad reward value stops the run naming the reward and the sample (or is skipped with --skip-bad-rewards);
a reward call longer than --reward-timeout stops it. An update whose loss or gradient is NaN/inf is skipped
(counted as nonfinite_updates in metrics.jsonl); --max-bad-steps such steps in a row stop the run, with OUT
keeping the last good model. Exit status: 0 done, 1 stopped, 2 bad input.
"""


def setting(name: str):
    """An argparse type checking a flag against bwarea.rl.settings, so `--kl-coef nan` fails at parse time."""
    def parse(text: str):
        try:
            value = float(text) if name in FLOAT_SETTINGS else int(text)
        except ValueError:
            kind = "a number" if name in FLOAT_SETTINGS else "an integer"
            raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {text!r}") from None
        try:
            return check_setting(name, value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parse.__name__ = name
    return parse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_reward_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The reward flags that `bwarea rl` and `bwarea search` share (the same rewards serve both)."""
    r = p.add_argument_group("rewards")
    r.add_argument("--reward", dest="rewards", action="append", default=[], metavar="SPEC",
                   help="file.py:function, module:function or a task name; repeatable (summed)")
    r.add_argument("--task", dest="rewards", action="append", metavar="NAME",
                   help="a built-in task as the reward: keyword, length, sentiment (same as --reward NAME)")
    r.add_argument("--reward-weight", type=finite, action="append", metavar="W",
                   help="weight of each --reward/--task, in order (default 1 each)")
    r.add_argument("--reward-model", metavar="PATH", help="local transformers sequence-classification model")
    r.add_argument("--reward-model-label", help="label name or index scored (default: the last label)")
    r.add_argument("--keyword", default="love", help="keyword task: comma-separated words (default: love)")
    r.add_argument("--target-words", type=positive_int, default=8,
                   help="length task: target completion length in words")
    return r


def register(subparsers) -> None:
    p = subparsers.add_parser("rl", help="train the policy against a reward (REINFORCE, RLOO, GRPO, PPO)",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="JSON or YAML file of RL settings (keys as the flag names of "
                   "the sampling and optimisation settings below); flags win")
    p.add_argument("--model", help="BWArea checkpoint folder to start from (default: the shipped model)")
    p.add_argument("--out", required=True, help="output folder (metrics, checkpoints, the trained model)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --out that holds a bwarea run (removes only what that run wrote)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a pytorch_model.bin --model (pickle: trusted sources only)")
    r = add_reward_args(p)
    r.add_argument("--reward-model-weight", type=finite, default=1.0)
    r.add_argument("--skip-bad-rewards", action="store_true",
                   help="skip (and count) samples whose reward raises or is not a finite number, instead of "
                   "stopping; a step without a usable sample makes no update, a run without any fails")
    r.add_argument("--env", help="train on a multi-turn environment instead of rewards: letters, textworld")
    r.add_argument("--games", metavar="DIR", help="--env textworld: folder of .z8/.ulx games (searched "
                   "recursively); each episode plays one, chosen by its seed. The reward is the score gained "
                   "each turn; a turn's first line is its command; --max-turns caps the commands per episode")
    d = p.add_argument_group("prompts and sampling")
    d.add_argument("--prompts", metavar="FILE", help="one prompt per line, or JSONL with \"prompt\" (default: the "
                   "shipped model's held-out text)")
    d.add_argument("--prompt-words", type=positive_int, default=6,
                   help="default prompts: first N words of each held-out line")
    groups = {"rewards": r, "sampling": d, "optimisation": p.add_argument_group("optimisation")}
    # Every RLConfig field is a flag, with its help text and its range checked as it is parsed.
    add_flags(p, RLConfig, groups=groups,
              types={name: seed if name == "seed" else setting(name) for name in (*INT_SETTINGS, *FLOAT_SETTINGS)})
    p.set_defaults(func=run)


def run(args) -> int:
    from ..loading import load
    from ..rl import RLStopped, RLTrainer, build_reward_set, default_prompts, load_prompts
    from ..rl.envs import make_env
    from ..train.engine import make_accelerator

    config = build_config(RLConfig, args).resolved()  # defaults <- --config file <- flags, checked
    rewards = None
    env_options = {}
    if args.games is not None and args.env != "textworld":
        raise ValueError("--games is for --env textworld")
    if args.env:
        if args.rewards or args.reward_model:
            raise ValueError("--env gives its own rewards: drop --reward/--task/--reward-model, or drop --env")
        if args.env == "textworld":
            if args.games is None:
                raise ValueError("--env textworld needs --games DIR (a folder of .z8/.ulx games)")
            env_options = {"games": args.games, "max_turns": config.max_turns}
        elif args.env == "letters":
            env_options = {"turns": config.max_turns}
        make_env(args.env, **env_options)  # an unknown name, missing games or textworld fail here, before loading
    else:
        rewards = build_reward_set(args.rewards, args.reward_weight, args.reward_model, args.reward_model_weight,
                                   skip_bad=args.skip_bad_rewards, timeout=config.reward_timeout,
                                   task_options={"keywords": args.keyword, "target_words": args.target_words},
                                   label=args.reward_model_label)
    prompts = None
    if not args.env:
        prompts = load_prompts(args.prompts) if args.prompts else default_prompts(args.prompt_words)
    accelerator = make_accelerator()
    model, tokenizer = load(args.model, allow_pickle=args.allow_pickle)
    env_factory = (lambda seed: make_env(args.env, seed=seed, **env_options)) if args.env else None
    from ..rl.algorithms import get as get_algorithm  # --algo q trains a Q head in its own trainer
    trainer_class = getattr(get_algorithm(config.algo), "trainer_class", RLTrainer)
    trainer = trainer_class(model, tokenizer, config, args.out, rewards=rewards, prompts=prompts,
                            env_factory=env_factory, base_model=args.model, accelerator=accelerator)
    try:
        history = trainer.train(resume=args.resume, overwrite=args.overwrite)
    except RLStopped as err:  # not bad input but not a bug either: the run could not go on
        if accelerator.is_main_process:
            print(f"bwarea rl: stopped: {err}", file=sys.stderr)
        return 1
    if accelerator.is_main_process and history:
        first, last = history[0], history[-1]
        print(f"steps {first['step']}..{last['step']}: reward {first['reward']:.3f} -> {last['reward']:.3f}, "
              f"kl {last['kl']:.4f}; model written to {args.out}")
        skipped_updates = sum(m["nonfinite_updates"] for m in history)
        if skipped_updates:
            print(f"skipped {skipped_updates} updates with a non-finite loss or gradient")
        if rewards is not None and rewards.skipped:
            print(f"skipped {rewards.skipped} samples with bad rewards")
    return 0
