"""
The command line, shared by every script: the one error type for bad input (UsageError, importable from
anywhere: this module imports nothing of the project), run_cli (a bad input is one line and exit 2, Ctrl-C
or SIGTERM one line and 128 + the signal), an ArgumentParser whose errors are one line, and did-you-mean.
"""

import argparse
import difflib


class UsageError(Exception):
    """Bad input from the user. Entry points print it as one line and exit with status 2."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same clean-up runs."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def raise_interrupted(signum, frame):
    raise Interrupted(signum)


def run_cli(main, interrupted_hint=""):
    """Run main() as a command-line tool: a UsageError is one line on stderr and exit status 2; Ctrl-C
    (SIGINT) or SIGTERM is one line and exit status 130 or 143, after the `finally` blocks on the way
    have removed what was half-written. interrupted_hint: what to do next, said on that line."""
    import signal
    import sys
    signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        newline = "\n" if sys.stderr.isatty() else ""  # after the ^C (or a progress bar) on the terminal
        print(f"{newline}interrupted by {signal.Signals(signum).name}{'; ' if interrupted_hint else ''}"
              f"{interrupted_hint}", file=sys.stderr)
        sys.exit(128 + signum)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one UsageError line rather than usage text plus an error, and --help
    shows every flag's default."""

    def add_argument(self, *args, **kwargs):
        default, text = kwargs.get("default"), kwargs.get("help")
        shown = default is not None and default is not False and default != argparse.SUPPRESS  # not 0 == False
        if shown and "%(default)" not in (text or "") and "(default" not in (text or ""):
            kwargs["help"] = f"{text} (default: %(default)s)" if text else "default: %(default)s"
        return super().add_argument(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def closest(name, names):
    """' (did you mean 'x'?)' for the nearest valid spelling, or '' when nothing is close."""
    match = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def first_line(error, width=120):
    """An exception's message cut to its first line and `width` characters, for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0][:width] if text else type(error).__name__
