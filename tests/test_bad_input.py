"""Every entry point, driven with bad input: each case must exit non-zero with one clear line on
stderr, no traceback, and leave every file as it was."""

import hashlib
import json
import os
import pickle

import pytest
import torch

from conftest import TINY, run_script


class Evil:
    """Unpickling this would run print(); a safe loader must refuse it."""

    def __reduce__(self):
        return (print, ("PWNED",))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, trained_run):
    """Files the bad inputs point at: datasets, configs, corrupt checkpoints."""
    from data import prepare
    root = tmp_path_factory.mktemp("bad")
    out, _ = trained_run
    (root / "tiny.txt").write_text("tiny corpus", encoding="utf-8")
    prepare(str(root / "tiny.txt"), str(root / "data" / "short"), "char")
    (root / "empty.txt").write_text("", encoding="utf-8")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (root / "latin1.txt").write_bytes("café".encode("latin-1"))
    (root / "code_config.py").write_text("import os\nos.system('echo PWNED')\n")
    (root / "typo_config.py").write_text("n_layer = 2\nlearning_rte = 1e-3\n")
    (root / "expr_config.py").write_text("max_iters = 10 * n_layer\n")
    good = (out / "best_model.pt").read_bytes()
    (root / "truncated.pt").write_bytes(good[: len(good) // 2])
    (root / "text.pt").write_text("hello, I am not a checkpoint")
    torch.save({"model": Evil()}, root / "evil.pt")
    torch.save({"weights": torch.zeros(2)}, root / "foreign.pt")
    payload = torch.load(out / "best_model.pt", weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, root / "future.pt")
    return root, out


def cases(root, out):
    data = f"--data_dir={root / 'data'}"
    trained_data = f"--data_dir={out.parent / 'data'}"
    ckpt = str(out / "best_model.pt")
    train = lambda *a: ("train.py", [*TINY, trained_data, "--dataset=tiny", f"--out_dir={root / 'o'}", *a])
    gen = lambda *a: ("generate.py", ["--ckpt", ckpt, "--device", "cpu", *a])
    return {
        "unknown key": (train("--n_embed=64"), "unknown config key 'n_embed' in --n_embed (did you mean 'n_embd'?)"),
        "wrong type": (train("--n_embd=abc"), "'n_embd' must be int"),
        "float for int": (train("--batch_size=1.5"), "'batch_size' must be int"),
        "bad bool": (train("--bias=maybe"), "'bias' must be bool"),
        "bad compile": (train("--compile=maybe"), "compile must be True, False or 'auto'"),
        "bad optimizer": (train("--optimizer=adam"), "did you mean 'adamw'"),
        "no value": (train("--max_iters"), "--max_iters needs a value: --max_iters=VALUE or --max_iters VALUE"),
        "missing config": (("train.py", ["config/nope.py"]), "config file 'config/nope.py' not found"),
        "code in config": (("train.py", [str(root / "code_config.py")]), "only `name = value` lines"),
        "typo in config": (("train.py", [str(root / "typo_config.py")]), "did you mean 'learning_rate'"),
        "expression in config": (("train.py", [str(root / "expr_config.py")]), "must be a literal"),
        "heads do not divide": (train("--n_embd=30", "--n_head=4"), "divisible by n_head"),
        "zero block": (train("--block_size=0"), "'block_size' must be at least 1"),
        "zero eval iters": (train("--eval_iters=0"), "'eval_iters' must be at least 1"),
        "negative iters": (train("--max_iters=-5"), "'max_iters' must not be negative"),
        "dropout out of range": (train("--dropout=1.5"), "dropout must be in [0, 1)"),
        "negative lr": (train("--learning_rate=-1"), "learning_rate must be positive"),
        "bad beta": (train("--beta2=1.0"), "beta2 must be in [0, 1)"),
        "bad attention": (train("--attention=fast"), "attention must be 'sdpa' or 'explicit'"),
        "missing gpu": (train("--device=cuda"), "device 'cuda' is not available"),
        "unknown device": (train("--device=tpu"), "unknown device 'tpu'"),
        "bad dtype": (train("--dtype=float8"), "dtype must be"),
        "bad init_from": (train("--init_from=gpt3"), "did you mean 'gpt2'"),
        "hub offline": (train("--init_from=gpt2", "--dataset=tiny"), "hub is unreachable"),
        "dataset missing": (train("--dataset=nothing_here"), "dataset 'nothing_here' is not prepared"),
        "corpus too short": (("train.py", [*TINY, data, "--dataset=short"]), "fewer than block_size + 1"),
        "resume without ckpt": (train("--init_from=resume"), "ckpt.pt' not found"),
        "resume other shape": (("train.py", [*TINY, trained_data, "--dataset=tiny", f"--out_dir={out}",
                                             "--init_from=resume", "--n_layer=3"]), "cannot resume: n_layer is 3"),
        "missing checkpoint": (("generate.py", ["--ckpt", str(root / "missing.pt")]), "not found"),
        "truncated checkpoint": (gen("--ckpt", str(root / "truncated.pt")), "not a readable GlassGPT checkpoint"),
        "text as checkpoint": (gen("--ckpt", str(root / "text.pt")), "not a readable GlassGPT checkpoint"),
        "pickle payload": (gen("--ckpt", str(root / "evil.pt")), "not a readable GlassGPT checkpoint"),
        "foreign checkpoint": (gen("--ckpt", str(root / "foreign.pt")), "is not a GlassGPT checkpoint"),
        "newer format": (gen("--ckpt", str(root / "future.pt")), "newer than this code's"),
        "prompt outside vocab": (gen("--start", "ROMEO: ☃"), "outside this model's vocabulary"),
        "empty prompt": (gen("--start", ""), "the prompt is empty"),
        "zero new tokens": (gen("--max_new_tokens", "0"), "argument --max_new_tokens: must be a whole number of at least 1"),
        "top_k zero": (gen("--top_k", "0"), "argument --top_k: must be a whole number of at least 1"),
        "negative temperature": (gen("--temperature", "-1"), "argument --temperature: must be a finite number of at least 0"),
        "top_p too big": (gen("--top_p", "1.5"), "argument --top_p: must be a finite number in (0, 1]"),
        "generate on missing gpu": (gen("--device", "cuda"), "device 'cuda' is not available"),
        "prompt file missing": (gen("--start", f"FILE:{root / 'nope.txt'}"), "cannot read the prompt file"),
        "not a number": (gen("--num_samples", "many"), "argument --num_samples: must be a whole number"),
        "input missing": (("data.py", ["--input", str(root / "nope.txt"), "--name", "x", "--data_dir",
                                       str(root / "data")]), "input file"),
        "empty corpus": (("data.py", ["--input", str(root / "empty.txt"), "--name", "x", "--data_dir",
                                      str(root / "data")]), "is empty"),
        "binary corpus": (("data.py", ["--input", str(root / "binary.bin"), "--name", "x", "--data_dir",
                                       str(root / "data")]), "looks binary"),
        "not utf-8": (("data.py", ["--input", str(root / "latin1.txt"), "--name", "x", "--data_dir",
                                   str(root / "data")]), "is not UTF-8 text"),
        "unknown tokenizer": (("data.py", ["--input", str(root / "tiny.txt"), "--name", "x",
                                           "--tokenizer", "bpe"]), "invalid choice: 'bpe'"),
        "unknown dataset name": (("data.py", ["--name", "mystery", "--data_dir", str(root / "data")]),
                                 "not a known dataset"),
    }


CASE_NAMES = list(cases(__import__("pathlib").Path("r"), __import__("pathlib").Path("r/o")))


def snapshot(*folders):
    """path -> SHA-256 of every file below the folders."""
    files = {}
    for folder in folders:
        for base, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(base, name)
                with open(path, "rb") as f:
                    files[path] = hashlib.sha256(f.read()).hexdigest()
    return files


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_clear_line_and_changes_nothing(workspace, name):
    root, out = workspace
    (script, args), expected = cases(root, out)[name]
    before = snapshot(root, out.parent)
    result = run_script(script, *args)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout and "PWNED" not in result.stdout
    assert snapshot(root, out.parent) == before
