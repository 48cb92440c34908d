"""`bwarea rl` on two CPU processes, started as users start it (`accelerate launch`, DDP over gloo): the same
command, each process rolling out its own samples, gradients averaged."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bwarea import BWAreaForCausalLM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_run(tiny_model_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("The king said\nO Romeo\nand then the\nI am a\n")
    accelerate = Path(sys.executable).with_name("accelerate")
    # --multi_gpu is accelerate's name for multi-process DDP; without a GPU it runs on CPU over gloo.
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "bwarea.cli", "rl",
           "--model", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.txt"), "--task", "keyword",
           "--keyword", "the", "--algo", "grpo", "--steps", "3", "--batch-size", "2", "--group-size", "2",
           "--max-new-tokens", "4", "--lr", "1e-3", "--save-every", "2", "--no-tensorboard",
           "--out", str(tmp_path / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    # One line per step, written once, over both processes' samples (2 prompts x 2 copies each).
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["samples"] == 8 for m in metrics)
    last = tmp_path / "out" / "checkpoints" / "step-000003"
    assert json.loads((last / "state.json").read_text())["num_processes"] == 2
    assert sorted(p.name for p in last.glob("rng-*")) == ["rng-0.pt", "rng-1.pt"]
    start = BWAreaForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    trained = BWAreaForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.equal(start[k], v) for k, v in trained.items() if not k.startswith("policy."))
    assert not torch.equal(start["policy.head.weight"], trained["policy.head.weight"])
