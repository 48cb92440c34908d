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

OUT is a run folder of the training engine (``bwarea.train.engine``: its marker, run_config.json, atomic
checkpoints, --resume and --overwrite as for pretraining). It holds the trained model (config.json +
model.safetensors + tokenizer: ``from_pretrained(OUT)``), metrics.jsonl (one strict JSON object per step),
tensorboard/, checkpoints/step-N/ (for --resume).

Every update is guarded: a NaN/inf loss or gradient skips it (the policy and optimizer stay as they were)
and is counted; ``max_bad_steps`` such steps in a row stop the run with RLStopped. A step whose samples
were all skipped (bad rewards) makes no update; a run in which no step made one stops with RLStopped and
writes no model. A non-finite policy is never written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..data import jsonl_records
from ..train.engine import (METRICS, MODEL_FILES, Engine, ResumeRefused, all_finite, clip_gradients, make_accelerator,
                            strict_json)
from . import algorithms as alg
from .rollout import Rollout, play_episodes, sample_completions
from .settings import RLConfig

# Settings that may change when a run is resumed: they do not change the steps already run.
RESUMABLE_FIELDS = {"steps", "save_every", "keep_checkpoints", "tensorboard", "max_bad_steps", "reward_timeout"}


class RLStopped(RuntimeError):
    """The run cannot go on (updates stayed non-finite, or no step had a usable sample); the message says
    what OUT holds. The CLI prints it as one line."""


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
    """What trains: the policy, and for an algorithm with a value head (PPO) a linear value head reading the
    policy's final hidden state (the output of its last norm), taken from the policy's own forward."""

    def __init__(self, policy: nn.Module, value_head: nn.Module | None = None):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, input_ids, cos, sin, mask=None):
        """-> (action logits (batch, seq, A) float32, values (batch, seq) float32 or None)."""
        if self.value_head is None:
            return self.policy(input_ids, cos, sin, mask), None
        hidden = []
        hook = self.policy.norm.register_forward_hook(lambda module, args, output: hidden.append(output))
        try:
            logits = self.policy(input_ids, cos, sin, mask)
        finally:
            hook.remove()
        return logits, self.value_head(hidden[-1]).squeeze(-1).float()


class RLTrainer:
    """Policy optimisation of a BWArea model against rewards (single turn) or an environment (multi-turn).

    model: BWAreaForCausalLM (its policy is trained in place). tokenizer: its tokenizer (with a pad token).
    rewards: a RewardSet (single-turn) or None with ``env_factory`` (seed -> Environment).
    prompts: [{"prompt": str, ...}] for single-turn. out_dir: where everything is written.
    base_model: recorded in checkpoints so a resumed run can say what it started from.
    """

    def __init__(self, model, tokenizer, config: RLConfig, out_dir, rewards=None, prompts=None, env_factory=None,
                 base_model: str | None = None, accelerator=None):
        self.config = c = config.resolved()  # checked, with the algorithm's defaults filled in
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
        self.algorithm = alg.get(c.algo)(c)
        value_head = None
        if self.algorithm.value_head:
            value_head = nn.Linear(model.config.hidden_size, 1).to(self.acc.device)
            nn.init.zeros_(value_head.weight)
            nn.init.zeros_(value_head.bias)
        # Column-major CPU weights make rollouts faster; lay them out before DDP wraps the policy, so the
        # gradient buckets it builds match the layout the parameters keep from then on.
        model.optimize_for_cpu_decoding()
        trainable = PolicyWithValue(model.policy, value_head)
        optimizer = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=c.lr, weight_decay=0.0)
        self.module, self.optimizer = self.acc.prepare(trainable, optimizer)
        self.step_count = 0
        # reward_scale: rewards are divided by it (a power of two, 1 unless some reward exceeded 2**32; it only
        # grows). updates: optimizer updates applied in the whole run. bad_streak: steps in a row with a
        # non-finite update. saved_step: the step of the model written at the top of OUT.
        self.reward_scale, self.updates, self.bad_streak, self.saved_step = 1.0, 0, 0, None
        self.last_bad = None  # (loss, gradient norm) of the last skipped update
        rank = self.acc.process_index
        torch.manual_seed(c.seed * 7919 + rank)
        self.generator = torch.Generator(device=self.acc.device).manual_seed(c.seed * 7919 + rank)
        self.prompt_rng = torch.Generator().manual_seed(c.seed * 104729 + rank)
        self.engine, self.log = None, None

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
                                    top_p=c.top_p, generator=self.generator, timeout=c.reward_timeout)
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

    def scale_rewards(self, r: Rollout) -> None:
        """Divide the rollout's float64 rewards by the run's reward scale, as float32.

        The scale is the same on every process and only grows. GRPO and PPO's whitened advantages do not
        depend on it; REINFORCE's advantages and PPO's value targets are in its units. When it grows, PPO's
        value head is divided by the same factor so that its predictions keep their meaning.
        """
        biggest = r.rewards.abs().max() if r.rewards.numel() else r.rewards.new_zeros(())
        if self.acc.num_processes > 1:
            biggest = self.acc.gather(biggest[None]).max()
        scale = max(self.reward_scale, alg.reward_scale(float(biggest)))
        if scale > self.reward_scale:
            head = self.acc.unwrap_model(self.module).value_head
            if head is not None:
                with torch.no_grad():
                    head.weight.div_(scale / self.reward_scale)
                    head.bias.div_(scale / self.reward_scale)
            self.reward_scale = scale
        r.rewards = (r.rewards / self.reward_scale).float()

    def advantages(self, r: Rollout, values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (advantages (batch, seq), value targets (batch, seq) or None): the algorithm's."""
        def mean_over_processes(x: torch.Tensor) -> float:
            return float(self.acc.reduce(x, "mean"))
        return self.algorithm.advantages(r, values, self.reward_scale, mean_over_processes)

    def step(self) -> dict:
        """One rollout and its policy update -> the metrics of the step (gathered over processes)."""
        c, t0 = self.config, time.perf_counter()
        rollout, reward_means = self.collect()
        self.scale_rewards(rollout)
        seq, mask = rollout.sequences, rollout.attention_mask
        cos, sin, attn = self.model.positions_and_mask(mask, *seq.shape, seq.device,
                                                       self.model.world_model.embed_tokens.weight.dtype)
        with torch.no_grad():
            old_logits, old_values = self.acc.unwrap_model(self.module)(seq, cos, sin, attn)
            ref_logits = self.reference(seq, cos, sin, attn)
            old_logp = alg.action_log_probs(old_logits, rollout.actions)
            start_kl, start_entropy = alg.kl_and_entropy(old_logits, ref_logits, rollout.action_mask)
        losses, clip_fracs, value_losses, bad = [], [], [], []
        usable = float(self.acc.reduce(rollout.action_mask.any(-1).sum().float(), "sum"))
        # With no usable sample (every reward skipped) there is nothing to learn from: no update at all, not
        # even AdamW's momentum step.
        epochs = c.epochs if usable > 0 else 0
        if epochs:
            advantages, returns = self.advantages(rollout, old_values)
        n, per = len(rollout), len(rollout) // c.minibatches
        for _ in range(epochs):
            order = torch.arange(n)
            if c.minibatches > 1:
                order = torch.randperm(n, generator=self.prompt_rng)
            order = order.to(seq.device)
            for k in range(c.minibatches):
                rows = order[k * per:(k + 1) * per]
                logits, values = self.module(seq[rows], cos[rows], sin[rows], None if attn is None else attn[rows])
                m = rollout.action_mask[rows]
                logp = alg.action_log_probs(logits, rollout.actions[rows])
                pg, clip_frac = self.algorithm.loss(logp, old_logp[rows], advantages[rows], m)
                kl, ent = alg.kl_and_entropy(logits, ref_logits[rows], m)
                loss = pg + c.kl_coef * kl - c.entropy_coef * ent
                if values is not None:
                    v_loss = self.algorithm.value_loss(values, returns[rows], m)
                    loss = loss + c.vf_coef * v_loss
                if not self._update(loss, bad):
                    continue
                losses.append(loss.detach())
                clip_fracs.append(clip_frac)
                if values is not None:
                    value_losses.append(v_loss.detach())
        self._end_step(bad, losses, epochs * c.minibatches)
        metrics = self._metrics(rollout, reward_means, start_kl, start_entropy, losses, clip_fracs, value_losses,
                                time.perf_counter() - t0)
        metrics.update(updates=len(losses), nonfinite_updates=len(bad))
        if self.reward_scale != 1.0:
            metrics["reward_scale"] = self.reward_scale
        return metrics

    def _update(self, loss: torch.Tensor, bad: list) -> bool:
        """One optimiser update from ``loss``: backward, clip, step. A non-finite loss or gradient skips it (the
        trained weights and the optimiser state stay exactly as they were) and is noted in ``bad``."""
        self.acc.backward(loss)
        params = [p for p in self.module.parameters() if p.requires_grad]
        grad_norm = clip_gradients(self.acc, params, self.config.max_grad_norm)
        if not all_finite(self.acc, loss, grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            bad.append((float(loss.detach()), float(grad_norm)))
            return False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self._check_policy_finite()
        return True

    def _end_step(self, bad: list, losses: list, planned: int) -> None:
        """Count the step; keep the streak of steps with non-finite updates and say what was skipped."""
        self.step_count += 1
        if bad:
            self.bad_streak += 1
            self.last_bad = bad[-1]
            if self.acc.is_main_process:
                tqdm.write(f"rl step {self.step_count}: {len(bad)} of {planned} updates skipped: "
                           f"loss {bad[-1][0]:.4g}, gradient norm {bad[-1][1]:.4g} (not finite)")
        elif losses:
            self.bad_streak = 0
        elif self.acc.is_main_process:
            tqdm.write(f"rl step {self.step_count}: no usable sample (every reward was skipped); no update")

    def _check_policy_finite(self) -> None:
        """RLStopped if an applied update left a NaN/inf weight (finite gradients make that all but
        impossible); nothing more is written, so OUT keeps the last good model."""
        broken = [n for n, p in self.acc.unwrap_model(self.module).named_parameters() if not torch.isfinite(p).all()]
        if broken:
            raise RLStopped(f"the update at step {self.step_count + 1} made the policy's weights non-finite "
                            f"({', '.join(broken[:3])}); stopped. {self._what_out_holds()}")

    def _what_out_holds(self) -> str:
        if self.saved_step is None:
            return "No model was written."
        return f"{self.out} keeps the model of step {self.saved_step}."

    def _metrics(self, r: Rollout, reward_means, kl, ent, losses, clip_fracs, value_losses, seconds) -> dict:
        acc = self.acc
        kept = r.action_mask.any(-1)
        # Statistics in the scaled units, then back to the rewards' own: the std of 1e308s must not overflow.
        returns = alg.sequence_returns(r.rewards.double())
        all_returns = acc.gather(returns)[acc.gather(kept)]
        scale = self.reward_scale
        used = torch.bincount(r.actions[r.action_mask], minlength=self.model.config.num_actions)
        counts = acc.reduce(used.float(), "sum")
        lengths = acc.gather(r.action_mask.sum(-1).float())

        def mean(xs):  # every process applied the same updates, so all reduce or none does
            return float(acc.reduce(torch.stack(xs).float().mean(), "mean")) if xs else float("nan")

        skipped = int(acc.reduce(torch.tensor(float((~kept).sum()), device=acc.device), "sum"))
        m = {
            "step": self.step_count,
            "reward": float(all_returns.mean()) * scale if all_returns.numel() else float("nan"),
            "reward_std": float(all_returns.std()) * scale if all_returns.numel() > 1 else 0.0,
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
    def train(self, resume: bool = False, overwrite: bool = False) -> list[dict]:
        """Run until ``config.steps``; -> the metrics of the steps run here. Writes OUT as it goes.

        resume: continue the run in OUT from its newest intact checkpoint. overwrite: start again in an OUT
        that holds a bwarea run (only what that run wrote is removed)."""
        c = self.config
        self.engine = Engine("rl", self.out, c, self.acc, resume=resume, overwrite=overwrite,
                             resumable=RESUMABLE_FIELDS, final_names=self.final_names())
        if resume:
            candidates = self.engine.checkpoints()
            if not candidates:
                raise FileNotFoundError(f"--resume: no checkpoint in {self.out / 'checkpoints'}")
            self.resume(candidates)
        self.engine.start()
        self.log = self.engine.metrics_log(self.step_count, c.tensorboard)
        history, first = [], self.step_count + 1
        bar = self.engine.progress(c.steps, self.step_count, f"rl {c.algo}")
        try:
            while self.step_count < c.steps:
                metrics = self.step()
                history.append(metrics)
                self._log(metrics)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward']:.4g}", kl=f"{metrics['kl']:.4f}")
                if self.bad_streak >= c.max_bad_steps:
                    loss, grad_norm = self.last_bad
                    raise RLStopped(
                        f"the loss or gradient was not finite in {self.bad_streak} steps in a row (up to step "
                        f"{self.step_count}; last: loss {loss:.4g}, gradient norm {grad_norm:.4g}); those updates were "
                        f"skipped and the run stopped (--max-bad-steps {c.max_bad_steps}). {self._what_out_holds()} "
                        "Check the rewards and --lr, --kl-coef, --entropy-coef, --vf-coef")
                if self.step_count % c.save_every == 0 or self.step_count == c.steps:
                    self.save_checkpoint()
            if self.updates == 0:
                empty = sum(1 for m in history if not m["updates"] and not m["nonfinite_updates"])
                why = [f"{empty} had no usable sample ({self.rewards.skipped if self.rewards else 0} samples with bad "
                       "rewards skipped)" if empty else "", f"{len(history) - empty} only non-finite updates"
                       if len(history) > empty else ""]
                raise RLStopped(
                    f"no update was made in steps {first}..{self.step_count}: {', '.join(w for w in why if w)}; no "
                    "model was written. Fix the reward (without --skip-bad-rewards the first bad value stops the run "
                    "and is named)")
        finally:
            bar.close()
            self.log.close()
        self.check_frozen()
        self.check_replicas_agree()
        return history

    def _log(self, metrics: dict) -> None:
        # Strict JSON: a value that is not defined (the reward of a step without usable samples, the loss of a
        # step without updates) or not finite is written as null, never as the NaN/Infinity JSON lacks.
        self.log.write(metrics["step"], None, metrics)

    def final_names(self) -> set[str]:
        """The files OUT receives with the model: the model's and those the tokenizer saves."""
        with tempfile.TemporaryDirectory() as folder:
            self.tokenizer.save_pretrained(folder)
            return MODEL_FILES | set(p.name for p in Path(folder).iterdir())

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
    def save_checkpoint(self) -> Path | None:
        """checkpoints/step-N/ (policy, value head, optimizer, RNG per process, state) through the engine; then
        the full model and tokenizer at the top of OUT. Before the run's first update there is nothing to save:
        nothing is written and None is returned."""
        if self.updates == 0:
            return None
        if self.engine is None:
            raise RuntimeError("save_checkpoint writes into the run folder that train() sets up: call train()")
        self.check_frozen()
        acc, c = self.acc, self.config

        def write(folder: Path) -> None:
            torch.save({"torch": torch.get_rng_state(), "generator": self.generator.get_state(),
                        "prompts": self.prompt_rng.get_state()}, folder / f"rng-{acc.process_index}.pt")
            if acc.is_main_process:
                trainable = acc.unwrap_model(self.module)
                weights = {k: v.detach().cpu().contiguous() for k, v in trainable.state_dict().items()}
                save_file(weights, folder / "trainable.safetensors")
                torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
                state = {"step": self.step_count, **self.algorithm.state(), "algo": c.algo,
                         "base_model": self.base_model, "reward_scale": self.reward_scale, "updates": self.updates,
                         "bad_streak": self.bad_streak, "reference": self.reference_hash(),
                         "num_processes": acc.num_processes}
                (folder / "state.json").write_text(json.dumps(state, indent=2, allow_nan=False))

        final = self.engine.save_checkpoint(self.step_count, c.keep_checkpoints, write)
        if acc.is_main_process:
            self.engine.publish(lambda folder: (self.model.save_pretrained(folder),
                                                self.tokenizer.save_pretrained(str(folder))))
        self.saved_step = self.step_count
        acc.wait_for_everyone()
        return final

    def reference_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.reference_print, sort_keys=True).encode()).hexdigest()

    def resume(self, candidates: list[Path]) -> None:
        """Load the newest intact checkpoint of ``candidates``: policy, value head, optimizer, RNG, step.
        Metrics after it are dropped when the log opens (they will be written again)."""
        acc = self.acc

        def load(ckpt: Path) -> None:
            state = json.loads((ckpt / "state.json").read_text())
            if state["algo"] != self.config.algo:
                raise ResumeRefused(f"--resume: {ckpt} was trained with {state['algo']}, not {self.config.algo}")
            if state["reference"] != self.reference_hash():
                raise ResumeRefused(f"--resume: the model given is not the one the run started from "
                                    f"({state.get('base_model') or 'the shipped default model'}); resume from the "
                                    "same --model")
            if state["num_processes"] != acc.num_processes:
                raise ResumeRefused(f"--resume: the run used {state['num_processes']} processes, this one "
                                    f"{acc.num_processes}; resume with the same number")
            acc.unwrap_model(self.module).load_state_dict(load_file(ckpt / "trainable.safetensors"))
            self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=acc.device,
                                                      weights_only=True))
            rng = torch.load(ckpt / f"rng-{acc.process_index}.pt", weights_only=True)
            torch.set_rng_state(rng["torch"])
            self.generator.set_state(rng["generator"])
            self.prompt_rng.set_state(rng["prompts"])
            self.step_count = state["step"]
            self.algorithm.load_state(state)
            self.reward_scale, self.updates = state["reward_scale"], state["updates"]
            self.bad_streak, self.saved_step = state["bad_streak"], state["step"]

        self.engine.resume(candidates, load)
        acc.wait_for_everyone()


__all__ = ["RLConfig", "RLTrainer", "RLStopped", "strict_json", "PolicyWithValue", "load_prompts", "default_prompts",
           "fingerprint", "make_accelerator", "METRICS"]
