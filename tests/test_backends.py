"""The shared equivalence suite of the decode backends: every backend against ``eager`` (the model's own blocks).

Tokens and actions must be equal and action log-probs close, with left padding, greedy and sampled actions and
tokens, every action control, several model shapes and the spare rows of a bucketed batch. ``eager`` itself is
checked against the world model recomputed over the result. CPU backends run everywhere; the CUDA backends join
where a GPU is present (``benchmarks/bench_gpu.sh`` runs this file there).
"""

import pytest
import torch

from bwarea import BWAreaForCausalLM
from conftest import tiny_config

CASES = [("cpu", "cpu"), ("cpu", "static")]
if torch.cuda.is_available():
    CASES += [("cuda", "cuda")]
# torch.compile costs seconds per new shape: the compiled CUDA backend runs the tests marked with COMPILED.
COMPILED = CASES + ([("cuda", "cuda-compile")] if torch.cuda.is_available() else [])


def prompts(batch, width, seed=0, vocab=512):
    return torch.randint(3, vocab, (batch, width), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths, seed=0):
    width = max(lengths)
    ids = torch.full((len(lengths), width), 512)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = prompts(1, n, seed=seed + i)[0]
        mask[i, width - n:] = 1
    return ids, mask


def model_on(device, **overrides) -> BWAreaForCausalLM:
    torch.manual_seed(0)
    model = BWAreaForCausalLM(tiny_config(**overrides)).eval().to(device)
    model.set_action_sampling(greedy=True)
    return model


def run(model, backend, ids, mask=None, seed=0, **kwargs):
    device = model.device
    generator = torch.Generator(device=device).manual_seed(seed)
    kwargs.setdefault("max_new_tokens", 12)
    kwargs.setdefault("min_new_tokens", kwargs["max_new_tokens"])
    return model.generate(ids.to(device), None if mask is None else mask.to(device), backend=backend,
                          generator=generator, return_dict_in_generate=True, **kwargs)


def assert_same(out, ref, atol=1e-4):
    assert torch.equal(out.sequences, ref.sequences), (out.sequences, ref.sequences)
    assert torch.equal(out.actions, ref.actions)
    assert torch.equal(out.new_token_mask, ref.new_token_mask)
    torch.testing.assert_close(out.action_logprobs, ref.action_logprobs, atol=atol, rtol=atol)
    torch.testing.assert_close(out.action_entropy, ref.action_entropy, atol=atol, rtol=atol)


def recomputed_tokens(model, out, mask=None):
    """Argmax of the world model over the final sequence under the returned actions, at each new position."""
    seq, width = out.sequences, out.prompt_length
    actions = torch.cat([out.prompt_actions, out.actions], dim=1)
    full = None if mask is None else torch.cat([mask.to(seq.device), torch.ones_like(out.actions)], dim=1)[:, :-1]
    with torch.no_grad():
        logits = model(seq[:, :-1], full, action_idx=actions).logits
    return logits[:, width - 1:].argmax(-1)


@pytest.mark.parametrize("overrides", [{}, {"policy_layers": 1}, {"action_layer": 0}, {"action_layer": 3}])
@pytest.mark.parametrize("prompt_actions", ["inverse", "policy"])
def test_eager_equals_recomputation(overrides, prompt_actions):
    model = model_on("cpu", **overrides)
    ids, mask = left_padded([4, 9, 6])
    out = run(model, "eager", ids, mask, prompt_actions=prompt_actions, action_greedy=False)
    assert len(set(out.actions.flatten().tolist())) > 3
    assert torch.equal(recomputed_tokens(model, out, mask), out.sequences[:, 9:])


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("overrides", [{}, {"policy_layers": 1}, {"action_layer": 0}, {"action_layer": 3}])
@pytest.mark.parametrize("lengths", [[7], [4, 9], [3, 9, 5, 9, 7]])  # 1-2 rows: column blocks; 5: packed, bucketed
def test_greedy_and_sampled_actions(device, backend, overrides, lengths):
    model = model_on(device, **overrides)
    ids, mask = left_padded(lengths, seed=len(lengths))
    for kwargs in ({}, {"action_greedy": False}, {"action_greedy": False, "action_temperature": 0.7}):
        assert_same(run(model, backend, ids, mask, seed=3, **kwargs), run(model, "eager", ids, mask, seed=3, **kwargs))


@pytest.mark.parametrize("device,backend", COMPILED)
@pytest.mark.parametrize("prompt_actions", ["inverse", "policy"])
def test_sampled_tokens_and_processors(device, backend, prompt_actions):
    model = model_on(device)
    ids, mask = left_padded([5, 8, 2, 8], seed=11)
    kwargs = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.3,
                  action_greedy=False, prompt_actions=prompt_actions, max_new_tokens=16, min_new_tokens=4,
                  eos_token_id=[5, 6, 7])
    out, ref = run(model, backend, ids, mask, seed=5, **kwargs), run(model, "eager", ids, mask, seed=5, **kwargs)
    assert_same(out, ref)


@pytest.mark.parametrize("device,backend", COMPILED)
def test_every_action_control(device, backend):
    model = model_on(device)
    ids, mask = left_padded([6, 3], seed=21)
    schedule = torch.tensor([[5, -1, 7, -1, -1, 63, 0, -1, 9, -1, -1, 2], [-1] * 12])
    allowed = torch.zeros(2, 64, dtype=torch.bool)
    allowed[0, [0, 2, 5, 7, 9, 11, 40, 63]] = True
    allowed[1, 10:20] = True
    for kwargs in ({"actions": 17}, {"actions": schedule}, {"allowed_actions": [1, 2, 3]},
                   {"allowed_actions": allowed, "actions": schedule, "action_greedy": False}):
        out, ref = run(model, backend, ids, mask, seed=9, **kwargs), run(model, "eager", ids, mask, seed=9, **kwargs)
        assert_same(out, ref)
        if "actions" in kwargs and not torch.is_tensor(kwargs["actions"]):
            assert bool((out.actions == 17).all())


@pytest.mark.parametrize("device,backend", CASES)
def test_stopping_and_fixed_actions_without_the_policy(device, backend):
    """Rows stop at EOS at different steps; with every action fixed the policy does not run at all."""
    model = model_on(device)
    ids, mask = left_padded([4, 7, 5], seed=31)
    for kwargs in ({"eos_token_id": list(range(100, 300)), "min_new_tokens": 0, "max_new_tokens": 20},
                   {"actions": 3, "max_new_tokens": 9}):
        ref = run(model, "eager", ids, mask, **kwargs)
        out = model.generate(ids.to(model.device), mask.to(model.device), backend=backend, **kwargs)
        assert torch.equal(out, ref.sequences)


@pytest.mark.parametrize("device,backend", CASES)
def test_in_place_weight_updates_are_followed(device, backend):
    """RL updates the policy in place between rollouts: a backend's prepared or captured weights follow."""
    model = model_on(device)
    ids = prompts(5, 6, seed=41)
    run(model, backend, ids)
    with torch.no_grad():
        model.policy.layers[0].mlp.down_proj.weight.mul_(-1.5)
        model.policy.head.weight.add_(torch.randn_like(model.policy.head.weight))
        model.world_model.layers[-1].self_attn.qkv_proj.weight.mul_(1.5)
    assert_same(run(model, backend, ids), run(model, "eager", ids))


@pytest.mark.parametrize("device,backend", CASES)
def test_consecutive_generations_of_other_shapes(device, backend):
    """Reused state (captured graphs, caches) never leaks from one generation into the next."""
    model = model_on(device)
    for lengths, steps in (([5, 3], 10), ([9], 30), ([5, 3], 10), ([2, 2, 2], 4)):
        ids, mask = left_padded(lengths, seed=steps)
        kw = dict(max_new_tokens=steps, action_greedy=False)
        assert_same(run(model, backend, ids, mask, **kw), run(model, "eager", ids, mask, **kw))


def test_static_step_traces_as_one_graph(monkeypatch):
    """What ``cuda-compile`` compiles: dynamo must trace each half-step whole (fullgraph, no graph break).
    torch.compile's "eager" backend checks the trace without inductor's code generation."""
    from bwarea.generation.backends import cuda

    class Traced(cuda.StaticStep):
        compiled = "eager"

    monkeypatch.setattr(cuda, "StaticStep", Traced)
    model = model_on("cpu")
    ids, mask = left_padded([4, 7], seed=61)
    torch._dynamo.reset()
    out = model.generate(ids, mask, max_new_tokens=6, min_new_tokens=6, backend="static",
                         return_dict_in_generate=True)
    assert_same(out, run(model, "eager", ids, mask, max_new_tokens=6))


def test_backend_choice_and_errors():
    model = model_on("cpu")
    ids = prompts(1, 3)
    with pytest.raises(ValueError, match="unknown decode backend 'fast'"):
        model.generate(ids, max_new_tokens=2, backend="fast")
    with pytest.raises(ValueError, match="CUDA device"):
        model.generate(ids, max_new_tokens=2, backend="cuda")


@pytest.mark.parametrize("device,backend", COMPILED)
def test_bf16_backends_follow_bf16_eager(device, backend):
    """In bf16 the products round differently per kernel (the CPU backend multiplies with oneDNN-packed bf16
    weights), so a greedy run may part from eager's at a near tie: the first new token (from the shared prefill)
    must agree, and most of the rest."""
    model = model_on(device).to(torch.bfloat16)
    ids, mask = left_padded([6, 9, 4], seed=51)
    out = run(model, backend, ids, mask, max_new_tokens=16)
    ref = run(model, "eager", ids, mask, max_new_tokens=16)
    assert torch.equal(out.sequences[:, :10], ref.sequences[:, :10])
    same = (out.sequences == ref.sequences).float().mean().item()
    assert same > 0.8, same
    torch.testing.assert_close(out.action_logprobs[:, :1], ref.action_logprobs[:, :1], atol=0.05, rtol=0.05)
