"""`--dry-run` of the two paper reproductions at the `paper` scale prints kdfine commands that carry
the official recipes (bench/reproduce_kd.py: Kim et al., IJCAI 2021; bench/reproduce_fine.py:
Kim et al., NeurIPS 2021). No training runs."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _opts(cmd: list[str]) -> dict[str, str]:
    return dict(zip(cmd, cmd[1:]))


def _dry_run(script: str, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(BENCH / script), "--scale", "paper", "--dry-run", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def test_kd_paper_scale_carries_the_official_recipe(tmp_path):
    r = _dry_run("reproduce_kd.py", "--seeds", "2", "--workdir", str(tmp_path))
    cmds = [shlex.split(line) for line in r.stdout.splitlines()]
    # teacher; 11 columns per seed; medium teacher; per seed and loss (KL tau 3, MSE): medium -> small, large ->
    # medium, large -> medium -> small (large -> small is the column's run); 2 noisy teachers, 7 students each
    assert len(cmds) == 1 + 2 * 11 + 1 + 2 * 2 * 3 + 2 * (1 + 2 * 7)
    # the two columns with the DKD and logit-standardisation authors' mixes at their lr 0.05 and decay 5e-4
    mixes = {("dkd", "0.5", "0.1", "2.5e-4"): 0, ("kl-std", "0.989011", "0.455", "5.4945e-5"): 0}
    for c in cmds:
        o = _opts(c)
        mix = (o.get("--loss"), o.get("--alpha"), o["--lr"], o["--weight-decay"])
        if mix in mixes:
            mixes[mix] += 1
            o.update({"--lr": "0.1", "--weight-decay": "5e-4", "--alpha": "1.0"})
        flags = [a for a in c if a.startswith("--")]
        assert len(flags) == len(set(flags)), c  # every option once: no later value overrides an earlier one
        assert (o["--data"], o["--epochs"], o["--optimizer"], o["--lr"], o["--weight-decay"], o["--batch-size"],
                o["--schedule"], o["--augment"], o["--precision"]) == (
            "cifar100", "200", "sgd", "0.1", "5e-4", "128", "multistep:100,150:0.1", "crop-flip", "fp32")
        assert "--nesterov" in c and "--decay-all" not in c  # Nesterov; no decay on BatchNorm and biases
        assert (o["--val-fraction"], o["--keep-best"]) == ("0.1", "val")
        if c[1] == "distill":
            assert o["--alpha"] == "1.0"
    assert list(mixes.values()) == [2, 2]  # one run of each per seed
    arch = {c[c.index("--out") + 1]: c[c.index("--arch") + 1] for c in cmds}
    teacher = cmds[0]
    assert teacher[:4] == ["kdfine", "train-teacher", "--arch", "wrn-28-4"] and "--label-noise" not in teacher
    kd = [_opts(c) for c in cmds if c[1] == "distill" and arch[_opts(c)["--teacher"]] == "wrn-28-4"
          and _opts(c)["--arch"] == "wrn-16-2" and "--label-noise" not in c]
    assert sorted((o["--loss"], o.get("--tau")) for o in kd if o["--seed"] == "0") == [
        ("dkd", "4"), ("dkd", "4"), ("kl", "1"), ("kl", "20"), ("kl", "3"), ("kl", "5"), ("kl-inf", None),
        ("kl-std", "2"), ("kl-std", "2"), ("mse", None)]
    # dkd with the authors' weights (the option defaults) and warm-up of 20 epochs
    assert {o["--dkd-warmup"] for o in kd if o["--loss"] == "dkd"} == {"20"}
    assert not any("--dkd-warmup" in o for o in kd if o["--loss"] != "dkd")
    # sequential: WRN-28-4 -> WRN-16-4 -> WRN-16-2 and WRN-16-4 (CE) -> WRN-16-2, with KL tau 3 and MSE
    paths = {(arch[_opts(c)["--teacher"]], _opts(c)["--arch"], _opts(c)["--loss"]) for c in cmds if c[1] == "distill"}
    for loss in ("kl", "mse"):
        assert {("wrn-28-4", "wrn-16-4", loss), ("wrn-16-4", "wrn-16-2", loss), ("wrn-28-4", "wrn-16-2", loss)} <= paths
    # the label-noise claim: noisy teachers, students at tau 0.5, 1, 3, 20, kl-inf, MSE and CE on the same labels
    for noise in ("sym:0.4", "asym:0.4"):
        runs = [c for c in cmds if _opts(c).get("--label-noise") == noise]
        assert sum(c[1] == "train-teacher" and _opts(c)["--arch"] == "wrn-28-4" for c in runs) == 1
        assert sorted({(_opts(c).get("--loss", "ce"), _opts(c).get("--tau")) for c in runs if c[1] == "distill"}) == [
            ("kl", "0.5"), ("kl", "1"), ("kl", "20"), ("kl", "3"), ("kl-inf", None), ("mse", None)]
        assert any(c[1] == "train-teacher" and _opts(c)["--arch"] == "wrn-16-2" for c in runs)  # CE on noisy labels


def test_fine_paper_scale_carries_the_official_recipe(tmp_path):
    r = _dry_run("reproduce_fine.py", "--out", str(tmp_path))
    cmds = [shlex.split(line.split("] ", 1)[1]) for line in r.stderr.splitlines() if "] kdfine " in line]
    train = [c for c in cmds if c[1] == "train-teacher"]
    # CIFAR-10 and -100; 4 noises; CE, CE on FINE's selection, dynamic FINE, and the strategy rows
    # (coteach, dividemix, gce, select+gce)
    assert len(train) == 2 * 4 * 7
    for c in train:
        o = _opts(c)
        assert (o["--arch"], o["--optimizer"], o["--lr"], o["--weight-decay"], o["--batch-size"], o["--augment"],
                o["--precision"], o["--val-fraction"], o["--keep-best"], o["--fine-features"]) == (
            "resnet34", "sgd", "0.02", "1e-3", "128", "crop-flip", "fp32", "0.1", "val", "augmented")
        assert "--no-nesterov" in c and "--decay-all" in c
        assert (o["--epochs"], o["--schedule"]) == {"cifar10": ("120", "multistep:40,80:0.01"),
                                                    "cifar100": ("150", "multistep:80,120:0.01")}[o["--data"]]
    assert {_opts(c)["--label-noise"] for c in train} == {"uniform:0.2", "uniform:0.5", "uniform:0.8", "asym:0.4"}
    dynamic = [_opts(c) for c in train if "--fine-every" in c and "--fine-strategy" not in c]
    assert len(dynamic) == 16 and all(o["--fine-warmup"] == "40" for o in dynamic)  # select and select+gce
    assert all(o["--fine-every"] == "10" for o in dynamic)
    assert sum(_opts(c).get("--fine-strategy") == "dividemix" for c in train) == 8
