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
    except Exception as e:
        code = os_error_number(e)
        if code not in WRITE_FAULTS:
            raise
        filename = getattr(e, "filename", None)
        where = re.sub(r"\.tmp\d+$", "", str(filename)) if filename else path  # a temp file: its target
        raise UsageError(f"could not write {where} ({os.strerror(code)}){'; ' if kept else ''}{kept}; "
                         f"{WRITE_FAULTS[code]}") from e


def os_error_number(error):
    """The errno of an OSError, or of a library's own error that only quotes it (safetensors says
    'I/O error: No space left on device (os error 28)')."""
    if isinstance(error, OSError):
        return error.errno
    quoted = re.search(r"\(os error (\d+)\)", str(error))
    return int(quoted.group(1)) if quoted else None


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
