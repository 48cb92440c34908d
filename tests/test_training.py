"""The training stages and their loop: checkpoints, exact resume, failures, freezing, evaluation, the CLI."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bwarea import BWAreaForCausalLM, load_tokenizer
from bwarea.cli import main
from bwarea.tokenizer_train import train_tokenizer
from bwarea.train import BCConfig, BCStage, PretrainConfig, PretrainStage, TrainingDiverged, train
from bwarea.train import pretrain as pretrain_module
from bwarea.train.pretrain import kmeans

WORDS = ("the king said unto the queen that the people of the city went up to the house of the lord and "
         "spoke of war and peace and of the sea").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (12,), generator=g)) + "."
             for _ in range(600)]
    (root / "train.txt").write_text("\n".join(lines))
    train_tokenizer([root / "train.txt"], 300, root / "tok")
    return root


def tiny(corpus, out, **overrides) -> PretrainConfig:
    fields = dict(data=[str(corpus / "train.txt")], tokenizer=str(corpus / "tok"), out=str(out), max_steps=6,
                  batch_size=4, block_size=32, hidden_size=32, layers=2, heads=2, intermediate_size=64,
                  codebook_dim=8, warmup_steps=2, log_every=1, save_every=2, keep_last=2, eval_blocks=4,
                  dead_code_every=3, cache_dir=str(corpus / "cache"), progress=False, lr=3e-3)
    fields.update(overrides)
    return PretrainConfig(**fields)


def curve(out: Path, split="train", key="loss") -> list:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in records if r["split"] == split]


@pytest.fixture(scope="module")
def stage1(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "s1"
    train(PretrainStage(), tiny(corpus, out, max_steps=8))
    return out


# ----- stage 1 and the loop -------------------------------------------------------------------------------
def test_pretrain_writes_a_loadable_model_checkpoints_and_metrics(stage1):
    model = BWAreaForCausalLM.from_pretrained(stage1)
    tokenizer = load_tokenizer(stage1)
    assert len(tokenizer) == model.config.vocab_size and model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.num_hidden_layers == 2 and model.config.max_position_embeddings == 32
    assert sorted(p.name for p in (stage1 / "checkpoints").iterdir()) == ["step-000006", "step-000008"]
    train_log = [json.loads(line) for line in (stage1 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train_log if r["split"] == "train"] == list(range(1, 9))
    last = [r for r in train_log if r["split"] == "train"][-1]
    assert {"loss", "nll", "lr", "tokens_per_s", "codes_used", "code_perplexity", "grad_norm"} <= set(last)
    assert 1 <= last["codes_used"] <= 64 and 1 <= last["code_perplexity"] <= last["codes_used"] + 1e-6
    val = [r for r in train_log if r["split"] == "val"]
    assert val and {"id_ppl", "codes_used", "code_perplexity"} <= set(val[-1])
    assert list((stage1 / "tensorboard").iterdir())
    assert json.loads((stage1 / "training.json").read_text())["block_size"] == 32
    # The loss went down from its start near log(vocab).
    losses = [loss for _, loss in curve(stage1)]
    assert losses[-1] < losses[0]


def test_model_folders_pad_on_the_left_whatever_the_tokenizer_said(corpus, tmp_path):
    # A tokenizer from elsewhere (or an older `bwarea tokenizer train`) may not name a padding side; the model
    # folder a stage writes pads on the left for plain transformers all the same.
    from transformers import AutoTokenizer

    from bwarea.train.loop import copy_tokenizer
    src, dst = tmp_path / "tok", tmp_path / "model"
    shutil.copytree(corpus / "tok", src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.pop("padding_side", None)
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(src).padding_side == "right"
    dst.mkdir()
    copy_tokenizer(src, dst)
    assert AutoTokenizer.from_pretrained(dst).padding_side == "left"
    assert (dst / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_resume_after_a_kill_gives_the_same_loss_curve(corpus, tmp_path):
    train(PretrainStage(), tiny(corpus, tmp_path / "whole"))

    class Killed(Exception):
        pass

    def kill_at_5(step, metrics):
        if step == 5:  # after the step-4 checkpoint, before step 6's
            raise Killed
    with pytest.raises(Killed):
        train(PretrainStage(), tiny(corpus, tmp_path / "killed"), on_step=kill_at_5)
    train(PretrainStage(), tiny(corpus, tmp_path / "killed", resume=True))
    whole, resumed = curve(tmp_path / "whole"), curve(tmp_path / "killed")
    assert [s for s, _ in resumed] == list(range(1, 7))  # steps 5.. logged once, from the resumed run
    assert resumed == whole
    assert curve(tmp_path / "killed", "val", "nll") == curve(tmp_path / "whole", "val", "nll")
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_matches_the_bigger_batch(corpus, tmp_path):
    train(PretrainStage(), tiny(corpus, tmp_path / "big", batch_size=4, max_steps=3, dead_code_every=0))
    train(PretrainStage(), tiny(corpus, tmp_path / "acc", batch_size=2, grad_accum=2, max_steps=3,
                                dead_code_every=0))
    for (s1, l1), (s2, l2) in zip(curve(tmp_path / "big"), curve(tmp_path / "acc")):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4)


def test_a_failed_checkpoint_save_leaves_the_previous_one_intact(corpus, tmp_path, monkeypatch):
    from accelerate import Accelerator
    real_save = Accelerator.save_state
    calls = {"n": 0}

    def save_then_fail(self, output_dir, **kwargs):
        calls["n"] += 1
        real_save(self, output_dir, **kwargs)
        if calls["n"] == 2:  # the step-4 save dies after writing its files, before it is complete
            raise OSError("No space left on device")
    monkeypatch.setattr(Accelerator, "save_state", save_then_fail)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        train(PretrainStage(), tiny(corpus, out))
    monkeypatch.undo()
    assert [p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-000002"]
    assert json.loads((out / "checkpoints" / "step-000002" / "trainer_state.json").read_text())["step"] == 2
    train(PretrainStage(), tiny(corpus, out, resume=True))
    train(PretrainStage(), tiny(corpus, tmp_path / "whole"))
    assert curve(out) == curve(tmp_path / "whole")
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    real_forward = pretrain_module.WorldModelObjective.forward
    calls = {"n": 0}

    def nan_at_step_5(self, input_ids, evaluation=False):
        result = real_forward(self, input_ids, evaluation)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 5:
                result["loss"] = result["loss"] * float("nan")
        return result
    monkeypatch.setattr(pretrain_module.WorldModelObjective, "forward", nan_at_step_5)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"nan.*at step 5.*step-000004"):
        train(PretrainStage(), tiny(corpus, out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    weights = load_file(out / "checkpoints" / "step-000004" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert not (out / "model.safetensors").exists()
    # The CLI says the same in one line, exit code 1.
    monkeypatch.setattr(pretrain_module.WorldModelObjective, "forward",
                        lambda self, ids, evaluation=False: {**real_forward(self, ids, evaluation),
                                                             "loss": torch.tensor(float("nan"), requires_grad=True)})
    assert main(["pretrain", "--data", str(corpus / "train.txt"), "--tokenizer", str(corpus / "tok"), "--out",
                 str(tmp_path / "cli"), "--hidden-size", "32", "--layers", "2", "--heads", "2", "--block-size", "32",
                 "--batch-size", "2", "--max-steps", "2", "--no-progress", "--cache-dir", str(corpus / "cache")]) == 1


def test_bad_settings_give_clear_errors(corpus, stage1, tmp_path):
    with pytest.raises(ValueError, match="block size 64 exceeds max positions 32"):
        train(PretrainStage(), tiny(corpus, tmp_path / "a", block_size=64, max_positions=32))
    with pytest.raises(ValueError, match="already holds a run.*--resume.*--overwrite"):
        train(PretrainStage(), tiny(corpus, stage1))
    with pytest.raises(ValueError, match=r"different settings:\n  hidden_size: run has 32, now 48"):
        train(PretrainStage(), tiny(corpus, stage1, resume=True, hidden_size=48, max_steps=8))
    with pytest.raises(ValueError, match="contradict"):
        train(PretrainStage(), tiny(corpus, stage1, resume=True, overwrite=True))
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings 32"):
        train(BCStage(), BCConfig(data=[str(corpus / "train.txt")], model=str(stage1), out=str(tmp_path / "bc"),
                                  block_size=64, cache_dir=str(corpus / "cache"), progress=False))
    with pytest.raises(ValueError, match="not the stage-1 --model folder"):
        train(BCStage(), BCConfig(data=[str(corpus / "train.txt")], model=str(stage1), out=str(stage1)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(PretrainStage(), tiny(corpus, tmp_path / "b", data=[str(tmp_path / "missing.txt")]))
    # --overwrite starts again: the old curve is gone.
    out = tmp_path / "c"
    train(PretrainStage(), tiny(corpus, out, max_steps=2))
    train(PretrainStage(), tiny(corpus, out, max_steps=3, overwrite=True))
    assert [s for s, _ in curve(out)] == [1, 2, 3]


def test_ema_codebook_kmeans_init_and_dead_code_reset(corpus, tmp_path):
    out = tmp_path / "ema"
    # A threshold of 1.5x the even share marks many codes dead at every check: resets must happen.
    train(PretrainStage(), tiny(corpus, out, codebook="ema", dead_code_threshold=1.5, max_steps=6))
    resets = [r.get("codes_reset") for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert any(r for r in resets if r)
    model = BWAreaForCausalLM.from_pretrained(out)
    codes = model.action_codebook.embed.weight
    assert torch.isfinite(codes).all() and torch.cdist(codes, codes).add(torch.eye(64)).min() > 0  # 64 distinct


def test_kmeans_finds_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 4, generator=g) * 10
    x = (centres[:, None] + 0.1 * torch.randn(8, 50, 4, generator=g)).reshape(-1, 4)
    found, counts = kmeans(x, 8, seed=1)
    assert counts.tolist() == [50.0] * 8
    assert torch.cdist(centres, found).min(dim=1).values.max() < 0.1
    with pytest.raises(ValueError, match="at least 8 latents"):
        kmeans(x[:5], 8)


# ----- stage 2 ---------------------------------------------------------------------------------------------
def test_bc_trains_only_the_policy_and_writes_a_complete_model(corpus, stage1, tmp_path):
    out = tmp_path / "bc"
    train(BCStage(), BCConfig(data=[str(corpus / "train.txt")], model=str(stage1), out=str(out), max_steps=6,
                              batch_size=4, block_size=32, warmup_steps=2, log_every=1, save_every=3,
                              eval_blocks=4, eval_lm=False, cache_dir=str(corpus / "cache"), progress=False,
                              save_dtype="bfloat16"))
    before, after = load_file(stage1 / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after) and all(v.dtype == torch.bfloat16 for v in after.values())
    for key in before:
        same = torch.equal(before[key].to(torch.bfloat16), after[key])
        assert same == (not key.startswith("policy.")), key  # everything but the policy is frozen
    model = BWAreaForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16 and len(load_tokenizer(out)) == model.config.vocab_size
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["bc_accuracy"] <= 1 for r in records) and "bc_ce" in records[-1]
    ce = [r["bc_ce"] for r in records if r["split"] == "train"]
    assert ce[-1] < ce[0]


def test_bc_policy_init_from_world_and_a_deeper_policy(stage1):
    from bwarea.train.bc import init_policy_from_world
    model = BWAreaForCausalLM.from_pretrained(stage1)
    model.config.policy_layers = 3
    from bwarea.model import Policy
    model.policy = Policy(model.config)
    assert init_policy_from_world(model) == 2
    assert torch.equal(model.policy.embed_tokens.weight, model.world_model.embed_tokens.weight)
    assert torch.equal(model.policy.layers[1].mlp.down_proj.weight, model.world_model.layers[1].mlp.down_proj.weight)


# ----- baseline, evaluation, the CLI ----------------------------------------------------------------------
def test_baseline_llama_and_eval_json(corpus, stage1, tmp_path, capsys):
    base = tmp_path / "llama"
    assert main(["pretrain", "--baseline", "llama", "--data", str(corpus / "train.txt"), "--tokenizer",
                 str(corpus / "tok"), "--out", str(base), "--hidden-size", "32", "--layers", "2", "--heads", "2",
                 "--intermediate-size", "64", "--block-size", "32", "--batch-size", "4", "--max-steps", "4",
                 "--no-progress", "--cache-dir", str(corpus / "cache")]) == 0
    capsys.readouterr()
    from transformers import LlamaForCausalLM
    llama = LlamaForCausalLM.from_pretrained(base)
    assert llama.config.num_hidden_layers == 2 and llama.config.hidden_size == 32

    held_out = tmp_path / "held.txt"
    held_out.write_text(" ".join(WORDS[::-1]) * 8)
    assert main(["eval", str(base), "--data", str(held_out), "--json", "--cache-dir", str(tmp_path / "c"),
                 "--max-blocks", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "llama" and "id_ppl" not in result and result["lm_ppl"] > 1 and result["blocks"] == 1
    ids = torch.tensor(load_tokenizer(base)(held_out.read_text())["input_ids"][:32])[None]
    # The held-out text is packed as BOS text EOS: the first block is the first 32 tokens.
    assert result["lm_ppl"] == pytest.approx(math.exp(llama(ids, labels=ids).loss.item()), rel=1e-4)

    assert main(["eval", str(stage1), "--data", str(held_out), "--json", "--cache-dir", str(tmp_path / "c"),
                 "--max-blocks", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"id_ppl", "lm_ppl", "bc_accuracy", "codes_used", "code_perplexity"} <= set(result)
    model = BWAreaForCausalLM.from_pretrained(stage1)
    out = model.forward_inverse(ids, labels=ids)
    assert result["id_ppl"] == pytest.approx(math.exp(out.loss.item()), rel=1e-4)
    actions = out.action_index[:, :-1]
    assert result["codes_used"] == len(actions.unique())
    assert result["bc_accuracy"] == pytest.approx(
        (model.policy_logits(ids)[:, :-1].argmax(-1) == actions).float().mean().item())
    # Marginalising over actions is at least as good as the policy's odds of the inverse action times id.
    policy_nll = torch.nn.functional.cross_entropy(model.policy_logits(ids)[0, :-1], actions[0]).item()
    assert result["lm_ppl"] <= math.exp(policy_nll + out.loss.item()) * (1 + 1e-4)


def test_config_file_with_cli_overrides(corpus, tmp_path, capsys):
    config = tmp_path / "s1.yaml"
    config.write_text(f"data: {corpus / 'train.txt'}\ntokenizer: {corpus / 'tok'}\nhidden-size: 32\nlayers: 2\n"
                      f"heads: 2\nblock_size: 32\nbatch_size: 2\nmax_steps: 50\nprogress: false\n"
                      f"cache_dir: {corpus / 'cache'}\n")
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--max-steps", "2", "--out", str(out)]) == 0
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["max_steps"] == 2 and saved["hidden_size"] == 32 and saved["batch_size"] == 2
    config.write_text("hidden_size: 32\nno_such_setting: 1\n")
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "x")]) == 2
    assert "unknown settings ['no_such_setting']" in capsys.readouterr().err


def test_every_training_verb_has_help_with_examples(capsys):
    for verb in (["tokenizer", "train"], ["pretrain"], ["bc"], ["eval"]):
        with pytest.raises(SystemExit):
            main([*verb, "--help"])
        assert "examples:" in capsys.readouterr().out


# ----- training input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1"])
def test_grad_clip_must_be_a_finite_non_negative_number(corpus, tmp_path, capsys, value):
    args = ["pretrain", "--data", str(corpus / "train.txt"), "--tokenizer", str(corpus / "tok"), "--out",
            str(tmp_path / "run"), "--grad-clip", value]
    try:
        rc = main(args)
    except SystemExit as err:  # refused by the parser
        rc = err.code
    assert rc == 2 and "grad" in capsys.readouterr().err
    with pytest.raises(ValueError, match="grad_clip must be"):
        tiny(corpus, tmp_path / "run", grad_clip=float(value)).check()
    assert not (tmp_path / "run").exists()
    config = tmp_path / "s1.yaml"
    config.write_text(f"grad_clip: {'.nan' if value == 'nan' else value.replace('inf', '.inf')}\n")
    assert main([*args[:-2], "--config", str(config)]) == 2
    assert "grad_clip must be" in capsys.readouterr().err


def test_settings_of_the_wrong_type_are_named(corpus, tmp_path):
    with pytest.raises(ValueError, match="lr must be float, got 'abc'"):
        tiny(corpus, tmp_path, lr="abc").check()
    with pytest.raises(ValueError, match="max_steps must be int, got 2.5"):
        tiny(corpus, tmp_path, max_steps=2.5).check()


def test_divergence_before_any_update_does_not_blame_the_learning_rate(corpus, tmp_path, monkeypatch):
    real_forward = pretrain_module.WorldModelObjective.forward
    monkeypatch.setattr(pretrain_module.WorldModelObjective, "forward",
                        lambda self, ids, evaluation=False: {**real_forward(self, ids, evaluation),
                                                             "loss": torch.tensor(float("nan"), requires_grad=True)})
    with pytest.raises(TrainingDiverged, match="at step 1") as err:
        train(PretrainStage(), tiny(corpus, tmp_path / "run"))
    assert "learning rate is not the cause" in str(err.value) and "--lr" not in str(err.value)


def test_progress_bar_shows_the_nll_and_a_readable_header(corpus, tmp_path, capsys):
    train(PretrainStage(), tiny(corpus, tmp_path / "run", max_steps=2, progress=True))
    out, err = capsys.readouterr()
    assert "params; cpu, fp32" in out and "(no)" not in out
    assert "nll=" in err and "loss=" not in err


def test_bc_takes_the_block_size_from_the_stage1_model_and_checks_before_tokenising(corpus, stage1, tmp_path,
                                                                                    capsys, monkeypatch):
    common = ["bc", "--model", str(stage1), "--data", str(corpus / "train.txt"), "--batch-size", "2",
              "--max-steps", "1", "--no-progress", "--no-eval-lm", "--cache-dir", str(corpus / "cache")]
    assert main([*common, "--out", str(tmp_path / "bc")]) == 0  # stage 1 trained on 32-token blocks
    assert json.loads((tmp_path / "bc" / "training.json").read_text())["block_size"] == 32
    capsys.readouterr()
    from bwarea.train import loop

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised before checking the inputs")
    monkeypatch.setattr(loop, "pack", no_tokenising)
    assert main([*common, "--out", str(tmp_path / "bc2"), "--hidden-size", "48"]) == 2
    assert "hidden_size=48 but the model has 32" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "bc2"), "--block-size", "64"]) == 2
    assert "exceeds the model's max_position_embeddings 32" in capsys.readouterr().err
    assert not (tmp_path / "bc2").exists()


def test_training_metrics_are_strict_json(tmp_path):
    """A non-finite metric (say a validation loss over zero tokens) is written as null, never a bare NaN."""
    from bwarea.train.loop import MetricsLog
    log = MetricsLog(tmp_path, start_step=0, enabled=True)
    log.write(1, "val", {"nll": float("nan"), "ppl": float("inf"), "tokens": 0, "acc": 0.5})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    record = json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in metrics.jsonl"))
    assert record == {"step": 1, "split": "val", "nll": None, "ppl": None, "tokens": 0, "acc": 0.5}
