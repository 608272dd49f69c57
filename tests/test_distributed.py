"""Several processes through PyTorch's own engine: torchrun + DDP (gloo) on CPU."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from machinery.checkpoint import load_checkpoint
from conftest import ROOT, TINY, run_script

pytestmark = pytest.mark.slow


def args(data_dir, out, *extra):
    return [*TINY, f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", "--max_iters=6",
            "--eval_interval=3", "--gradient_accumulation_steps=4", "--batch_size=4", "--dropout=0.0",
            "--always_save_checkpoint=True", *extra]


def torchrun(nproc, *train_args):
    env = dict(os.environ, GLASSGPT_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(ROOT, "train.py"), *train_args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_ddp_on_two_cpu_processes_matches_one_process(char_data, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_script("train.py", *args(char_data, single), check=True)
    result = torchrun(2, *args(char_data, ddp))
    assert result.returncode == 0, result.stderr[-3000:]
    a, _ = load_checkpoint(single / "ckpt.pt")
    b, meta = load_checkpoint(ddp / "ckpt.pt")
    assert meta["iter_num"] == 6
    for name, tensor in a["model"].items():
        assert (tensor - b["model"][name]).abs().max().item() < 1e-5, name
    # only rank 0 wrote files: one checkpoint pair, one metrics file (each line logged once), one timeline
    assert sorted(os.listdir(ddp)) == ["best_model.pt", "ckpt.pt", "metrics.jsonl", "timeline"]
    iters = [json.loads(line)["iter"] for line in (ddp / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "train"]
    assert iters == [5]
    assert result.stdout.count("eval 6:") == 1


def test_fsdp_on_two_cpu_processes_matches_one_process_and_loads_for_generation(char_data, tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    run_script("train.py", *args(char_data, single), check=True)
    result = torchrun(2, *args(char_data, sharded, "--fsdp=True"))
    assert result.returncode == 0, result.stderr[-3000:]
    a, _ = load_checkpoint(single / "ckpt.pt")
    b, meta = load_checkpoint(sharded / "ckpt.pt")
    assert meta["fsdp"] is True and meta["iter_num"] == 6
    for name, tensor in a["model"].items():
        assert (tensor - b["model"][name]).abs().max().item() < 1e-5, name
    sample = run_script("generate.py", "--ckpt", sharded / "best_model.pt", "--device", "cpu",
                        "--max_new_tokens", "20", check=True)
    assert len(sample.stdout.split("\n---------------\n")[0]) == 1 + 20  # the default prompt is "\n"
    resumed = torchrun(2, *args(char_data, sharded, "--fsdp=True", "--init_from=resume", "--max_iters=8"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(sharded / "ckpt.pt")[1]["iter_num"] == 8


def test_a_resumed_run_with_dropout_continues_exactly_on_every_process(char_data, tmp_path):
    """Each process draws its own dropout masks (seed + rank): a run stopped at iteration 3 and resumed
    must take the unbroken run's steps 4-6, on rank 1 too, whose states only rng_processes holds."""
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    dropout = ["--dropout=0.2", "--log_interval=1"]
    for out, extra in ((unbroken, []), (broken, ["--max_iters=3"]), (broken, ["--init_from=resume"])):
        result = torchrun(2, *args(char_data, out, *dropout, *extra))
        assert result.returncode == 0, result.stderr[-3000:]
    a, _ = load_checkpoint(unbroken / "ckpt.pt")
    b, meta = load_checkpoint(broken / "ckpt.pt")
    assert meta["iter_num"] == 6 and b["rng_processes"]["rng_torch"].shape[0] == 2
    assert not torch.equal(b["rng_processes"]["rng_torch"][0], b["rng_processes"]["rng_torch"][1])
    for name, tensor in a["model"].items():  # the average of both processes' gradients, every step
        assert torch.equal(tensor, b["model"][name]), name

    def losses(out):
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["iter"]: r["loss"] for r in lines if r["type"] == "train"}
    assert losses(unbroken) == losses(broken) and sorted(losses(broken)) == [1, 2, 3, 4, 5, 6]


def test_fsdp_without_torchrun_is_one_clear_line(char_data, tmp_path):
    result = run_script("train.py", *args(char_data, tmp_path / "o", "--fsdp=True"))
    assert result.returncode == 2 and "launch it with torchrun" in result.stderr


def test_a_signal_to_one_process_stops_both_after_the_same_step(char_data, tmp_path):
    """log_interval=10: the processes agree on stopping after every step, not only on log steps, so one
    that got Ctrl-C never leaves the other waiting in a collective (issue 20)."""
    import psutil
    out = tmp_path / "o"
    env = dict(os.environ, GLASSGPT_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "train.py"), *args(char_data, out, "--max_iters=100000", "--eval_interval=100000",
                                                     "--log_interval=10", "--eval_at_start=False")]
    torchrun = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in torchrun.stdout:  # the first log line: both processes are stepping
            if line.startswith("iter 10:"):
                break
        workers = {p.environ().get("RANK"): p for p in psutil.Process(torchrun.pid).children(recursive=True)
                   if p.environ().get("RANK") is not None}
        workers["1"].send_signal(signal.SIGINT)  # the process that does not log: rank 1
        stdout, stderr = torchrun.communicate(timeout=120)
    finally:
        torchrun.kill()
        torchrun.wait()
    stopped = re.search(r"stopped at iteration (\d+); \S+ckpt\.pt saved", stdout)
    assert stopped, stdout[-2000:] + stderr[-3000:]
    assert load_checkpoint(out / "ckpt.pt")[1]["iter_num"] == int(stopped.group(1)) >= 10
    # rank 1 ended by the stop (torchrun then ends rank 0, which has saved by then), not by a broken collective
    assert "exitcode  : 130" in stderr and "RuntimeError" not in stderr and "Connection closed" not in stderr
