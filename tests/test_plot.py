"""plot.py draws a real run's metrics.jsonl into a PNG of a known size, and overlays several runs."""

import json
import shutil
import struct

from conftest import run_script

import plot


def png_size(path):
    """(width, height) from a PNG's IHDR chunk, which always comes first."""
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def expected_size(n_panels):
    width, height = plot.PANEL_INCHES
    return round(width * n_panels * plot.DPI), round(height * plot.DPI)


def logged_grad_norm(out_dir):
    with open(out_dir / "metrics.jsonl", encoding="utf-8") as f:
        return any("grad_norm" in json.loads(line) for line in f if line.strip())


def test_plot_of_a_real_run_writes_metrics_png_of_the_expected_size(trained_run):
    out, _ = trained_run
    result = run_script("plot.py", out, check=True)
    png = out / "metrics.png"
    assert f"wrote {png}" in result.stdout
    assert 10_000 < png.stat().st_size < 200_000
    panels = 3 if logged_grad_norm(out) else 2
    assert png_size(png) == expected_size(panels)


def test_the_curves_are_the_logged_figures(trained_run):
    out, _ = trained_run
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in entries if e["type"] == "train"]
    evals = [e for e in entries if e["type"] == "eval"]
    fig = plot.plot_runs({"run": plot.read_metrics(out)})
    batch, val = fig.axes[0].get_lines()
    assert list(batch.get_xdata()) == [e["iter"] for e in train] and list(batch.get_ydata()) == [e["loss"] for e in train]
    assert list(val.get_xdata()) == [e["iter"] for e in evals] and list(val.get_ydata()) == [e["val_loss"] for e in evals]
    [lr] = fig.axes[1].get_lines()
    assert list(lr.get_ydata()) == [e["lr"] for e in train]


def test_plot_overlays_two_runs_with_one_legend_entry_each(trained_run, tmp_path):
    out, _ = trained_run
    other = tmp_path / "run-b"
    other.mkdir()
    shutil.copy(out / "metrics.jsonl", other / "metrics.jsonl")
    target = tmp_path / "figs" / "both.png"
    run_script("plot.py", out, other, f"--out={target}", check=True)
    assert png_size(target)[1] == expected_size(2)[1] and target.stat().st_size > 10_000

    fig = plot.plot_runs({name: plot.read_metrics(d) for name, d in zip(plot.run_names([out, other]), [out, other])})
    loss_labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert loss_labels == [f"{out.name} train (batch)", f"{out.name} val", "run-b train (batch)", "run-b val"]
    assert len(fig.axes[1].get_lines()) == 2  # one learning-rate curve per run


def test_two_runs_with_the_same_folder_name_are_told_apart(tmp_path):
    assert plot.run_names([tmp_path / "a" / "out", tmp_path / "b" / "out"]) == [
        str(tmp_path / "a" / "out"), str(tmp_path / "b" / "out")]


def test_grad_norm_gets_a_panel_only_when_logged(tmp_path):
    train = [{"type": "train", "iter": i, "loss": 4.0 - i / 10, "lr": 1e-3, "grad_norm": 2.0 / (i + 1)}
             for i in range(1, 6)]
    evals = [{"type": "eval", "iter": 0, "train_loss": 4.2, "val_loss": 4.2}]
    assert len(plot.plot_runs({"a": (train, evals)}).axes) == 3
    without = [{k: v for k, v in e.items() if k != "grad_norm"} for e in train]
    assert len(plot.plot_runs({"a": (without, evals)}).axes) == 2


def test_a_diverged_run_with_nan_losses_still_plots(tmp_path):
    lines = [{"type": "train", "iter": 1, "loss": 4.0, "lr": 1.0}, {"type": "train", "iter": 2, "loss": float("nan"), "lr": 1.0},
             {"type": "eval", "iter": 2, "train_loss": float("inf"), "val_loss": float("nan")}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines), encoding="utf-8")
    run_script("plot.py", tmp_path, check=True)
    assert png_size(tmp_path / "metrics.png") == expected_size(2)
    batch, val = plot.plot_runs({"run": plot.read_metrics(tmp_path)}).axes[0].get_lines()
    assert list(batch.get_ydata()) == [4.0] and list(val.get_ydata()) == []  # only the finite points are drawn


def test_missing_or_empty_metrics_is_one_clear_line(tmp_path):
    result = run_script("plot.py", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "metrics.jsonl not found" in result.stderr
    (tmp_path / "metrics.jsonl").write_text("", encoding="utf-8")
    result = run_script("plot.py", tmp_path)
    assert result.returncode == 2 and "has no metrics yet" in result.stderr
    result = run_script("plot.py", tmp_path / "nope")
    assert result.returncode == 2 and "is not a folder" in result.stderr
