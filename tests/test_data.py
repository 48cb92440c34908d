"""Data packing, the memory-mapped cache, the block sampler and tokenizer training."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from bwarea import data, load_tokenizer
from bwarea.tokenizer_train import train_tokenizer

TEXT_A = "\n\n".join(f"Paragraph {i} of the first file: the king spoke, and the queen answered him {i} times."
                     for i in range(60))
TEXT_B = "\n\n".join(f"And it came to pass in the {i}th year that the people went up unto the city."
                     for i in range(60))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text(TEXT_A)
    (root / "b.txt").write_text(TEXT_B)
    return root


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([corpus / "a.txt", corpus / "b.txt"], 400, out)
    return load_tokenizer(out)


# ----- tokenizer training --------------------------------------------------------------------------------
def test_tokenizer_train_saves_a_complete_transformers_tokenizer(corpus, tmp_path):
    trained = train_tokenizer([corpus], 350, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert len(loaded) == len(trained) <= 350  # load_tokenizer added no [PAD]: the pad token is there
    assert (loaded.unk_token, loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert len({loaded.unk_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id}) == 4
    # plain transformers pads it on the left too: every model trained with it generates batches out of the box
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").padding_side == "left"
    ids = loaded("the king spoke\n\nof ÿ日本")["input_ids"]
    assert ids[0] == loaded.bos_token_id and loaded.unk_token_id not in ids  # byte level: nothing unknown
    assert loaded.decode(ids, skip_special_tokens=True) == "the king spoke\n\nof ÿ日本"
    # Merges were learned from the text: a frequent word is one token.
    assert len(loaded(" king", add_special_tokens=False)["input_ids"]) == 1


def test_tokenizer_train_rejects_tiny_vocab_and_bad_files(corpus, tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        train_tokenizer([corpus], 100, tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_tokenizer([tmp_path / "missing.txt"], 400, tmp_path / "tok")


def test_tokenizer_train_cli(corpus, tmp_path, capsys):
    from bwarea.cli import main
    assert main(["tokenizer", "train", "--data", str(corpus / "a.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok")]) == 0
    assert "tokenizer" in capsys.readouterr().out
    assert len(load_tokenizer(tmp_path / "tok")) <= 300


# ----- sources and errors -------------------------------------------------------------------------------
def test_paragraph_chunks_tokenise_like_the_whole_text(tokenizer):
    chunks = data.paragraph_chunks(TEXT_A + "\n\n  \n" + TEXT_B, size=200)
    assert len(chunks) > 5 and "".join(chunks) == TEXT_A + "\n\n  \n" + TEXT_B
    whole = tokenizer(TEXT_A + "\n\n  \n" + TEXT_B, add_special_tokens=False)["input_ids"]
    pieces = [i for c in chunks for i in tokenizer(c, add_special_tokens=False)["input_ids"]]
    assert pieces == whole


def test_folders_and_jsonl(tmp_path, tokenizer):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("alpha beta")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "y.txt").write_text("never read")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\x00")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "one doc"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    files = data.resolve_files([tmp_path])
    assert [f.name for f in files] == ["docs.jsonl", "x.txt"]
    assert data.documents(files[0]) == ["one doc", "two"]
    stream = data.tokenize_file(files[0], tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert stream[0] == bos and stream[-1] == eos and list(stream).count(eos) == 2 and list(stream).count(bos) == 2


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"  \n\n ", "is empty"),
    (b"\x00\x01\x02binary", "looks binary"),
    (b"caf\xe9 latin-1", "not UTF-8"),
])
def test_bad_files_give_clear_errors(tmp_path, tokenizer, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        data.pack([bad], tokenizer, 16, cache_dir=tmp_path / "cache")


def test_bad_paths_and_jsonl(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.pack([tmp_path / "nope.txt"], tokenizer, 16, cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no text files"):
        data.pack([tmp_path / "empty"], tokenizer, 16, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="no data given"):
        data.pack([], tokenizer, 16, cache_dir=tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*string field \"text\""):
        data.pack([bad], tokenizer, 16, cache_dir=tmp_path)
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        data.pack([bad], tokenizer, 16, cache_dir=tmp_path)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(ValueError, match="fewer than one block"):
        data.pack([short], tokenizer, 64, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="block_size"):
        data.pack([short], tokenizer, 1, cache_dir=tmp_path)


# ----- packing and the cache ----------------------------------------------------------------------------
def test_pack_splits_each_file_and_packs_with_separators(corpus, tokenizer, tmp_path):
    block = 32
    packed = data.pack([corpus], tokenizer, block, val_fraction=0.1, cache_dir=tmp_path)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    streams = [data.tokenize_file(corpus / name, tokenizer) for name in ("a.txt", "b.txt")]
    cuts = [len(s) - int(round(len(s) * 0.1)) for s in streams]
    # Validation text is the end of each file, never trained on; the cut is a document boundary.
    train = np.concatenate([np.r_[s[:c], eos] for s, c in zip(streams, cuts)])
    val = np.concatenate([np.r_[bos, s[c:]] for s, c in zip(streams, cuts)])
    assert packed.train.shape == (len(train) // block, block) and packed.val.shape == (len(val) // block, block)
    assert np.array_equal(packed.train.reshape(-1), train[:packed.train.size])
    assert np.array_equal(packed.val.reshape(-1), val[:packed.val.size])
    assert train[0] == bos and list(train).count(eos) == 2 == list(train).count(bos)
    assert packed.train.dtype == np.uint16 and not packed.from_cache


def test_cache_is_reused_and_invalidated(corpus, tokenizer, tmp_path, monkeypatch):
    first = data.pack([corpus], tokenizer, 32, val_fraction=0.1, cache_dir=tmp_path)
    assert isinstance(first.train, np.memmap)

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised again")
    monkeypatch.setattr(data, "token_chunks", no_tokenising)
    again = data.pack([corpus], tokenizer, 32, val_fraction=0.1, cache_dir=tmp_path)
    assert again.from_cache and again.key == first.key and np.array_equal(again.train, first.train)
    monkeypatch.undo()

    assert data.pack([corpus], tokenizer, 16, val_fraction=0.1, cache_dir=tmp_path).key != first.key
    assert data.pack([corpus], tokenizer, 32, val_fraction=0.2, cache_dir=tmp_path).key != first.key
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "a.txt").write_text(TEXT_A)
    before = data.pack([copy], tokenizer, 32, cache_dir=tmp_path)
    (copy / "a.txt").write_text(TEXT_A + "\n\nmore text")
    os.utime(copy / "a.txt", ns=(1, 1))
    after = data.pack([copy], tokenizer, 32, cache_dir=tmp_path)
    assert after.key != before.key and not after.from_cache
    # No temporary files are left behind.
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_interrupted_cache_write_is_not_used(corpus, tokenizer, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = data.token_chunks

    def fail_on_second(path, tok, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(path, tok, **kwargs)
    monkeypatch.setattr(data, "token_chunks", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        data.pack([corpus], tokenizer, 32, cache_dir=tmp_path)
    monkeypatch.undo()
    assert not list(tmp_path.iterdir())  # no half-written entry, no leftovers
    assert not data.pack([corpus], tokenizer, 32, cache_dir=tmp_path).from_cache


# ----- the sampler ---------------------------------------------------------------------------------------
def test_block_sampler_is_seeded_resumable_and_covers_each_epoch():
    sampler = data.BlockSampler(10, seed=3)
    stream = sampler.indices(0, 35)
    assert all(sorted(stream[e * 10:(e + 1) * 10]) == list(range(10)) for e in range(3))
    assert not np.array_equal(stream[:10], stream[10:20])  # a fresh order each epoch
    fresh = data.BlockSampler(10, seed=3)
    assert np.array_equal(fresh.indices(17, 11), stream[17:28])  # any position, any process, no state
    assert not np.array_equal(data.BlockSampler(10, seed=4).indices(0, 10), stream[:10])
    with pytest.raises(ValueError, match="no training blocks"):
        data.BlockSampler(0, seed=0)


# ----- bounded memory: devices, huge lines ---------------------------------------------------------------
def test_devices_and_pipes_are_refused(tmp_path, tokenizer):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    for path in [fifo, *(Path(p) for p in ("/dev/zero",) if Path(p).exists())]:
        with pytest.raises(ValueError, match="not a regular file or folder"):
            data.pack([path], tokenizer, 16, cache_dir=tmp_path / "cache")


def test_a_huge_file_without_newlines_streams_in_bounded_memory(tmp_path, tokenizer, monkeypatch):
    import tracemalloc
    # Small limits stand in for the real ones, so a 0.8 MB one-line file plays a many-GB one.
    monkeypatch.setattr(data, "READ_BYTES", 4096)
    monkeypatch.setattr(data, "MAX_PIECE_CHARS", 4096)
    monkeypatch.setattr(data, "CHUNK_CHARS", 512)
    monkeypatch.setattr(data, "TOKENIZE_BATCH", 4)
    monkeypatch.setattr(data, "TOKENIZE_CHARS", 2048)
    words = "the king spoke and the queen answered him".split()
    text = " ".join(words[(i * 7) % len(words)] for i in range(150_000))  # ~0.8 MB, no newline
    (tmp_path / "line.txt").write_text(text)
    tracemalloc.start()
    try:
        packed = data.pack([tmp_path / "line.txt"], tokenizer, 32, cache_dir=tmp_path / "cache", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(text) / 3, peak  # reading it whole would hold the bytes and the text: 2x its size
    # Cut at whitespace, the pieces tokenise exactly as the whole text does.
    whole = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert np.array_equal(packed.train.reshape(-1), np.asarray(whole[:packed.train.size]))

    # A run with no whitespace at all is cut at the limit: every character still arrives, once.
    run = "x" * 20_000 + " and a tail"
    pieces = list(data.text_pieces([run[i:i + 3000] for i in range(0, len(run), 3000)]))
    assert "".join(pieces) == run and max(map(len, pieces)) <= 4096


def test_the_streamed_validation_split_matches_split_stream(corpus, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "READ_BYTES", 1000)  # many blocks per file, characters split across them
    (tmp_path / "u.txt").write_text(TEXT_A + "\n\nnaïve café 日本語 " * 50)
    files = [corpus / "a.txt", tmp_path / "u.txt", corpus / "b.txt"]
    packed = data.pack(files, tokenizer, 16, val_fraction=0.2, cache_dir=tmp_path / "cache", progress=False)
    parts = [data.split_stream(data.tokenize_file(f, tokenizer), 0.2, tokenizer) for f in files]
    for split in ("train", "val"):
        expected = np.concatenate([p[split] for p in parts])
        assert np.array_equal(getattr(packed, split).reshape(-1), expected[:getattr(packed, split).size])


def test_a_jsonl_line_over_the_limit_is_refused(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(data, "MAX_RECORD_BYTES", 1000)
    bad = tmp_path / "docs.jsonl"
    bad.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "y" * 5000}) + "\n")
    with pytest.raises(ValueError, match=r"docs.jsonl:2: a line longer than 1,000 bytes"):
        data.pack([bad], tokenizer, 16, cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    bad.write_text('{"text": "fine"}\n' + "[" * 100_000 + "\n")  # nested too deep for the JSON parser
    with pytest.raises(ValueError, match=r"docs.jsonl:2: not valid JSON"):
        data.pack([bad], tokenizer, 16, cache_dir=tmp_path / "cache")
