"""The `bwarea` verbs that use a model: generate, actions, explore, convert (and every verb's --help).

Verbs run in-process through ``bwarea.cli.main``; one test runs the installed ``bwarea`` entry point for real.
Expected outputs are recomputed from the model's forward pass, not from the code under test.
"""

import io
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from bwarea import BWAreaForCausalLM, default_model, load_tokenizer
from bwarea.cli import main

PROMPT = "I like eating"
VERBS = ["generate", "actions", "explore", "convert", "serve", "search"]


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def load(model_dir):
    return BWAreaForCausalLM.from_pretrained(model_dir).eval(), load_tokenizer(model_dir)


@torch.no_grad()
def greedy_reference(model, ids: list[int], steps: int, action: int | None = None) -> tuple[list[int], list[int]]:
    """Greedy decoding by full recomputation: inverse-dynamics actions on the prompt, then at each new position
    ``action`` (or the policy's argmax), and the world model's argmax token. Stops after EOS."""
    seq = list(ids)
    actions = model.infer_actions(torch.tensor([seq]))[0][0, :-1].tolist()
    tokens, chosen = [], []
    for _ in range(steps):
        x = torch.tensor([seq])
        a = action if action is not None else int(model.policy_logits(x)[0, -1].argmax())
        token = int(model(x, action_idx=torch.tensor([actions + [a]])).logits[0, -1].argmax())
        tokens.append(token)
        chosen.append(a)
        seq.append(token)
        actions.append(a)
        if token == model.config.eos_token_id:
            break
    return tokens, chosen


def show_actions_rows(out: str) -> list[tuple[int, int, int]]:
    """(step, action, token) rows of `generate --show-actions` output."""
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) >= 3 and all(p.isdigit() for p in parts[:3]):
            rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return rows


# ----- help ----------------------------------------------------------------------------------------------
def test_bwarea_help_runs_as_a_real_command():
    exe = shutil.which("bwarea") or str(Path(sys.executable).with_name("bwarea"))
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for verb in VERBS:
        assert verb in done.stdout


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_with_an_example(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"bwarea {verb}" in out.split("examples:")[1]


@pytest.mark.slow
def test_serve_verb_starts_a_server(tiny_model_dir):
    with socket.socket() as probe:  # a free port on 127.0.0.1
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exe = shutil.which("bwarea") or str(Path(sys.executable).with_name("bwarea"))
    server = subprocess.Popen([exe, "serve", "--model", str(tiny_model_dir), "--host", "127.0.0.1", "--port",
                               str(port), "--max-tokens", "8", "--log-level", "warning"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "bwarea serve did not answer /health"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health.json()["model"] == "tiny-bwarea"
        too_many = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x", "max_tokens": 9})
        assert too_many.status_code == 400 and "limit 8" in too_many.json()["error"]["message"]
        done = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": PROMPT, "max_tokens": 3},
                          timeout=30)
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.terminate()
        server.wait(timeout=30)


# ----- actions -------------------------------------------------------------------------------------------
def test_actions_json_gives_each_token_the_action_that_produced_it(tiny_model_dir, capsys):
    rc, out, _ = run(capsys, "actions", PROMPT, "--model", tiny_model_dir, "--json")
    assert rc == 0
    result = json.loads(out)
    model, tokenizer = load(tiny_model_dir)
    ids = tokenizer(PROMPT)["input_ids"]
    index = model.infer_actions(torch.tensor([ids]))[0][0].tolist()
    assert [t["id"] for t in result["tokens"]] == ids
    assert [t["action"] for t in result["tokens"]] == [None] + index[:-1]
    assert "".join(t["text"] for t in result["tokens"]) == tokenizer.decode(ids, skip_special_tokens=True)


def test_actions_table_reads_stdin(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))
    rc, out, _ = run(capsys, "actions", "--model", tiny_model_dir)
    assert rc == 0
    lines = out.strip().splitlines()
    tokenizer = load_tokenizer(tiny_model_dir)
    assert lines[0].split()[:3] == ["pos", "id", "action"]
    assert len(lines) == 1 + len(tokenizer(PROMPT)["input_ids"])
    assert lines[1].split()[2] == "-"  # the first token has no action


# ----- explore -------------------------------------------------------------------------------------------
def test_explore_lists_the_world_models_top_tokens_per_action(tiny_model_dir, capsys):
    rc, out, _ = run(capsys, "explore", PROMPT, "--model", tiny_model_dir, "--actions", "0-2,40", "--top", "2",
                     "--json")
    assert rc == 0
    result = json.loads(out)
    assert [r["action"] for r in result["actions"]] == [0, 1, 2, 40]
    assert sum(result["policy"]) == pytest.approx(1.0, abs=1e-4) and len(result["policy"]) == 64
    model, tokenizer = load(tiny_model_dir)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    inverse = model.infer_actions(ids)[0]
    with torch.no_grad():
        for row in result["actions"]:
            actions = inverse.clone()
            actions[0, -1] = row["action"]
            logprobs = torch.log_softmax(model(ids, action_idx=actions).logits[0, -1], -1)
            logprobs[len(tokenizer) - 1:] = -float("inf")  # the pad token and unused padding slots are never listed
            best = logprobs.topk(2)
            assert [t["id"] for t in row["top"]] == best.indices.tolist()
            assert [t["logprob"] for t in row["top"]] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_explore_table_sorted_by_policy(tiny_model_dir, capsys):
    rc, out, _ = run(capsys, "explore", PROMPT, "--model", tiny_model_dir, "--sort", "policy")
    assert rc == 0
    rows = [line.split() for line in out.splitlines()[2:]]
    assert len(rows) == 64
    probs = [float(r[1].rstrip("%")) for r in rows]
    assert probs == sorted(probs, reverse=True)


# ----- generate ------------------------------------------------------------------------------------------
def test_generate_greedy_streams_the_models_continuation(tiny_model_dir, capsys):
    rc, out, err = run(capsys, "generate", PROMPT, "--model", tiny_model_dir, "--greedy", "--max-new-tokens", 8)
    assert rc == 0
    model, tokenizer = load(tiny_model_dir)
    ids = tokenizer(PROMPT)["input_ids"]
    tokens, _ = greedy_reference(model, ids, 8)
    assert out == tokenizer.decode(ids + tokens, skip_special_tokens=True) + "\n"
    assert "tokens/s" in err


def test_generate_fixed_action_shows_each_token_with_it(tiny_model_dir, capsys):
    rc, out, _ = run(capsys, "generate", PROMPT, "--model", tiny_model_dir, "--greedy", "--max-new-tokens", 6,
                     "--action", 7, "--show-actions")
    assert rc == 0
    rows = show_actions_rows(out)
    model, tokenizer = load(tiny_model_dir)
    tokens, _ = greedy_reference(model, tokenizer(PROMPT)["input_ids"], 6, action=7)
    assert [r[2] for r in rows] == tokens
    assert {r[1] for r in rows} == {7}
    assert [r[0] for r in rows] == list(range(len(rows)))


def test_generate_schedule_then_allowed_policy_actions(tiny_model_dir, capsys):
    rc, out, _ = run(capsys, "generate", PROMPT, "--model", tiny_model_dir, "--max-new-tokens", 6, "--seed", 0,
                     "--schedule", "3,-1,5", "--allowed-actions", "3,5,10-12", "--show-actions")
    assert rc == 0
    actions = [r[1] for r in show_actions_rows(out)]
    assert actions[0] == 3 and actions[2] == 5
    assert set(actions[1:2] + actions[3:]) <= {3, 5, 10, 11, 12}


def test_generate_from_stdin_with_a_seed_is_reproducible(tiny_model_dir, capsys, monkeypatch):
    outs = []
    for seed in (1, 1, 2):
        monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT))
        rc, out, _ = run(capsys, "generate", "--model", tiny_model_dir, "--max-new-tokens", 12, "--seed", seed,
                         "--temperature", 1.5)
        assert rc == 0 and out.startswith(PROMPT)
        outs.append(out)
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]  # 12 tokens at temperature 1.5 from a 520-token random model: never all equal


def test_generate_samples_actions_at_the_models_own_temperature(tiny_model_dir, tmp_path, capsys):
    """With no --action-temperature, actions are sampled at config.json's action_temperature: a copy of the model
    that sets 0.3 writes what the original writes with --action-temperature 0.3, and the flag still wins."""
    cool = tmp_path / "cool"
    shutil.copytree(tiny_model_dir, cool)
    config = json.loads((cool / "config.json").read_text())
    (cool / "config.json").write_text(json.dumps({**config, "action_temperature": 0.3}))

    def actions(model_dir, *flags):
        rc, out, _ = run(capsys, "generate", PROMPT, "--model", model_dir, "--max-new-tokens", 16, "--seed", 3,
                         "--show-actions", *flags)
        assert rc == 0
        return [r[1] for r in show_actions_rows(out)]

    assert actions(cool) == actions(tiny_model_dir, "--action-temperature", 0.3)
    assert actions(cool) != actions(tiny_model_dir)  # the original samples at 1: other actions
    assert actions(cool, "--action-temperature", 1) == actions(tiny_model_dir)


def test_generate_stops_before_a_stop_string(tiny_model_dir, capsys):
    model, tokenizer = load(tiny_model_dir)
    ids = tokenizer(PROMPT)["input_ids"]
    tokens, _ = greedy_reference(model, ids, 16, action=7)
    continuation = tokenizer.decode(ids + tokens, skip_special_tokens=True)[len(PROMPT):]
    stop = continuation.strip()[1:3]
    assert len(stop) == 2, f"continuation {continuation!r} too short to pick a stop string from"
    rc, out, _ = run(capsys, "generate", PROMPT, "--model", tiny_model_dir, "--greedy", "--max-new-tokens", 16,
                     "--action", 7, "--stop", stop)
    assert rc == 0
    assert out == PROMPT + continuation[:continuation.index(stop)] + "\n"


@pytest.mark.parametrize("argv, message", [
    (["--action", "64"], "action 64 is outside [0, 64)"),
    (["--schedule", "1,99"], "schedule entry 99"),
    (["--schedule", "1,2,3", "--max-new-tokens", "2"], "3 entries"),
    (["--schedule", "1,-1", "--allowed-actions", "2-5"], "action 1 is fixed"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--top-k", "0"], "--top-k must be >= 1"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["--allowed-actions", "0-3", "--action", "9"], "not among the allowed actions"),
    (["--max-new-tokens", "500"], "leaves no room for a prompt"),
])
def test_generate_rejects_bad_options_with_a_message(tiny_model_dir, capsys, argv, message):
    rc, out, err = run(capsys, "generate", PROMPT, "--model", tiny_model_dir, *argv)
    assert rc == 2 and message in err and "Traceback" not in err
    assert out == ""  # checked before anything is printed


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    rc, _, err = run(capsys, "actions", PROMPT, "--model", tmp_path / "nowhere")
    assert rc == 2 and "no checkpoint folder" in err


# ----- convert -------------------------------------------------------------------------------------------
def test_convert_released_checkpoint(released_dir, tmp_path, capsys, reference):
    out_dir = tmp_path / "converted"
    rc, out, _ = run(capsys, "convert", released_dir, out_dir)
    assert rc == 0 and "wrote" in out
    converted = BWAreaForCausalLM.from_pretrained(out_dir)
    assert json.loads((out_dir / "config.json").read_text())["model_type"] == "bwarea"
    ids = torch.tensor(reference["input_ids"])
    with torch.no_grad():
        logits = converted(ids, action_idx=2).logits[0, -1]
    assert logits.tolist() == pytest.approx(reference["fixed_action_2_last_logits"], abs=1e-4)
    assert len(load_tokenizer(out_dir)) == len(load_tokenizer(released_dir))

    rc, _, err = run(capsys, "convert", released_dir, out_dir)
    assert rc == 2 and "--force" in err
    assert run(capsys, "convert", released_dir, out_dir, "--force")[0] == 0
    rc, _, err = run(capsys, "convert", out_dir, tmp_path / "again")
    assert rc == 2 and "already a bwarea checkpoint" in err


# ----- the shipped model ---------------------------------------------------------------------------------
@pytest.mark.skipif(not (default_model.DIR / "model.safetensors").is_file(),
                    reason="the shipped default model is not trained yet (src/bwarea/default_model/model.safetensors)")
def test_verbs_on_the_shipped_default_model(capsys):
    rc, out, _ = run(capsys, "generate", "The king said", "--greedy", "--max-new-tokens", 8)
    assert rc == 0 and out.startswith("The king said") and len(out) > len("The king said\n")
    rc, out, _ = run(capsys, "actions", "The king said", "--json")
    assert rc == 0 and json.loads(out)["tokens"][1]["action"] is not None
    rc, out, _ = run(capsys, "explore", "The king said", "--top", "1", "--json")
    assert rc == 0 and len(json.loads(out)["actions"]) == 64


def test_cli_inference_verbs_never_import_the_server(tiny_model_dir):
    """Display helpers live in bwarea.display: generate, actions and explore run without bwarea.serve (and so
    without FastAPI) being imported."""
    code = (
        "import sys\n"
        "from bwarea.cli import main\n"
        f"for argv in (['generate', 'hello', '--model', {str(tiny_model_dir)!r}, '--max-new-tokens', '3'],\n"
        f"             ['actions', 'hello there', '--model', {str(tiny_model_dir)!r}],\n"
        f"             ['explore', 'hello', '--model', {str(tiny_model_dir)!r}]):\n"
        "    assert main(argv) in (0, None), argv\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('bwarea.serve', 'fastapi')))\n"
        "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
