"""Options are declared once (kdfine.options) and checked before anything is loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kdfine.errors import UsageError
from kdfine.options import DataOptions, DetectOptions, EvalOptions, TrainConfig, declarations
from kdfine.train.schedule import parse_schedule

# (arguments, a fragment of the one error line): each must exit 2 before torch is even imported,
# so certainly before any data is read or any model built
EARLY_USAGE_ERRORS = [
    (["eval", "--model", "m.safetensors", "--precision", "bf17"], "'bf17' is not one of 'auto', 'fp32', 'bf16'"),
    (["train-teacher", "--channels-last", "maybe", "--out", "t.safetensors"], "'maybe' is not one of 'auto', 'on', 'off'"),
    (["detect-noise", "--method", "foo", "-f", "f.npy", "-o", "c.csv"], "'foo' is not one of 'gmm', 'kmeans'"),
    (["distill", "--loss", "foo", "-t", "t.safetensors", "-o", "s.safetensors"], "'foo' is not one of 'ce', 'kl'"),
    (["eval", "--model", "m.safetensors", "--split", "val"], "'val' is not one of 'train', 'test'"),
    (["train-teacher", "--augment", "jitter", "--out", "t.safetensors"], "'jitter' is not one of 'crop-flip'"),
    (["train-teacher", "--resize", "fit", "--out", "t.safetensors"], "'fit' is not one of 'crop', 'squash'"),
    (["train-teacher", "--lr", "nan", "--out", "t.safetensors"], "--lr nan: must be a finite number"),
    (["train-teacher", "--lr", "inf", "--out", "t.safetensors"], "--lr inf: must be a finite number"),
    (["train-teacher", "--weight-decay", "nan", "--out", "t.safetensors"], "--weight-decay nan"),
    (["train-teacher", "--seed", "4294967296", "--out", "t.safetensors"], "--seed 4294967296: must be an integer"),
    (["train-teacher", "--seed", "-1", "--out", "t.safetensors"], "--seed -1"),
    (["train-teacher", "--noise-seed", "-3", "--out", "t.safetensors"], "--noise-seed -3"),
    (["train-teacher", "--fine-zeta", "1.5", "--out", "t.safetensors"], "--fine-zeta 1.5: must lie in [0, 1)"),
    (["distill", "--tau", "0", "-t", "t.safetensors", "-o", "s.safetensors"], "--tau 0"),
    (["distill", "--alpha", "2", "-t", "t.safetensors", "-o", "s.safetensors"], "--alpha 2"),
    (["detect-noise", "--zeta", "-0.1", "-f", "f.npy", "-o", "c.csv"], "--zeta -0.1"),
    (["train-teacher", "--schedule", "steps", "--out", "t.safetensors"], "--schedule 'steps'"),
    (["train-teacher", "--data", "imagenet", "--out", "t.safetensors"], "unknown data spec"),
    (["train-teacher", "--label-noise", "sym:2", "--out", "t.safetensors"], "rate must lie in [0, 1]"),
    (["train-teacher", "--epochs", "-1", "--out", "t.safetensors"], "--epochs"),  # 0 writes the initial model
]

_PROBE = """
import contextlib, io, json, sys
from kdfine.cli import main
out = []
for args in json.loads(sys.argv[1]):
    sys.argv = ["kdfine", *args]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
    out.append([code, err.getvalue()])
print(json.dumps({"runs": out, "torch": "torch" in sys.modules}))
"""


def test_bad_option_values_exit_2_with_one_line_before_anything_loads(tmp_path):
    args = [a for a, _ in EARLY_USAGE_ERRORS]
    r = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    for (argv, fragment), (code, err) in zip(EARLY_USAGE_ERRORS, doc["runs"]):
        lines = err.strip().splitlines()
        assert code == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("kdfine: error: ") and fragment in lines[0], (argv, err)
    assert not doc["torch"], "an option was checked only after torch (and so data or a model) was loaded"
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("cls", [DataOptions, TrainConfig, DetectOptions, EvalOptions])
def test_defaults_validate_and_every_cli_field_names_its_flag(cls):
    cls().validate()
    for f, meta, _ in declarations(cls):
        if meta.flag is None:  # a library setting, not on the command line
            continue
        commands = meta.commands or (None,)
        for command in commands:
            assert meta.flag.startswith("--") and meta.help_for(command).endswith(".")
            default = meta.default_for(command, f.default)
            if meta.choices_for(command) is not None and default is not None:
                assert default in meta.choices_for(command)


def test_train_teacher_and_distill_share_one_declaration():
    """The same TrainConfig fields appear as the same options in both commands."""
    from kdfine.cli import app
    import typer.main

    group = typer.main.get_command(app)
    opts = {name: {p.name: p.opts for p in group.commands[name].params} for name in ("train-teacher", "distill")}
    both = {f.name for f, m, _ in declarations(TrainConfig, "train-teacher")} & {
        f.name for f, m, _ in declarations(TrainConfig, "distill")}
    assert {"epochs", "lr", "fine_every", "loss"} <= both and "tau" not in both and "fine_strategy" not in both
    for f, meta, _ in declarations(TrainConfig):
        if meta.flag is not None and f.name in both:
            assert opts["train-teacher"][f.name] == opts["distill"][f.name] == [meta.flag.split("/")[0]]


def test_loss_names_are_the_implemented_ones():
    import torch

    from kdfine.train.losses import LOSSES, kd_loss

    zs, zt, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    for loss in LOSSES:
        assert torch.isfinite(kd_loss(zs, zt, y, loss=loss))


def test_schedule_multipliers():
    f = parse_schedule("multistep:2,4", 6)
    assert [f(t) for t in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(UsageError, match="milestones must be integers"):
        parse_schedule("multistep:a", 6)
