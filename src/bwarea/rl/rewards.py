"""Rewards: any TRL-style callable, weighted sums of them, a local reward model, and bad-value handling.

A reward is ``reward(prompts: list[str], completions: list[str], **kw) -> list[float]``, the signature of
TRL's reward functions, so existing ones plug in. ``kw`` carries ``completion_ids`` (list of token-id lists)
and any extra columns of a JSONL prompts file, as TRL passes them; a reward should accept ``**kwargs``.

Specs on the command line:
    keyword | length | sentiment          a built-in task (bwarea.rl.tasks)
    path/to/file.py:function             a function in a Python file
    package.module:function              a function in an importable module
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

RewardFn = Callable[..., list]


class RewardError(ValueError):
    """A reward returned something unusable; the message names the reward and the sample."""


def load_reward(spec: str, task_options: dict | None = None) -> RewardFn:
    """A spec string -> the callable it names. FileNotFoundError / ValueError with the reason when it cannot.

    ``task_options`` configure a built-in task (``keywords``, ``target_words``, ``scale``).
    """
    from . import tasks

    if ":" not in spec:
        if spec in tasks.TASKS:
            return tasks.make_task(spec, **(task_options or {}))
        raise ValueError(f"reward {spec!r} is not a built-in task ({', '.join(tasks.TASKS)}) and not of the form "
                         "path/to/file.py:function or module:function")
    where, name = spec.rsplit(":", 1)
    if not name:
        raise ValueError(f"reward {spec!r} names no function after ':'")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _module_from_file(Path(where), spec)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as err:
            raise ValueError(f"reward {spec!r}: cannot import module {where!r} ({err})") from err
    if not hasattr(module, name):
        raise ValueError(f"reward {spec!r}: {where} has no attribute {name!r}")
    fn = getattr(module, name)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {where}.{name} is a {type(fn).__name__}, not a callable")
    return fn


def _module_from_file(path: Path, spec: str):
    if not path.is_file():
        raise FileNotFoundError(f"reward {spec!r}: no file {str(path)!r}")
    module_name = f"bwarea_reward_{path.stem}_{abs(hash(str(path.resolve())))}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    # Registered before running so dataclasses and pickling inside the file can find the module.
    sys.modules[module_name] = module
    loader_spec.loader.exec_module(module)
    return module


class RewardModel:
    """A local transformers sequence-classification model as a reward.

    The score of a sample is the logit when the model has one label, else the probability of ``label``
    (a label name or index; default the last label, the positive class of the usual binary classifiers).
    The text scored is prompt + completion (``completion_only=True``: the completion alone).
    """

    def __init__(self, path: str | Path, label: str | int | None = None, completion_only: bool = False,
                 batch_size: int = 16, device=None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--reward-model {str(path)!r}: no config.json there (a local transformers "
                                    "sequence-classification folder is expected)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.label = self._label_index(label)
        self.completion_only, self.batch_size = completion_only, batch_size
        self.__name__ = f"reward_model:{path.name}"

    def _label_index(self, label) -> int | None:
        n = self.model.config.num_labels
        if n == 1:
            return None
        if label is None:
            return n - 1
        names = {v: int(k) for k, v in (self.model.config.id2label or {}).items()}
        if isinstance(label, str) and not label.isdigit():
            if label not in names:
                raise ValueError(f"reward model has no label {label!r}; its labels are {sorted(names)}")
            return names[label]
        index = int(label)
        if not 0 <= index < n:
            raise ValueError(f"reward model label index {index} is outside [0, {n})")
        return index

    @torch.no_grad()
    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        texts = list(completions) if self.completion_only else [p + c for p, c in zip(prompts, completions)]
        scores = []
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=True).to(device)
            logits = self.model(**batch).logits.float()
            score = logits[:, 0] if self.label is None else logits.softmax(-1)[:, self.label]
            scores.extend(score.tolist())
        return scores


@dataclass
class Reward:
    name: str
    fn: RewardFn
    weight: float = 1.0


class RewardSet:
    """Several weighted rewards, checked value by value.

    ``score(prompts, completions, **kw)`` -> (total (batch,) float tensor, valid (batch,) bool tensor,
    per-reward means {name: float}). A reward that raises, returns NaN/inf, or returns the wrong number
    of values raises RewardError naming the reward and the sample; with ``skip_bad=True`` those samples
    are marked invalid instead (left out of the update) and counted in ``skipped``.
    """

    def __init__(self, rewards: list[Reward], skip_bad: bool = False):
        if not rewards:
            raise ValueError("no reward given: pass --reward SPEC, --task NAME or --reward-model PATH")
        names = [r.name for r in rewards]
        if len(set(names)) != len(names):
            rewards = [Reward(f"{r.name}#{i}", r.fn, r.weight) for i, r in enumerate(rewards)]
        self.rewards, self.skip_bad, self.skipped = rewards, skip_bad, 0

    def score(self, prompts: list[str], completions: list[str], **kwargs):
        n = len(completions)
        total = torch.zeros(n, dtype=torch.float64)
        valid = torch.ones(n, dtype=torch.bool)
        means = {}
        for reward in self.rewards:
            values, ok = self._call(reward, prompts, completions, kwargs)
            valid &= ok
            total += reward.weight * torch.where(ok, values, torch.zeros_like(values))
            means[reward.name] = float(values[ok].mean()) if ok.any() else float("nan")
        self.skipped += int((~valid).sum())
        return total.float(), valid, means

    def _call(self, reward: Reward, prompts, completions, kwargs):
        """-> (values (n,) float64, ok (n,) bool) for one reward, raising unless skip_bad."""
        n = len(completions)
        try:
            raw = reward.fn(prompts=list(prompts), completions=list(completions), **kwargs)
        except Exception as err:  # the reward is user code: any failure is reported, with the sample
            return self._per_sample(reward, prompts, completions, kwargs, err)
        values = _as_floats(raw)
        if values is None:
            return self._bad(reward, f"returned a {type(raw).__name__}, not a list of numbers", n)
        if len(values) != n:
            return self._bad(reward, f"returned {len(values)} values for {n} samples", n)
        ok = torch.tensor([v is not None and math.isfinite(v) for v in values], dtype=torch.bool)
        if not ok.all() and not self.skip_bad:
            i = int((~ok).nonzero()[0])
            raise RewardError(f"reward {reward.name!r} returned {values[i]} for sample {i} "
                              f"(completion {_snippet(completions[i])}); pass --skip-bad-rewards to skip such samples")
        return torch.tensor([v if ok_i else 0.0 for v, ok_i in zip(values, ok.tolist())], dtype=torch.float64), ok

    def _per_sample(self, reward, prompts, completions, kwargs, err):
        """The batch call raised: find which samples make it raise, one by one."""
        values, ok = torch.zeros(len(completions), dtype=torch.float64), torch.zeros(len(completions), dtype=torch.bool)
        for i in range(len(completions)):
            one = {k: [v[i]] if isinstance(v, list) and len(v) == len(completions) else v for k, v in kwargs.items()}
            try:
                got = _as_floats(reward.fn(prompts=[prompts[i]], completions=[completions[i]], **one))
            except Exception as sample_err:
                if not self.skip_bad:
                    raise RewardError(f"reward {reward.name!r} raised {type(sample_err).__name__}: {sample_err} on "
                                      f"sample {i} (completion {_snippet(completions[i])}); pass --skip-bad-rewards "
                                      "to skip such samples") from sample_err
                continue
            if got is not None and len(got) == 1 and got[0] is not None and math.isfinite(got[0]):
                values[i], ok[i] = got[0], True
        if ok.all() and not self.skip_bad:
            # Each sample alone is fine: the failure is in the batch call itself.
            raise RewardError(f"reward {reward.name!r} raised {type(err).__name__}: {err} on a batch of "
                              f"{len(completions)} samples") from err
        return values, ok

    def _bad(self, reward, problem, n):
        """A whole-batch fault (wrong type or length): no sample can be trusted, so all are skipped."""
        if not self.skip_bad:
            raise RewardError(f"reward {reward.name!r} {problem}; pass --skip-bad-rewards to skip such samples")
        return torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.bool)


def _as_floats(raw) -> list | None:
    """list / tuple / tensor / ndarray of numbers (None allowed) -> list of float|None; None if not a sequence."""
    if torch.is_tensor(raw):
        raw = raw.detach().reshape(-1).tolist()
    elif hasattr(raw, "tolist") and not isinstance(raw, (str, bytes)):
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        return None
    out = []
    for v in raw:
        if v is None:
            out.append(None)
            continue
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(None)
    return out


def _snippet(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def build_reward_set(specs: list[str], weights: list[float] | None = None, reward_model: str | None = None,
                     reward_model_weight: float = 1.0, skip_bad: bool = False, task_options: dict | None = None,
                     **reward_model_options) -> RewardSet:
    """The rewards of a run from command-line specs. ``weights`` pairs with ``specs`` (default 1.0 each)."""
    weights = list(weights or [])
    if weights and len(weights) != len(specs):
        raise ValueError(f"{len(weights)} --reward-weight values for {len(specs)} rewards: give one per reward, "
                         "in the same order, or none")
    rewards = [Reward(spec, load_reward(spec, task_options), weights[i] if weights else 1.0)
               for i, spec in enumerate(specs)]
    if reward_model:
        model = RewardModel(reward_model, **reward_model_options)
        rewards.append(Reward(f"reward_model:{Path(reward_model).name}", model, reward_model_weight))
    return RewardSet(rewards, skip_bad=skip_bad)
