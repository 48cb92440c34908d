"""benchmarks/bench_default_text.py: the samples of two models judged side by side. The shipped model against
itself must come out equal, and against a copy with damaged weights it must come out worse."""

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bwarea import default_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_default_text  # noqa: E402
from outputs import output  # noqa: E402

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def test_repetition_counts_word_ngrams_seen_earlier_in_the_same_text():
    assert bench_default_text.repetition("a b c d e f".split()) == 0.0
    # 4-grams: abcd bcda cdab dabc abcd -> the last one repeats the first
    assert bench_default_text.repetition("a b c d a b c".split() + ["d"]) == pytest.approx(1 / 5)
    assert bench_default_text.repetition("a b c".split()) == 0.0  # no 4-gram at all


def test_copied_is_the_share_of_word_6grams_found_in_the_training_text(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.txt").write_text("one two three four five six seven\n")
    (tmp_path / "train" / "notes.md").write_text("eight nine ten eleven twelve thirteen\n")  # not a .txt: unread
    grams = bench_default_text.training_ngrams([tmp_path / "train"])
    copied = "one two three four five six seven".split()  # both of its 6-grams are in the text
    assert bench_default_text.copied([copied], grams) == 1.0
    assert bench_default_text.copied(["zero one two three four five six".split()], grams) == pytest.approx(1 / 2)
    assert bench_default_text.copied(["eight nine ten eleven twelve thirteen".split()], grams) == 0.0
    assert bench_default_text.copied([["too", "short"]], grams) == 0.0
    with pytest.raises(SystemExit, match="no such file or folder"):
        bench_default_text.training_ngrams([tmp_path / "not-there"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .txt files there"):
        bench_default_text.training_ngrams([tmp_path / "empty"])


def test_the_interval_leaves_out_resamples_with_nothing_to_score():
    """A prompt whose continuation is empty (the model ended at once) has no judge tokens; a resample made only of
    such prompts is left out, not allowed to make the interval nan. A candidate that wrote nothing at all is worse."""
    cand = np.array([[0.0, 0], [20.0, 10], [30.0, 10]])  # (summed NLL, tokens) per prompt
    ref = np.array([[10.0, 5], [0.0, 0], [20.0, 10]])
    low, high = bench_default_text.bootstrap_ratio(cand, ref, 500, 0)
    assert np.isfinite([low, high]).all() and low <= high
    assert bench_default_text.bootstrap_ratio(np.zeros((3, 2)), ref, 500, 0) == (math.inf, math.inf)


def run(tmp_path, candidate, name, *extra):
    out = tmp_path / name
    plot = [] if HAS_MATPLOTLIB else ["--no-plot"]
    model = str(default_model.path())
    assert bench_default_text.main(["--candidate", str(candidate), "--judge", model, "--num-prompts", "4",
                                    "--k", "2", "--new-tokens", "12", "--samples", "2", "--bootstrap", "200",
                                    "--train-text", str(default_model.path() / "heldout.txt"),
                                    "--out", str(out), "--no-progress", *plot, *extra]) == 0
    assert output(out, ".png").is_file() == HAS_MATPLOTLIB
    assert "## Samples" in output(out, ".md").read_text()
    return json.loads(output(out, ".json").read_text())


@pytest.mark.slow
def test_the_same_model_is_not_worse_and_a_damaged_one_is(tmp_path):
    same = run(tmp_path, default_model.path(), "same-0.5")  # a dot in the name: same-0.5.json, not same-0.json
    assert not (tmp_path / "same-0.json").exists()
    for setting in ("sampled", "greedy"):
        rows = same["settings"][setting]
        assert rows["ratio"] == pytest.approx(1.0) and rows["ratio_interval"] == pytest.approx([1.0, 1.0])
        assert rows["candidate"] == rows["reference"]
    assert same["verdict"]["not_worse"] is True
    assert 0 <= same["settings"]["sampled"]["candidate"]["copied"] <= 1
    assert len(same["samples"]) == 2 and all(s["candidate"] == s["reference"] for s in same["samples"])
    assert len(same["texts"]["candidate/sampled"]) == 4 and len(same["texts"]["candidate/sampled"][0]) == 2

    # Noise on every weight: the text it writes is judged far less likely, and the verdict says so.
    damaged = tmp_path / "damaged"
    shutil.copytree(default_model.path(), damaged)
    generator = torch.Generator().manual_seed(0)
    tensors = {name: (t.float() + 0.7 * t.float().std() * torch.randn(t.shape, generator=generator)).to(t.dtype)
               if t.is_floating_point() and t.numel() > 1 else t
               for name, t in load_file(damaged / "model.safetensors").items()}
    save_file(tensors, damaged / "model.safetensors", metadata={"format": "pt"})
    worse = run(tmp_path, damaged, "worse")
    assert worse["settings"]["sampled"]["ratio_interval"][0] > 1
    assert worse["verdict"]["not_worse"] is False
    assert worse["verdict"]["checks"]["sampled"]["judge_ppl_not_significantly_higher"] is False


@pytest.mark.slow
def test_action_temperatures_name_the_highest_that_passes_and_the_config_one_is_used(tmp_path):
    """--action-temperatures writes the candidate's sampled text at each T and names the highest at which it is
    not worse; without it the candidate samples at its config.json's action_temperature, as `bwarea generate`."""
    own_t = json.loads((default_model.path() / "config.json").read_text()).get("action_temperature", 1.0)
    assert own_t > 0.6
    tried = run(tmp_path, default_model.path(), "tried", "--action-temperatures", "0.6", str(own_t))
    assert [row["action_temperature"] for row in tried["action_temperatures"]] == [own_t, 0.6]  # highest first
    at_own = tried["action_temperatures"][0]
    # the shipped model against itself, both at its own temperature: the same text, ratio 1
    assert at_own["not_worse"] and at_own["sampled"]["ratio"] == pytest.approx(1.0)
    assert tried["chosen_action_temperature"] == own_t == tried["candidate_action_temperature"]
    assert tried["models_action_temperature"] == {"reference": own_t, "candidate": own_t}
    assert f"chosen action temperature: **{own_t:g}**" in output(tmp_path / "tried", ".md").read_text()
    with pytest.raises(SystemExit):
        run(tmp_path, default_model.path(), "bad", "--action-temperatures", "0.6", "0")

    cool = tmp_path / "cool"
    shutil.copytree(default_model.path(), cool)
    config = json.loads((cool / "config.json").read_text())
    (cool / "config.json").write_text(json.dumps({**config, "action_temperature": 0.6}))
    own = run(tmp_path, cool, "own")
    forced = run(tmp_path, default_model.path(), "forced", "--action-temperatures", "0.6")
    assert own["models_action_temperature"]["candidate"] == 0.6 and own["action_temperatures"] is None
    assert own["texts"]["candidate/sampled"] == forced["texts"]["candidate/sampled"]
    assert own["texts"]["candidate/sampled"] != tried["texts"]["candidate/sampled"]  # the text at 1 differs
    assert forced["chosen_action_temperature"] in (0.6, None)
    assert forced["verdict"]["not_worse"] == (forced["chosen_action_temperature"] == 0.6)
