"""Shared test fixtures: the released-format fixture checkpoint and tiny random BWArea models."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from bwarea import BWAreaConfig, BWAreaForCausalLM

FIXTURE = Path(__file__).parent / "fixtures" / "original-format-tiny"

# One thread: tiny-model tests are dominated by per-op overhead, which threads only add to on 2 cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def released_dir() -> Path:
    """The tiny checkpoint written by the released implementation (see its README)."""
    return FIXTURE / "checkpoint"


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads((FIXTURE / "reference_outputs.json").read_text())


def tiny_config(**overrides) -> BWAreaConfig:
    fields = dict(vocab_size=520, hidden_size=48, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=128,
                  num_actions=64, codebook_dim=16, initializer_range=0.1, pad_token_id=512)
    fields.update(overrides)
    return BWAreaConfig(**fields)


@pytest.fixture
def tiny_model() -> BWAreaForCausalLM:
    torch.manual_seed(0)
    model = BWAreaForCausalLM(tiny_config()).eval()
    # Larger codebook and action projection so actions visibly change the next token.
    with torch.no_grad():
        model.action_codebook.embed.weight.normal_(0, 1.0)
        model.world_model.action_proj.weight.normal_(0, 0.5)
    return model


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_model, released_dir) -> Path:
    """A bwarea-format checkpoint folder with the fixture's tokenizer (vocab 512 + [PAD])."""
    out = tmp_path / "tiny-bwarea"
    tiny_model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(released_dir / name, out / name)
    return out


@pytest.fixture
def served(tiny_model_dir):
    """(model, tokenizer) of the tiny checkpoint, for the server tests."""
    from bwarea import BWAreaForCausalLM, load_tokenizer
    model = BWAreaForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, load_tokenizer(tiny_model_dir)


@pytest.fixture
def client(served):
    """A FastAPI TestClient over the tiny model with small limits."""
    from fastapi.testclient import TestClient
    from bwarea.serve import Limits, create_app
    with TestClient(create_app(*served, Limits(max_tokens=32, max_n=4, max_batch=8), model_id="tiny")) as c:
        yield c


@pytest.fixture
def released_tokenizer(released_dir):
    from bwarea import load_tokenizer
    return load_tokenizer(released_dir)


@pytest.fixture
def sharp_tiny_model(tiny_model):
    """The tiny model with a sharper world model, so that actions change which token is likeliest (search, Q)."""
    with torch.no_grad():
        tiny_model.world_model.lm_head.weight.mul_(3)
    return tiny_model


# ----- search helpers (test_search, test_server_search) ---------------------------------------------------
def scrambled(prompts, completions, completion_ids, **kwargs):
    """A reward with no structure a policy could know: a fixed pseudo-random score per completion."""
    return [float((sum((i + 1) * t for i, t in enumerate(ids)) * 2654435761) % 1000) for ids in completion_ids]


class WorldModelWrites:
    """Counts the tokens the world model writes in the model's fanout and generate calls (1 per row)."""

    def __init__(self, model, monkeypatch):
        self.count = 0
        fanout, generate = model.fanout, model.generate

        def counted_fanout(*args, **kwargs):
            logits = fanout(*args, **kwargs)
            self.count += logits.shape[0] * logits.shape[1]  # (batch, num_actions, vocab): one per action row
            return logits

        def counted_generate(*args, **kwargs):
            out = generate(*args, **kwargs)
            self.count += int(out.new_token_mask.sum())
            return out

        monkeypatch.setattr(model, "fanout", counted_fanout)
        monkeypatch.setattr(model, "generate", counted_generate)
