"""Rewards: any TRL-style callable, weighted sums of them, a local reward model, and bad-value handling.

A reward is ``reward(prompts: list[str], completions: list[str], **kw) -> list[float]``, the signature of
TRL's reward functions, so existing ones plug in. ``kw`` carries ``completion_ids`` (list of token-id lists)
and any extra columns of a JSONL prompts file, as TRL passes them; a reward should accept ``**kwargs``.

Specs on the command line:
    keyword | length | sentiment          a built-in task (bwarea.rl.tasks)
    path/to/file.py:function             a function in a Python file
    package.module:function              a function in an importable module

Every value is checked: a reward must return one real number per sample (int, float, bool, numpy or
0-d tensor numbers). ``None``, strings, NaN, inf and numbers too large for a float are bad values, as is a
weighted total that overflows. Each call runs in a worker thread with a time limit (``timeout``, the CLI's
``--reward-timeout``): a call that does not return in time is abandoned and the run stops.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .settings import DEFAULT_TIMEOUT

RewardFn = Callable[..., list]


class RewardError(ValueError):
    """A reward returned something unusable; the message names the reward and the sample."""


class RewardTimeout(RewardError):
    """A reward (or environment) call did not return within the time limit; it was abandoned."""


def call_with_timeout(fn, timeout: float | None, what: str):
    """fn() in a daemon worker thread, waiting at most ``timeout`` seconds (None or 0: no limit, called here).

    Python cannot stop a thread, so a call that overruns is abandoned (it may go on running in the
    background until the process exits) and RewardTimeout is raised: a run must not go on beside it.
    What fn raises is raised here.
    """
    if not timeout:
        return fn()
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # handed to the caller's thread
            box["error"] = err

    worker = threading.Thread(target=target, name="bwarea-reward", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise RewardTimeout(f"{what} did not return within {timeout:g} s (--reward-timeout); the call was "
                            "abandoned and the run stopped")
    if "error" in box:
        raise box["error"]
    return box["value"]


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
        except Exception as err:  # the module's own code failed: name the error and where
            raise ValueError(f"reward {spec!r}: importing module {where!r} failed: {_where_failed(err)}") from err
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
    try:
        loader_spec.loader.exec_module(module)
    except Exception as err:  # a syntax error, a failed import, or any error in the file's top-level code
        del sys.modules[module_name]
        raise ValueError(f"reward {spec!r}: cannot load {str(path)!r}: {_where_failed(err, path)}") from err
    return module


def _where_failed(err: BaseException, path: Path | None = None) -> str:
    """'SyntaxError: invalid syntax (r.py, line 3)' / 'ImportError: ... (r.py, line 1)': the error and its line."""
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, SyntaxError):
        return text  # its message already names the file and line
    frames = traceback.extract_tb(err.__traceback__)
    if path is not None:
        frames = [f for f in frames if Path(f.filename).resolve() == path.resolve()] or frames
    if frames:
        text += f" ({Path(frames[-1].filename).name}, line {frames[-1].lineno})"
    return text


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

    ``score(prompts, completions, **kw)`` -> (total (batch,) float64 tensor, valid (batch,) bool tensor,
    per-reward means {name: float}). A reward that raises, returns a bad value (see the module docstring) or
    the wrong number of values raises RewardError naming the reward, the sample and what it returned; with
    ``skip_bad=True`` those samples are marked invalid instead (left out of the update) and counted in
    ``skipped``. A call that overruns ``timeout`` seconds raises RewardTimeout even with ``skip_bad``.
    """

    def __init__(self, rewards: list[Reward], skip_bad: bool = False, timeout: float | None = DEFAULT_TIMEOUT):
        if not rewards:
            raise ValueError("no reward given: pass --reward SPEC, --task NAME or --reward-model PATH")
        for r in rewards:
            if not math.isfinite(r.weight):
                raise ValueError(f"reward {r.name!r}: weight must be a finite number, got {r.weight}")
        if timeout is not None and not (math.isfinite(timeout) and timeout >= 0):
            raise ValueError(f"reward timeout must be a finite number of seconds >= 0 (0: no limit), got {timeout}")
        names = [r.name for r in rewards]
        if len(set(names)) != len(names):
            rewards = [Reward(f"{r.name}#{i}", r.fn, r.weight) for i, r in enumerate(rewards)]
        self.rewards, self.skip_bad, self.timeout, self.skipped = rewards, skip_bad, timeout, 0

    def score(self, prompts: list[str], completions: list[str], **kwargs):
        n = len(completions)
        total = torch.zeros(n, dtype=torch.float64)
        valid = torch.ones(n, dtype=torch.bool)
        means = {}
        for reward in self.rewards:
            values, ok = self._call(reward, prompts, completions, kwargs)
            valid &= ok
            total += reward.weight * torch.where(ok, values, torch.zeros_like(values))
            # Divided before summing, so the mean of huge rewards cannot overflow.
            means[reward.name] = float((values[ok] / int(ok.sum())).sum()) if ok.any() else float("nan")
        # Finite values can still overflow once weighted and summed (two rewards of 1e308).
        overflow = valid & ~torch.isfinite(total)
        if overflow.any():
            i = int(overflow.nonzero()[0])
            if not self.skip_bad:
                raise RewardError(f"the weighted sum of the rewards overflows for sample {i} (completion "
                                  f"{_snippet(completions[i])}); scale the rewards or weights down, or pass "
                                  "--skip-bad-rewards to skip such samples")
            valid &= ~overflow
            total = torch.where(valid, total, torch.zeros_like(total))
        self.skipped += int((~valid).sum())
        return total, valid, means

    def _invoke(self, reward: Reward, prompts, completions, kwargs):
        return call_with_timeout(lambda: reward.fn(prompts=list(prompts), completions=list(completions), **kwargs),
                                 self.timeout, f"reward {reward.name!r} (called on {len(completions)} samples)")

    def _call(self, reward: Reward, prompts, completions, kwargs):
        """-> (values (n,) float64, ok (n,) bool) for one reward, raising unless skip_bad."""
        n = len(completions)
        try:
            raw = self._invoke(reward, prompts, completions, kwargs)
        except RewardTimeout:
            raise
        except Exception as err:  # the reward is user code: any failure is reported, with the sample
            return self._per_sample(reward, prompts, completions, kwargs, err)
        checked = _as_floats(raw)
        if checked is None:
            return self._bad(reward, f"returned a {type(raw).__name__}, not a list of numbers", n)
        if len(checked) != n:
            return self._bad(reward, f"returned {len(checked)} values for {n} samples", n)
        problems = [problem for _, problem in checked]
        if any(problems) and not self.skip_bad:
            i = next(i for i, problem in enumerate(problems) if problem)
            raise RewardError(f"reward {reward.name!r} returned {problems[i]} for sample {i} "
                              f"(completion {_snippet(completions[i])}); pass --skip-bad-rewards to skip such samples")
        ok = torch.tensor([not problem for problem in problems], dtype=torch.bool)
        return torch.tensor([v if v is not None else 0.0 for v, _ in checked], dtype=torch.float64), ok

    def _per_sample(self, reward, prompts, completions, kwargs, err):
        """The batch call raised: find which samples make it raise, one by one."""
        values, ok = torch.zeros(len(completions), dtype=torch.float64), torch.zeros(len(completions), dtype=torch.bool)
        for i in range(len(completions)):
            one = {k: [v[i]] if isinstance(v, list) and len(v) == len(completions) else v for k, v in kwargs.items()}
            try:
                got = _as_floats(self._invoke(reward, [prompts[i]], [completions[i]], one))
            except RewardTimeout:
                raise
            except Exception as sample_err:
                if not self.skip_bad:
                    raise RewardError(f"reward {reward.name!r} raised {type(sample_err).__name__}: {sample_err} on "
                                      f"sample {i} (completion {_snippet(completions[i])}); pass --skip-bad-rewards "
                                      "to skip such samples") from sample_err
                continue
            if got is not None and len(got) == 1 and not got[0][1]:
                values[i], ok[i] = got[0][0], True
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


def _as_floats(raw) -> list[tuple[float | None, str | None]] | None:
    """A reward's return value -> [(value, problem)] per sample, None if it is not a sequence.

    ``problem`` is None for a usable value, else what was returned, for the error message: ``None``,
    ``'1.0' (a str, not a number)``, ``nan``, ``an int too large for a float (about 10**400)``.
    """
    if torch.is_tensor(raw):
        raw = raw.detach().reshape(-1).tolist()
    elif hasattr(raw, "tolist") and not isinstance(raw, (str, bytes)):
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        return None
    return [check_reward_value(v) for v in raw]


def check_reward_value(v) -> tuple[float | None, str | None]:
    """One reward value -> (float, None) when it is a finite real number, else (None, what it was)."""
    if torch.is_tensor(v) and v.numel() == 1:
        v = v.item()
    # Only real numbers: a string that looks like one ("1.0") is as much a bug as "abc".
    if not isinstance(v, numbers.Real):
        shown = repr(v)
        shown = shown if len(shown) <= 40 else shown[:40] + "..."
        return None, "None" if v is None else f"{shown} (a {type(v).__name__}, not a number)"
    try:
        value = float(v)
    except OverflowError:
        name = type(v).__name__
        digits = ""
        if isinstance(v, numbers.Integral):  # bit_length: Python refuses to print ints of over 4300 digits
            digits = f" (about 10**{int(abs(int(v)).bit_length() * math.log10(2))})"
        return None, f"{'an' if name[0] in 'aeiou' else 'a'} {name} too large for a float{digits}"
    if not math.isfinite(value):
        return None, repr(value)
    return value, None


def _snippet(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def build_reward_set(specs: list[str], weights: list[float] | None = None, reward_model: str | None = None,
                     reward_model_weight: float = 1.0, skip_bad: bool = False, task_options: dict | None = None,
                     timeout: float | None = DEFAULT_TIMEOUT, **reward_model_options) -> RewardSet:
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
    return RewardSet(rewards, skip_bad=skip_bad, timeout=timeout)
