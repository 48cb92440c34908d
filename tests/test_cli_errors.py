"""Everything a user can get wrong on the command line gets one clear line and a non-zero exit, never a traceback:
bad options (caught while parsing, before a model loads), broken checkpoint folders (caught on load, with the
file and the field named), unusable devices and output folders. `--debug` / BWAREA_DEBUG=1 show the traceback.

Also: `bwarea --help` / `--version` answer without importing torch, and `import bwarea` stays lazy while
transformers' Auto classes still find BWArea.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bwarea import BWAreaError, BWAreaForCausalLM
from bwarea.cli import main

BWAREA = shutil.which("bwarea") or str(Path(sys.executable).with_name("bwarea"))


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def parse_error(capsys, *argv) -> str:
    """argparse's refusal: exit 2 and its message (raised while parsing, so nothing was loaded)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def assert_one_line(rc: int, err: str, *needles: str, progress: bool = False) -> None:
    """Exit 2 and one error line naming ``needles``; ``progress``: progress bars may come before it."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if progress:
        lines = [line for line in lines if "%|" not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("bwarea ") and ": error: " in lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, err)


# ----- fast start ------------------------------------------------------------------------------------------
def test_help_and_version_answer_without_importing_torch():
    probe = ("import sys, bwarea.cli; bwarea.cli.build_parser(); "
             "print([m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # the parser of every verb is built with none of them loaded
    for flag in ("--help", "--version"):
        start = time.perf_counter()
        done = subprocess.run([BWAREA, flag], capture_output=True, text=True, timeout=60)
        seconds = time.perf_counter() - start
        assert done.returncode == 0, done.stderr
        # ~0.15 s on a quiet machine; the bound leaves room for a busy one but not for a torch import (~3 s+)
        assert seconds < 2.0, f"bwarea {flag} took {seconds:.2f} s"
    assert done.stdout.strip() == __import__("bwarea").__version__


def test_import_bwarea_is_lazy_yet_auto_classes_find_it(tiny_model_dir):
    """`import bwarea` loads no torch; its names and submodules load on use, and transformers' Auto classes,
    imported after bwarea, still know the bwarea model type (the other order is what the test process does)."""
    script = "\n".join([
        "import sys, bwarea",
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'import bwarea loaded torch'",
        "from transformers import AutoConfig, AutoModelForCausalLM",
        f"config = AutoConfig.from_pretrained({str(tiny_model_dir)!r})",
        f"model = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r})",
        "from bwarea import BWAreaConfig, BWAreaForCausalLM, load_tokenizer, convert_released_checkpoint",
        "assert type(config) is BWAreaConfig and type(model) is BWAreaForCausalLM",
        "print(bwarea.loading.load.__name__, bwarea.default_model.DIR.name)"])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["load", "default_model"]
    import bwarea
    with pytest.raises(AttributeError, match="no attribute 'nonesuch'"):
        bwarea.nonesuch


@pytest.mark.parametrize("verb", [["tokenizer", "train"], ["pretrain"], ["bc"], ["eval"], ["rl"], ["generate"],
                                  ["serve"]])
def test_every_verb_help_still_works(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*verb, "--help"])
    assert exit_info.value.code == 0
    assert "--debug" in capsys.readouterr().out


# ----- options refused while parsing, before any model loads -------------------------------------------------
@pytest.mark.parametrize("port", ["-1", "0", "70000", "http"])
def test_serve_port_is_checked_before_the_model_loads(port, capsys, monkeypatch):
    monkeypatch.setattr("bwarea.loading.load", lambda *a, **k: pytest.fail("the model was loaded"))
    err = parse_error(capsys, "serve", "--port", port)
    assert "argument --port" in err and "1..65535" in err or "must be an integer" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["generate", "x", "--seed", str(2**70)], ["rl", "--out", "o", "--seed", "-1"],
                                  ["pretrain", "--seed", str(2**32)]])
def test_seed_out_of_range_is_refused(argv, capsys):
    err = parse_error(capsys, *argv)
    assert "argument --seed: seed must be in [0, 2**32)" in err and "Traceback" not in err


@pytest.mark.parametrize("device, message", [("bogus", "unknown device 'bogus'"),
                                             ("cuda:7", "device 'cuda:7' is not available"),
                                             ("meta", "device 'meta' is not available")])
def test_unusable_device_is_one_line(device, message, tiny_model_dir, capsys, monkeypatch):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a GPU 7")
    monkeypatch.setattr("bwarea.model.BWAreaForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded before the device was checked"))
    rc, out, err = run(capsys, "generate", "x", "--model", tiny_model_dir, "--device", device)
    assert_one_line(rc, err, message)
    assert out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_cuda_on_a_cpu_only_torch_is_one_line(tiny_model_dir, capsys):
    rc, _, err = run(capsys, "actions", "x", "--model", tiny_model_dir, "--device", "cuda")
    assert_one_line(rc, err, "device 'cuda' is not available")


# ----- broken checkpoint folders: refused on load, file and field named --------------------------------------
def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _damage(kind: str, folder: Path) -> tuple[str, ...]:
    """Break the checkpoint in ``folder`` one way -> the words the error must contain."""
    weights, config = folder / "model.safetensors", folder / "config.json"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return str(weights), "not a readable safetensors file"
    if kind == "empty":
        weights.write_bytes(b"")
        return str(weights), "0 bytes"
    if kind == "random":
        weights.write_bytes(os.urandom(4096))
        return str(weights), "not a readable safetensors file"
    if kind == "config-list":
        config.write_text("[1, 2]")
        return str(config), "JSON object", "list"
    if kind == "config-not-json":
        config.write_text('{"model_type": "bwarea",')
        return str(config), "not valid JSON"
    if kind == "config-not-utf8":
        config.write_bytes(b"\xff\xfe{}")
        return str(config), "not UTF-8"
    if kind == "dtype":
        _edit_config(folder, dtype="float99")
        return str(config), "dtype 'float99'"
    if kind == "hidden-size-string":
        _edit_config(folder, hidden_size="48")
        return str(config), "hidden_size must be an integer", "'48'"
    if kind == "eps-string":
        _edit_config(folder, rms_norm_eps="abc")
        return str(config), "rms_norm_eps must be a number", "'abc'"
    if kind == "eps-negative":
        _edit_config(folder, rms_norm_eps=-1e-5)
        return str(config), "rms_norm_eps must be a finite number > 0"
    if kind == "layers-zero":
        _edit_config(folder, num_hidden_layers=0)
        return str(config), "num_hidden_layers must be >= 1"
    if kind in ("index-empty", "index-escape", "index-absolute"):
        index = folder / "model.safetensors.index.json"
        shard = {"index-empty": None, "index-escape": "../../etc/passwd", "index-absolute": "/etc/passwd"}[kind]
        keys = list(load_file(weights))
        weights.unlink()
        index.write_text(json.dumps({} if shard is None else {"weight_map": {k: shard for k in keys}}))
        return (str(index), "no weight_map") if shard is None else (str(index), "outside the checkpoint folder")
    if kind in ("all-nan", "one-inf"):
        state = load_file(weights)
        if kind == "all-nan":
            state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
        else:
            state["policy.head.weight"][3, 5] = float("inf")
        save_file(state, weights)
        return (str(folder), "NaN or infinite") + (("policy.head.weight",) if kind == "one-inf" else ())
    raise AssertionError(kind)


DAMAGE = ["truncated", "empty", "random", "config-list", "config-not-json", "config-not-utf8", "dtype",
          "hidden-size-string", "eps-string", "eps-negative", "layers-zero", "index-empty", "index-escape",
          "index-absolute", "all-nan", "one-inf"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_broken_checkpoint_is_refused_on_load_with_file_and_field(kind, tiny_model_dir, capsys):
    needles = _damage(kind, tiny_model_dir)
    with pytest.raises(BWAreaError) as error:  # the library refuses it too (a ValueError)
        BWAreaForCausalLM.from_pretrained(tiny_model_dir)
    for needle in needles:
        assert needle in str(error.value)
    rc, out, err = run(capsys, "generate", "x", "--model", tiny_model_dir, "--greedy", "--max-new-tokens", 2)
    assert_one_line(rc, err, *needles)
    assert out == ""


def test_released_config_is_validated_too(released_dir, tmp_path, capsys):
    folder = tmp_path / "released"
    shutil.copytree(released_dir, folder)
    _edit_config(folder, num_code="64")
    rc, _, err = run(capsys, "actions", "x", "--model", folder)
    assert_one_line(rc, err, str(folder / "config.json"), "num_actions must be an integer")


def test_pickle_checkpoint_needs_allow_pickle_and_says_how(tiny_model_dir, capsys):
    weights = tiny_model_dir / "model.safetensors"
    torch.save(load_file(weights), tiny_model_dir / "pytorch_model.bin")
    weights.unlink()
    rc, _, err = run(capsys, "actions", "I like", "--model", tiny_model_dir, "--json")
    assert_one_line(rc, err, "pytorch_model.bin is a pickle file", "--allow-pickle")
    rc, out, _ = run(capsys, "actions", "I like", "--model", tiny_model_dir, "--json", "--allow-pickle")
    assert rc == 0 and json.loads(out)["tokens"]
    assert "--allow-pickle" in parse_error(capsys, "serve", "--allow-pickle=1")  # a flag, offered on serve too


def test_missing_tokenizer_folder_is_one_line(tmp_path, capsys):
    data = tmp_path / "c.txt"
    data.write_text("the king said hello to the queen.\n" * 50)
    rc, _, err = run(capsys, "pretrain", "--data", data, "--tokenizer", tmp_path / "nope", "--out", tmp_path / "run",
                     "--max-steps", 1)
    assert_one_line(rc, err, str(tmp_path / "nope"))
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


# ----- output folders and unexpected errors -----------------------------------------------------------------
@pytest.fixture
def unwritable(tmp_path):
    """A folder nobody may create files in: a read-only one, or for root (whom permissions don't stop) sysfs."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        yield locked
        locked.chmod(0o755)
        return
    probe = Path("/sys/bwarea-write-probe")
    try:
        probe.mkdir()
    except OSError:
        yield Path("/sys")
        return
    probe.rmdir()
    pytest.skip("no folder here is read-only to this user")


@pytest.mark.parametrize("verb", ["tokenizer", "pretrain", "convert"])
def test_read_only_out_is_one_line(verb, unwritable, tmp_path, released_dir, capsys):
    data = tmp_path / "c.txt"
    data.write_text("the king said hello to the queen.\n" * 200)
    out = unwritable / f"bwarea-test-{verb}"
    argv = {"tokenizer": ["tokenizer", "train", "--data", data, "--vocab-size", 300, "--out", out],
            "pretrain": ["pretrain", "--data", data, "--tokenizer", released_dir, "--out", out, "--max-steps", 1,
                         "--hidden-size", 32, "--layers", 2, "--heads", 2, "--block-size", 16, "--batch-size", 2,
                         "--no-progress"],
            "convert": ["convert", released_dir, out]}[verb]
    rc, _, err = run(capsys, *argv)
    assert_one_line(rc, err, str(unwritable), progress=verb == "pretrain")  # pretrain tokenises first
    assert not out.exists()


def test_os_errors_are_one_line_naming_the_path(capsys, monkeypatch, tmp_path):
    """PermissionError, disk full and the like, wherever a verb meets them (root can't be locked out of a folder
    in a test, so the error is raised where the verb writes)."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out" / "tokenizer.json"))

    monkeypatch.setattr("bwarea.tokenizer_train.train_tokenizer", refuse)
    rc, _, err = run(capsys, "tokenizer", "train", "--data", tmp_path, "--vocab-size", 300, "--out",
                     tmp_path / "out")
    assert_one_line(rc, err, "Permission denied", str(tmp_path / "out" / "tokenizer.json"))


def test_debug_shows_the_traceback(tiny_model_dir, capsys, monkeypatch):
    _damage("eps-string", tiny_model_dir)
    with pytest.raises(BWAreaError, match="rms_norm_eps"):
        main(["actions", "x", "--model", str(tiny_model_dir), "--debug"])
    with pytest.raises(BWAreaError, match="rms_norm_eps"):
        main(["--debug", "actions", "x", "--model", str(tiny_model_dir)])
    monkeypatch.setenv("BWAREA_DEBUG", "1")
    with pytest.raises(BWAreaError, match="rms_norm_eps"):
        main(["actions", "x", "--model", str(tiny_model_dir)])
    monkeypatch.setenv("BWAREA_DEBUG", "0")
    assert main(["actions", "x", "--model", str(tiny_model_dir)]) == 2


def test_out_of_memory_is_one_line(capsys, monkeypatch, tmp_path):
    def too_big(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("bwarea.tokenizer_train.train_tokenizer", too_big)
    rc, _, err = run(capsys, "tokenizer", "train", "--data", tmp_path, "--vocab-size", 300, "--out", tmp_path / "t")
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "bwarea tokenizer train: error: out of memory (CUDA out of memory" in err


def test_an_internal_bug_says_so_and_how_to_see_it(capsys, monkeypatch, tmp_path):
    def bug(*args, **kwargs):
        return {}["missing"]

    monkeypatch.setattr("bwarea.tokenizer_train.train_tokenizer", bug)
    rc, _, err = run(capsys, "tokenizer", "train", "--data", tmp_path, "--vocab-size", 300, "--out", tmp_path / "t")
    assert rc == 1 and "Traceback" not in err
    assert "bwarea tokenizer train: internal error: KeyError" in err and "--debug" in err
