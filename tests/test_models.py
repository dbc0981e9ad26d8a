"""The architecture registry: every model gives logits and features consistently."""

from __future__ import annotations

import pytest
import torch

from kdfine.errors import UsageError
from kdfine.models import build, names, param_count


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
    assert z.shape == (3, 7) and f.shape == (3, m.feature_dim)
    assert torch.allclose(m.head(f), z, atol=1e-5) and torch.allclose(z2, z) and torch.allclose(f2, f)


def test_known_sizes():
    # widths of the KD paper's networks: WRN-16-2 has 64*2 features and about 0.7M parameters
    assert build("wrn-16-2", 100).feature_dim == 128
    assert 0.6e6 < param_count(build("wrn-16-2", 100)) < 0.8e6
    assert 5.8e6 < param_count(build("wrn-28-4", 100)) < 6.0e6
    assert build("resnet34", 10).feature_dim == 512 and build("resnet8x4", 10).feature_dim == 256
    assert {"resnet20", "resnet110", "resnet32x4", "preact-resnet18"} <= set(names())


def test_bad_names():
    with pytest.raises(UsageError, match="unknown architecture"):
        build("vgg99", 10)
    with pytest.raises(UsageError, match="6n\\+4"):
        build("wrn-15-2", 10)
