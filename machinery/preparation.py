"""
Preparing a text for data.py: prepare. The file is streamed, never read whole: checked (UTF-8, not binary,
not empty), tokenized a chunk at a time (GPT-2's BPE on all cores), and the ids written as they come into
train.bin and val.bin, each replacing the old file only once it is complete; a killed preparation's temp
files are removed. Also what a dataset folder must hold before training can use it.
"""

import codecs
import hashlib
import json
import os
import re

import numpy as np

from machinery.checks import fields, read_utf8
from machinery.cli import UsageError
from machinery.faults import atomic_write, remove_leftovers, writing
from machinery.gpt2_bpe import gpt2_encoding
from machinery.sources import KNOWN_DATASETS
from machinery.workers import in_order

TRAIN_FRACTION = 0.9  # the first 90% of a text's ids for training, the last 10% for validation
PROGRESS_FILE = "progress.tmp.json"  # there while a corpus is being prepared (corpus.py): what is safely on disk
CHUNK_BYTES = 1 << 22  # text is read, tokenized and written 4 MiB at a time, never all at once
# what a killed preparation's temporary files look like (write_splits, atomic_write)
DATA_LEFTOVER = re.compile(r"(?:train\.bin|all\.bin|val\.bin|meta\.json|input\.txt|progress\.tmp\.json)\.tmp(\d+)")


def write_json(path, value):
    """path holds value as JSON, written atomically; a full disk is one line naming it."""
    with writing(path), atomic_write(path) as f:
        json.dump(value, f)  # (ASCII: \u escapes, so a path that is not UTF-8 is kept too)


def read_text_chunks(path, progress=None, decode=True):
    """Yield the file's text in pieces of about CHUNK_BYTES, checking that it is UTF-8 text (decode=False:
    its raw bytes, CHUNK_BYTES at a time)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK_BYTES)
            if progress is not None:
                progress.update(len(block))
            if not decode:
                if not block:
                    return
                yield block
                continue
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise UsageError(f"{path} is not UTF-8 text ({e.reason} near byte {f.tell() - len(block) + e.start}); "
                                 "convert it to UTF-8 first")
            if text:
                yield text
            if not block:
                return


def split_at_word_boundary(text):
    """(head, tail) cut before a whitespace character that follows a non-whitespace one.

    GPT-2's pre-tokenizer never joins a non-space character to the whitespace after it, so
    tokenizing head and tail separately gives exactly the ids of the whole text."""
    for cut in range(len(text) - 1, 0, -1):
        if text[cut].isspace() and not text[cut - 1].isspace():
            return text[:cut], text[cut:]
    return "", text


def char_ids(texts, lookup):
    """Vectorised char tokenizing: code points through a lookup table (code point -> id)."""
    for text in texts:
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        yield lookup[codepoints]


def encode_text(text):
    """GPT-2 ids of a text as uint16, straight from tiktoken's buffer (no Python list of ints); run in the
    worker processes."""
    try:
        return gpt2_encoding().encode_to_numpy(text, disallowed_special=()).astype(np.uint16)
    except UnicodeEncodeError:  # lone surrogates (JSON can escape them): encode_ordinary replaces them
        return np.asarray(gpt2_encoding().encode_ordinary(text), dtype=np.uint16)


def cut_at_words(texts):
    """The stream of texts cut again at whitespace (split_at_word_boundary), so that every piece
    encodes to exactly the ids it has inside the whole stream."""
    carry = ""
    for text in texts:
        head, carry = split_at_word_boundary(carry + text)
        if head:
            yield head
    yield carry


def gpt2_ids(texts, workers):
    """BPE ids of the stream, in order: chunks cut at whitespace, encoded by `workers` processes."""
    return in_order(encode_text, cut_at_words(texts), workers)


def scan_bytes(path):
    """One pass over the raw bytes: their SHA-256 and a histogram of byte values (NUL means binary)."""
    digest, counts = hashlib.sha256(), np.zeros(256, dtype=np.int64)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
            counts += np.bincount(np.frombuffer(block, dtype=np.uint8), minlength=256)
    if counts[0]:
        raise UsageError(f"{path} looks binary (it has NUL bytes); give a UTF-8 text file")
    return digest.hexdigest(), counts


def scan_chars(path):
    """The sorted set of characters in a (UTF-8) file, in one streaming pass."""
    from tqdm import tqdm
    seen = np.zeros(0x110000, dtype=bool)
    with tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc="scanning", leave=False,
              disable=None) as bar:
        for text in read_text_chunks(path, bar):
            seen[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)] = True
    return [chr(c) for c in np.flatnonzero(seen)]


def write_splits(out_dir, stream, size):
    """Write the ids of stream(progress bar) as out_dir/train.bin (the first TRAIN_FRACTION) and val.bin (the
    rest); returns (train tokens, val tokens). Each bin replaces the old one only once it is complete
    (faults.py: atomic_write), and a full disk is one line."""
    remove_leftovers(out_dir, DATA_LEFTOVER)
    with writing(out_dir, kept="the dataset there is unchanged"):
        n_tokens, n_train = write_bins(out_dir, stream, size)
    return n_train, n_tokens - n_train


def write_bins(out_dir, stream, size):
    from tqdm import tqdm
    # every id goes to train.bin's temp file first; the last 10% are then moved into val.bin
    with atomic_write(os.path.join(out_dir, "train.bin"), "w+b") as out:
        with tqdm(total=size, unit="B", unit_scale=True, desc="tokenizing", disable=None) as bar:
            for ids in stream(bar):
                out.write(ids.tobytes())
        n_tokens = out.tell() // 2
        n_train = int(n_tokens * TRAIN_FRACTION)
        out.seek(2 * n_train)
        with atomic_write(os.path.join(out_dir, "val.bin"), "wb") as val:
            for block in iter(lambda: out.read(1 << 22), b""):
                val.write(block)
            out.truncate(2 * n_train)
            meta_path = os.path.join(out_dir, "meta.json")
            if os.path.exists(meta_path):  # both bins are written: only now may the old dataset go
                os.remove(meta_path)  # old meta with new bins would describe the wrong ids: none until the new one
    return n_tokens, n_train


def check_uint16(vocab_size, what):
    """train.bin and val.bin hold ids as uint16: a larger vocabulary must be refused, not wrapped."""
    if vocab_size > np.iinfo(np.uint16).max + 1:
        raise UsageError(f"{what} has {vocab_size:,} token ids, more than the 65,536 that uint16 ids hold; "
                         "use GPT-2's BPE (50,257 ids)")


def check_text(input_path, out_dir):
    """(SHA-256, byte histogram, size) of a UTF-8 text to prepare into out_dir, or one UsageError."""
    if not os.path.isfile(input_path):
        raise UsageError(f"input file '{input_path}' not found")
    size = os.path.getsize(input_path)
    if size == 0:
        raise UsageError(f"{input_path} is empty; give a text file with some content")
    with writing(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    return (*scan_bytes(input_path), size)


def text_chars(path, byte_counts):
    """The sorted characters of the text: its bytes when it is pure ASCII, else one scan of its characters."""
    if not byte_counts[128:].any():
        return [chr(b) for b in np.flatnonzero(byte_counts)]
    chars = scan_chars(path)
    check_uint16(len(chars), path)
    return chars


def char_id_stream(path, stoi):
    """stream(progress bar) -> the text's char ids, a chunk at a time, through a lookup table indexed by
    code point (by byte when every character is ASCII: then nothing needs decoding)."""
    ascii_only = max(map(ord, stoi)) < 128
    lookup = np.zeros(128 if ascii_only else 0x110000, dtype=np.uint16)
    lookup[[ord(c) for c in stoi]] = list(stoi.values())
    if ascii_only:
        return lambda bar: (lookup[np.frombuffer(block, dtype=np.uint8)]
                            for block in read_text_chunks(path, bar, decode=False))
    return lambda bar: char_ids(read_text_chunks(path, bar), lookup)


def gpt2_id_stream(path, size):
    """stream(progress bar) -> the text's GPT-2 ids, chunks encoded by one process per core (at most one per
    chunk)."""
    workers = min(os.cpu_count() or 1, -(-size // CHUNK_BYTES))
    return lambda bar: gpt2_ids(read_text_chunks(path, bar), workers)


def needs_preparing(data_dir, name):
    """Whether data_dir/name is a known dataset still to prepare (data.py: load_meta then prepares it); a
    folder that is not ready for another reason is one UsageError naming the data.py command that fixes it."""
    folder = os.path.join(data_dir, name)
    meta_path = os.path.join(folder, "meta.json")
    if all(os.path.isfile(os.path.join(folder, f)) for f in ("train.bin", "val.bin", "meta.json")):
        return False
    if os.path.isfile(os.path.join(folder, PROGRESS_FILE)):
        raise UsageError(f"{folder} is being prepared, or its preparation was interrupted; run the same "
                         "python data.py command again to finish it")
    if name not in KNOWN_DATASETS and os.path.isdir(folder) and not os.path.isfile(meta_path):
        text = os.path.join(folder, "input.txt")
        text = text if os.path.isfile(text) else "your.txt"
        where = "" if data_dir == "data" else f" --data_dir {data_dir}"
        raise UsageError(f"{folder} has no meta.json (which tokenizer made its ids), so it cannot be used; "
                         f"prepare it again: python data.py --input {text} --name {name}{where} --tokenizer char")
    if name not in KNOWN_DATASETS:
        raise UsageError(f"dataset '{name}' is not prepared in {folder}; run: "
                         f"python data.py --input your.txt --name {name} --tokenizer char "
                         "(a corpus of documents: --folder DIR or --hf NAME instead of --input)")
    return True


def read_meta(data_dir, name):
    """data_dir/name/meta.json, its fields checked (a vocabulary that uint16 ids can hold, a tokenizer this
    code knows), and its .bin files a whole number of ids; or one UsageError saying to prepare it again."""
    meta_path = os.path.join(data_dir, name, "meta.json")
    fix = "prepare the dataset again with data.py"
    try:
        meta = json.loads(read_utf8(meta_path, "dataset metadata"))
    except ValueError:
        raise UsageError(f"{meta_path} is not valid JSON; {fix}")
    fields(meta, {"vocab_size": (int, 1, np.iinfo(np.uint16).max + 1), "tokenizer": (dict, None, None)}, meta_path,
           fix)
    tokenizer = meta["tokenizer"]
    if tokenizer.get("kind") == "char":
        fields(tokenizer, {"chars": (list, meta["vocab_size"], meta["vocab_size"])}, f"{meta_path} tokenizer", fix)
        if not all(isinstance(c, str) and len(c) == 1 for c in tokenizer["chars"]):
            raise UsageError(f"{meta_path}: the tokenizer's chars are not single characters; {fix}")
    elif tokenizer.get("kind") != "gpt2":
        raise UsageError(f"{meta_path}: unknown tokenizer {tokenizer.get('kind')!r}; {fix}")
    for split in ("train", "val"):
        path = os.path.join(data_dir, name, f"{split}.bin")
        if os.path.getsize(path) % 2:
            raise UsageError(f"{path} is {os.path.getsize(path):,} bytes, not a whole number of 2-byte ids; {fix}")
    return meta


def check_long_enough(dataset, block_size, **splits):
    """Every split must hold at least one window and its target: block_size + 1 tokens."""
    for split, data in splits.items():
        if len(data) < block_size + 1:
            raise UsageError(f"the {split} split of '{dataset}' has {len(data)} tokens, fewer than "
                             f"block_size + 1 = {block_size + 1}; use a longer text or a smaller block_size")
