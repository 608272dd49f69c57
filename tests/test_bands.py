"""The recipe's loss band (machinery/bands.py): its file checked, the one line a run gets when it leaves the band,
band_for_run for plot.py and the lens, and (slow) the CPU recipe against its measured band."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from conftest import ROOT, TINY
from machinery import bands
from machinery.cli import UsageError
from machinery.configurator import parse_value
from scripts import run_script

STEPS = [10, 20, 30, 40, 50]
CPU = "config/shakespeare_char_cpu.py"


def band_record(config="config/x.py", dataset="shakespeare_char", steps=STEPS, eval_steps=(50,)):
    """Three seeds whose loss falls from 3 by 0.1 a step, 0.02 apart: the band at step s is about
    3 - 0.01 s - 0.03 .. 3 - 0.01 s + 0.02 + 0.03 (the margin's floor, as the spread is below it)."""
    seeds = {str(k): {"loss": [3 - 0.01 * s + 0.01 * k for s in steps],
                      "train_loss": [2.0 + 0.01 * k for _ in eval_steps],
                      "val_loss": [2.1 + 0.01 * k for _ in eval_steps]} for k in range(3)}
    return {"config": config, "dataset": dataset, "command": "python -m machinery.bands measure config/x.py",
            "steps": list(steps), "eval_steps": list(eval_steps), "seeds": seeds}


def watch(record=None):
    lines = []
    return bands.BandWatch("config/x.band.json", record or band_record()), lines


def feed(w, lines, losses, steps=STEPS):
    for step, loss in zip(steps, losses):
        w.check(lines.append, {"type": "train", "iter": step, "loss": loss})


def middle(step):
    return 3 - 0.01 * step + 0.01


def test_the_band_file_sits_beside_its_config():
    assert bands.band_path("config/shakespeare_char_cpu.py") == "config/shakespeare_char_cpu.band.json"


def test_the_band_is_the_seeds_range_widened_by_a_share_of_the_spread_or_the_floor():
    record = band_record()
    record["seeds"]["2"]["loss"][0] += 1.0  # a spread of 1.02 at step 10: widened by its share of it
    lo, hi = bands.limits(record)["loss"][10]
    widen = bands.MARGIN_FRACTION * 1.02
    assert widen > bands.MARGIN_FLOOR and lo == pytest.approx(2.9 - widen) and hi == pytest.approx(3.92 + widen)
    lo, hi = bands.limits(record)["loss"][20]  # a spread of 0.02: widened by the floor
    assert lo == pytest.approx(2.8 - bands.MARGIN_FLOOR) and hi == pytest.approx(2.82 + bands.MARGIN_FLOOR)
    lo, hi = bands.limits(record, leave_out="2")["loss"][10]  # the others' band: seed 2 is far above it
    assert hi == pytest.approx(2.91 + bands.MARGIN_FLOOR)


def test_a_run_inside_the_band_is_never_mentioned():
    w, lines = watch()
    feed(w, lines, [middle(s) for s in STEPS])
    w.check(lines.append, {"type": "eval", "iter": 50, "train_loss": 2.01, "val_loss": 2.11})
    assert lines == []


def test_above_the_band_for_a_log_or_two_is_noise_and_says_nothing():
    w, lines = watch()
    feed(w, lines, [middle(10) + 1, middle(20) + 1, middle(30), middle(40) + 1, middle(50) + 1])
    assert lines == []


def test_above_the_band_for_several_logs_is_one_line_naming_the_step_and_the_causes():
    w, lines = watch()
    feed(w, lines, [middle(10), middle(20) + 0.5, middle(30) + 0.5, middle(40) + 0.5, middle(50) + 0.5])
    w.check(lines.append, {"type": "eval", "iter": 50, "train_loss": 3.0, "val_loss": 3.0})  # said already
    assert len(lines) == 1, lines
    assert "warning: the loss is above this recipe's band from iter 20 on (3 logs in a row)" in lines[0]
    assert "at iter 40 against at most" in lines[0] and "(+0.4" in lines[0]
    assert "learning rate too high" in lines[0] and "(band: config/x.band.json)" in lines[0]


def test_a_val_loss_above_the_band_is_said_at_once_and_a_nan_loss_counts_as_above():
    w, lines = watch()
    w.check(lines.append, {"type": "eval", "iter": 50, "train_loss": 2.0, "val_loss": 2.5})
    assert len(lines) == 1 and "the val loss is above this recipe's band at iter 50: 2.500" in lines[0]
    w, lines = watch()
    feed(w, lines, [math.nan] * 3)
    assert len(lines) == 1 and "nan at iter 30" in lines[0]


def test_below_the_band_is_one_note():
    w, lines = watch()
    feed(w, lines, [middle(s) - 1 for s in STEPS])
    assert len(lines) == 1 and lines[0].startswith("note: the loss is below this recipe's band from iter 10 on")


def test_steps_the_band_has_not_measured_are_not_compared():
    w, lines = watch()
    feed(w, lines, [9.0] * 5, steps=[5, 15, 25, 35, 45])
    w.check(lines.append, {"type": "eval", "iter": 40, "val_loss": 9.0})
    assert lines == []


HOSTILE = [
    ("{", "is not JSON"),
    ("[]", "is not a JSON object"),
    ('{"config": "c"}', "'dataset' is None"),
    (json.dumps({**band_record(), "steps": [20, 10, 30, 40, 50]}), "'steps' must be increasing whole numbers"),
    (json.dumps({**band_record(), "steps": [10, 20, True, 40, 50]}), "'steps' must be increasing whole numbers"),
    (json.dumps({**band_record(), "seeds": {"1": band_record()["seeds"]["1"]}}), "a band needs two or more"),
    (json.dumps(band_record()).replace("2.11", "NaN", 1), "every loss must be a finite number"),
    (json.dumps({**band_record(), "steps": STEPS[:4]}), "'loss' is"),
    (json.dumps(band_record()).replace("2.11", '"2.11"', 1), "every loss must be a finite number"),
    ("\xff\xfe", "not UTF-8"),
]


@pytest.mark.parametrize("text, said", HOSTILE, ids=[said for _, said in HOSTILE])
def test_a_hostile_band_file_is_one_line_naming_the_file(tmp_path, text, said):
    path = tmp_path / "x.band.json"
    path.write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
    with pytest.raises(UsageError) as e:
        bands.load_band(str(path))
    message = str(e.value)
    assert said in message and str(path) in message and "\n" not in message
    assert "python -m machinery.bands measure" in message or "save it as UTF-8" in message


@settings(max_examples=150, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
                    max_leaves=30))
def test_any_json_is_a_band_or_one_usage_error(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("band") / "x.band.json"
    path.write_text(json.dumps(value))
    try:
        record = bands.load_band(str(path))
    except UsageError as e:
        assert "\n" not in str(e)
    else:
        bands.band_dict(str(path), record)  # a file that loads can be drawn


def test_the_command_line_refuses_a_hostile_band_in_one_line(tmp_path):
    config = tmp_path / "r.py"
    config.write_text("dataset = 'shakespeare_char'\n")
    (tmp_path / "r.band.json").write_text('{"config": 1}')
    result = subprocess.run([sys.executable, "-m", "machinery.bands", "check", str(config)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "'config' is 1, not a string" in result.stderr


def test_leave_one_out_counts_each_seed_against_the_others_band():
    record = band_record()
    record["seeds"]["2"]["loss"] = [x + 1 for x in record["seeds"]["2"]["loss"]]  # one seed far above the rest
    raw = bands.leave_one_out(record, 0, 0)
    # unwidened: seed 2 is above the band of seeds 0 and 1, and seed 0 below that of seeds 1 and 2
    assert raw["points"] == 3 * 7 and raw["said"] == 2 and raw["farthest"] == pytest.approx(1.01)
    widened = bands.leave_one_out(record)  # seed 0 is inside the widened band of 1 and 2; seed 2 still far above
    assert widened["said"] == 1 and widened["outside"] < raw["outside"]
    assert bands.summary(record)["loss_first"] == [2.9, pytest.approx(3.92)]


@pytest.mark.parametrize("argv, said", [
    (["check", "config/eval_gpt2.py"], "has no band (config/eval_gpt2.band.json not found); measure it first"),
    (["check", CPU, "--seed", "3"], "--seed=3 is one of the band's seeds"),
    (["measure", CPU, "--seeds", "1,x"], "--seeds must be whole numbers"),
    (["measure", CPU, "--seeds", "4,4"], "--seeds needs at least two different seeds"),
    (["measure", "config/nope.py"], "config file 'config/nope.py' not found"),
])
def test_the_command_line_refuses_bad_requests_before_any_run(argv, said):
    result = subprocess.run([sys.executable, "-m", "machinery.bands", *argv], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and said in result.stderr and result.stdout == "", result.stderr


def test_a_resumed_run_named_by_its_folder_alone_keeps_the_band_its_record_names(tmp_path):
    out = run_folder_with_band(tmp_path, band_record())
    resumed = {"dataset": "shakespeare_char", "init_from": "resume"}
    watch = bands.BandWatch.for_run(str(out), resumed, [f"--out_dir={out}", "--init_from=resume"], print)
    assert watch.path == str(tmp_path / "x.band.json") and watch.announce(60) == {"type": "band", "iter": 60,
                                                                                 "band": watch.path}
    assert bands.BandWatch.for_run(str(out), {**resumed, "init_from": "scratch"}, [], print) is None


def test_under_torchrun_only_the_first_process_compares(tmp_path, monkeypatch):
    from types import SimpleNamespace
    from machinery.metrics import MetricsLog
    (tmp_path / "r.py").write_text("dataset = 'shakespeare_char'\n")
    (tmp_path / "r.band.json").write_text(json.dumps(band_record()))
    monkeypatch.setattr(sys, "argv", ["train.py", str(tmp_path / "r.py")])
    config = {"grad_clip": 1.0, "dataset": "shakespeare_char", "init_from": "scratch"}
    assert bands.BandWatch.for_run(str(tmp_path), config, sys.argv[1:], print) is not None  # the first process's
    other = MetricsLog(str(tmp_path), config, SimpleNamespace(master=False, accum_steps=1), None, None, None, 1)
    assert other.band is None


def run_folder_with_band(tmp_path, record):
    (tmp_path / "x.band.json").write_text(json.dumps(record))
    out = tmp_path / "out"
    out.mkdir()
    entries = [{"type": "band", "iter": 10, "band": str(tmp_path / "x.band.json")},
               *({"type": "train", "iter": s, "loss": middle(s), "lr": 1e-3} for s in STEPS)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return out


def test_band_for_run_gives_the_band_the_run_was_compared_with(tmp_path):
    out = run_folder_with_band(tmp_path, band_record())
    band = bands.band_for_run(str(out))
    assert band["train"]["steps"] == STEPS and band["eval"]["steps"] == [50]
    assert band["train"]["lo"][0] == pytest.approx(2.9 - bands.MARGIN_FLOOR)
    assert band["eval"]["val_loss"]["hi"] == [pytest.approx(2.12 + bands.MARGIN_FLOOR)]
    assert band["seeds"] == ["0", "1", "2"] and json.loads(json.dumps(band)) == band
    (out / "metrics.jsonl").write_text('{"type": "train", "iter": 1, "loss": 2.0}\n')
    assert bands.band_for_run(str(out)) is None  # a run without a band
    assert bands.band_for_run(str(tmp_path / "nowhere")) is None


def test_plot_draws_the_band_behind_the_run_and_warns_once_for_a_broken_one(tmp_path):
    import plot
    out = run_folder_with_band(tmp_path, band_record())
    runs = {"out": plot.read_metrics(str(out))}
    band = bands.band_for_run(str(out))
    fig = plot.plot_runs(runs, bands=[band, band])  # two runs of one recipe: its band drawn once
    shade, val = fig.axes[0].collections
    assert [shade.get_label(), val.get_label()] == ["band of config/x.py (3 seeds)", "its val loss"]
    corners = shade.get_paths()[0].vertices  # the shaded polygon: along lo, back along hi
    at_10 = sorted(y for x, y in corners if x == 10)
    assert at_10[0] == pytest.approx(band["train"]["lo"][0]) and at_10[-1] == pytest.approx(band["train"]["hi"][0])
    [[(x0, y0), (x1, y1)]] = val.get_segments()
    assert x0 == x1 == 50
    assert [y0, y1] == pytest.approx([band["eval"]["val_loss"]["lo"][0], band["eval"]["val_loss"]["hi"][0]])
    assert len(plot.plot_runs(runs).axes[0].collections) == 0
    (tmp_path / "x.band.json").write_text("{")
    result = run_script("plot.py", str(out), cwd=tmp_path)
    assert result.returncode == 0 and (out / "metrics.png").exists()
    assert result.stdout.count("is not JSON") == 1 and "drawn without its band" in result.stdout


def tiny_recipe(tmp_path, char_data, record):
    """A config file of tiny settings with a band beside it; the run's output and its metrics."""
    config = tmp_path / "tiny.py"
    settings = dict(arg[2:].split("=") for arg in TINY)
    config.write_text("".join(f"{k} = {parse_value(v)!r}\n" for k, v in settings.items())
                      + "dataset = 'tiny'\nmax_iters = 15\neval_interval = 15\n")
    (tmp_path / "tiny.band.json").write_text(json.dumps(record))
    result = run_script("train.py", str(config), f"--data_dir={char_data}", f"--out_dir={tmp_path / 'out'}")
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    return result, metrics


def test_train_py_names_the_step_in_one_line_when_its_recipe_leaves_the_band(tmp_path, char_data):
    low = band_record(dataset="tiny", steps=[5, 10, 15], eval_steps=[15])  # losses near 3 - 0.1 s: far below a run's
    for losses in low["seeds"].values():
        losses["loss"] = [0.5, 0.4, 0.3]
    result, metrics = tiny_recipe(tmp_path, char_data, low)
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stdout.splitlines() if "(band: " in line]
    assert len(said) == 1 and "warning: the loss is above this recipe's band from iter 5 on (3 logs in a row)" in said[0]
    assert metrics[0] == {"type": "band", "iter": 0, "band": str(tmp_path / "tiny.band.json")}  # before the first
    assert [m["type"] for m in metrics].count("band") == 1
    assert bands.band_for_run(str(tmp_path / "out"))["train"]["steps"] == [5, 10, 15]


def test_a_band_for_another_dataset_or_a_broken_one_does_not_stop_the_run(tmp_path, char_data):
    result, metrics = tiny_recipe(tmp_path, char_data, band_record(dataset="other", steps=[5, 10, 15]))
    assert result.returncode == 0 and "(band: " not in result.stdout and "band" not in [m["type"] for m in metrics]
    (tmp_path / "tiny.band.json").write_text("[]")
    result = run_script("train.py", str(tmp_path / "tiny.py"), f"--data_dir={char_data}",
                        f"--out_dir={tmp_path / 'out3'}", "--max_iters=5")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert [line for line in result.stdout.splitlines() if "band file" in line] == [
        f"warning: band file '{tmp_path / 'tiny.band.json'}' is not a JSON object; measure it again: python -m "
        "machinery.bands measure CONFIG (or delete it); this run is not compared with a band"]


# ---- the shipped recipe against its measured band (slow: two real runs of the CPU recipe) ---------------------


def recipe(out_dir, *flags):
    """The CPU recipe as a learner runs it (its own threads, not the tests' one): its output and its entries."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, "train.py", CPU, f"--out_dir={out_dir}", *flags], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in result.stdout.splitlines() if "(band: " in line], entries


needs_data = pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "data", "shakespeare_char", "train.bin")),
                                reason="data/shakespeare_char is not prepared (python data.py --dataset=shakespeare_char)")


SHIPPED = sorted(f"config/{f}" for f in os.listdir(os.path.join(ROOT, "config")) if f.endswith(".band.json"))


def test_the_cpu_recipe_has_a_band():
    assert bands.band_path(CPU) in SHIPPED


@pytest.mark.parametrize("path", SHIPPED)
def test_each_shipped_band_is_five_seeds_or_more_of_its_recipe_with_the_command_that_measures_it(path):
    from machinery.configurator import read_config_file
    record = bands.load_band(os.path.join(ROOT, path))
    recipe = read_config_file(os.path.join(ROOT, record["config"]))
    assert bands.band_path(record["config"]) == path and record["dataset"] == recipe["dataset"]
    assert len(record["seeds"]) >= 5 and record["steps"][-1] == recipe["max_iters"]
    assert record["steps"] == list(range(recipe["log_interval"], recipe["max_iters"] + 1, recipe["log_interval"]))
    assert record["command"] == f"python -m machinery.bands measure {record['config']} --seeds " + \
        ",".join(sorted(record["seeds"], key=int))
    assert {"commit", "machine", "date"} <= set(record)


@pytest.mark.slow
@needs_data
def test_the_cpu_recipe_with_a_new_seed_stays_inside_its_band(tmp_path):
    """Seed 7 is none of the band's. "Inside" as train.py judges it: no line, and the val loss within its band;
    a single batch's loss may pass an edge now and then (the leave-one-out check of docs 3.12.1)."""
    record = bands.load_band(os.path.join(ROOT, bands.band_path(CPU)))
    assert "7" not in record["seeds"]
    lines, entries = recipe(tmp_path / "seed7", "--seed=7")
    assert lines == []
    band = bands.limits(record)
    logs = [e for e in entries if e["type"] == "train" and e["iter"] in band["loss"]]
    outside = [e["iter"] for e in logs if not band["loss"][e["iter"]][0] <= e["loss"] <= band["loss"][e["iter"]][1]]
    assert len(logs) == 45 and len(outside) <= 0.1 * len(logs), outside
    [final] = [e for e in entries if e["type"] == "eval"]
    lo, hi = band["val_loss"][final["iter"]]
    assert final["iter"] == 450 and lo < final["val_loss"] < hi


@pytest.mark.slow
@needs_data
def test_the_cpu_recipe_at_ten_times_its_learning_rate_is_flagged_with_the_step_in_one_line(tmp_path):
    """The first 60 steps of the recipe at 10x its rate are the real recipe's first 60 (the schedule runs to
    lr_decay_iters = 450 whatever max_iters is; the eval at 60 is none of the band's): enough to be flagged."""
    lines, _ = recipe(tmp_path / "lr10", "--seed=7", "--learning_rate=0.1", "--max_iters=60")
    assert len(lines) == 1
    said = re.match(r"warning: the loss is above this recipe's band from iter (\d+) on \(3 logs in a row\): [\d.]+ at "
                    r"iter (\d+) against at most [\d.]+ \(\+[\d.]+\); usual causes: ", lines[0])
    assert said and int(said[2]) == int(said[1]) + 20 <= 60, lines[0]
