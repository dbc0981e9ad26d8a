"""scripts/install.py: the make step that installs the resolved wheels with two pip processes."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import install  # noqa: E402


def wheel(path: Path, nbytes: int) -> str:
    """A zip whose members unpack to ``nbytes`` (compressed to almost nothing); its file:// URL."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("pkg/data.bin", b"\0" * nbytes)
    return path.as_uri()


def entry(url: str, **info) -> dict:
    return {"download_info": {"url": url, **info}, "metadata": {"name": Path(url).stem, "version": "1"}}


def test_groups_balance_unpacked_bytes_and_keep_every_wheel_once(tmp_path):
    sizes = [3600, 2000, 1600, 1200, 1200, 400]  # KiB; the remote wheel counts 1,024
    urls = [wheel(tmp_path / f"w{i}.whl", n << 10) for i, n in enumerate(sizes)]
    remote = "https://files.example.invalid/x-1-py3-none-any.whl"
    items = [entry(u) for u in urls] + [entry(remote), entry((tmp_path / "proj").as_uri(), dir_info={"editable": True})]
    assert install.size(urls[0]) == 3600 << 10 and install.size(remote) == install.UNKNOWN_SIZE
    groups, editable = install.split(items)
    assert editable == [str(tmp_path / "proj")]
    assert sorted(u for g in groups for u in g) == sorted([*urls, remote])
    loads = [sum(install.size(u) for u in g) for g in groups]
    assert abs(loads[0] - loads[1]) <= 1024 << 10, loads  # 11,024 KiB: 5,824 + 5,200 by largest first
    assert groups[0][0] == urls[0]  # the largest goes first, so no group ends with it alone


def test_a_damaged_local_wheel_counts_as_small_not_as_an_error(tmp_path):
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    assert install.size(bad.as_uri()) == install.UNKNOWN_SIZE
    groups, editable = install.split([entry(bad.as_uri())])
    assert groups == [[bad.as_uri()]] and editable == []


def test_an_editable_projects_requirements_are_read_not_built(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "my_proj"\ndependencies = ["numpy>=1", "rich; python_version >= \'3\'"]\n'
        '[project.optional-dependencies]\ntest = ["pytest"]\nplot = ["matplotlib"]\nself = ["My-Proj[test]"]\n')
    assert install.declared(f"{tmp_path}[test]") == (str(tmp_path), ["numpy>=1", "rich; python_version >= '3'",
                                                                      "pytest"])
    assert install.declared(str(tmp_path)) == (str(tmp_path), ["numpy>=1", "rich; python_version >= '3'"])
    assert install.declared(f"{tmp_path}[nope]") is None  # pip reports the unknown extra itself
    assert install.declared(f"{tmp_path}[self]") is None  # an extra naming the project needs the project
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "p"\ndynamic = ["dependencies"]\n')
    assert install.declared(str(tmp_path)) is None
    assert install.declared(str(tmp_path / "missing")) is None
