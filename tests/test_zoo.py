"""torchvision and timm networks end to end: building, list-archs, --init, --pretrained through the
library's cache (offline), --freeze-backbone, --epochs 0, the default arch, checkpoint.load with
the network off, export (ONNX and TorchScript) and predict. Tiny images and small networks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import ROOT, read_json, run_cli, run_kdfine, write_png_tree

SMALL_TV, SMALL_TIMM = "tv:mobilenet_v3_small", "timm:resnet18"
DEAD_PROXY = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
              "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
NO_NET = "import socket\ndef _off(*a, **k):\n    raise OSError('network disabled by the test')\n" \
         "socket.socket.connect = _off\nsocket.create_connection = _off\n"


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def offline_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Sockets that refuse to connect (a sitecustomize), dead proxies, empty caches."""
    site = tmp / "nonet"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_NET)
    env = {**DEAD_PROXY, "PYTHONPATH": f"{ROOT}{os.pathsep}{site}", "TORCH_HOME": str(tmp / "torch-home"),
           "HF_HOME": str(tmp / "hf-home"), "HF_HUB_OFFLINE": "1"}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_png_tree(tmp_path_factory.mktemp("zoo") / "tree", per_class=6, size=16)


@pytest.fixture(scope="module")
def tv_ckpt(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tvck") / "tv.safetensors"
    r = run_kdfine("train-teacher", "--data", f"imagefolder:{tree}", "--arch", SMALL_TV, "--epochs", "1",
                   "--batch-size", "6", "--out", out, "-q", env={"KDFINE_CACHE": str(out.parent / "cache")})
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def timm_ckpt(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("timmck") / "timm.safetensors"
    r = run_kdfine("train-teacher", "--data", f"imagefolder:{tree}", "--arch", SMALL_TIMM, "--epochs", "0",
                   "--out", out, "-q", env={"KDFINE_CACHE": str(out.parent / "cache")})
    assert r.returncode == 0, r.stderr
    return out


# ----------------------------------------------------------------------------------- building


@pytest.mark.parametrize("arch", [SMALL_TV, SMALL_TIMM])
def test_zoo_classifier_features_feed_the_head(arch):
    from kdfine.models import build

    torch.manual_seed(0)
    m = build(arch, 5, 3, 32).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        f, z = m.forward_both(x)
        assert f.shape == (3, m.feature_dim) and z.shape == (3, 5)
        torch.testing.assert_close(m.head(m.features(x)), m(x))
        m.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            zb = m(x.to(memory_format=torch.channels_last)).float()
    assert torch.allclose(zb, z, atol=0.5), "bf16 channels_last logits far from fp32"


def test_grey_input_and_bad_names_and_sizes():
    from kdfine.errors import UsageError
    from kdfine.models import build

    assert build("tv:resnet18", 4, 1, 8)(torch.rand(2, 1, 8, 8)).shape == (2, 4)
    with pytest.raises(UsageError, match="not a torchvision classification model"):
        build("tv:no_such_net", 2)
    with pytest.raises(UsageError, match="30x30"):
        build("tv:vit_b_16", 2, 3, 30)  # patch size 16 does not divide 30


def test_unknown_tv_arch_is_exit_2(cli):
    r = cli("train-teacher", "--arch", "tv:resnet_nope", "--out", "/dev/null")
    assert r.returncode == 2 and "tv:resnet_nope" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_timm_missing_names_the_extra(tmp_path):
    block = tmp_path / "block"
    (block / "timm").mkdir(parents=True)
    (block / "timm" / "__init__.py").write_text("raise ImportError('timm blocked by the test')\n")
    r = run_cli("train-teacher", "--arch", SMALL_TIMM, "--out", tmp_path / "x.safetensors",  # a process without timm
                env={"PYTHONPATH": f"{ROOT}{os.pathsep}{block}"})
    assert r.returncode == 2, r.stderr
    assert "pip install 'kdfine[timm]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_list_archs_library_names_with_counts(cli):
    from kdfine.models import build, param_count

    r = cli("list-archs", "tv:mobilenet*", "--json")
    assert r.returncode == 0, r.stderr
    doc = read_json(r.stdout)
    assert SMALL_TV in doc["archs"] and all(a.startswith("tv:mobilenet") for a in doc["archs"])
    assert doc["params"][SMALL_TV] == param_count(build(SMALL_TV, 10, 3, 32))
    r = cli("list-archs", "timm:resnet1?")
    assert r.returncode == 0 and "timm:resnet18\t" in r.stdout, r.stderr


# ----------------------------------------------------------------------------------- weights


def test_init_from_torchvision_pth_loads_the_backbone_and_skips_the_head(tree, tmp_path, cli):
    import torchvision

    torch.manual_seed(1)
    sd = torchvision.models.mobilenet_v3_small(num_classes=1000).state_dict()
    torch.save(sd, tmp_path / "mine.pth")
    out = tmp_path / "init.safetensors"
    r = cli("train-teacher", "--data", f"imagefolder:{tree}", "--arch", SMALL_TV, "--init", tmp_path / "mine.pth",
            "--epochs", "0", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "head" in r.stderr and "(1000, 1024)" in r.stderr  # the 1000-class head was skipped, with a note
    got = tensors(out)
    for k, v in sd.items():
        if not k.startswith("classifier.3."):
            assert torch.equal(got["backbone." + k], v), k
    assert got["head.weight"].shape == (3, 1024)
    assert meta(out)["init"].startswith("sha256:")


def test_init_from_safetensors_timm_and_kdfine_checkpoint(tree, tmp_path, cli, timm_ckpt):
    import timm

    torch.manual_seed(2)
    sd = timm.create_model("resnet18", num_classes=3).state_dict()
    save_file(sd, str(tmp_path / "r18.safetensors"))
    out = tmp_path / "t.safetensors"
    r = cli("train-teacher", "--data", f"imagefolder:{tree}", "--arch", SMALL_TIMM, "--init",
            tmp_path / "r18.safetensors", "--epochs", "0", "--out", out, "-q")
    assert r.returncode == 0, r.stderr
    got = tensors(out)
    assert torch.equal(got["head.weight"], sd["fc.weight"])  # same size: timm's fc is the head
    assert all(torch.equal(got["backbone." + k], v) for k, v in sd.items() if not k.startswith("fc."))
    # continuing from a kdfine checkpoint: every tensor, head included
    out2 = tmp_path / "again.safetensors"
    r = cli("train-teacher", "--data", f"imagefolder:{tree}", "--arch", SMALL_TIMM, "--init", out, "--epochs", "0",
            "--out", out2, "-q")
    assert r.returncode == 0, r.stderr
    assert all(torch.equal(v, got[k]) for k, v in tensors(out2).items())
    # weights of another network: exit 3, the first keys named, nothing written
    bad = tmp_path / "bad.safetensors"
    r = cli("train-teacher", "--data", f"imagefolder:{tree}", "--arch", SMALL_TV, "--init", out, "--epochs", "0",
            "--out", bad)
    assert r.returncode == 3 and "does not fit" in r.stderr and not bad.exists(), r.stderr


def test_pretrained_weights_are_checked_before_the_data(tmp_path):
    """Offline with an empty cache, then with a stray file under torchvision's name: one line, exit
    3, before the data (a folder that does not exist) is even looked at."""
    env = offline_env(tmp_path)
    folder = tmp_path / "torch-home" / "hub" / "checkpoints"
    out = tmp_path / "p.safetensors"
    args = ("train-teacher", "--data", f"imagefolder:{tmp_path / 'no-such-folder'}", "--arch", SMALL_TV,
            "--pretrained", "--epochs", "0", "--out", out)
    r = run_cli(*args, env=env)
    assert r.returncode == 3, r.stderr
    assert str(folder) in r.stderr and "mobilenet_v3_small-047dcff4.pth" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    torch.manual_seed(3)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision_state_dict(), folder / "mobilenet_v3_small-047dcff4.pth")
    r = run_cli(*args, env=env)
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "is not the published weights file" in r.stderr and "047dcff4" in r.stderr and not out.exists()


def torchvision_state_dict() -> dict[str, torch.Tensor]:
    import torchvision

    return torchvision.models.mobilenet_v3_small().state_dict()


def test_a_torchvision_file_is_verified_by_the_hash_in_its_name(tmp_path):
    """kdfine.models.hub.tv_file on a real file: accepted when its sha256 starts with the prefix of
    its published name, refused otherwise (the URL names the file; nothing is downloaded)."""
    import hashlib

    from kdfine.errors import InputError
    from kdfine.models.hub import hash_prefix, tv_file

    assert hash_prefix("resnet18-f37072fd.pth") == "f37072fd" and hash_prefix("plain.pth") is None
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    data = b"weights" * 100
    good = hashlib.sha256(data).hexdigest()[:8]
    (folder / f"net-{good}.pth").write_bytes(data)
    url = f"https://example.invalid/models/net-{good}.pth"
    assert tv_file("net", url, tmp_path / "hub") == folder / f"net-{good}.pth"
    (folder / "net-00000000.pth").write_bytes(data)
    with pytest.raises(InputError, match="its sha256 begins .*, the published file's 00000000"):
        tv_file("net", "https://example.invalid/models/net-00000000.pth", tmp_path / "hub")


TIMM_TINY, TIMM_TINY_REPO = "timm:test_resnet", "timm/test_resnet.r160_in1k"


def hf_cache_entry(hf_home: Path, repo: str, filename: str, data: bytes) -> Path:
    """A Hugging Face cache entry as the hub client writes it: the blob named by its sha256, the
    snapshot's file a link to it, refs/main naming the snapshot. Returns the blob."""
    import hashlib

    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    blob = root / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    commit = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / filename).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return blob


def test_timm_pretrained_from_the_cache_offline_then_a_damaged_blob(tree, tmp_path):
    """timm weights in the Hugging Face cache load with the network off (backbone intact under
    --freeze-backbone, the weights' 160 px chosen with a warning: 16 px images upscaled 10x);
    a blob whose bytes no longer match its sha256 name is refused before training."""
    import timm
    from safetensors.torch import save

    torch.manual_seed(0)
    sd = timm.create_model("test_resnet", pretrained=False).state_dict()
    blob = hf_cache_entry(tmp_path / "hf-home", TIMM_TINY_REPO, "model.safetensors", save(sd))
    env = offline_env(tmp_path)
    out = tmp_path / "t.safetensors"
    args = ("train-teacher", "--data", f"imagefolder:{tree}", "--arch", TIMM_TINY, "--pretrained",
            "--freeze-backbone", "--epochs", "1", "--batch-size", "6", "--out", out)
    r = run_cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    got = tensors(out)
    for k, v in sd.items():
        if not k.startswith("fc."):
            assert torch.equal(got["backbone." + k], v), k
    assert "test_resnet.r160_in1k" in meta(out)["init"] and json.loads(meta(out)["image_size"]) == 160
    assert "images are upscaled 10.0x (16 to 160 px" in r.stderr and "--image-size 16" in r.stderr
    assert "input 160x160 px (resized from 16x16, 10.0x), augmentation rrc-flip, normalised with the pretrained " \
           "weights' mean 0.500,0.500,0.500" in r.stderr
    blob.write_bytes(blob.read_bytes()[:-1] + b"x")
    r = run_cli(*args, env=env)
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "does not match the sha256 the cache names it by" in r.stderr


def test_timm_pretrained_offline_names_the_cache(tree, tmp_path):
    """No file and no hub: one line at once (no retries), naming the cache; before the data."""
    env = offline_env(tmp_path)
    del env["HF_HUB_OFFLINE"]  # the hub cannot be reached (dead proxy, no sockets): found out at once
    r = run_cli("train-teacher", "--data", f"imagefolder:{tmp_path / 'none'}", "--arch", SMALL_TIMM, "--pretrained",
                "--epochs", "0", "--out", tmp_path / "x.safetensors", env=env)
    assert r.returncode == 3, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Retrying" not in r.stderr, r.stderr
    assert str(tmp_path / "hf-home") in r.stderr and "timm/resnet18" in r.stderr and "cannot be reached" in r.stderr


def test_default_arch_for_large_images(tmp_path, cli):
    big = write_png_tree(tmp_path / "big", per_class=2, size=64)
    out = tmp_path / "d.safetensors"
    r = cli("train-teacher", "--data", f"imagefolder:{big}", "--epochs", "0", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "tv:resnet18 (default for 64px images" in r.stderr and meta(out)["arch"] == "tv:resnet18"


def test_distill_timm_teacher_into_tv_student(timm_ckpt, tmp_path, cli):
    out = tmp_path / "s.safetensors"
    r = cli("distill", "--teacher", timm_ckpt, "--arch", SMALL_TV, "--epochs", "1", "--batch-size", "6",
            "--out", out, "--json", "-q")
    assert r.returncode == 0, r.stderr
    doc = read_json(r.stdout)
    assert doc["arch"] == SMALL_TV and len(doc["epochs"]) == 1
    assert json.loads(meta(out)["parents"]) == [read_json(cli("info", timm_ckpt, "--json").stdout)["sha256"]]


def test_tv_checkpoint_loads_with_the_network_off(tv_ckpt, tmp_path, cli):
    code = ("import sys; from kdfine.models import checkpoint; import torch\n"
            f"c = checkpoint.load({str(tv_ckpt)!r})\n"
            "print(c.arch, tuple(c.model(torch.rand(2, 3, 16, 16)).shape))\n")
    import subprocess
    import sys

    from conftest import cli_env

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(offline_env(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [SMALL_TV, "(2,", "3)"]
    assert not (tmp_path / "torch-home").exists()  # nothing was fetched or cached


# ----------------------------------------------------------------------------------- leaving kdfine


def _images(tree: Path) -> tuple[list[str], np.ndarray]:
    from kdfine.data.decode import DecodeSpec, decode

    files = sorted(str(p) for p in (tree / "test").rglob("*.png"))
    pixels = np.stack([decode(f, DecodeSpec(16, 3)).pixels for f in files])
    return files, pixels.astype(np.float32).transpose(0, 3, 1, 2) / 255


def _torch_logits(ckpt: Path, x: np.ndarray) -> np.ndarray:
    from kdfine.models import checkpoint

    c = checkpoint.load(ckpt)
    m, s = (torch.tensor(c.meta[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        return c.model((torch.from_numpy(x) - m) / s).numpy()


@pytest.mark.parametrize("which", ["tv", "timm"])
def test_onnx_export_round_trip(which, tv_ckpt, timm_ckpt, tree, tmp_path, cli):
    import onnx
    import onnxruntime as ort

    ckpt = tv_ckpt if which == "tv" else timm_ckpt
    out = tmp_path / "m.onnx"
    r = cli("export", "--model", ckpt, "--out", out)
    assert r.returncode == 0 and r.stdout.strip() == str(out), r.stderr
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["classes"]) == ["cat", "dog", "fox"]
    _, x = _images(tree)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    want = _torch_logits(ckpt, x)
    for rows in (slice(0, 1), slice(0, len(x))):  # the batch axis is dynamic
        np.testing.assert_allclose(sess.run(None, {"images": x[rows]})[0], want[rows], rtol=1e-4, atol=1e-4)


def test_torchscript_export_and_missing_onnx(tv_ckpt, tree, tmp_path, cli):
    out = tmp_path / "m.pt"
    r = cli("export", "--model", tv_ckpt, "--out", out, "--format", "torchscript", "-q")
    assert r.returncode == 0, r.stderr
    extra = {"classes.json": ""}
    net = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["classes.json"]) == ["cat", "dog", "fox"]
    _, x = _images(tree)
    with torch.no_grad():
        np.testing.assert_allclose(net(torch.from_numpy(x)).numpy(), _torch_logits(tv_ckpt, x), rtol=1e-4, atol=1e-4)
    block = tmp_path / "block"
    (block / "onnxruntime").mkdir(parents=True)
    (block / "onnxruntime" / "__init__.py").write_text("raise ImportError('blocked by the test')\n")
    r = run_cli("export", "--model", tv_ckpt, "--out", tmp_path / "m.onnx",  # a process without onnxruntime
                env={"PYTHONPATH": f"{ROOT}{os.pathsep}{block}"})
    assert r.returncode == 2 and "kdfine[export]" in r.stderr and not (tmp_path / "m.onnx").exists(), r.stderr


@pytest.mark.parametrize("which", ["tv", "timm"])
def test_predict_equals_eval(which, tv_ckpt, timm_ckpt, tree, tmp_path, cli):
    from kdfine.detect.dump import read_dump

    ckpt = tv_ckpt if which == "tv" else timm_ckpt
    dump = tmp_path / "f.npy"
    r = cli("eval", "--model", ckpt, "--dump-features", dump, "-q")
    assert r.returncode == 0, r.stderr
    logits = np.load(tmp_path / "f.logits.npy")
    assert read_dump(dump).info["n"] == logits.shape[0]
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "broken.png").write_bytes(b"not an image")
    r = cli("predict", "--model", ckpt, tree / "test", junk, "--top-k", "2", "--out", tmp_path / "p.csv")
    assert r.returncode == 0, r.stderr
    assert "broken.png" in r.stderr
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "path,label,prob,label2,prob2"
    rows = [line.split(",") for line in lines[1:]]
    files, _ = _images(tree)
    assert [row[0] for row in rows] == files  # sorted by path = the test split's order (class, then file)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    classes = ["cat", "dog", "fox"]
    assert [row[1] for row in rows] == [classes[i] for i in p.argmax(1)]
    np.testing.assert_allclose([float(row[2]) for row in rows], p.max(1), atol=2e-6)


def test_predict_any_size_and_json(tv_ckpt, tmp_path, cli):
    from PIL import Image

    Image.fromarray(np.full((40, 25, 3), 200, np.uint8)).save(tmp_path / "tall.jpg")
    r = cli("predict", "--model", tv_ckpt, tmp_path / "tall.jpg", "--json", "--top-k", "9")
    assert r.returncode == 0, r.stderr
    doc = read_json(r.stdout)
    assert doc["top_k"] == 3 and len(doc["predictions"]) == 1
    assert sum(doc["predictions"][0]["probs"]) == pytest.approx(1.0, abs=1e-5)
