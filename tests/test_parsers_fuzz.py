"""Every parser of user text, fuzzed with hypothesis: an arbitrary string either parses or raises
the documented kdfine error (UsageError for option values, InputError for file contents,
DeviceError for a device that is not there), never another exception."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdfine.data.noise import KINDS, NoiseSpec, parse_noise
from kdfine.data.sources import TORCHVISION_SETS, load_source, parse_data_spec
from kdfine.runtime.device import resolve_device
from kdfine.train.schedule import parse_schedule
from kdfine.errors import DeviceError, InputError, UsageError
from kdfine.files.tables import read_index, read_labels

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def near(*words: str, extra: str = "") -> st.SearchStrategy[str]:
    """Strings close to valid specs: a known word (in any case, padded), a separator, then junk or
    numbers, so the fuzzer reaches past the first check as well as failing it."""
    tail = st.one_of(st.text(max_size=12), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                     st.integers(-10**30, 10**30).map(str), st.from_regex(r"[-+0-9.,eE: ]{0,12}", fullmatch=True))
    word = st.sampled_from(words + ("",)).flatmap(lambda w: st.sampled_from([w, w.upper(), f" {w} "]))
    return st.one_of(st.text(), st.builds(lambda w, sep, t: w + sep + t, word, st.sampled_from(["", ":", "::", extra]), tail))


@FUZZ
@given(near(*KINDS, "none"))
def test_noise_spec(spec):
    try:
        parsed = parse_noise(spec)
    except UsageError as e:
        assert str(e).startswith("--label-noise")
        return
    assert isinstance(parsed, NoiseSpec)
    assert parsed.kind in (*KINDS, "none") and 0.0 <= parsed.rate <= 1.0
    assert parse_noise(str(parsed)) == parsed  # the canonical form parses back to itself


@FUZZ
@given(near("multistep", "cosine", "constant", extra=":1,"), st.integers(1, 10**6))
def test_schedule_spec(spec, epochs):
    try:
        lr_at = parse_schedule(spec, epochs)
    except UsageError as e:
        assert str(e).startswith("--schedule")
        return
    for t in (0.0, epochs / 2, epochs - 1e-3):
        m = lr_at(t)
        assert math.isfinite(m) and 0.0 <= m <= 1.0


@FUZZ
@given(near("auto", "cpu", "cuda", "mps", extra=":"))
def test_device_spec(spec):
    try:
        device = resolve_device(spec)
    except (UsageError, DeviceError) as e:
        assert str(e).startswith("--device")
        return
    assert isinstance(device, torch.device)


@FUZZ
@given(near("digits", "imagefolder", "npz", *TORCHVISION_SETS))
def test_data_spec(spec):
    try:
        kind, arg = parse_data_spec(spec)
    except UsageError as e:
        assert str(e).startswith("--data")
        return
    assert kind in ("digits", "imagefolder", "npz", *TORCHVISION_SETS)
    assert bool(arg) == (kind in ("imagefolder", "npz"))


@FUZZ
@given(st.sampled_from(["imagefolder", "npz", "cifar10", "IMAGEFOLDER ", "NPZ"]),
       st.text(st.characters(blacklist_characters="/\\~."), max_size=20))
def test_load_source_with_paths_that_hold_no_data(tmp_path, monkeypatch, kind, name):
    """The whole of load_source's dispatch on paths that exist or not, in an empty directory: always
    a kdfine error (the spec, the path or the missing data set), never a crash."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises((UsageError, InputError)) as info:
        load_source(f"{kind}:{name}" if kind != "cifar10" else kind + name, root=tmp_path / "data")
    assert str(info.value).startswith("--data")


lines = st.one_of(st.integers(-5, 60).map(str), st.integers(-10**40, 10**40).map(str), st.text(max_size=8),
                  st.sampled_from(["index", "INDEX", "index,label", "", " ", "1.5", "0x10", "1e3", "\x00", "٣"]))


@FUZZ
@given(st.lists(lines, max_size=12), st.sampled_from(["\n", "\r\n", ","]), st.one_of(st.none(), st.integers(0, 50)))
def test_index_csv(tmp_path, rows, sep, n):
    path = tmp_path / "idx.csv"
    path.write_text(sep.join(rows), encoding="utf-8", errors="surrogatepass")
    try:
        idx = read_index(path, n)
    except InputError as e:
        assert str(e).startswith("index list")
        return
    assert idx.dtype == np.int64 and idx.ndim == 1
    if n is not None:
        assert ((idx >= 0) & (idx < n)).all() and np.unique(idx).size == idx.size


@FUZZ
@given(st.binary(max_size=64))
def test_index_csv_bytes(tmp_path, data):
    path = tmp_path / "idx.csv"
    path.write_bytes(data)
    try:
        read_index(path, 10)
    except InputError:
        pass


@FUZZ
@given(st.lists(lines, max_size=8), st.sampled_from(["label", "index,label", ""]))
def test_label_csv(tmp_path, rows, header):
    path = tmp_path / "labels.csv"
    path.write_text("\n".join([header, *rows] if header else rows), encoding="utf-8", errors="surrogatepass")
    try:
        labels = read_labels(path, len(rows), 5)
    except InputError as e:
        assert str(e).startswith("--labels")
        return
    assert labels.shape == (len(rows),) and ((labels >= 0) & (labels < 5)).all()


def test_valid_specs_parse(tmp_path):
    """The fuzz targets are not vacuous: documented forms parse to what they say."""
    assert parse_noise("SYM:0.4") == NoiseSpec("sym", 0.4) and parse_noise(" none ") == NoiseSpec("none", 0.0)
    assert parse_schedule("multistep:2,3", 4)(2.5) == pytest.approx(0.1)
    assert parse_schedule("cosine", 10)(5.0) == pytest.approx(0.5)
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert parse_data_spec("npz:a:b") == ("npz", "a:b") and parse_data_spec("Digits") == ("digits", "")
    p = tmp_path / "ok.csv"
    p.write_text("index,label\n3,1\n1,0\n")
    assert read_index(p, 5).tolist() == [3, 1]
    p.write_text("label\n4\n0\n")
    assert read_labels(p, 2, 5).tolist() == [4, 0]
