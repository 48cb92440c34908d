"""Training text -> packed token blocks, cached as memory-mapped arrays.

    files, folders, JSONL ("text" field)  ->  documents  ->  BOS doc EOS BOS doc EOS ...  ->  (n_blocks, block_size)

Every source file is split on its own: the last ``val_fraction`` of its tokens goes to validation, so each
source is represented in both splits and validation text is never trained on. The packed arrays live in a
cache folder keyed by the files (path, size, mtime), the tokenizer and the block size, so a re-run with the
same inputs memory-maps them instead of tokenising again.

Files are read and tokenised as a stream, in blocks, with their tokens written straight to the cache: memory
stays bounded whatever a file's size or line length (a JSONL line longer than MAX_RECORD_BYTES is refused).
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

TEXT_SUFFIXES = {".txt", ".text", ".md", ".jsonl"}
CACHE_VERSION = 1
# Plain text is tokenised in paragraph chunks of about this many characters (fast batch encoding).
CHUNK_CHARS = 16384
# Files are read in blocks of this many bytes; a stretch of text with no paragraph break is cut (at whitespace
# where there is some) once it reaches MAX_PIECE_CHARS, so no file is ever held whole in memory. (The tokenizer
# needs about 200 bytes per character of one piece: a 1M-character line would take 200 MB.)
READ_BYTES = 1 << 20
MAX_PIECE_CHARS = 1 << 16
# One JSONL record is one line, read whole: longer lines are refused rather than read without bound.
MAX_RECORD_BYTES = 64 << 20
# Pieces of text handed to the tokenizer at once, and their characters: the tokenizer's working memory is
# several hundred bytes per token, so a call is kept to about a million characters.
TOKENIZE_BATCH = 256
TOKENIZE_CHARS = 1 << 20


def default_cache_dir() -> Path:
    return Path(os.environ.get("BWAREA_CACHE", Path.home() / ".cache" / "bwarea")) / "blocks"


# ----- sources ---------------------------------------------------------------------------------------------
def resolve_files(paths) -> list[Path]:
    """Files and folders -> the sorted list of text files to read (folders: *.txt *.text *.md *.jsonl, recursive).

    Raises FileNotFoundError for a missing path and ValueError for a folder holding no text files.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("no data given: pass at least one text file, folder or JSONL file")
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"data path {str(p)!r} does not exist")
        if not p.is_dir() and not p.is_file():
            # A device (/dev/zero), pipe or socket has no size or end to cache by, and may never end.
            raise ValueError(f"data path {str(p)!r} is not a regular file or folder (a device, pipe or socket); "
                             "give text files, folders or JSONL")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise ValueError(f"data folder {str(p)!r} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
            files.extend(found)
        else:
            files.append(p)
    return [f.resolve() for f in files]


def _binary(path: Path, offset: int) -> ValueError:
    return ValueError(f"data file {str(path)!r} looks binary (a NUL byte at offset {offset}); give UTF-8 text "
                      "or JSONL")


def text_blocks(path: Path, on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
    """A text file's text, decoded in blocks of about READ_BYTES; ValueError for an empty or binary (NUL bytes,
    not UTF-8) file. ``on_bytes(n)`` is told each block's size (progress)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, seen_text = 0, False
    with open(path, "rb") as f:
        while True:
            raw = f.read(READ_BYTES)
            if b"\x00" in raw:
                raise _binary(path, offset + raw.index(b"\x00"))
            pending = len(decoder.getstate()[0])  # bytes of a character split over the previous block
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as err:
                raise ValueError(f"data file {str(path)!r} is not UTF-8 text (bad byte at offset "
                                 f"{offset - pending + err.start}); convert it to UTF-8") from None
            offset += len(raw)
            if on_bytes is not None and raw:
                on_bytes(len(raw))
            if text:
                seen_text = seen_text or not text.isspace()
                yield text
            if not raw:
                break
    if not seen_text:
        raise ValueError(f"data file {str(path)!r} is empty")


def read_text(path: Path) -> str:
    """A (small) file's whole text; ValueError for an empty or binary (NUL bytes, not UTF-8) file."""
    return "".join(text_blocks(path))


def _record(path, number: int, line: str, field: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    except RecursionError:
        raise ValueError(f"{path}:{number}: not valid JSON (nested too deeply)") from None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise ValueError(f"{path}:{number}: each JSONL line needs a string field \"{field}\"")
    return record


def jsonl_records(path: Path, text: str, field: str) -> list[dict]:
    """JSONL text -> its records (blank lines skipped), each checked to be an object with a string ``field``.

    Errors name the file and the 1-based line. Shared by the training data and the RL prompt files."""
    return [_record(path, number, line, field) for number, line in enumerate(text.splitlines(), 1)
            if line.strip()]


def jsonl_texts(path: Path, on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
    """A JSONL file's non-empty "text" fields, one line at a time (a line over MAX_RECORD_BYTES is refused)."""
    offset, seen_line, seen_text = 0, False, False
    with open(path, "rb") as f:
        for number in itertools.count(1):
            raw = f.readline(MAX_RECORD_BYTES + 1)
            if not raw:
                break
            if len(raw) > MAX_RECORD_BYTES:
                raise ValueError(f"{path}:{number}: a line longer than {MAX_RECORD_BYTES:,} bytes; a JSONL "
                                 "record must fit on one line of that size (split the document)")
            if b"\x00" in raw:
                raise _binary(path, offset + raw.index(b"\x00"))
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"data file {str(path)!r} is not UTF-8 text (bad byte at offset "
                                 f"{offset + err.start}); convert it to UTF-8") from None
            offset += len(raw)
            if on_bytes is not None:
                on_bytes(len(raw))
            if not line.strip():
                continue
            seen_line = True
            text = _record(path, number, line, "text")["text"]
            if text:
                seen_text = True
                yield text
    if not seen_line:
        raise ValueError(f"data file {str(path)!r} is empty")
    if not seen_text:
        raise ValueError(f"data file {str(path)!r} has no non-empty \"text\" records")


def documents(path: Path) -> list[str]:
    """One (small) file -> its documents: the whole text for plain text, each record's "text" for JSONL."""
    if path.suffix.lower() == ".jsonl":
        return list(jsonl_texts(path))
    return [read_text(path)]


def document_pieces(path: Path, on_bytes: Callable[[int], None] | None = None) -> Iterator[Iterator[str]]:
    """One file -> for each document, its text in pieces of about CHUNK_CHARS (``text_pieces``), read lazily."""
    if path.suffix.lower() == ".jsonl":
        for text in jsonl_texts(path, on_bytes):
            yield text_pieces([text])
    else:
        yield text_pieces(text_blocks(path, on_bytes))


def paragraph_chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Split before blank-line runs into chunks of about ``size`` characters.

    Cutting just before the whitespace run keeps byte-level BPE pre-tokens whole, so chunked tokenisation
    matches tokenising the whole text at once.
    """
    cuts = [m.start() for m in re.finditer(r"(?<=\S)\n\s*\n", text)]
    chunks, start = [], 0
    for cut in cuts:
        if cut - start >= size:
            chunks.append(text[start:cut])
            start = cut
    chunks.append(text[start:])
    return [c for c in chunks if c]


_PARAGRAPH_CUT = re.compile(r"(?<=\S)\n\s*\n")
_SPACE_BEFORE = re.compile(r"\s(?=\S)")  # reversed text: a whitespace character after a non-space one


def text_pieces(blocks: Iterable[str], size: int | None = None, limit: int | None = None) -> Iterator[str]:
    """Text arriving in blocks -> the pieces ``paragraph_chunks`` cuts the whole text into, holding at most
    about ``limit`` characters at a time.

    Where no paragraph break comes within ``limit`` characters, the piece is cut before the last whitespace
    character that follows a non-space one (still a pre-token boundary for byte-level BPE), or, in a run of
    ``limit`` characters without whitespace, at ``limit``.
    """
    size = CHUNK_CHARS if size is None else size
    limit = MAX_PIECE_CHARS if limit is None else limit
    buf, start = "", 0
    for block in blocks:
        buf = buf[start:] + block
        start = 0
        while True:
            # Same rule as paragraph_chunks: the first paragraph break at least ``size`` characters in.
            if len(buf) - start < limit:
                m = _PARAGRAPH_CUT.search(buf, start + size)
                if m is None:
                    break  # wait for more text: the break may still come
                cut = m.start()
            elif (m := _PARAGRAPH_CUT.search(buf, start + size, start + limit)) is not None:
                cut = m.start()
            else:
                # The last such boundary in the window (searched backwards), so pieces stay few and long.
                window = buf[start + size - 1:start + limit][::-1]
                m = _SPACE_BEFORE.search(window)
                cut = start + limit - m.start() - 1 if m is not None else start + limit
            yield buf[start:cut]
            start = cut
    if buf[start:]:
        yield buf[start:]


def token_chunks(path: Path, tokenizer, batch: int | None = None,
                 on_bytes: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
    """One file -> its token stream in chunks of int64 arrays: BOS doc EOS for each document (BOS only if the
    tokenizer has one). At most ``batch`` pieces of text are tokenised at a time."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: documents cannot be separated when packing")
    bos = np.asarray([] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id], dtype=np.int64)
    eos = np.asarray([tokenizer.eos_token_id], dtype=np.int64)
    batch = batch or TOKENIZE_BATCH
    for pieces in document_pieces(path, on_bytes):
        yield bos
        for group in _groups(pieces, batch, TOKENIZE_CHARS):
            ids = tokenizer(group, add_special_tokens=False)["input_ids"]
            yield np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)
        yield eos


def _groups(pieces: Iterator[str], count: int, chars: int) -> Iterator[list[str]]:
    """Pieces -> lists of at most ``count`` pieces and about ``chars`` characters (one tokenizer call each)."""
    group, size = [], 0
    for piece in pieces:
        group.append(piece)
        size += len(piece)
        if len(group) >= count or size >= chars:
            yield group
            group, size = [], 0
    if group:
        yield group


def tokenize_file(path: Path, tokenizer, batch: int | None = None) -> np.ndarray:
    """One file -> its token stream (n,) int64, whole (``token_chunks`` streams it)."""
    return np.concatenate(list(token_chunks(path, tokenizer, batch)))


def split_stream(stream: np.ndarray, val_fraction: float, tokenizer) -> dict[str, np.ndarray]:
    """A file's token stream -> {"train": its start, "val": its last ``val_fraction``}.

    The cut becomes a document boundary: the train part ends with EOS and the validation part starts with
    BOS (if the tokenizer has one), so both splits keep the packing's separators.
    """
    n_val = int(round(len(stream) * val_fraction))
    if n_val == 0:
        return {"train": stream, "val": stream[:0]}
    cut = len(stream) - n_val
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return {"train": np.concatenate([stream[:cut], [tokenizer.eos_token_id]]),
            "val": np.concatenate([bos, stream[cut:]]).astype(stream.dtype)}


# ----- the cache -------------------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash that changes when the tokenizer's vocabulary, rules or special tokens change."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)).encode())
    return h.hexdigest()[:16]


def cache_key(files: list[Path], tokenizer, block_size: int, val_fraction: float) -> str:
    h = hashlib.sha256()
    tok = tokenizer_fingerprint(tokenizer)
    h.update(f"v{CACHE_VERSION} block={block_size} val={val_fraction!r} tok={tok}".encode())
    for f in files:
        st = f.stat()
        h.update(f"\n{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


@dataclass
class PackedData:
    """The packed blocks of one data set: ``train`` and ``val`` are read-only (n_blocks, block_size) arrays."""

    train: np.ndarray
    val: np.ndarray
    block_size: int
    cache_dir: Path
    key: str
    from_cache: bool

    @property
    def train_tokens(self) -> int:
        return int(self.train.size)


def _open_blocks(folder: Path, key: str, split: str, meta: dict) -> np.ndarray:
    n = meta[f"{split}_blocks"]
    if n == 0:
        return np.zeros((0, meta["block_size"]), dtype=meta["dtype"])
    return np.memmap(folder / f"{key}.{split}.bin", dtype=meta["dtype"], mode="r", shape=(n, meta["block_size"]))


def pack(data, tokenizer, block_size: int, val_fraction: float = 0.0, cache_dir=None,
         progress: bool = True) -> PackedData:
    """Tokenise and pack ``data`` (files/folders) into blocks, or open the cached blocks.

    data: paths; tokenizer: a transformers tokenizer with an EOS token; block_size: tokens per block;
    val_fraction: the share of each file's tokens (its end) held out for validation, in [0, 0.5].
    -> PackedData with train (n_train, block_size) and val (n_val, block_size) memory-mapped arrays.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (a block needs a token and a next token), got {block_size}")
    if not 0.0 <= val_fraction <= 0.5:
        raise ValueError(f"val_fraction must lie in [0, 0.5], got {val_fraction}")
    files = resolve_files(data)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    key = cache_key(files, tokenizer, block_size, val_fraction)
    meta_file = folder / f"{key}.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        return PackedData(_open_blocks(folder, key, "train", meta), _open_blocks(folder, key, "val", meta),
                          block_size, folder, key, from_cache=True)

    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    counts = {"train": 0, "val": 0}
    tmp = {split: tempfile.NamedTemporaryFile(dir=folder, prefix=f".{key}.{split}.", suffix=".tmp", delete=False)
           for split in counts}
    try:
        from .checkpoint import share_like_new_file
        for f in tmp.values():
            share_like_new_file(f.name)
        bar = tqdm(total=sum(f.stat().st_size for f in files), desc="tokenising", unit="B", unit_scale=True,
                   disable=not progress)
        with bar:
            for path in files:
                counts["train"], added = stream_file(path, tokenizer, dtype, val_fraction, tmp["train"],
                                                     counts["train"], tmp["val"], bar.update)
                counts["val"] += added
        for f in tmp.values():
            f.close()
        meta = {"version": CACHE_VERSION, "block_size": block_size, "dtype": np.dtype(dtype).name,
                "files": [str(f) for f in files], "val_fraction": val_fraction,
                "tokenizer": tokenizer_fingerprint(tokenizer)}
        for split in counts:
            meta[f"{split}_blocks"] = counts[split] // block_size
            meta[f"{split}_tokens"] = counts[split]
            # The tail shorter than a block is dropped; the file is cut to whole blocks.
            os.truncate(tmp[split].name, meta[f"{split}_blocks"] * block_size * np.dtype(dtype).itemsize)
            os.replace(tmp[split].name, folder / f"{key}.{split}.bin")
        # The metadata file is written last: its presence marks a complete cache entry.
        meta_tmp = folder / f".{key}.json.tmp"
        meta_tmp.write_text(json.dumps(meta, indent=1))
        os.replace(meta_tmp, meta_file)
    finally:
        for f in tmp.values():
            f.close()
            if os.path.exists(f.name):
                os.remove(f.name)
    if meta["train_blocks"] == 0:
        raise ValueError(f"the data holds {counts['train']} training tokens, fewer than one block of {block_size}; "
                         "give more text or a smaller --block-size")
    return PackedData(_open_blocks(folder, key, "train", meta), _open_blocks(folder, key, "val", meta),
                      block_size, folder, key, from_cache=False)


def stream_file(path: Path, tokenizer, dtype, val_fraction: float, train_file, train_tokens: int, val_file,
                on_bytes=None) -> tuple[int, int]:
    """Append one file's tokens to the open train file (which holds ``train_tokens`` tokens), then move its
    last ``val_fraction`` to the val file as ``split_stream`` does, in bounded memory.

    -> (the train file's token count now, the tokens added to the val file).
    """
    itemsize = np.dtype(dtype).itemsize
    n = 0
    for ids in token_chunks(path, tokenizer, on_bytes=on_bytes):
        train_file.write(ids.astype(dtype).tobytes())
        n += len(ids)
    n_val = int(round(n * val_fraction))
    if n_val == 0:
        return train_tokens + n, 0
    cut = train_tokens + n - n_val
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    val_file.write(np.asarray(bos, dtype=dtype).tobytes())
    train_file.flush()
    train_file.seek(cut * itemsize)
    while chunk := train_file.read(8 << 20):
        val_file.write(chunk)
    train_file.truncate(cut * itemsize)
    train_file.seek(0, os.SEEK_END)
    train_file.write(np.asarray([tokenizer.eos_token_id], dtype=dtype).tobytes())
    return cut + 1, len(bos) + n_val


# ----- batches ---------------------------------------------------------------------------------------------
class BlockSampler:
    """A seeded, resumable order over the blocks: a fresh permutation each epoch.

    Sample k of the global stream is block ``perm[epoch(k)][k % n]``, so the data position is just the number
    of samples consumed, and every process can find its own share without talking to the others.
    """

    def __init__(self, n_blocks: int, seed: int):
        if n_blocks < 1:
            raise ValueError("no training blocks to sample from")
        self.n, self.seed = n_blocks, seed
        self._epoch, self._perm = -1, None

    def indices(self, start: int, count: int) -> np.ndarray:
        """Global sample positions [start, start+count) -> block indices (count,)."""
        out = np.empty(count, dtype=np.int64)
        for i, k in enumerate(range(start, start + count)):
            epoch = k // self.n
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
            out[i] = self._perm[k % self.n]
        return out


def batch_tensor(blocks: np.ndarray, index: np.ndarray):
    """Rows of a block array -> a (len(index), block_size) LongTensor."""
    return torch.from_numpy(np.asarray(blocks[index], dtype=np.int64))
