"""Index lists, label files and atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

from kdfine.errors import InputError
from kdfine.files.outputs import Outputs
from kdfine.files.tables import csv_text, read_index, read_labels


def test_index_csv_and_plain_lines(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("index,label,score\n3,1,0.5\n0,2,0.1\n")
    assert read_index(p, 5).tolist() == [3, 0]
    p.write_text("4\n1\n\n2\n")
    assert read_index(p, 5).tolist() == [4, 1, 2]


@pytest.mark.parametrize("text,msg", [("index\n1\n-2\n", "negative"), ("index\n1\n1\n", "more than once"),
                                      ("index\n9\n", "out of range"), ("index\n1\nx\n", "not an integer"),
                                      ("", "empty"), ("name\nfoo\n", "first column must be 'index'")])
def test_bad_index_lists(tmp_path, text, msg):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(InputError, match=msg):
        read_index(p, 5)


def test_labels_from_npy_csv_and_lines(tmp_path):
    np.save(tmp_path / "l.npy", np.array([0, 2, 1]))
    assert read_labels(tmp_path / "l.npy", 3, 3).tolist() == [0, 2, 1]
    (tmp_path / "l.csv").write_text("index,label\n2,0\n0,1\n1,1\n")
    assert read_labels(tmp_path / "l.csv", 3, 2).tolist() == [1, 1, 0]
    (tmp_path / "p.txt").write_text("1\n0\n1\n")
    assert read_labels(tmp_path / "p.txt", 3, 2).tolist() == [1, 0, 1]
    with pytest.raises(InputError, match="outside"):
        read_labels(tmp_path / "l.npy", 3, 2)
    with pytest.raises(InputError, match="has 3 labels"):
        read_labels(tmp_path / "l.npy", 4, 3)


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with Outputs() as outs:
            outs.add(target, "--out")
            with outs.open(target, "w") as f:
                f.write("partial")
                raise RuntimeError("boom")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out.csv"]

    def write(path):
        with Outputs() as outs:
            outs.add(path, "--out")
            with outs.open(path, "w") as f:
                f.write(csv_text(["index"], [np.arange(100000)], ["{}"]))
            outs.commit()

    with pytest.raises(InputError, match="/dev/full"):
        write("/dev/full")
    with pytest.raises(InputError, match="does not exist"):
        write(str(tmp_path / "no" / "x.csv"))


def test_pread_rows_reads_rows_at_their_offsets_and_reports_a_short_file(tmp_path):
    import os

    from kdfine.files.rows import pread_rows

    x = np.arange(60, dtype=np.uint8).reshape(10, 6)
    path = tmp_path / "rows.bin"
    path.write_bytes(b"HEAD" + x.tobytes())
    out = np.empty((3, 6), np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert pread_rows(fd, out, 4, [7, 0, 9]) and np.array_equal(out, x[[7, 0, 9]])
        assert not pread_rows(fd, out, 4, [10])  # past the end
    finally:
        os.close(fd)


def _formatted(header, columns, formats):
    row = ",".join(formats) + "\n"
    return ",".join(header) + "\n" + "".join(map(row.format, *[c.tolist() for c in columns]))


def test_numeric_csv_is_what_str_format_writes():
    """The numpy-built CSV (integers, floats in [0, 1] at 6 decimals) equals str.format's text,
    rounding ties and the values next to them included; anything else takes the format path."""
    from kdfine.files import tables

    rng = np.random.default_rng(0)
    n = 5000
    index = np.sort(rng.choice(10**7, n, replace=False))
    labels = rng.integers(0, 1000, n).astype(np.int32)
    score, p = rng.random(n), rng.random(n).astype(np.float32)
    edge = [0.0, 1.0, 5e-7, 0.0000005, 4.999999e-7, 0.1234565, 0.9999995, 0.99999949, 1e-300, 0.5, 0.2500005,
            0.0000015, 0.0000025, 0.1 + 5e-7, np.nextafter(0.9999995, 0), np.nextafter(0.9999995, 1)]
    score[:len(edge)] = edge
    score[100:1100] = (rng.integers(0, 10**6, 1000) + 0.5) / 1e6  # ties in decimal, near-ties in binary
    cols, fmts = [index, labels, score, p], ["{}", "{}", "{:.6f}", "{:.6f}"]
    assert tables._numeric_csv(cols, fmts) is not None
    assert csv_text(["index", "label", "score", "p"], cols, fmts) == _formatted(["index", "label", "score", "p"],
                                                                            cols, fmts)
    for col, fmt in (([0, 9, 10, 99, 100, 2**40], "{}"), ([], "{}"), ([7], "{}")):
        a = np.array(col, dtype=np.int64)
        assert csv_text(["i"], [a], [fmt]) == _formatted(["i"], [a], [fmt])
    for col, fmt in ((np.array([-1]), "{}"), (np.array([-0.0]), "{:.6f}"), (np.array([np.nan]), "{:.6f}"),
                     (np.array([1.5]), "{:.6f}"), (np.array([0.5]), "{:.3f}")):
        assert tables._numeric_csv([col], [fmt]) is None  # the format path
        assert csv_text(["v"], [col], [fmt]) == _formatted(["v"], [col], [fmt])
