"""Policy-only RL against a plain-LM baseline: reward reached, and what happens to language quality.

On the shipped model (or --model) and the keyword task, for the same CPU budget each:

* **GRPO on the policy alone** (world model, inverse dynamics, codebook frozen): the bwarea way.
* **token-level REINFORCE on the whole world model** (a plain-LM RL baseline): the same rollouts
  (same sampler, group size and leave-one-out advantages), but the gradient goes into the world model's
  token log-probs log p(x_{t+1} | x<=t, a_t) and the policy is frozen; the exact KL to the starting world
  model over the vocabulary is penalised with the same coefficient.

Measured before and after each: mean keyword reward on fixed evaluation prompts (same seed), the exact
KL of the policy to the starting policy on held-out text, BWArea perplexity on held-out text
(``model.lm_log_likelihood``: the exact LM marginal over actions), and the world model's perplexity under
inverse-dynamics actions (teacher forcing, what pretraining optimises). The paper's claim is that
policy-only optimisation keeps language quality; the perplexity drift says whether ours does.

    python benchmarks/bench_rl.py --minutes 5                  # the shipped model
    python benchmarks/bench_rl.py --model runs/bc --heldout heldout.txt --minutes 1

Prints a table and writes JSON (default benchmarks/results/bench_rl.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from bwarea.loading import load
from bwarea.rl import RLConfig, RLTrainer, build_reward_set, sample_completions
from bwarea.rl import algorithms as alg
from bwarea.rl.tasks import make_task


def heldout_lines(path: str | None) -> list[str]:
    from bwarea import default_model

    file = Path(path) if path else default_model.DIR / "heldout.txt"
    if not file.is_file():
        raise FileNotFoundError(f"no held-out text at {file}: pass --heldout FILE")
    return [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if len(line.split()) >= 8]


def batches(tokenizer, lines, batch_size, max_tokens, device):
    tokenizer.padding_side = "left"
    for i in range(0, len(lines), batch_size):
        enc = tokenizer(lines[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_tokens)
        yield enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.no_grad()
def language_quality(model, reference_policy, tokenizer, lines, max_tokens=64) -> dict:
    """BWArea perplexity, world-model perplexity (inverse actions) and exact policy KL on held-out text."""
    lm_sum = world_sum = kl_sum = 0.0
    lm_n = kl_n = 0
    for ids, mask in batches(tokenizer, lines, 8, max_tokens, next(model.parameters()).device):
        ll = model.lm_log_likelihood(ids, mask)                   # (B, T-1), 0 where the target is padding
        targets = mask[:, 1:].bool()
        lm_sum += float(ll[targets].sum())
        lm_n += int(targets.sum())
        labels = ids.masked_fill(mask == 0, -100)
        out = model.forward_inverse(ids, mask, labels=labels)
        world_sum += float(out.loss) * int(targets.sum())
        cos, sin, attn = model.positions_and_mask(mask, *ids.shape, ids.device, model._dtype())
        kl = alg.exact_kl(model.policy(ids, cos, sin, attn), reference_policy(ids, cos, sin, attn))
        kl_sum += float(kl[mask.bool()].sum())
        kl_n += int(mask.sum())
    return {"bwarea_ppl": math.exp(-lm_sum / lm_n), "world_ppl": math.exp(world_sum / lm_n),
            "policy_kl_heldout": kl_sum / kl_n}


@torch.no_grad()
def eval_reward(model, tokenizer, prompts, reward, samples, max_new_tokens, seed=1234) -> float:
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    torch.manual_seed(seed)
    total, n = 0.0, 0
    for i in range(0, len(prompts), 16):
        r = sample_completions(model, tokenizer, prompts[i:i + 16], group_size=samples,
                               max_new_tokens=max_new_tokens, generator=g)
        scores = reward(r.prompts, r.completions)
        total, n = total + sum(scores), n + len(scores)
    return total / n


def run_grpo(model, tokenizer, prompts, args, out_dir) -> dict:
    config = RLConfig(algo="grpo", steps=10 ** 6, batch_size=args.batch_size, group_size=args.group_size,
                      max_new_tokens=args.max_new_tokens, lr=args.lr, kl_coef=args.kl_coef, tensorboard=False,
                      seed=args.seed)
    rewards = build_reward_set(["keyword"], task_options={"keywords": args.keyword})
    trainer = RLTrainer(model, tokenizer, config, out_dir, rewards=rewards, prompts=[{"prompt": p} for p in prompts])
    start, steps, last = time.perf_counter(), 0, {}
    while time.perf_counter() - start < args.minutes * 60:
        last = trainer.step()
        steps += 1
    trainer.check_frozen()
    return {"steps": steps, "seconds": time.perf_counter() - start, "last_step_kl": last.get("kl"),
            "last_step_reward": last.get("reward"), "reference": trainer.reference}


def run_world_model_reinforce(model, tokenizer, prompts, args) -> dict:
    """Token-level REINFORCE on the whole world model, policy frozen, exact vocabulary KL to the start."""
    device = next(model.parameters()).device
    model.requires_grad_(False)
    model.world_model.requires_grad_(True)
    reference_world = copy.deepcopy(model.world_model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.world_model.parameters(), lr=args.lm_lr, weight_decay=0.0)
    reward = make_task("keyword", keywords=args.keyword)
    rng = torch.Generator().manual_seed(args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < args.minutes * 60:
        chosen = [prompts[i] for i in torch.randint(len(prompts), (args.batch_size,), generator=rng)]
        r = sample_completions(model, tokenizer, chosen, group_size=args.group_size,
                               max_new_tokens=args.max_new_tokens, generator=g)
        returns = torch.tensor(reward(r.prompts, r.completions), device=device)
        adv = (returns - alg.leave_one_out_baseline(returns, r.group))[:, None] * r.action_mask
        with torch.no_grad():
            # The world model's actions: inverse dynamics on the prompt (as generation uses), the sampled ones after.
            inverse, _, _ = model.infer_actions(r.sequences, r.attention_mask)
            actions = torch.where(r.action_mask, r.actions, inverse)
            vectors = model.action_codebook(actions)
            cos, sin, attn = model.positions_and_mask(r.attention_mask, *r.sequences.shape, device, model._dtype())
            ref_logits = reference_world.lm_head(reference_world(r.sequences, vectors, cos, sin, attn)).float()
        logits = model.world_model.lm_head(model.world_model(r.sequences, vectors, cos, sin, attn)).float()
        targets = torch.cat([r.sequences[:, 1:], r.sequences[:, -1:]], dim=1)  # column t predicts token t+1
        logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
        loss = alg.reinforce_loss(logp, adv, r.action_mask) + args.kl_coef * alg.masked_mean(
            alg.exact_kl(logits, ref_logits), r.action_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.world_model.parameters(), 1.0)
        optimizer.step()
        steps += 1
    model.requires_grad_(False)
    return {"steps": steps, "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="BWArea checkpoint (default: the shipped model)")
    p.add_argument("--heldout", help="held-out text file (default: the shipped model's heldout.txt)")
    p.add_argument("--minutes", type=float, default=5.0, help="CPU budget per method, in minutes")
    p.add_argument("--keyword", default="love")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4, help="policy learning rate (GRPO)")
    p.add_argument("--lm-lr", type=float, default=1e-4, help="world-model learning rate (plain-LM baseline)")
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--ppl-lines", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/bench_rl.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = heldout_lines(args.heldout)
    quality_lines = lines[:args.ppl_lines]
    prompt_pool = [" ".join(line.split()[:6]) for line in lines[args.ppl_lines:]] or \
                  [" ".join(line.split()[:6]) for line in lines]
    eval_prompts = prompt_pool[:args.eval_prompts]
    train_prompts = prompt_pool[args.eval_prompts:] or prompt_pool
    reward = make_task("keyword", keywords=args.keyword)

    def measure(model, reference_policy):
        return {"reward": eval_reward(model, tokenizer, eval_prompts, reward, args.eval_samples, args.max_new_tokens),
                **language_quality(model, reference_policy, tokenizer, quality_lines)}

    model, tokenizer = load(args.model)
    start_policy = copy.deepcopy(model.policy).requires_grad_(False)
    results = {"settings": {k: v for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads()}
    results["start"] = measure(model, start_policy)

    with tempfile.TemporaryDirectory() as scratch:  # steps are driven here, so the trainer writes nothing
        grpo = run_grpo(model, tokenizer, train_prompts, args, scratch)
    results["grpo"] = {**{k: v for k, v in grpo.items() if k != "reference"}, **measure(model, start_policy)}

    model, tokenizer = load(args.model)
    lm = run_world_model_reinforce(model, tokenizer, train_prompts, args)
    results["world_model_reinforce"] = {**lm, **measure(model, start_policy)}

    s = results["start"]
    print(f"\nkeyword {args.keyword!r}, {args.minutes} CPU-minutes per method, {torch.get_num_threads()} threads")
    print(f"{'':28} {'steps':>6} {'reward':>8} {'policy KL':>10} {'BWArea ppl':>11} {'world ppl':>10}")
    for name, row in (("start", s), ("GRPO, policy only", results["grpo"]),
                      ("REINFORCE, whole world model", results["world_model_reinforce"])):
        print(f"{name:28} {row.get('steps', 0):>6} {row['reward']:>8.3f} {row['policy_kl_heldout']:>10.4f} "
              f"{row['bwarea_ppl']:>11.2f} {row['world_ppl']:>10.2f}")
    for name in ("grpo", "world_model_reinforce"):
        row = results[name]
        row["ppl_drift"] = row["bwarea_ppl"] / s["bwarea_ppl"] - 1
        row["world_ppl_drift"] = row["world_ppl"] / s["world_ppl"] - 1
        print(f"{name}: reward {s['reward']:.3f} -> {row['reward']:.3f}, BWArea ppl drift {row['ppl_drift']:+.1%}, "
              f"world ppl drift {row['world_ppl_drift']:+.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
