"""The TextWorld environment: a real game made with tw-make, played by the adapter and by `bwarea rl`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bwarea import BWAreaForCausalLM
from bwarea.rl.envs import make_env
from bwarea.rl.envs.textworld import TextWorldGame, clean, command_of, find_games, transcript
from conftest import tiny_config

textworld = pytest.importorskip("textworld", reason="textworld is not installed (pip install 'bwarea[textworld]')")


@pytest.fixture(scope="module")
def games(tmp_path_factory) -> Path:
    """One tiny tw-simple game (dense rewards: a point for most walkthrough steps), made offline in ~5 s."""
    tw_make = Path(sys.executable).parent / "tw-make"
    if not tw_make.exists():
        tw_make = shutil.which("tw-make")
    if not tw_make:
        pytest.skip("textworld is installed but its tw-make command is not on this machine")
    folder = tmp_path_factory.mktemp("games")
    subprocess.run([str(tw_make), "tw-simple", "--rewards", "dense", "--goal", "brief", "--seed", "1",
                    "--output", str(folder / "simple.z8"), "--silent"], check=True, capture_output=True, timeout=120)
    return folder


def walkthrough(game: Path) -> list[str]:
    env = textworld.start(str(game), request_infos=textworld.EnvInfos(policy_commands=True))
    commands = env.reset().policy_commands
    env.close()
    return commands


def test_text_cleaning_and_command_rule():
    raw = "\n\n  | $$  __ \\$$\n\nHello there.\n\n\n-= Bedroom =-\nA bed.\n>         -= Bedroom =-0/1"
    assert clean(raw) == "Hello there.\n-= Bedroom =-\nA bed."
    assert clean("The End\n\nWould you like to RESTART, RESTORE a saved game, QUIT?\n> ") == "The End"
    assert command_of(" Take Coin\nYou pick up the coin") == "take coin"  # first line, lower-cased
    assert command_of("\n  > go north  \n") == "go north"                   # leading ">" and blank lines skipped
    assert command_of(" ... \n") == "" and command_of("x" * 200, max_chars=10) == "x" * 10
    # Interpreter escapes (dumb-frotz reads "\\q" as its own command) never reach the game.
    assert command_of("\\dtake  the\tcoin!") == "dtake the coin"


def test_walkthrough_reaches_the_max_score_one_delta_at_a_time(games):
    game = find_games(games)[0]
    env = make_env("textworld", seed=5, games=games, max_turns=50)
    opening = env.reset()
    assert opening.endswith("\n>") and "$$" not in opening and "-= Bedroom =-" in opening
    total, deltas = 0.0, []
    for command in walkthrough(game):
        observation, reward, done = env.step(f" {command}\n")
        deltas.append(reward)
        total += reward
        assert reward == env.score - (total - reward) and isinstance(observation, str)
    assert done and env.won and total == env.max_score > 1 and env.normalised_score == 1.0
    assert set(deltas) <= {0.0, 1.0} and deltas.count(1.0) == env.max_score  # the score delta, per turn
    assert "The End" in observation and not observation.endswith(">")
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step(" look\n")
    # The transcript helper writes the same text the environment gives, in one string.
    text, stats = transcript(game, walkthrough(game))
    assert text.startswith(opening) and f"> {walkthrough(game)[0]}\n" in text and stats["won"]


def test_turn_cap_empty_turns_and_errors(games, tmp_path):
    env = TextWorldGame(games, max_turns=3)
    env.reset()
    observation, reward, done = env.step("...\n")  # no command: not sent to the game
    assert observation.startswith("Write a command") and reward == 0 and not done
    env.step("\\q")  # an interpreter escape is not passed through (it could quit or crash the interpreter)
    observation, reward, done = env.step(" xyzzy")  # cut before its newline: the answer starts a new line
    assert done and observation.startswith("\n") and env.commands == ["", "q", "xyzzy"]
    with pytest.raises(FileNotFoundError, match="no games folder"):
        TextWorldGame(tmp_path / "missing")
    with pytest.raises(ValueError, match="no .z8 or .ulx games"):
        TextWorldGame(tmp_path)
    with pytest.raises(ValueError, match="max_turns"):
        TextWorldGame(games, max_turns=0)
    with pytest.raises(TypeError, match="turns"):
        make_env("textworld", games=games, turns=3)  # the letter game's option is not silently ignored


def test_missing_textworld_says_how_to_install(monkeypatch, games):
    monkeypatch.setitem(sys.modules, "textworld", None)  # import textworld now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'bwarea\[textworld\]'"):
        TextWorldGame(games)


@pytest.fixture
def long_context_model_dir(tmp_path, released_dir) -> Path:
    """A tiny random BWArea with room for a game's text (512 positions) and the fixture's 512-token tokenizer."""
    torch.manual_seed(0)
    model = BWAreaForCausalLM(tiny_config(max_position_embeddings=512)).eval()
    out = tmp_path / "tiny"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(released_dir / name, out / name)
    return out


def test_cli_trains_on_textworld_games(games, long_context_model_dir, tmp_path, capsys):
    from bwarea.cli import main

    out = tmp_path / "run"
    code = main(["rl", "--env", "textworld", "--games", str(games), "--model", str(long_context_model_dir),
                 "--out", str(out), "--steps", "2", "--batch-size", "1", "--group-size", "2", "--max-turns", "2",
                 "--max-new-tokens", "6", "--no-tensorboard"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["samples"] == 2 for m in metrics)
    assert all(0 < m["completion_length"] <= 12 for m in metrics)  # at most 2 turns of 6 tokens, cut at newlines
    assert BWAreaForCausalLM.from_pretrained(out).config.max_position_embeddings == 512
    # Flags that do not fit together are named.
    assert main(["rl", "--env", "textworld", "--model", str(long_context_model_dir), "--out",
                 str(tmp_path / "x")]) == 2
    assert "--games" in capsys.readouterr().err
    assert main(["rl", "--env", "letters", "--games", str(games), "--out", str(tmp_path / "y")]) == 2
    assert "--games is for --env textworld" in capsys.readouterr().err
