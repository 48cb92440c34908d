"""Training text -> packed token blocks, cached as memory-mapped arrays.

    files, folders, JSONL ("text" field)  ->  documents  ->  BOS doc EOS BOS doc EOS ...  ->  (n_blocks, block_size)

Every source file is split on its own: the last ``val_fraction`` of its tokens goes to validation, so each
source is represented in both splits and validation text is never trained on. The packed arrays live in a
cache folder keyed by the files (path, size, mtime), the tokenizer and the block size, so a re-run with the
same inputs memory-maps them instead of tokenising again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

TEXT_SUFFIXES = {".txt", ".text", ".md", ".jsonl"}
CACHE_VERSION = 1
# Plain text is tokenised in paragraph chunks of about this many characters (fast batch encoding).
CHUNK_CHARS = 16384


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
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise ValueError(f"data folder {str(p)!r} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
            files.extend(found)
        else:
            files.append(p)
    return [f.resolve() for f in files]


def read_text(path: Path) -> str:
    """A file's text; ValueError for an empty or binary (NUL bytes, not UTF-8) file."""
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"data file {str(path)!r} is empty")
    if b"\x00" in raw[:65536]:
        raise ValueError(f"data file {str(path)!r} looks binary (it holds NUL bytes); give UTF-8 text or JSONL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"data file {str(path)!r} is not UTF-8 text (bad byte at offset {err.start}); "
                         "convert it to UTF-8") from None


def jsonl_records(path: Path, text: str, field: str) -> list[dict]:
    """JSONL text -> its records (blank lines skipped), each checked to be an object with a string ``field``.

    Errors name the file and the 1-based line. Shared by the training data and the RL prompt files."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ValueError(f"{path}:{number}: each JSONL line needs a string field \"{field}\"")
        records.append(record)
    return records


def documents(path: Path) -> list[str]:
    """One file -> its documents: the whole text for plain text, each record's "text" for JSONL."""
    text = read_text(path)
    if path.suffix.lower() != ".jsonl":
        return [text]
    docs = [record["text"] for record in jsonl_records(path, text, "text") if record["text"]]
    if not docs:
        raise ValueError(f"data file {str(path)!r} has no non-empty \"text\" records")
    return docs


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


def tokenize_file(path: Path, tokenizer, batch: int = 256) -> np.ndarray:
    """One file -> its token stream (n,) int64: BOS doc EOS for each document (BOS only if the tokenizer has one)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: documents cannot be separated when packing")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    out: list[int] = []
    for doc in documents(path):
        pieces = paragraph_chunks(doc)
        out.extend(bos)
        for i in range(0, len(pieces), batch):
            for ids in tokenizer(pieces[i:i + batch], add_special_tokens=False)["input_ids"]:
                out.extend(ids)
        out.append(tokenizer.eos_token_id)
    return np.asarray(out, dtype=np.int64)


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
        for path in tqdm(files, desc="tokenising", unit="file", disable=not progress):
            stream = tokenize_file(path, tokenizer)
            for split, part in split_stream(stream, val_fraction, tokenizer).items():
                tmp[split].write(part.astype(dtype).tobytes())
                counts[split] += len(part)
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
