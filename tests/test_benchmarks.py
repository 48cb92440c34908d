"""The benchmarks end to end at a toy scale: the training-quality runs, split and JSON; the generation
benchmark's table, JSON and memory probe; the kernel benchmark's JSON."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_generation  # noqa: E402
import bench_kernels  # noqa: E402
from bench_training_quality import main, split_lines  # noqa: E402
from outputs import output  # noqa: E402

WORDS = "the king said to his lord that all men shall go forth and the queen did weep for her son".split()


@pytest.fixture()
def text(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (12,), generator=g)) + "."
             for _ in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_an_output_stem_keeps_its_dots():
    """--out STEM is a name: valtext-bc-600-0.25 must not write valtext-bc-600-0.json (the 0-fraction run's file),
    as Path.with_suffix would; a stem given with a file ending is read without it."""
    assert output("logs/valtext-bc-600-0.25", ".json") == Path("logs/valtext-bc-600-0.25.json")
    assert output(Path("r/diversity"), ".png") == Path("r/diversity.png")
    assert output("r/search.json", ".png") == output("r/search.md", ".png") == Path("r/search.png")
    assert output("r/tau0.5.json", ".md") == Path("r/tau0.5.md")


def test_holdout_split_keeps_every_line_once_in_order(text, tmp_path):
    train, held_out = split_lines([str(text)], 10, tmp_path / "split")
    train_lines = Path(train[0]).read_text().splitlines()
    held_lines = Path(held_out[0]).read_text().splitlines()
    assert len(held_lines) == 40 and train_lines + held_lines == text.read_text().splitlines()


@pytest.mark.parametrize("percent", [0, 100, -5])
def test_holdout_split_rejects_a_percent_outside_0_100(text, tmp_path, percent):
    with pytest.raises(SystemExit, match="holdout-percent must lie in"):
        split_lines([str(text)], percent, tmp_path / "split")


def test_holdout_split_rejects_a_folder(tmp_path):
    with pytest.raises(SystemExit, match="is not a file"):
        split_lines([str(tmp_path)], 10, tmp_path / "split")


def test_training_mode_trains_every_run_and_writes_the_table(text, tmp_path):
    work, out = tmp_path / "runs", tmp_path / "result"
    code = main(["--data", str(text), "--holdout-percent", "10", "--work", str(work), "--out", str(out),
                 "--vocab-size", "300", "--steps", "4", "--bc-steps", "3", "--posterior-steps", "2",
                 "--batch-size", "2", "--block-size", "32", "--hidden-size", "32", "--layers", "2", "--heads", "2",
                 "--intermediate-size", "64", "--eval-blocks", "2", "--log-every", "1", "--max-blocks", "4"])
    result = json.loads(out.with_suffix(".json").read_text())
    assert code == (0 if all(result["targets"].values()) else 1)
    assert set(result["runs"]) == {"s1", "llama", "bc", "bc-posterior"}
    assert result["runs"]["bc-posterior"]["steps"] == 2 and result["runs"]["s1"]["steps"] == 4
    assert result["model"].endswith("bc-posterior")
    assert result["eval_tokens"] == 4 * 31  # 4 blocks of 32: 31 predicted tokens each
    assert result["lm_ppl_ratio"] == pytest.approx(result["lm_ppl"] / result["baseline_ppl"])
    assert 0 < result["codes_used"] <= 64 and result["baseline_ppl"] > 1
    assert "lm_ppl <= 1.10 x baseline" in out.with_suffix(".md").read_text()
    assert (work / "data" / "heldout" / "corpus.txt").is_file()

    # Runs mode on the same runs, with the final model's numbers taken from a `bwarea eval --json` of it: the
    # same table as evaluating it here. An evaluation of another model, or of other blocks, is refused by name.
    from bwarea.evaluate import evaluate
    held_out = [str(work / "data" / "heldout" / "corpus.txt")]
    final = work / "bc-posterior"
    saved = tmp_path / "eval.json"
    common = dict(data=held_out, max_blocks=4, cache_dir=work / "cache", progress=False)
    saved.write_text("progress lines before it are skipped\n" + json.dumps(evaluate(final, **common)) + "\n")
    args = ["--runs", str(work), "--data", *held_out, "--max-blocks", "4", "--out", str(tmp_path / "again")]
    main([*args, "--final-eval", str(saved)])
    again = json.loads((tmp_path / "again.json").read_text())
    assert {k: again[k] for k in ("lm_ppl", "codes_used", "baseline_ppl", "lm_ppl_bc_only")} == \
        {k: result[k] for k in ("lm_ppl", "codes_used", "baseline_ppl", "lm_ppl_bc_only")}
    saved.write_text(json.dumps(evaluate(work / "bc", **common)))
    with pytest.raises(SystemExit, match="not the final model"):
        main([*args, "--final-eval", str(saved)])
    saved.write_text(json.dumps(evaluate(final, **{**common, "max_blocks": 3})))
    with pytest.raises(SystemExit, match="scored 93 tokens, but the held-out data here has 124"):
        main([*args, "--final-eval", str(saved)])


def test_generation_benchmark_writes_every_row(tmp_path, capsys):
    out = tmp_path / "gen.json"
    before = torch.get_num_threads()
    try:
        bench_generation.main(["--batch", "1", "4", "--new", "3", "--prompt", "5", "--repeats", "1",
                               "--fanout-context", "6", "--no-memory", "--threads", "1", "--out", str(out)])
        report = json.loads(out.read_text())
        models = {(r["batch"], r["model"]) for r in report["generation"]}
        assert models == {(b, m) for b in (1, 4) for m in ("BWArea", "BWArea-rowmajor", "Llama-16", "Llama-8")}
        assert all(r["seconds"] > 0 and r["ratio_vs_Llama-16"] > 0 for r in report["generation"])
        assert report["fanout"]["speedup"] > 0 and len(report["targets"]) == 3
        bench_generation.main(["--probe", "BWArea", "4", "--new", "3", "--prompt", "5", "--threads", "1"])
    finally:
        torch.set_num_threads(before)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["peak_growth_mb"] >= 0


@pytest.mark.slow
def test_generation_benchmark_busy_mode_runs_beside_a_second_process(tmp_path, capsys):
    out = tmp_path / "busy.json"
    before = torch.get_num_threads()
    try:
        bench_generation.main(["--busy", "--batch", "1", "--new", "2", "--prompt", "4", "--repeats", "1",
                               "--threads", "1", "--busy-seconds", "120", "--out", str(out)])
    finally:
        torch.set_num_threads(before)
    report = json.loads(out.read_text())
    assert {r["model"] for r in report["generation"]} == {"BWArea", "Llama-16"}
    assert report["fanout"] is None and set(report["targets"]) == {"batch 1: BWArea / Llama-16 <= 0.8",
                                                                   "batch 8: BWArea / Llama-16 <= 0.8"}
    load = report["load"]
    assert "second bwarea process" in load["beside"] and load["neighbour"]["seconds"] > 0
    assert len(load["load_average_before"]) == 3 and "--busy" in report["setup"]["command"]
    assert "the second process ran" in capsys.readouterr().out


@pytest.mark.skipif(not bench_kernels.kernels.onednn_available(), reason="this torch build has no usable oneDNN")
def test_kernel_benchmark_times_every_matrix_and_row_count(tmp_path):
    out = tmp_path / "kernels.json"
    before = torch.get_num_threads()
    try:
        bench_kernels.main(["--rows", "1", "16", "--repeats", "3", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(before)
    report = json.loads(out.read_text())
    assert {(r["matrix"], r["rows"]) for r in report["products"]} == {
        (m, rows) for m in bench_kernels.MATRICES for rows in (1, 16)}
    assert all(r["f_linear_us"] > 0 and r["packed_linear_us"] > 0 for r in report["products"])
    assert report["one_core_gflops"]["mkl"] > 0 and report["one_core_gflops"]["onednn"] > 0
