"""bwarea never deletes or overwrites what it did not write: run folders, --overwrite, failed starts, moved
runs, damaged checkpoints, `bwarea convert`, and the modes of the files it writes.

Each case puts a folder of user files in the way and checks, by hash, that every one comes out byte-identical.
"""

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from test_training import tiny  # the same tiny pretraining settings

from bwarea.cli import main
from bwarea.tokenizer_train import train_tokenizer
from bwarea.train import PretrainStage, train
from bwarea.train.loop import RUN_MARKER

WORDS = ("the king said unto the queen that the people of the city went up to the house of the lord and "
         "spoke of war and peace and of the sea").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (12,), generator=g)) + "."
             for _ in range(300)]
    (root / "train.txt").write_text("\n".join(lines))
    (root / "empty.txt").write_text("")
    train_tokenizer([root / "train.txt"], 300, root / "tok")
    return root


def cli_args(corpus, out, *extra) -> list[str]:
    return ["pretrain", "--data", str(corpus / "train.txt"), "--tokenizer", str(corpus / "tok"), "--out", str(out),
            "--hidden-size", "32", "--layers", "2", "--heads", "2", "--intermediate-size", "64", "--block-size",
            "32", "--batch-size", "2", "--max-steps", "2", "--save-every", "1", "--no-progress", "--cache-dir",
            str(corpus / "cache"), *map(str, extra)]


def snapshot(folder: Path) -> dict:
    """Every file and folder under ``folder`` -> its sha256 (folders: "dir"), and the mode of each file."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        out[key] = "dir" if p.is_dir() else (hashlib.sha256(p.read_bytes()).hexdigest(), stat.S_IMODE(p.stat().st_mode))
    return out


def user_files(folder: Path) -> Path:
    """A folder as a user might have it: a model of their own, logs, weights in checkpoints/, TensorBoard runs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "mine"}')
    (folder / "model.safetensors").write_bytes(os.urandom(256))
    (folder / "tokenizer.json").write_text('{"mine": true}')
    (folder / "training.json").write_text('{"notes": "my own"}')
    (folder / "metrics.jsonl").write_text('{"step": 1, "mine": 1}\n' * 5)
    (folder / "checkpoints").mkdir(exist_ok=True)
    (folder / "checkpoints" / "my_weights.pt").write_bytes(os.urandom(128))
    (folder / "tensorboard").mkdir(exist_ok=True)
    (folder / "tensorboard" / "events.out.tfevents.123.mine").write_bytes(os.urandom(64))
    return folder


# ----- 1. an existing folder that is not a run -------------------------------------------------------------
@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]])
def test_a_folder_that_is_not_a_run_is_refused_untouched(corpus, tmp_path, capsys, flags):
    folder = user_files(tmp_path / "mine")
    before = snapshot(folder)
    assert main(cli_args(corpus, folder, *flags)) == 2
    err = capsys.readouterr().err
    assert "no bwarea run" in err and "give another --out" in err and len(err.strip().splitlines()) == 1
    assert snapshot(folder) == before
    # An empty existing folder is fine: it becomes the run.
    (tmp_path / "empty").mkdir()
    assert main(cli_args(corpus, tmp_path / "empty")) == 0
    assert (tmp_path / "empty" / RUN_MARKER).is_file() and (tmp_path / "empty" / "model.safetensors").is_file()


def test_out_that_is_a_file_or_not_writable_gives_one_line(corpus, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(cli_args(corpus, tmp_path / "file")) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        assert main(cli_args(corpus, locked / "run")) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


# ----- 2. --overwrite removes only what the run wrote, after every input is checked ---------------------------
def test_overwrite_removes_only_what_the_run_wrote(corpus, tmp_path):
    out = tmp_path / "run"
    train(PretrainStage(), tiny(corpus, out, max_steps=4))
    marker = json.loads((out / RUN_MARKER).read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json", "training.json"} <= set(marker["written"])
    # The user adds their own files to the run folder, some beside the run's own.
    (out / "notes.md").write_text("my notes")
    (out / "checkpoints" / "my_weights.pt").write_bytes(os.urandom(128))
    (out / "tensorboard" / "my_plot.png").write_bytes(os.urandom(64))
    (out / "analysis").mkdir()
    (out / "analysis" / "step-000002").write_text("a file named like a checkpoint, in the user's own folder")
    mine = {k: v for k, v in snapshot(out).items() if k.startswith(("notes", "analysis"))
            or k in ("checkpoints/my_weights.pt", "tensorboard/my_plot.png")}

    # Bad input: the old run is not touched at all.
    before = snapshot(out)
    with pytest.raises(ValueError, match="is empty"):
        train(PretrainStage(), tiny(corpus, out, overwrite=True, data=[str(corpus / "empty.txt")]))
    with pytest.raises(ValueError, match="hidden_size must be >= 1"):
        train(PretrainStage(), tiny(corpus, out, overwrite=True, hidden_size=0))
    with pytest.raises(FileNotFoundError, match="tokenizer folder"):
        train(PretrainStage(), tiny(corpus, out, overwrite=True, tokenizer=str(tmp_path / "nope")))
    assert snapshot(out) == before

    train(PretrainStage(), tiny(corpus, out, overwrite=True, max_steps=2))
    after = snapshot(out)
    assert {k: after.get(k) for k in mine} == mine  # every user file byte-identical
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["my_weights.pt", "step-000002"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"] == [1, 2]


def test_a_user_file_where_the_run_writes_its_model_is_refused_before_training(corpus, tmp_path):
    out = tmp_path / "run"
    train(PretrainStage(), tiny(corpus, out, max_steps=2))
    (out / "generation_config.json").write_text('{"mine": 1}')  # not a file this stage wrote
    before = snapshot(out)
    with pytest.raises(ValueError, match="generation_config.json, which this run did not write"):
        train(PretrainStage(), tiny(corpus, out, max_steps=2, overwrite=True))
    assert snapshot(out) == before


# ----- 3. a failed start leaves nothing behind ----------------------------------------------------------------
def test_a_failed_start_leaves_nothing_and_the_rerun_is_not_refused(corpus, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="is empty"):
        train(PretrainStage(), tiny(corpus, out, data=[str(corpus / "empty.txt")]))
    with pytest.raises(ValueError, match="at least 64 latents"):  # fails after the model is built
        train(PretrainStage(), tiny(corpus, out, kmeans_batches=1, batch_size=1, block_size=16))
    with pytest.raises(ValueError, match="cannot load the tokenizer"):
        (tmp_path / "badtok").mkdir()
        (tmp_path / "badtok" / "tokenizer.json").write_text("{not json")
        train(PretrainStage(), tiny(corpus, out, tokenizer=str(tmp_path / "badtok")))
    assert not out.exists()
    train(PretrainStage(), tiny(corpus, out, max_steps=2))  # no --overwrite needed
    assert (out / "model.safetensors").is_file()


# ----- 4. a moved run folder resumes -----------------------------------------------------------------------------
def curve(out: Path) -> list:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]


class Killed(Exception):
    pass


def kill_at(n):
    def on_step(step, metrics):
        if step == n:
            raise Killed
    return on_step


@pytest.fixture(scope="module")
def whole(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    train(PretrainStage(), tiny(corpus, out))
    return out


def test_a_moved_run_folder_resumes_to_the_same_curve(corpus, whole, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Killed):
        train(PretrainStage(), tiny(corpus, "run"), on_step=kill_at(5))  # a relative --out
    shutil.move(tmp_path / "run", tmp_path / "elsewhere" / "moved")
    train(PretrainStage(), tiny(corpus, tmp_path / "elsewhere" / "moved", resume=True))
    assert curve(tmp_path / "elsewhere" / "moved") == curve(whole)


def test_a_resume_with_other_settings_never_advises_overwrite(corpus, whole, tmp_path):
    with pytest.raises(ValueError, match="different settings") as err:
        train(PretrainStage(), tiny(corpus, whole, resume=True, lr=1e-3))
    assert "give another --out" in str(err.value) and "pass --overwrite" not in str(err.value)


# ----- 5. a damaged newest checkpoint: the one before it -----------------------------------------------------
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(corpus, whole, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(PretrainStage(), tiny(corpus, out), on_step=kill_at(5))
    newest = out / "checkpoints" / "step-000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a copy cut short, a full disk
    capsys.readouterr()
    train(PretrainStage(), tiny(corpus, out, resume=True))
    err = capsys.readouterr().err
    assert "step-000004 is unusable: model.safetensors is truncated" in err and "resuming from" in err
    assert "step-000002" in err and "Traceback" not in err
    assert curve(out) == curve(whole)


def test_no_intact_checkpoint_is_a_clear_error(corpus, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(PretrainStage(), tiny(corpus, out), on_step=kill_at(5))
    for folder in (out / "checkpoints").iterdir():
        (folder / "optimizer.bin").write_bytes(b"PK\x03\x04 cut short")
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"no intact checkpoint \(step-000004 is unusable: optimizer.bin is "
                                         r"truncated or damaged; step-000002"):
        train(PretrainStage(), tiny(corpus, out, resume=True))
    assert snapshot(out) == before


# ----- 6. bwarea convert ------------------------------------------------------------------------------------
def test_convert_never_overwrites_a_users_file_without_force(released_dir, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "tokenizer.json").write_text('{"mine": true}')
    (dst / "notes.md").write_text("my notes")
    before = snapshot(dst)
    assert main(["convert", str(released_dir), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "already holds tokenizer.json" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert snapshot(dst) == before

    (tmp_path / "a-file").write_text("mine")
    assert main(["convert", str(released_dir), str(tmp_path / "a-file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "mine"

    assert main(["convert", str(released_dir), str(dst), "--force"]) == 0
    assert (dst / "notes.md").read_text() == "my notes"  # only the files convert writes are replaced
    assert (dst / "tokenizer.json").read_bytes() == (released_dir / "tokenizer.json").read_bytes()


# ----- 7. written files follow the umask ----------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(corpus, tiny_model, tmp_path, umask):
    old = os.umask(umask)
    try:
        tiny_model.save_pretrained(tmp_path / "model")
        train(PretrainStage(), tiny(corpus, tmp_path / "run", max_steps=1, cache_dir=str(tmp_path / "cache")))
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for path in (tmp_path / "model" / "config.json", tmp_path / "model" / "model.safetensors",
                 tmp_path / "run" / "model.safetensors", tmp_path / "run" / "config.json",
                 tmp_path / "run" / RUN_MARKER, tmp_path / "run" / "run_config.json",
                 *(tmp_path / "cache").iterdir()):
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_a_run_from_before_the_marker_still_resumes_after_a_move(corpus, whole, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(PretrainStage(), tiny(corpus, out), on_step=kill_at(5))
    # As older bwarea left it: no marker, and the absolute --out path among the settings.
    (out / RUN_MARKER).unlink()
    saved = json.loads((out / "run_config.json").read_text())
    (out / "run_config.json").write_text(json.dumps({**saved, "out": "/where/it/was/run"}))
    moved = tmp_path / "moved"
    out.rename(moved)
    train(PretrainStage(), tiny(corpus, moved, resume=True))
    assert curve(moved) == curve(whole) and (moved / RUN_MARKER).is_file()
