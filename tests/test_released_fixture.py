"""Parity with the released implementation: its tiny checkpoint and its recorded outputs (fixture README)."""

import torch

from bwarea import BWAreaForCausalLM

ATOL = 1e-4


def load(released_dir):
    model = BWAreaForCausalLM.from_pretrained(released_dir)
    assert not model.training
    return model


def inputs(reference):
    ids = torch.tensor(reference["input_ids"])
    return ids, torch.ones_like(ids)


def test_fixed_action_logits_and_next_tokens(released_dir, reference):
    model = load(released_dir)
    ids, mask = inputs(reference)
    with torch.no_grad():
        logits = model(ids, mask, action_idx=2).logits
        torch.testing.assert_close(logits[0, -1], torch.tensor(reference["fixed_action_2_last_logits"]),
                                   atol=ATOL, rtol=0)
        for action, token in reference["fixed_action_next_token"].items():
            assert int(model(ids, mask, action_idx=int(action)).logits[0, -1].argmax()) == token, action


def test_tensor_actions(released_dir, reference):
    model = load(released_dir)
    ids, mask = inputs(reference)
    actions = torch.tensor(reference["tensor_actions"])
    with torch.no_grad():
        out = model(ids, mask, action_idx=actions)
    torch.testing.assert_close(out.logits[0], torch.tensor(reference["tensor_actions_logits"]), atol=ATOL, rtol=0)
    assert torch.equal(out.action_index, actions)


def test_forward_inverse(released_dir, reference):
    model = load(released_dir)
    ids, mask = inputs(reference)
    with torch.no_grad():
        out = model.forward_inverse(input_ids=ids, attention_mask=mask)
    assert out.action_index.tolist() == reference["inverse_action_index"]
    torch.testing.assert_close(out.logits[0], torch.tensor(reference["inverse_logits"]), atol=ATOL, rtol=0)


def test_forward_policy_greedy(released_dir, reference):
    model = load(released_dir)
    model.set_action_sampling(greedy=True)
    ids, mask = inputs(reference)
    model.reset_action_info()
    with torch.no_grad():
        out = model.forward_policy(input_ids=ids, attention_mask=mask)
    assert out.action_index.tolist() == reference["policy_action_index"]
    torch.testing.assert_close(out.logits[0], torch.tensor(reference["policy_logits"]), atol=ATOL, rtol=0)
    info = model.get_action_info()["action_idx"]
    assert len(info) == 1 and info[0].shape == (1, 1) and int(info[0]) == reference["policy_action_index"][0][-1]


def test_bfloat16_load_stays_close(released_dir, reference):
    model = BWAreaForCausalLM.from_pretrained(released_dir, dtype=torch.bfloat16)
    assert model.world_model.lm_head.weight.dtype == torch.bfloat16
    ids, mask = inputs(reference)
    with torch.no_grad():
        logits = model(ids, mask, action_idx=2).logits
    assert logits.dtype == torch.float32
    ref = torch.tensor(reference["fixed_action_2_last_logits"])
    # bf16 keeps ~3 significant digits; the logits are O(1).
    assert (logits[0, -1] - ref).abs().max() < 0.1


def test_released_format_round_trip(released_dir):
    """``to_released_state_dict`` undoes the loader's conversion exactly: the fixture's own keys and tensors."""
    from safetensors.torch import load_file

    from bwarea import compat
    from bwarea.checkpoint import read_config

    original = {k: v for k, v in load_file(released_dir / "model.safetensors").items()
                if compat.rename_released_key(k) is not None}
    config, fmt = read_config(released_dir)
    assert fmt == "released"
    back = compat.to_released_state_dict(compat.convert_released_state_dict(original), config)
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
