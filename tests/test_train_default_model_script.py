"""scripts/train_default_model.sh is resumable: a rerun skips what is done, continues an unfinished run from its
checkpoint, redoes only what a changed setting touches, and leaves alone a folder it did not start.

The sweep runs at a tiny size (a few steps of a 32-token block, a 300-token vocabulary, made-up text) on the
script's own code path; most of its time is the interpreter starting for each step.
"""

import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_default_model.sh"
TINY = dict(STEPS="4", BC_STEPS="4", BATCH="2", BLOCK="32", VOCAB="300", EVAL_BLOCKS="2", EVAL_MAX_BLOCKS="2",
            POSTERIOR_FRACTIONS="0 0.5", SAVE_EVERY="2", INSTALL="0", ACTION_TEMPERATURES="0.8 1",
            TEXT_NUM_PROMPTS="3", TEXT_ARGS="--k 2 --new-tokens 8 --samples 1 --bootstrap 50 --no-plot")
RUNS = ("s1-4", "llama-4", "bc-4-0", "bc-4-0.5")  # the run folders of the tiny sweep
WORDS = ("the lord king and of to my thy thou shall love night day sword heaven earth god man woman sea fire "
         "speak said unto them is was be not with").split()


def corpora(folder: Path) -> Path:
    """shakespeare.txt and kjv.txt of a few hundred made-up lines each (the script wants those two names)."""
    rng = random.Random(0)
    folder.mkdir()
    for name, lines in (("shakespeare.txt", 400), ("kjv.txt", 300)):
        text = "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + ".\n"
                       for _ in range(lines))
        (folder / name).write_text(text)
    return folder


def run_script(tmp_path: Path, script: Path = SCRIPT, **settings) -> subprocess.CompletedProcess:
    env = {**os.environ, **TINY, "CORPORA": str(tmp_path / "corpora"), "WORK": str(tmp_path / "work"),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PARALLEL": "0", **settings}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(["nice", "-n", "19", "bash", str(script)], env=env, capture_output=True, text=True,
                            timeout=600)
    result.log = result.stdout + result.stderr
    return result


def finished(result) -> None:
    assert result.returncode == 0, result.log[-3000:]


def checkpoint_times(work: Path) -> dict:
    """Every checkpoint and final weights file of every run folder -> its mtime (ns)."""
    files = [p for run in RUNS for p in (*(work / run).glob("checkpoints/step-*"),
                                         *(work / run).glob("checkpoints/step-*/*"), work / run / "model.safetensors")]
    return {str(p.relative_to(work)): p.stat().st_mtime_ns for p in files}


def started_steps(log: str) -> set[str]:
    """The steps a run started (not skipped): its "[Ns] NAME" and "[Ns] NAME: note" lines."""
    steps = set()
    for line in log.splitlines():
        if line.startswith("[") and "s] " in line and "skipped" not in line and "finished:" not in line:
            steps.add(line.split("] ", 1)[1].split(":", 1)[0])
    return steps


@pytest.mark.slow  # about 2.5 minutes on 2 busy cores: seven runs of the script, two of them whole sweeps
def test_rerun_skips_resumes_and_redoes_only_what_changed(tmp_path):
    corpora(tmp_path / "corpora")
    work = tmp_path / "work"

    # A folder the script did not start is never touched, not even with --overwrite: it stops, saying so.
    (work / "llama-4").mkdir(parents=True)
    (work / "llama-4" / "notes.txt").write_text("mine")
    refused = run_script(tmp_path, PARALLEL="1")
    assert refused.returncode == 2 and "llama-4 is not empty, and this script did not start it" in refused.log
    assert (work / "llama-4" / "notes.txt").read_text() == "mine"
    assert not (work / "s1-4").exists()  # checked before any run of the step started
    (work / "llama-4" / "notes.txt").unlink()
    (work / "llama-4").rmdir()

    # 1. The whole sweep (its runs side by side, as on a GPU).
    first = run_script(tmp_path, PARALLEL="1")
    finished(first)
    assert "split: done before" in first.log  # the refused start's finished steps were kept
    selection = (work / "selection.json").read_text()
    times = checkpoint_times(work)
    assert "bc-4-0.5/checkpoints/step-000002" in times and "bc-4-0.5/model.safetensors" in times
    for name in ("s1-4", "llama-4", "bc-4-0", "bc-4-0.5", "val-bc-4-0", "valtext-bc-4-0.5", "selection", "quality",
                 "text"):
        assert (work / "done" / name).is_file(), name
    # The final model's samples beside the shipped model's, judged by the baseline; the verdict joins the targets.
    text = json.loads((work / "text.json").read_text())
    assert text["judge"] == str(work / "llama") and len(text["samples"]) == 1 and "## Samples" in \
        (work / "text.md").read_text()
    assert text["setup"]["train_text"] == [str(work / "data" / "tv" / "train")]  # what the models trained on
    assert text["models"]["candidate"] == str(work / os.readlink(work / "final"))
    assert 0 <= text["settings"]["sampled"]["candidate"]["copied"] <= 1
    # Each candidate was tried at every action temperature, highest first; the final text at the chosen one.
    chosen = json.loads((work / "selection.json").read_text())
    for run in ("bc-4-0", "bc-4-0.5"):
        tried = json.loads((work / "logs" / f"valtext-{run}.json").read_text())["action_temperatures"]
        assert [row["action_temperature"] for row in tried] == [1.0, 0.8]
    assert chosen["action_temperature"] in (1.0, 0.8)
    assert text["action_temperatures"][0]["action_temperature"] == chosen["action_temperature"]
    targets = json.loads((work / "targets.json").read_text())
    assert targets["text not worse than the reference's (text.md)"] == text["verdict"]["not_worse"]
    assert not list(work.rglob("*.tmp")), "an atomic write left its temporary file"
    json.loads((work / "logs" / "val-llama-4.json").read_text())

    # 2. The same command again: nothing is retrained or re-evaluated, and the choice is the same.
    again = run_script(tmp_path)
    finished(again)
    assert started_steps(again.log) == set(), again.log
    assert "finished: 0 steps run" in again.log
    assert checkpoint_times(work) == times
    assert (work / "selection.json").read_text() == selection

    # 2b. The choice skips a candidate whose text on validation prompts is judged worse than the shipped model's
    #     (the lowest ratio of all when every one is), and a new choice redoes what follows it.
    def judged(verdicts: dict) -> dict:
        for run, not_worse in verdicts.items():
            path = work / "logs" / f"valtext-{run}.json"
            text = json.loads(path.read_text())
            text["verdict"]["not_worse"] = not_worse
            text["chosen_action_temperature"] = 0.8 if not_worse else None  # as the benchmark reports it
            path.write_text(json.dumps(text))
        (work / "done" / "selection").unlink()  # as after a code change: redo the choice
        result = run_script(tmp_path)
        finished(result)
        return json.loads((work / "selection.json").read_text()), result

    best = min(json.loads(selection)["candidates"], key=lambda r: r["val_ratio"])["run"]
    other = next(run for run in ("bc-4-0", "bc-4-0.5") if run != best)
    chose, redone = judged({best: False, other: True})
    assert chose["chosen"]["run"] == other and os.readlink(work / "final") == other, chose
    assert "not judged worse" in chose["rule"]
    assert {r["run"]: r["val_text_not_worse"] for r in chose["candidates"]} == {best: False, other: True}
    assert started_steps(redone.log) == {"selection", "eval-final", "quality", "text"}, redone.log
    text = json.loads((work / "text.json").read_text())
    assert text["models"]["candidate"] == str(work / other)
    # it ships at the temperature its validation text passed at, and the held-out text is sampled there
    assert chose["action_temperature"] == 0.8 == text["candidate_action_temperature"]
    assert {r["run"]: r["val_action_temperature"] for r in chose["candidates"]} == {best: None, other: 0.8}
    chose, redone = judged({best: False, other: False})
    assert chose["chosen"]["run"] == best and "no candidate's validation text passed" in chose["rule"]
    assert chose["action_temperature"] == 1.0  # none passed: the highest tried
    assert started_steps(redone.log) == {"selection", "eval-final", "quality", "text"}, redone.log
    assert json.loads((work / "text.json").read_text())["models"]["candidate"] == str(work / best)

    # 3. An interrupted bc run (its last checkpoint and final weights gone, no done marker) resumes from the
    #    checkpoint before, with the same command; what was done is kept, and what it fed is not redone.
    run = work / "bc-4-0.5"
    (run / "model.safetensors").unlink()
    for f in (run / "checkpoints" / "step-000004").iterdir():
        f.unlink()
    (run / "checkpoints" / "step-000004").rmdir()
    (work / "done" / "bc-4-0.5").unlink()
    resumed = run_script(tmp_path)
    finished(resumed)
    assert "bc-4-0.5: resuming an unfinished run from checkpoints/step-000002" in resumed.log
    assert "resumed" in (work / "logs" / "bc-4-0.5.log").read_text()  # bwarea's own word, from --resume
    assert started_steps(resumed.log) == {"bc-4-0.5"}, resumed.log
    assert (run / "model.safetensors").is_file() and (work / "done" / "bc-4-0.5").is_file()
    assert json.loads((run / "training.json").read_text())["steps_this_run"] == 2

    # 4. A changed setting reruns what depends on it, and only that: the bc runs (started again with
    #    --overwrite), their evaluations and what follows; stage 1 and the baseline are kept.
    times = checkpoint_times(work)
    changed = run_script(tmp_path, BC_STEPS="6", PARALLEL="1")
    finished(changed)
    assert started_steps(changed.log) == {"bc-4-0", "bc-4-0.5", "val-bc-4-0", "val-bc-4-0.5", "valtext-bc-4-0",
                                          "valtext-bc-4-0.5", "selection", "eval-final", "quality", "text"}, \
        changed.log
    assert "bc-4-0: its command or inputs changed since it was started: starting it again (--overwrite)" \
        in changed.log
    assert all(times[k] == checkpoint_times(work)[k] for k in times if k.startswith(("s1-4/", "llama-4/")))
    trained = json.loads((work / "bc-4-0" / "training.json").read_text())
    assert trained["steps"] == 6 and trained["steps_this_run"] == 6  # from scratch, not resumed from step 4

def test_a_second_copy_on_the_same_work_stops(tmp_path):
    """Two copies would train into the same folders: while one holds the lock, another stops at once."""
    corpora(tmp_path / "corpora")
    (tmp_path / "work").mkdir()
    with open(tmp_path / "work" / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_script(tmp_path)
    assert result.returncode == 2 and "another train_default_model.sh is running" in result.log
    assert not (tmp_path / "work" / "done").exists() or not any((tmp_path / "work" / "done").iterdir())


def test_save_every_must_be_a_positive_whole_number(tmp_path):
    corpora(tmp_path / "corpora")
    result = run_script(tmp_path, SAVE_EVERY="0")
    assert result.returncode == 2 and "SAVE_EVERY=0" in result.log


@pytest.mark.slow  # about a minute: one tiny sweep, then the install step a few times
def test_install_ships_a_model_whose_text_is_not_worse_and_else_only_when_forced(tmp_path):
    """In a copy of the repository (install writes into the package next to the script). The verdict of the text
    step (bench_default_text.py, tested on its own) decides: "worse" leaves the package alone and says why,
    INSTALL=force ships it anyway, "not worse" ships it. A bad INSTALL value is refused."""
    repo = tmp_path / "repo"
    for part in ("scripts", "benchmarks", "src"):
        shutil.copytree(ROOT / part, repo / part, ignore=shutil.ignore_patterns("__pycache__"))
    script = repo / "scripts" / "train_default_model.sh"
    corpora(tmp_path / "corpora")
    work, package = tmp_path / "work", repo / "src" / "bwarea" / "default_model"
    shipped = (package / "model.safetensors").read_bytes()
    trained = lambda: (work / "final" / "model.safetensors").read_bytes()  # noqa: E731

    def judged(not_worse: bool) -> None:
        """Set the text step's verdict (its record is unchanged, so a rerun keeps it)."""
        text = json.loads((work / "text.json").read_text())
        text["verdict"]["not_worse"] = not_worse
        (work / "text.json").write_text(json.dumps(text))

    finished(run_script(tmp_path, script=script))  # INSTALL=0: the sweep only
    assert (package / "model.safetensors").read_bytes() == shipped
    judged(False)
    kept = run_script(tmp_path, script=script, INSTALL="1")
    finished(kept)
    assert "install: not done: the final model's text is judged worse" in kept.log
    assert (package / "model.safetensors").read_bytes() == shipped and not (work / "done" / "install").exists()

    finished(run_script(tmp_path, script=script, INSTALL="force"))
    assert (package / "model.safetensors").read_bytes() == trained() != shipped
    installed = json.loads((package / "config.json").read_text())
    assert installed["vocab_size"] == 300
    # the chosen action temperature goes into the shipped config (generate samples there by default)
    assert installed["action_temperature"] == json.loads((work / "selection.json").read_text())["action_temperature"]
    assert (package / "eval.json").read_text() == (work / "eval_bwarea.json").read_text()
    assert json.loads((package / "tokenizer_config.json").read_text())["padding_side"] == "left"

    (package / "model.safetensors").write_bytes(shipped)
    (work / "done" / "install").unlink()
    judged(True)
    finished(run_script(tmp_path, script=script, INSTALL="1"))
    assert (package / "model.safetensors").read_bytes() == trained()

    bad = run_script(tmp_path, script=script, INSTALL="yes")
    assert bad.returncode == 2 and "INSTALL=yes: give 1" in bad.log
    for temperatures in ("1 0", "1 hot", " "):
        bad = run_script(tmp_path, script=script, ACTION_TEMPERATURES=temperatures)
        assert bad.returncode == 2 and "ACTION_TEMPERATURES" in bad.log, temperatures
