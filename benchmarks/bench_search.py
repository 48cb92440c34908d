"""Search over actions against best-of-N over tokens: reward against budget, at equal world-model evaluations.

On the shipped model (or --model), for each task and budget, every method searches each evaluation prompt with
the same budget, counted in world-model token evaluations (docs/search.md: a token written costs 1, a fan-out
costs 64):

* ``mcts``: PUCT over actions, CoLA's settings (cpuct 0.7, 5 root / 4 lower branches), one fan-out per node,
  leaves valued by policy rollouts scored by the reward;
* ``mcts_topk``: the same, but a node's children come from its 5 (root) / 4 likeliest actions only, one token
  evaluation each, instead of a 64-evaluation fan-out;
* ``mcts_topk_t1``: ``mcts_topk`` with tokens sampled at temperature 1 (in the tree and in rollouts), as
  token best-of-N samples them: still a search over actions, with the world model's token noise kept;
* ``mcts_q``: ``mcts_topk`` with leaves valued by a learned Q head (``--algo q``: TD(lambda) with a target
  network, trained here on the task's training prompts) instead of rollouts;
* ``beam``: beam search over actions (policy log-probs), final beams picked by reward;
* ``best_of_n``: action sequences sampled from the policy, argmax tokens, best by reward;
* ``token_best_of_n``: plain sampling of the language model: actions sampled from the policy and tokens from
  the world model at temperature 1 (an ancestral sample of the LM view's mixture), best of N by reward.

Tasks: the built-in ``keyword`` (love), ``length`` (8 words), ``sentiment`` and the ``letters`` game (one turn,
"Words with T:", reward = share of words starting with the letter, from ``bwarea.rl.envs.letters``). Evaluation
prompts are the first words of held-out lines (letters: 4 letters); the Q heads train on other held-out lines
(letters: all 12 letters, so the evaluation letters were seen in training).

    nice -n 19 python benchmarks/bench_search.py                        # ~10 CPU-minutes
    python benchmarks/bench_search.py --budgets 200 800 --prompts 2 --q-steps 5 --out /tmp/s.json   # smoke
    nice -n 19 python benchmarks/bench_search.py --tasks sentiment length letters keyword --prompts 3 \
        --q-steps 30                                          # what wrote results/search.json
    nice -n 19 python benchmarks/bench_search.py --tasks sentiment length letters keyword --prompts 3 \
        --q-steps 30 --methods mcts_q --q-lr 3e-4 --out benchmarks/results/search_q.json

Prints a table and writes JSON (default benchmarks/results/search.json) and a plot (search.png beside it).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bwarea.loading import load
from bwarea.rl import RewardSet, Reward, RLConfig, default_prompts
from bwarea.rl.algorithms.q import QTrainer
from bwarea.rl.envs.letters import LETTERS, LetterGame
from bwarea.rl.tasks import make_task
from bwarea.search import search
from outputs import output  # benchmarks/outputs.py, beside this script

TASKS = ("keyword", "length", "sentiment", "letters")
# method -> (search method, options, token temperature, needs the task's Q head)
METHODS = {
    "mcts": ("mcts", {}, 0.0, False),
    "mcts_topk": ("mcts", {"expansion": "topk"}, 0.0, False),
    "mcts_topk_t1": ("mcts", {"expansion": "topk"}, 1.0, False),
    "mcts_q": ("mcts", {"expansion": "topk", "value": "q"}, 0.0, True),
    "beam": ("beam", {}, 0.0, False),
    "best_of_n": ("best_of_n", {}, 0.0, False),
    "token_best_of_n": ("best_of_n", {}, 1.0, False),
}


def letters_reward(prompts, completions, **kwargs) -> list[float]:
    """The letter game's first-turn reward: the share of the completion's words that start with the letter the
    prompt ("Words with T:") names, scored by LetterGame.step itself."""
    scores = []
    for prompt, text in zip(prompts, completions):
        game = LetterGame()
        game.letter = prompt.strip().rstrip(":").split()[-1].lower()
        scores.append(game.step(text)[1])
    return scores


def task_reward(name: str):
    if name == "letters":
        return letters_reward
    return make_task(name, keywords="love", target_words=8)


def task_prompts(name: str, n_eval: int) -> tuple[list[str], list[str]]:
    """-> (evaluation prompts, Q-training prompts)."""
    if name == "letters":
        everything = [f"Words with {c.upper()}:" for c in LETTERS]
        return everything[:n_eval], everything
    lines = [r["prompt"] for r in default_prompts(6)]
    return lines[:n_eval], lines[n_eval:]


def train_q(model_path, task: str, prompts: list[str], steps: int, max_new_tokens: int, seed: int, lr: float):
    """A fresh copy of the model with a Q head trained by --algo q on the task -> (model, training summary)."""
    model, tokenizer = load(model_path)  # a fresh copy: the searched model holds packed decode weights
    config = RLConfig(algo="q", steps=steps, batch_size=8, group_size=4, max_new_tokens=max_new_tokens, lr=lr,
                      temperature=0.05, save_every=steps, tensorboard=False, seed=seed)
    rewards = RewardSet([Reward(task, task_reward(task))])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        trainer = QTrainer(model, tokenizer, config, Path(out) / "q", rewards=rewards,
                           prompts=[{"prompt": p} for p in prompts])
        history = trainer.train()
    k = max(1, len(history) // 5)
    return model, {"steps": steps, "lr": lr, "seconds": time.perf_counter() - t0, "lambda": config.lam,
                   "td_loss_first": sum(h["value_loss"] for h in history[:k]) / k,
                   "td_loss_last": sum(h["value_loss"] for h in history[-k:]) / k,
                   "rollout_reward": sum(h["reward"] for h in history) / len(history)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = results["tasks"][task]["mean_reward"]
        for method, by_budget in rows.items():
            budgets = sorted(int(b) for b in by_budget)
            style = "--" if method == "token_best_of_n" else "-"
            ax.plot(budgets, [by_budget[str(b)] for b in budgets], style, marker="o", label=method)
        ax.axhline(results["tasks"][task]["greedy_reward"], color="grey", lw=0.8, ls=":", label="greedy")
        ax.set_xscale("log", base=2)
        ax.set_title(task)
        ax.set_xlabel("budget (world-model token evaluations)")
    axes[0][0].set_ylabel("mean reward")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="BWArea checkpoint folder (default: the shipped model)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--budgets", nargs="+", type=int, default=[200, 400, 800])
    p.add_argument("--prompts", type=int, default=4, help="evaluation prompts per task")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--q-steps", type=int, default=40, help="--algo q steps per task (8 prompts x 4 samples each)")
    p.add_argument("--q-lr", type=float, default=3e-3, help="--algo q learning rate (search.json: 3e-3; "
                   "search_q.json: 3e-4, which fits the TD targets better)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "search.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load(args.model)
    out = Path(args.out)
    results = {"model": args.model or "shipped default", "max_new_tokens": args.max_new_tokens,
               "budgets": args.budgets, "methods": {m: {"method": METHODS[m][0], "options": METHODS[m][1],
                                                        "temperature": METHODS[m][2]} for m in args.methods},
               "machine": platform.processor() or platform.machine(), "tasks": {}}
    total = len(args.tasks) * args.prompts * len(args.budgets) * len(args.methods)
    bar = tqdm(total=total, desc="searches", unit="search")
    for task in args.tasks:
        evaluation, training = task_prompts(task, args.prompts)
        entry = {"prompts": evaluation, "mean_reward": {}, "rewards": {}, "evaluations": {}, "seconds": {}}
        q_model = None
        if any(METHODS[m][3] for m in args.methods):
            q_model, entry["q_training"] = train_q(args.model, task, training, args.q_steps,
                                                   args.max_new_tokens, seed=0, lr=args.q_lr)
        greedy = []
        for method in args.methods:
            name, options, temperature, needs_q = METHODS[method]
            searcher = q_model if needs_q else model
            for key in ("mean_reward", "rewards", "evaluations", "seconds"):
                entry[key][method] = {}
            for budget in args.budgets:
                rewards, spent, t0 = [], [], time.perf_counter()
                for i, prompt in enumerate(evaluation):
                    ids = torch.tensor(tokenizer(prompt)["input_ids"])
                    r = search(searcher, ids, tokenizer=tokenizer, reward=task_reward(task), method=name,
                               budget=budget, max_new_tokens=args.max_new_tokens, seed=i, temperature=temperature,
                               **options)
                    rewards.append(r.reward)
                    spent.append(r.stats.evaluations)
                    if method == args.methods[0] and budget == args.budgets[0]:  # every method scores it first
                        greedy.append(r.greedy_reward)
                    bar.update(1)
                entry["rewards"][method][str(budget)] = rewards
                entry["mean_reward"][method][str(budget)] = sum(rewards) / len(rewards)
                entry["evaluations"][method][str(budget)] = sum(spent) / len(spent)
                entry["seconds"][method][str(budget)] = (time.perf_counter() - t0) / len(evaluation)
        entry["greedy_reward"] = sum(greedy) / len(greedy) if greedy else float("nan")
        results["tasks"][task] = entry
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))  # after every task, so a cut-short run keeps what it did
    bar.close()

    # The goal: MCTS over actions beats token best-of-N at equal budget; on which tasks, at which budgets.
    summary = {}
    for task, entry in results["tasks"].items():
        mr = entry["mean_reward"]
        if "token_best_of_n" not in mr:
            continue
        for method in [m for m in mr if m.startswith("mcts")]:
            wins = [b for b in mr[method] if mr[method][b] > mr["token_best_of_n"][b]]
            summary.setdefault(method, {})[task] = {"budgets_won": wins, "budgets": len(mr[method])}
    results["mcts_vs_token_best_of_n"] = summary
    out.write_text(json.dumps(results, indent=1))
    plot(results, output(out, ".png"))

    print(f"\nmean reward over {args.prompts} prompts; budget in world-model token evaluations")
    for task, entry in results["tasks"].items():
        print(f"\n{task} (greedy {entry['greedy_reward']:.3f})")
        print(f"{'method':<16}" + "".join(f"{b:>9}" for b in args.budgets))
        for method, by_budget in entry["mean_reward"].items():
            print(f"{method:<16}" + "".join(f"{by_budget[str(b)]:>9.3f}" for b in args.budgets))
    for method, tasks in summary.items():
        won = [t for t, w in tasks.items() if len(w["budgets_won"]) == w["budgets"]]
        print(f"{method} beats token best-of-N at every budget on: {', '.join(won) or 'no task'}")
    print(f"wrote {out} and {output(out, '.png')}")


if __name__ == "__main__":
    main()
