"""`bwarea rl`: train the policy alone against a reward (REINFORCE, GRPO or PPO), world model frozen."""

from __future__ import annotations

import argparse

EPILOG = """examples:
  bwarea rl --task keyword --keyword love --out runs/love             # GRPO on the shipped model
  bwarea rl --reward my_rewards.py:brevity --reward keyword --reward-weight 1 --reward-weight 0.5 \\
            --algo ppo --steps 200 --prompts prompts.jsonl --out runs/mix
  bwarea rl --reward-model ./sentiment-classifier --algo reinforce --out runs/rm
  bwarea rl --env letters --max-turns 3 --out runs/letters             # multi-turn text game
  bwarea rl --task keyword --out runs/love --resume                    # continue from the last checkpoint
  torchrun --nproc_per_node 2 -m bwarea.cli rl --task length --out runs/len   # 2 CPU processes (gloo)
  accelerate launch --multi_gpu --num_processes 2 -m bwarea.cli rl --task length --out runs/len   # 2 GPUs

A reward is any function reward(prompts, completions, **kwargs) -> list[float] (TRL's signature), given as
path/to/file.py:function, package.module:function, or a built-in task (keyword, length, sentiment).
OUT gets metrics.jsonl (one JSON per step), tb/ (TensorBoard), checkpoints/, and the trained model, which
loads with BWAreaForCausalLM.from_pretrained(OUT) or `bwarea generate --model OUT`.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("rl", help="train the policy against a reward (REINFORCE, GRPO, PPO)",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="BWArea checkpoint folder to start from (default: the shipped model)")
    p.add_argument("--out", required=True, help="output folder (metrics, checkpoints, the trained model)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r = p.add_argument_group("rewards")
    r.add_argument("--reward", dest="rewards", action="append", default=[], metavar="SPEC",
                   help="file.py:function, module:function or a task name; repeatable")
    r.add_argument("--task", dest="rewards", action="append", metavar="NAME",
                   help="a built-in task as the reward: keyword, length, sentiment (same as --reward NAME)")
    r.add_argument("--reward-weight", type=float, action="append", metavar="W",
                   help="weight of each --reward/--task, in order (default 1 each)")
    r.add_argument("--reward-model", metavar="PATH", help="local transformers sequence-classification model")
    r.add_argument("--reward-model-weight", type=float, default=1.0)
    r.add_argument("--reward-model-label", help="label name or index scored (default: the last label)")
    r.add_argument("--skip-bad-rewards", action="store_true",
                   help="skip (and count) samples whose reward raises or is NaN/inf instead of stopping")
    r.add_argument("--keyword", default="love", help="keyword task: comma-separated words (default: love)")
    r.add_argument("--target-words", type=int, default=8, help="length task: target completion length in words")
    r.add_argument("--env", help="train on a multi-turn environment instead of rewards: letters")
    r.add_argument("--max-turns", type=int, default=3, help="environment: turns per episode")
    d = p.add_argument_group("prompts and sampling")
    d.add_argument("--prompts", metavar="FILE", help="one prompt per line, or JSONL with \"prompt\" (default: the "
                   "shipped model's held-out text)")
    d.add_argument("--prompt-words", type=int, default=6, help="default prompts: first N words of each held-out line")
    d.add_argument("--max-new-tokens", type=int, default=24)
    d.add_argument("--max-prompt-tokens", type=int, default=64, help="longer prompts keep their last tokens")
    d.add_argument("--temperature", type=float, default=1.0, help="token sampling temperature of the world model")
    d.add_argument("--top-k", type=int)
    d.add_argument("--top-p", type=float, default=1.0)
    o = p.add_argument_group("optimisation")
    o.add_argument("--algo", choices=["reinforce", "grpo", "ppo"], default="grpo")
    o.add_argument("--steps", type=int, default=100)
    o.add_argument("--batch-size", type=int, default=8, help="prompts (or episodes) per step, per process")
    o.add_argument("--group-size", type=int, help="samples per prompt (default: grpo 4, reinforce 4, ppo 1)")
    o.add_argument("--lr", type=float, default=1e-4)
    o.add_argument("--kl-coef", type=float, default=0.05, help="weight of the exact KL to the starting policy")
    o.add_argument("--entropy-coef", type=float, default=0.0, help="entropy bonus")
    o.add_argument("--clip", type=float, default=0.2, help="grpo/ppo ratio clip")
    o.add_argument("--epochs", type=int, help="passes over each batch (default: ppo 4, others 1)")
    o.add_argument("--minibatches", type=int, help="minibatches per pass (default: ppo 2, others 1)")
    o.add_argument("--baseline", choices=["loo", "ema"], default="loo", help="reinforce baseline")
    o.add_argument("--gamma", type=float, default=1.0, help="ppo discount")
    o.add_argument("--lam", type=float, default=0.95, help="ppo GAE lambda")
    o.add_argument("--vf-coef", type=float, default=0.5, help="ppo value loss weight")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    o.add_argument("--keep-checkpoints", type=int, default=2)
    o.add_argument("--no-tensorboard", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..loading import load
    from ..rl import RLConfig, RLTrainer, build_reward_set, default_prompts, load_prompts
    from ..rl.envs import make_env
    from ..rl.trainer import make_accelerator

    rewards = None
    if args.env:
        if args.rewards or args.reward_model:
            raise ValueError("--env gives its own rewards: drop --reward/--task/--reward-model, or drop --env")
        make_env(args.env)  # an unknown name fails here, before the model loads
    else:
        rewards = build_reward_set(args.rewards, args.reward_weight, args.reward_model, args.reward_model_weight,
                                   skip_bad=args.skip_bad_rewards,
                                   task_options={"keywords": args.keyword, "target_words": args.target_words},
                                   label=args.reward_model_label)
    prompts = None
    if not args.env:
        prompts = load_prompts(args.prompts) if args.prompts else default_prompts(args.prompt_words)
    config = RLConfig(
        algo=args.algo, steps=args.steps, batch_size=args.batch_size, group_size=args.group_size,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        max_prompt_tokens=args.max_prompt_tokens, lr=args.lr, kl_coef=args.kl_coef, entropy_coef=args.entropy_coef,
        clip=args.clip, epochs=args.epochs, minibatches=args.minibatches, baseline=args.baseline, gamma=args.gamma,
        lam=args.lam, vf_coef=args.vf_coef, max_turns=args.max_turns, seed=args.seed, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, tensorboard=not args.no_tensorboard).resolved()
    accelerator = make_accelerator()
    model, tokenizer = load(args.model)
    env_factory = (lambda seed: make_env(args.env, seed=seed, turns=args.max_turns)) if args.env else None
    trainer = RLTrainer(model, tokenizer, config, args.out, rewards=rewards, prompts=prompts, env_factory=env_factory,
                        base_model=args.model, accelerator=accelerator)
    history = trainer.train(resume=args.resume)
    if accelerator.is_main_process and history:
        first, last = history[0], history[-1]
        print(f"steps {first['step']}..{last['step']}: reward {first['reward']:.3f} -> {last['reward']:.3f}, "
              f"kl {last['kl']:.4f}; model written to {args.out}")
        if rewards is not None and rewards.skipped:
            print(f"skipped {rewards.skipped} samples with bad rewards")
    return 0
