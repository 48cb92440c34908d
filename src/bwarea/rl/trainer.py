"""The RL trainer: roll out, score, compute advantages, update the policy; everything else stays frozen.

    trainer = RLTrainer(model, tokenizer, RLConfig(algo="grpo", steps=200), out_dir="runs/keyword",
                        rewards=build_reward_set(["keyword"]), prompts=load_prompts("prompts.txt"))
    trainer.train()

One process or several (``torchrun --nproc_per_node 2 -m bwarea.cli rl ...`` on CPUs, gloo; on GPUs
``accelerate launch --multi_gpu --num_processes 2 -m bwarea.cli rl ...``): each process
samples its own batch, the policy gradients are averaged by accelerate's DDP wrapper, and metrics are
gathered before they are written. Only the policy (``model.policy``; plus a value head for PPO, kept here)
trains. The reference for the KL penalty is a frozen copy of the starting policy. After training (and at
every checkpoint) the world model, inverse dynamics and codebook are checked bit-identical to the start.

OUT holds: the trained model (config.json + model.safetensors + tokenizer: ``from_pretrained(OUT)``),
metrics.jsonl (one JSON object per step), tb/ (TensorBoard), checkpoints/step-N/ (for --resume).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..data import jsonl_records
from . import algorithms as alg
from .rollout import Rollout, play_episodes, sample_completions

METRICS = "metrics.jsonl"


@dataclass
class RLConfig:
    """Hyper-parameters of a run. ``None`` fields take the algorithm's default (see ``resolved``)."""

    algo: str = "grpo"
    steps: int = 100
    batch_size: int = 8            # prompts (or episodes) per step, per process
    group_size: int | None = None  # samples per prompt: grpo 4, reinforce 4 (leave-one-out), ppo 1
    max_new_tokens: int = 24
    temperature: float = 1.0       # token sampling of the world model (actions are always at temperature 1)
    top_k: int | None = None
    top_p: float = 1.0
    max_prompt_tokens: int = 64
    lr: float = 1e-4
    kl_coef: float = 0.05
    entropy_coef: float = 0.0
    clip: float = 0.2
    epochs: int | None = None      # passes over each batch: ppo 4, others 1
    minibatches: int | None = None  # per pass: ppo 2, others 1
    baseline: str = "loo"          # reinforce: "loo" (leave-one-out within the group) or "ema"
    ema_decay: float = 0.9
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.5
    max_grad_norm: float = 1.0
    max_turns: int = 3             # environments: turns per episode
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    tensorboard: bool = True

    def resolved(self) -> "RLConfig":
        """A copy with the algorithm defaults filled in and every field checked (ValueError naming it)."""
        c = copy.copy(self)
        alg.check_algorithm(c.algo)
        ppo = c.algo == "ppo"
        c.group_size = c.group_size if c.group_size is not None else (1 if ppo else 4)
        c.epochs = c.epochs if c.epochs is not None else (4 if ppo else 1)
        c.minibatches = c.minibatches if c.minibatches is not None else (2 if ppo else 1)
        positive = ["steps", "batch_size", "group_size", "max_new_tokens", "epochs", "minibatches", "max_turns",
                    "save_every", "keep_checkpoints", "max_prompt_tokens"]
        for name in positive:
            if int(getattr(c, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(c, name)}")
        for name in ("lr", "temperature"):
            if not getattr(c, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(c, name)}")
        for name in ("kl_coef", "entropy_coef", "vf_coef", "max_grad_norm"):
            if getattr(c, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(c, name)}")
        if not 0 < c.clip < 1:
            raise ValueError(f"clip must lie in (0, 1), got {c.clip}")
        if c.baseline not in ("loo", "ema"):
            raise ValueError(f"baseline must be 'loo' or 'ema', got {c.baseline!r}")
        if c.algo == "grpo" and c.group_size < 2:
            raise ValueError("grpo compares samples of the same prompt: group_size must be >= 2")
        if c.algo == "reinforce" and c.baseline == "loo" and c.group_size < 2:
            raise ValueError("a leave-one-out baseline needs group_size >= 2 (or use baseline 'ema')")
        if (c.batch_size * c.group_size) % c.minibatches:
            raise ValueError(f"minibatches {c.minibatches} must divide the {c.batch_size * c.group_size} samples "
                             "of a step")
        return c


def load_prompts(path) -> list[dict]:
    """A prompts file -> [{"prompt": str, ...extra columns}]. One prompt per line, or JSONL with "prompt".

    Extra JSONL columns reach the rewards as keyword lists, as TRL passes dataset columns.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file {str(path)!r}")
    text = path.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompts file {path} has no prompts")
    if path.suffix == ".jsonl" or lines[0].lstrip().startswith("{"):
        return jsonl_records(path, text, "prompt")
    return [{"prompt": line.rstrip("\n")} for line in lines]


def default_prompts(words: int = 6) -> list[dict]:
    """The shipped model's held-out text, each line cut to its first ``words`` words, as prompts."""
    from .. import default_model

    heldout = default_model.DIR / "heldout.txt"
    if not heldout.is_file():
        raise FileNotFoundError(f"no prompts given and the shipped model has no held-out text ({heldout}); "
                                "pass --prompts FILE")
    rows = []
    for line in heldout.read_text(encoding="utf-8").splitlines():
        split = line.split()
        if len(split) >= words:
            rows.append({"prompt": " ".join(split[:words])})
    if not rows:
        raise ValueError(f"{heldout} has no line of {words} or more words to prompt with")
    return rows


def fingerprint(module: nn.Module, skip_prefix: str | None = None) -> dict[str, str]:
    """name -> sha256 of every parameter and buffer's bytes (names under ``skip_prefix`` left out)."""
    out = {}
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if skip_prefix and name.startswith(skip_prefix):
            continue
        data = tensor.detach().cpu().contiguous()
        out[name] = hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()
    return out


class PolicyWithValue(nn.Module):
    """What trains: the policy trunk and head, and for PPO a value head reading the same trunk."""

    def __init__(self, policy: nn.Module, value_head: nn.Module | None = None):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, input_ids, cos, sin, mask=None):
        """-> (action logits (batch, seq, A) float32, values (batch, seq) float32 or None)."""
        if self.value_head is None:
            return self.policy(input_ids, cos, sin, mask), None
        p = self.policy
        hidden = p.norm(p.run(p.embed_tokens(input_ids), cos, sin, mask))
        return p.head(hidden).float(), self.value_head(hidden).squeeze(-1).float()


def make_accelerator():
    """An Accelerator that also joins a CPU process group: accelerate only uses gloo when told it is on CPU."""
    from accelerate import Accelerator

    device_module = getattr(torch, "accelerator", None)
    has_device = device_module.is_available() if device_module is not None else torch.cuda.is_available()
    return Accelerator(cpu=not has_device)


class RLTrainer:
    """Policy optimisation of a BWArea model against rewards (single turn) or an environment (multi-turn).

    model: BWAreaForCausalLM (its policy is trained in place). tokenizer: its tokenizer (with a pad token).
    rewards: a RewardSet (single-turn) or None with ``env_factory`` (seed -> Environment).
    prompts: [{"prompt": str, ...}] for single-turn. out_dir: where everything is written.
    base_model: recorded in checkpoints so a resumed run can say what it started from.
    """

    def __init__(self, model, tokenizer, config: RLConfig, out_dir, rewards=None, prompts=None, env_factory=None,
                 base_model: str | None = None, accelerator=None):
        self.config = c = config.resolved()
        if (rewards is None) == (env_factory is None):
            raise ValueError("give either rewards (with prompts) or an environment, not both or neither")
        if rewards is not None and not prompts:
            raise ValueError("no prompts: give a prompts file or use the shipped model's held-out text")
        self.acc = accelerator or make_accelerator()
        self.model, self.tokenizer, self.rewards, self.prompts = model, tokenizer, rewards, prompts
        self.env_factory, self.base_model, self.out = env_factory, base_model, Path(out_dir)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token (load it with bwarea.load_tokenizer)")
        model.to(self.acc.device).eval()
        model.requires_grad_(False)
        model.policy.requires_grad_(True)
        # The KL reference: the starting policy, frozen. Deep-copied before any update.
        self.reference = copy.deepcopy(model.policy).requires_grad_(False).eval()
        self.frozen = fingerprint(model, skip_prefix="policy.")
        self.reference_print = fingerprint(self.reference)
        value_head = None
        if c.algo == "ppo":
            value_head = nn.Linear(model.config.hidden_size, 1).to(self.acc.device)
            nn.init.zeros_(value_head.weight)
            nn.init.zeros_(value_head.bias)
        # Column-major CPU weights make rollouts faster; lay them out before DDP wraps the policy, so the
        # gradient buckets it builds match the layout the parameters keep from then on.
        model.optimize_for_cpu_decoding()
        trainable = PolicyWithValue(model.policy, value_head)
        optimizer = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=c.lr, weight_decay=0.0)
        self.module, self.optimizer = self.acc.prepare(trainable, optimizer)
        self.step_count, self.ema = 0, None
        rank = self.acc.process_index
        torch.manual_seed(c.seed * 7919 + rank)
        self.generator = torch.Generator(device=self.acc.device).manual_seed(c.seed * 7919 + rank)
        self.prompt_rng = torch.Generator().manual_seed(c.seed * 104729 + rank)
        self.writer = None

    # ----- one step -----------------------------------------------------------------------------------
    def collect(self) -> tuple[Rollout, dict]:
        """Sample this process's batch and score it -> (rollout with rewards, per-reward means)."""
        c = self.config
        if self.env_factory is not None:
            seeds = torch.randint(2 ** 31 - 1, (c.batch_size,), generator=self.prompt_rng).tolist()
            envs = [self.env_factory(s) for s in seeds for _ in range(c.group_size)]
            group = [i for i in range(c.batch_size) for _ in range(c.group_size)]
            rollout = play_episodes(self.model, self.tokenizer, envs, group=group, max_turns=c.max_turns,
                                    max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k,
                                    top_p=c.top_p, generator=self.generator)
            return rollout, {}
        rows = [self.prompts[i] for i in torch.randint(len(self.prompts), (c.batch_size,), generator=self.prompt_rng)]
        rollout = sample_completions(
            self.model, self.tokenizer, [r["prompt"] for r in rows], group_size=c.group_size,
            max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
            max_prompt_tokens=c.max_prompt_tokens, generator=self.generator)
        # Extra JSONL columns go to the rewards per sample, as TRL passes dataset columns.
        columns = {k: [r.get(k) for r in rows for _ in range(c.group_size)] for k in rows[0] if k != "prompt"}
        total, valid, means = self.rewards.score(rollout.prompts, rollout.completions,
                                                 completion_ids=rollout.completion_ids, **columns)
        rollout.set_sequence_rewards(total.to(rollout.rewards.device))
        rollout.drop(valid)
        return rollout, means

    def advantages(self, r: Rollout, values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (advantages (batch, seq), value targets (batch, seq) for PPO else None)."""
        c = self.config
        if c.algo == "grpo":
            return alg.grpo_advantages(r.rewards, r.step_mask, r.action_mask, r.group), None
        if c.algo == "ppo":
            adv, returns = alg.gae(r.rewards, values, r.action_mask, c.gamma, c.lam)
            return alg.whiten(adv, r.action_mask), returns
        returns = alg.sequence_returns(r.rewards)
        if c.baseline == "loo":
            baseline = alg.leave_one_out_baseline(returns, r.group, r.action_mask.any(-1))
        else:
            baseline = torch.full_like(returns, 0.0 if self.ema is None else self.ema)
            kept = r.action_mask.any(-1)
            batch_mean = self.acc.reduce(returns[kept].mean() if kept.any() else returns.new_zeros(()), "mean")
            mean = float(batch_mean)
            self.ema = mean if self.ema is None else c.ema_decay * self.ema + (1 - c.ema_decay) * mean
        return alg.reinforce_advantages(r.rewards, r.action_mask, baseline), None

    def step(self) -> dict:
        """One rollout and its policy update -> the metrics of the step (gathered over processes)."""
        c, t0 = self.config, time.perf_counter()
        rollout, reward_means = self.collect()
        seq, mask = rollout.sequences, rollout.attention_mask
        cos, sin, attn = self.model.positions_and_mask(mask, *seq.shape, seq.device, self.model._dtype())
        with torch.no_grad():
            old_logits, old_values = self.acc.unwrap_model(self.module)(seq, cos, sin, attn)
            ref_logits = self.reference(seq, cos, sin, attn)
            old_logp = alg.action_log_probs(old_logits, rollout.actions)
            start_kl, start_entropy = alg.kl_and_entropy(old_logits, ref_logits, rollout.action_mask)
        advantages, returns = self.advantages(rollout, old_values)
        losses, clip_fracs, value_losses = [], [], []
        n, per = len(rollout), len(rollout) // c.minibatches
        for _ in range(c.epochs):
            order = torch.arange(n)
            if c.minibatches > 1:
                order = torch.randperm(n, generator=self.prompt_rng)
            order = order.to(seq.device)
            for k in range(c.minibatches):
                rows = order[k * per:(k + 1) * per]
                logits, values = self.module(seq[rows], cos[rows], sin[rows], None if attn is None else attn[rows])
                m = rollout.action_mask[rows]
                logp = alg.action_log_probs(logits, rollout.actions[rows])
                if c.algo == "reinforce":
                    pg, clip_frac = alg.reinforce_loss(logp, advantages[rows], m), logp.new_zeros(())
                else:
                    pg, clip_frac = alg.clipped_loss(logp, old_logp[rows], advantages[rows], m, c.clip)
                kl, ent = alg.kl_and_entropy(logits, ref_logits[rows], m)
                loss = pg + c.kl_coef * kl - c.entropy_coef * ent
                if values is not None:
                    v_loss = alg.value_loss(values, returns[rows], m)
                    loss = loss + c.vf_coef * v_loss
                    value_losses.append(v_loss.detach())
                self.acc.backward(loss)
                if c.max_grad_norm > 0:
                    self.acc.clip_grad_norm_(self.module.parameters(), c.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
                clip_fracs.append(clip_frac)
        self.step_count += 1
        return self._metrics(rollout, reward_means, start_kl, start_entropy, losses, clip_fracs, value_losses,
                             time.perf_counter() - t0)

    def _metrics(self, r: Rollout, reward_means, kl, ent, losses, clip_fracs, value_losses, seconds) -> dict:
        acc = self.acc
        kept = r.action_mask.any(-1)
        returns = alg.sequence_returns(r.rewards)
        all_returns = acc.gather(returns)[acc.gather(kept)]
        used = torch.bincount(r.actions[r.action_mask], minlength=self.model.config.num_actions)
        counts = acc.reduce(used.float(), "sum")
        lengths = acc.gather(r.action_mask.sum(-1).float())

        def mean(xs):
            return float(acc.reduce(torch.stack(xs).float().mean(), "mean"))

        skipped = int(acc.reduce(torch.tensor(float((~kept).sum()), device=acc.device), "sum"))
        m = {
            "step": self.step_count,
            "reward": float(all_returns.mean()) if all_returns.numel() else float("nan"),
            "reward_std": float(all_returns.std()) if all_returns.numel() > 1 else 0.0,
            "kl": float(acc.reduce(kl, "mean")),
            "entropy": float(acc.reduce(ent, "mean")),
            "clip_frac": mean(clip_fracs),
            "loss": mean(losses),
            "completion_length": float(lengths.mean()),
            "actions_used": int((counts > 0).sum()),
            "action_top": int(counts.argmax()),
            "action_top_share": float(counts.max() / counts.sum().clamp(min=1)),
            "skipped": skipped,
            "samples": int(lengths.numel()),
            "step_time": seconds,
        }
        if value_losses:
            m["value_loss"] = mean(value_losses)
        for name, value in reward_means.items():
            m[f"reward/{name}"] = float(acc.reduce(torch.tensor(value, device=acc.device), "mean"))
        m["action_counts"] = [int(x) for x in counts.tolist()]
        return m

    # ----- the loop ------------------------------------------------------------------------------------
    def train(self, resume: bool = False) -> list[dict]:
        """Run until ``config.steps``; -> the metrics of the steps run here. Writes OUT as it goes."""
        c = self.config
        if resume:
            self.resume()
        elif self.acc.is_main_process and (self.out / METRICS).exists():
            raise ValueError(f"{self.out} already holds a run ({METRICS}); pass --resume to continue it or choose "
                             "another --out")
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "rl_config.json").write_text(json.dumps(asdict(c), indent=2))
            if c.tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.out / "tb"))
        history = []
        bar = tqdm(total=c.steps, initial=self.step_count, desc=f"rl {c.algo}", disable=not self.acc.is_main_process)
        while self.step_count < c.steps:
            metrics = self.step()
            history.append(metrics)
            self._log(metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.4f}")
            if self.step_count % c.save_every == 0 or self.step_count == c.steps:
                self.save_checkpoint()
        bar.close()
        self.check_frozen()
        self.check_replicas_agree()
        if self.writer is not None:
            self.writer.close()
        return history

    def _log(self, metrics: dict) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.out / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, metrics["step"])

    def check_frozen(self) -> None:
        """RuntimeError naming any parameter outside the policy (or of the reference) that changed."""
        changed = [k for k, v in fingerprint(self.model, skip_prefix="policy.").items() if self.frozen.get(k) != v]
        changed += [f"reference.{k}" for k, v in fingerprint(self.reference).items() if self.reference_print[k] != v]
        if changed:
            raise RuntimeError(f"frozen weights changed during RL: {', '.join(changed[:10])}"
                               + (f" and {len(changed) - 10} more" if len(changed) > 10 else ""))

    def check_replicas_agree(self) -> None:
        """RuntimeError unless every process holds the same trained weights (the gradients were averaged)."""
        if self.acc.num_processes == 1:
            return
        from accelerate.utils import gather_object

        mine = hashlib.sha256(json.dumps(fingerprint(self.acc.unwrap_model(self.module)), sort_keys=True).encode())
        hashes = gather_object([mine.hexdigest()])
        if len(set(hashes)) != 1:
            raise RuntimeError(f"the processes' policies differ after training ({len(set(hashes))} versions): "
                               "gradients were not synchronised")

    # ----- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """checkpoints/step-N/ (policy, value head, optimizer, RNG per process, state), renamed into place
        whole; then the full model and tokenizer at the top of OUT. Older checkpoints beyond the kept are pruned."""
        self.check_frozen()
        acc, c = self.acc, self.config
        root = self.out / "checkpoints"
        final, tmp = root / f"step-{self.step_count:06d}", root / f".step-{self.step_count:06d}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save({"torch": torch.get_rng_state(), "generator": self.generator.get_state(),
                    "prompts": self.prompt_rng.get_state()}, tmp / f"rng-{acc.process_index}.pt")
        if acc.is_main_process:
            trainable = acc.unwrap_model(self.module)
            weights = {k: v.detach().cpu().contiguous() for k, v in trainable.state_dict().items()}
            save_file(weights, tmp / "trainable.safetensors")
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            state = {"step": self.step_count, "ema": self.ema, "algo": c.algo, "base_model": self.base_model,
                     "reference": hashlib.sha256(json.dumps(self.reference_print, sort_keys=True).encode()).hexdigest(),
                     "num_processes": acc.num_processes}
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self.model.save_pretrained(self.out)
            self.tokenizer.save_pretrained(str(self.out))
            for old in sorted(root.glob("step-*"))[:-c.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def resume(self) -> None:
        """Load the latest complete checkpoint in OUT: policy, value head, optimizer, RNG, step; metrics after
        it are dropped (they will be written again)."""
        acc = self.acc
        done = sorted((self.out / "checkpoints").glob("step-*"))
        if not done:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.out / 'checkpoints'}")
        ckpt = done[-1]
        state = json.loads((ckpt / "state.json").read_text())
        if state["algo"] != self.config.algo:
            raise ValueError(f"--resume: {ckpt} was trained with {state['algo']}, not {self.config.algo}")
        reference = hashlib.sha256(json.dumps(self.reference_print, sort_keys=True).encode()).hexdigest()
        if state["reference"] != reference:
            raise ValueError(f"--resume: the model given is not the one the run started from "
                             f"({state.get('base_model') or 'the shipped default model'}); resume from the same "
                             "--model")
        if state["num_processes"] != acc.num_processes:
            raise ValueError(f"--resume: the run used {state['num_processes']} processes, this one "
                             f"{acc.num_processes}; resume with the same number")
        acc.unwrap_model(self.module).load_state_dict(load_file(ckpt / "trainable.safetensors"))
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=acc.device, weights_only=True))
        rng = torch.load(ckpt / f"rng-{acc.process_index}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["generator"])
        self.prompt_rng.set_state(rng["prompts"])
        self.step_count, self.ema = state["step"], state["ema"]
        acc.wait_for_everyone()
        if acc.is_main_process and (self.out / METRICS).exists():
            lines = (self.out / METRICS).read_text().splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= self.step_count]
            (self.out / METRICS).write_text("".join(line + "\n" for line in kept))


__all__ = ["RLConfig", "RLTrainer", "PolicyWithValue", "load_prompts", "default_prompts", "fingerprint", "METRICS"]
