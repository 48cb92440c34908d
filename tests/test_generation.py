"""Generation: cached decoding against full recomputation, the released references, batching, action controls,
returned fields, streaming and stopping, fan-out, the exact likelihood, and the errors bad input gets."""

import json

import pytest
import torch

from bwarea import BWAreaForCausalLM, load_tokenizer
from bwarea import kernels
from bwarea.generation.backends import cpu
from bwarea.generation.backends.threads import StepThreads
from conftest import tiny_config


@pytest.fixture(scope="module")
def released(released_dir) -> BWAreaForCausalLM:
    return BWAreaForCausalLM.from_pretrained(released_dir).eval()


@pytest.fixture
def model(tiny_model) -> BWAreaForCausalLM:
    tiny_model.set_action_sampling(greedy=True)
    tiny_model.reset_action_info()
    return tiny_model


def prompts(batch=2, width=7, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, width), generator=g)


def left_pad(rows, pad=512):
    """list of 1-D id tensors -> (ids, mask) padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def recomputed_tokens(model, out, attention_mask=None):
    """Argmax of the world model over the final sequence under the returned actions, at each new position."""
    seq, width = out.sequences, out.prompt_length
    actions = torch.cat([out.prompt_actions, out.actions], dim=1)
    mask = None if attention_mask is None else torch.cat(
        [attention_mask, torch.ones_like(out.actions)], dim=1)[:, :-1]
    with torch.no_grad():
        logits = model(seq[:, :-1], mask, action_idx=actions).logits
    return logits[:, width - 1:].argmax(-1)


# ----- the released references ---------------------------------------------------------------------------------
def test_policy_prompt_actions_reproduce_released_cached_generate(released, reference):
    ids = torch.tensor(reference["input_ids"])
    released.set_action_sampling(greedy=True)
    released.reset_action_info()
    out = released.generate(ids, torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=512,
                            prompt_actions="policy")
    assert out.tolist() == reference["generate_greedy"]
    actions = torch.cat(released.get_action_info()["action_idx"], dim=1)
    assert actions.tolist() == reference["generate_greedy_actions"]


def test_default_generate_is_the_documented_semantics(released, reference):
    ids = torch.tensor(reference["input_ids"])
    released.set_action_sampling(greedy=True)
    out = released.generate(ids, torch.ones_like(ids), max_new_tokens=10, pad_token_id=512,
                            return_dict_in_generate=True)
    assert out.sequences.tolist() == reference["generate_id_prompt_greedy"]
    assert torch.cat([out.prompt_actions, out.actions], 1).tolist() == reference["generate_id_prompt_actions"]
    assert out.prompt_actions.tolist() == [reference["inverse_action_index"][0][:-1]]


def test_seed_readme_call_and_reinforce_shapes(released, reference):
    ids = torch.tensor(reference["input_ids"]).repeat(3, 1)
    released.set_action_sampling(greedy=True)
    released.reset_action_info()
    out = released.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, pad_token_id=512,
                            do_sample=True, top_p=1.0, temperature=0.8, top_k=1)
    # top_k=1 sampling is greedy decoding.
    assert out.tolist() == reference["generate_id_prompt_greedy"] * 3
    action_idx = torch.cat(released.get_action_info()["action_idx"], dim=1)
    assert action_idx.shape == (3, 10)
    logits = released.forward_policy(input_ids=out, attention_mask=torch.ones_like(out)).logits[:, ids.shape[1]:]
    assert logits.log_softmax(-1).gather(-1, action_idx[..., None]).shape == (3, 10, 1)


# ----- cached decoding == recomputation ---------------------------------------------------------------------------
@pytest.mark.parametrize("prompt_actions", ["inverse", "policy"])
def test_cached_decoding_equals_full_recomputation(model, prompt_actions):
    ids = prompts(batch=2, width=9)
    g = torch.Generator().manual_seed(1)
    out = model.generate(ids, max_new_tokens=24, min_new_tokens=24, action_greedy=False, action_temperature=1.0,
                         generator=g, prompt_actions=prompt_actions, return_dict_in_generate=True)
    assert len(set(out.actions.flatten().tolist())) > 3  # sampled actions: the decode path sees many
    assert torch.equal(recomputed_tokens(model, out), out.sequences[:, 9:])
    if prompt_actions == "inverse":
        assert torch.equal(out.prompt_actions, model.infer_actions(ids)[0][:, :-1])


@pytest.mark.parametrize("threads", [2, 3])
def test_decoding_does_not_depend_on_thread_count(model, threads):
    """The decode step splits weights into one block per thread (3 does not divide every weight: no split
    there); conftest runs the rest on one thread (no split)."""
    rows = [prompts(1, 4, seed=1)[0], prompts(1, 7, seed=2)[0]]
    ids, mask = left_pad(rows)
    expected = model.generate(ids, mask, max_new_tokens=10, return_dict_in_generate=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = model.generate(ids, mask, max_new_tokens=10, return_dict_in_generate=True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(out.actions, expected.actions)
    torch.testing.assert_close(out.action_logprobs, expected.action_logprobs, atol=1e-4, rtol=1e-4)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run_steps(plan, clock, cost, steps, blocks=4):
    """Drive a ``_StepThreads`` through ``steps`` decode steps of ``blocks`` blocks, a block on c threads taking
    cost(step, c) / blocks seconds -> per step the count it ran on, "overran" where n threads gave up midway."""
    ran = []
    for step in range(steps):
        plan.begin()
        with plan.run():
            for _ in range(blocks):
                plan.check()
                assert torch.get_num_threads() == plan.live
                clock.now += cost(step, plan.live) / blocks
        ran.append(plan.count if plan.live == plan.count else "overran")
        plan.end()
        assert torch.get_num_threads() == 2  # torch's setting between steps
    return ran


def test_step_threads_keep_all_threads_while_they_are_faster(two_threads):
    clock = FakeClock()
    plan = StepThreads(2, clock)
    ran = run_steps(plan, clock, lambda step, n: {2: 1.0, 1: 1.6}[n], 300)
    # one thread first, then every thread, with one-thread re-timings ever further apart
    assert [i for i, n in enumerate(ran) if n != 2] == [0, 9, 25, 57, 121, 249]


def test_step_threads_fall_back_to_one_under_load_and_come_back(two_threads):
    """A busy machine: a step on both threads takes 40x one thread's. The first try of both threads (and each
    re-try) gives up after one block; once the load ends, steps go back to both threads."""
    clock = FakeClock()
    plan = StepThreads(2, clock)

    def cost(step, n):
        busy = 20 <= step < 400
        return {2: 40.0 if busy else 1.0, 1: 1.6 if busy else 1.6}[n]

    ran = run_steps(plan, clock, cost, 700)
    assert ran[:2] == [1, 2]
    assert ran[20] == "overran" and set(ran[21:400]) <= {1, "overran"}
    tries = [i for i in range(400) if ran[i] == "overran"]
    assert tries == [20, 28, 44, 76, 140, 268]  # 8, 16, ... steps apart
    back = ran.index(2, 400)
    assert back <= 268 + 256 and set(ran[back:]) <= {1, 2} and ran[-100:].count(2) >= 98
    # against the faster count at every step: a block on both threads per try under load, and one thread until
    # the first re-try after it (plus a few one-thread re-timings)
    fastest = sum(min(cost(s, 1), cost(s, 2)) for s in range(700))
    assert clock.now - fastest < len(tries) * 40.0 / 4 + (back - 400) * 0.6 + 10 * 0.6


def test_step_threads_hand_back_torchs_setting_on_error(two_threads):
    plan = StepThreads(2, FakeClock())
    plan.begin()
    with pytest.raises(RuntimeError, match="boom"):
        with plan.run():
            assert torch.get_num_threads() == 1  # the first step runs on one thread
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("batch", [1, 5])  # 5 rows: the oneDNN-packed products where oneDNN is usable
def test_switching_threads_mid_generation_changes_no_result(model, monkeypatch, two_threads, batch):
    """Steps on both threads, and steps that drop to one thread halfway, give the one-thread result."""
    ids = prompts(batch=batch, width=6, seed=3)
    kwargs = dict(max_new_tokens=7, min_new_tokens=7, action_greedy=False, action_temperature=1.0,
                  return_dict_in_generate=True)
    pattern = [1]

    class Scripted(StepThreads):
        def begin(self):
            self.plan = pattern[self.step % len(pattern)]
            self.count = self.live = 2 if self.plan == "overrun" else self.plan
            self.elapsed, self.deadline, self.blocks = 0.0, None, 0

        def check(self):  # "overrun": from the third block on, one thread
            self.blocks += 1
            if self.plan == "overrun" and self.blocks == 3:
                self.deadline = -1.0
            super().check()
            assert torch.get_num_threads() == (1 if self.plan == "overrun" and self.blocks >= 3 else self.count)

        def end(self):
            self.step += 1

    monkeypatch.setattr(cpu, "StepThreads", Scripted)
    expected = model.generate(ids, generator=torch.Generator().manual_seed(4), **kwargs)
    pattern[:] = [2, "overrun", 1]
    out = model.generate(ids, generator=torch.Generator().manual_seed(4), **kwargs)
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(out.actions, expected.actions)
    torch.testing.assert_close(out.action_logprobs, expected.action_logprobs, atol=1e-5, rtol=1e-5)
    assert torch.get_num_threads() == 2


def paired_and_unpaired(model, monkeypatch, *args, **kwargs):
    """generate(...) on the CPU backend, whose leading policy / world-model-lower-half pairs run stacked, and on
    the eager backend (the model's own blocks, one by one)."""
    paired = model.generate(*args, return_dict_in_generate=True, backend="cpu", **kwargs)
    unpaired = model.generate(*args, return_dict_in_generate=True, backend="eager", **kwargs)
    return paired, unpaired


@pytest.mark.parametrize("overrides", [{}, {"policy_layers": 1}, {"action_layer": 3}, {"action_layer": 0}])
def test_paired_decode_equals_unpaired_and_recomputation(monkeypatch, overrides):
    """The leading policy and world-model blocks run stacked while decoding on CPU; fewer policy blocks than
    pairs, more pairs, and none (action at the bottom) all give the separate blocks' result."""
    torch.manual_seed(0)
    model = BWAreaForCausalLM(tiny_config(**overrides)).eval()
    model.set_action_sampling(greedy=True)
    expected_pairs = min(model.world_model.action_layer, len(model.policy.layers))
    assert cpu.decode_pairs(model, torch.device("cpu")) == expected_pairs
    rows = [prompts(1, 4, seed=5)[0], prompts(1, 9, seed=6)[0]]
    ids, mask = left_pad(rows)
    paired, unpaired = paired_and_unpaired(model, monkeypatch, ids, mask, max_new_tokens=14, min_new_tokens=14)
    assert torch.equal(paired.sequences, unpaired.sequences) and torch.equal(paired.actions, unpaired.actions)
    torch.testing.assert_close(paired.action_logprobs, unpaired.action_logprobs, atol=1e-5, rtol=1e-5)
    assert torch.equal(recomputed_tokens(model, paired, mask), paired.sequences[:, 9:])


def test_paired_weights_follow_in_place_updates(model, monkeypatch):
    """The stacked copy of the paired blocks is rebuilt after an optimiser-style in-place update (RL does this
    between rollouts), never served stale."""
    ids = prompts(2, 6, seed=7)
    before = model.generate(ids, max_new_tokens=10, min_new_tokens=10, return_dict_in_generate=True)
    with torch.no_grad():
        model.policy.layers[0].mlp.down_proj.weight.add_(torch.randn_like(model.policy.layers[0].mlp.down_proj.weight))
        model.world_model.layers[0].self_attn.qkv_proj.weight.mul_(1.5)
    paired, unpaired = paired_and_unpaired(model, monkeypatch, ids, max_new_tokens=10, min_new_tokens=10)
    assert not torch.allclose(paired.action_logprobs, before.action_logprobs)  # the update changed the policy
    assert torch.equal(paired.sequences, unpaired.sequences) and torch.equal(paired.actions, unpaired.actions)
    torch.testing.assert_close(paired.action_logprobs, unpaired.action_logprobs, atol=1e-5, rtol=1e-5)


def test_model_built_under_inference_mode_decodes(monkeypatch):
    """Its parameters are inference tensors, with no version counter for the paired-weight cache to read."""
    torch.manual_seed(0)
    with torch.inference_mode():
        model = BWAreaForCausalLM(tiny_config()).eval()
    model.set_action_sampling(greedy=True)
    paired, unpaired = paired_and_unpaired(model, monkeypatch, prompts(2, 5), max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(paired.sequences, unpaired.sequences)


def packed_and_unpacked(model, monkeypatch, *args, seed=0, **kwargs):
    """generate(...) on the CPU backend, with oneDNN-packed products (>= PACKED_MIN_ROWS rows), and on the eager
    backend, each with a generator seeded ``seed``."""
    packed = model.generate(*args, return_dict_in_generate=True, generator=torch.Generator().manual_seed(seed),
                            backend="cpu", **kwargs)
    unpacked = model.generate(*args, return_dict_in_generate=True, generator=torch.Generator().manual_seed(seed),
                              backend="eager", **kwargs)
    return packed, unpacked


@pytest.mark.skipif(not kernels.onednn_available(), reason="this torch build has no usable oneDNN")
@pytest.mark.parametrize("overrides", [{}, {"policy_layers": 1}, {"action_layer": 0}])
def test_packed_decode_equals_bmm_decode_and_recomputation(monkeypatch, overrides):
    """Five left-padded rows decode with oneDNN-packed weights (with and without stacked pairs): the same
    tokens and actions as the bmm path, and as the world model recomputed over the result."""
    torch.manual_seed(0)
    model = BWAreaForCausalLM(tiny_config(**overrides)).eval()
    rows = [prompts(1, n, seed=10 + n)[0] for n in (3, 9, 5, 9, 7)]
    ids, mask = left_pad(rows)
    assert cpu.packed_weights(model, torch.device("cpu"), len(rows)) is not None
    packed, unpacked = packed_and_unpacked(model, monkeypatch, ids, mask, max_new_tokens=14, min_new_tokens=14,
                                           action_greedy=False, seed=4)
    assert len(set(packed.actions.flatten().tolist())) > 3
    assert torch.equal(packed.sequences, unpacked.sequences) and torch.equal(packed.actions, unpacked.actions)
    torch.testing.assert_close(packed.action_logprobs, unpacked.action_logprobs, atol=1e-4, rtol=1e-4)
    assert torch.equal(recomputed_tokens(model, packed, mask), packed.sequences[:, 9:])
    alone = model.generate(rows[0][None], max_new_tokens=14, min_new_tokens=14, actions=packed.actions[:1])
    assert torch.equal(alone[0, 3:], packed.sequences[0, 9:])


@pytest.mark.skipif(not kernels.onednn_available(), reason="this torch build has no usable oneDNN")
def test_packed_weights_follow_in_place_updates(model, monkeypatch):
    """The packed copy is rebuilt after an in-place update of any decode matrix, never served stale."""
    ids = prompts(4, 6, seed=8)
    before = model.generate(ids, max_new_tokens=10, min_new_tokens=10, return_dict_in_generate=True)
    with torch.no_grad():
        model.policy.layers[-1].mlp.gate_up_proj.weight.mul_(-2.0)
        model.world_model.lm_head.weight.add_(torch.randn_like(model.world_model.lm_head.weight))
    packed, unpacked = packed_and_unpacked(model, monkeypatch, ids, max_new_tokens=10, min_new_tokens=10)
    assert not torch.allclose(packed.action_logprobs, before.action_logprobs)
    assert torch.equal(packed.sequences, unpacked.sequences) and torch.equal(packed.actions, unpacked.actions)


@pytest.mark.skipif(not kernels.onednn_available(), reason="this torch build has no usable oneDNN")
def test_policy_update_repacks_only_the_policy(model):
    """RL steps change the policy alone: the world model's packed weights are kept, the policy's rebuilt."""
    ids = prompts(4, 6, seed=9)
    model.generate(ids, max_new_tokens=3)
    derived = cpu._DERIVED[model]
    world, policy = derived["_decode_packed_world"][1], derived["_decode_packed_policy"][1]
    with torch.no_grad():
        model.policy.head.weight.mul_(0.5)
    model.generate(ids, max_new_tokens=3)
    assert derived["_decode_packed_world"][1] is world and derived["_decode_packed_policy"][1] is not policy
    assert not any(name.startswith("_decode") for name in vars(model))  # nothing is hung on the model


def test_fixed_action_equals_recomputation(model):
    ids = prompts(batch=1, width=5)
    out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, actions=17, return_dict_in_generate=True)
    assert (out.actions == 17).all()
    assert torch.equal(recomputed_tokens(model, out), out.sequences[:, 5:])
    assert torch.cat(model.get_action_info()["action_idx"], 1).tolist() == [[17] * 12]
    # Without the dict nothing needs the policy; the tokens must not change.
    plain = model.generate(ids, max_new_tokens=12, min_new_tokens=12, actions=17)
    assert torch.equal(plain, out.sequences)


def test_return_dict_fields_line_up(model):
    ids = prompts(batch=2, width=6)
    out = model.generate(ids, max_new_tokens=10, min_new_tokens=10, action_greedy=False,
                         generator=torch.Generator().manual_seed(3), return_dict_in_generate=True)
    assert out.sequences.shape == (2, 16) and out.prompt_length == 6
    assert out.actions.shape == out.action_logprobs.shape == out.action_entropy.shape == (2, 10)
    assert out.new_token_mask.all() and out.prompt_actions.shape == (2, 5)
    # actions[:, i] is the policy's choice at position prompt_len - 1 + i, which produced token i.
    with torch.no_grad():
        log_pi = model.forward_policy(out.sequences).logits[:, 5:15].log_softmax(-1)
    expected = log_pi.gather(-1, out.actions[..., None]).squeeze(-1)
    torch.testing.assert_close(out.action_logprobs, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.action_entropy, -(log_pi.exp() * log_pi).sum(-1), atol=1e-4, rtol=1e-4)


# ----- batches -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt_actions", ["inverse", "policy"])
def test_left_padded_batch_matches_each_row_alone(model, prompt_actions):
    rows = [prompts(1, 4, seed=5)[0], prompts(1, 9, seed=6)[0], prompts(1, 1, seed=7)[0]]
    ids, mask = left_pad(rows)
    out = model.generate(ids, mask, max_new_tokens=12, min_new_tokens=12, prompt_actions=prompt_actions,
                         return_dict_in_generate=True)
    assert torch.equal(recomputed_tokens(model, out, mask), out.sequences[:, 9:])
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=12, min_new_tokens=12, prompt_actions=prompt_actions,
                               return_dict_in_generate=True)
        assert torch.equal(alone.sequences[0, len(row):], out.sequences[i, 9:])
        assert torch.equal(alone.actions[0], out.actions[i])
        torch.testing.assert_close(alone.action_logprobs[0], out.action_logprobs[i], atol=1e-4, rtol=1e-4)


def test_num_return_sequences_repeats_rows(model):
    ids = prompts(batch=2, width=5)
    out = model.generate(ids, max_new_tokens=6, num_return_sequences=3, return_dict_in_generate=True)
    assert out.sequences.shape == (6, 11) and out.actions.shape == (6, 6)
    assert torch.equal(out.sequences[0], out.sequences[2]) and torch.equal(out.sequences[3], out.sequences[5])
    sampled = model.generate(ids, max_new_tokens=8, num_return_sequences=4, action_greedy=False,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled[:4, :5], ids[:1].expand(4, 5))
    assert len({tuple(r) for r in sampled[:4, 5:].tolist()}) > 1


# ----- action controls ---------------------------------------------------------------------------------------------
def test_action_schedule_with_policy_slots(model):
    ids = prompts(batch=2, width=5)
    schedule = [3, -1, 60, -1, -1, 7]
    out = model.generate(ids, max_new_tokens=6, actions=schedule, return_dict_in_generate=True)
    assert out.actions[:, [0, 2, 5]].tolist() == [[3, 60, 7]] * 2
    with torch.no_grad():
        greedy = model.forward_policy(out.sequences).logits[:, 4:10].argmax(-1)
    assert torch.equal(out.actions[:, [1, 3, 4]], greedy[:, [1, 3, 4]])
    assert torch.equal(recomputed_tokens(model, out), out.sequences[:, 5:])
    per_row = model.generate(ids, max_new_tokens=3, actions=torch.tensor([[1, 2, 3], [4, -1, 6]]),
                             return_dict_in_generate=True)
    assert per_row.actions[0].tolist() == [1, 2, 3] and per_row.actions[1, [0, 2]].tolist() == [4, 6]


@pytest.mark.parametrize("allowed", [[5, 9, 40], "mask"])
def test_allowed_actions(model, allowed):
    if allowed == "mask":
        allowed = torch.zeros(64, dtype=torch.bool)
        allowed[[5, 9, 40]] = True
    ids = prompts(batch=2, width=6)
    out = model.generate(ids, max_new_tokens=8, allowed_actions=allowed, return_dict_in_generate=True)
    assert set(out.actions.flatten().tolist()) <= {5, 9, 40}
    with torch.no_grad():
        logits = model.forward_policy(out.sequences).logits[:, 5:13]
    assert torch.equal(out.actions, torch.tensor([5, 9, 40])[logits[..., [5, 9, 40]].argmax(-1)])
    sampled = model.generate(ids, max_new_tokens=8, allowed_actions=allowed, action_greedy=False,
                             action_temperature=5.0, return_dict_in_generate=True)
    assert set(sampled.actions.flatten().tolist()) <= {5, 9, 40}


def test_per_row_allowed_mask(model):
    allowed = torch.zeros(2, 64, dtype=torch.bool)
    allowed[0, 3] = allowed[1, 11] = True
    out = model.generate(prompts(2, 4), max_new_tokens=5, allowed_actions=allowed, action_greedy=False,
                         return_dict_in_generate=True)
    assert (out.actions[0] == 3).all() and (out.actions[1] == 11).all()


def test_action_sampling_settings_and_overrides(model):
    ids = prompts(batch=1, width=6)
    greedy = model.generate(ids, max_new_tokens=10, return_dict_in_generate=True).actions
    model.set_action_sampling(greedy=False, temp=3.0)
    runs = [model.generate(ids, max_new_tokens=10, generator=torch.Generator().manual_seed(s),
                           return_dict_in_generate=True).actions for s in range(3)]
    assert any(not torch.equal(r, greedy) for r in runs)
    assert torch.equal(model.generate(ids, max_new_tokens=10, action_greedy=True,
                                      return_dict_in_generate=True).actions, greedy)
    cold = model.generate(ids, max_new_tokens=10, action_temperature=1e-4, generator=torch.Generator().manual_seed(0),
                          return_dict_in_generate=True).actions
    assert torch.equal(cold, greedy)


def test_the_configs_action_temperature_is_the_default_and_travels_with_the_model(tiny_model, tmp_path):
    """config.action_temperature is what generate samples actions at when the caller names none; save_pretrained
    keeps it; an explicit action_temperature still wins; a config.json without it (the released ones) means 1."""
    ids = prompts(batch=4, width=6)

    def actions(model, **kwargs):
        return model.generate(ids, max_new_tokens=24, generator=torch.Generator().manual_seed(0),
                              return_dict_in_generate=True, **kwargs).actions

    tiny_model.save_pretrained(tmp_path / "older")
    config = json.loads((tmp_path / "older" / "config.json").read_text())
    del config["action_temperature"]  # as written before the field existed
    (tmp_path / "older" / "config.json").write_text(json.dumps(config))
    assert BWAreaForCausalLM.from_pretrained(tmp_path / "older").action_temperature == 1.0
    at_half = actions(tiny_model, action_temperature=0.5)
    assert not torch.equal(at_half, actions(tiny_model))  # 0.5 and 1 sample different actions here
    tiny_model.config.action_temperature = 0.5
    tiny_model.save_pretrained(tmp_path / "cool")
    cool = BWAreaForCausalLM.from_pretrained(tmp_path / "cool").eval()
    assert cool.config.action_temperature == 0.5 and cool.action_temperature == 0.5
    assert torch.equal(actions(cool), at_half)
    assert torch.equal(actions(cool, action_temperature=1.0), actions(tiny_model, action_temperature=1.0))
    cool.set_action_sampling(greedy=True)  # the released switch still overrides it
    assert torch.equal(actions(cool), actions(tiny_model, action_greedy=True))


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "0.9", True])
def test_a_bad_config_action_temperature_is_named(value):
    with pytest.raises(ValueError, match="action_temperature"):
        tiny_config(action_temperature=value)


# ----- tokens: sampling, EOS, stopping, streaming -----------------------------------------------------------------
def test_token_sampling_controls(model):
    ids = prompts(batch=2, width=6)
    greedy = model.generate(ids, max_new_tokens=10)
    assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=True, top_k=1), greedy)
    assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=True, top_p=1e-6), greedy)
    a = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=2.0,
                       generator=torch.Generator().manual_seed(4))
    b = model.generate(ids, max_new_tokens=10, do_sample=True, temperature=2.0,
                       generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, greedy)
    no_repeat = model.generate(ids, max_new_tokens=10, repetition_penalty=1e6)
    for row in no_repeat.tolist():
        assert all(row[i] not in row[:i] for i in range(6, 16))


def test_eos_pads_and_masks(model):
    ids = prompts(batch=2, width=6)
    free = model.generate(ids, max_new_tokens=8, eos_token_id=[], return_dict_in_generate=True)
    eos = int(free.sequences[0, 6 + 2])
    if eos in free.sequences[0, 6:8].tolist():
        pytest.skip("the chosen EOS token appears earlier")
    out = model.generate(ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=511, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 14)
    assert out.sequences[0, 6:9].tolist() == free.sequences[0, 6:9].tolist()
    assert (out.sequences[0, 9:] == 511).all()
    assert out.new_token_mask[0].tolist() == [True] * 3 + [False] * 5
    forced = model.generate(ids, max_new_tokens=8, min_new_tokens=8, eos_token_id=eos, return_dict_in_generate=True)
    assert forced.new_token_mask.all() and eos not in forced.sequences[0, 6:].tolist()


def test_all_rows_stopping_early_keeps_widths(model):
    ids = prompts(batch=1, width=4)
    first = int(model.generate(ids, max_new_tokens=1)[0, -1])
    model.reset_action_info()
    out = model.generate(ids, max_new_tokens=6, eos_token_id=first, pad_token_id=0, return_dict_in_generate=True)
    assert out.sequences[0, 4:].tolist() == [first] + [0] * 5
    assert out.new_token_mask[0].tolist() == [True] + [False] * 5
    assert torch.cat(model.get_action_info()["action_idx"], 1).shape == (1, 6)


class RecordingStreamer:
    def __init__(self):
        self.chunks, self.ended = [], 0

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended += 1


def test_streamer_gets_prompt_then_each_token(model):
    ids = prompts(batch=2, width=5)
    streamer = RecordingStreamer()
    out = model.generate(ids, max_new_tokens=7, streamer=streamer)
    assert streamer.ended == 1 and len(streamer.chunks) == 8
    assert torch.equal(streamer.chunks[0], ids)
    assert torch.equal(torch.stack(streamer.chunks[1:], dim=1), out[:, 5:])


def test_step_callback_sees_steps_and_can_stop(model):
    ids = prompts(batch=2, width=5)
    seen = []

    def callback(step, tokens, actions):
        seen.append((step, tokens.shape, actions.shape))
        return step == 2

    out = model.generate(ids, max_new_tokens=8, pad_token_id=0, step_callback=callback, return_dict_in_generate=True)
    assert seen == [(i, (2,), (2,)) for i in range(3)]
    assert (out.sequences[:, 8:] == 0).all() and out.new_token_mask[:, :3].all()


def test_stop_strings(released, released_dir, reference):
    tokenizer = load_tokenizer(released_dir)
    ids = torch.tensor(reference["input_ids"])
    released.set_action_sampling(greedy=True)
    free = released.generate(ids, max_new_tokens=10, prompt_actions="policy")
    new = free[0, 12:].tolist()
    stop = tokenizer.decode(new[3:5])  # completed by the 5th new token
    assert stop not in tokenizer.decode(new[:4])
    out = released.generate(ids, max_new_tokens=10, prompt_actions="policy", stop_strings=stop, tokenizer=tokenizer,
                            pad_token_id=512, return_dict_in_generate=True)
    assert out.sequences[0, 12:17].tolist() == new[:5]
    assert (out.sequences[0, 17:] == 512).all()
    assert out.new_token_mask[0].tolist() == [True] * 5 + [False] * 5
    with pytest.raises(ValueError, match="tokenizer"):
        released.generate(ids, max_new_tokens=3, stop_strings=["x"])


# ----- every action at once ----------------------------------------------------------------------------------------
def test_fanout_equals_one_forward_per_action(model):
    rows = [prompts(1, 6, seed=8)[0], prompts(1, 9, seed=9)[0]]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        fan = model.fanout(ids, mask)
        inverse = model.infer_actions(ids, mask)[0]
        assert fan.shape == (2, 64, 520)
        for a in range(64):
            actions = torch.cat([inverse[:, :-1], torch.full((2, 1), a)], dim=1)
            expected = model(ids, mask, action_idx=actions).logits[:, -1]
            torch.testing.assert_close(fan[:, a], expected, atol=1e-4, rtol=1e-4)
        single = model.fanout(ids[:1, :1])
        torch.testing.assert_close(single[0, 5], model(ids[:1, :1], action_idx=5).logits[0, -1], atol=1e-4, rtol=1e-4)


def brute_force_log_likelihood(model, ids):
    """log p(x_{t+1} | x_<=t) by one world-model call per (position, action), for one unpadded row."""
    inverse = model.infer_actions(ids)[0]
    log_pi = model.policy_logits(ids).log_softmax(-1)
    out = []
    for t in range(ids.shape[1] - 1):
        terms = []
        for a in range(model.config.num_actions):
            actions = torch.cat([inverse[:, :t], torch.tensor([[a]])], dim=1)
            log_p = model(ids[:, :t + 1], action_idx=actions).logits[0, -1].log_softmax(-1)[ids[0, t + 1]]
            terms.append(log_pi[0, t, a] + log_p)
        out.append(torch.logsumexp(torch.stack(terms), 0))
    return torch.stack(out)


def test_likelihood_equals_brute_force_and_normalises():
    torch.manual_seed(2)
    model = BWAreaForCausalLM(tiny_config(vocab_size=24, pad_token_id=23, num_actions=8)).eval()
    with torch.no_grad():
        model.action_codebook.embed.weight.normal_(0, 1.0)
        model.world_model.action_proj.weight.normal_(0, 0.5)
        ids = torch.randint(0, 23, (1, 6))
        ll = model.lm_log_likelihood(ids)
        assert ll.shape == (1, 5)
        torch.testing.assert_close(ll[0], brute_force_log_likelihood(model, ids), atol=1e-4, rtol=1e-4)
        # Chunking over actions changes nothing.
        torch.testing.assert_close(model.lm_log_likelihood(ids, actions_per_chunk=3), ll, atol=1e-5, rtol=1e-5)
        # A distribution over the next token: all 24 continuations sum to 1.
        nexts = torch.cat([ids.expand(24, -1), torch.arange(24)[:, None]], dim=1)
        assert abs(float(model.lm_log_likelihood(nexts)[:, -1].exp().sum()) - 1) < 1e-4
        # Left padding: the padded row gives the row's values, zeros where the target or context is padding.
        padded, mask = left_pad([ids[0, 2:], ids[0]], pad=23)
        both = model.lm_log_likelihood(padded, mask)
        torch.testing.assert_close(both[1], ll[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(both[0, 2:], model.lm_log_likelihood(ids[:, 2:])[0], atol=1e-4, rtol=1e-4)
        assert (both[0, :2] == 0).all()


# ----- the model after generating ---------------------------------------------------------------------------------
def test_generate_leaves_the_weights_alone(model):
    before = {k: (v.clone(), v.stride()) for k, v in model.state_dict().items()}
    model.generate(prompts(batch=2, width=6), max_new_tokens=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k][0]) and v.stride() == before[k][1], k


def test_cpu_decoding_layout_changes_no_result(model, tmp_path):
    ids = prompts(batch=2, width=6)
    with torch.no_grad():
        before = model(ids, action_idx=4).logits
    expected = model.generate(ids, max_new_tokens=10, return_dict_in_generate=True)
    assert model.optimize_for_cpu_decoding() is model
    assert not model.world_model.lm_head.weight.is_contiguous()
    out = model.generate(ids, max_new_tokens=10, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected.sequences) and torch.equal(out.actions, expected.actions)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, action_idx=4).logits, before, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "m")
    again = BWAreaForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(again(ids, action_idx=4).logits, before, atol=1e-5, rtol=1e-5)


def test_empty_prompt_starts_from_bos(model):
    out = model.generate(torch.zeros(2, 0, dtype=torch.long), max_new_tokens=4)
    assert out.shape == (2, 5) and (out[:, 0] == model.config.bos_token_id).all()


def test_zero_new_tokens_returns_the_prompt(model):
    ids = prompts(batch=2, width=5)
    out = model.generate(ids, max_new_tokens=0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ids) and out.actions.shape == (2, 0)


# ----- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=200), "max_position_embeddings"),
    (dict(min_new_tokens=5, max_new_tokens=3), "min_new_tokens"),
    (dict(actions=[1, 2, 3]), "max_new_tokens=4"),
    (dict(actions=torch.ones(3, 4, dtype=torch.long)), "batch=2"),
    (dict(actions=64), "outside"),
    (dict(actions=[1, 2, 70, -1]), "70"),
    (dict(actions=[1, 2, -2, -1]), "-2"),
    (dict(allowed_actions=torch.zeros(64, dtype=torch.bool)), "allows no action"),
    (dict(allowed_actions=[3, 64]), "outside"),
    (dict(allowed_actions=[3], actions=[4, -1, -1, -1]), "forbids"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(action_greedy=False, action_temperature=0.0), "action_temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(prompt_actions="world"), "prompt_actions"),
    (dict(num_return_sequences=0), "num_return_sequences"),
])
def test_bad_generate_arguments(model, kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        model.generate(prompts(batch=2, width=6), **kwargs)


def test_bad_prompts(model):
    ids = prompts(batch=2, width=6)
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="left"):
        model.generate(ids, right, max_new_tokens=2)
    with pytest.raises(ValueError, match="no tokens"):
        model.generate(ids, torch.tensor([[0] * 6, [1] * 6]), max_new_tokens=2)
    with pytest.raises(ValueError, match="vocabulary"):
        model.generate(ids + 1000, max_new_tokens=2)
    with pytest.raises(TypeError, match="num_beams"):
        model.generate(ids, max_new_tokens=2, num_beams=4)
    with pytest.raises(ValueError, match="pad on the left"):
        model.fanout(ids, right)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.lm_log_likelihood(ids, right[:, :3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_decoding_equals_recomputation(model):
    model = model.cuda()
    ids, mask = left_pad([prompts(1, 4, seed=5)[0], prompts(1, 9, seed=6)[0]])
    ids, mask = ids.cuda(), mask.cuda()
    out = model.generate(ids, mask, max_new_tokens=12, min_new_tokens=12, return_dict_in_generate=True)
    assert torch.equal(recomputed_tokens(model, out, mask), out.sequences[:, 9:])
    alone = model.generate(ids[1:], max_new_tokens=12, min_new_tokens=12)
    assert torch.equal(alone[0, 9:], out.sequences[1, 9:])
    with torch.no_grad():
        fan = model.fanout(ids, mask)
        inverse = model.infer_actions(ids, mask)[0]
        for a in (0, 31, 63):
            actions = torch.cat([inverse[:, :-1], torch.full_like(inverse[:, :1], a)], dim=1)
            torch.testing.assert_close(fan[:, a], model(ids, mask, action_idx=actions).logits[:, -1],
                                       atol=1e-4, rtol=1e-4)
