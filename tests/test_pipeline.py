"""The whole pipeline in real processes: prepare -> train -> checkpoint -> generate."""

import json
import os
import shutil

import numpy as np
import torch

from machinery.checkpoint import load_checkpoint
from conftest import CORPUS, TINY, run_script
from data import tokenizer_from
from generate import load_model


def test_training_lowers_loss_and_saves_the_best_evaluated_state(trained_run):
    out, result = trained_run
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["type"] == "eval"]
    assert [e["iter"] for e in evals] == [0, 25, 50]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    best = min(evals, key=lambda e: e["val_loss"])
    tensors, meta = load_checkpoint(out / "best_model.pt")
    assert (meta["iter_num"], meta["best_val_loss"]) == (best["iter"], best["val_loss"])
    final, final_meta = load_checkpoint(out / "ckpt.pt")
    assert final_meta["iter_num"] == 50
    assert all(torch.equal(tensors["model"][k], final["model"][k]) for k in final["model"]) == (best["iter"] == 50)
    assert f"python generate.py --ckpt {out / 'best_model.pt'}" in result.stdout


def test_generate_prints_the_prompt_and_the_seeded_sample_of_its_settings(trained_run):
    """generate.py's text is the model's own sampling at the defaults it shows (temperature 0.8, top_k 200),
    from a generator seeded with --seed: the same seed repeats, another one differs."""
    out, _ = trained_run
    args = ["--ckpt", out / "best_model.pt", "--start", "ROMEO:", "--max_new_tokens", "60", "--seed", "7",
            "--device", "cpu"]
    first = run_script("generate.py", *args, check=True).stdout
    other = run_script("generate.py", *args[:-3], "8", "--device", "cpu", check=True).stdout
    model, tokenizer = load_model(str(out / "best_model.pt"), "cpu")
    x = torch.tensor([tokenizer.encode("ROMEO:")])
    ids = model.generate(x, 60, temperature=0.8, top_k=200, generator=torch.Generator().manual_seed(7))
    assert first == tokenizer.decode(ids[0].tolist()) + "\n---------------\n"
    assert other != first and other.startswith("ROMEO:")


def test_generate_finds_the_newest_best_model_by_bare_name(trained_run, tmp_path):
    out, _ = trained_run
    for name, age in (("older", 3600), ("newest", 0), ("oldest", 7200)):
        (tmp_path / name).mkdir()
        shutil.copy(out / "best_model.pt", tmp_path / name / "best_model.pt")
        os.utime(tmp_path / name / "best_model.pt", (1.7e9 - age, 1.7e9 - age))
    result = run_script("generate.py", "--ckpt", "best_model.pt", "--max_new_tokens", "5", "--device", "cpu",
                        cwd=tmp_path, check=True)
    assert result.stderr.strip().splitlines()[-1] == f"using {os.path.join('newest', 'best_model.pt')}"
    assert result.stdout.endswith("---------------\n")


def test_generate_reads_prompt_from_file_and_stops_on_string(trained_run, tmp_path):
    out, _ = trained_run
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("All:\n", encoding="utf-8")
    result = run_script("generate.py", "--ckpt", out / "best_model.pt", "--start", f"FILE:{prompt}",
                        "--temperature", "0", "--max_new_tokens", "200", "--stop", "\n", "--device", "cpu", check=True)
    sample = result.stdout.split("\n---------------\n")[0]
    assert sample.startswith("All:\n") and sample.endswith("\n") and sample.count("\n") == 2


def test_cached_and_uncached_generation_print_the_same_greedy_text(trained_run):
    out, _ = trained_run
    args = ["--ckpt", out / "best_model.pt", "--temperature", "0", "--max_new_tokens", "25", "--device", "cpu"]
    assert run_script("generate.py", *args, check=True).stdout == \
        run_script("generate.py", *args, "--no_kv_cache", check=True).stdout


def test_train_prepares_a_known_dataset_on_first_use(tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "shakespeare_char").mkdir(parents=True)
    (data_dir / "shakespeare_char" / "input.txt").write_text(CORPUS, encoding="utf-8")
    result = run_script("train.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", "--max_iters=2",
                        "--eval_interval=2", *TINY, check=True)
    assert "prepared" in result.stdout
    meta = json.loads((data_dir / "shakespeare_char" / "meta.json").read_text())
    assert meta["source"] == "input.txt" and meta["tokenizer"]["kind"] == "char"


def test_data_cli_prepares_any_text_into_splits_that_decode_back_to_it(tmp_path, corpus_file):
    run_script("data.py", "--input", corpus_file, "--name", "mine", "--tokenizer", "gpt2",
               "--data_dir", tmp_path, check=True)
    folder = tmp_path / "mine"
    meta = json.loads((folder / "meta.json").read_text())
    tokenizer = tokenizer_from(meta["tokenizer"])
    train, val = (np.fromfile(folder / f"{split}.bin", dtype=np.uint16) for split in ("train", "val"))
    assert tokenizer.decode(train.tolist()) + tokenizer.decode(val.tolist()) == CORPUS
    assert 0.85 < len(train) / (len(train) + len(val)) < 0.95  # about 90% for training
    assert meta["vocab_size"] == 50257


def test_early_stopping_ends_run_after_patience_evals(char_data, tmp_path):
    result = run_script("train.py", f"--data_dir={char_data}", "--dataset=tiny", f"--out_dir={tmp_path / 'o'}",
                        *TINY, "--max_iters=100", "--eval_interval=1", "--patience=1", "--learning_rate=1e-9",
                        "--warmup_iters=0", "--decay_lr=False", check=True)
    assert "early stop" in result.stdout
    evals = [json.loads(l) for l in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert max(e["iter"] for e in evals) < 100


def test_eval_at_start_false_skips_the_untrained_eval_but_eval_only_still_evaluates(char_data, tmp_path):
    out = tmp_path / "o"
    common = [f"--data_dir={char_data}", "--dataset=tiny", f"--out_dir={out}", *TINY]
    run_script("train.py", *common, "--max_iters=4", "--eval_interval=2", "--eval_at_start=False", check=True)
    evals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in evals if e["type"] == "eval"] == [2, 4]
    before = (out / "ckpt.pt").read_bytes()
    result = run_script("train.py", *common, "--init_from=resume", "--eval_only=True", check=True)
    assert "eval 4: train loss" in result.stdout  # a resumed eval_only run evaluates once, at its iteration
    assert (out / "ckpt.pt").read_bytes() == before  # and writes no checkpoint
