"""BWArea as a language model: ``forward`` without actions, ``lm_logprobs``, ``lm_log_likelihood`` and the
seed-compatible view (``forward_under_policy``, ``bwareaModel``). Exact, normalised, and leak-free: nothing at
position t may move when a token after t changes."""

import json
import sys
from pathlib import Path

import pytest
import torch

from bwarea import BWAreaForCausalLM
from bwarea.loading import load
from bwareaModel.model_hf import IntentionForCausalLM
from conftest import tiny_config

LEAK_TOL = 1e-5
PAD = 512


def ids_for(batch=2, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (batch, seq), generator=g)


def padded(rows, side):
    """list of 1-D id tensors -> (ids, mask) padded on ``side`` with PAD."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return ids, mask


def seed_view(model) -> IntentionForCausalLM:
    """The same weights behind the released class, with greedy policy actions (deterministic)."""
    seed = IntentionForCausalLM(model.config).eval()
    seed.load_state_dict(model.state_dict())
    seed.set_action_sampling(greedy=True)
    return seed


def max_leak(view, ids, mask=None) -> float:
    """Change each token u >= 1 in turn (in every row) and return the largest move of any output at < u."""
    with torch.no_grad():
        base = view(ids, mask)
        worst = 0.0
        for u in range(1, ids.shape[1]):
            changed = ids.clone()
            changed[:, u] = (ids[:, u] + 97) % 500 + 3
            worst = max(worst, float((view(changed, mask)[:, :u] - base[:, :u]).abs().max()))
    return worst


# ----- leaks ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["plain", "left", "right"])
def test_no_view_reads_a_later_token(tiny_model, layout):
    if layout == "plain":
        ids, mask = ids_for(batch=2, seq=8), None
    else:
        a, b = ids_for(batch=2, seq=8, seed=1)
        ids, mask = padded([a, b[:5]], layout)
    seed = seed_view(tiny_model)
    views = {
        "forward": lambda x, m: tiny_model(x, m).logits,
        "lm_logprobs": lambda x, m: tiny_model.lm_logprobs(x, m, actions_per_chunk=24),
        "seed": lambda x, m: seed(x, m).logits,
        "seed actions": lambda x, m: seed(x, m).action_index.float(),
    }
    for name, view in views.items():
        assert max_leak(view, ids, mask) <= LEAK_TOL, name
    # The check can fail: the training view conditions on actions that saw the next token, and it moves.
    assert max_leak(lambda x, m: tiny_model.forward_inverse(x, m).logits, ids, mask) > 1e-2


def test_shipped_model_does_not_read_the_last_token():
    model, tokenizer = load()
    ids = tokenizer("The king said unto them, go", return_tensors="pt").input_ids
    other = ids.clone()
    other[0, -1] = tokenizer(" went", add_special_tokens=False).input_ids[-1]
    assert other[0, -1] != ids[0, -1]
    with torch.no_grad():
        before, after = model(ids).logits, model(other).logits
        assert float((before[:, :-1] - after[:, :-1]).abs().max()) <= LEAK_TOL
        # The exact NLL of the text, not the leaking one: it equals the mixture's likelihood.
        loss = model(ids, labels=ids).loss
        ll = model.lm_log_likelihood(ids)
    torch.testing.assert_close(loss, -ll.mean(), atol=1e-5, rtol=1e-5)
    assert float(loss) > 2.0  # the leaking view scored this text at 0.59 nats
    torch.testing.assert_close(before.logsumexp(-1), torch.zeros(before.shape[:2]), atol=1e-5, rtol=0)


# ----- exactness ------------------------------------------------------------------------------------------------
def test_lm_logprobs_equals_brute_force_mixture(tiny_model):
    """64 passes of ``model(..., action_idx=)``, one per action, each row t holding the inverse-dynamics actions
    before t and the action at t: the mixture by hand."""
    ids = ids_for(batch=2, seq=6, seed=3)
    batch, width = ids.shape
    n, vocab = tiny_model.config.num_actions, tiny_model.config.vocab_size
    with torch.no_grad():
        got = tiny_model.lm_logprobs(ids)
        inverse = tiny_model.forward_inverse(ids).action_index
        log_pi = tiny_model.forward_policy(ids).logits.log_softmax(-1)          # (batch, T, n)
        rows = ids.repeat_interleave(width, dim=0)                              # row b*T + t: sequence b, for t
        t_of_row = torch.arange(width).repeat(batch)
        world = torch.empty(batch, n, width, vocab)
        for a in range(n):
            actions = torch.where(torch.arange(width)[None] < t_of_row[:, None],
                                  inverse.repeat_interleave(width, dim=0), a)
            logits = tiny_model(rows, action_idx=actions).logits.log_softmax(-1).view(batch, width, width, vocab)
            world[:, a] = logits[:, torch.arange(width), torch.arange(width)]   # position t of the row for t
        expected = torch.logsumexp(log_pi.transpose(1, 2)[..., None] + world, dim=1)
    assert got.shape == (batch, width, vocab) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.logsumexp(-1), torch.zeros(batch, width), atol=1e-5, rtol=0)
    with torch.no_grad():
        for chunk in (1, 5, 64):
            torch.testing.assert_close(tiny_model.lm_logprobs(ids, actions_per_chunk=chunk), got, atol=1e-5, rtol=1e-5)


def test_forward_is_lm_logprobs_and_labels_give_the_exact_nll(tiny_model):
    ids = ids_for(batch=2, seq=7, seed=4)
    with torch.no_grad():
        out = tiny_model(ids, labels=ids)
        logprobs = tiny_model.lm_logprobs(ids)
        ll = tiny_model.lm_log_likelihood(ids)
        log_pi = tiny_model.policy_logits(ids)
    torch.testing.assert_close(out.logits, logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(ll, logprobs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, -ll.mean(), atol=1e-5, rtol=1e-5)
    assert torch.equal(out.action_index, log_pi.argmax(-1)) and out.last_hidden_state is None
    # Padding: labels -100 where there is no target; the loss is the mean over real targets.
    a, b = ids
    pids, mask = padded([a, b[:4]], "right")
    labels = pids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        loss = tiny_model(pids, mask, labels=labels).loss
        ll = tiny_model.lm_log_likelihood(pids, mask)
    targets = (mask[:, 1:] == 1)
    torch.testing.assert_close(loss, -ll[targets].mean(), atol=1e-5, rtol=1e-5)


def test_deterministic_and_independent_of_batch_padding_and_neighbours(tiny_model):
    a, b, c = ids_for(batch=3, seq=8, seed=5)
    b, c = b[:5], c[:3]
    with torch.no_grad():
        alone = {name: tiny_model.lm_logprobs(r[None])[0] for name, r in (("a", a), ("b", b))}
        assert torch.equal(tiny_model(a[None]).logits[0], tiny_model(a[None]).logits[0])
        for side in ("left", "right"):
            for rows in ([a, b], [a, b, c], [b, a, a]):
                ids, mask = padded(rows, side)
                got = tiny_model(ids, mask).logits
                for i, r in enumerate(rows):
                    name = "a" if len(r) == 8 else "b" if len(r) == 5 else None
                    if name is None:
                        continue
                    valid = mask[i].bool()
                    torch.testing.assert_close(got[i, valid], alone[name], atol=1e-5, rtol=1e-5)
                assert torch.isfinite(got).all()
                # Padded positions still hold distributions, for callers to mask.
                torch.testing.assert_close(got.logsumexp(-1), torch.zeros(mask.shape), atol=1e-5, rtol=0)


def test_gradients_reach_the_policy_through_the_likelihood(tiny_model):
    """Behaviour cloning on the posterior back-propagates -log p(x) into the policy, the world model frozen."""
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    for p in tiny_model.policy.parameters():
        p.requires_grad_(True)
    ids = ids_for(batch=2, seq=5, seed=6)
    (-tiny_model.lm_log_likelihood(ids).sum()).backward()
    grad = tiny_model.policy.head.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_likelihood_at_chosen_positions_is_the_full_one_there(tiny_model):
    """``positions=`` scores a subset (what ``bc --posterior-positions`` trains on): the same numbers as the full
    pass at those positions, in the order given, padded or not, and gradients reach the policy from them only."""
    a, b = ids_for(batch=2, seq=9, seed=8)
    for ids, mask in ((torch.stack([a, b]), None), padded([a, b[:6]], "left"), padded([a, b[:6]], "right")):
        with torch.no_grad():
            full = tiny_model.lm_log_likelihood(ids, mask)
            for positions in ([0], [7, 2, 5], list(range(8)), torch.tensor([3, 1])):
                got = tiny_model.lm_log_likelihood(ids, mask, positions=positions, actions_per_chunk=5)
                torch.testing.assert_close(got, full[:, torch.as_tensor(positions)], atol=1e-5, rtol=1e-5)
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    tiny_model.policy.requires_grad_(True)
    ids = ids_for(batch=1, seq=6, seed=9)
    logits = []
    tiny_model.policy.head.register_forward_hook(lambda module, args, out: logits.append(out) or out.retain_grad())
    (-tiny_model.lm_log_likelihood(ids, positions=[1, 3]).sum()).backward()
    moved = logits[-1].grad[0].abs().sum(-1)
    assert (moved[[1, 3]] > 0).all() and moved[[0, 2, 4, 5]].eq(0).all()


@pytest.mark.parametrize("positions, message", [
    ([], "non-empty 1-D"), ([[1, 2]], "non-empty 1-D"), ([0.5], "non-empty 1-D"), ([True], "non-empty 1-D"),
    ([-1], r"lie in \[0, 4\]"), ([5], r"lie in \[0, 4\]"), ([1, 1], "twice"), ("ab", "1-D sequence of ints"),
])
def test_bad_positions_are_named(tiny_model, positions, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.lm_log_likelihood(ids_for(batch=1, seq=6), positions=positions)


# ----- the seed-compatible view --------------------------------------------------------------------------------
def test_seed_view_is_the_world_model_under_each_positions_policy_action(tiny_model):
    """Position t: the policy's (greedy) action at t, the inverse-dynamics actions before t, as one
    ``model(input_ids[:, :t+1], action_idx=)`` call per position would give."""
    seed = seed_view(tiny_model)
    tiny_model.set_action_sampling(greedy=True)
    a, b = ids_for(batch=2, seq=7, seed=7)
    ids, mask = padded([a, b[:4]], "left")
    seed.reset_action_info()
    with torch.no_grad():
        out = seed(ids, mask)
        policy = tiny_model.forward_policy(ids, mask).action_index
        for i, row in enumerate([a, b[:4]]):
            x = row[None]
            inverse = tiny_model.forward_inverse(x).action_index
            acts = tiny_model.forward_policy(x).action_index
            for t in range(len(row)):
                actions = torch.cat([inverse[:, :t], acts[:, t:t + 1]], dim=1)
                expected = tiny_model(x[:, :t + 1], action_idx=actions).logits[0, -1]
                col = ids.shape[1] - len(row) + t
                torch.testing.assert_close(out.logits[i, col], expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(out.action_index, policy)
    info = seed.get_action_info()["action_idx"]
    assert len(info) == 1 and torch.equal(info[0], policy[:, -1:])
    # The same call on bwarea's own class is the language-model mixture, not this view.
    with torch.no_grad():
        assert not torch.allclose(tiny_model(ids, mask).logits, out.logits)
        # use_cache=True: the released cached path's logits, the policy's actions at every position.
        cached = seed(ids, mask, use_cache=True)
        torch.testing.assert_close(cached.logits, tiny_model(ids, mask, action_idx=policy).logits)
    assert torch.equal(seed(ids, action_idx=3).logits, tiny_model(ids, action_idx=3).logits)


def test_seed_view_on_the_released_fixture(released_dir, reference):
    """The fixture's documented generation (inverse-dynamics prompt, greedy policy) starts with the token the
    seed view's last position gives, under the action it records there."""
    from bwareaModel.model_utils import create_intention_model
    from bwareaModel.tokenizer import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(str(released_dir), fast_tokenizer=True, add_special_tokens=None)
    model = create_intention_model(str(released_dir), tokenizer=tokenizer, dtype=torch.float32)
    assert isinstance(model, IntentionForCausalLM)
    model.set_action_sampling(greedy=True)
    ids = torch.tensor(reference["input_ids"])
    width = ids.shape[1]
    with torch.no_grad():
        out = model(ids, torch.ones_like(ids))
    assert out.action_index.tolist() == reference["policy_action_index"]
    assert int(out.action_index[0, -1]) == reference["generate_id_prompt_actions"][0][width - 1]
    assert int(out.logits[0, -1].argmax()) == reference["generate_id_prompt_greedy"][0][width]


# ----- bad input ---------------------------------------------------------------------------------------------------
def test_bad_arguments_are_named(tiny_model):
    ids = ids_for(batch=1, seq=4)
    for chunk in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="actions_per_chunk"):
            tiny_model.lm_logprobs(ids, actions_per_chunk=chunk)
    with pytest.raises(ValueError, match="output_attentions"):
        tiny_model(ids, output_attentions=True)
    with pytest.raises(ValueError, match="past_key_values"):
        tiny_model(ids, past_key_values=object())
    with pytest.raises(TypeError, match="colour"):
        tiny_model(ids, colour=1)
    with pytest.raises(TypeError, match="colour"):
        seed_view(tiny_model)(ids, colour=1)
    with pytest.raises(TypeError, match=r"forward_inverse got unexpected arguments \['colour'\]"):
        tiny_model.forward_inverse(ids, colour=1)
    with pytest.raises(ValueError, match="forward_policy cannot honour.*output_hidden_states"):
        tiny_model.forward_policy(ids, output_hidden_states=True)
    tiny_model.forward_inverse(ids, use_cache=False, position_ids=None)  # transformers' no-op values are fine
    with pytest.raises(ValueError, match="attention_mask has shape"):
        tiny_model(ids, torch.ones(1, 3))
    with pytest.raises(ValueError, match="vocabulary"):
        tiny_model.lm_log_likelihood(ids + 1000)
    with pytest.raises(ValueError, match="action_idx"):
        tiny_model.world_logits_per_position(ids)


def test_tiny_vocabulary_model_normalises():
    """A model whose vocabulary is smaller than its action count still sums to one per position."""
    torch.manual_seed(1)
    model = BWAreaForCausalLM(tiny_config(vocab_size=24, pad_token_id=23, num_actions=32)).eval()
    ids = torch.randint(0, 23, (3, 5))
    with torch.no_grad():
        logprobs = model.lm_logprobs(ids)
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(3, 5), atol=1e-5, rtol=0)


def test_benchmark_script_writes_its_table_and_json(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_lm_view

    out = tmp_path / "lm-view.json"
    bench_lm_view.main(["--batch", "1", "--tokens", "8", "--repeats", "1", "--threads", "1", "--chunks", "64",
                        "--no-memory", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["rows"]] == ["plain", "inverse", "mixture", "chunk=64"]
    assert all(r["ms"] > 0 for r in report["rows"]) and report["floor_ratio_products"] > 1
    assert "x plain" in capsys.readouterr().out
