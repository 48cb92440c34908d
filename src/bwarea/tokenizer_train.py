"""Train a byte-level BPE tokenizer on text files and save it in the transformers format.

Byte-level BPE covers every input (no unknown characters), so a small vocabulary of a few thousand is enough
for a small model. The saved folder loads with ``bwarea.load_tokenizer`` (and ``AutoTokenizer``) and already
has BOS, EOS, PAD and UNK, so nothing is added on load; encoding adds BOS at the start, as the documents were
packed for training.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from .data import document_pieces, resolve_files

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def _texts(files: list[Path]):
    for path in tqdm(files, desc="reading", unit="file", disable=len(files) < 2):
        for pieces in document_pieces(path):  # streamed: bounded memory whatever the file's size
            yield from pieces


def train_tokenizer(data, vocab_size: int, out_dir, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``data`` (files, folders, JSONL) and save it to ``out_dir``.

    vocab_size: the total size, special tokens and the 256 byte tokens included (at least 260).
    -> the saved tokenizer (ids 0-3 are <unk> <s> </s> <pad>).
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + "
                         f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    files = resolve_files(data)
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_texts(files), trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    # BOS at the start of every encoding: prompts then begin as the packed training documents do.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    # Left padding written into tokenizer_config.json: a batch of prompts generates together, also for users who
    # load the model folder with plain transformers (its tokenizer class pads on the right by default).
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=1_000_000,
                                        clean_up_tokenization_spaces=False, padding_side="left", **SPECIAL_TOKENS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return tokenizer
