"""Helpers for tests that start real processes."""

import socket


def free_port() -> int:
    """A TCP port nobody listens on now (for torchrun's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(worker, *args, nproc: int = 2, timeout: int = 300):
    """Run ``worker`` (a script path) under ``torch.distributed.run`` with ``nproc`` CPU processes
    (one thread each) and the string ``args``; fails the test with the output's tail on a non-zero exit."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(worker), *map(str, args)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def plca_in_process(*args: str, cwd=None):
    """``plca ARGS`` run by :func:`plca.cli.main` in this process, as a ``subprocess.CompletedProcess``:
    its exit status and what it printed. An exception that escapes ``main`` (a subprocess would print its
    traceback) becomes exit status 1 and its formatted traceback in ``stderr``, so tests that forbid a
    traceback still see one. ``cwd``: the working directory during the call. The ``plca`` logger starts
    as in a new interpreter (an earlier run in this process leaves its ``train.log`` handler attached)
    and is restored afterwards."""
    import contextlib
    import io
    import logging
    import os
    import subprocess
    import sys
    import traceback

    from plca.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    logger = logging.getLogger("plca")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    try:
        logger.handlers[:], logger.propagate = [], True
        logger.setLevel(logging.NOTSET)
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as stop:  # argparse's usage errors
                if stop.code is not None and not isinstance(stop.code, int):
                    print(stop.code, file=sys.stderr)
                code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
            except Exception:  # noqa: BLE001 - reported the way the interpreter would
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(previous)
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
    return subprocess.CompletedProcess(["plca", *args], code, out.getvalue(), err.getvalue())
