"""run_script: the project's scripts in fresh processes, forked from one server that has imported PyTorch
and the project once. Each run is a new process, as `python script.py args` gives (its own exit status,
output and exit handlers), without paying two seconds of imports every time.

Kept apart from conftest.py, which imports pytest: a forked process loads this module, and it is small."""

import atexit
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the server imports these before it forks anything; on Python 3.11 it finds the project through PYTHONPATH
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
SERVER = multiprocessing.get_context("forkserver")
SERVER.set_forkserver_preload(["torch", "torch._dynamo", "matplotlib.pyplot", "train", "generate"])


def run_script(script, *args, cwd=ROOT, check=False, timeout=300, env=None):
    """Run one of the project's scripts in a fresh Python process, offline; env adds variables."""
    env = dict(os.environ, **(env or {}), GLASSGPT_OFFLINE="1", HF_HUB_OFFLINE="1")
    argv = [os.path.join(ROOT, script), *map(str, args)]
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        process = SERVER.Process(target=script_main, args=(argv, str(cwd), env, out, err))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(argv, timeout)
        with open(out, encoding="utf-8") as f_out, open(err, encoding="utf-8") as f_err:
            result = subprocess.CompletedProcess(argv, process.exitcode, f_out.read(), f_err.read())
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def script_main(argv, cwd, env, out, err):
    """In the forked process: what the interpreter does for `python argv...`, output into files."""
    for stream, path in ((sys.stdout, out), (sys.stderr, err)):
        stream.flush()
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), stream.fileno())
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(argv[0]))  # as for `python script.py`
    code = 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.exit(code)  # multiprocessing turns this into the exit status, as the interpreter would
