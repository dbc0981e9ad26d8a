"""The architecture registry: every model gives logits and features consistently."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kdfine import models
from kdfine.errors import UsageError
from kdfine.models import Classifier, build, list_archs, param_count


@pytest.mark.parametrize("arch,size,channels", [
    ("wrn-16-1", 16, 3), ("wrn-16-2", 16, 3), ("wrn-10-1", 8, 1), ("resnet20", 16, 3), ("resnet8x4", 16, 3),
    ("preact-resnet18", 16, 3), ("resnet34", 16, 3), ("cnn", 8, 1), ("cnn-8", 8, 3), ("mlp", 8, 1), ("mlp-32", 6, 3),
])
def test_logits_and_features_agree(arch, size, channels):
    torch.manual_seed(0)
    m = build(arch, 7, channels, size).eval()
    x = torch.randn(3, channels, size, size)
    with torch.no_grad():
        z = m(x)
        f = m.features(x)
        f2, z2 = m.forward_both(x)
    assert isinstance(m, Classifier)
    assert z.shape == (3, 7) and f.shape == (3, m.feature_dim)
    assert torch.allclose(m.head(f), z, atol=1e-5) and torch.allclose(z2, z) and torch.allclose(f2, f)


def test_known_sizes():
    # widths of the KD paper's networks: WRN-16-2 has 64*2 features and about 0.7M parameters
    assert build("wrn-16-2", 100).feature_dim == 128
    assert 0.6e6 < param_count(build("wrn-16-2", 100)) < 0.8e6
    assert 5.8e6 < param_count(build("wrn-28-4", 100)) < 6.0e6
    assert build("resnet34", 10).feature_dim == 512 and build("resnet8x4", 10).feature_dim == 256
    assert build("cnn-8", 10).feature_dim == 32 and build("mlp-64", 10, 1, 8).feature_dim == 32


def test_list_archs_builds_every_listed_name():
    archs = list_archs()
    assert archs == sorted(set(archs))
    assert {"resnet20", "resnet110", "resnet32x4", "preact-resnet18", "wrn-D-W", "cnn[-W]", "mlp[-W]"} <= set(archs)
    concrete = [a for a in archs if not re.search(r"[\[A-Z]", a)]  # family patterns are not names
    for arch in concrete:
        assert isinstance(build(arch, 3, 3, 8), Classifier), arch


def test_list_archs_pattern():
    assert list_archs("resnet*") == ["resnet110", "resnet20", "resnet32", "resnet32x4", "resnet34", "resnet56",
                                     "resnet8x4"]
    assert list_archs("WRN-16-?") == ["wrn-16-1", "wrn-16-2"]
    assert list_archs("vgg*") == []


@pytest.mark.parametrize("arch,message", [
    ("vgg99", "unknown architecture"), ("wrn-15-2", "6n\\+4"), ("wrn-10-0", "width >= 1"),
    ("cnn-0", "width must be >= 1"), ("mlp-1", "width must be >= 2"), ("tv:no_such_net", "not a torchvision classification model"),
])
def test_bad_names(arch, message):
    with pytest.raises(UsageError, match=message) as err:
        build(arch, 10)
    assert "\n" not in str(err.value) and arch in str(err.value)


def test_unknown_arch_lists_every_name():
    with pytest.raises(UsageError) as err:
        build("vgg99", 10)
    assert str(err.value).endswith(", ".join(list_archs()))


def test_prefix_resolver(monkeypatch):
    """The hook that the torchvision/timm adapters use: ``PREFIX:NAME`` goes to the resolver."""
    monkeypatch.setattr(models, "_PREFIXES", dict(models._PREFIXES))
    calls = []

    def resolve(name, k, c, s):
        calls.append((name, k, c, s))
        return build("cnn-4", k, c, s)

    models.register_prefix("toy", resolve)
    assert build("toy:Tiny_Net", 5, 1, 8).head.out_features == 5
    assert calls == [("Tiny_Net", 5, 1, 8)] and "toy:NAME" in list_archs()


def test_registry_import_is_torch_free():
    import subprocess
    import sys

    code = "import sys, kdfine.models; assert 'torch' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_readme_lists_the_registry():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- archs -->\n(.*?)\n<!-- /archs -->", readme, re.S)
    assert block, "README.md lacks the <!-- archs --> block"
    assert re.findall(r"`([^`]+)`", block[1]) == list_archs()
