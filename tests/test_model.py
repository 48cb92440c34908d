"""Core model behaviour: formats, saving, the seed-compatible API, padding, and clear errors on bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import bwarea
from bwarea import BWAreaConfig, BWAreaForCausalLM
from bwarea.checkpoint import convert_released_checkpoint
from conftest import tiny_config


def ids_for(model, batch=2, seq=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (batch, seq), generator=g)


# ----- formats and I/O ------------------------------------------------------------------------------
def test_save_and_load_roundtrip(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "bwarea"
    loaded = BWAreaForCausalLM.from_pretrained(tmp_path / "m")
    for (k, a), (k2, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    ids = ids_for(tiny_model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, action_idx=5).logits, tiny_model(ids, action_idx=5).logits)


def test_dtype_handling(tmp_path, tiny_model):
    tiny_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(tmp_path / "bf16" / "model.safetensors")["policy.head.weight"].dtype == torch.bfloat16
    assert BWAreaForCausalLM.from_pretrained(tmp_path / "bf16").policy.head.weight.dtype == torch.float32
    assert BWAreaForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto").policy.head.weight.dtype == torch.bfloat16
    assert BWAreaForCausalLM.from_pretrained(tmp_path / "bf16", torch_dtype=torch.float16).policy.head.weight.dtype \
        == torch.float16


def test_auto_classes(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "m")
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "m"), BWAreaConfig)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), BWAreaForCausalLM)


def test_config_fields_and_released_names():
    cfg = BWAreaConfig(num_hidden_layers=6, hidden_size=48, num_attention_heads=6, num_code=32, num_dim=8)
    assert (cfg.num_actions, cfg.codebook_dim) == (32, 8)
    assert (cfg.inverse_layers, cfg.policy_layers, cfg.action_layer) == (3, 6, 3)
    custom = BWAreaConfig(num_hidden_layers=8, hidden_size=64, num_attention_heads=4, inverse_layers=2,
                          policy_layers=3, action_layer=5)
    model = BWAreaForCausalLM(custom)
    assert (len(model.inverse_dynamics.layers), len(model.policy.layers), model.world_model.action_layer) == (2, 3, 5)


def test_released_format_detected_and_converted(tmp_path, released_dir, reference):
    convert_released_checkpoint(released_dir, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "bwarea"
    assert (tmp_path / "ours" / "tokenizer.json").is_file()
    released = BWAreaForCausalLM.from_pretrained(released_dir)
    ours = BWAreaForCausalLM.from_pretrained(tmp_path / "ours")
    ids = torch.tensor(reference["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_inverse(ids).logits, released.forward_inverse(ids).logits)


def test_pickle_needs_consent(tmp_path, released_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(released_dir / "config.json", folder / "config.json")
    torch.save(load_file(released_dir / "model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        BWAreaForCausalLM.from_pretrained(folder)
    assert isinstance(BWAreaForCausalLM.from_pretrained(folder, allow_pickle=True), BWAreaForCausalLM)


# ----- the seed README's drop-in module ---------------------------------------------------------------
def test_seed_modules_on_released_checkpoint(released_dir, reference):
    from bwareaModel.model_utils import create_intention_model
    from bwareaModel.tokenizer import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(str(released_dir), fast_tokenizer=True, add_special_tokens=None)
    assert len(tokenizer) == reference["len_tokenizer"] and tokenizer.pad_token_id == reference["pad_token_id"]
    model = create_intention_model(str(released_dir), tokenizer=tokenizer, dtype=torch.float32)
    ids = torch.LongTensor(tokenizer.encode(reference["prompt"])).unsqueeze(0)
    assert ids.tolist() == reference["input_ids"]
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), action_idx=2)
    torch.testing.assert_close(out.logits[0, -1], torch.tensor(reference["fixed_action_2_last_logits"]),
                               atol=1e-4, rtol=0)
    assert model.forward_inverse(input_ids=ids, attention_mask=torch.ones_like(ids)).action_index[:, :-1].shape \
        == (1, ids.shape[1] - 1)


def test_seed_loader_adds_pad_and_resizes(tmp_path, released_dir):
    """A checkpoint whose tokenizer lacks [PAD] gets it, and every embedding grows to a multiple of 8."""
    from bwareaModel.model_utils import create_intention_model
    from bwareaModel.tokenizer import load_hf_tokenizer

    torch.manual_seed(0)
    model = BWAreaForCausalLM(tiny_config(vocab_size=512, pad_token_id=None)).eval()
    model.save_pretrained(tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(released_dir / name, tmp_path / "m" / name)
    tokenizer = load_hf_tokenizer(str(tmp_path / "m"), fast_tokenizer=True, add_special_tokens=None)
    assert len(tokenizer) == 513 and tokenizer.convert_ids_to_tokens(512) == "[PAD]"
    resized = create_intention_model(str(tmp_path / "m"), tokenizer=tokenizer, dtype=torch.float32)
    assert resized.config.vocab_size == 520 and resized.config.pad_token_id == 512
    for weight in (resized.world_model.embed_tokens.weight, resized.inverse_dynamics.embed_tokens.weight,
                   resized.policy.embed_tokens.weight, resized.world_model.lm_head.weight):
        assert weight.shape[0] == 520
    ids = ids_for(model)
    with torch.no_grad():
        torch.testing.assert_close(resized(ids, action_idx=3).logits[..., :512], model(ids, action_idx=3).logits)


def test_language_model_view_and_action_info(tiny_model):
    ids = ids_for(tiny_model)
    tiny_model.set_action_sampling(greedy=True)
    tiny_model.reset_action_info()
    with torch.no_grad():
        out = tiny_model(ids)
        policy = tiny_model.forward_policy(ids).action_index
        under_policy = tiny_model.forward_under_policy(ids)
    # The language-model view sums over the actions: it reports the policy's most likely ones and records none.
    assert torch.equal(out.action_index, policy)
    torch.testing.assert_close(out.logits.logsumexp(-1), torch.zeros(ids.shape), atol=1e-5, rtol=0)
    assert torch.equal(under_policy.action_index, policy)
    info = tiny_model.get_action_info()["action_idx"]
    assert len(info) == 2 and all(t.shape == (2, 1) for t in info)
    tiny_model.reset_action_info()
    assert tiny_model.get_action_info()["action_idx"] == []


def test_sampled_actions_follow_temperature(tiny_model):
    ids = ids_for(tiny_model, batch=1, seq=4)
    tiny_model.set_action_sampling(greedy=False, temp=1e-4)  # near-greedy sampling equals argmax
    with torch.no_grad():
        logits = tiny_model.forward_policy(ids).logits
        for _ in range(5):
            assert torch.equal(tiny_model.forward_policy(ids).action_index, logits.argmax(-1))
    with pytest.raises(ValueError, match="temperature"):
        tiny_model.set_action_sampling(greedy=False, temp=0.0)


def test_left_padding_matches_unpadded(tiny_model):
    ids = ids_for(tiny_model, batch=1, seq=7)
    padded = torch.cat([torch.full((1, 4), 512), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = tiny_model.forward_inverse(ids)
        batched = tiny_model.forward_inverse(padded, mask)
    torch.testing.assert_close(batched.logits[:, 4:], alone.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(batched.action_index[:, 4:], alone.action_index)
    assert torch.isfinite(batched.logits).all()


def test_training_view_has_gradients_through_straight_through(tiny_model):
    ids = ids_for(tiny_model)
    tiny_model.train()
    out = tiny_model.forward_inverse(ids, labels=ids)
    out.loss.backward()
    assert tiny_model.inverse_dynamics.press.weight.grad is not None
    assert tiny_model.inverse_dynamics.press.weight.grad.abs().sum() > 0
    # Forward value is the codebook row (up to rounding of z + (q - z)); the gradient goes to the latents.
    torch.testing.assert_close(tiny_model.action_codebook(out.action_index), out.action_vectors.detach())


# ----- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("action, message", [
    (64, r"action index 64 is outside \[0, 64\)"),
    (-1, r"action index -1 is outside"),
    (torch.zeros(2, 3, dtype=torch.long), r"action_idx has shape \(2, 3\)"),
    (torch.zeros(2, 9), r"integer action indices"),
    (torch.full((2, 9), 70), r"action index 70"),
    ("3", r"int or a \(batch, seq\) LongTensor"),
])
def test_bad_actions(tiny_model, action, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(ids_for(tiny_model), action_idx=action)


def test_bad_tokens_mask_and_length(tiny_model):
    ids = ids_for(tiny_model)
    with pytest.raises(ValueError, match=r"token id 600 is outside the vocabulary \[0, 520\)"):
        tiny_model(torch.full((1, 3), 600))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\)"):
        tiny_model.forward_inverse(ids, torch.ones(2, 4))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 128"):
        tiny_model.forward_policy(torch.ones(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        tiny_model(torch.ones(1, 0, dtype=torch.long), action_idx=1)
    with pytest.raises(ValueError, match="integer token ids"):
        tiny_model(ids.float(), action_idx=1)


def test_checkpoint_key_errors_name_key_and_shapes(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    weights.pop("policy.head.weight")
    weights["world_model.extra.weight"] = torch.zeros(2)
    weights["action_codebook.embed.weight"] = torch.zeros(64, 7)
    save_file(weights, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError) as err:
        BWAreaForCausalLM.from_pretrained(tmp_path / "m")
    text = str(err.value)
    assert "missing key policy.head.weight (expected shape (64, 48))" in text
    assert "unexpected key world_model.extra.weight" in text
    assert "action_codebook.embed.weight has shape (64, 7), the config expects (64, 16)" in text


def test_config_without_action_fields(tmp_path, released_dir):
    folder = tmp_path / "plain-llama"
    folder.mkdir()
    config = json.loads((released_dir / "config.json").read_text())
    del config["num_code"], config["num_dim"], config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(released_dir / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(ValueError, match="not a BWArea checkpoint"):
        BWAreaForCausalLM.from_pretrained(folder)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        BWAreaForCausalLM.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        BWAreaForCausalLM.from_pretrained(tmp_path / "empty")


def test_invalid_config():
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        BWAreaConfig(hidden_size=50, num_attention_heads=6)
    with pytest.raises(ValueError, match="action_layer 9"):
        BWAreaConfig(hidden_size=48, num_attention_heads=6, num_hidden_layers=4, action_layer=9)


def test_package_exports():
    assert bwarea.BWAreaForCausalLM is BWAreaForCausalLM and callable(bwarea.load_tokenizer)
