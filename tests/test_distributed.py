"""Data-parallel training on CPU: two processes (torchrun, gloo) give the curve of one process with the same
global batch, and write one set of checkpoints and one final model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bwarea import BWAreaForCausalLM
from bwarea.tokenizer_train import train_tokenizer

WORDS = "the king said unto the queen that the people of the city went up to the house of war and peace".split()


def launch(processes: int, args: list[str], port: int, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "bwarea.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_data_parallel_pretrain_matches_one_process(tmp_path):
    lines = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(10)) + "." for i in range(400)]
    (tmp_path / "train.txt").write_text("\n".join(lines))
    train_tokenizer([tmp_path / "train.txt"], 300, tmp_path / "tok")
    common = ["pretrain", "--data", "train.txt", "--tokenizer", "tok", "--hidden-size", "32", "--layers", "2",
              "--heads", "2", "--intermediate-size", "64", "--block-size", "32", "--max-steps", "4",
              "--log-every", "1", "--save-every", "2", "--eval-blocks", "4", "--warmup-steps", "2",
              "--dead-code-every", "2", "--no-progress", "--cache-dir", "cache"]
    one = launch(1, [*common, "--out", "one", "--batch-size", "4"], free_port(), tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(2, [*common, "--out", "two", "--batch-size", "2"], free_port(), tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]

    info = json.loads((tmp_path / "two" / "training.json").read_text())
    assert info["processes"] == 2 and info["tokens_per_step"] == 4 * 32
    assert two.stdout.count('"out": "two"') == 1  # the result is printed by the main process only
    checkpoint = tmp_path / "two" / "checkpoints" / "step-000004"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}

    def curve(run):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["codes_used"]) for r in records if r["split"] == "train"]
    assert [s for s, _, _ in curve("two")] == [1, 2, 3, 4]  # one log, not one per process
    for (s1, l1, c1), (s2, l2, c2) in zip(curve("one"), curve("two")):
        # Gradients averaged over the two halves of the batch == the gradient of the whole batch.
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4) and c1 == c2
    BWAreaForCausalLM.from_pretrained(tmp_path / "two")
