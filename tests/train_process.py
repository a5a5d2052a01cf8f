"""Run the real entry point `train.py` in its own process, forked from a warm interpreter.

Why not `subprocess.run([python, "train.py", ...])`: each fresh interpreter spends ~8-14 s on this 2-core machine
importing torch, lightning (torchvision, scipy via torchmetrics), hydra and open_clip before the run starts, and the
suite starts ~90 runs. The standard library's forkserver imports them once per test worker (`set_forkserver_preload`)
and forks a clean child for each run. The child is still a separate process: its own Hydra state, logging, seeds,
exit code (`sys.exit(2)` reads 2, a SIGKILL reads -9), stdout and stderr; it only skips the import. What it shares
with the worker: environment variables read at import time are those the worker had when the forkserver started.
The newcomer's command (tests/test_default_run.py) runs with `fresh=True`: a cold interpreter, as a user starts it.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import pkgutil
import runpy
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINT = REPO / "train.py"
_HEAVY_IMPORTS = ["torch", "lightning.pytorch", "hydra", "omegaconf", "open_clip", "torchmetrics", "einops"]
_context: multiprocessing.context.ForkServerContext | None = None


def _metadiff_modules() -> list[str]:
    """Every module of the package that a run can import, so the stages that Hydra instantiates by name are already
    imported too (not `metadiff.bench`: `make bench` is its own entry point, never a train.py run)."""
    import metadiff

    modules = (m.name for m in pkgutil.walk_packages(metadiff.__path__, "metadiff."))
    return ["metadiff", *(m for m in modules if m != "metadiff.bench" and not m.startswith("metadiff.bench."))]


def _forkserver() -> multiprocessing.context.ForkServerContext:
    """One forkserver per test worker, started on first use with the environment the worker has by then."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload([*_HEAVY_IMPORTS, *_metadiff_modules()])
    return _context


def _run_entry_point(argv: list[str], env: dict[str, str], stdout_path: str, stderr_path: str) -> None:
    """The child: what `python train.py argv...` does after its imports, with stdout/stderr sent to files."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(REPO)
    # A forkserver child inherits "forkserver" as its default start method (multiprocessing.spawn.prepare sets it),
    # so the run's DataLoader workers would each be started through a forkserver and re-import torch & co. (~20 s a
    # run, measured). `python train.py` starts with the platform's default: restore it.
    multiprocessing.set_start_method(None, force=True)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    for stream in (sys.stdout, sys.stderr):  # as PYTHONUNBUFFERED: a killed run's output up to the kill is kept
        stream.reconfigure(line_buffering=True, write_through=True)
    sys.argv = [str(ENTRY_POINT), *argv]
    try:
        runpy.run_path(str(ENTRY_POINT), run_name="__main__")
    finally:  # a forked child leaves by os._exit: do what interpreter exit does, in its order (threads, then atexit;
        threading._shutdown()  # noqa: SLF001 - loky/concurrent.futures shut their executors down here, and
        atexit._run_exitfuncs()  # noqa: SLF001 - multiprocessing's atexit join of children would wait on them)
        sys.stdout.flush()
        sys.stderr.flush()


def run_entry_point(
    argv: list[str], env: dict[str, str], timeout: float, fresh: bool = False
) -> subprocess.CompletedProcess:
    """`python train.py *argv` with environment `env`; a CompletedProcess as `subprocess.run` gives (text output).
    `fresh=True`: a brand-new interpreter (subprocess), for checks of the command line from a cold start."""
    cmd = [sys.executable, str(ENTRY_POINT), *argv]
    if fresh:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="train-py-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        child = _forkserver().Process(target=_run_entry_point, args=(argv, env, str(out), str(err)))
        child.start()
        child.join(timeout)
        timed_out = child.is_alive()
        if timed_out:
            child.kill()
            child.join()
        stdout, stderr = (p.read_text(errors="replace") if p.exists() else "" for p in (out, err))
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(cmd, child.exitcode, stdout, stderr)
