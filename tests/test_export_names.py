"""Names from input files never choose where kdfine writes: class names as folder names
(``clean --export-dir``), recorded parent paths (``info``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import run_cli, run_kdfine
from kdfine.data.export import check_class_names, export_folder, unsafe_component
from kdfine.data.sources import ArrayDataset
from kdfine.errors import InputError
from kdfine.files.outputs import Outputs


def _dataset(classes: list[str], n: int = 6) -> ArrayDataset:
    x = np.zeros((n, 4, 4, 1), np.uint8)
    return ArrayDataset(x, np.arange(n) % len(classes), list(classes), (0.5,), (0.25,), "none", "npz:x", "train", None)


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


NAMES = st.one_of(
    st.text(min_size=0, max_size=300),
    st.sampled_from(["..", ".", "../../escaped", "/abs/dir", "C:evil", "c:\\x", "a\x00b", "tab\tname", " x", "x.",
                     "a/b", "a\\b", "\u202eevil", "ok", "Ok", "日本語", "x" * 260]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(NAMES, min_size=1, max_size=4))
def test_export_writes_only_inside_the_target(tmp_path_factory, names):
    base = tmp_path_factory.mktemp("exp")
    (base / "outside.txt").write_text("untouched")
    target = base / "sub" / "out"
    target.parent.mkdir()
    before = _tree(base)
    ds = _dataset(names)
    ok = all(unsafe_component(c) is None for c in names) and len({c.casefold() for c in names}) == len(names)
    error = None
    with Outputs() as outs:
        outs.add(target, "--export-dir", directory=True)
        try:
            outs.stage(target, lambda tmp: export_folder(ds, ds, np.arange(len(ds)), tmp))
            outs.commit()
        except InputError as e:
            error = e
    if error is not None:
        assert not ok, error
        assert "class" in str(error)
        assert _tree(base) == before, "a refused export writes nothing"
        return
    assert ok, f"exported unsafe names {names!r}"
    after = _tree(base)
    for p in set(after) - set(before):
        assert Path(p).resolve().is_relative_to(target.resolve()), p
    assert {p: v for p, v in after.items() if p in before} == before, "nothing outside the export changed"


def test_unsafe_names_are_named():
    for bad in ["", "..", "a/b", "a\\b", "/abs", "C:x", "a\x00b", "a\nb"]:
        assert unsafe_component(bad), bad
    for good in ["cat", "日本語", "a b", "x.y", "-1"]:
        assert unsafe_component(good) is None, good
    with pytest.raises(InputError, match="class 1 '../../escaped' cannot be a folder name"):
        check_class_names(["ok", "../../escaped"])


def test_clean_export_dir_refuses_an_escaping_class(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (30, 8, 8, 1), dtype=np.uint8), y=np.arange(30) % 2,
             classes=np.array(["fine", "../../escaped"]))
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    r = run_kdfine("train-teacher", "--data", f"npz:{tmp_path / 'd.npz'}", "--arch", "mlp-16", "--epochs", "1",
                   "--batch-size", "8", "--device", "cpu", "--out", "m.safetensors", "-q", cwd=work)
    assert r.returncode == 0, r.stderr
    before = _tree(tmp_path)
    r = run_kdfine("clean", "--model", "m.safetensors", "--out", "c.csv", "--export-dir", "out", "--device", "cpu",
                   cwd=work)
    assert r.returncode == 3, r.stderr
    assert "class 1 '../../escaped' cannot be a folder name" in r.stderr
    assert _tree(tmp_path) == before


def test_info_reads_recorded_parents_only_from_regular_files(tmp_path, digits_teacher):
    with safe_open(str(digits_teacher), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta.update(parents=json.dumps(["0" * 64]), parent_paths=json.dumps(["/dev/zero"]))
    save_file(tensors, str(tmp_path / "s.safetensors"), metadata=meta)
    # a real process: were /dev/zero read, the timeout would end it
    r = run_cli("info", tmp_path / "s.safetensors", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    node = json.loads(r.stdout)["lineage"][0]
    assert node["found"] is False and node["recorded_path"] == "/dev/zero"
    assert os.path.exists("/dev/zero")


def test_exported_files_keep_their_names_and_namesakes_get_the_index(tmp_path):
    """A relabelled file that meets a namesake (here: case-insensitively) in its new class folder is
    written as <stem>.<index><suffix>; every other file keeps its own name."""
    src = tmp_path / "src"
    files = [src / "cat" / "a.png", src / "dog" / "A.png", src / "dog" / "b.jpg", src / "cat" / "sub" / "b.jpg"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    x = np.zeros((4, 4, 4, 1), np.uint8)
    ds = ArrayDataset(x, np.array([0, 0, 1, 1]), ["cat", "dog"], (0.5,), (0.25,), "none", "imagefolder:src", "train",
                      [str(f) for f in files])
    out = tmp_path / "out"
    out.mkdir()
    export_folder(ds, ds, np.arange(4), out)
    assert sorted(p.name for p in (out / "train" / "cat").iterdir()) == ["A.000001.png", "a.png"]
    assert sorted(p.name for p in (out / "train" / "dog").iterdir()) == ["b.000003.jpg", "b.jpg"]
    assert (out / "train" / "cat" / "A.000001.png").samefile(files[1])
