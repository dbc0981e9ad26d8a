"""Suggested labels (kdfine.detect.suggest), the CSV cells of names, the readers of the new CSVs,
and the thumbnails of array datasets."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from scipy.special import softmax

from kdfine.detect.suggest import pick, relabel, suggest
from kdfine.files.tables import csv_text, read_index, read_labels, text_cells


def test_rejected_samples_get_another_class_with_its_conditional_probability():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 5)) * 3
    y = rng.integers(0, 5, 200)
    rejected = rng.random(200) < 0.5
    s, p = suggest(y, logits=z, rejected=rejected, chunk=37)  # blocks of 37 rows: the same as one pass
    q = softmax(z, axis=1)
    for i in range(200):
        if rejected[i]:
            others = [c for c in range(5) if c != y[i]]
            best = max(others, key=lambda c: q[i, c])
            assert s[i] == best and p[i] == pytest.approx(q[i, best] / (1 - q[i, y[i]]))
        else:
            assert s[i] == q[i].argmax() and p[i] == pytest.approx(q[i].max())


def test_a_memorised_label_still_yields_its_runner_up():
    """The given class holds all but 1e-300 of the mass (float64 underflow for a plain softmax):
    the runner-up's conditional probability is still exact."""
    z = np.array([[800.0, 10.0, 9.0], [0.0, 0.0, 0.0]])
    s, p = suggest(np.array([0, 1]), logits=z, rejected=np.array([True, True]))
    assert s.tolist() == [1, 0] and p[0] == pytest.approx(1 / (1 + np.exp(-1))) and p[1] == pytest.approx(0.5)


def test_no_evidence_keeps_the_label_with_probability_zero():
    s, p = pick(np.array([[np.nan, 1.0], [0.0, -np.inf], [3.0, 1.0]]), np.array([1, 0, 0]),
                np.array([False, True, False]))
    assert s.tolist() == [1, 0, 0] and p.tolist()[:2] == [0.0, 0.0] and p[2] > 0.8
    s, p = suggest(np.array([0, 0]), logits=np.zeros((2, 1)), rejected=np.array([True, False]))  # K = 1
    assert s.tolist() == [0, 0] and p.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="evidence"):
        suggest(np.array([0]))


def test_class_vectors_and_neighbour_votes_as_evidence():
    u = np.eye(3)  # orthonormal class vectors: the shares are the squared coordinates of the unit feature
    x = np.array([[0.0, 3.0, 4.0], [1.0, 0.0, 0.0]])
    s, p = suggest(np.array([2, 0]), features=x, vectors=u, rejected=np.array([True, False]))
    assert s.tolist() == [1, 0] and p.tolist() == pytest.approx([1.0, 1.0])
    s, p = suggest(np.array([0, 0]), neighbour_labels=np.array([[0, 1, 1, 2], [0, 0, 0, 1]]),
                   rejected=np.array([True, False]), num_classes=3)
    assert s.tolist() == [1, 0] and p.tolist() == pytest.approx([2 / 3, 0.75])


def test_relabel_only_rejected_and_likely_enough():
    y = np.array([0, 1, 2, 3])
    new = relabel(y, np.array([True, True, False, True]), np.array([5, 6, 7, 8]), np.array([0.9, 0.4, 0.99, 0.5]), 0.5)
    assert new.tolist() == [5, 1, 2, 8]


def test_name_cells_are_neither_formulas_nor_broken_rows(tmp_path):
    names = ["cat", "=HYPERLINK(\"http://x\")", "+1+1", "-2", "@sum", "a,b", "line\nbreak", "\tx", "snow\udcffman"]
    cells = text_cells(names)
    text = csv_text(["index", "label", "class"], [np.arange(len(names)), np.arange(len(names)), cells],
                    ["{}", "{}", "{}"])
    rows = list(csv.reader(io.StringIO(text)))[1:]
    # control characters are shown as escapes (files/text.py), so no cell spans two lines
    assert [r[2] for r in rows] == ["cat", "'=HYPERLINK(\"http://x\")", "'+1+1", "-2", "'@sum", "a,b", "line\\nbreak",
                                    "\\tx", "snow\\xffman"]
    assert len(text.splitlines()) == len(names) + 1
    text.encode("utf-8")  # valid UTF-8 whatever the file names were
    (tmp_path / "n.csv").write_text(text, encoding="utf-8")
    # the readers of index lists and labels take the new CSVs as they took the old
    assert read_index(tmp_path / "n.csv", len(names)).tolist() == list(range(len(names)))
    assert read_labels(tmp_path / "n.csv", len(names), len(names)).tolist() == list(range(len(names)))


def test_thumbnails_of_digits_are_enlarged_pixel_for_pixel():
    from kdfine.data.sources import load_source
    from kdfine.data.thumbnails import thumbnails

    train = load_source("digits").train
    rows = np.array([5, 0, 1000])
    info = {"data": "digits", "split": "train", "n": len(train), "test_fraction": 0.2}
    for row, t in zip(rows, thumbnails(info, rows)):
        assert t.shape == (64, 64, 1)
        np.testing.assert_array_equal(t[::8, ::8], train.images[row])
        np.testing.assert_array_equal(t[7::8, 7::8], train.images[row])


def test_thumbnails_of_an_npz_follow_its_split(tmp_path):
    from PIL import Image

    from kdfine.data.sources import stratified_split
    from kdfine.data.thumbnails import SIZE, thumbnails

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (30, 120, 160, 3), dtype=np.uint8)  # larger than a thumbnail: shrunk
    y = np.arange(30) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    test_rows = stratified_split(y, 0.2, seed=0)[1]  # how an npz without x_test is split
    info = {"data": f"npz:{tmp_path / 'd.npz'}", "split": "test", "n": test_rows.size, "test_fraction": 0.2}
    (t,) = thumbnails(info, np.array([2]))
    want = np.asarray(Image.fromarray(x[test_rows[2]]).resize((SIZE, SIZE * 3 // 4), Image.BILINEAR))
    np.testing.assert_array_equal(t, want)  # the test split's third image, aspect kept
    with pytest.warns(Warning, match="no thumbnails"):
        assert thumbnails({**info, "n": 5}, np.array([0])) == [None]  # the data changed since the dump
