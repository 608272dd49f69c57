"""The records behind the docs' measured figures (records/*.json, format in records/README.md): every record
has its fields, and every figure it quotes, formatted from its data, appears verbatim in the doc it names. A
record added by anyone is picked up; a changed value, in the record or in the doc, fails."""

import copy
import importlib.util
import os

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("record", os.path.join(ROOT, "docs", "record.py"))
records = importlib.util.module_from_spec(spec)
spec.loader.exec_module(records)

PATHS = records.record_paths()
MIN_FIGURES = 390  # the quoted figures the records held when this test was written; fewer means some were lost


def name(path):
    return os.path.basename(path)


def test_the_records_folder_says_its_format():
    with open(os.path.join(records.RECORDS, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert all(f'"{field}"' in readme for field in records.FIELDS)


@pytest.mark.parametrize("path", PATHS, ids=name)
def test_every_quoted_figure_is_in_its_doc(path):
    assert records.check_record(records.load(path)) == []


@pytest.mark.parametrize("path", PATHS, ids=name)
def test_each_record_names_english_and_chinese_docs_alike(path):
    """A figure quoted in a chapter is quoted in both languages: the record lists docs/en/X and docs/zh/X."""
    docs = {q["doc"] for q in records.load(path)["quoted"]}
    for doc in docs:
        for a, b in (("docs/en/", "docs/zh/"), ("docs/zh/", "docs/en/")):
            if doc.startswith(a):
                assert doc.replace(a, b) in docs, f"{name(path)} quotes {doc} but not {doc.replace(a, b)}"


def test_the_records_quote_enough_figures():
    count = sum(len(records.fields_of(q["text"])) for path in PATHS for q in records.load(path)["quoted"])
    print(f"{len(PATHS)} records, {count} quoted figures checked")
    assert count >= MIN_FIGURES


def changed(value):
    """A value that formats differently from `value`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"not a leaf: {value!r}")
    if isinstance(value, str):
        return "7" + value  # in front: a format such as {text:.20} keeps only the start
    return value * 3 + 7 if isinstance(value, int) else value * 1.37 + 0.71


def leaf_path(field):
    """['table', 'int8', 'bytes'] for the format field 'table[int8][bytes]:.3f' (digits as ints, as format reads them)."""
    head, *rest = field.split(":")[0].split("!")[0].replace("]", "").split("[")
    return [head] + [int(key) if key.isdigit() else key for key in rest]


@pytest.mark.parametrize("path", PATHS, ids=name)
def test_a_changed_record_value_fails_the_check(path):
    """Each quoted field, changed in a copy of the record, makes the check fail."""
    record = records.load(path)
    for quote in record["quoted"]:
        for field in records.fields_of(quote["text"]):
            keys = leaf_path(field)
            bad = copy.deepcopy(record)
            node = bad["data"]
            for key in keys[:-1]:
                node = node[key]
            node[keys[-1]] = changed(node[keys[-1]])
            assert records.check_record(bad), f"{name(path)}: changing {field} went unnoticed in {quote['doc']}"


def test_a_changed_doc_fails_the_check(tmp_path):
    record = {"what": "a test", "command": "python -c 1", "commit": "abc1234", "machine": "this one",
              "date": "2026-12-06", "data": {"loss": 1.8222, "table": {"int8": {"bytes": 3}}},
              "quoted": [{"doc": "a.md", "text": "val loss {loss:.4f}, {table[int8][bytes]} bytes"}]}
    (tmp_path / "a.md").write_text("It ends at val loss 1.8222,\n3 bytes a weight.\n", encoding="utf-8")
    read = lambda doc: records.read_doc(doc, root=tmp_path)
    assert records.check_record(record, read) == []
    (tmp_path / "a.md").write_text("It ends at val loss 1.8223, 3 bytes a weight.\n", encoding="utf-8")
    assert records.check_record(record, read) == ["a.md does not say 'val loss 1.8222, 3 bytes'"]


def test_chinese_line_breaks_are_not_content(tmp_path):
    record = {"what": "a test", "command": "python -c 1", "commit": "abc1234", "machine": "this one",
              "date": "2026-12-06", "data": {"ms": 46.5},
              "quoted": [{"doc": "zh.md", "text": "每步 {ms} 毫秒"}]}
    (tmp_path / "zh.md").write_text("在 Zen 5 上每步\n46.5 毫秒。\n", encoding="utf-8")
    assert records.check_record(record, lambda doc: records.read_doc(doc, root=tmp_path)) == []


def test_a_record_without_its_fields_fails():
    good = {"what": "w", "command": "c", "commit": "abc1234", "machine": "m", "date": "2026-12-06",
            "data": {"x": 1}, "quoted": [{"doc": "README.md", "text": "{x}"}]}
    for field in records.FIELDS:
        assert records.check_record({k: v for k, v in good.items() if k != field})
    assert records.check_record(dict(good, date="6 Dec 2026"))
    assert records.check_record(dict(good, quoted=[{"doc": "README.md", "text": "no figure"}]))


# The scripts that write records: what they read and write, on small made-up inputs


def load_docs_script(name):
    from test_docs_figures import load_script
    return load_script(name)


def test_write_record_stamps_the_run_and_says_what_the_docs_do_not_quote(tmp_path, monkeypatch):
    if records.commit() == "not a git checkout":  # (the mutation check's copies of the tree)
        pytest.skip("a record names its git commit: this copy of the tree is not a git checkout")
    monkeypatch.setattr(records, "RECORDS", str(tmp_path))
    quoted = [{"doc": "README.md", "text": "# {name}"}, {"doc": "README.md", "text": "{name} took {x} s"}]
    problems = records.write_record("probe", "a test", "python -c 1", {"name": "GlassGPT", "x": 12345.5}, quoted)
    written = records.load(str(tmp_path / "probe.json"))
    assert tuple(written) == records.FIELDS and written["data"]["x"] == 12345.5
    assert problems == ["README.md does not say 'GlassGPT took 12345.5 s'"]
    assert records.check_record(dict(written, quoted=quoted[:1])) == []


def test_without_bf16_makes_muon_orthogonalise_in_float32(monkeypatch):
    from machinery import devices
    monkeypatch.setattr(devices, "cpu_has_bf16", devices.cpu_has_bf16)  # restored after the test
    load_docs_script("ablations").without_bf16()
    assert devices.fast_path("cpu", 128)["muon_dtype"] == "float32"
    assert devices.fast_path("cpu", 384)["dtype"] == "float32"


def metrics_file(folder, losses, evals):
    import json
    folder.mkdir()
    lines = [{"type": "train", "iter": it, "loss": loss, "ms_per_iter": 100.0 + it, "grad_norm": 2.0 if it < 20 else 0.6,
              "clipped": it < 20, "update_ratio_log10": {"all": -1.5 - it / 1000} if it % 50 == 0 else None}
             for it, loss in losses] + [{"type": "eval", "iter": it, "train_loss": t, "val_loss": v} for it, t, v in evals]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return folder


def test_run_figures_read_a_finished_runs_log(tmp_path):
    folder = metrics_file(tmp_path / "run", [(it, 3.0 - it / 100) for it in range(10, 101, 10)], [(100, 2.1, 2.2)])
    figures = load_docs_script("muon_speed").run_figures(str(folder))
    assert figures["loss100"] == 2.0 and figures["first50"] == [2.9, 2.8, 2.7, 2.6, 2.5] and figures["val"] == 2.2
    assert (figures["ms_min"], figures["ms_max"], figures["ms_median"]) == (120, 200, 160)
    run = load_docs_script("figures").run_metrics(str(folder / "ckpt.pt"))
    assert run["final_val_loss"] == 2.2 and run["last_clipped_step"] == 10
    assert (run["grad_norm_after_min"], run["update_first_step"], run["update_last"]) == (0.6, 50, -1.6)


def test_trained_sizes_measure_every_block_of_the_model():
    import torch
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=3, n_head=2, n_embd=32)).eval()
    sizes = load_docs_script("figures").trained_sizes(model, torch.randint(65, (1, 16)), mask_chars=8)
    assert len(sizes["blocks"]) == 3 and len(sizes["line_previous"]) == 2
    assert sizes["stream_into_last"] == sizes["blocks"][-1]["stream_in"]
    assert 0 < sizes["mask_head_previous"] < 1 and sizes["n_embd_sqrt"] == round(32 ** 0.5, 3)


def test_a_rerun_record_measures_how_far_the_runs_are_from_the_table(tmp_path, monkeypatch):
    import json
    import sys
    ablations = load_docs_script("ablations")
    (tmp_path / "records").mkdir()
    table = {"rows": {"none": {"params": 10, "val_loss": 1.822}, "no_mlp": {"params": 5, "val_loss": 2.035}}}
    (tmp_path / "records" / "table.json").write_text(json.dumps({"data": table}), encoding="utf-8")
    monkeypatch.setattr(ablations, "ROOT", str(tmp_path))
    monkeypatch.setattr(sys.modules["record"], "RECORDS", str(tmp_path / "records"))
    monkeypatch.setattr(sys.modules["record"], "commit", lambda: "abc1234")
    results = [{"ablation": "none", "params": 10, "val_loss": 1.8221, "command": "python docs/ablations.py none"},
               {"ablation": "no_mlp", "params": 5, "val_loss": 2.1, "command": "python docs/ablations.py no_mlp"}]
    ablations.write_table_record("rerun", "ablation", results, "table", [("README.md", "{largest_difference}")],
                                 "ablations.py", ["a", "b"], "a test")
    data = json.loads((tmp_path / "records" / "rerun.json").read_text(encoding="utf-8"))["data"]
    assert (data["largest_at"], data["largest_difference"], data["next_largest_difference"]) == ("no_mlp", 0.065, 0.0001)
    assert data["same_params"]
    results.pop()
    with pytest.raises(ablations.UsageError, match="no_mlp"):
        ablations.write_table_record("rerun", "ablation", results, "table", [], "ablations.py", ["a"], "a test")
