"""Shared fixtures: run the real CLI (in this process, or in a subprocess where the process
boundary is what a test checks), small trained checkpoints, tiny image folders."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path
from typing import Iterator

# One OpenMP/BLAS thread per test process and per command it starts (a value set by the caller is
# kept): `make test` runs one worker per core, and pools that spin for work on cores the other
# worker is using made an epoch of the digits cnn 15x slower (6.0 s against 0.4 s). The networks
# of the tests are tiny; one thread is what they run fastest on anyway.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # imported before this file (a plugin): the variable came too late
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# imported after the setting above: numpy's BLAS reads the thread count when it loads
import numpy as np
import pytest
from PIL import Image as PillowImage

import zygote

ZYGOTE = zygote.Server()

ROOT = Path(__file__).resolve().parents[1]
CIFAR_TAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("KDFINE_DEBUG", None)
    env.update(extra or {})
    return env


def run_cli(*args: str, input: str | None = None, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 600, whole_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m kdfine ARGS`` as a process of its own (text mode; stdin is ``input``, empty by
    default), forked from the tests' fork server (:mod:`zygote`) unless its environment changes a
    setting read at start-up, then a new interpreter. The environment is :func:`cli_env` plus
    ``env``, or ``whole_env`` as it is."""
    full = dict(whole_env) if whole_env is not None else cli_env(env)
    sock = ZYGOTE.start(cli_env())
    if not ZYGOTE.forkable(full):
        return run_interpreter(*args, input=input, cwd=cwd, timeout=timeout, whole_env=full)
    return zygote.Proc(sock, [str(a) for a in args], full, str(cwd or os.getcwd())).run(input, timeout)


def start_cli(*args: str, cwd: Path | None = None) -> zygote.Proc:
    """``python -m kdfine ARGS`` started in the background as a process of its own (forked from the
    fork server; stdout and stderr pipes, stdin empty): ``pid``, ``poll``, ``wait``,
    ``send_signal``, ``communicate`` as ``subprocess.Popen`` has them."""
    return zygote.Proc(ZYGOTE.start(cli_env()), [str(a) for a in args], cli_env(), str(cwd or os.getcwd()),
                       stdin_data=False)


def shell_env() -> dict[str, str]:
    """The environment of :func:`cli_env` with ``kdfine`` on the PATH as the fork server's client:
    for shell pipelines of kdfine commands, each one a process of its own (see :mod:`zygote`)."""
    sock = ZYGOTE.start(cli_env())
    env = cli_env({"KDFINE_ZYGOTE": sock})
    env["PATH"] = f"{ZYGOTE.client.parent}{os.pathsep}{env['PATH']}"
    return env


def run_interpreter(*args: str, input: str | None = None, env: dict[str, str] | None = None,
                    cwd: Path | None = None, timeout: float = 600,
                    whole_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m kdfine ARGS`` in a new interpreter (for what happens at its start); the
    environment as :func:`run_cli` makes it."""
    full = dict(whole_env) if whole_env is not None else cli_env(env)
    return subprocess.run([sys.executable, "-m", "kdfine", *map(str, args)], input=input, capture_output=True,
                          text=True, env=full, cwd=cwd, timeout=timeout)


def torchrun(*args: str, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 kdfine -- ARGS`` on CPU, one thread per process
    (the ``--`` keeps torchrun's own parser away from kdfine's options). The launcher and both
    workers are processes of their own forked from the tests' fork server (the workers through
    its client, see :mod:`zygote`). A hang shows up as a timeout, never as a stuck test run."""
    sock = ZYGOTE.start(cli_env())
    env = cli_env({"OMP_NUM_THREADS": "1", "KDFINE_ZYGOTE": sock})
    argv = ["--standalone", "--nproc-per-node", "2", "--no-python", str(ZYGOTE.client), "--", *map(str, args)]
    return zygote.Proc(sock, argv, env, os.getcwd(), module="torch.distributed.run").run(input, timeout)


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` as :func:`cli_env` would give a subprocess (plus ``env``), put back after."""
    saved = dict(os.environ)
    os.environ.pop("KDFINE_DEBUG", None)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _text_stream(text: str = "") -> io.TextIOWrapper:
    """A text stream with a byte ``buffer`` under it, like a real sys.stdout (CSV goes to the buffer)."""
    return io.TextIOWrapper(io.BytesIO(text.encode()), encoding="utf-8", newline="")


def run_kdfine(*args: str, input: str | None = None, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: float | None = None) -> subprocess.CompletedProcess:
    """``kdfine ARGS`` through the console entry point :func:`kdfine.cli.main`, in this process:
    the same parsing, error-to-exit-code mapping, stdout and stderr as ``python -m kdfine``
    without the interpreter start (2-3 s of torch import). stdin is ``input`` (empty by default),
    ``env`` is added to the environment, ``cwd`` is the working directory; all are put back after,
    with kdfine's CLI state and the warning filters. Returns what :func:`run_cli` returns
    (``timeout`` is accepted for the same signature and not enforced)."""
    import importlib

    from kdfine.cli import main

    cli_app = importlib.import_module("kdfine.cli.app")  # the module: kdfine.cli.app is also the Typer app's name

    argv, streams, state, here = sys.argv, (sys.stdin, sys.stdout, sys.stderr), dict(cli_app._state), os.getcwd()
    out, err = _text_stream(), _text_stream()
    code: int | str | None = 0
    with _environment(env or {}), warnings.catch_warnings():
        sys.argv = ["kdfine", *map(str, args)]
        sys.stdin, sys.stdout, sys.stderr = io.StringIO(input or ""), out, err
        try:
            os.chdir(cwd or here)
            main()
        except SystemExit as e:
            code = e.code
        finally:
            out.flush(), err.flush()
            sys.argv, (sys.stdin, sys.stdout, sys.stderr) = argv, streams
            cli_app._state.clear()
            cli_app._state.update(state)
            os.chdir(here)
    code = code if isinstance(code, int) else (0 if code is None else 1)
    return subprocess.CompletedProcess(["kdfine", *map(str, args)], code, out.buffer.getvalue().decode(),
                                       err.buffer.getvalue().decode())


#: the slowest files first (``pytest --durations=0``, summed per file): ``--dist loadfile`` hands
#: files to the two workers in collection order, so the long ones start at once and short ones fill
#: the end, and both workers finish together. Files not named keep their order after these.
SLOW_FIRST = ("test_docs.py", "test_zoo.py", "test_strategies.py", "test_distributed.py", "test_resume.py",
              "test_bad_input.py", "test_precision.py", "test_file_safety.py", "test_json_output.py",
              "test_distill.py", "test_outputs.py", "test_ship.py", "test_cli.py")


def pytest_sessionfinish(session, exitstatus):
    ZYGOTE.stop()


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept


PILLOW_MAX_PIXELS = PillowImage.MAX_IMAGE_PIXELS


@pytest.fixture(autouse=True)
def _pillow_limit():
    """Every test starts with Pillow's own pixel limit, as a new kdfine process does: kdfine raises
    that process-wide setting to a larger KDFINE_MAX_PIXELS, and the message for a decompression
    bomb then takes its other form (test_decode before test_ship in one process failed on it)."""
    PillowImage.MAX_IMAGE_PIXELS = PILLOW_MAX_PIXELS


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets the same throwaway KDFINE_CACHE, never the user's ~/.cache/kdfine."""
    cache = tmp_path_factory.getbasetemp() / "kdfine-cache"
    monkeypatch.setenv("KDFINE_CACHE", str(cache))


@pytest.fixture
def cli():
    """The CLI in this process (:func:`run_kdfine`); tests of the process boundary use :func:`run_cli`."""
    return run_kdfine


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def digits_teacher(session_dir) -> Path:
    """A cnn teacher trained on digits for 6 epochs (about 3 s): shared by many tests."""
    out = session_dir / "teacher.safetensors"
    r = run_kdfine("train-teacher", "--epochs", "6", "--out", out, "-q",
                   env={"KDFINE_CACHE": str(session_dir / "cache")})
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def noisy_dump(session_dir) -> Path:
    """A teacher trained on digits with sym:0.4 noise, and its feature dump of the training split."""
    ck = session_dir / "noisy.safetensors"
    env = {"KDFINE_CACHE": str(session_dir / "cache")}
    r = run_kdfine("train-teacher", "--label-noise", "sym:0.4", "--epochs", "8", "--out", ck, "-q", env=env)
    assert r.returncode == 0, r.stderr
    dump = session_dir / "features.npy"
    r = run_kdfine("eval", "--model", ck, "--split", "train", "--dump-features", dump, "-q", env=env)
    assert r.returncode == 0, r.stderr
    return dump


def write_png_tree(root: Path, classes=("cat", "dog", "fox"), per_class: int = 6, size: int = 12,
                   test: bool = True, mode: str = "RGB") -> Path:
    """A tiny ImageFolder tree of PNGs whose colour depends on the class (so it is learnable)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test") if test else ("",):
        for ci, c in enumerate(classes):
            d = root / split / c if split else root / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class if split != "test" else max(2, per_class // 3)):
                base = np.zeros((size, size, 3), np.uint8)
                base[..., ci % 3] = 200
                img = np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)
                im = Image.fromarray(img)
                (im.convert("L") if mode == "L" else im).save(d / f"{i:03d}.png")
    return root


def bomb_png(path: Path, w: int = 20000, h: int = 20000) -> Path:
    """A PNG whose header declares ``w`` x ``h`` grey pixels (400 million by default): a
    decompression bomb as the decoder sees it, written in microseconds (the rows are missing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def gradient_image(w: int, h: int, seed: int) -> np.ndarray:
    """An RGB image whose content tells up from down and left from right (so orientation shows)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), 128 + 0 * x], -1)
    return np.clip(a + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)


def _exif_jpeg(path: Path, orientation: int, seed: int) -> None:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(gradient_image(40, 24, seed)).save(path, exif=exif, quality=95)


def awkward_images(d: Path, seed: int, colour: bool = True) -> None:
    """Every kind of file that decodes differently when done carelessly, into folder ``d``."""
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    g = gradient_image(30, 18, seed)
    grey16 = (np.linspace(0, 65535, 24 * 20).reshape(20, 24)).astype(np.uint16)
    Image.fromarray(grey16).save(d / "grey16.png")
    Image.fromarray(g[..., 0]).save(d / "grey.png")
    alpha = np.where(np.arange(30) < 15, 0, 255)[None, :].repeat(18, 0)
    Image.fromarray(np.dstack([g[..., 1], alpha]).astype(np.uint8)).save(d / "grey_alpha.png")  # LA
    bomb_png(d / "bomb.png")
    if not colour:
        return
    for o in (3, 6, 8):
        _exif_jpeg(d / f"exif{o}.jpg", o, seed + o)
    rgba = np.dstack([g, np.where(np.arange(30) < 10, 0, 255)[None, :].repeat(18, 0)]).astype(np.uint8)
    Image.fromarray(rgba).save(d / "rgba.png")
    pal = Image.fromarray(g).convert("P", palette=Image.ADAPTIVE, colors=8)
    pal.info["transparency"] = 0
    pal.save(d / "palette.png", transparency=0)
    Image.fromarray(g).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    Image.fromarray(gradient_image(50, 20, seed + 1)).save(d / "wide.png")
    Image.fromarray(gradient_image(400, 300, seed + 2)).save(d / "big.jpg", quality=90)


def awkward_folder(root: Path, colour: bool) -> Path:
    """An ImageFolder tree (train/test, classes a and b) of :func:`awkward_images`."""
    for split in ("train", "test"):
        for ci, c in enumerate(("a", "b")):
            awkward_images(root / split / c, seed=10 * ci + (split == "test"), colour=colour)
    return root


def digits_slice(n_train: int, n_test: int = 100):
    """The first ``n_train`` training and ``n_test`` test images of digits (8x8 grey, 10 classes),
    for in-process training tests."""
    from dataclasses import replace

    from kdfine.data.sources import load_source

    src = load_source("digits")
    tr, te = src.train, src.test
    return (replace(tr, images=tr.images[:n_train], labels=tr.labels[:n_train]),
            replace(te, images=te.images[:n_test], labels=te.labels[:n_test]))


def tiny_cnn(train, seed: int = 0):
    """kdfine's ``cnn`` for the dataset ``train``, initialised from ``seed``."""
    import torch

    from kdfine.models import build

    torch.manual_seed(seed)
    return build("cnn", train.num_classes, train.in_channels, train.image_size)


def stop_after(n: int):
    """A quiet Reporter that raises KeyboardInterrupt at the epoch line of epoch ``n`` (before that
    epoch's state is saved), like a second Ctrl-C between two epochs: the state after epoch n-1
    is on disk."""
    from kdfine.train.progress import Reporter

    class StopAfter(Reporter):
        def epoch_line(self, rec, epochs):
            if rec["epoch"] == n:
                raise KeyboardInterrupt

    return StopAfter(quiet=True)


def state_of(out: Path) -> Path:
    """The resume state beside the checkpoint ``out``."""
    return Path(f"{out}.state.safetensors")


def saved_epoch(out: Path) -> int:
    """The last complete epoch recorded in the resume state beside ``out`` (0 when there is none,
    or while it is being renamed into place). The safetensors header is read as JSON here: opening
    the file with safetensors' torch backend would import torch in the polling thread, and a first
    import of torch racing in two threads left it unusable (every poll then read 0)."""
    path = state_of(out)
    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
        return int(json.loads(header["__metadata__"]["kdfine_state"])["epoch"])
    except (OSError, struct.error, ValueError, KeyError, TypeError):  # none yet, or caught mid-rename
        return 0


class Run:
    """``python -m kdfine ARGS --out OUT --log LOG`` in the background (one thread), to be stopped
    with a signal once it is inside a given epoch."""

    def __init__(self, args: list[str], out: Path, log: Path, timeout: float = 300):
        self.out, self.log, self.timeout = out, log, timeout
        argv = [*map(str, args), "--out", str(out), "--log", str(log)]
        self.proc = zygote.Proc(ZYGOTE.start(cli_env()), argv, cli_env(), os.getcwd(), stdin_data=False)

    def stop_inside_epoch(self, epoch: int, sig: int) -> subprocess.CompletedProcess:
        """Wait until epoch ``epoch - 1`` is saved (the state file is the event), let epoch
        ``epoch`` run for a third of an epoch's time, then send ``sig``; returns the finished process."""
        import time

        deadline = time.monotonic() + self.timeout
        while saved_epoch(self.out) < epoch - 1:
            assert self.proc.poll() is None, f"run ended early: {self.proc.communicate()[1]}"
            assert time.monotonic() < deadline, "no epoch finished in time"
            time.sleep(0.02)
        seconds = json.loads(self.log.read_text().splitlines()[-1])["time_s"]
        time.sleep(0.3 * seconds)
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=self.timeout)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def assert_same_weights(a: Path, b: Path) -> None:
    """Every tensor of the two checkpoints is equal (torch.equal), and they hold the same names."""
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"tensors differ after resume: {different[:5]}"


def read_json(text: str):
    return json.loads(text)


@pytest.fixture(scope="session")
def cifar_slice(tmp_path_factory) -> Path:
    """A small slice of the real CIFAR-10 JPEG tree (20 train / 5 test images per class)."""
    import tarfile

    if not CIFAR_TAR.exists():
        pytest.fail(f"{CIFAR_TAR} is missing: the CIFAR-10 JPEG archive ships in ../shared/data")
    root = tmp_path_factory.mktemp("cifar-slice")
    wanted = {}
    with tarfile.open(CIFAR_TAR) as tar:
        for m in tar:
            if not m.isfile():
                continue
            parts = Path(m.name).parts
            split, cls = parts[-3], parts[-2]
            key = (split, cls)
            limit = 20 if split == "train" else 5
            if wanted.get(key, 0) < limit:
                wanted[key] = wanted.get(key, 0) + 1
                target = root / split / cls / parts[-1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(m).read())
            if len(wanted) == 20 and all(v >= (20 if k[0] == "train" else 5) for k, v in wanted.items()):
                break
    return root
