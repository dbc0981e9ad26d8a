"""Files that cannot be turned against the user (issue 28).

The lock and the files written beside an output never follow a planted link; an image folder
edited in place (same names and sizes, mtime restored) is noticed by the data fingerprint, an
inherited checkpoint, a resumed run and the decode cache; cache entries are checked when opened
and rebuilt when damaged, and never name the files an export links; a cache disk that fills up
costs memory, not the run; a user without a home directory still gets a cache; the Python API
checks its arguments and raises kdfine's errors with the CLI's messages. Bad inputs with one
error line each are in test_bad_input.py.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_env, run_kdfine, start_cli
from kdfine.errors import ArgumentError, InputError, KdfineWarning, UsageError

VICTIM = b"a file of the user that kdfine must never write\n"


def _victim(d: Path) -> Path:
    p = d / "victim.txt"
    p.write_bytes(VICTIM)
    return p


def _bmp_tree(root: Path, per_class: int = 6, size: int = 12) -> Path:
    """A tiny ImageFolder tree of BMPs: a file's size depends only on its dimensions, so pixels
    can be edited in place without changing it."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, n in (("train", per_class), ("test", 2)):
        for ci, c in enumerate(("cat", "dog", "fox")):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                a[..., ci] += 180
                Image.fromarray(a).save(root / split / c / f"{i:03d}.bmp")
    return root


def _edit_in_place(f: Path) -> None:
    """New pixels, the same byte size, the mtime put back (what ``touch -r`` does)."""
    from PIL import Image

    st = f.stat()
    with Image.open(f) as im:
        a = 255 - np.asarray(im)
    Image.fromarray(a).save(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = f.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


# ------------------------------------------------------------------- the lock, files beside outputs


def test_the_lock_never_follows_a_link_and_replaces_a_dead_runs_file(tmp_path):
    from kdfine.files.lock import run_lock

    out, victim = tmp_path / "o.safetensors", _victim(tmp_path)
    lock = tmp_path / "o.safetensors.lock"
    lock.symlink_to(victim)
    with pytest.raises(InputError, match="o.safetensors.lock is a symbolic link"):
        with run_lock(out):
            pass
    assert victim.read_bytes() == VICTIM and lock.is_symlink()
    lock.unlink()
    os.mkfifo(lock)  # opening a FIFO could block: refused from its lstat, never opened
    with pytest.raises(InputError, match="is not a regular file"):
        with run_lock(out):
            pass
    lock.unlink()
    lock.write_text("999999 on a-host-long-gone\n")  # a dead run's lock: no flock is held on it
    with run_lock(out) as held:
        assert held.read_text() == f"{os.getpid()} on {socket.gethostname()}\n"
        assert os.lstat(held).st_nlink == 1 and stat.S_ISREG(os.lstat(held).st_mode)
        with pytest.raises(UsageError, match=f"another kdfine run is writing it \\(pid {os.getpid()} on"):
            with run_lock(out):  # a second open file description: flock refuses it
                pass
    assert not lock.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file of another user needs root")
def test_the_lock_refuses_another_users_file(tmp_path):
    from kdfine.files.lock import run_lock

    lock = tmp_path / "o.safetensors.lock"
    lock.write_text("12 on somewhere\n")
    os.chown(lock, 4242, 4242)
    with pytest.raises(InputError, match="belongs to another user"):
        with run_lock(tmp_path / "o.safetensors"):
            pass
    assert lock.read_text() == "12 on somewhere\n"


def test_temporaries_are_created_exclusively_and_never_followed(tmp_path):
    from kdfine.files import outputs

    victim = _victim(tmp_path)
    planted = tmp_path / ".kdfine-00000000-out.csv"
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        outputs._create(planted, directory=False)
    with pytest.raises(OSError):  # the opener of every staged write: O_NOFOLLOW
        open(planted, "w", opener=outputs._own_file)
    assert victim.read_bytes() == VICTIM


def test_a_live_log_replaces_a_planted_link(tmp_path):
    from kdfine.files.outputs import Outputs

    victim = _victim(tmp_path)
    log = tmp_path / "run.jsonl"
    log.symlink_to(victim)
    outs = Outputs()
    outs.add(log, "--log")
    with outs.live(log) as f:
        f.write('{"epoch": 1}\n')
    assert victim.read_bytes() == VICTIM
    assert not log.is_symlink() and log.read_text() == '{"epoch": 1}\n'
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".kdfine-")] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="a link owned by another user needs root to make")
def test_another_users_link_to_a_device_is_not_written_through(tmp_path):
    from kdfine.files.outputs import is_special

    link = tmp_path / "out.csv"
    link.symlink_to("/dev/null")
    assert is_special(link)  # this user's own link: written through, like /dev/stdout
    os.lchown(link, 4242, 4242)
    assert not is_special(link)  # another user's: a name to replace, not a way in


def test_a_planted_state_link_is_replaced_not_followed(tmp_path):
    victim = _victim(tmp_path)
    state = tmp_path / "t.safetensors.state.safetensors"
    state.symlink_to(victim)
    r = run_kdfine("train-teacher", "--arch", "mlp-16", "--epochs", "2", "--device", "cpu", "-q",
                   "--out", tmp_path / "t.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert victim.read_bytes() == VICTIM and not os.path.lexists(state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors", "victim.txt"]


# ------------------------------------------------------------------- what an image folder holds


def test_an_edit_in_place_changes_the_fingerprint_and_metadata_does_not(tmp_path):
    from kdfine.data.prepare import data_fingerprint, legacy_folder_fingerprint

    root = _bmp_tree(tmp_path / "t")
    spec = f"imagefolder:{root}"
    before, legacy = data_fingerprint(spec), legacy_folder_fingerprint(spec)
    assert before.startswith("content-sha256:")
    f = root / "train" / "dog" / "001.bmp"
    os.link(f, tmp_path / "elsewhere.bmp")  # a hard link (as clean --export-dir makes): the ctime moves
    f.chmod(0o600)
    assert data_fingerprint(spec) == before
    copy = shutil.copytree(root, tmp_path / "copy")  # other inodes, another root: the same contents
    assert data_fingerprint(f"imagefolder:{copy}") == before
    _edit_in_place(f)
    assert data_fingerprint(spec) != before
    assert legacy_folder_fingerprint(spec) == legacy  # what checkpoints from before recorded: blind to it


def test_the_full_content_check_rereads_every_file(tmp_path, monkeypatch):
    """A remembered fingerprint is trusted while the stat key holds; KDFINE_VERIFY_DATA=1 reads the
    bytes every time (for file systems whose ctime cannot be trusted)."""
    from kdfine.data import identity
    from kdfine.data.prepare import data_fingerprint
    from kdfine.data.sources import fingerprint_store

    root = _bmp_tree(tmp_path / "t")
    spec = f"imagefolder:{root}"
    true = data_fingerprint(spec)
    entries = list(fingerprint_store().glob("*.json"))
    stale = "content-sha256:" + "0" * 64  # as if the bytes had changed with a ctime that did not move
    for p in entries:
        doc = json.loads(p.read_text())
        if doc["content"] == true:
            p.write_text(json.dumps({**doc, "content": stale}))
    assert data_fingerprint(spec) == stale
    monkeypatch.setenv("KDFINE_VERIFY_DATA", "1")
    assert identity.verify_all() and data_fingerprint(spec) == true


def test_checkpoints_from_before_content_fingerprints_still_inherit(tmp_path):
    from kdfine.data.prepare import _check_recorded_data, legacy_folder_fingerprint

    root = _bmp_tree(tmp_path / "t")
    spec = f"imagefolder:{root}"
    old = legacy_folder_fingerprint(spec)
    _check_recorded_data(spec, old)
    (root / "train" / "cat" / "new.bmp").write_bytes((root / "train" / "cat" / "000.bmp").read_bytes())
    with pytest.raises(InputError, match="has changed since the checkpoint was trained"):
        _check_recorded_data(spec, old)


def test_changed_pixels_stop_an_inheriting_command_and_a_resume(tmp_path):
    root = _bmp_tree(tmp_path / "t")
    base = ["train-teacher", "--data", f"imagefolder:{root}", "--arch", "mlp-16", "--device", "cpu", "-q"]
    r = run_kdfine(*base, "--epochs", "1", "--out", tmp_path / "t.safetensors")
    assert r.returncode == 0, r.stderr
    run = start_cli(*base, "--epochs", "500", "--out", tmp_path / "r.safetensors")
    state = tmp_path / "r.safetensors.state.safetensors"
    deadline = time.monotonic() + 300
    while not state.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 130 and state.exists(), err
    _edit_in_place(root / "train" / "fox" / "002.bmp")
    r = run_kdfine("eval", "--model", tmp_path / "t.safetensors", "--device", "cpu")
    assert r.returncode == 3 and "has changed since the checkpoint was trained" in r.stderr, r.stderr
    r = run_kdfine(*base, "--epochs", "500", "--out", tmp_path / "r.safetensors", "--resume")
    assert r.returncode == 2 and "was saved while training on other data (train_set:" in r.stderr, r.stderr


# ------------------------------------------------------------------- the decode cache's entries


def _entry(src) -> Path:
    return Path(src.info["cache"])


def _rewrite_header(p: Path, shape: tuple, descr: str = "|u1") -> None:
    data = p.read_bytes()
    with open(p, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        body = data[f.tell():]
    with open(p, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
        f.write(body)


def _manifest(edit):
    def damage(e: Path) -> None:
        m = json.loads((e / "manifest.json").read_text())
        edit(m)
        (e / "manifest.json").write_text(json.dumps(m))
    return damage


def _truncate(e: Path) -> None:
    p = e / "train.npy"
    p.write_bytes(p.read_bytes()[:-7])


def _reshape(e: Path) -> None:
    a = np.load(e / "train.npy", mmap_mode="r")
    _rewrite_header(e / "train.npy", (a.shape[0] * a.shape[1], a.shape[2], a.shape[3], 1))


def _int32_labels(e: Path) -> None:
    np.save(e / "train_labels.npy", np.load(e / "train_labels.npy").astype(np.int32))


def _kept_out_of_range(e: Path) -> None:
    np.save(e / "train_kept.npy", np.load(e / "train_kept.npy") + 100)


def _labels_shifted(e: Path) -> None:
    np.save(e / "train_labels.npy", (np.load(e / "train_labels.npy") + 1) % 3)


def _array_is_a_link(e: Path) -> None:
    (e / "test.npy").unlink()
    (e / "test.npy").symlink_to(e / "train.npy")


def _skipped_names_passwd(m: dict) -> None:
    m["splits"]["train"]["skipped"] = [{"position": 0, "file": "/etc/passwd", "reason": "x"}]


DAMAGES = {
    "array-truncated": _truncate,
    "array-reshaped": _reshape,
    "labels-int32": _int32_labels,
    "kept-out-of-range": _kept_out_of_range,
    "labels-of-other-classes": _labels_shifted,
    "array-is-a-link": _array_is_a_link,
    "manifest-not-json": lambda e: (e / "manifest.json").write_text("{not json"),
    "manifest-a-list": lambda e: (e / "manifest.json").write_text("[]"),
    "manifest-nested-deeply": lambda e: (e / "manifest.json").write_text("[" * 100000 + "]" * 100000),
    "manifest-image-size": _manifest(lambda m: m.update(image_size=10**9)),
    "manifest-skipped-names-a-file": _manifest(_skipped_names_passwd),
    "manifest-sums-text": _manifest(lambda m: m["splits"]["train"].update(sums=["a", "b", "c"])),
    "manifest-arrays-path": _manifest(lambda m: m.update(arrays=[*m["arrays"], "../../etc"])),
    "manifest-missing": lambda e: (e / "manifest.json").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_entry_is_decoded_again_with_one_warning(tmp_path, damage):
    from kdfine.data.sources import load_source

    root = _bmp_tree(tmp_path / "t")
    first = load_source(f"imagefolder:{root}")
    entry = _entry(first)
    want = {s: (np.array(first.split(s).images), first.split(s).labels.copy(), first.split(s).files)
            for s in ("train", "test")}  # copies: the first maps see the damage too
    DAMAGES[damage](entry)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        again = load_source(f"imagefolder:{root}")
    said = [str(w.message) for w in rec]
    assert len(said) == 1 and f"decode cache entry {entry} is damaged" in said[0], said
    for split, (images, labels, files) in want.items():
        b = again.split(split)
        assert np.array_equal(b.images, images) and np.array_equal(b.labels, labels) and b.files == files
    assert again.fingerprint == first.fingerprint
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt: trusted again, silently
        load_source(f"imagefolder:{root}")


def test_an_entry_of_other_bytes_is_decoded_again(tmp_path):
    from kdfine.data.sources import load_source

    root = _bmp_tree(tmp_path / "t")
    first = load_source(f"imagefolder:{root}")
    _manifest(lambda m: m.update(content="content-sha256:" + "1" * 64))(_entry(first))
    with pytest.warns(KdfineWarning, match="changed in place since they were decoded"):
        again = load_source(f"imagefolder:{root}")
    assert np.array_equal(again.train.images, first.train.images)


def test_export_links_only_the_files_of_the_tree(tmp_path):
    root = _bmp_tree(tmp_path / "t")
    r = run_kdfine("train-teacher", "--data", f"imagefolder:{root}", "--arch", "mlp-16", "--epochs", "1", "--device",
                   "cpu", "-q", "--out", tmp_path / "m.safetensors")
    assert r.returncode == 0, r.stderr
    entries = list(Path(os.environ["KDFINE_CACHE"], "decoded").glob("*/manifest.json"))
    for p in entries:  # what kdfine 0.x trusted: file names in the manifest
        m = json.loads(p.read_text())
        for split in m.get("splits", {}).values():
            if isinstance(split, dict) and isinstance(split.get("files"), int):
                split["names"] = ["/etc/passwd"] * split["files"]
        m["files"] = {"train": ["/etc/passwd"], "test": ["/etc/passwd"]}
        p.write_text(json.dumps(m))
    r = run_kdfine("clean", "--model", tmp_path / "m.safetensors", "--out", tmp_path / "c.csv", "--export-dir",
                   tmp_path / "exp", "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr
    tree = {(s.st_dev, s.st_ino) for s in (f.stat() for f in root.rglob("*.bmp"))}
    exported = [f for f in (tmp_path / "exp").rglob("*") if f.is_file()]
    assert exported and all((f.stat().st_dev, f.stat().st_ino) in tree for f in exported)


# ------------------------------------------------------------------- a full disk, no home directory


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_cache_that_cannot_grow_costs_memory_not_the_run(tmp_path):
    """RLIMIT_FSIZE makes every write past 64 KiB fail (EFBIG, Python ignores SIGXFSZ), as a full
    disk fails with ENOSPC: the decode goes on in memory after one warning."""
    root = _bmp_tree(tmp_path / "t", per_class=12, size=40)  # train.npy: 36 x 40 x 40 x 3 = 173 KB
    model = tmp_path / "m.safetensors"
    r = run_kdfine("train-teacher", "--data", f"imagefolder:{root}", "--arch", "mlp-16", "--epochs", "1", "--device",
                   "cpu", "-q", "--out", model)
    assert r.returncode == 0, r.stderr
    good = run_kdfine("eval", "--model", model, "--split", "train", "--device", "cpu", "--json")
    assert good.returncode == 0, good.stderr
    small = tmp_path / "small-cache"
    full = subprocess.run([sys.executable, "-m", "kdfine", "eval", "--model", str(model), "--split", "train",
                           "--device", "cpu", "--json"], capture_output=True, text=True, timeout=600,
                          env=cli_env({"KDFINE_CACHE": str(small), "PYTHONDONTWRITEBYTECODE": "1"}),
                          preexec_fn=_limit_file_size(64 << 10))
    assert full.returncode == 0, full.stderr
    assert full.stderr.splitlines() == [f"kdfine: warning: decode cache {small}: cannot write (File too large); "
                                        "decoding into memory for this run only (free space there, or set "
                                        "KDFINE_CACHE to a writable directory with room)"]
    assert json.loads(full.stdout)["models"] == json.loads(good.stdout)["models"]
    assert list(small.glob("decoded/*")) == [] and list(small.glob("decoded/.*")) == []


def _free_uid(start: int) -> int:
    uid = start
    while True:
        try:
            pwd.getpwuid(uid)
            uid += 1
        except KeyError:
            return uid


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="running as a uid without a passwd entry needs root and setpriv")
def test_without_a_home_directory_the_cache_is_private_in_tmp():
    """HOME removed and a uid the password database does not know (setpriv): the cache is a
    private directory in TMPDIR, with one warning; a name taken by someone else is exit 2."""
    work = Path(tempfile.mkdtemp(prefix="kdfine-nohome-"))
    try:
        work.chmod(0o755)
        root = _bmp_tree(work / "t")
        tmp = work / "tmp"
        tmp.mkdir(mode=0o1777)
        tmp.chmod(0o1777)
        out = work / "out"
        out.mkdir(mode=0o777)
        out.chmod(0o777)
        env = {k: v for k, v in cli_env({"TMPDIR": str(tmp)}).items() if k not in ("HOME", "KDFINE_CACHE")}
        uid = _free_uid(54321)

        def run(user: int) -> subprocess.CompletedProcess:
            return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", sys.executable,
                                   "-m", "kdfine", "train-teacher", "--data", f"imagefolder:{root}", "--arch", "mlp-16",
                                   "--epochs", "1", "--device", "cpu", "--out", str(out / f"{user}.safetensors")],
                                  capture_output=True, text=True, env=env, timeout=600, cwd=out)

        r = run(uid)
        assert r.returncode == 0, r.stderr
        cache = tmp / f"kdfine-cache-{uid}"
        said = [ln for ln in r.stderr.splitlines() if ln.startswith("kdfine: warning:")]
        assert said == [f"kdfine: warning: no home directory (HOME is not set and user {uid} has none): "
                        f"the decode cache is in {cache}; set KDFINE_CACHE to keep it elsewhere"], r.stderr
        assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and list(cache.glob("decoded/*/manifest.json"))
        other = _free_uid(uid + 1)
        (tmp / f"kdfine-cache-{other}").mkdir()  # root's: not this user's private directory
        r = run(other)
        assert r.returncode == 2 and "set KDFINE_CACHE to a writable directory" in r.stderr, r.stderr
        assert not (out / f"{other}.safetensors").exists()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------- the Python API's boundary


def test_the_api_checks_its_arguments_before_anything_runs(tmp_path, monkeypatch):
    from kdfine import api

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArgumentError, match=r"predict: 'paths' must be a list of str .*got str '/'; pass \['/'\]") as e:
        api.predict("m.safetensors", "/")
    assert isinstance(e.value, TypeError) and isinstance(e.value, UsageError)
    with pytest.raises(ArgumentError, match="'top_k' must be an int, got bool"):
        api.predict("m.safetensors", ["x.png"], top_k=True)
    with pytest.raises(ArgumentError, match="'detect' must be a DetectOptions or None"):
        api.detect_noise("f.npy", "c.csv", detect={"method": "gmm"})
    with pytest.raises(ArgumentError, match="unexpected keyword argument 'zeta'"):
        api.detect_noise("f.npy", "c.csv", zeta=0.4)
    assert list(tmp_path.iterdir()) == []


def test_the_api_takes_paths_and_reports_os_errors_as_the_cli_does(tmp_path):
    from kdfine import api
    from kdfine.boundary import api_function
    from kdfine.detect.dump import write_dump

    f = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    write_dump(tmp_path / "f.npy", f, np.zeros((60, 3), np.float32), np.arange(60) % 3, {"num_classes": 3})
    report, *_ = api.detect_noise(tmp_path / "f.npy", tmp_path / "c.csv")  # pathlib paths are fine
    assert report["out"] == str(tmp_path / "c.csv") and (tmp_path / "c.csv").is_file()

    @api_function
    def reads(path: str) -> bytes:  # a file-system error that no reader of kdfine names itself
        return Path(path).read_bytes()

    with pytest.raises(InputError) as e:
        reads(tmp_path / "missing")
    assert str(e.value) == f"cannot access {tmp_path / 'missing'}: No such file or directory"
    assert isinstance(e.value.__cause__, FileNotFoundError)  # kept for --debug's traceback


def _detect_args(args: list) -> tuple[str, str, dict]:
    """detect-noise's command line -> (features, out, keyword arguments of api.detect_noise)."""
    from kdfine.options import DetectOptions

    opts = dict(zip(args[1::2], args[2::2])) if len(args) % 2 else {}
    kw = {k.lstrip("-").replace("-", "_"): str(v) for k, v in opts.items() if k not in ("--features", "--out",
                                                                                         "--method")}
    kw["detect"] = DetectOptions(**({"method": opts["--method"]} if "--method" in opts else {}))  # the CLI's default
    return str(opts["--features"]), str(opts["--out"]), kw


@pytest.mark.parametrize("name", ["dump-json-nested-deeply", "dump-labels-huge-label", "dump-logits-strings",
                                  "dump-npy-header-lies", "index-csv-field-over-128k", "features-with-nan",
                                  "dump-json-a-list"])
def test_the_api_raises_the_cli_error_for_a_bad_dump(tmp_path, monkeypatch, name):
    from kdfine import api
    from test_bad_input import CASES

    d = tmp_path / name
    d.mkdir()
    args = CASES[name].make(d, {})
    cli = run_kdfine(*args, cwd=d)
    assert cli.returncode == CASES[name].code and len(cli.stderr.splitlines()) == 1, cli.stderr
    monkeypatch.chdir(d)
    features, out, kw = _detect_args(args)
    with pytest.raises(InputError) as e:
        api.detect_noise(features, out, **kw)
    free = re.compile(r"the [\d,.]+ GiB available")  # the machine's free memory moves between the two runs
    assert free.sub("", cli.stderr.strip()) == free.sub("", f"kdfine: error: {e.value}")
