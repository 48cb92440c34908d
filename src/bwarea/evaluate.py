"""Held-out evaluation of a BWArea model (or a plain Llama baseline) on packed text blocks.

For a BWArea model, over every position t whose next token x_{t+1} is in the block:
    id_ppl          exp(mean -log p_world(x_{t+1} | x_<=t, a_t = inverse-dynamics action))
    lm_ppl          exp(mean -log sum_a pi(a | x_<=t) p_world(x_{t+1} | x_<=t, a))   (model.lm_log_likelihood)
    bc_accuracy     how often argmax pi(. | x_<=t) equals the inverse-dynamics action a_t
    codes_used      distinct inverse-dynamics actions (of num_actions); code_perplexity exp(H(usage))
A plain Llama (transformers) checkpoint gets lm_ppl only: its ordinary perplexity.

``lm_eval_tasks`` runs lm-evaluation-harness tasks instead (``bwarea eval MODEL --lm-eval TASKS``); see
docs/evaluating.md for which number each route gives.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import batch_tensor, pack
from .tokenizer import load_tokenizer


def is_plain_llama(path) -> bool:
    """True for a transformers Llama checkpoint folder that is not a (released-format) BWArea model."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    config = json.loads(config_file.read_text())
    return config.get("model_type") == "llama" and "num_code" not in config


def load_for_eval(path, device, dtype=torch.float32):
    """-> (model in eval mode, "bwarea" | "llama")."""
    if path is not None and is_plain_llama(path):
        from transformers import LlamaForCausalLM
        return LlamaForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval(), "llama"
    from . import default_model
    from .model import BWAreaForCausalLM
    path = default_model.path() if path is None else path
    return BWAreaForCausalLM.from_pretrained(path, dtype=dtype, device=device), "bwarea"


def default_block_size(path, max_positions: int) -> int:
    """The block size the model was trained on (training.json), else min(256, max positions)."""
    info = Path(path) / "training.json" if path is not None else None
    if info is not None and info.is_file():
        return int(json.loads(info.read_text()).get("block_size", 256))
    return min(256, max_positions)


@torch.no_grad()
def evaluate_blocks(model, kind: str, blocks, batch_size: int = 8, progress: bool = True) -> dict:
    """Metrics over ``blocks`` (n, block_size) token ids; see the module docstring."""
    device = next(model.parameters()).device
    sums = {"tokens": 0, "lm_nll": 0.0, "id_nll": 0.0, "correct": 0}
    counts = None
    for start in tqdm(range(0, len(blocks), batch_size), desc="evaluating", unit="batch", disable=not progress):
        ids = batch_tensor(blocks, np.arange(start, min(start + batch_size, len(blocks)))).to(device)
        n = ids.shape[0] * (ids.shape[1] - 1)
        sums["tokens"] += n
        if kind == "llama":
            logits = model(input_ids=ids).logits[:, :-1].float()
            sums["lm_nll"] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                              reduction="sum").item()
            continue
        out = model.forward_inverse(ids, labels=ids)
        sums["id_nll"] += out.loss.item() * n
        actions = out.action_index[:, :-1]
        policy = model.policy_logits(ids)[:, :-1]
        sums["correct"] += int((policy.argmax(-1) == actions).sum())
        batch_counts = torch.bincount(actions.reshape(-1), minlength=model.config.num_actions)
        counts = batch_counts if counts is None else counts + batch_counts
        sums["lm_nll"] -= model.lm_log_likelihood(ids).float().sum().item()
    tokens = sums["tokens"]
    result = {"lm_ppl": math.exp(sums["lm_nll"] / tokens)}
    if kind == "bwarea":
        p = counts.double() / counts.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        result.update(id_ppl=math.exp(sums["id_nll"] / tokens), bc_accuracy=sums["correct"] / tokens,
                      codes_used=int((counts > 0).sum()), code_perplexity=math.exp(entropy))
    result.update(tokens=tokens, blocks=len(blocks))
    return result


def evaluate(model_path, data, tokenizer_path=None, block_size: int | None = None, batch_size: int = 8,
             max_blocks: int | None = None, device=None, cache_dir=None, progress: bool = True) -> dict:
    """Evaluate the model folder ``model_path`` (None: the shipped model) on the text in ``data``.

    All of ``data`` is evaluation text (it is packed into blocks of ``block_size`` tokens, EOS between
    documents). -> {"lm_ppl", and for BWArea "id_ppl", "bc_accuracy", "codes_used", "code_perplexity"; "tokens",
    "blocks"}.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, kind = load_for_eval(model_path, device)
    tokenizer = load_tokenizer(tokenizer_path or model_path or _default_path())
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                         f"{model.config.vocab_size}: give the tokenizer the model was trained with")
    max_positions = model.config.max_position_embeddings
    block_size = block_size or default_block_size(model_path, max_positions)
    if block_size > max_positions:
        raise ValueError(f"block size {block_size} exceeds the model's max_position_embeddings {max_positions}")
    blocks = pack(data, tokenizer, block_size, 0.0, cache_dir=cache_dir, progress=progress).train
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    if kind == "bwarea" and not hasattr(model, "lm_log_likelihood"):
        raise ValueError("this bwarea install has no lm_log_likelihood (bwarea.generation): lm_ppl cannot be computed")
    return {"model": str(model_path or _default_path()), "kind": kind, "block_size": block_size,
            **evaluate_blocks(model, kind, blocks, batch_size, progress)}


def lm_eval_tasks(model_path, tasks, include_path=None, batch_size: int = 8, limit=None, device=None,
                  tokenizer_path=None, block_size: int | None = None) -> dict:
    """Run lm-evaluation-harness tasks on the model folder ``model_path`` (None: the shipped model).

    The model is scored through lm-eval's Hugging Face backend (``HFLM``), as ``lm_eval --model hf`` would: its
    loglikelihoods come from ``model(input_ids).logits``, for a BWArea model the exact mixture over actions
    (the same numbers as ``model.lm_log_likelihood``). ``tasks``: names or a comma-separated string;
    ``include_path``: a folder of task YAMLs (local tasks); ``limit``: documents per task; ``block_size``: the
    longest window lm-eval scores at once (its ``max_length``; default: the block size the model was trained on,
    as for ``evaluate``: positions beyond it were never trained).
    -> {"model", "kind", "block_size", "lm_eval": {task: {metric: value}}}
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError as err:
        raise ValueError(f"--lm-eval needs lm-evaluation-harness ({err.name} is not installed): "
                         "pip install 'lm-eval[api]'") from None
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ValueError("--lm-eval needs at least one task name")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {str(include_path)!r} is not a folder of task YAMLs")
    manager = None
    if include_path is not None:  # local tasks alone first: indexing lm-eval's ~15k built-in tasks takes ~20 s
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        manager = local if all(name in local.all_tasks for name in names) else None
    if manager is None:
        manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval knows no task {', '.join(map(repr, unknown))}"
                         + ("" if include_path else " (local task YAMLs need --include-path DIR)"))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, kind = load_for_eval(model_path, device)
    tokenizer = load_tokenizer(tokenizer_path or model_path or _default_path())
    max_positions = model.config.max_position_embeddings
    block_size = block_size or default_block_size(model_path or _default_path(), max_positions)
    if block_size > max_positions:
        raise ValueError(f"block size {block_size} exceeds the model's max_position_embeddings {max_positions}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=block_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=False)
    results = {task: {k: v for k, v in metrics.items() if k != "alias"} for task, metrics in out["results"].items()}
    return {"model": str(model_path or _default_path()), "kind": kind, "block_size": block_size, "lm_eval": results}


def _default_path():
    from . import default_model
    return default_model.path()
