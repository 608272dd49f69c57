"""
Machine faults handled like bad input: a full disk or a folder that cannot be written is one line that
names the path and the fix (not a traceback), and a write that fails or is interrupted leaves no
temporary file behind.
"""

import contextlib
import errno
import os
import re

from configurator import UsageError

WRITE_FAULTS = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some of your disk quota",
                errno.EROFS: "choose a folder you can write to", errno.EACCES: "choose a folder you can write to",
                errno.EPERM: "choose a folder you can write to"}


@contextlib.contextmanager
def writing(path, kept=""):
    """Inside this block, a full disk or an unwritable folder is one UsageError naming the path and the
    fix, not a traceback. kept: what the failure leaves intact, said in the message ('the previous ...')."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_FAULTS:
            raise
        where = re.sub(r"\.tmp\d+$", "", str(e.filename)) if e.filename else path  # a temp file: its target
        raise UsageError(f"could not write {where} ({e.strerror}){'; ' if kept else ''}{kept}; "
                         f"{WRITE_FAULTS[e.errno]}") from e


@contextlib.contextmanager
def removed_on_failure(*paths):
    """Delete the temporary files at paths if the block fails or is interrupted (Ctrl-C, SIGTERM)."""
    try:
        yield
    except BaseException:
        for path in paths:
            if os.path.exists(path):
                os.remove(path)
        raise
