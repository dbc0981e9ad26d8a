"""No input file makes kdfine exit 1: hypothesis over feature-dump sidecars and checkpoint metadata,
in-process (the CLI maps exactly :class:`KdfineError` to exits 2 and 3; anything else is exit 1),
plus a few examples through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import run_cli
from kdfine import api
from kdfine.models import checkpoint
from kdfine.detect import command
from kdfine.errors import KdfineError

N, D, K = 24, 4, 3

JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 2**40) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=8)
DOC = st.one_of(JSON, st.fixed_dictionaries({}, optional={k: JSON for k in (
    "num_classes", "classes", "n", "files", "dim", "noise_seed", "label_noise", "data")}))
ARRAYS = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(["int64", "int8", "float32", "bool", "uint16"]),
              st.sampled_from([(N,), (N, 2), (N - 1,), (0,), (N, K), (N, K - 1), (N, K + 1), ()])),
)


def _array(spec, rng):
    if spec is None:
        return None
    dtype, shape = spec
    return (rng.integers(-1, K + 1, size=shape) if dtype != "float32" else rng.normal(size=shape)).astype(dtype)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=DOC, labels=ARRAYS, logits=ARRAYS, truth=ARRAYS, small_loss=st.booleans())
def test_dump_sidecars_never_crash(tmp_path_factory, doc, labels, logits, truth, small_loss):
    d = tmp_path_factory.mktemp("dump")
    rng = np.random.default_rng(0)
    np.save(d / "f.npy", rng.normal(size=(N, D)).astype(np.float32))
    for name, spec in (("labels", labels), ("logits", logits), ("truth", truth)):
        a = _array(spec, rng)
        if a is not None:
            np.save(d / f"f.{name}.npy", a)
    (d / "f.json").write_text(json.dumps(doc))
    try:
        command.detect_noise(str(d / "f.npy"), method="small-loss" if small_loss else "gmm")
    except KdfineError:
        pass


FIELDS = ("arch", "num_classes", "in_channels", "image_size", "mean", "std", "classes", "metrics", "config",
          "parents", "parent_paths", "data", "label_noise", "seed", "stage")


@pytest.fixture(scope="module")
def teacher_parts(digits_teacher):
    with safe_open(str(digits_teacher), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.filterwarnings("ignore::kdfine.errors.KdfineWarning")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(FIELDS), st.one_of(JSON.map(json.dumps), st.text(max_size=10)),
                               min_size=1, max_size=3),
       drop=st.lists(st.sampled_from(FIELDS), max_size=2))
def test_checkpoint_metadata_never_crashes(tmp_path_factory, teacher_parts, changes, drop):
    meta, tensors = teacher_parts
    meta = {**{k: v for k, v in meta.items() if k not in drop}, **changes}
    p = tmp_path_factory.mktemp("ck") / "t.safetensors"
    save_file(tensors, str(p), metadata=meta)
    try:
        api.info(str(p))
        checkpoint.load(p)
    except KdfineError:
        pass


@pytest.mark.parametrize("doc", ['{"classes": "abc", "num_classes": 3}', '{"files": {"labels": 5}}'])
def test_cli_exit_codes_on_odd_sidecars(tmp_path, doc):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "f.npy", rng.normal(size=(N, D)).astype(np.float32))
    np.save(tmp_path / "f.labels.npy", np.arange(N) % K)
    (tmp_path / "f.json").write_text(doc)
    r = run_cli("detect-noise", "-f", tmp_path / "f.npy", "-o", tmp_path / "c.csv")
    assert r.returncode == 3, r.stderr
    assert not Path(tmp_path / "c.csv").exists()
