"""bench/triton_sass.py for the tests that read the kernels' Hopper machine code (tests/test_triton_sass.py,
tests/test_resources.py), in child processes kept for the session instead of a fresh process per tile.

Each request is what a fresh process would have run: the script's command line, run by its ``main()``, or a snippet
run as ``python -c`` with its argv; the reply carries the exit status and what it printed, as a finished
subprocess's. A child starts without TRITON_INTERPRET (this suite's kernels are interpreted; these are compiled),
and its start (torch, Triton and noflash_tune imported: most of a one-tile run on 2 cores) is paid once.
``compile_ahead`` queues requests before the tests make them, on two children (a CI machine's 2 cores): a test
then waits for its own reply. A request is answered once; asked again, it runs again.
"""
from __future__ import annotations

import atexit
import json
import os
import queue
import selectors
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # one request, as the fresh process's timeout was
CHILDREN = 2  # when requests are queued ahead

_CHILD = r"""
import contextlib, io, json, os, sys, traceback

replies = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # what a compiler tool writes to fd 1 goes to the child's log, never into a reply
sys.path.insert(0, sys.argv[1])
import triton_sass  # noqa: E402  (the imports a fresh process would make, made once)

for line in sys.stdin:
    req = json.loads(line)
    out, err, rc = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if req["code"] is None:  # python bench/triton_sass.py ARGS
                sys.argv = [triton_sass.__file__, *req["args"]]
                rc = triton_sass.main()
            else:  # python -c CODE ARGS
                sys.argv = ["-c", *req["args"]]
                exec(compile(req["code"], "<string>", "exec"), {"__name__": "__main__"})
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                rc = exc.code
            else:
                print(exc.code, file=sys.stderr)
                rc = 1
        except BaseException:
            traceback.print_exc()
            rc = 1
    replies.write(json.dumps({"rc": rc or 0, "stdout": out.getvalue(), "stderr": err.getvalue()}) + "\n")
    replies.flush()
"""


class _Child:
    """One child process, answering one request at a time (restarted if it died)."""

    def __init__(self):
        self.proc = None
        self.log = None

    def _start(self):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(REPO / "bench")], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def _log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout, self.log):
                f.close()
            self.proc = None

    def run(self, args: list[str], code: str | None) -> subprocess.CompletedProcess:
        if self.proc is None or self.proc.poll() is not None:
            self.stop()
            self._start()
        try:
            self.proc.stdin.write(json.dumps({"args": args, "code": code}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died starting: the read below says so
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            ready = sel.select(TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            why = f"no reply within {TIMEOUT_S} s" if not ready else f"it exited ({self.proc.poll()})"
            self.proc.kill()
            self.proc.wait()
            tail = self._log_tail()
            self.stop()
            raise AssertionError(f"the bench/triton_sass.py child, asked {args}: {why}\n{tail}")
        reply = json.loads(line)
        return subprocess.CompletedProcess(args, reply["rc"], reply["stdout"], reply["stderr"])


class _Pool:
    """Children fed from one queue, in the order the requests came; a reply is kept until it is asked for."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.pending: dict[tuple, Future] = {}
        self.children: list[_Child] = []
        self.lock = threading.Lock()

    def _serve(self, child: _Child, jobs: queue.Queue):
        while True:
            job = jobs.get()
            if job is None:
                return
            (args, code), fut = job
            try:
                fut.set_result(child.run(list(args), code))
            except BaseException as exc:  # noqa: BLE001 - the test that asked raises it
                fut.set_exception(exc)

    def _grow(self, n: int):
        while len(self.children) < n:
            child = _Child()
            self.children.append(child)
            threading.Thread(target=self._serve, args=(child, self.jobs), daemon=True).start()

    def submit(self, args, code=None, children: int = 1) -> Future:
        key = (tuple(str(a) for a in args), code)
        with self.lock:
            self._grow(children)
            if key not in self.pending:
                self.pending[key] = Future()
                self.jobs.put((key, self.pending[key]))
            return self.pending[key]

    def run(self, args, code=None) -> subprocess.CompletedProcess:
        key = (tuple(str(a) for a in args), code)
        fut = self.submit(args, code)
        try:
            return fut.result()
        finally:
            with self.lock:
                if self.pending.get(key) is fut:
                    del self.pending[key]  # answered: asked again, it runs again

    def stop(self):
        """Stop the children (a later request starts one again); what was queued and not yet asked is dropped."""
        with self.lock:
            jobs, children = self.jobs, self.children
            self.jobs, self.children, self.pending = queue.Queue(), [], {}
        while True:
            try:
                job = jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[1].cancel()
        for _ in children:
            jobs.put(None)
        for child in children:
            child.stop()


_POOL = _Pool()
atexit.register(_POOL.stop)


def triton_sass(*args) -> subprocess.CompletedProcess:
    """``python bench/triton_sass.py ARGS``, without TRITON_INTERPRET, as a finished process."""
    return _POOL.run(args)


def python_c(code: str, *args) -> subprocess.CompletedProcess:
    """``python -c CODE ARGS`` (a snippet that imports triton_sass from bench/), likewise."""
    return _POOL.run(args, code)


def stop() -> None:
    """The children stopped (their memory given back) once the tests that use them are done."""
    _POOL.stop()


def compile_ahead(requests) -> None:
    """Queue ``requests`` (each ``(args, code)``: code None for the script itself) on ``CHILDREN`` children, in
    order, before the tests ask for them. Only a head start: what a test asks is run for it all the same."""
    for args, code in requests:
        _POOL.submit(args, code, children=CHILDREN)
