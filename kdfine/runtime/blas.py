"""``C += A^T A`` in float32 inside one BLAS call (``ssyrk`` with beta = 1), without the GIL.

FINE's gram pass adds each class's product of every block into a running float32 sum. Through
numpy that is two steps: ``x.T @ x`` (numpy calls ``ssyrk``, then copies the upper triangle into
the lower) into a new matrix, then ``+=``. ``ssyrk`` itself can add into the sum (beta = 1) and
touch only the upper triangle: at 655 rows x 512 (the 1M x 512, K = 100 benchmark's blocks) that
ran at 69 G multiply-adds/s on two threads against 51 for the two steps.

numpy exposes no such call and scipy's ``ssyrk`` wrapper holds the GIL (one core left idle), so
:func:`syrk_add` calls the CBLAS of the OpenBLAS that numpy's own wheels ship, through ctypes
(which releases the GIL during the call). The library is found and checked once, against numpy
on a small product; where it is missing (another numpy build) or differs, the two numpy steps
run instead, with the same result in the upper triangle up to rounding.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from collections.abc import Callable

import numpy as np

# CBLAS enums: CblasRowMajor, CblasUpper, CblasTrans
_ROW_MAJOR, _UPPER, _TRANS = 101, 121, 112
#: (symbol, integer width): numpy >= 2 wheels bundle scipy-openblas (64-bit integers, symbols
#: with a ``scipy_`` prefix and a ``64_`` suffix); numpy 1.2x wheels an OpenBLAS with ``64_`` only
_SYMBOLS = (("scipy_cblas_ssyrk64_", ctypes.c_int64), ("cblas_ssyrk64_", ctypes.c_int64))


def _libraries() -> list[str]:
    """The OpenBLAS shared libraries bundled with numpy (``numpy.libs`` or ``numpy/.libs``)."""
    root = os.path.dirname(np.__file__)
    found: list[str] = []
    for folder in (os.path.join(root, "..", "numpy.libs"), os.path.join(root, ".libs")):
        found += sorted(glob.glob(os.path.join(folder, "*openblas*.so*")))
    return found


def _bind(path: str) -> Callable[[np.ndarray, np.ndarray], None] | None:
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    for name, integer in _SYMBOLS:
        fn = getattr(lib, name, None)
        if fn is None:
            continue
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer, ctypes.c_float, ctypes.c_void_p,
                       integer, ctypes.c_float, ctypes.c_void_p, integer]
        fn.restype = None

        def call(c: np.ndarray, a: np.ndarray, fn=fn) -> None:
            n, d = a.shape
            fn(_ROW_MAJOR, _UPPER, _TRANS, d, n, 1.0, a.ctypes.data, d, 1.0, c.ctypes.data, d)

        return call
    return None


def _agrees(call: Callable[[np.ndarray, np.ndarray], None]) -> bool:
    """The bound call adds the upper triangle of a^T a into c, as numpy computes it."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((37, 70)).astype(np.float32)
    c = np.ones((70, 70), np.float32)
    call(c, a)
    want = a.T.astype(np.float64) @ a + 1.0
    upper, lower = np.triu_indices(70), np.tril_indices(70, -1)
    return bool(np.allclose(c[upper], want[upper], rtol=1e-5, atol=1e-4)) and bool((c[lower] == 1).all())


@functools.cache
def _native() -> Callable[[np.ndarray, np.ndarray], None] | None:
    """The checked CBLAS call, or None (then numpy's two steps)."""
    if os.environ.get("KDFINE_NUMPY_SYRK"):  # the fallback on demand (tests, comparisons)
        return None
    for path in _libraries():
        call = _bind(path)
        if call is not None and _agrees(call):
            return call
    return None


def native() -> bool:
    """Whether :func:`syrk_add` runs inside numpy's bundled BLAS (else numpy's two steps)."""
    return _native() is not None


def syrk_add(c: np.ndarray, a: np.ndarray, scratch: np.ndarray | None = None) -> None:
    """Add ``a^T a`` into the upper triangle of ``c``.

    c: (D, D) float32, C-contiguous, updated in place; its strictly lower triangle is not defined
    afterwards (read the upper one). a: (n, D) float32, C-contiguous. scratch: an optional (D, D)
    float32 buffer for the numpy fallback's product.
    """
    if c.dtype != np.float32 or a.dtype != np.float32 or not (c.flags.c_contiguous and a.flags.c_contiguous):
        raise ValueError("syrk_add needs C-contiguous float32 arrays")
    if a.shape[1] != c.shape[0] or c.shape[0] != c.shape[1]:
        raise ValueError(f"shapes {a.shape} and {c.shape} do not match")
    if a.shape[0] == 0:
        return
    call = _native()
    if call is not None:
        call(c, a)
        return
    prod = np.matmul(a.T, a, out=scratch)
    c += prod
