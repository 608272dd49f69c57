"""docs/notebooks.py: each chapter's notebook holds exactly the chapter's runnable examples as its code
cells, and a notebook's cells run from the top in one namespace print what the chapter says they print."""

import contextlib
import io
import os
import sys

import nbformat
import pytest

from test_docs import CHAPTERS, LANGS, ROOT, normalise_output, python_examples

sys.path.insert(0, os.path.join(ROOT, "docs"))
import notebooks  # noqa: E402  (docs/notebooks.py, found through the path above)


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("name", CHAPTERS)
def test_code_cells_are_the_chapters_runnable_blocks(tmp_path, lang, name):
    nb = nbformat.read(notebooks.write_notebook(lang, name[:-3], str(tmp_path)), as_version=4)
    nbformat.validate(nb)
    code = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    assert code == [body.rstrip("\n") for body, _ in python_examples(lang, name)]


def test_every_chapter_gets_a_notebook():
    assert [f"{c}.md" for c in notebooks.chapters("en")] == list(CHAPTERS)


def test_images_point_at_docs_img_from_the_notebooks_folder(tmp_path):
    nb = nbformat.read(notebooks.write_notebook("en", "05-model", str(tmp_path)), as_version=4)
    links = [line for cell in nb.cells if cell.cell_type == "markdown" for line in cell.source.splitlines()
             if line.startswith("![")]
    assert links and all("](../img/" not in line for line in links)
    for line in links:
        target = line.split("](", 1)[1].rstrip(")")
        assert os.path.exists(os.path.join(tmp_path, target)), line


@pytest.mark.parametrize("name", ["02-data.md", "11-quantization.md"])  # the fastest, and the newest chapter
def test_a_chapters_notebook_runs_top_to_bottom_in_one_namespace(tmp_path, monkeypatch, name):
    nb = nbformat.read(notebooks.write_notebook("en", name[:-3], str(tmp_path)), as_version=4)
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": "__notebook__"}
    printed = []
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(cell.source, "<notebook cell>", "exec"), namespace)
        printed.append(out.getvalue())
    expected = [want for _, want in python_examples("en", name)]
    assert len(printed) == len(expected) > 0
    for got, want in zip(printed, expected):
        if want is not None:
            assert normalise_output(got) == normalise_output(want)
