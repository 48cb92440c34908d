"""The engine that training stages and RL share: one accelerator setup, run-folder safety for RL runs as for
training runs, atomic checkpoints with pruning and fall-back, metric truncation on resume."""

import json

import pytest
import torch

from bwarea import load_tokenizer
from bwarea.rl import RLConfig, RLTrainer, Reward, RewardSet
from bwarea.train import engine
from bwarea.train.engine import RUN_MARKER, Engine, make_accelerator

PROMPTS = ["The king said", "O", "and then the", "I am a"]


@pytest.fixture(scope="module")
def tokenizer(released_dir):
    return load_tokenizer(released_dir)


def _rl(model, tokenizer, out, **overrides):
    def short(prompts, completions, completion_ids, **kwargs):
        return [-float(len(ids)) for ids in completion_ids]
    settings = dict(algo="reinforce", steps=2, batch_size=2, group_size=2, max_new_tokens=4, lr=3e-3, save_every=1,
                    keep_checkpoints=1, tensorboard=False)
    return RLTrainer(model, tokenizer, RLConfig(**{**settings, **overrides}), out,
                     rewards=RewardSet([Reward("short", short)]), prompts=[{"prompt": p} for p in PROMPTS])


def test_rl_run_folders_get_the_marker_and_overwrite_safety(tiny_model, tokenizer, tmp_path):
    out = tmp_path / "run"
    _rl(tiny_model, tokenizer, out).train()
    marker = json.loads((out / RUN_MARKER).read_text())
    assert marker["stage"] == "rl" and {"model.safetensors", "config.json", "tokenizer.json"} <= set(marker["written"])
    assert json.loads((out / "run_config.json").read_text())["algo"] == "reinforce"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]  # pruned to keep_checkpoints
    assert (out / "checkpoints" / "step-000002" / "trainer_state.json").is_file()
    # A user's file in the run folder survives --overwrite; everything the run wrote is replaced.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds a run"):
        _rl(tiny_model, tokenizer, out).train()
    _rl(tiny_model, tokenizer, out, steps=1).train(overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    # A folder of someone else's files is left alone, --overwrite or not.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "data.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="no bwarea run"):
            _rl(tiny_model, tokenizer, theirs).train(overwrite=overwrite)
    assert [p.name for p in theirs.iterdir()] == ["data.txt"]
    with pytest.raises(ValueError, match="contradict"):
        _rl(tiny_model, tokenizer, out).train(resume=True, overwrite=True)


def test_rl_resume_refuses_changed_settings_and_falls_back_over_a_damaged_checkpoint(tiny_model, tokenizer, tmp_path):
    import copy
    start = copy.deepcopy(tiny_model)
    out = tmp_path / "run"
    _rl(copy.deepcopy(start), tokenizer, out, keep_checkpoints=2).train()
    with pytest.raises(ValueError, match="cannot resume .* with different settings:\n  lr: run has 0.003, now 0.01"):
        _rl(copy.deepcopy(start), tokenizer, out, steps=3, lr=1e-2).train(resume=True)
    (out / "checkpoints" / "step-000002" / "trainable.safetensors").write_bytes(b"cut short")
    resumed = _rl(copy.deepcopy(start), tokenizer, out, steps=3, keep_checkpoints=2)
    history = resumed.train(resume=True)  # steps 2 and 3 again, from step 1's checkpoint
    assert [m["step"] for m in history] == [2, 3]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_one_accelerator_setup_and_engine_checks_before_writing(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    accelerator = make_accelerator("auto")
    assert accelerator.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert accelerator.mixed_precision in ("no", "bf16")
    config = RLConfig().resolved()
    out = tmp_path / "new" / "run"
    e = Engine("rl", out, config, accelerator, resume=False, overwrite=False, resumable=set(), final_names=set())
    assert not out.exists()  # checking writes nothing
    e.start()
    assert json.loads((out / RUN_MARKER).read_text()) == {"bwarea_run": 1, "stage": "rl", "written": []}
    # Checkpoints land whole: the temporary folder is renamed once trainer_state.json is in it; old ones pruned.
    for step in (1, 2, 3):
        e.save_checkpoint(step, 2, lambda folder: (folder / "w.safetensors").write_bytes(b"x"))
    assert [p.name for p in engine.checkpoint_folders(out)] == ["step-000003", "step-000002"]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_rl_takes_settings_from_a_config_file_and_flags_win(tiny_model_dir, tmp_path, capsys):
    from bwarea.cli import main

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    (tmp_path / "rl.yaml").write_text("algo: rloo\nsteps: 3\nbatch-size: 2\ngroup_size: 2\nmax_new_tokens: 4\n"
                                      "tensorboard: false\nlr: 0.003\n")
    common = ["rl", "--model", tiny_model_dir, "--prompts", tmp_path / "prompts.txt", "--task", "length",
              "--config", tmp_path / "rl.yaml"]
    assert main([*map(str, common), "--steps", "1", "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert (saved["algo"], saved["batch_size"], saved["group_size"], saved["lr"]) == ("rloo", 2, 2, 0.003)
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 1  # --steps 1 beat the file's 3
    assert not (tmp_path / "out" / "tensorboard").exists()
    capsys.readouterr()
    (tmp_path / "bad.yaml").write_text("algo: rloo\nlearning_rate: 0.1\n")
    assert main(["rl", "--task", "length", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "unknown settings ['learning_rate']" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("kl_coef: .nan\n")
    assert main(["rl", "--task", "length", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "x")]) == 2
    assert "kl_coef must be >= 0, a finite number; got nan" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
