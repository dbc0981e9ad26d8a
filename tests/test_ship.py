"""What a user ships: the ONNX file that predict runs without torch, and predictions whose names
and paths are safe in a spreadsheet and on a terminal.

The ONNX file and the checkpoint must give the same rows on the awkward image folder that
test_decode uses too (decoded from the file's own metadata); the ONNX run happens in a process
where importing torch fails. Class names beginning with ``=`` and holding escape sequences, and file
names that are not UTF-8, go through predict, the CSV and ``info``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, awkward_folder, awkward_images, cli_env, run_cli, run_kdfine
from kdfine import api
from kdfine.files.text import csv_cell, printable
from kdfine.options import DataOptions, TrainConfig

NO_TORCH = "raise ImportError('torch is blocked by the test: predict --model FILE.onnx must not need it')\n"


def _blocked_env(tmp: Path) -> dict[str, str]:
    block = tmp / "block" / "torch"
    block.mkdir(parents=True, exist_ok=True)
    (block / "__init__.py").write_text(NO_TORCH)
    return {"PYTHONPATH": f"{ROOT}{os.pathsep}{block.parent}"}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A cnn trained on the awkward folder with --resize squash, and its ONNX export."""
    d = tmp_path_factory.mktemp("ship")
    root = awkward_folder(d / "data", colour=True)
    ck = d / "m.safetensors"
    with pytest.warns(UserWarning):
        api.train_teacher(str(ck), arch="cnn-8", data=DataOptions(f"imagefolder:{root}", image_size=16,
                                                                  resize="squash"),
                          cfg=TrainConfig(epochs=1, batch_size=8), device="cpu", quiet=True)
    onnx = d / "m.onnx"
    api.export(str(ck), str(onnx))
    return root, ck, onnx


def test_onnx_predict_gives_the_checkpoints_rows_without_torch(shipped, tmp_path):
    import onnxruntime as ort

    root, ck, onnx = shipped
    props = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert json.loads(props["decode"])["resize"] == "squash" and props["in_channels"] == "3"
    with pytest.warns(UserWarning):
        want = api.predict(str(ck), [str(root)], top_k=2, device="cpu")
    script = ("import sys\nfrom kdfine.cli.app import main\n"
              f"sys.argv = ['kdfine', 'predict', '--model', {str(onnx)!r}, {str(root)!r}, '--top-k', '2', '--json']\n"
              "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
              "print('torch loaded' if any(m.split('.')[0] == 'torch' for m in sys.modules) else 'no torch',"
              " file=sys.stderr)\nsys.exit(code)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=cli_env(_blocked_env(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[-1] == "no torch"
    got = json.loads(r.stdout)
    assert [x["path"] for x in got["predictions"]] == [x["path"] for x in want["predictions"]]
    assert [x["labels"] for x in got["predictions"]] == [x["labels"] for x in want["predictions"]]
    np.testing.assert_allclose([x["probs"] for x in got["predictions"]], [x["probs"] for x in want["predictions"]],
                               rtol=0, atol=1e-5)
    assert got["skipped"] == want["skipped"] and got["decode"] == want["decode"]


def test_onnx_predict_writes_the_same_csv(shipped, tmp_path):
    root, ck, onnx = shipped
    for model, name in ((ck, "ck.csv"), (onnx, "onnx.csv")):
        run = run_cli if model == onnx else run_kdfine  # the ONNX file: in a process where torch cannot be imported
        r = run("predict", "--model", model, root / "test", "--out", tmp_path / name, "-q", "--device", "cpu",
                env=_blocked_env(tmp_path) if model == onnx else None)
        assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / name), r.stderr
    a, b = ((tmp_path / n).read_text().splitlines() for n in ("ck.csv", "onnx.csv"))
    assert [row.split(",")[:2] for row in a] == [row.split(",")[:2] for row in b] and len(a) == 23
    assert np.allclose([float(row.split(",")[2]) for row in a[1:]], [float(row.split(",")[2]) for row in b[1:]],
                       atol=2e-6)


# ------------------------------------------------------------------------- names and paths


def test_cells_and_terminal_text_are_neutralised():
    assert csv_cell('=HYPERLINK("http://x","y")') == '\'=HYPERLINK("http://x","y")'
    assert [csv_cell(c) for c in ("+1", "-0.5", "1e3", "-", "@x", "cat")] == ["+1", "-0.5", "1e3", "'-", "'@x", "cat"]
    assert csv_cell("\t=1") == "\\t=1" and csv_cell("\r@x") == "\\r@x"
    assert printable("a\x1b]8;;http://x\x07b\x9b\u202e") == "a\\x1b]8;;http://x\\x07b\\x9b\\u202e"
    assert printable(os.fsdecode(b"caf\xe9.png")) == "caf\\xe9.png"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A model whose classes are a spreadsheet formula and a terminal escape sequence, and a
    folder of images, one with a file name that is not UTF-8."""
    from PIL import Image

    d = tmp_path_factory.mktemp("hostile")
    names = ['=HYPERLINK("http://evil","x")', "red\x1b[31mALERT\x1b]0;pwned\x07"]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    np.savez(d / "data.npz", x=x, y=np.arange(40) % 2, classes=np.array(names))
    ck = d / "m.safetensors"
    r = run_kdfine("train-teacher", "--data", f"npz:{d / 'data.npz'}", "--arch", "mlp-16", "--epochs", "1",
                   "--batch-size", "8", "--device", "cpu", "--out", ck, "-q")
    assert r.returncode == 0, r.stderr
    imgs = d / "imgs"
    imgs.mkdir()
    for name in (b"a.png", b"b\xff\xfe.png"):
        Image.fromarray(x[0, ..., 0]).save(os.path.join(os.fsencode(imgs), name))
    return ck, imgs, names


def test_predict_csv_has_no_formula_and_no_escape(hostile, tmp_path):
    ck, imgs, names = hostile
    r = run_kdfine("predict", "--model", ck, imgs, "--top-k", "2", "--out", tmp_path / "p.csv", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "p.csv").read_bytes().decode("utf-8")  # valid UTF-8 despite the file name
    assert "\x1b" not in text and "\x07" not in text
    rows = list(csv.reader(io.StringIO(text)))[1:]
    assert [r[0] for r in rows] == [f"{imgs}/a.png", f"{imgs}/b\\xff\\xfe.png"]
    cells = [c for row in rows for c in row[1::2]]
    assert not any(c.startswith(("=", "+", "-", "@")) for c in cells), cells
    assert "'" + names[0] in cells and "red\\x1b[31mALERT\\x1b]0;pwned\\x07" in cells


def test_predict_to_a_strict_utf8_stdout_and_json_keep_working(hostile):
    ck, imgs, names = hostile
    env = {"PYTHONIOENCODING": "utf-8:strict"}  # a real process: the encoding of its stdout is the case
    r = run_cli("predict", "--model", ck, imgs, "--device", "cpu", env=env)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "b\\xff\\xfe.png" in r.stdout
    r = run_cli("predict", "--model", ck, imgs, "--device", "cpu", "--json", "--top-k", "2", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert sorted(doc["predictions"][0]["labels"]) == sorted(names)  # JSON keeps the names, escaped by JSON itself
    assert doc["predictions"][1]["path"] == os.fsdecode(os.path.join(os.fsencode(imgs), b"b\xff\xfe.png"))


def test_info_prints_no_control_characters(hostile):
    ck, _, names = hostile
    r = run_kdfine("info", ck)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert "red\\x1b[31mALERT\\x1b]0;pwned\\x07" in r.stdout
    doc = json.loads(run_kdfine("info", ck, "--json").stdout)
    assert doc["classes"] == names


def test_the_guides_decoding_is_kdfines(tmp_path):
    """docs/shipping.md's ``load`` (for users who run the ONNX file themselves) gives the decoder's pixels."""
    from kdfine.data.decode import DecodeSpec, decode

    text = (ROOT / "docs" / "shipping.md").read_text()
    block = next(b for b in text.split("```python")[1:] if "def load(" in b).split("```")[0]
    scope: dict = {}
    exec(block.split("session = ort.InferenceSession")[0], scope)
    awkward_images(tmp_path, seed=5)
    files = sorted(p for p in tmp_path.iterdir() if "bomb" not in p.name)
    assert len(files) == 11
    for f in files:
        for channels, resize in ((3, "crop"), (3, "squash"), (1, "crop")):
            want = decode(f, DecodeSpec(16, channels, resize)).pixels.astype(np.float32).transpose(2, 0, 1)[None] / 255
            np.testing.assert_array_equal(scope["load"](f, 16, channels, resize), want, err_msg=f"{f.name} {resize}")
