"""The whole pipeline in real processes: prepare -> train -> checkpoint -> generate."""

import json
import os

from conftest import CORPUS, TINY, run_script


def test_training_lowers_loss_and_saves_best_model(trained_run):
    out, result = trained_run
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["type"] == "eval"]
    assert [e["iter"] for e in evals] == [0, 25, 50]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert (out / "best_model.pt").exists() and (out / "ckpt.pt").exists()
    assert f"python generate.py --ckpt {out / 'best_model.pt'}" in result.stdout


def test_generate_prints_only_vocabulary_characters_and_seed_repeats(trained_run):
    out, _ = trained_run
    args = ["--ckpt", out / "best_model.pt", "--start", "ROMEO:", "--max_new_tokens", "60", "--seed", "7",
            "--device", "cpu"]
    first = run_script("generate.py", *args, check=True).stdout
    again = run_script("generate.py", *args, check=True).stdout
    other = run_script("generate.py", *args[:-3], "8", "--device", "cpu", check=True).stdout
    assert first == again and first != other
    sample = first.split("\n---------------\n")[0]
    assert sample.startswith("ROMEO:") and len(sample) == len("ROMEO:") + 60
    assert set(sample) <= set(CORPUS)


def test_generate_finds_best_model_by_bare_name(trained_run):
    out, _ = trained_run
    result = run_script("generate.py", "--ckpt", "best_model.pt", "--max_new_tokens", "5", "--device", "cpu",
                        cwd=out.parent, check=True)
    assert "out" in result.stderr and result.stdout.endswith("---------------\n")


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


def test_data_cli_prepares_any_text(tmp_path, corpus_file):
    run_script("data.py", "--input", corpus_file, "--name", "mine", "--tokenizer", "gpt2",
               "--data_dir", tmp_path, check=True)
    names = sorted(os.listdir(tmp_path / "mine"))
    assert names == ["meta.json", "train.bin", "val.bin"]


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
