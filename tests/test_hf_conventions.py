"""Hugging Face conventions: generate's transformers keywords, and checkpoints that plain transformers loads."""

import ast
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria,
                          StoppingCriteriaList)

from bwarea import hf_remote

NO_EOS = dict(eos_token_id=[])  # tiny random models emit EOS by chance; these tests count tokens


def prompt(batch=2, width=5, seed=1):
    return torch.randint(3, 500, (batch, width), generator=torch.Generator().manual_seed(seed))


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ----- generate: length ----------------------------------------------------------------------------------------
def test_max_length_counts_the_prompt(tiny_model):
    ids = prompt()
    by_length = tiny_model.generate(ids, max_length=9, generator=seeded(), **NO_EOS)
    by_new = tiny_model.generate(ids, max_new_tokens=4, generator=seeded(), **NO_EOS)
    assert by_length.shape == (2, 9)
    assert torch.equal(by_length, by_new)
    both = tiny_model.generate(ids, max_length=9, max_new_tokens=4, generator=seeded(), **NO_EOS)
    assert torch.equal(both, by_new)


def test_max_length_errors(tiny_model):
    ids = prompt()
    with pytest.raises(ValueError, match="max_new_tokens=3 and max_length=9 disagree"):
        tiny_model.generate(ids, max_length=9, max_new_tokens=3)
    with pytest.raises(ValueError, match="max_length=4 counts the prompt"):
        tiny_model.generate(ids, max_length=4)
    with pytest.raises(ValueError, match="max_length must be an int"):
        tiny_model.generate(ids, max_length=7.5)


def test_min_length_bars_eos_until_reached(tiny_model):
    ids = prompt(batch=1)
    # Force EOS everywhere it is allowed: min_length=8 (prompt 5) leaves it barred for 3 steps.
    out = tiny_model.generate(ids, max_new_tokens=6, min_length=8, eos_token_id=2,
                              logits_processor=LogitsProcessorList([Prefer(2)]), return_dict_in_generate=True)
    assert out.sequences[0, 5:8].ne(2).all() and int(out.sequences[0, 8]) == 2
    assert out.new_token_mask[0].tolist() == [True] * 4 + [False] * 2


# ----- generate: generation_config and other keywords --------------------------------------------------------
def test_generation_config_fields_are_honoured(tiny_model):
    ids = prompt()
    config = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=0.7, top_k=7, top_p=0.9)
    from_config = tiny_model.generate(ids, generation_config=config, generator=seeded(3), **NO_EOS)
    from_keywords = tiny_model.generate(ids, max_new_tokens=5, do_sample=True, temperature=0.7, top_k=7, top_p=0.9,
                                        generator=seeded(3), **NO_EOS)
    assert from_config.shape == (2, 10)
    assert torch.equal(from_config, from_keywords)
    # A keyword wins over the config's field, as in transformers.
    assert tiny_model.generate(ids, generation_config=config, max_new_tokens=2, **NO_EOS).shape == (2, 7)
    # The config's EOS and pad ids are used.
    eos = int(from_keywords[0, 6])
    out = tiny_model.generate(ids, generation_config=GenerationConfig(
        max_new_tokens=5, do_sample=True, temperature=0.7, top_k=7, top_p=0.9, eos_token_id=eos, pad_token_id=0),
        generator=seeded(3))
    assert out[0, 6] == eos and out[0, 7:].eq(0).all()


@pytest.mark.parametrize("field, value", [("num_beams", 4), ("no_repeat_ngram_size", 2), ("output_scores", True),
                                          ("penalty_alpha", 0.6), ("bad_words_ids", [[5]])])
def test_generation_config_field_that_cannot_be_honoured_is_named(tiny_model, field, value):
    with pytest.raises(TypeError, match=rf"generation_config\.{field}"):
        tiny_model.generate(prompt(), generation_config=GenerationConfig(**{field: value}))


def test_generation_config_must_be_a_generation_config(tiny_model):
    with pytest.raises(TypeError, match="generation_config must be a transformers GenerationConfig, got dict"):
        tiny_model.generate(prompt(), generation_config={"max_new_tokens": 3})


def test_unknown_or_unhonoured_keywords_are_named(tiny_model):
    ids = prompt()
    with pytest.raises(TypeError, match="generate cannot honour no_repeat_ngram_size"):
        tiny_model.generate(ids, no_repeat_ngram_size=2)
    with pytest.raises(TypeError, match="num_beams=3"):
        tiny_model.generate(ids, num_beams=3)
    with pytest.raises(TypeError, match="output_attentions=True"):
        tiny_model.generate(ids, output_attentions=True)
    with pytest.raises(TypeError, match="assistant_model"):
        tiny_model.generate(ids, assistant_model=tiny_model)


def test_no_op_keywords_change_nothing(tiny_model):
    ids = prompt()
    plain = tiny_model.generate(ids, max_new_tokens=4, generator=seeded(), **NO_EOS)
    with_no_ops = tiny_model.generate(ids, max_new_tokens=4, generator=seeded(), use_cache=False, num_beams=1,
                                      output_attentions=False, output_hidden_states=False, output_scores=False,
                                      synced_gpus=False, **NO_EOS)
    assert torch.equal(plain, with_no_ops)


# ----- generate: logits processors and stopping criteria ---------------------------------------------------------
class Prefer(LogitsProcessor):
    """Makes ``token`` the argmax (where it is not barred) and records what each call saw."""

    def __init__(self, token):
        self.token, self.seen = token, []

    def __call__(self, input_ids, scores):
        self.seen.append(input_ids.clone())
        scores = scores.clone()
        scores[:, self.token] = torch.where(torch.isinf(scores[:, self.token]), scores[:, self.token],
                                            scores.max(-1).values + 100.0)
        return scores


def test_logits_processor_sees_the_sequences_so_far_and_decides(tiny_model):
    ids = prompt()
    prefer = Prefer(77)
    out = tiny_model.generate(ids, max_new_tokens=4, do_sample=True, logits_processor=LogitsProcessorList([prefer]),
                              generator=seeded(), **NO_EOS)
    assert out[:, 5:].eq(77).all()
    assert [tuple(x.shape) for x in prefer.seen] == [(2, 5), (2, 6), (2, 7), (2, 8)]
    for step, seen in enumerate(prefer.seen):
        assert torch.equal(seen, out[:, :5 + step])


def test_logits_processor_runs_after_repetition_penalty_and_before_sampling(tiny_model):
    # transformers' order: built-in processors (repetition penalty, min_new_tokens), the user's, then the warpers.
    # A processor that bans every token but one leaves nothing for top-k/sampling to choose between.
    ids = prompt()

    class OnlyOne(LogitsProcessor):
        def __call__(self, input_ids, scores):
            out = torch.full_like(scores, float("-inf"))
            out[:, 123] = scores[:, 123]
            return out

    out = tiny_model.generate(ids, max_new_tokens=3, do_sample=True, top_k=5, temperature=2.0,
                              repetition_penalty=3.0, logits_processor=[OnlyOne()], generator=seeded(), **NO_EOS)
    assert out[:, 5:].eq(123).all()


class StopAtLength(StoppingCriteria):
    """Per row: done once the sequence reaches ``lengths[row]`` columns."""

    def __init__(self, lengths):
        self.lengths = torch.tensor(lengths)

    def __call__(self, input_ids, scores, **kwargs):
        assert scores.shape == (input_ids.shape[0], 520)
        return input_ids.shape[1] >= self.lengths


def test_stopping_criteria_finish_rows(tiny_model):
    ids = prompt()
    out = tiny_model.generate(ids, max_new_tokens=6, pad_token_id=0, return_dict_in_generate=True,
                              stopping_criteria=StoppingCriteriaList([StopAtLength([7, 9])]), generator=seeded(),
                              **NO_EOS)
    assert out.new_token_mask.tolist() == [[True] * 2 + [False] * 4, [True] * 4 + [False] * 2]
    assert out.sequences.shape == (2, 11)  # the requested width; columns after the last stop are padding
    assert out.sequences[0, 7:].eq(0).all() and out.sequences[1, 9:].eq(0).all()
    free = tiny_model.generate(ids, max_new_tokens=4, pad_token_id=0, generator=seeded(), **NO_EOS)
    assert torch.equal(out.sequences[0, :7], free[0, :7]) and torch.equal(out.sequences[1, :9], free[1, :9])


def test_stopping_criterion_returning_a_bool_stops_every_row(tiny_model):
    calls = []

    def after_three(input_ids, scores, **kwargs):
        calls.append(input_ids.shape[1])
        return input_ids.shape[1] >= 8

    out = tiny_model.generate(prompt(), max_new_tokens=6, pad_token_id=0, return_dict_in_generate=True,
                              stopping_criteria=[after_three], **NO_EOS)
    assert calls == [6, 7, 8]
    assert out.new_token_mask.sum(1).tolist() == [3, 3]


def test_stopping_criteria_errors(tiny_model):
    with pytest.raises(TypeError, match="stopping_criteria must be a StoppingCriteriaList of callables"):
        tiny_model.generate(prompt(), stopping_criteria=[3])
    with pytest.raises(ValueError, match=r"stopping_criteria returned shape \(3,\)"):
        tiny_model.generate(prompt(), stopping_criteria=[lambda ids, scores: torch.zeros(3, dtype=torch.bool)])
    with pytest.raises(TypeError, match="logits_processor must be a LogitsProcessorList of callables"):
        tiny_model.generate(prompt(), logits_processor=["x"])


# ----- checkpoints that plain transformers loads -----------------------------------------------------------------
PLAIN_LOAD = """
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
assert not any(name.split(".")[0] == "bwarea" for name in sys.modules)
found = {}
for path in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        out = model.forward_inverse(torch.tensor([[5, 6, 7, 8]]))
    found[path] = {"class": type(model).__name__, "padding_side": tokenizer.padding_side,
                   "logit": float(out.logits[0, -1].float().sum())}
print(found)
"""


def inverse_logit_sum(model) -> float:
    with torch.no_grad():
        return float(model.forward_inverse(torch.tensor([[5, 6, 7, 8]])).logits[0, -1].float().sum())


@pytest.fixture(scope="module")
def plain_loads(tmp_path_factory, released_dir):
    """Three folders -- a saved tiny model, the shipped model, a `bwarea convert` output -- each loaded with plain
    transformers in one new interpreter that never imports bwarea itself (the folders' auto_map module does).
    -> {name: (folder, what the fresh process found, forward_inverse logit sum from bwarea here)}"""
    from bwarea import BWAreaForCausalLM, default_model, load_tokenizer, loading
    from bwarea.cli import main
    root = tmp_path_factory.mktemp("plain")
    torch.manual_seed(0)
    from conftest import tiny_config
    tiny = BWAreaForCausalLM(tiny_config()).eval()
    tiny.save_pretrained(root / "saved")
    load_tokenizer(released_dir).save_pretrained(root / "saved")
    assert main(["convert", str(released_dir), str(root / "converted")]) == 0
    shipped, _ = loading.load()
    folders = {"saved": (root / "saved", tiny), "shipped": (default_model.path(), shipped),
               "converted": (root / "converted", BWAreaForCausalLM.from_pretrained(released_dir))}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "hf_modules")}
    done = subprocess.run([sys.executable, "-c", PLAIN_LOAD, *(str(f) for f, _ in folders.values())],
                          capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    return {name: (folder, found[str(folder)], inverse_logit_sum(model)) for name, (folder, model) in folders.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["saved", "shipped", "converted"])
def test_checkpoints_load_with_plain_transformers(plain_loads, name):
    folder, found, expected = plain_loads[name]
    assert json.loads((folder / "config.json").read_text())["auto_map"] == hf_remote.AUTO_MAP
    assert (folder / "modeling_bwarea.py").read_text() == hf_remote.MODULE_FILE.read_text(), \
        f"{folder / 'modeling_bwarea.py'} is out of date"
    assert found["class"] == "BWAreaForCausalLM" and found["padding_side"] == "left"
    assert found["logit"] == pytest.approx(expected, rel=1e-5)


def test_saved_tokenizer_pads_on_the_left_with_plain_transformers(tmp_path):
    # The shipped tokenizer's class pads on the right unless its config says otherwise.
    from transformers import AutoTokenizer

    from bwarea import default_model, load_tokenizer
    out = tmp_path / "tok"
    load_tokenizer(default_model.path()).save_pretrained(out)
    assert json.loads((out / "tokenizer_config.json").read_text())["padding_side"] == "left"
    assert AutoTokenizer.from_pretrained(out).padding_side == "left"


def test_save_never_replaces_a_module_file_bwarea_did_not_write(tiny_model, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "modeling_bwarea.py").write_text("# my own code\n")
    with pytest.raises(FileExistsError, match="was not written by bwarea"):
        tiny_model.save_pretrained(out)
    assert (out / "modeling_bwarea.py").read_text() == "# my own code\n"
    assert not (out / "model.safetensors").exists()
    # A module bwarea wrote (an older copy) is replaced.
    (out / "modeling_bwarea.py").write_text(hf_remote.MARKER + " long ago\n")
    tiny_model.save_pretrained(out)
    assert (out / "modeling_bwarea.py").read_text() == hf_remote.MODULE_FILE.read_text()
