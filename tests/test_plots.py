"""Plots: detect-noise --plot, eval --plot, plot-log; and a clear error when matplotlib is missing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli, run_kdfine

NOISY_RGB = (0xD6, 0x27, 0x28)  # kdfine.plots.NOISY_COLOUR: bars of wrong labels
CLEAN_RGB = (0x1F, 0x77, 0xB4)


def picture(path: Path) -> np.ndarray:
    """The PNG as an (H, W, 3) uint8 array; fails unless it is a real, non-blank image."""
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 10, f"{path} looks blank"
    return img


def pixels_of(img: np.ndarray, rgb) -> int:
    return int((np.abs(img.astype(int) - np.array(rgb)).sum(axis=2) < 30).sum())


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """Two runs' logs: one with dynamic FINE selection on noisy labels, and a copy of it without
    the FINE keys (as a run without selection writes)."""
    d = tmp_path_factory.mktemp("logs")
    b = d / "fine.jsonl"
    r = run_kdfine("train-teacher", "--arch", "mlp-32", "--epochs", "2", "--label-noise", "sym:0.3", "--fine-warmup",
                   "1", "--fine-every", "1", "--out", d / "f.safetensors", "--log", b, "-q")
    assert r.returncode == 0, r.stderr
    a = d / "plain.jsonl"
    a.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if not k.startswith("fine_")}) + "\n"
                         for line in b.read_text().splitlines()))
    return a, b


def test_detect_noise_plot_colours_by_truth(noisy_dump, tmp_path):
    png = tmp_path / "scores.png"
    r = run_kdfine("detect-noise", "--features", noisy_dump, "--out", tmp_path / "c.csv", "--plot", png, "--json",
                   "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["plot"] == str(png)
    img = picture(png)
    # the dump has a truth sidecar with 40% wrong labels: both colours must be drawn
    assert pixels_of(img, NOISY_RGB) > 500 and pixels_of(img, CLEAN_RGB) > 500


def test_eval_plot_one_file_or_a_prefix(digits_teacher, tmp_path):
    r = run_kdfine("eval", "--model", digits_teacher, "--plot", tmp_path / "ev.png", "-q")
    assert r.returncode == 0, r.stderr
    picture(tmp_path / "ev.png")
    r = run_kdfine("eval", "--model", digits_teacher, "--plot", tmp_path / "run1", "--json", "-q")
    assert r.returncode == 0, r.stderr
    written = json.loads(r.stdout)["plots"]
    assert [Path(p).name for p in written] == ["run1.reliability.png", "run1.confusion.png"]
    for p in written:
        picture(Path(p))


def test_plot_log_of_two_runs(logs, tmp_path):
    out = tmp_path / "curves.png"
    r = run_kdfine("plot-log", *logs, "-o", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{out}\n"
    img = picture(out)
    assert img.shape[1] > 3 * 350  # three columns: the FINE run adds a fifth panel, the selection
    assert any("fine_kept" in json.loads(line) for line in logs[1].read_text().splitlines())


def test_plot_log_bad_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"epoch": 1, "loss": 1.0}\nnot json\n')
    r = run_kdfine("plot-log", bad, "-o", tmp_path / "x.png")
    assert r.returncode == 3 and "line 2" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
    r = run_kdfine("plot-log", bad, "-o", tmp_path / "x.txt")
    assert r.returncode == 2 and ".png" in r.stderr


def test_missing_matplotlib_is_one_clear_line(noisy_dump, digits_teacher, tmp_path):
    """A real process: matplotlib must be missing from its start."""
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)  # an import of matplotlib fails as it does when it is not installed
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'matplotlib'\", "
                                        "name='matplotlib')\n")
    env = {"PYTHONPATH": f"{shadow.parent}{os.pathsep}{ROOT}"}
    cases = [("detect-noise", "--features", noisy_dump, "--out", tmp_path / "c.csv", "--plot", tmp_path / "s.png"),
             ("eval", "--model", digits_teacher, "--plot", tmp_path / "e.png"),
             ("plot-log", tmp_path / "none.jsonl", "-o", tmp_path / "p.png")]
    for args in cases:
        r = run_cli(*args, env=env)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and "pip install 'kdfine[plot]'" in r.stderr, r.stderr
        assert r.stdout == ""
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "c.csv").exists()
