"""The fast paths give the same results as the plain computations they replace.

FINE: streamed file reads, syrk grams with float32 partial sums, the Lanczos top eigenvector, the
class-grouped scores and the per-class split, against direct numpy formulas. Training: a
channels_last step against the plain NCHW step on the same batch.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest
import torch

from kdfine.detect import fine
from kdfine.data.batches import TrainBatches
from kdfine.train.losses import kd_loss
from kdfine.models import build
from kdfine.detect import detect
from kdfine.files import rows


def synthetic(n: int = 3000, d: int = 96, k: int = 5, noise: float = 0.3, seed: int = 0):
    """Non-negative features with one direction per class, and labels with a share flipped."""
    rng = np.random.default_rng(seed)
    means = np.maximum(rng.standard_normal((k, d)), 0)
    y = rng.integers(0, k, n)
    x = np.maximum(means[y] * rng.uniform(0.5, 1.5, (n, 1)) + 0.3 * rng.standard_normal((n, d)), 0)
    flip = rng.random(n) < (noise if k > 1 else 0.0)
    noisy = y.copy()
    noisy[flip] = (y[flip] + rng.integers(1, max(k, 2), flip.sum())) % k
    return x.astype(np.float32), noisy


def test_row_blocks_read_a_file_like_the_array(tmp_path):
    x, _ = synthetic(n=1001, d=7)
    np.save(tmp_path / "f.npy", x)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    assert rows.file_rows(mm) is not None and rows.file_rows(mm[10:]) is not None
    blocks = [(lo, b.copy()) for lo, b in rows.row_blocks(mm, chunk=128)]
    assert [lo for lo, _ in blocks] == list(range(0, 1001, 128))
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), x)
    tail = [b.copy() for _, b in rows.row_blocks(mm[10:], chunk=128)]  # a slice is read from its own offset
    np.testing.assert_array_equal(np.concatenate(tail), x[10:])


@pytest.mark.parametrize("readers", [2, 3])
def test_row_blocks_with_several_readers_read_the_same_rows(tmp_path, readers):
    x, _ = synthetic(n=1001, d=7)
    np.save(tmp_path / "f.npy", x)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    got = np.concatenate([b.copy() for _, b in rows.row_blocks(mm[3:], chunk=100, readers=readers)])
    np.testing.assert_array_equal(got, x[3:])


def test_row_blocks_name_the_row_where_a_shrunk_file_ends(tmp_path):
    """A file cut short while it is read: EOFError with the first missing row, not zeros."""
    x, _ = synthetic(n=1000, d=8)
    path = tmp_path / "f.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    header = path.stat().st_size - x.nbytes
    blocks = rows.row_blocks(mm, chunk=100, readers=2)
    next(blocks)
    with open(path, "r+b") as f:
        f.truncate(header + 250 * x[0].nbytes + 5)  # rows 0-249 whole, row 250 cut
    with pytest.raises(EOFError, match="before row 250"):
        for _ in blocks:
            pass


@pytest.mark.parametrize("native", [True, False])
def test_syrk_add_adds_the_product_into_the_upper_triangle(monkeypatch, native):
    from kdfine.runtime import blas

    monkeypatch.setattr(blas, "_native", functools.cache(lambda: None) if not native else blas._native)
    if native and blas._libraries():  # numpy's wheels bundle OpenBLAS: the fast path must be the one taken
        assert blas.native()
    rng = np.random.default_rng(3)
    a = rng.standard_normal((301, 64)).astype(np.float32)
    c = rng.standard_normal((64, 64)).astype(np.float32)
    want = c.astype(np.float64) + a.T.astype(np.float64) @ a
    blas.syrk_add(c, a)
    upper = np.triu_indices(64)
    np.testing.assert_allclose(c[upper], want[upper], rtol=1e-5, atol=1e-4)
    blas.syrk_add(c, a[:0])  # no rows: nothing added
    np.testing.assert_allclose(c[upper], want[upper], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="float32"):
        blas.syrk_add(c.astype(np.float64), a)
    with pytest.raises(ValueError, match="do not match"):
        blas.syrk_add(c, a[:, :10].copy())


def test_streamed_file_is_not_resident(tmp_path):
    """Reading a 256 MB dump block by block leaves the resident set far below its size."""
    path = tmp_path / "big.npy"
    rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(131072, 512))
    rows[:] = 1.0
    del rows
    # VmHWM, not getrusage: a child's ru_maxrss starts from its parent's (this test process's) RSS
    code = ("import numpy as np; from kdfine.files import rows\n"
            f"x = np.load({str(path)!r}, mmap_mode='r'); s = 0.0\n"
            "for lo, b in rows.row_blocks(x): s += float(b[:, 0].sum())\n"
            "assert s == x.shape[0], s\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
            "print(int(hwm.split()[1]) // 1024)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) < 200, f"peak RSS {r.stdout.strip()} MB while streaming a 256 MB file"


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("k, flush", [(1, 64), (5, 8192), (40, 8)])
def test_grams_match_the_direct_products(monkeypatch, k, flush, native):
    from kdfine.runtime import blas

    monkeypatch.setattr(fine, "FLUSH_ROWS", flush)
    if not native:  # numpy's two steps, where numpy's bundled BLAS is not found
        monkeypatch.setattr(blas, "_native", functools.cache(lambda: None))
    x, y = synthetic(n=2500, d=48, k=k)
    mask = np.random.default_rng(1).random(len(y)) < 0.7
    grams = fine.class_grams(x, y, k, subset=mask, chunk=300)
    x64 = x.astype(np.float64)
    for c in range(k):
        rows = x64[(y == c) & mask]
        np.testing.assert_allclose(grams[c], rows.T @ rows, rtol=2e-6, atol=1e-6)
        np.testing.assert_array_equal(grams[c], grams[c].T)


def test_lanczos_top_eigenvector_matches_eigh():
    x, y = synthetic(n=4000, d=256, k=3)
    for g in fine.class_grams(x, y, 3):
        u = fine.top_eigenvector(g)
        ref = np.linalg.eigh(g)[1][:, -1]
        assert abs(abs(u @ ref) - 1) < 1e-12
    # a matrix whose top eigenvalue is not separated falls back to eigh and still returns a unit vector
    eye = np.eye(80)
    u = fine.top_eigenvector(eye)
    assert abs(np.linalg.norm(u) - 1) < 1e-12


def reference_detect(x, y, k, seed=0):
    """FINE as the formulas read: full eigh per class, float64 scores, one GMM per class."""
    from sklearn.mixture import GaussianMixture

    x64 = x.astype(np.float64)
    keep = np.zeros(len(y), bool)
    scores = np.zeros(len(y))
    for c in range(k):
        rows = x64[y == c]
        u = np.linalg.eigh(rows.T @ rows)[1][:, -1]
        s = np.abs(rows @ u) / np.linalg.norm(rows, axis=1)
        scores[y == c] = s
        gmm = GaussianMixture(2, covariance_type="full", tol=1e-6, random_state=seed).fit(s[:, None])
        keep[y == c] = gmm.predict_proba(s[:, None])[:, gmm.means_.argmax()] > 0.5
    return keep, scores


def test_detect_matches_the_reference_on_a_file(tmp_path):
    x, y = synthetic(n=6000, d=128, k=6)
    np.save(tmp_path / "f.npy", x)
    det = detect(np.load(tmp_path / "f.npy", mmap_mode="r"), y, 6, chunk=1000)
    keep, scores = reference_detect(x, y, 6)
    np.testing.assert_allclose(det.scores, scores, rtol=0, atol=1e-6)  # float32 products, as the dump
    np.testing.assert_array_equal(det.keep, keep)
    assert 0.55 < keep.mean() < 0.85  # the synthetic noise is found: the split is not trivial


def test_detect_noise_cli_does_not_import_torch(tmp_path):
    """Nor scikit-learn: each costs more than a second of start-up (the mixture is kdfine's own)."""
    x, y = synthetic(n=500, d=16, k=3)
    np.save(tmp_path / "f.npy", x)
    np.save(tmp_path / "f.labels.npy", y)
    np.save(tmp_path / "f.truth.npy", y)
    code = ("import sys; from kdfine.cli import main\n"
            f"sys.argv = ['kdfine', 'detect-noise', '--features', {str(tmp_path / 'f.npy')!r}, '--out', "
            f"{str(tmp_path / 'c.csv')!r}, '-q']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules\n"
            "assert not [m for m in sys.modules if m.startswith('sklearn')]\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c.csv").read_text().startswith("index,label,score,p_clean,suggested,suggested_p\n")


def test_loading_a_checkpoint_does_not_import_dynamo(digits_teacher):
    """The fit check builds the arch on the meta device first; a random init there goes through
    torch._refs, whose first call imports torch._dynamo: 2-3 s on every eval, distill or predict."""
    code = ("import sys, torch; from kdfine.models import checkpoint\n"
            f"ck = checkpoint.load({str(digits_teacher)!r})\n"
            "ck.model(torch.zeros(2, ck.meta['in_channels'], ck.meta['image_size'], ck.meta['image_size']))\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def one_step(model, x, y, *, channels_last: bool):
    """Loss and parameters after one SGD step from a copy of ``model``'s state."""
    import copy

    m = copy.deepcopy(model)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    loss = kd_loss(m(x), None, y, loss="ce")
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach()), [p.detach().clone() for p in m.parameters()]


def test_channels_last_step_matches_the_plain_step():
    torch.manual_seed(0)
    model = build("wrn-10-1", 10)
    rng = np.random.default_rng(0)
    b = TrainBatches(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 64),
                     (0.5,) * 3, (0.25,) * 3, batch_size=32, device=torch.device("cpu"), augment="crop-flip")
    x, y, _ = next(b.epoch(0))
    l0, p0 = one_step(model, x, y, channels_last=False)
    l1, p1 = one_step(model, x, y, channels_last=True)
    assert abs(l0 - l1) < 1e-4
    for before, a, c in zip(model.parameters(), p0, p1):  # the same update up to float reassociation
        before = before.detach()
        step0, step1 = a - before, c.contiguous() - before
        assert torch.linalg.vector_norm(step0 - step1) <= 1e-2 * torch.linalg.vector_norm(step0) + 1e-7


def test_teachers_run_in_bf16_on_cpus_with_native_bf16():
    from pathlib import Path

    from kdfine.runtime.device import cpu_has_bf16, resolve_precision, teacher_precision

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # Linux: the kernel's CPU flags say whether the CPU has bf16 arithmetic
        flags = set(cpuinfo.read_text().split())
        assert cpu_has_bf16() == bool({"avx512_bf16", "amx_tile", "amx_bf16", "bf16"} & flags)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert teacher_precision("auto", cpu) == ("bf16" if cpu_has_bf16() else "fp32")
    assert resolve_precision("auto", cpu) == "fp32"  # eval, feature dumps and predict stay fp32 on CPUs
    assert teacher_precision("fp32", cpu) == "fp32" and teacher_precision("bf16", cpu) == "bf16"
    assert teacher_precision("auto", cuda) == "bf16" and teacher_precision("fp32", cuda) == "fp32"


def test_bf16_teacher_logits_stay_close_to_fp32():
    """What a bf16 teacher changes: its logits, by a small fraction of their spread."""
    torch.manual_seed(0)
    teacher = build("cnn", 10, 1, 8).eval()
    x = torch.randn(64, 1, 8, 8)
    with torch.inference_mode():
        z32 = teacher(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z16 = teacher(x).float()
    assert z16.dtype == torch.float32
    assert (z16 - z32).abs().max() <= 0.05 * z32.abs().max()
    assert (z16.argmax(1) == z32.argmax(1)).float().mean() >= 0.9
