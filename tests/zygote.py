"""A fork server for the tests' ``python -m kdfine`` processes.

Most of a short kdfine process is the interpreter's start and torch's import (3-4 CPU seconds, as
much as the command itself in most tests). The server imports torch and kdfine once; each command
is then a fresh process forked from it: its own pid, the caller's stdin/stdout/stderr file
descriptors, argv, environment and working directory, its own exit status or killing signal, as
``python -m kdfine ARGS`` would have. :class:`Proc` is the caller's handle (a subset of
``subprocess.Popen``): signals go straight to the command's pid.

What a fork cannot reproduce is decided before the import: settings read when Python starts or a
module loads (``PYTHON*``, the locale, ``OMP_*``, ``KDFINE_DEBUG``, the hubs' variables, ...).
:func:`forkable` sends a command with any of those different from the server's to a real
interpreter instead; so does every test of the interpreter's own start. A different PYTHONPATH
(the tests' sitecustomize that cuts the network, a package that hides an optional library) is done
in the forked process as a new interpreter's start does it, unless it would hide a module the
server has already imported: then the forked process execs a new interpreter.

Per request the server forks a supervisor, which forks the command, sends its pid, waits for it
and sends its status (``os.waitstatus_to_exitcode``: negative for a signal). The server itself
never waits on anyone and starts no thread, so each fork copies one single-threaded process.

Run as ``python tests/zygote.py SOCKET`` it is the server; it ends with the process that started it.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

#: environment variables read when the interpreter starts or when a module the server imported
#: loads: a difference sends the command to a real interpreter. (The hubs' and matplotlib's settings
#: are not among them: the server does not import those libraries, the command does, after its
#: environment is in place. torch reads TORCH_HOME, and kdfine HOME, when they are used.)
IMPORT_TIME = re.compile(r"^(PYTHON|OMP_|MKL_|OPENBLAS|GOTO|LC_|LANG$|LANGUAGE$|TMPDIR$|TEMP$|TMP$|KDFINE_DEBUG$|"
                         r"CUDA|NVIDIA|TORCH(?!_HOME$)|TERMINAL_WIDTH$|FORCE_COLOR$|NO_COLOR$|COLUMNS$|LINES$|TERM$|"
                         r"_TYPER|CLICOLOR)")
#: modules the server must not import, for the rule above to hold.
NOT_PRELOADED = ("huggingface_hub", "timm", "matplotlib", "onnxruntime")


def _sensitive(env: dict[str, str]) -> dict[str, str]:
    """The settings a fork would get wrong. PYTHONPATH is not among them: the command's process
    does what the interpreter's start does with it (:func:`_start_paths`)."""
    return {k: v for k, v in env.items() if IMPORT_TIME.match(k) and k != "PYTHONPATH"}


# ---------------------------------------------------------------- the server (its own process)

def serve(path: str) -> None:
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    import kdfine.api  # noqa: F401
    import kdfine.cli  # noqa: F401
    import kdfine.__main__  # noqa: F401  (its body runs main() only as __main__)
    # what the commands import on first use (0.35 s a command): the CLI's libraries and the layers
    import kdfine.cli.app  # noqa: F401
    import kdfine.cli.render  # noqa: F401
    import kdfine.data.prepare  # noqa: F401
    import kdfine.detect.command  # noqa: F401
    import kdfine.inference.evaluate  # noqa: F401
    import kdfine.models.checkpoint  # noqa: F401
    import kdfine.models.zoo  # noqa: F401
    import kdfine.train.run  # noqa: F401
    import rich.console  # noqa: F401
    import rich.progress  # noqa: F401

    loaded = [m for m in NOT_PRELOADED if m in sys.modules]
    assert not loaded, f"the fork server imported {loaded}: their environment variables would be stale"
    accept_forever(path, supervise)


def accept_forever(path: str, handle) -> None:
    """Bind a SOCK_SEQPACKET socket at ``path`` (it appears once bound: the readiness event) and,
    until the process that started this one ends, fork ``handle(conn, request, fds)`` for each
    request (a JSON document and up to 3 file descriptors); ``handle`` must not return."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path + ".part")
    os.rename(path + ".part", path)
    srv.listen(64)
    srv.settimeout(2)
    parent = os.getppid()
    while os.getppid() == parent:
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        if os.fork() == 0:
            srv.close()
            handle(conn, json.loads(msg), fds)
        conn.close()
        for fd in fds:
            os.close(fd)


def supervise(conn: socket.socket, req: dict, fds: list[int], run=None) -> None:
    """Fork the command, send its pid, wait for it, send its status, end (never returns). ``run``:
    what the command does instead of ``python -m kdfine`` (``run(argv) -> exit code``)."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        pid = os.fork()
        if pid == 0:
            conn.close()
            _command(req, fds, run)
        for fd in fds:
            os.close(fd)
        conn.send(json.dumps({"pid": pid}).encode())
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        conn.send(json.dumps({"code": code}).encode())
    finally:
        os._exit(0)


def _command(req: dict, fds: list[int], run=None) -> None:
    """Become ``python -m kdfine ARGV``, or ``run(ARGV)`` (never returns)."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as a new interpreter has them
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(req["cwd"])
        started_with = os.environ.get("PYTHONPATH", "")
        os.environ.clear()
        os.environ.update(req["env"])
        if not _start_paths(started_with, req["env"].get("PYTHONPATH", "")) and run is None:
            for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # as subprocess gives a child: Python ignores them
                signal.signal(sig, signal.SIG_DFL)
            os.execve(sys.executable, [sys.executable, "-m", req["module"], *req["argv"]], req["env"])
        try:
            code = run(req["argv"]) if run is not None else _python_m(req["module"], req["argv"])
        except SystemExit as e:
            code = _exit_code(e.code)
        except KeyboardInterrupt:  # the interpreter ends by the signal itself
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:  # what the interpreter does with an uncaught exception
            import traceback

            traceback.print_exc()
            code = 1
        import atexit
        import threading

        threading._shutdown()  # non-daemon threads are joined at exit, as in a normal interpreter exit
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                code = 120 if code == 0 else code  # the interpreter's status when the final flush fails
    finally:
        os._exit(code)


def _start_paths(old: str, new: str) -> bool:
    """Do what a new interpreter's start does with PYTHONPATH ``new`` in this process, forked from
    one started with ``old``: the entries go on ``sys.path`` after the script's directory, then
    ``sitecustomize`` and ``usercustomize`` are imported if they are found. False (nothing changed)
    where a fork cannot be the same: an entry of ``old`` left out, or an added one holding a module
    this process has already imported (a new interpreter would import that one instead)."""
    if new == old:
        return True
    before = [os.path.abspath(p) for p in old.split(os.pathsep) if p]
    entries = [os.path.abspath(p) for p in new.split(os.pathsep) if p]
    if not set(before) <= set(entries):
        return False
    loaded = {name.partition(".")[0] for name in sys.modules}
    for entry in set(entries) - set(before):
        try:
            names = {name.partition(".")[0] for name in os.listdir(entry)}
        except OSError:
            continue  # no directory there: nothing can be imported from it
        if names & loaded:
            return False
    rest = [p for p in sys.path[1:] if p not in before]
    sys.path[:] = [sys.path[0], *entries, *rest]
    importlib.invalidate_caches()
    import site

    for hook in ("sitecustomize", "usercustomize") if site.ENABLE_USER_SITE else ("sitecustomize",):
        try:
            importlib.import_module(hook)
        except ImportError as e:
            if e.name != hook:
                raise
    return True


def _python_m(module: str, argv: list[str]) -> int:
    """``python -m MODULE ARGV`` in this process; 0 when it returns."""
    if module == "kdfine":
        import kdfine.__main__ as entry

        sys.argv = [entry.__file__, *argv]
        entry.main()
    else:  # torchrun's launcher, whose workers are clients of this server (CLIENT)
        import runpy

        sys.argv = [module, *argv]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


def _exit_code(value) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


# ---------------------------------------------------------------- the caller's side

class Proc:
    """A command forked by the server; like ``subprocess.Popen`` for ``pid``, ``returncode``,
    ``poll``, ``wait``, ``send_signal``, ``kill``, ``communicate`` and ``args``; stdout and stderr
    are pipes (text mode), stdin a pipe (``stdin_data``) or /dev/null."""

    def __init__(self, sock: str, argv: list[str], env: dict[str, str], cwd: str, stdin_data: bool = True,
                 module: str = "kdfine"):
        self.args = [sys.executable, "-m", module, *argv]
        self.returncode: int | None = None
        r_in, self._w_in = os.pipe() if stdin_data else (os.open(os.devnull, os.O_RDONLY), None)
        self._r_out, w_out = os.pipe()
        self._r_err, w_err = os.pipe()
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._conn.connect(sock)
        try:
            socket.send_fds(self._conn, [json.dumps({"argv": argv, "env": env, "cwd": cwd, "module": module}).encode()],
                            [r_in, w_out, w_err])
        finally:
            for fd in (r_in, w_out, w_err):
                os.close(fd)
        self.pid = json.loads(self._conn.recv(4096))["pid"]

    def poll(self) -> int | None:
        if self.returncode is None:
            self._conn.setblocking(False)
            try:
                msg = self._conn.recv(4096)
            except BlockingIOError:
                return None
            finally:
                self._conn.setblocking(True)
            self._finished(msg)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._conn.settimeout(timeout)
            try:
                msg = self._conn.recv(4096)
            except TimeoutError:
                raise subprocess.TimeoutExpired(self.args, timeout) from None
            finally:
                self._conn.settimeout(None)
            self._finished(msg)
        return self.returncode

    def _finished(self, msg: bytes) -> None:
        self.returncode = json.loads(msg)["code"] if msg else -signal.SIGKILL  # no message: the supervisor died
        self._conn.close()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def run(self, input: str | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
        """``communicate`` to the end, as ``subprocess.run`` does (killed on a timeout, which is raised)."""
        try:
            out, err = self.communicate(input, timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.communicate()
            raise
        return subprocess.CompletedProcess(self.args, self.returncode, out, err)

    def communicate(self, input: str | None = None, timeout: float | None = None) -> tuple[str, str]:
        """Write ``input`` to stdin and close it, read stdout and stderr to their end, wait."""
        deadline = None if timeout is None else time.monotonic() + timeout
        data = (input or "").encode()
        chunks: dict[int, list[bytes]] = {}
        sel = selectors.DefaultSelector()
        if self._w_in is not None:
            if data:
                sel.register(self._w_in, selectors.EVENT_WRITE)
            else:
                os.close(self._w_in)
                self._w_in = None
        for fd in (self._r_out, self._r_err):
            if fd is not None:  # None: read to the end by an earlier call
                chunks[fd] = []
                sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            for key, _ in sel.select(left):
                if key.fd == self._w_in:
                    try:
                        n = os.write(self._w_in, data[:65536])
                    except BrokenPipeError:
                        n = len(data)
                    data = data[n:]
                    if not data:
                        sel.unregister(self._w_in)
                        os.close(self._w_in)
                        self._w_in = None
                else:
                    block = os.read(key.fd, 65536)
                    if block:
                        chunks[key.fd].append(block)
                    else:
                        sel.unregister(key.fd)
        self.wait(None if deadline is None else max(deadline - time.monotonic(), 0.01))
        out = err = ""
        if self._r_out is not None:
            out, err = (_text(b"".join(chunks[fd])) for fd in (self._r_out, self._r_err))
            os.close(self._r_out)
            os.close(self._r_err)
            self._r_out = self._r_err = None
        return out, err


def _text(data: bytes) -> str:
    """Bytes decoded as ``subprocess`` does in text mode (UTF-8 here, universal newlines)."""
    return data.decode("utf-8", errors="strict").replace("\r\n", "\n").replace("\r", "\n")


#: ``kdfine`` for torchrun's ``--no-python``: a small program (no site, no imports beyond the standard
#: library's core) that has the server fork the command with its own stdin, stdout, stderr,
#: environment and working directory, passes SIGINT, SIGTERM and SIGHUP on to it, and ends as it
#: ended (the same exit code, or killed by the same signal).
CLIENT = """#!{python} -S
import json, os, signal, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(os.environ["KDFINE_ZYGOTE"])
env = dict(os.environ)
del env["KDFINE_ZYGOTE"]
req = {{"argv": sys.argv[1:], "env": env, "cwd": os.getcwd(), "module": "kdfine"}}
socket.send_fds(s, [json.dumps(req).encode()], [0, 1, 2])
pid = json.loads(s.recv(4096))["pid"]
def forward(sig, frame):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, forward)
msg = s.recv(4096)
code = json.loads(msg)["code"] if msg else -signal.SIGKILL
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


class Server:
    """One fork server per test process, started on first use."""

    def __init__(self) -> None:
        self.sock: str | None = None
        self.client: Path | None = None
        self.env: dict[str, str] = {}
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()  # tests start commands from several threads

    def start(self, env: dict[str, str]) -> str:
        """The socket of a running server started with ``env`` (the tests' baseline environment)."""
        with self._lock:
            return self._start(env)

    def _start(self, env: dict[str, str]) -> str:
        if self.sock is None or self._proc is None or self._proc.poll() is not None:
            sock = os.path.join(tempfile.mkdtemp(prefix="kdfine-zygote-", dir="/tmp"), "s")  # AF_UNIX: <= 107 bytes
            self._proc = subprocess.Popen([sys.executable, __file__, sock], env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL)
            deadline = time.monotonic() + 120
            while not os.path.exists(sock):
                assert self._proc.poll() is None, "the tests' fork server did not start"
                assert time.monotonic() < deadline, "the tests' fork server did not start in 120 s"
                time.sleep(0.02)
            self.sock, self.env = sock, dict(env)
            self.client = Path(sock).with_name("kdfine")
            self.client.write_text(CLIENT.format(python=sys.executable))
            self.client.chmod(0o755)
        return self.sock

    def forkable(self, env: dict[str, str]) -> bool:
        """Whether a command with environment ``env`` behaves the same forked from the server."""
        return _sensitive(env) == _sensitive(self.env)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


if __name__ == "__main__":
    serve(sys.argv[1])
