"""The README and docs quote the code; these tests keep the quotes true."""

import os
import re

from configurator import parse_value, train_defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def test_readme_lists_every_config_key_with_its_default():
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", read("README.md"), flags=re.M)
    assert {key: parse_value(value) for key, value in rows} == train_defaults()


def test_readme_quick_start_has_two_one_line_commands():
    quick = read("README.md").split("## Quick start")[1].split("\n## ")[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick, flags=re.S)
    assert len(blocks) == 2 and all(block.count("\n") == 1 for block in blocks)
    assert "python train.py config/shakespeare_char_cpu.py" in blocks[0]
    assert "pytest" in blocks[1]


def test_ci_runs_the_readme_test_command():
    ci = read(".ci/run")
    assert "requirements-dev.txt" in ci and "pytest -q" in ci
