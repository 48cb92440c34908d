"""lm-evaluation-harness on BWArea models: HFLM from Python, simple_evaluate, the lm_eval CLI and bwarea eval.

Every route must give the numbers of ``model.lm_log_likelihood`` (the exact mixture over actions), computed
here on the same tokens. The tasks are small local YAMLs over JSONL files the tests write (no Hub access).
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from bwarea import BWAreaForCausalLM, load_tokenizer

REL = 1e-3  # the agreement every route must reach
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

LINES = ["The king said unto them, go ye into the city.",
         "And he went up to the mountain, and saw the land.",
         "Peace be with you.",
         "What light through yonder window breaks? It is the east."]
CHOICES = [
    {"question": "The king said unto", "choices": ["them", "the sea of glass", "a"], "answer": 0},
    {"question": "And he went up to the", "choices": ["mountain", "of the", "light through the city gate"],
     "answer": 0},
    {"question": "Peace be", "choices": ["with you", "x", "upon the land of the living"], "answer": 0},
    {"question": "What light", "choices": ["through", "breaks and falls", "east"], "answer": 1},
    {"question": "It is the", "choices": ["east", "west wind that blows", "quietly"], "answer": 0},
]


@pytest.fixture(scope="module", autouse=True)
def offline():
    saved = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, released_dir) -> Path:
    """A random tiny BWArea checkpoint with the fixture tokenizer (float32 on disk)."""
    torch.manual_seed(0)
    model = BWAreaForCausalLM(tiny_config()).eval()
    with torch.no_grad():  # actions that visibly change the next token, as in conftest.tiny_model
        model.action_codebook.embed.weight.normal_(0, 1.0)
        model.world_model.action_proj.weight.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("lm-eval") / "tiny"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(released_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def model(tiny_dir):
    return BWAreaForCausalLM.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """Local lm-eval tasks: a rolling-perplexity task over LINES and a multiple-choice task over CHOICES."""
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "lines.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LINES))
    (folder / "choices.jsonl").write_text("".join(json.dumps(d) + "\n" for d in CHOICES))
    (folder / "rolling.yaml").write_text(f"""task: bwarea_test_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'lines.jsonl'}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    (folder / "choice.yaml").write_text(f"""task: bwarea_test_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'choices.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return folder


def local_tasks(folder) -> TaskManager:
    return TaskManager(include_path=str(folder), include_defaults=False)  # skips indexing the built-in tasks


# ----- the expected numbers, from lm_log_likelihood ----------------------------------------------------------
def exact_sum(model, ids, last: int) -> float:
    """Sum of the exact log-likelihoods of the last ``last`` tokens of ``ids`` given everything before them."""
    with torch.no_grad():
        ll = model.lm_log_likelihood(torch.tensor([ids]))[0]
    return float(ll[-last:].sum())


def expected_pair(lm, model, context, continuation) -> float:
    context_ids, continuation_ids = lm._encode_pair(context, continuation)
    return exact_sum(model, context_ids + continuation_ids, len(continuation_ids))


def expected_rolling(lm, model, text) -> float:
    """lm-eval scores a document shorter than max_length as one window: [prefix token] + its tokens."""
    ids = lm.tok_encode(text)
    assert len(ids) < lm.max_length
    return exact_sum(model, [lm.prefix_token_id] + ids, len(ids))


def word_perplexity(total_ll: float, texts) -> float:
    return math.exp(-total_ll / sum(len(re.split(r"\s+", t)) for t in texts))


# ----- HFLM from Python ------------------------------------------------------------------------------------------
def test_hflm_loglikelihood_matches_lm_log_likelihood(model, tokenizer):
    pairs = [(d["question"], " " + c) for d in CHOICES for c in d["choices"]]
    for batch_size in (1, 8):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                               disable_tqdm=True)
        for (context, continuation), (ll, _) in zip(pairs, got):
            assert ll == pytest.approx(expected_pair(lm, model, context, continuation), rel=REL), (context,
                                                                                                  continuation)


def test_hflm_rolling_matches_lm_log_likelihood(model, tokenizer):
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(LINES)],
                                   disable_tqdm=True)
    for text, ll in zip(LINES, got):
        assert ll == pytest.approx(expected_rolling(lm, model, text), rel=REL), text


def test_hflm_generate_until_uses_max_length_and_stopping_criteria(model, tokenizer):
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    model.set_action_sampling(greedy=True)
    try:
        contexts = ["The king said", "And he went up to the"]
        got = lm.generate_until([Instance("generate_until", {}, (c, {"until": ["e"], "max_gen_toks": 12}), i)
                                 for i, c in enumerate(contexts)], disable_tqdm=True)
        for context, text in zip(contexts, got):
            ids = torch.tensor([lm.tok_encode(context)])
            free = model.generate(ids, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
            expected = lm.tok_decode(free.tolist()).split("e")[0]
            expected = expected.split(lm.tok_decode(lm.eot_token_id, skip_special_tokens=False))[0]
            assert text == expected
    finally:
        model.set_action_sampling(greedy=False, temp=1.0)


def test_lm_eval_stop_sequences_finish_generation_early(model, tokenizer):
    # HFLM hands generate lm-eval's own stopping criteria; a row must stop at the step that completes the stop text.
    from lm_eval.models.utils_hf import stop_sequences_criteria
    ids = torch.tensor([tokenizer.encode("The king said")])
    width = ids.shape[1]
    free = model.generate(ids, max_new_tokens=16, action_greedy=True, eos_token_id=[])[0, width:]
    pieces = [tokenizer.decode(free[k:k + 1]).strip() for k in range(16)]
    stop = next(p for p in pieces[2:] if p.isascii() and p.isalpha())  # a word piece generated after step 2
    first = next(k for k in range(16) if stop in tokenizer.decode(free[:k + 1]))
    out = model.generate(ids, max_length=width + 16, stopping_criteria=stop_sequences_criteria(
        tokenizer, [stop], width, 1), action_greedy=True, eos_token_id=[], return_dict_in_generate=True)
    assert int(out.new_token_mask.sum()) == first + 1 < 16
    assert torch.equal(out.sequences[0, width:width + first + 1], free[:first + 1])


# ----- simple_evaluate on local tasks ------------------------------------------------------------------------------
def test_simple_evaluate_rolling_task_matches(model, tokenizer, tasks_dir):
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    out = simple_evaluate(model=lm, tasks=["bwarea_test_rolling"], task_manager=local_tasks(tasks_dir),
                         log_samples=False)
    total = sum(expected_rolling(lm, model, t) for t in LINES)
    assert out["results"]["bwarea_test_rolling"]["word_perplexity,none"] == pytest.approx(
        word_perplexity(total, LINES), rel=REL)


def test_multiple_choice_does_not_depend_on_batch_size(model, tokenizer, tasks_dir):
    manager = local_tasks(tasks_dir)
    runs = {}
    for batch_size in (1, 8):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        runs[batch_size] = simple_evaluate(model=lm, tasks=["bwarea_test_choice"], task_manager=manager,
                                           log_samples=True)
    accs = {b: r["results"]["bwarea_test_choice"]["acc,none"] for b, r in runs.items()}
    assert accs[1] == accs[8]
    expected_correct = 0
    for sample in runs[8]["samples"]["bwarea_test_choice"]:
        doc = sample["doc"]
        expected = [expected_pair(lm, model, doc["question"], " " + c) for c in doc["choices"]]
        got = [resp[0][0] for resp in sample["resps"]]
        assert got == pytest.approx(expected, rel=REL)
        expected_correct += int(max(range(len(expected)), key=expected.__getitem__) == doc["answer"])
    assert accs[8] == pytest.approx(expected_correct / len(CHOICES))


# ----- the command lines -------------------------------------------------------------------------------------------
def _env(tmp_path) -> dict:
    return {**os.environ, **OFFLINE, "HF_MODULES_CACHE": str(tmp_path / "modules"),
            "HF_DATASETS_CACHE": str(tmp_path / "datasets")}


@pytest.mark.slow
def test_lm_eval_cli_with_trust_remote_code(tiny_dir, model, tokenizer, tasks_dir, tmp_path):
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={tiny_dir},trust_remote_code=True", "--tasks", "bwarea_test_rolling",
         "--include_path", str(tasks_dir), "--output_path", str(out), "--device", "cpu", "--batch_size", "4"],
        capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["bwarea_test_rolling"]
    lm = HFLM(pretrained=model, tokenizer=tokenizer)
    total = sum(expected_rolling(lm, model, t) for t in LINES)
    assert results["word_perplexity,none"] == pytest.approx(word_perplexity(total, LINES), rel=REL)


def test_bwarea_eval_lm_eval(tiny_dir, model, tokenizer, tasks_dir, capsys):
    from bwarea.cli import main
    assert main(["eval", str(tiny_dir), "--lm-eval", "bwarea_test_rolling,bwarea_test_choice",
                 "--include-path", str(tasks_dir), "--batch-size", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lm = HFLM(pretrained=model, tokenizer=tokenizer)
    total = sum(expected_rolling(lm, model, t) for t in LINES)
    got = result["lm_eval"]
    assert got["bwarea_test_rolling"]["word_perplexity,none"] == pytest.approx(word_perplexity(total, LINES),
                                                                               rel=REL)
    assert 0.0 <= got["bwarea_test_choice"]["acc,none"] <= 1.0


def test_bwarea_eval_lm_eval_errors(tiny_dir, tasks_dir, tmp_path, capsys):
    from bwarea.cli import main
    assert main(["eval", str(tiny_dir), "--lm-eval", "x", "--include-path", str(tmp_path / "none")]) != 0
    assert "is not a folder of task YAMLs" in capsys.readouterr().err
    assert main(["eval", str(tiny_dir)]) != 0
    assert "eval needs --data PATH" in capsys.readouterr().err
    assert main(["eval", str(tiny_dir), "--data", "x.txt", "--include-path", str(tasks_dir)]) != 0
    assert "--include-path needs --lm-eval" in capsys.readouterr().err


@pytest.mark.slow
def test_bwarea_eval_unknown_task_is_named(tiny_dir, tasks_dir, capsys):
    from bwarea.cli import main
    assert main(["eval", str(tiny_dir), "--lm-eval", "no_such_task", "--include-path", str(tasks_dir)]) != 0
    assert "lm-eval knows no task 'no_such_task'" in capsys.readouterr().err
