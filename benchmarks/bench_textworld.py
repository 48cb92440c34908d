"""TextWorld games: BWArea trained policy-only against a same-shape Llama trained token by token (issue #14, part 1).

The paper's claim: training only the policy of a BWArea model with the game's reward beats autoregressive LMs on
TextWorld. Here, at a size a 2-core CPU runs in about an hour (58 min measured on 2 cores shared with other jobs,
load ~7: games 6, pretraining 39, RL and evaluation 15):

1. games: tw-coin_collector and tw-treasure_hunter (levels 1-5) and tw-simple (dense rewards, brief goal), made
   with tw-make by seed. Training games and held-out games come from disjoint seed ranges.
2. corpus: transcripts of the training games in the environment's own format (``bwarea.rl.envs.textworld``):
   walkthroughs, and exploratory play that takes a random admissible command with probability eps (0 to 1) and
   the walkthrough's next command from the current state otherwise.
3. models: a byte-level BPE, then ``bwarea pretrain`` (stage 1), ``bwarea pretrain --baseline llama`` (a Llama of
   the world model's shape, same data, steps and settings) and ``bwarea bc`` (the cloned policy), in this process
   through the same Python stages the CLI runs.
4. training on the training games, the same number of environment episodes for each, 3 seeds:
   (a) BWArea, policy only, GRPO: ``bwarea rl --env textworld``'s trainer (``RLTrainer``), whole multi-turn
       episodes, the episode's score as the outcome; world model, inverse dynamics and codebook frozen.
   (b) the Llama, every weight, with TRL's ``GRPOTrainer``: one turn per completion, the game so far as the prompt
       (states from the corpus's play on the training games), the turn's score change as the reward. TRL 1.x's
       multi-turn paths (``environment_factory``, tools) need a chat model with tool calls, which a raw LM is not.
       Budget: episodes x max-turns completions, at least as many game turns as (a) played.
   (c) the cloned policy, no RL.
5. evaluation on the held-out games: every game played ``--eval-episodes`` times, sampling as in training (tokens
   at --temperature, BWArea actions at 1); normalised score (score / the game's maximum) and win rate, mean and
   spread (population std) over the seeds, at ``--evals`` points along training for the plot.

    python benchmarks/bench_textworld.py --quick                 # toy size, a few minutes: checks the pipeline
    nice -n 19 python benchmarks/bench_textworld.py              # the small CPU size (~1 h on 2 busy cores)
    python benchmarks/bench_textworld.py --reuse --rl-steps 24 --out benchmarks/results/textworld-24steps.json
                                                                 # more RL on the same games, corpus and models
    python benchmarks/bench_textworld.py --device cuda --train-per-kind 100 --heldout-per-kind 20 \\
        --corpus-episodes 24 --hidden-size 512 --layers 8 --heads 8 --vocab-size 4096 --block-size 1024 \\
        --pretrain-steps 6000 --bc-steps 3000 --batch-size 32 --rl-steps 300 --rl-batch 8 --eval-episodes 8
                                                                 # a bigger run on one GPU (hours; not yet
                                                                 # run: this project had no GPU time for it)

Needs ``pip install -c constraints.txt 'bwarea[bench]'`` (textworld, trl, matplotlib). Writes JSON
(default benchmarks/results/textworld.json) and a plot of held-out score against training episodes (.png beside
it). Work files (games, corpus, models) go to --work; --reuse keeps the games, corpus and models already there.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from bwarea.loading import load
from bwarea.rl import RLConfig, RLTrainer
from bwarea.rl.envs.textworld import TextWorldGame, require_textworld
from bwarea.rl.rollout import play_episodes
from bwarea.tokenizer import load_tokenizer
from bwarea.tokenizer_train import train_tokenizer
from bwarea.train import BaselineStage, BCConfig, BCStage, PretrainConfig, PretrainStage, train
from outputs import output  # benchmarks/outputs.py, beside this script

RESULTS = Path(__file__).parent / "results"
# kind -> (tw-make challenge and its options, levels cycled by game index). Levels 1-5 need 1-5 commands.
KINDS = {
    "coin": (["tw-coin_collector"], [1, 2, 3, 4, 5]),
    "treasure": (["tw-treasure_hunter"], [1, 2, 3, 4, 5]),
    "simple": (["tw-simple", "--rewards", "dense", "--goal", "brief"], [None]),
}
TRAIN_SEEDS, HELDOUT_SEEDS = 1000, 9000  # first tw-make seed of each split: the ranges never meet

QUICK = dict(train_per_kind=2, heldout_per_kind=1, corpus_episodes=6, vocab_size=512, hidden_size=64, layers=2,
             heads=2, block_size=384, pretrain_steps=40, bc_steps=30, batch_size=8, rl_steps=2, rl_batch=2,
             group_size=2, eval_episodes=1, evals=2, max_turns=4, seeds=3)
SMALL = dict(train_per_kind=8, heldout_per_kind=4, corpus_episodes=12, vocab_size=1024, hidden_size=128, layers=2,
             heads=4, block_size=512, pretrain_steps=300, bc_steps=150, batch_size=8, rl_steps=12, rl_batch=4,
             group_size=4, eval_episodes=2, evals=3, max_turns=6, seeds=3)

SIZE_HELP = dict(
    train_per_kind="training games of each kind", heldout_per_kind="held-out games of each kind",
    corpus_episodes="scripted episodes per training game in the corpus", vocab_size="BPE vocabulary",
    hidden_size="model width", layers="world-model layers (the Llama's too)", heads="attention heads",
    block_size="pretraining block and context length", pretrain_steps="steps of stage 1 and of the Llama",
    bc_steps="policy-cloning steps", batch_size="pretraining blocks per step",
    rl_steps="(a) GRPO steps; (b) gets rl_steps x max_turns TRL steps", rl_batch="games per RL step",
    group_size="episodes per game per step (GRPO group)", eval_episodes="episodes per held-out game per evaluation",
    evals="evaluations along RL training", max_turns="commands per episode", seeds="RL seeds")

# ----- games and corpus ---------------------------------------------------------------------------------------
def tw_make() -> str:
    found = Path(sys.executable).parent / "tw-make"
    path = str(found) if found.exists() else shutil.which("tw-make")
    if not path:
        raise FileNotFoundError("tw-make not found: pip install -c constraints.txt 'bwarea[bench]'")
    return path


def make_games(folder: Path, per_kind: int, first_seed: int) -> list[Path]:
    """``per_kind`` games of every kind in ``folder`` (kept if already there) -> their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = []
    for kind, (challenge, levels) in KINDS.items():
        for i in range(per_kind):
            level, seed = levels[i % len(levels)], first_seed + i
            name = f"{kind}-l{level}-s{seed}.z8" if level else f"{kind}-s{seed}.z8"
            options = [*challenge, *(["--level", str(level)] if level else []), "--seed", str(seed)]
            jobs.append((folder / name, options))
    todo = [job for job in jobs if not job[0].exists()]
    for path, options in progress(todo, f"tw-make {folder.name}"):
        subprocess.run([tw_make(), *options, "--output", str(path), "--silent", "-f"], check=True,
                       capture_output=True, timeout=300)
    return [path for path, _ in jobs]


def progress(items, desc):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="game", disable=not items)


def play_scripted(game: Path, eps: float, max_turns: int, rng: random.Random) -> tuple[list[str], str, dict]:
    """One episode: the walkthrough's next command, or with probability eps a random admissible one.

    -> (commands, transcript in the environment's format, {"score", "max_score", "won"})."""
    env = TextWorldGame([game], max_turns=max_turns, infos=("admissible_commands", "policy_commands"))
    text, commands, done = env.reset(), [], False
    while not done:
        state = env.state
        plan = list(state.get("policy_commands") or [])
        options = [c for c in (state.get("admissible_commands") or []) if c not in ("inventory", "look")]
        command = rng.choice(options) if (rng.random() < eps or not plan) and options else (plan or ["look"])[0]
        observation, _, done = env.step(f" {command}\n")
        commands.append(command)
        text += f" {command}\n{observation}"
    return commands, text, {"score": env.score, "max_score": env.max_score, "won": env.won}


def build_corpus(games: list[Path], episodes: int, max_turns: int, out: Path, seed: int = 0) -> dict:
    """JSONL of transcripts (``episodes`` per game, eps cycling 0, 0.2, 0.5, 1) and the states along them,
    the prompts of the one-turn TRL baseline. -> stats."""
    rng = random.Random(seed)
    schedule = [0.0, 0.2, 0.5, 1.0]
    records, states, wins = [], [], 0
    for game in progress(games, "corpus"):
        for k in range(episodes):
            commands, text, stats = play_scripted(game, schedule[k % len(schedule)], max_turns, rng)
            records.append({"text": text})
            states.append({"game": str(game), "commands": commands})
            wins += stats["won"]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    (out.parent / "episodes.json").write_text(json.dumps(states))
    return {"episodes": len(records), "won_share": wins / len(records),
            "characters": sum(len(r["text"]) for r in records)}


# ----- models -------------------------------------------------------------------------------------------------
def pretrain_all(args, work: Path, corpus: Path) -> dict:
    """Tokenizer, stage 1, the Llama baseline and BC, each skipped with --reuse when already written."""
    def done(folder):
        return args.reuse and (folder / "model.safetensors").is_file()

    times = {}
    tok = work / "tokenizer"
    if not (args.reuse and (tok / "tokenizer.json").is_file()):
        train_tokenizer([str(corpus)], args.vocab_size, tok)
    shape = dict(hidden_size=args.hidden_size, layers=args.layers, heads=args.heads)
    common = dict(data=[str(corpus)], tokenizer=str(tok), block_size=args.block_size, batch_size=args.batch_size,
                  warmup_steps=max(1, min(100, args.pretrain_steps // 10)), log_every=10, save_every=10**9,
                  eval_blocks=16, cache_dir=str(work / "cache"), overwrite=True, lr=args.pretrain_lr, seed=0,
                  progress=True)
    for name, stage in (("s1", PretrainStage()), ("llama", BaselineStage())):
        if not done(work / name):
            t0 = time.perf_counter()
            train(stage, PretrainConfig(out=str(work / name), max_steps=args.pretrain_steps, **shape, **common))
            times[name] = time.perf_counter() - t0
    if not done(work / "bc"):
        common.pop("tokenizer")
        common.update(block_size=None, warmup_steps=max(1, min(100, args.bc_steps // 10)))
        t0 = time.perf_counter()
        train(BCStage(), BCConfig(out=str(work / "bc"), model=str(work / "s1"), max_steps=args.bc_steps,
                                  policy_init="world", posterior_fraction=0.0, **common))
        times["bc"] = time.perf_counter() - t0
    return times


def load_llama(folder: Path, device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    tokenizer = load_tokenizer(folder)
    return model, tokenizer


# ----- evaluation ---------------------------------------------------------------------------------------------
def summarise(envs: list[TextWorldGame]) -> dict:
    kinds = {}
    for env in envs:
        kinds.setdefault(env.game.name.split("-")[0], []).append(env)
    out = {"score": statistics.fmean(e.normalised_score for e in envs), "win": statistics.fmean(e.won for e in envs)}
    for kind, group in kinds.items():
        out[f"score/{kind}"] = statistics.fmean(e.normalised_score for e in group)
        out[f"win/{kind}"] = statistics.fmean(e.won for e in group)
    return out


def heldout_envs(games: list[Path], episodes: int, max_turns: int) -> list[TextWorldGame]:
    return [TextWorldGame(games, seed=i, max_turns=max_turns) for i in range(len(games)) for _ in range(episodes)]


@torch.no_grad()
def eval_bwarea(model, tokenizer, games, args, seed: int) -> dict:
    envs = heldout_envs(games, args.eval_episodes, args.max_turns)
    was_training = model.training
    model.eval()
    play_episodes(model, tokenizer, envs, max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, generator=torch.Generator(device=args.device).manual_seed(seed))
    model.train(was_training)
    return summarise(envs)


def first_line_cut(ids: list[int], tokenizer) -> list[int]:
    """The turn's tokens up to and including the first that holds a newline (as the BWArea rollout cuts)."""
    for k, token in enumerate(ids):
        if "\n" in tokenizer.decode([token]):
            return ids[:k + 1]
    return ids


@torch.no_grad()
def play_llama(model, tokenizer, envs, args, seed: int) -> None:
    """Multi-turn episodes with a transformers causal LM, turns cut at their first newline (as for BWArea)."""
    torch.manual_seed(seed)
    limit = model.config.max_position_embeddings
    tokens = [tokenizer(env.reset()).input_ids for env in envs]
    done = [False] * len(envs)
    for turn in range(args.max_turns):
        live = [i for i in range(len(envs)) if not done[i]]
        if not live:
            break
        width = max(len(tokens[i]) for i in live)
        ids = torch.full((len(live), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(live):
            ids[row, width - len(tokens[i]):] = torch.tensor(tokens[i])
            mask[row, width - len(tokens[i]):] = 1
        out = model.generate(ids.to(args.device), attention_mask=mask.to(args.device), do_sample=True,
                             temperature=args.temperature, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for row, i in enumerate(live):
            new = out[row, width:].tolist()
            if tokenizer.eos_token_id in new:
                new = new[:new.index(tokenizer.eos_token_id)]
            new = first_line_cut(new, tokenizer)
            observation, _, finished = envs[i].step(tokenizer.decode(new, skip_special_tokens=True))
            obs = tokenizer(observation, add_special_tokens=False).input_ids
            tokens[i] += new + obs
            done[i] = finished or len(tokens[i]) + args.max_new_tokens > limit
        for i in live:  # an episode cut by the context ends there, as play_episodes ends it
            if done[i]:
                envs[i].close()


def eval_llama(model, tokenizer, games, args, seed: int) -> dict:
    envs = heldout_envs(games, args.eval_episodes, args.max_turns)
    was_training = model.training
    model.eval()
    play_llama(model, tokenizer, envs, args, seed)
    model.train(was_training)
    return summarise(envs)


def eval_points(total: int, n: int) -> list[int]:
    """n evaluation steps spread over 1..total, the last at total."""
    return sorted({max(1, round(total * k / n)) for k in range(1, n + 1)})


# ----- (a) BWArea, policy only ----------------------------------------------------------------------------------
def run_bwarea_rl(args, work: Path, train_games, heldout, seed: int) -> dict:
    model, tokenizer = load(work / "bc", device=args.device)
    config = RLConfig(algo="grpo", steps=args.rl_steps, batch_size=args.rl_batch, group_size=args.group_size,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, lr=args.rl_lr,
                      kl_coef=args.kl_coef, max_turns=args.max_turns, seed=seed, tensorboard=False)
    trainer = RLTrainer(model, tokenizer, config, work / f"rl-bwarea-{seed}",
                        env_factory=lambda s: TextWorldGame(train_games, seed=s, max_turns=args.max_turns))
    # Count the game turns each rollout played: one rewarded decision per turn.
    turns_played, collect = [], trainer.collect

    def counted():
        rollout, means = collect()
        turns_played.append(int(rollout.step_mask.sum()))
        return rollout, means
    trainer.collect = counted
    episodes_per_step = args.rl_batch * args.group_size
    curve = [{"episodes": 0, "turns": 0, **eval_bwarea(model, tokenizer, heldout, args, seed=10_000 + seed)}]
    rewards, t0 = [], time.perf_counter()
    points = eval_points(args.rl_steps, args.evals)
    for step in range(1, args.rl_steps + 1):
        metrics = trainer.step()
        rewards.append(metrics["reward"])
        turns = sum(turns_played)
        if step in points:
            result = eval_bwarea(model, tokenizer, heldout, args, seed=10_000 + seed)
            curve.append({"episodes": step * episodes_per_step, "turns": turns, **result})
            print(f"  (a) seed {seed} step {step}: train reward {metrics['reward']:.3f}, held-out score "
                  f"{result['score']:.3f}, win {result['win']:.3f}", flush=True)
    trainer.check_frozen()
    return {"curve": curve, "train_reward": rewards, "turns": turns, "seconds": time.perf_counter() - t0}


# ----- (b) the Llama with TRL's GRPOTrainer ---------------------------------------------------------------------
def turn_prompts(work: Path, tokenizer, limit: int) -> list[dict]:
    """Every state along the corpus's episodes (the game so far, and the commands that led there) that fits the
    context with room for a turn."""
    rows = []
    for episode in json.loads((work / "corpus" / "episodes.json").read_text()):
        env = TextWorldGame([episode["game"]], max_turns=len(episode["commands"]))
        text = env.reset()
        for k, command in enumerate(episode["commands"]):
            if len(tokenizer(text).input_ids) <= limit:
                rows.append({"prompt": text, "game": episode["game"], "history": json.dumps(episode["commands"][:k])})
            observation, _, done = env.step(f" {command}\n")
            text += f" {command}\n{observation}"
            if done:
                break
        env.close()
    return rows


def turn_reward(prompts, completions, game, history, **kwargs) -> list[float]:
    """The score change of the completion's first line, played in the game restored by replaying its history."""
    rewards = []
    for completion, path, past in zip(completions, game, history):
        commands = json.loads(past)
        env = TextWorldGame([path], max_turns=len(commands) + 1)
        env.reset()
        for command in commands:
            env.step(f" {command}\n")
        cut = completion[:completion.index("\n") + 1] if "\n" in completion else completion
        _, reward, _ = env.step(cut)
        env.close()
        rewards.append(reward)
    return rewards


def run_llama_trl(args, work: Path, heldout, seed: int, prompts: list[dict]) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = load_llama(work / "llama", args.device)
    tokenizer.padding_side = "left"
    completions_per_step = args.rl_batch * args.group_size
    # The same number of episodes, each worth max_turns one-turn completions.
    steps = args.rl_steps * args.max_turns
    points = eval_points(steps, args.evals)
    curve = [{"episodes": 0, "turns": 0, **eval_llama(model, tokenizer, heldout, args, seed=10_000 + seed)}]

    class Evaluate(TrainerCallback):
        def on_step_end(self, targs, state, control, model=None, **kw):
            if state.global_step in points:
                result = eval_llama(model, tokenizer, heldout, args, seed=10_000 + seed)
                turns = state.global_step * completions_per_step
                curve.append({"episodes": turns / args.max_turns, "turns": turns, **result})
                print(f"  (b) seed {seed} step {state.global_step}: held-out score {result['score']:.3f}, "
                      f"win {result['win']:.3f}", flush=True)

    config = GRPOConfig(
        output_dir=str(work / f"rl-llama-{seed}"), per_device_train_batch_size=completions_per_step,
        num_generations=args.group_size, max_completion_length=args.max_new_tokens, temperature=args.temperature,
        top_k=0, top_p=1.0, learning_rate=args.rl_lr, beta=args.kl_coef, max_steps=steps, seed=seed,
        logging_steps=max(1, steps // 10), report_to="none", save_strategy="no", use_cpu=args.device == "cpu",
        bf16=False, dataloader_num_workers=0, disable_tqdm=False, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0)
    trainer = GRPOTrainer(model=model, reward_funcs=turn_reward, args=config,
                          train_dataset=Dataset.from_list(prompts).shuffle(seed=seed), processing_class=tokenizer,
                          callbacks=[Evaluate()])
    t0 = time.perf_counter()
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return {"curve": curve, "train_reward": rewards, "turns": steps * completions_per_step,
            "seconds": time.perf_counter() - t0}


# ----- report -------------------------------------------------------------------------------------------------
def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "values": values}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"bwarea_policy_grpo": ("(a) BWArea, policy-only GRPO", "tab:blue"),
              "llama_trl_grpo": ("(b) Llama, TRL GRPO (one turn per completion)", "tab:orange")}
    for ax, metric, label in ((axes[0], "score", "held-out normalised score"), (axes[1], "win", "held-out win rate")):
        for key, (name, colour) in styles.items():
            runs = result["methods"][key]["runs"]
            xs = [point["episodes"] for point in runs[0]["curve"]]
            ys = [[run["curve"][k][metric] for run in runs] for k in range(len(xs))]
            mean = [statistics.fmean(y) for y in ys]
            std = [statistics.pstdev(y) if len(y) > 1 else 0.0 for y in ys]
            ax.plot(xs, mean, marker="o", color=colour, label=name)
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=colour, alpha=0.2)
        ax.axhline(result["methods"]["bwarea_cloned"][metric]["mean"], color="tab:green", linestyle="--",
                   label="(c) BWArea cloned policy, no RL")
        ax.axhline(result["methods"]["llama_pretrained"][metric]["mean"], color="tab:gray", linestyle=":",
                   label="Llama pretrained, no RL")
        ax.set_xlabel("training episodes (b: completions / max turns)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"TextWorld, {len(result['games']['heldout'])} held-out games; mean and spread over "
                 f"{len(result['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy size: checks the pipeline in a few minutes")
    p.add_argument("--work", default="runs/bench-textworld", help="games, corpus and models (default: %(default)s)")
    p.add_argument("--reuse", action="store_true", help="keep the corpus and models already in --work")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/textworld[-quick].json)")
    p.add_argument("--device", default="cpu")
    for name, value in SMALL.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"{SIZE_HELP[name]} (default {value}; --quick {QUICK[name]})")
    p.add_argument("--max-new-tokens", type=int, default=10, help="tokens per turn (default %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="token temperature, training and evaluation")
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--rl-lr", type=float, default=2e-4, help="RL learning rate, both models (default %(default)s)")
    p.add_argument("--kl-coef", type=float, default=0.02, help="KL weight (TRL's beta), both (default %(default)s)")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else SMALL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in SMALL:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    require_textworld()
    # transformers' renamed-argument notices, raised by TRL on every evaluation, would bury the progress lines.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    if args.device == "cpu":
        torch.set_num_threads(1)  # the benchmark machine's 2 cores are shared; one thread per job
    work = Path(args.work) / ("quick" if args.quick else "small")
    out = Path(args.out) if args.out else RESULTS / ("textworld-quick.json" if args.quick else "textworld.json")
    started = time.perf_counter()

    train_games = make_games(work / "games" / "train", args.train_per_kind, TRAIN_SEEDS)
    heldout = make_games(work / "games" / "heldout", args.heldout_per_kind, HELDOUT_SEEDS)
    # Disjoint by seed; also check no held-out game opens with the same text as a training game.
    openings = {TextWorldGame([g]).reset() for g in train_games}
    overlap = sum(TextWorldGame([g]).reset() in openings for g in heldout)
    corpus = work / "corpus" / "transcripts.jsonl"
    if not (args.reuse and corpus.is_file()):
        corpus_stats = build_corpus(train_games, args.corpus_episodes, args.max_turns, corpus)
        (corpus.parent / "stats.json").write_text(json.dumps(corpus_stats))
    else:
        corpus_stats = json.loads((corpus.parent / "stats.json").read_text())
    times = pretrain_all(args, work, corpus)
    print(f"games, corpus and models ready in {time.perf_counter() - started:.0f}s", flush=True)

    seeds = list(range(args.seeds))
    model, tokenizer = load(work / "bc", device=args.device)
    cloned = [eval_bwarea(model, tokenizer, heldout, args, seed=10_000 + s) for s in seeds]
    llama, llama_tok = load_llama(work / "llama", args.device)
    llama_base = [eval_llama(llama, llama_tok, heldout, args, seed=10_000 + s) for s in seeds]
    del model, llama
    prompts = turn_prompts(work, llama_tok, args.block_size - args.max_new_tokens)
    runs_a, runs_b = [], []
    for s in seeds:
        print(f"seed {s}: (a) BWArea policy-only GRPO", flush=True)
        runs_a.append(run_bwarea_rl(args, work, train_games, heldout, s))
        print(f"seed {s}: (b) Llama, TRL GRPOTrainer", flush=True)
        runs_b.append(run_llama_trl(args, work, heldout, s, prompts))

    def final(runs, metric):
        return spread([run["curve"][-1][metric] for run in runs])

    result = {
        "benchmark": "textworld", "size": "quick" if args.quick else "small",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "games": {"train": [g.name for g in train_games], "heldout": [g.name for g in heldout],
                  "heldout_with_a_training_opening": overlap},
        "corpus": corpus_stats, "trl_prompts": len(prompts), "pretrain_seconds": times, "seeds": seeds,
        "methods": {
            "bwarea_policy_grpo": {"score": final(runs_a, "score"), "win": final(runs_a, "win"), "runs": runs_a},
            "llama_trl_grpo": {"score": final(runs_b, "score"), "win": final(runs_b, "win"), "runs": runs_b},
            "bwarea_cloned": {"score": spread([r["score"] for r in cloned]), "win": spread([r["win"] for r in cloned]),
                              "evals": cloned},
            "llama_pretrained": {"score": spread([r["score"] for r in llama_base]),
                                 "win": spread([r["win"] for r in llama_base]), "evals": llama_base},
        },
        "notes": [
            "(b) is one turn per completion: the prompt is a state from the corpus's play on the training games, the "
            "reward that turn's score change; TRL 1.x's multi-turn paths need a chat model with tool calls.",
            "Budget: (a) rl_steps x rl_batch x group_size episodes; (b) the same number times max_turns completions "
            "(at least as many game turns as (a) played: see each run's 'turns').",
            "Pretraining and the corpus have one seed; the spread is over RL seeds and evaluation sampling seeds.",
        ],
        "machine": {"platform": platform.platform(), "device": args.device, "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "seconds": time.perf_counter() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, allow_nan=False))
    plot(result, output(out, ".png"))
    print_table(result)
    print(f"wrote {out} and {output(out, '.png')}")
    return 0


def print_table(result: dict) -> None:
    names = {"bwarea_policy_grpo": "(a) BWArea policy-only GRPO", "llama_trl_grpo": "(b) Llama token-level TRL GRPO",
             "bwarea_cloned": "(c) BWArea cloned policy, no RL", "llama_pretrained": "    Llama pretrained, no RL"}
    print(f"\n{'method':34} {'held-out score':>18} {'win rate':>18}")
    for key, name in names.items():
        m = result["methods"][key]
        print(f"{name:34} {m['score']['mean']:>10.3f} ± {m['score']['std']:.3f} {m['win']['mean']:>10.3f} ± "
              f"{m['win']['std']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
