"""bc's default path: inverse-dynamics cloning, then a posterior phase over the last steps with its own warm-up;
its settings, its schedule, its resume across the switch, the CLI's errors, and the defaults benchmark's toy run."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bwarea.cli import main
from bwarea.tokenizer_train import train_tokenizer
from bwarea.train import BCConfig, BCStage, PretrainConfig, PretrainStage, train
from bwarea.train.settings import DEFAULT_POSTERIOR_FRACTION

WORDS = "the king said to his lord that all men shall go forth and the queen did weep for her son".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (12,), generator=g)) + "."
             for _ in range(400)]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    train_tokenizer([root / "train.txt"], 300, root / "tok")
    return root


@pytest.fixture(scope="module")
def stage1(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "s1"
    train(PretrainStage(), PretrainConfig(
        data=[str(corpus / "train.txt")], tokenizer=str(corpus / "tok"), out=str(out), max_steps=4, batch_size=4,
        block_size=32, hidden_size=32, layers=2, heads=2, intermediate_size=64, codebook_dim=8, warmup_steps=1,
        log_every=1, save_every=100, eval_blocks=2, cache_dir=str(corpus / "cache"), progress=False, lr=3e-3))
    return out


def bc(corpus, stage1, out, **overrides) -> BCConfig:
    fields = dict(data=[str(corpus / "train.txt")], model=str(stage1), out=str(out), max_steps=8, batch_size=2,
                  warmup_steps=2, log_every=1, save_every=4, eval_blocks=2, cache_dir=str(corpus / "cache"),
                  progress=False)
    fields.update(overrides)
    return BCConfig(**fields)


def records(out: Path, split="train") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


# ----- settings and schedule -------------------------------------------------------------------------------
def test_posterior_fraction_defaults_by_targets(corpus, stage1, tmp_path):
    config = bc(corpus, stage1, tmp_path / "a")
    config.check()
    assert config.posterior_fraction == DEFAULT_POSTERIOR_FRACTION == 0.25 and config.posterior_steps() == 2
    config = bc(corpus, stage1, tmp_path / "a", targets="posterior")
    config.check()
    assert config.posterior_fraction == 0 and config.posterior_steps() == 0  # every step is posterior already
    config = bc(corpus, stage1, tmp_path / "a", posterior_fraction=0.0)
    config.check()
    assert config.posterior_steps() == 0
    config = bc(corpus, stage1, tmp_path / "a", posterior_fraction=0.01, max_steps=10)
    config.check()
    assert config.posterior_steps() == 1  # a fraction above 0 runs at least one step


@pytest.mark.parametrize("overrides, message", [
    (dict(posterior_fraction=1.5), "posterior_fraction must lie in"),
    (dict(posterior_fraction=-0.1), "posterior_fraction must lie in"),
    (dict(targets="posterior", posterior_fraction=0.5), "with --targets posterior every step"),
    (dict(posterior_lr=0.0), "posterior_lr must be > 0"),
    (dict(posterior_fraction=0.0, posterior_lr=1e-3), "no posterior phase"),
    (dict(policy_layers=0), "policy_layers must be >= 1"),  # bc's older checks still run after these
    (dict(posterior_positions=0), "posterior_positions must be >= 1"),
    (dict(posterior_fraction=0.0, posterior_positions=8), "posterior_positions=8 is given but no step"),
    (dict(posterior_positions=31), "not below the 31 positions a block of 32 tokens scores"),
])
def test_bad_posterior_settings_are_refused_by_name(corpus, stage1, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        bc(corpus, stage1, tmp_path / "a", **overrides).check()


def test_the_schedule_warms_up_again_for_the_posterior_phase(corpus, stage1, tmp_path):
    config = bc(corpus, stage1, tmp_path / "a", max_steps=100, warmup_steps=10, posterior_fraction=0.2,
                posterior_lr=5e-4, lr=1e-3, min_lr_ratio=0.1)
    config.check()
    factor = BCStage().lr_factor(config)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)  # warm-up of the first phase
    assert factor(79) == pytest.approx(0.1, abs=0.01)  # its cosine ends at the floor
    assert factor(80) == pytest.approx(0.5 * 1 / 2)  # the second warm-up (2 steps) at half the peak
    assert factor(81) == pytest.approx(0.5)
    assert factor(99) == pytest.approx(0.05, abs=0.005)
    plain = bc(corpus, stage1, tmp_path / "a", max_steps=100, warmup_steps=10, posterior_fraction=0.0)
    plain.check()
    assert BCStage().lr_factor(plain)(80) < 0.3  # one cosine: no restart


# ----- runs ------------------------------------------------------------------------------------------------
def test_default_bc_ends_on_the_posterior_and_logs_its_phase(corpus, stage1, tmp_path):
    out = tmp_path / "bc"
    train(BCStage(), bc(corpus, stage1, out))
    train_log = records(out)
    assert [r["posterior_phase"] for r in train_log] == [0.0] * 6 + [1.0] * 2
    assert all("lm_ppl" in r for r in train_log[6:]) and "lm_ppl" not in train_log[0]  # the posterior's loss
    assert train_log[5]["lr"] > train_log[4]["lr"]  # warmed up again (the rate logged is the next step's)
    after = load_file(out / "model.safetensors")
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert "steps_done" not in after  # the objective's step counter is not part of the model
    assert math.isfinite(records(out, "val")[-1]["lm_ppl"])


def test_a_logging_window_across_the_switch_reports_the_posterior_steps_lm_ppl(corpus, stage1, tmp_path):
    every, window = tmp_path / "every", tmp_path / "window"
    train(BCStage(), bc(corpus, stage1, every))
    train(BCStage(), bc(corpus, stage1, window, log_every=4))  # steps 5-8: two cloning, two posterior
    nll = [math.log(r["lm_ppl"]) for r in records(every)[6:]]
    assert records(window)[-1]["lm_ppl"] == pytest.approx(math.exp(sum(nll) / 2), rel=1e-4)


def test_a_resume_across_the_switch_gives_the_same_curve(corpus, stage1, tmp_path):
    train(BCStage(), bc(corpus, stage1, tmp_path / "whole"))

    class Killed(Exception):
        pass

    def kill_at_5(step, metrics):
        if step == 5:  # after the step-4 checkpoint, before the posterior phase (steps 7 and 8)
            raise Killed
    with pytest.raises(Killed):
        train(BCStage(), bc(corpus, stage1, tmp_path / "killed"), on_step=kill_at_5)
    train(BCStage(), bc(corpus, stage1, tmp_path / "killed", resume=True))
    whole, resumed = records(tmp_path / "whole"), records(tmp_path / "killed")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(whole, resumed):
        assert a["posterior_phase"] == b["posterior_phase"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_posterior_steps_on_a_few_positions_score_them_and_resume_exactly(corpus, stage1, tmp_path):
    """--posterior-positions: the posterior steps' lm_ppl is measured on the sampled positions (a different
    number from the all-position run's), and a resume draws the same positions (the same curve)."""
    train(BCStage(), bc(corpus, stage1, tmp_path / "all"))
    train(BCStage(), bc(corpus, stage1, tmp_path / "few", posterior_positions=4))
    every, few = records(tmp_path / "all"), records(tmp_path / "few")
    assert [r["loss"] for r in few[:6]] == pytest.approx([r["loss"] for r in every[:6]], rel=1e-6)  # cloning
    assert all(math.isfinite(r["lm_ppl"]) for r in few[6:]) and few[6]["lm_ppl"] != every[6]["lm_ppl"]

    class Killed(Exception):
        pass

    def kill_at_7(step, metrics):
        if step == 7:  # inside the posterior phase, after the step-4 checkpoint
            raise Killed
    with pytest.raises(Killed):
        train(BCStage(), bc(corpus, stage1, tmp_path / "killed", posterior_positions=4), on_step=kill_at_7)
    train(BCStage(), bc(corpus, stage1, tmp_path / "killed", resume=True, posterior_positions=4))
    resumed = records(tmp_path / "killed")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in few], rel=1e-5)
    with pytest.raises(ValueError, match="posterior_positions: run has 4, now 8"):
        train(BCStage(), bc(corpus, stage1, tmp_path / "killed", resume=True, posterior_positions=8))


def test_cli_help_names_the_posterior_phase_and_errors_name_the_flag(corpus, stage1, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bc", "--help"])
    text = capsys.readouterr().out
    assert "--posterior-fraction" in text and "--posterior-lr" in text and "posterior phase" in text
    assert "--posterior-positions" in text
    code = main(["bc", "--model", str(stage1), "--data", str(corpus / "train.txt"), "--out", str(tmp_path / "x"),
                 "--targets", "posterior", "--posterior-fraction", "0.5", "--no-progress"])
    assert code == 2 and "posterior_fraction applies after" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ----- the benchmark ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_defaults_benchmark_quick_mode_writes_its_table(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_defaults
    g = torch.Generator().manual_seed(1)
    for name in ("a.txt", "b.txt"):
        lines = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (10,), generator=g)) for _ in range(300)]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    out = tmp_path / "result"
    code = bench_defaults.main(["--quick", "--data", str(tmp_path / "a.txt"), "--other", str(tmp_path / "b.txt"),
                                "--holdout-percent", "10", "--work", str(tmp_path / "w"), "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    assert code == (0 if result["target_met"] else 1)
    row = result["rows"][0]
    assert row["name"] == "default" and row["flags"] == "" and "--posterior" not in row["command"]
    assert row["other_ratio"] == pytest.approx(row["other_lm_ppl"] / result["baseline"]["other_ppl"])
    assert "bwarea pretrain --baseline llama" in out.with_suffix(".md").read_text()
    assert json.loads((tmp_path / "w" / "s1" / "bench_command.json").read_text())["command"] == \
        result["stage1"]["command"]  # what a second call compares to reuse the run


def test_a_run_written_before_the_posterior_phase_resumes_as_it_ran(corpus, stage1, tmp_path):
    """A bc run recorded without the posterior settings (written before they existed) ran without the phase:
    resuming it with the new default is refused by name, and with --posterior-fraction 0 it goes on."""
    class Killed(Exception):
        pass

    def kill_at_5(step, metrics):
        if step == 5:
            raise Killed
    out = tmp_path / "old"
    with pytest.raises(Killed):
        train(BCStage(), bc(corpus, stage1, out, posterior_fraction=0.0), on_step=kill_at_5)
    record = json.loads((out / "run_config.json").read_text())
    for key in ("posterior_fraction", "posterior_lr"):
        record.pop(key)
    (out / "run_config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="posterior_fraction: run has 0.0, now 0.25"):
        train(BCStage(), bc(corpus, stage1, out, resume=True))
    train(BCStage(), bc(corpus, stage1, out, resume=True, posterior_fraction=0.0))
    assert [r["step"] for r in records(out)] == list(range(1, 9))


def test_posterior_step_benchmark_times_each_variant(stage1, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_posterior_step
    out = tmp_path / "step.json"
    result = bench_posterior_step.main(["--model", str(stage1), "--batch", "2", "--block", "16", "--positions", "4",
                                        "--repeats", "1", "--threads", "1", "--out", str(out)])
    assert [r["variant"] for r in result["rows"]] == ["cloning", "posterior, all positions", "posterior, 4 positions"]
    assert result["rows"][0]["x_cloning_step"] == 1.0 and all(r["seconds"] > 0 for r in result["rows"])
    assert json.loads(out.read_text()) == result
    with pytest.raises(SystemExit):
        bench_posterior_step.main(["--model", str(stage1), "--block", "16", "--positions", "15", "--out", str(out)])
