"""The paper-claim benchmarks at a toy scale: dirty data (corruption, training, JSON) and diversity (sampling,
diversity measures, the Llama baseline, JSON), each through its --quick mode end to end."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_dirty_data  # noqa: E402
import bench_diversity  # noqa: E402

WORDS = "the king said to his lord that all men shall go forth and the queen did weep for her son".split()
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def corpus_lines(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for n in range(count):
        if n % 7 == 0:
            lines.append("\n")  # blank lines are never corrupted
        elif n % 5 == 0:
            lines.append("KING.\n")  # one word: cannot be shuffled
        else:
            lines.append("  " + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 12))) + ".\n")
    return lines


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5])
def test_corruption_hits_the_asked_share_of_lines_with_kinds_mixed_equally(rate):
    lines = corpus_lines(600)
    other = ["In the beginning God created the heaven and the earth."] * 10
    out, record = bench_dirty_data.corrupt_lines(lines, rate, other, seed=3)
    eligible = sum(1 for line in lines if line.strip())
    assert record["eligible_lines"] == eligible
    assert record["corrupted_lines"] == round(rate * eligible) == record["changed_lines"]
    assert record["rate_actual"] == pytest.approx(rate, abs=1 / eligible)
    assert sum(a != b for a, b in zip(lines, out)) == record["corrupted_lines"]
    kinds = record["kinds"]
    assert sum(kinds.values()) == record["corrupted_lines"] and max(kinds.values()) - min(kinds.values()) <= 1
    assert all(a == b for a, b in zip(lines, out) if not a.strip())  # blank lines stay
    assert all(b.endswith("\n") for b in out)
    for example in record["examples"]["shuffle"]:  # a shuffle keeps the words, not their order
        assert sorted(example["clean"].split()) == sorted(example["corrupted"].split())
        assert example["clean"] != example["corrupted"]


def test_corruption_rejects_a_rate_outside_0_1():
    with pytest.raises(ValueError, match="noise rate must lie in"):
        bench_dirty_data.corrupt_lines(corpus_lines(10), 1.0, [], seed=0)


def test_diversity_measures():
    a, b = "the king said to his lord".split(), "a queen did weep for her son".split()
    assert bench_diversity.bleu(a, [a]) == pytest.approx(1.0)
    assert bench_diversity.bleu(a, [b]) == 0.0  # no shared word
    assert bench_diversity.self_bleu([a, a, a]) == pytest.approx(1.0)
    assert bench_diversity.self_bleu([a, b]) == 0.0
    assert bench_diversity.distinct_n([a, a], 2) == pytest.approx(0.5)
    assert bench_diversity.distinct_n([a, b], 2) == 1.0
    with pytest.raises(ValueError, match="at least two"):
        bench_diversity.self_bleu([a])


@pytest.fixture()
def files(tmp_path) -> dict:
    corpus, other, prompts = tmp_path / "corpus.txt", tmp_path / "other.txt", tmp_path / "prompts.txt"
    corpus.write_text("".join(corpus_lines(1200)))
    other.write_text("And God said, Let there be light: and there was light.\n" * 20)
    prompts.write_text("the king said to his lord\nall men shall go forth now\nthe queen did weep for her son\n")
    return {"corpus": corpus, "other": other, "prompts": prompts, "work": tmp_path / "work"}


def test_both_benchmarks_run_end_to_end_in_quick_mode(files, tmp_path, capsys):
    plot = [] if HAS_MATPLOTLIB else ["--no-plot"]
    dirty = tmp_path / "dirty"
    assert bench_dirty_data.main(["--quick", "--data", str(files["corpus"]), "--other", str(files["other"]),
                                  "--work", str(files["work"]), "--out", str(dirty), "--no-progress", *plot]) == 0
    result = json.loads(dirty.with_suffix(".json").read_text())
    assert result["complete"] and [r["rate"] for r in result["rows"]] == [0.0, 0.2, 0.5]
    for row in result["rows"]:
        c = row["corruption"]
        assert c["corrupted_lines"] == round(row["rate"] * c["eligible_lines"]) == c["changed_lines"]
        assert row["bwarea"]["lm_ppl"] > 1 and row["llama"]["ppl"] > 1
        assert row["lm_ppl_ratio"] == pytest.approx(row["bwarea"]["lm_ppl"] / row["llama"]["ppl"])
    assert set(result["corruption_kinds"]) == {"random", "shuffle", "other"}
    assert result["verdict"]["holds"] in (True, False) and len(result["verdict"]["growth"]) == 2
    assert dirty.with_suffix(".png").is_file() == HAS_MATPLOTLIB
    # The second run reuses the finished runs (and keeps their numbers).
    assert bench_dirty_data.main(["--quick", "--data", str(files["corpus"]), "--other", str(files["other"]),
                                  "--work", str(files["work"]), "--out", str(dirty), "--no-progress", "--no-plot",
                                  "--rates", "0", "--reuse"]) == 0
    again = json.loads(dirty.with_suffix(".json").read_text())["rows"][0]
    assert again["bwarea"]["lm_ppl"] == pytest.approx(result["rows"][0]["bwarea"]["lm_ppl"])

    # Diversity with the clean run's tiny BWArea; its Llama baseline is trained on first use.
    div, baseline = tmp_path / "diversity", tmp_path / "llama"
    assert bench_diversity.main(["--quick", "--model", str(files["work"] / "noise-00" / "bc"), "--baseline",
                                 str(baseline), "--train-data", str(files["corpus"]), "--prompts",
                                 str(files["prompts"]), "--work", str(tmp_path / "div-work"), "--device", "cpu",
                                 "--out", str(div), "--no-progress", *plot]) == 0
    result = json.loads(div.with_suffix(".json").read_text())
    assert (baseline / "model.safetensors").is_file()
    for mode in ("action", "token"):
        temps = [p["temperature"] for p in result["curves"][mode]]
        assert temps == [0.0, 1.0, 2.0]
        for point in result["curves"][mode]:
            assert 0 <= point["distinct_2"] <= 1 and 0 <= point["self_bleu"] <= 1
            assert point["llama_ppl"] > 1 and point["bwarea_ppl"] > 1 and point["tokens"] == 3 * 3 * 8
    # Both curves start at the same all-greedy point, whose k continuations are identical.
    greedy = [result["curves"][m][0] for m in ("action", "token")]
    assert greedy[0]["self_bleu"] == pytest.approx(1.0) and greedy[0]["llama_ppl"] == greedy[1]["llama_ppl"]
    assert result["dominance"]["action_sampling_dominates"] in (True, False, None)
    assert len(result["setup"]["prompts"]) == 3
    assert div.with_suffix(".png").is_file() == HAS_MATPLOTLIB
    # --reuse takes every setting from the earlier JSON: nothing is sampled again, the numbers stay.
    assert bench_diversity.main(["--quick", "--model", str(files["work"] / "noise-00" / "bc"), "--baseline",
                                 str(baseline), "--prompts", str(files["prompts"]), "--device", "cpu",
                                 "--out", str(div), "--no-progress", "--no-plot", "--reuse"]) == 0
    assert "--reuse: 5 settings from" in capsys.readouterr().out  # 3 + 3, the greedy point shared
    assert json.loads(div.with_suffix(".json").read_text())["curves"] == result["curves"]
    # A second seed: seed 0 is reused, seed 1 sampled; the curves become means with a spread across seeds.
    assert bench_diversity.main(["--quick", "--model", str(files["work"] / "noise-00" / "bc"), "--baseline",
                                 str(baseline), "--prompts", str(files["prompts"]), "--device", "cpu",
                                 "--out", str(div), "--no-progress", "--no-plot", "--reuse", "--seeds", "0", "1"]) == 0
    assert "--reuse: 5 settings from" in capsys.readouterr().out
    both = json.loads(div.with_suffix(".json").read_text())
    assert both["per_seed"]["0"] == result["per_seed"]["0"] and set(both["per_seed"]) == {"0", "1"}
    assert set(both["dominance"]["per_seed"]) == {"0", "1"}
    for mode in ("action", "token"):
        for i, point in enumerate(both["curves"][mode]):
            seeds = [both["per_seed"][s][mode][i] for s in ("0", "1")]
            assert point["seeds"] == 2 and point["tokens"] == sum(p["tokens"] for p in seeds)
            d2 = [p["distinct_2"] for p in seeds]
            assert point["distinct_2"] == pytest.approx(sum(d2) / 2)
            assert point["distinct_2_sd"] == pytest.approx(abs(d2[0] - d2[1]) / 2 ** 0.5)
            ppl = sorted(p["llama_ppl"] for p in seeds)  # pooled over equal token counts: the geometric mean
            assert point["llama_ppl"] == pytest.approx((ppl[0] * ppl[1]) ** 0.5)
    # The greedy point does not depend on the seed.
    assert both["curves"]["action"][0]["self_bleu_sd"] == pytest.approx(0.0)


@pytest.mark.parametrize("argv, message", [
    (["--rates", "0", "1.0"], "--rates must lie in"),
    (["--rates", "0.2", "0.2"], "repeated rate"),
    (["--data", "/nonexistent.txt"], "is not a file"),
])
def test_dirty_data_rejects_bad_flags(argv, message, capsys, files):
    with pytest.raises(SystemExit):
        bench_dirty_data.main(["--quick", "--data", str(files["corpus"]), "--other", str(files["other"]), *argv])
    assert message in capsys.readouterr().err


def test_diversity_rejects_k_below_two(capsys):
    with pytest.raises(SystemExit):
        bench_diversity.main(["--k", "1"])
    assert "--k must be >= 2" in capsys.readouterr().err


def test_diversity_rejects_a_repeated_seed(capsys):
    with pytest.raises(SystemExit):
        bench_diversity.main(["--seeds", "0", "1", "0"])
    assert "--seeds repeats a seed" in capsys.readouterr().err
