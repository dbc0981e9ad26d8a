"""Label-noise injection (kdfine.data.noise): exact counts, the asymmetric maps, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from kdfine.data.noise import CIFAR10_CLASSES, apply_noise, asym_map, parse_noise
from kdfine.errors import UsageError


def balanced(k: int, per_class: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(k), per_class))


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_sym_flips_exactly_a_fraction_each_to_another_class(rate):
    y = balanced(10, 101)  # N = 1010, so round(rate * N) is not a multiple of the class size
    noisy = apply_noise(y, f"sym:{rate}", 10, seed=3)
    assert noisy.dtype == np.int64 and noisy.shape == y.shape
    assert (noisy != y).sum() == round(rate * y.size)
    assert noisy.min() >= 0 and noisy.max() < 10
    if rate >= 0.5:
        # each wrong label is drawn uniformly from the K - 1 other classes
        moved = noisy[noisy != y] - y[noisy != y]
        counts = np.bincount(moved % 10, minlength=10)
        assert counts[0] == 0 and counts[1:].min() > 0.6 * counts[1:].mean()


def test_uniform_redraws_from_all_classes():
    # the official FINE convention: a fraction r is redrawn from all K classes, ~ r (K - 1) / K wrong
    y = balanced(10, 2000)
    noisy = apply_noise(y, "uniform:0.5", 10, seed=1)
    wrong = (noisy != y).sum()
    expected = 0.5 * y.size * 9 / 10
    sd = np.sqrt(0.5 * y.size * 0.9 * 0.1)
    assert abs(wrong - expected) < 5 * sd
    assert wrong < round(0.5 * y.size)  # some redraws land on the true class


@pytest.mark.parametrize("rate", [0.2, 0.4, 0.45])
def test_asym_cifar10_by_class_names(rate):
    y = balanced(10, 97)
    noisy = apply_noise(y, f"asym:{rate}", 10, seed=0, dataset="imagefolder", classes=list(CIFAR10_CLASSES))
    pairs = {"truck": "automobile", "bird": "airplane", "deer": "horse", "cat": "dog", "dog": "cat"}
    idx = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    for c, name in enumerate(CIFAR10_CLASSES):
        members = y == c
        changed = noisy[members] != c
        if name in pairs:
            assert changed.sum() == round(rate * 97)
            assert np.all(noisy[members][changed] == idx[pairs[name]])
        else:
            assert not changed.any()  # classes outside the map are never touched


def test_asym_cifar10_map_follows_names_in_any_order():
    names = sorted(CIFAR10_CLASSES, reverse=True)
    m = asym_map(10, "", names)
    pos = {c: i for i, c in enumerate(names)}
    assert m[pos["truck"]] == pos["automobile"] and m[pos["cat"]] == pos["dog"] and m[pos["dog"]] == pos["cat"]
    assert m[pos["frog"]] == pos["frog"]
    np.testing.assert_array_equal(asym_map(10, "cifar10"), asym_map(10, "", list(CIFAR10_CLASSES)))


def test_asym_cifar100_flips_within_blocks_of_five():
    m = asym_map(100, "cifar100")
    c = np.arange(100)
    assert np.all(m // 5 == c // 5)  # never leaves its block
    assert np.all(m == (c // 5) * 5 + (c + 1) % 5)
    y = balanced(100, 20)
    noisy = apply_noise(y, "asym:0.4", 100, seed=2, dataset="cifar100")
    for k in range(100):
        changed = noisy[y == k] != k
        assert changed.sum() == 8 and np.all(noisy[y == k][changed] == m[k])


def test_asym_other_datasets_go_to_the_next_class():
    np.testing.assert_array_equal(asym_map(4, "digits"), [1, 2, 3, 0])
    y = balanced(4, 50)
    noisy = apply_noise(y, "asym:0.3", 4, dataset="digits", classes=["a", "b", "c", "d"])
    for k in range(4):
        changed = noisy[y == k] != k
        assert changed.sum() == 15 and np.all(noisy[y == k][changed] == (k + 1) % 4)


def test_pairflip_flips_every_class_to_the_next():
    y = balanced(10, 60)
    noisy = apply_noise(y, "pairflip:0.45", 10, seed=4, dataset="cifar10", classes=list(CIFAR10_CLASSES))
    for k in range(10):
        changed = noisy[y == k] != k
        assert changed.sum() == 27 and np.all(noisy[y == k][changed] == (k + 1) % 10)


def test_flips_are_drawn_from_the_true_labels():
    # cat <-> dog: with rate 1 every cat becomes a dog and every dog a cat; a second pass over
    # already-flipped labels would have moved some back
    y = balanced(10, 30)
    noisy = apply_noise(y, "asym:1.0", 10, dataset="cifar10")
    assert np.all(noisy[y == 3] == 5) and np.all(noisy[y == 5] == 3)
    assert np.all(noisy[y == 9] == 1) and np.all(noisy[y == 1] == 1)
    y_before = y.copy()
    apply_noise(y, "sym:0.5", 10)
    np.testing.assert_array_equal(y, y_before)  # the true labels are not modified


@pytest.mark.parametrize("spec", ["sym:0.4", "uniform:0.4", "asym:0.4", "pairflip:0.3"])
def test_seeded_determinism(spec):
    y = balanced(10, 50)
    a = apply_noise(y, spec, 10, seed=7, dataset="cifar10")
    np.testing.assert_array_equal(a, apply_noise(y, spec, 10, seed=7, dataset="cifar10"))
    assert not np.array_equal(a, apply_noise(y, spec, 10, seed=8, dataset="cifar10"))


def test_parse_noise():
    assert str(parse_noise("SYM:0.40")) == "sym:0.4"
    assert parse_noise(None).kind == "none" and parse_noise("none").rate == 0.0
    for bad in ["sym", "gauss:0.2", "sym:x", "sym:1.5"]:
        with pytest.raises(UsageError):
            parse_noise(bad)
    np.testing.assert_array_equal(apply_noise(np.arange(5) % 2, "none", 2), np.arange(5) % 2)
