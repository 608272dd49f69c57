"""Nothing lost, nothing unsafe: resume exactness, interrupts, kill -9, the NaN guard, health figures."""

import hashlib
import json
import contextlib
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from machinery.checkpoint import load_checkpoint, save_checkpoint
from machinery.cli import UsageError
from conftest import ROOT, TINY, run_script

pytestmark = pytest.mark.slow


def train_args(data_dir, out, *extra):
    return [*TINY, f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", "--lr_decay_iters=40",
            "--log_interval=1", *extra]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return [(m["type"], m["iter"], m.get("loss"), m.get("val_loss")) for m in metrics(out)]


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_continues_bit_identically(char_data, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_script("train.py", *train_args(char_data, straight, "--max_iters=20", "--eval_interval=5"), check=True)
    run_script("train.py", *train_args(char_data, split, "--max_iters=10", "--eval_interval=5"), check=True)
    result = run_script("train.py", *train_args(char_data, split, "--max_iters=20", "--eval_interval=5",
                                                "--init_from=resume"), check=True)
    assert "max_iters changed from 10 to 20" in result.stdout
    a, _ = load_checkpoint(straight / "ckpt.pt")
    b, _ = load_checkpoint(split / "ckpt.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert losses(straight) == losses(split)


def test_resume_refuses_a_different_model_shape(trained_run):
    out, _ = trained_run
    result = run_script("train.py", *train_args(out.parent / "data", out, "--init_from=resume", "--n_embd=64"))
    assert result.returncode == 2 and "cannot resume: n_embd is 64" in result.stderr


# run as `python stop_after_step.py train.py args...`: train.py, stopped as by Ctrl-C right after step STOP_AFTER_STEP
STOP_AFTER_STEP = """
import os, runpy, signal, sys
from machinery import metrics
real_log_step = metrics.MetricsLog.log_step
def log_step(self, iter_num, *args):
    real_log_step(self, iter_num, *args)
    if iter_num == int(os.environ["STOP_AFTER_STEP"]):
        os.kill(os.getpid(), signal.SIGINT)  # the run stops after this step and saves ckpt.pt
metrics.MetricsLog.log_step = log_step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_stopped_run_resumes_from_its_folder_alone_to_where_an_unbroken_run_ends(char_data, tmp_path, optimizer):
    """--init_from=resume --out_dir=RUN, with no config and no other flag: the checkpoint's own settings
    (shape, optimizer, schedule, data) continue the run bit for bit; another optimizer is one line."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    settings = ["--max_iters=12", "--eval_interval=5", f"--optimizer={optimizer}", "--weight_decay=0.05"]
    run_script("train.py", *train_args(char_data, straight, *settings), check=True)
    wrapper = tmp_path / "stop_after_step.py"
    wrapper.write_text(STOP_AFTER_STEP, encoding="utf-8")
    stopped = run_script(wrapper, os.path.join(ROOT, "train.py"), *train_args(char_data, split, *settings),
                         env={"STOP_AFTER_STEP": "7"})
    assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr
    assert load_checkpoint(split / "ckpt.pt")[1]["iter_num"] == 7
    resumed = run_script("train.py", "--init_from=resume", f"--out_dir={split}", check=True)
    assert "changed from" not in resumed.stdout and "iter 12:" in resumed.stdout
    a, _ = load_checkpoint(straight / "ckpt.pt")
    b, meta = load_checkpoint(split / "ckpt.pt")
    assert meta["iter_num"] == 12 and meta["config"]["optimizer"] == optimizer
    assert all(torch.equal(tensor, b["model"][name]) for name, tensor in a["model"].items())
    assert losses(straight) == losses(split)
    other = "adamw" if optimizer == "muon" else "muon"
    before = sha(split / "ckpt.pt")
    refused = run_script("train.py", "--init_from=resume", f"--out_dir={split}", f"--optimizer={other}",
                         "--max_iters=20")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert f"cannot resume: optimizer is {other} in this config but {optimizer} in {split / 'ckpt.pt'}" in line
    assert f"resume with --optimizer={optimizer}" in line and sha(split / "ckpt.pt") == before


def read_until(process, text):
    """Read the child's stdout line by line until a line contains text (no sleeping, no timing)."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"'{text}' never appeared:\n{''.join(seen)}")


def start_training(data_dir, out, *extra):
    env = dict(os.environ, GLASSGPT_OFFLINE="1", PYTHONUNBUFFERED="1")
    args = train_args(data_dir, out, "--max_iters=100000", "--eval_interval=5", *extra)
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_saves_and_prints_how_to_resume(char_data, tmp_path, signum, code):
    out = tmp_path / "out"
    process = start_training(char_data, out)
    read_until(process, "iter 7:")
    process.send_signal(signum)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == code
    assert "--init_from=resume" in stdout
    _, meta = load_checkpoint(out / "ckpt.pt")
    assert meta["iter_num"] >= 7
    resumed = run_script("train.py", *train_args(char_data, out, f"--max_iters={meta['iter_num'] + 2}",
                                                 "--eval_interval=5", "--init_from=resume"), check=True)
    assert f"iter {meta['iter_num'] + 2}:" in resumed.stdout


def test_kill_9_during_training_then_resume(char_data, tmp_path):
    out = tmp_path / "out"
    process = start_training(char_data, out, "--always_save_checkpoint=True")
    read_until(process, "eval 10:")
    read_until(process, "iter 12:")  # the eval-10 checkpoint is on disk before training goes on
    process.kill()
    process.wait(timeout=60)
    _, meta = load_checkpoint(out / "ckpt.pt")
    assert meta["iter_num"] >= 10
    resumed = run_script("train.py", *train_args(char_data, out, f"--max_iters={meta['iter_num'] + 3}",
                                                 "--eval_interval=5", "--init_from=resume"), check=True)
    assert f"iter {meta['iter_num'] + 3}:" in resumed.stdout
    iters = [m["iter"] for m in metrics(out) if m["type"] == "train"]
    assert iters == sorted(set(iters))  # lines logged after the checkpoint were not duplicated


KILL_ON_SECOND_FSYNC = """
import os, runpy, signal, sys
real_fsync, calls = os.fsync, []
def fsync_then_die(fd):
    calls.append(fd)
    if len(calls) == 5:  # the third checkpoint write: best_model.pt, ckpt.pt, then this one
        os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(fd)
os.fsync = fsync_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(char_data, tmp_path):
    out = tmp_path / "out"
    # (no timeline: its snapshots are fsynced writes too, and this test counts the checkpoints')
    args = train_args(char_data, out, "--max_iters=20", "--eval_interval=5", "--always_save_checkpoint=True",
                      "--snapshots=False")
    env = dict(os.environ, GLASSGPT_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", KILL_ON_SECOND_FSYNC, os.path.join(ROOT, "train.py"), *args],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL
    assert any(".tmp" in name for name in os.listdir(out))  # the write that was cut short
    _, meta = load_checkpoint(out / "ckpt.pt")
    assert meta["iter_num"] == 5  # the previous checkpoint, intact
    run_script("train.py", *args, "--init_from=resume", check=True)
    _, meta = load_checkpoint(out / "ckpt.pt")
    assert meta["iter_num"] == 20


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), {"w": torch.ones(3)}, {"iter_num": 1})
    before = sha(path)

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UsageError, match="No space left on device.*previous checkpoint is kept"):
        save_checkpoint(str(path), {"w": torch.zeros(3)}, {"iter_num": 2})
    assert sha(path) == before and os.listdir(tmp_path) == ["ckpt.pt"]


def test_unwritable_out_dir_is_one_clear_line(char_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_script("train.py", *train_args(char_data, blocker / "out", "--max_iters=2"))
    assert result.returncode == 2 and result.stderr.strip().startswith("error: cannot create out_dir")


def test_keep_last_n_keeps_only_the_newest_periodic_checkpoints(char_data, tmp_path):
    out = tmp_path / "out"
    run_script("train.py", *train_args(char_data, out, "--max_iters=20", "--eval_interval=5", "--keep_last_n=2",
                                       "--always_save_checkpoint=True"), check=True)
    assert sorted(f for f in os.listdir(out) if f.startswith("ckpt_")) == ["ckpt_0000015.pt", "ckpt_0000020.pt"]


def test_a_diverging_learning_rate_ends_in_exit_3_with_advice_and_the_checkpoint_kept(char_data, tmp_path):
    out = tmp_path / "out"
    run_script("train.py", *train_args(char_data, out, "--max_iters=10", "--eval_interval=5",
                                       "--always_save_checkpoint=True"), check=True)
    good = sha(out / "ckpt.pt")
    result = run_script("train.py", *train_args(char_data, out, "--max_iters=40", "--eval_interval=5",
                                                "--init_from=resume", "--learning_rate=1e6", "--grad_clip=0"))
    assert result.returncode == 3
    assert "step skipped, weights untouched (3/3)" in result.stdout
    assert re.search(r"non-finite (loss|gradient) \(first in transformer\.[\w.]+\)", result.stdout)
    assert "learning rate too high" in result.stdout
    assert result.stderr.strip().startswith("error: training stopped after 3 non-finite steps")
    assert "Traceback" not in result.stderr
    assert sha(out / "ckpt.pt") == good  # the skipped steps' weights are checked in test_step.py


def test_health_figures_match_an_independent_computation(char_data, tmp_path):
    """Replay step 6 from the step-5 checkpoint by hand and compare with what train.py logged."""
    from data import get_batch, load_split
    from model import GPT, GPTConfig
    out = tmp_path / "out"
    run_script("train.py", *train_args(char_data, out, "--max_iters=6", "--eval_interval=5",
                                       "--always_save_checkpoint=True", "--grad_clip=0.5", "--keep_last_n=5",
                                       "--monitor_interval=1"), check=True)
    tensors, meta = load_checkpoint(out / "ckpt_0000005.pt")
    assert meta["iter_num"] == 5
    model = GPT(GPTConfig(**meta["model_args"]))
    model.load_state_dict(tensors["model"])
    config = meta["config"]
    [opt] = model.configure_optimizers(config["weight_decay"], config["learning_rate"],
                                       (config["beta1"], config["beta2"]), "cpu")
    opt.load_state_dict(tensors["optimizers"][0])
    rng = torch.Generator()
    rng.set_state(tensors["rng_batches"])
    x, y = get_batch(load_split(str(char_data), "tiny", "train"), config["batch_size"], config["block_size"],
                     "cpu", rng)
    _, loss = model(x, y)
    loss.backward()
    params = list(model.parameters())
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params)).item()
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    before = [p.detach().clone() for p in params]
    # the cosine schedule at iteration 5, written out: warmup_iters 5 are over, so it starts from its peak
    progress = (5 - config["warmup_iters"]) / (config["lr_decay_iters"] - config["warmup_iters"])
    lr = config["min_lr"] + 0.5 * (1 + math.cos(math.pi * progress)) * (config["learning_rate"] - config["min_lr"])
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    change = math.sqrt(sum(((p.detach() - b) ** 2).sum().item() for p, b in zip(params, before)))
    size = math.sqrt(sum((b ** 2).sum().item() for b in before))
    logged = [m for m in metrics(out) if m["type"] == "train" and m["iter"] == 6][0]
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert logged["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    assert logged["clipped"] is (grad_norm > 0.5)
    assert logged["lr"] == pytest.approx(lr)
    assert logged["update_ratio_log10"]["all"] == pytest.approx(math.log10(change / size), abs=1e-3)
    assert set(logged["update_ratio_log10"]) == {"decay", "no_decay", "all"}


def test_inspect_prints_a_gradient_table_and_writes_nothing(char_data, tmp_path):
    out = tmp_path / "out"
    result = run_script("train.py", *train_args(char_data, out, "--inspect=True"), check=True)
    rows = [line for line in result.stdout.splitlines() if line.startswith("transformer.")]
    assert len(rows) == 2 + 2 * 12 + 2  # wte, wpe; 12 tensors per block; ln_f weight and bias
    assert "grad std" in result.stdout
    assert not out.exists() or os.listdir(out) == []


def test_the_loss_is_estimated_in_eval_mode_and_training_resumes_in_train_mode():
    """With dropout, an estimate made in training mode would change from one call to the next, and a model
    left in eval mode after an evaluation would train without dropout."""
    from types import SimpleNamespace
    import numpy as np
    from data import windows_at
    from machinery.evaluation import Evaluations
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=16, dropout=0.5))
    data = np.random.default_rng(0).integers(0, 20, 2000).astype(np.uint16)
    config = dict(block_size=16, batch_size=4, eval_iters=3, seed=1, init_from="scratch", eval_at_start=True,
                  eval_only=False, eval_interval=10, max_iters=10, patience=0)
    env = SimpleNamespace(device="cpu", rank=0, world_size=1, fsdp=False, ddp=False, master=True,
                          autocast=contextlib.nullcontext())
    evals = Evaluations(model, model, data, data[:500], windows_at, config, env, SimpleNamespace(check_eval=lambda: None),
                        None, 0, float("inf"), False)
    model.train()
    first, second = evals.estimate_loss(), evals.estimate_loss()
    assert first == second  # dropout off while estimating
    assert model.training  # and back on for the steps that follow
