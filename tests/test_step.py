"""The optimizer step as train.py's own loop takes it, watched from outside (tests/probe_train.py):
accumulation, clipping, the NaN guard, best-model choice and resume. Runs of a few steps each."""

import hashlib
import json
import math
import re

import pytest
import torch

from machinery.checkpoint import load_checkpoint
from conftest import ROOT, TINY, run_script


def train_args(data_dir, out, *extra):
    return [*TINY, f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", "--log_interval=1",
            "--eval_at_start=False", "--eval_interval=1000", "--lr_decay_iters=40", *extra]


def probed_run(data_dir, out, *extra, poison="-", check=True):
    """train.py through the probe: (result, one dict per AdamW step)."""
    record = out.parent / f"{out.name}-steps.jsonl"
    record.unlink(missing_ok=True)  # each run's own steps, numbered from 1
    result = run_script("tests/probe_train.py", record, poison, f"{ROOT}/train.py", *train_args(data_dir, out, *extra),
                        check=check)
    steps = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return result, steps


def logged(out, kind="train"):
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e for e in entries if e["type"] == kind]


def weights(out, name="ckpt.pt"):
    tensors, meta = load_checkpoint(out / name)
    return tensors["model"], meta


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_accumulated_micro_batches_step_exactly_like_one_big_batch(char_data, tmp_path):
    """4 micro-batches of 2 are one batch of 8: the same gradient reaches the optimizer (train.py divides
    each micro-batch's loss by 4), so the logged norms and the weights after 3 steps agree."""
    big, big_steps = probed_run(char_data, tmp_path / "big", "--max_iters=3", "--batch_size=8",
                                "--gradient_accumulation_steps=1", "--grad_clip=0")
    acc, acc_steps = probed_run(char_data, tmp_path / "acc", "--max_iters=3", "--batch_size=2",
                                "--gradient_accumulation_steps=4", "--grad_clip=0")
    assert len(big_steps) == len(acc_steps) == 3
    for a, b in zip(acc_steps, big_steps):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    norms = [(e["grad_norm"], f["grad_norm"]) for e, f in zip(logged(tmp_path / "acc"), logged(tmp_path / "big"))]
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in norms), norms
    a, _ = weights(tmp_path / "acc")
    b, _ = weights(tmp_path / "big")
    for name in a:
        # the same steps up to float32 rounding, which Adam's first, sign-like step can magnify
        assert torch.allclose(a[name], b[name], atol=1e-4), name


def test_clipping_hands_the_optimizer_a_gradient_of_at_most_grad_clip(char_data, tmp_path):
    _, steps = probed_run(char_data, tmp_path / "out", "--max_iters=3", "--grad_clip=0.05")
    entries = logged(tmp_path / "out")
    assert all(e["grad_norm"] > 0.05 and e["clipped"] for e in entries)  # the raw norm is what is logged
    assert all(s["grad_norm"] == pytest.approx(0.05, rel=1e-4) for s in steps)  # what the step uses is clipped


def test_no_clipping_hands_the_optimizer_the_raw_gradient(char_data, tmp_path):
    _, steps = probed_run(char_data, tmp_path / "out", "--max_iters=3", "--grad_clip=0")
    entries = logged(tmp_path / "out")
    assert [s["grad_norm"] for s in steps] == [pytest.approx(e["grad_norm"], rel=1e-5) for e in entries]
    assert not any(e["clipped"] for e in entries)


def test_nan_guard_skips_steps_whose_gradient_is_not_finite_though_the_loss_is(char_data, tmp_path):
    """Steps 2, 3, 5 and 6 get infinite gradients and a finite loss: each is skipped with the weights exactly
    as they were; never more than 2 of them in a row, so the run (max_bad_steps=3) goes on to finite weights."""
    out = tmp_path / "out"
    result, steps = probed_run(char_data, out, "--max_iters=8", "--max_bad_steps=3", poison="2,3,5,6", check=False)
    for s in steps:
        if s["step"] in (2, 3, 5, 6):
            assert s["weights_after"] == s["weights_before"], s  # untouched
        else:
            assert s["weights_after"] != s["weights_before"], s
    assert result.returncode == 0 and len(steps) == 8, result.stderr
    # named by the step's own number, as its log line names it: steps 2 and 3 in a row, then 5 and 6
    for step, in_a_row in ((2, 1), (3, 2), (5, 1), (6, 2)):
        assert re.search(rf"^iter {step}: non-finite gradient \(first in transformer\.[\w.]+\); step skipped, "
                         rf"weights untouched \({in_a_row}/3\)$", result.stdout, re.M), result.stdout
    assert "(2/3)" in result.stdout and "(3/3)" not in result.stdout
    train = logged(out)
    assert [e["skipped_steps"] for e in train] == [0, 1, 2, 2, 3, 4, 4, 4]
    assert all(math.isfinite(e["loss"]) for e in train)
    final, meta = weights(out)
    assert meta["iter_num"] == 8 and all(torch.isfinite(t).all() for t in final.values())


def test_nan_guard_stops_after_max_bad_steps_in_a_row_and_keeps_the_checkpoint(char_data, tmp_path):
    out = tmp_path / "out"
    probed_run(char_data, out, "--max_iters=2")
    good = sha(out / "ckpt.pt")
    result, steps = probed_run(char_data, out, "--max_iters=10", "--init_from=resume", "--max_bad_steps=2",
                               poison="2,3,4", check=False)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: training stopped after 2 non-finite steps in a row")
    assert "(2/2)" in result.stdout and "learning rate too high" in result.stdout
    assert [s["weights_after"] == s["weights_before"] for s in steps] == [False, True, True]  # iters 3, 4, 5
    assert sha(out / "ckpt.pt") == good  # nothing diverged was written


def test_best_model_is_written_only_when_val_improves(char_data, tmp_path):
    """A resumed run at a learning rate that wrecks the model: ckpt.pt follows it, best_model.pt stays."""
    out = tmp_path / "out"
    run_script("train.py", *train_args(char_data, out, "--max_iters=10", "--eval_interval=5"), check=True)
    best, best_meta = weights(out, "best_model.pt")
    best_sha = sha(out / "best_model.pt")
    run_script("train.py", *train_args(char_data, out, "--max_iters=20", "--eval_interval=5", "--init_from=resume",
                                       "--learning_rate=0.5", "--warmup_iters=0", "--decay_lr=False"), check=True)
    evals = logged(out, "eval")
    assert [e["iter"] for e in evals] == [5, 10, 15, 20]
    assert min(e["val_loss"] for e in evals[2:]) > evals[1]["val_loss"]  # both later evals are worse
    assert sha(out / "best_model.pt") == best_sha
    _, last_meta = weights(out)
    assert last_meta["iter_num"] == 20 and best_meta["iter_num"] == 10
    assert best_meta["best_val_loss"] == evals[1]["val_loss"] == min(e["val_loss"] for e in evals)


def test_best_model_follows_each_improving_eval(char_data, tmp_path):
    out = tmp_path / "out"
    run_script("train.py", *train_args(char_data, out, "--max_iters=10", "--eval_interval=5",
                                       "--always_save_checkpoint=False"), check=True)
    evals = logged(out, "eval")
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    best, meta = weights(out, "best_model.pt")
    last, _ = weights(out)
    assert meta["iter_num"] == 10 and meta["best_val_loss"] == evals[1]["val_loss"]
    assert all(torch.equal(best[k], last[k]) for k in best)  # the improving eval's state is the best one


def test_resume_takes_the_same_steps_as_an_unbroken_run(char_data, tmp_path):
    """Weights, optimizer state and the batch RNG all come back: 2 + 2 steps equal 4 steps bit for bit."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_script("train.py", *train_args(char_data, straight, "--max_iters=4"), check=True)
    run_script("train.py", *train_args(char_data, split, "--max_iters=2"), check=True)
    run_script("train.py", *train_args(char_data, split, "--max_iters=4", "--init_from=resume"), check=True)
    a, _ = weights(straight)
    b, _ = weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    loss = {e["iter"]: e["loss"] for e in logged(straight)}
    assert [(e["iter"], e["loss"]) for e in logged(split)] == [(i, loss[i]) for i in (1, 2, 3, 4)]


def test_float16_steps_go_through_the_grad_scaler_which_skips_an_overflowed_one(char_data, tmp_path):
    """The float16 path, on a CPU (autocast and GradScaler run there too): the loop's scaler.step(opt) skips the
    step whose gradients overflowed, leaves the weights as they were, lowers the loss scale, and the guard
    neither stops the run nor reports it (overflow is routine for float16)."""
    out = tmp_path / "out"
    result, steps = probed_run(char_data, out, "--max_iters=6", "--dtype=float16", poison="3", check=False)
    assert result.returncode == 0, result.stderr
    assert [s["weights_after"] == s["weights_before"] for s in steps] == [False, False, True, False, False, False]
    train = logged(out)
    assert all(e["loss_scale"] is not None for e in train)
    assert train[3]["loss_scale"] < train[1]["loss_scale"]  # halved after the overflow
    assert "non-finite" not in result.stdout


def test_nan_guard_reads_its_flag_on_the_host_where_the_optimizer_cannot_skip_on_its_own(char_data, tmp_path):
    """Muon on a CPU takes its plain step (bit for bit), so there the guard reads its flag on the host and the
    loop takes no step at all: a poisoned step never reaches the weights, and three in a row stop the run."""
    out = tmp_path / "out"
    result, steps = probed_run(char_data, out, "--max_iters=6", "--optimizer=muon", "--max_bad_steps=3", poison="2",
                               check=False)
    assert steps and all(math.isfinite(s["weights_after"]) for s in steps), steps
    assert result.returncode == 3 and "non-finite gradient" in result.stdout, result.stdout + result.stderr
