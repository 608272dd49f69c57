"""
Each chapter as a Jupyter notebook, generated from the chapter and never edited by hand:

    python docs/notebooks.py                       # every chapter, both languages, into docs/notebooks/
    python docs/notebooks.py 05-model --lang en    # one chapter, one language
    python docs/notebooks.py --out .               # beside the code: see below

The chapter's prose, its other blocks and its expected outputs become markdown cells; each `python runnable`
block becomes one code cell, in order, so running the cells from the top runs the examples as the docs
tests do (tests/test_notebooks.py checks both). Some examples read the project's files (config/, data/)
from the repository root, and Jupyter runs a notebook in its own folder: write them with `--out .` to run
those too, or start the notebook with `%cd ../..` (the files are git-ignored either way).
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as `python docs/notebooks.py`: machinery/ lives one folder up
from machinery.cli import quiet_interrupts  # noqa: E402
quiet_interrupts(__name__)  # from here on, Ctrl-C is one line, even while the imports load

import nbformat

from machinery.cli import ArgumentParser, UsageError, run_cli

LANGS = ("en", "zh")
RUNNABLE = re.compile(r"^```python runnable[ \t]*\n(.*?)^```[ \t]*$\n?", flags=re.M | re.S)


def chapters(lang):
    """The chapter files of one language, by name without .md: 00-knowledge-map, 01-configuration, ..."""
    folder = os.path.join(ROOT, "docs", lang)
    return sorted(f[:-3] for f in os.listdir(folder) if re.match(r"\d\d-.*\.md$", f))


def notebook(text, source):
    """A notebook of markdown cells for the prose and one code cell per `python runnable` block."""
    cells, start = [nbformat.v4.new_markdown_cell(f"*Generated from `{source}` by `python docs/notebooks.py`: "
                                                  "edit the chapter, not this notebook.*")], 0
    for m in RUNNABLE.finditer(text):
        prose = text[start:m.start()].strip()
        if prose:
            cells.append(nbformat.v4.new_markdown_cell(prose))
        cells.append(nbformat.v4.new_code_cell(m.group(1).rstrip("\n")))
        start = m.end()
    if text[start:].strip():
        cells.append(nbformat.v4.new_markdown_cell(text[start:].strip()))
    for i, cell in enumerate(cells):
        cell.id = f"cell-{i}"  # the same chapter gives the same file, byte for byte
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def write_notebook(lang, name, out_dir):
    source = os.path.join("docs", lang, f"{name}.md")
    with open(os.path.join(ROOT, source), encoding="utf-8") as f:
        text = f.read()
    # the chapter's images are ../img/...: point them at docs/img from wherever the notebook lands
    img = os.path.relpath(os.path.join(ROOT, "docs", "img"), out_dir).replace(os.sep, "/")
    nb = notebook(text.replace("](../img/", f"]({img}/"), source)
    path = os.path.join(out_dir, f"{lang}-{name}.ipynb")
    tmp = path + ".tmp"
    nbformat.write(nb, tmp)
    os.replace(tmp, path)  # a notebook is there whole or not at all
    return path


def main():
    parser = ArgumentParser(description="Write each docs chapter as a Jupyter notebook.")
    parser.add_argument("chapters", nargs="*", help="chapter names such as 05-model (default: all)")
    parser.add_argument("--lang", choices=LANGS, help="one language (default: both)")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "notebooks"), help="the folder to write")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for lang in [args.lang] if args.lang else LANGS:
        known = chapters(lang)
        unknown = [c for c in args.chapters if c not in known]
        if unknown:
            raise UsageError(f"no chapter {unknown[0]!r} in docs/{lang} (one of: {', '.join(known)})")
        for name in args.chapters or known:
            print(f"wrote {write_notebook(lang, name, os.path.abspath(args.out))}")


if __name__ == "__main__":
    run_cli(main)
