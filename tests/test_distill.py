"""`kdfine distill` end to end on digits: sequential pipes, ensembles, teacher checks, metadata and
`eval --teacher`. The pipeline of three commands runs as real processes joined by pipes; the other
commands run in process (conftest.run_kdfine)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_json, run_cli, shell_env
from kdfine import api
from kdfine.models import checkpoint
from kdfine.data.sources import load_source
from kdfine.train.run import TeacherEnsemble
from kdfine.errors import InputError

KDFINE = "kdfine"  # the fork server's client (conftest.shell_env)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def normalised(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 NHWC -> float NCHW, (x/255 - mean) / std, as kdfine's batches do."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    """train-teacher | distill --teacher - | distill --teacher -, as one shell pipeline."""
    d = tmp_path_factory.mktemp("chain")
    cmd = (f"{KDFINE} train-teacher --epochs 2 --out t.safetensors -q"
           f" | {KDFINE} distill --teacher - --arch cnn-16 --loss kl --tau 3 --alpha 0.5 --epochs 2"
           f" --out s1.safetensors -q"
           f" | {KDFINE} distill --teacher - --arch mlp-64 --loss mse --epochs 2 --seed 1 --out s2.safetensors -q")
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=d, env=shell_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return {"dir": d, "stdout": r.stdout, "t": d / "t.safetensors", "s1": d / "s1.safetensors",
            "s2": d / "s2.safetensors"}


def test_sequential_pipe_writes_a_chain_of_students(chain):
    # only the last path reaches stdout: the earlier ones were consumed by the next stage
    assert chain["stdout"].strip() == "s2.safetensors"
    t, s1, s2 = (checkpoint.read_meta(chain[k]) for k in ("t", "s1", "s2"))
    assert (t["stage"], s1["stage"], s2["stage"]) == ("teacher", "student", "student")
    assert t["parents"] == []
    assert s1["parents"] == [sha256(chain["t"])]
    assert s2["parents"] == [sha256(chain["s1"])]
    assert s1["parent_paths"] == [str(chain["t"].resolve())]
    assert s2["parent_paths"] == [str(chain["s1"].resolve())]
    assert not list(chain["dir"].glob("*.state.safetensors"))  # resume states are removed on success


def test_student_metadata_records_loss_tau_alpha_and_data(chain):
    s1, s2 = checkpoint.read_meta(chain["s1"]), checkpoint.read_meta(chain["s2"])
    assert (s1["arch"], s1["loss"], s1["tau"], s1["alpha"], s1["epochs"]) == ("cnn-16", "kl", 3.0, 0.5, 2)
    assert (s2["arch"], s2["loss"], s2["alpha"], s2["seed"]) == ("mlp-64", "mse", 1.0, 1)
    # --data defaults to the teacher's recorded data
    assert s1["data"] == s2["data"] == "digits"
    assert s2["config"]["teachers"] == [sha256(chain["s1"])]
    assert 0.0 <= s2["metrics"]["test_top1"] <= 1.0


def test_ensemble_distills_from_averaged_logits_and_eval_scores_against_them(cli, chain, digits_teacher, tmp_path):
    keep = tmp_path / "keep.csv"
    keep.write_text("index\n" + "\n".join(map(str, range(0, 1400, 7))) + "\n")
    out = tmp_path / "ens.safetensors"
    # a file and `-` mixed; stdin's last non-empty line is the path
    r = cli("distill", "--teacher", digits_teacher, "--teacher", "-", "--arch", "mlp-32", "--loss", "kl-inf",
            "--epochs", "1", "--keep", keep, "--out", out, "--json", "-q",
            input=f"some earlier output\n{chain['t']}\n\n")
    assert r.returncode == 0, r.stderr
    doc = read_json(r.stdout)
    assert doc["path"] == str(out) and doc["stage"] == "student" and doc["sha256"] == sha256(out)
    meta = checkpoint.read_meta(out)
    assert meta["parents"] == [sha256(digits_teacher), sha256(chain["t"])]
    assert (meta["loss"], meta["config"]["keep"]) == ("kl-inf", str(keep))

    # the ensemble's logits are the mean of its members' logits
    t1, t2 = checkpoint.load(digits_teacher), checkpoint.load(chain["t"])
    digits = load_source("digits").test
    x = normalised(digits.images[:16], digits.mean, digits.std)
    stats = (digits.mean, digits.std)
    ens = TeacherEnsemble([t1.model, t2.model], [stats, stats], stats, torch.device("cpu"))
    with torch.no_grad():
        manual = (t1.model(x) + t2.model(x)) / 2
    torch.testing.assert_close(ens(x), manual, rtol=1e-5, atol=1e-5)
    ens.train()
    assert not any(t.training for t in ens.teachers)  # teachers stay frozen in eval mode
    assert not any(p.requires_grad for p in ens.parameters())

    # `eval --teacher A --teacher B` scores each model against that same average and shows its parents
    r = cli("eval", "--model", chain["s2"], "--model", out, "--teacher", digits_teacher, "--teacher", chain["t"],
            "--json")
    assert r.returncode == 0, r.stderr
    m2, m = read_json(r.stdout)["models"]
    for key in ("top1", "agreement", "logit_l2", "kl_teacher_student", "parents", "teachers", "stage"):
        assert key in m and key in m2, key
    assert m2["parents"] == [sha256(chain["s1"])] and m["parents"] == meta["parents"]
    assert m["teachers"] == [str(digits_teacher), str(chain["t"])] and m["stage"] == "student"
    assert all(0.0 <= x["agreement"] <= 1.0 and x["logit_l2"] > 0 and x["kl_teacher_student"] >= 0 for x in (m, m2))
    s = checkpoint.load(out)
    xs = normalised(digits.images, digits.mean, digits.std)
    with torch.no_grad():
        zs = s.model(xs).double().numpy()
        zt = ((t1.model(xs) + t2.model(xs)) / 2).double().numpy()
    lp_s = zs - np.logaddexp.reduce(zs, axis=1, keepdims=True)
    lp_t = zt - np.logaddexp.reduce(zt, axis=1, keepdims=True)
    assert m["agreement"] == pytest.approx(float((zs.argmax(1) == zt.argmax(1)).mean()), abs=1 / 360)
    assert m["logit_l2"] == pytest.approx(float(np.linalg.norm(zs - zt, axis=1).mean()), rel=1e-4)
    assert m["kl_teacher_student"] == pytest.approx(float((np.exp(lp_t) * (lp_t - lp_s)).sum(1).mean()),
                                                    rel=1e-3, abs=1e-5)


def test_ensemble_renormalises_for_a_teacher_with_other_statistics(digits_teacher):
    t = checkpoint.load(digits_teacher)
    digits = load_source("digits").test
    student_stats = ([0.5], [0.25])  # the student normalises differently from the teacher
    ens = TeacherEnsemble([t.model], [(t.meta["mean"], t.meta["std"])], student_stats, torch.device("cpu"))
    xs = normalised(digits.images[:16], *student_stats)
    with torch.no_grad():
        expected = t.model(normalised(digits.images[:16], t.meta["mean"], t.meta["std"]))
    torch.testing.assert_close(ens(xs), expected, rtol=1e-4, atol=1e-4)


def write_npz(path: Path, *, n: int = 60, size: int = 8, channels: int = 1, k: int = 10,
              classes: list[str] | None = None) -> Path:
    rng = np.random.default_rng(0)
    shape = (n, size, size) if channels == 1 else (n, size, size, channels)
    arrays = {"x": rng.integers(0, 256, shape, dtype=np.uint8), "y": np.arange(n) % k}
    if classes is not None:
        arrays["classes"] = np.array(classes)
    np.savez(path, **arrays)
    return path


def npz_teacher(tmp_path: Path, name: str, **kw) -> Path:
    data = write_npz(tmp_path / f"{name}.npz", **kw)
    out = tmp_path / f"{name}.safetensors"
    api.train_teacher(str(out), arch="mlp-16", data=api.DataOptions(f"npz:{data}"),
                      cfg=api.TrainConfig(epochs=1, batch_size=16), device="cpu", quiet=True)
    return out


def test_incompatible_teacher_exits_3_naming_the_field(cli, tmp_path):
    teacher = npz_teacher(tmp_path, "rgb", channels=3)
    out = tmp_path / "s.safetensors"
    r = cli("distill", "--teacher", teacher, "--data", "digits", "--epochs", "1", "--out", out)
    assert r.returncode == 3, r.stderr
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "in_channels is 3" in lines[0] and "has 1" in lines[0] and str(teacher) in lines[0]
    assert not out.exists() and not Path(f"{out}.state.safetensors").exists()


@pytest.mark.parametrize("kw,fragment", [
    ({"k": 3}, "num_classes is 3"),
    ({"size": 12}, "image_size is 12"),
    ({"classes": [f"c{i}" for i in range(10)]}, "classes differ"),
])
def test_other_mismatches_name_their_field(tmp_path, digits_teacher, kw, fragment):
    teacher = npz_teacher(tmp_path, "other", **kw)
    out = tmp_path / "s.safetensors"
    with pytest.raises(InputError, match=fragment):
        api.distill(str(out), [str(digits_teacher), str(teacher)], arch="mlp-16", data=api.DataOptions("digits"),
                    cfg=api.TrainConfig(epochs=1, loss="mse"), device="cpu", quiet=True)
    assert not out.exists()


def test_teacher_dash_with_empty_stdin_exits_3(tmp_path):
    out = tmp_path / "s.safetensors"
    r = run_cli("distill", "--teacher", "-", "--out", out, input="")
    assert r.returncode == 3, r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr
    assert "--teacher -: nothing was read from stdin" in r.stderr
    assert not out.exists()
