"""Bad input, case by case: each a real file and a real kdfine command line.

Every failing case must exit with the README's documented code, print exactly one line on stderr
and no traceback, and leave its directory exactly as it was: an existing output file byte-identical, no
partial or temporary file. With ``--debug`` the traceback comes before that line and the exit
code stays the same. Warnings are one line and do not stop the command.

Most commands run in this process through kdfine's entry point; those of IN_A_PROCESS, where the
process itself is part of the case, run as ``python -m kdfine`` in the background meanwhile.
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import bomb_png, cli_env, run_cli, run_kdfine

SENTINEL = b"an existing output file that a failed command must leave alone\n"
N, D, K = 120, 8, 3  # the synthetic feature dumps


@dataclass
class Case:
    """``make(case_dir, shared)`` writes the case's files and returns the command's arguments;
    ``out`` (relative to the case dir) is pre-filled with SENTINEL."""

    make: Callable[[Path, dict], list]
    code: int
    message: str  # a fragment of the one stderr line
    out: str | None = None
    stdin: str | None = None
    env: dict | None = None  # extra environment of the command


def _dump(d: Path, name: str, feats: np.ndarray, labels: np.ndarray, k: int = K) -> Path:
    np.save(d / f"{name}.npy", feats)
    np.save(d / f"{name}.labels.npy", labels)
    (d / f"{name}.json").write_text(json.dumps({"num_classes": k}))
    return d / f"{name}.npy"


def _features(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(N) % K
    centres = rng.normal(size=(K, D)) * 4
    return (centres[labels] + rng.normal(size=(N, D))).astype(np.float32), labels.astype(np.int64)


def _detect(path, out="out.csv", *extra):
    return ["detect-noise", "--features", path, "--out", out, *extra]


def _with(feats=None, labels=None, name="f"):
    """A detect-noise case on a dump built from the good one with ``feats``/``labels`` changed."""
    def make(d, s):
        f, y = _features()
        return _detect(_dump(d, name, feats(f) if feats else f, labels(y) if labels else y))
    return make


def _set(a, index, value):
    a = a.copy()
    a[index] = value
    return a


def _train(s, *args):
    """train-teacher of a tiny mlp on the small npz data set (60 training images, 3 classes)."""
    return ["train-teacher", "--data", f"npz:{s['small']}", "--arch", "mlp-16", "--epochs", "1", "--batch-size", "16",
            "--device", "cpu", *args]


def _keep(text: str):
    """train-teacher --keep with an index list."""
    def make(d, s):
        (d / "keep.csv").write_text(text)
        return _train(s, "--keep", "keep.csv", "--out", "out.safetensors")
    return make


def _model(build: Callable[[Path, dict], Path]):
    """eval of a checkpoint file, with a feature dump as the output that must stay untouched."""
    def make(d, s):
        return ["eval", "--model", build(d, s), "--split", "train", "--device", "cpu", "--dump-features", "out.npy"]
    return make


def _truncated(d, s):
    data = Path(s["teacher"]).read_bytes()
    (d / "t.safetensors").write_bytes(data[: len(data) * 2 // 3])
    return d / "t.safetensors"


def _text(d, s):
    (d / "t.safetensors").write_text("arch=cnn\nnot a checkpoint\n")
    return d / "t.safetensors"


def _foreign(d, s):
    save_file({"weight": s["tensors"]["head.weight"]}, str(d / "t.safetensors"), metadata={"format": "pt"})
    return d / "t.safetensors"


def _wrong_arch(d, s):
    save_file(s["tensors"], str(d / "t.safetensors"), metadata={**s["meta"], "arch": "mlp"})
    return d / "t.safetensors"


def _unreadable(d, s):
    """A file kdfine cannot read: mode 000 where that stops us (not root), else a directory."""
    p = d / "t.safetensors"
    p.write_bytes(Path(s["teacher"]).read_bytes())
    p.chmod(0)
    try:
        p.open("rb").close()
    except PermissionError:
        return p
    p.chmod(0o644)
    p.unlink()
    p.mkdir()
    return p


def _read_only_dir(d, s):
    """A directory where files cannot be created: mode 555 where that stops us, else /proc."""
    ro = d / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").touch()
    except PermissionError:
        return ro / "out.csv"
    (ro / "probe").unlink()
    ro.chmod(0o755)
    ro.rmdir()
    return Path("/proc") / "out.csv"


def _three_classes(d, s):
    x = np.random.default_rng(0).integers(0, 256, (30, 8, 8, 1), dtype=np.uint8)
    np.savez(d / "three.npz", x=x, y=np.arange(30) % 3)
    return ["distill", "--teacher", s["teacher"], "--data", f"npz:{d / 'three.npz'}", "--arch", "mlp",
            "--epochs", "1", "--device", "cpu", "--out", "out.safetensors"]




def _equal_scores(d, s):
    f, y = _features()
    f[y == 1] = f[np.flatnonzero(y == 1)[0]]  # every sample of class 1 has the same features
    return _detect(_dump(d, "f", f, y), "out.csv", "--json", "--method", "gmm")  # FINE's per-class split


def _empty_file(d, s):
    (d / "f.npy").write_bytes(b"")
    return _detect(d / "f.npy")


def _empty_array(d, s):
    return _detect(_dump(d, "f", np.zeros((0, D), np.float32), np.zeros(0, np.int64)))


def _good_dump(d, s):
    f, y = _features()
    return _dump(d, "f", f, y)


def _json(text: str):
    """detect-noise on a good dump whose json sidecar holds ``text``."""
    def make(d, s):
        p = _good_dump(d, s)
        (d / "f.json").write_text(text)
        return _detect(p)
    return make


def _sidecar(suffix: str, array: np.ndarray, *extra: str):
    """detect-noise on a good dump with the sidecar ``f.SUFFIX`` replaced by ``array``."""
    def make(d, s):
        p = _good_dump(d, s)
        np.save(d / f"f.{suffix}", array)
        return _detect(p, "out.csv", *extra)
    return make


def _foreign_sidecar(d, s):
    """A dump whose json records its set, with the labels of another dump put beside it."""
    from kdfine.detect.dump import write_dump

    f, y = _features()
    write_dump(d / "f.npy", f, np.zeros((N, K), np.float32), y, {"num_classes": K})
    np.save(d / "f.labels.npy", np.roll(y, 1))
    return _detect(d / "f.npy")


def _meta(**fields):
    """A copy of the teacher with metadata fields replaced."""
    def build(d, s):
        save_file(s["tensors"], str(d / "t.safetensors"), metadata={**s["meta"], **fields})
        return d / "t.safetensors"
    return build


def _copy_teacher(d, s):
    (d / "t.safetensors").write_bytes(Path(s["teacher"]).read_bytes())
    return d / "t.safetensors"


def _distill_onto_teacher(d, s):
    t = _copy_teacher(d, s)
    return ["distill", "--teacher", t, "--arch", "mlp", "--epochs", "1", "--device", "cpu", "--out", t]


def _dump_onto_model(d, s):
    t = _copy_teacher(d, s)
    return ["eval", "--model", t, "--split", "train", "--device", "cpu", "--dump-features", "t.safetensors"]


def _header_only(name: str, text: str):
    def make(d, s):
        (d / name).write_text(text)
        return _detect(_good_dump(d, s), "out.csv", "--vectors-from", name)
    return make


def _victim_link(name: str, *extra: str, hard: bool = False, content: str | None = None):
    """train-teacher --out out.safetensors with ``name`` beside it planted: a symbolic (or hard)
    link to a file the run must not touch, or a file of ``content``."""
    def make(d, s):
        (d / "victim.txt").write_bytes(SENTINEL)
        if content is not None:
            (d / name).write_text(content)
        elif hard:
            os.link(d / "victim.txt", d / name)
        else:
            (d / name).symlink_to("victim.txt")
        return _train(s, "--epochs", "0", "-q", "--out", "out.safetensors", *extra)
    return make


def _npy_header_lies(d, s):
    """A labels sidecar whose header declares 10**12 labels (8 TB) over a 32-byte body."""
    p = _good_dump(d, s)
    with open(d / "f.labels.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (10**12,)})
        f.write(bytes(32))
    return _detect(p)


def _string_logits(d, s):
    p = _good_dump(d, s)
    np.save(d / "f.logits.npy", np.full((N, K), "1.5", dtype="<U4"))
    return _detect(p, "out.csv", "--method", "small-loss")


def _tampered_state(raw: str | None = None, **fields):
    """train-teacher --resume with a state file of this user whose JSON (``raw``, or fields) is replaced."""
    def make(d, s):
        import torch

        info = {"epoch": 1, "history": [{"epoch": 1}], "config": {}, "optimizers": [], **fields}
        save_file({"rng.cpu": torch.get_rng_state()}, str(d / "out.safetensors.state.safetensors"),
                  metadata={"kdfine_state": raw if raw is not None else json.dumps(info)})
        return _train(s, "--resume", "-q", "--out", "out.safetensors")
    return make


def _huge_label(d, s):
    """A dump whose json does not give num_classes, with one label of 10**15."""
    f, y = _features()
    p = _dump(d, "f", f, _set(y, 3, 10**15))
    (d / "f.json").write_text("{}")
    return _detect(p)


def _export_dir_link(d, s):
    (d / "empty").mkdir()
    (d / "exp").symlink_to("empty")
    return ["clean", "--model", s["teacher"], "--out", "c.csv", "--noisy-out", "n.csv", "--export-dir", "exp",
            "--device", "cpu"]
# ------------------------------------------------------------------ issue 27: export, predict, --init


def _png(d: Path, name: str = "img.png", size: tuple[int, int] = (8, 8)) -> Path:
    from PIL import Image

    (d / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), 90, np.uint8)).save(d / name)
    return d / name


def _predict(model, *paths, out="out.csv"):
    return ["predict", "--model", model, *paths, "--device", "cpu", "--out", out]


def _link(kind: str, target: Path, name: str) -> Path:
    """``name`` beside ``target``: a hard link or a symbolic link to it (the same file)."""
    link = target.parent / name
    (os.link if kind == "hard" else os.symlink)(target.name if kind == "sym" else target, link)
    return link


def _export_onto(kind: str | None):
    def make(d, s):
        t = _copy_teacher(d, s)
        out = t if kind is None else _link(kind, t, "m.onnx")
        return ["export", "--model", t, "--out", out.name]
    return make


def _predict_onto_model(kind: str | None):
    def make(d, s):
        t = _copy_teacher(d, s)
        out = t if kind is None else _link(kind, t, "p.csv")
        return _predict(t, _png(d), out=out.name)
    return make


def _predict_onto_image(kind: str | None):
    def make(d, s):
        img = _png(d, "imgs/a.png")
        _png(d, "imgs/b.png")
        out = img if kind is None else _link(kind, img, "p.csv")
        return _predict(s["teacher"], "imgs", out=out)
    return make


def _init_onto(option: str, kind: str | None):
    """train-teacher --init F with --out or --log F (or a link to it)."""
    def make(d, s):
        f = _copy_teacher(d, s)
        target = f if kind is None else _link(kind, f, "link.safetensors")
        out = ["--out", target] if option == "--out" else ["--out", "new.safetensors", "--log", target]
        return _train(s, "--init", f, *out)
    return make


def _predict_meta(**fields):
    """predict with a copy of the teacher whose metadata fields are replaced (JSON text)."""
    def make(d, s):
        return _predict(_meta(**fields)(d, s), _png(d))
    return make


def _init_file(name: str, build: Callable[[], object], *extra: str):
    """train-teacher --init NAME, NAME written by torch.save(build()) (or raw bytes)."""
    def make(d, s):
        import torch

        obj = build()
        if isinstance(obj, bytes):
            (d / name).write_bytes(obj)
        else:
            torch.save(obj, d / name)
        return _train(s, "--init", name, "--out", "out.safetensors", *extra)
    return make


def _mlp_state(change: Callable | None = None) -> Callable[[], dict]:
    """The state dict of train-teacher's mlp-16 on the small set, one tensor changed."""
    def build():
        import torch

        from kdfine.models import build as build_model

        sd = {k: v.clone() for k, v in build_model("mlp-16", 3, 1, 8).state_dict().items()}
        if change:
            change(sd, torch)
        return sd
    return build


def _fifo(option: str):
    def make(d, s):
        os.mkfifo(d / "pipe.safetensors")
        if option == "--init":
            return _train(s, "--init", "pipe.safetensors", "--out", "out.safetensors")
        return _predict("pipe.safetensors", _png(d))
    return make


def _onnx_meta(**props):
    """predict with an ONNX file whose metadata properties are replaced."""
    def make(d, s):
        import onnx
        from onnx import TensorProto, helper

        x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 8, 8])
        y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 64])
        graph = helper.make_graph([helper.make_node("Flatten", ["images"], ["logits"])], "g", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        meta = {"classes": json.dumps([str(i) for i in range(64)]), "mean": "[0.5]", "std": "[0.2]", "image_size": "8",
                "in_channels": "1", "num_classes": "64",
                "decode": json.dumps({"size": 8, "channels": 1, "resize": "crop"}), **props}
        for k, v in meta.items():
            p = model.metadata_props.add()
            p.key, p.value = k, v
        onnx.save(model, str(d / "m.onnx"))
        return _predict("m.onnx", _png(d))
    return make


def _nan_weight(sd, torch):
    sd["body.1.weight"][0, 0] = float("nan")


def _inf_weight(sd, torch):
    sd["head.bias"][1] = float("inf")


def _int_weight(sd, torch):
    sd["body.1.weight"] = sd["body.1.weight"].round().to(torch.int64)


def _int_keys(sd, torch):
    sd[7] = torch.zeros(2)


def _meta_tensor(sd, torch):
    sd["body.1.bias"] = torch.empty(16, device="meta")


def _sparse(sd, torch):
    sd["body.1.weight"] = sd["body.1.weight"].to_sparse()


def _quantized(sd, torch):
    sd["body.1.bias"] = torch.quantize_per_tensor(sd["body.1.bias"], 0.1, 0, torch.qint8)


def _tv_extra_head_key(d, s):
    import torch

    torch.save({"fc.bogus": torch.zeros(3)}, d / "tv.pt")
    return _train(s, "--arch", "tv:resnet18", "--init", "tv.pt", "--out", "out.safetensors")


def _nan_checkpoint(d, s):
    tensors = {k: v.clone() for k, v in s["tensors"].items()}
    tensors["head.weight"][0, 0] = float("nan")
    save_file(tensors, str(d / "t.safetensors"), metadata=s["meta"])
    return d / "t.safetensors"


def _int_checkpoint(d, s):
    import torch

    tensors = {**s["tensors"], "head.weight": s["tensors"]["head.weight"].round().to(torch.int32)}
    save_file(tensors, str(d / "t.safetensors"), metadata=s["meta"])
    return d / "t.safetensors"


def _bomb_beside_an_image(d, s):
    _png(d, "imgs/a.png")
    bomb_png(d / "imgs" / "b-bomb.png")
    return _predict(s["teacher"], "imgs", out="out.csv")


def _fifo_beside_an_image(d, s):
    """A FIFO named like an image, given by name: opening it would block until a writer came."""
    _png(d, "imgs/a.png")
    os.mkfifo(d / "imgs" / "b.png")
    return _predict(s["teacher"], "imgs/a.png", "imgs/b.png", out="out.csv")


def _huge_size(d, s):
    """A checkpoint of image_size 100000 (an mlp: its first layer would hold 10^10 weights)."""
    return _predict(_meta(image_size="100000", arch="mlp-16")(d, s), _png(d))


CASES: dict[str, Case] = {
    "truncated-safetensors": Case(_model(_truncated), 3, "truncated", "out.npy"),
    "not-safetensors": Case(_model(_text), 3, "not a readable safetensors file", "out.npy"),
    "safetensors-without-kdfine-metadata": Case(_model(_foreign), 3, "not a kdfine checkpoint", "out.npy"),
    "tensors-do-not-match-arch": Case(_model(_wrong_arch), 3, "do not match its recorded arch mlp", "out.npy"),
    "teacher-student-class-mismatch": Case(_three_classes, 3, "num_classes is 10 but the data", "out.safetensors"),
    "features-with-nan": Case(_with(feats=lambda f: _set(f, (7, 2), np.nan)), 3, "row 7 contains NaN or inf",
                              "out.csv"),
    "features-with-inf": Case(_with(feats=lambda f: _set(f, (9, 0), -np.inf)), 3, "row 9 contains NaN or inf",
                              "out.csv"),
    "features-and-labels-lengths-differ": Case(_with(labels=lambda y: y[:-5]), 3, f"has {N - 5} rows", "out.csv"),
    "label-above-range": Case(_with(labels=lambda y: _set(y, 4, K)), 3, f"label {K} is outside [0, {K})", "out.csv"),
    "label-negative": Case(_with(labels=lambda y: _set(y, 4, -1)), 3, f"label -1 is outside [0, {K})", "out.csv"),
    "index-negative": Case(_keep("index\n3\n-2\n"), 3, "negative index -2", "out.safetensors"),
    "index-duplicate": Case(_keep("index\n3\n8\n3\n"), 3, "index 3 appears more than once", "out.safetensors"),
    "index-out-of-range": Case(_keep("index\n0\n60\n"), 3, "index 60 is out of range for 60 samples",
                               "out.safetensors"),
    "index-not-integer": Case(_keep("index\n0\n2.5\n"), 3, "line 3: '2.5' is not an integer", "out.safetensors"),
    "keep-leaves-nothing": Case(_keep("index\n"), 3, "keeps no samples", "out.safetensors"),
    "empty-features-file": Case(_empty_file, 3, "not a readable .npy array", "out.csv"),
    "empty-features-array": Case(_empty_array, 3, "the array is empty", "out.csv"),
    "missing-path": Case(lambda d, s: _detect(d / "nowhere.npy"), 3, "nowhere.npy: no such file", "out.csv"),
    "unreadable-path": Case(_model(_unreadable), 3, "t.safetensors", "out.npy"),
    "out-in-missing-directory": Case(lambda d, s: _detect(_good_dump(d, s), d / "no" / "dir" / "out.csv"), 3,
                                     "does not exist; create it first"),
    "out-in-read-only-directory": Case(lambda d, s: _detect(_good_dump(d, s), _read_only_dir(d, s)), 3,
                                       "cannot create files in"),
    "out-under-a-regular-file": Case(lambda d, s: _detect(_good_dump(d, s), d / "f.json" / "out.csv"), 3,
                                     "is not a directory"),
    "disk-full-csv": Case(lambda d, s: _detect(_good_dump(d, s), "/dev/full"), 3,
                          "cannot write /dev/full: No space left on device"),
    "disk-full-checkpoint": Case(lambda d, s: _train(s, "--out", "/dev/full", "-q"), 3,
                                 "cannot write /dev/full: No space left on device"),
    # issue 19: exit codes as documented, never 1
    "dump-json-a-list": Case(_json("[]"), 3, "expected a JSON object, got list", "out.csv"),
    "dump-json-null": Case(_json("null"), 3, "expected a JSON object, got NoneType", "out.csv"),
    "dump-json-num-classes-text": Case(_json('{"num_classes": "ten"}'), 3, "'num_classes' must be an integer",
                                       "out.csv"),
    "dump-json-wrong-length": Case(_json(f'{{"n": {N + 1}}}'), 3, "come from different dumps", "out.csv"),
    "dump-sidecar-of-another-dump": Case(_foreign_sidecar, 3, "f.labels.npy was changed", "out.csv"),
    "logits-wrong-columns-small-loss": Case(_sidecar("logits.npy", np.zeros((N, K - 1), np.float32),
                                                     "--method", "small-loss"), 3, "has 2 columns", "out.csv"),
    "truth-two-dimensional": Case(_sidecar("truth.npy", np.zeros((N, 2), np.int64)), 3, "expected (N,)", "out.csv"),
    "vectors-from-header-only": Case(_header_only("v.csv", "index\n"), 3, "lists no indices", "out.csv"),
    "csv-with-bom-still-checked": Case(_header_only("v.csv", "\ufeffindex\n"), 3, "lists no indices", "out.csv"),
    "arch-cnn-0": Case(lambda d, s: _train(s, "--arch", "cnn-0", "--out", "out.safetensors"), 2, "cnn-0",
                       "out.safetensors"),
    "arch-mlp-1": Case(lambda d, s: _train(s, "--arch", "mlp-1", "--out", "out.safetensors"), 2, "mlp-1",
                       "out.safetensors"),
    "batch-of-one-with-batchnorm": Case(lambda d, s: _train(s, "--batch-size", "1", "--out", "out.safetensors"), 2,
                                        "--batch-size 1: mlp-16 has BatchNorm layers", "out.safetensors"),
    "keep-one-index": Case(_keep("index\n5\n"), 3, "keeps 1 sample; training needs at least 2", "out.safetensors"),
    "metrics-as-a-string": Case(_model(_meta(metrics="fast")), 3, "'metrics' must be a JSON object", "out.npy"),
    "classes-not-strings": Case(_model(_meta(classes=json.dumps(list(range(10))))), 3,
                                "'classes' must be a JSON list of strings", "out.npy"),
    "seed-too-large": Case(lambda d, s: _train(s, "--seed", "4294967296", "--out", "out.safetensors"), 2,
                           "--seed 4294967296: must be an integer in [0, 4294967295]", "out.safetensors"),
    "seed-negative": Case(lambda d, s: _train(s, "--seed", "-1", "--out", "out.safetensors"), 2,
                          "--seed -1: must be", "out.safetensors"),
    "noise-seed-negative": Case(lambda d, s: _train(s, "--noise-seed", "-1", "--out", "out.safetensors"), 2,
                                "--noise-seed -1: must be", "out.safetensors"),
    "weight-decay-nan": Case(lambda d, s: _train(s, "--weight-decay", "nan", "--out", "out.safetensors"), 2,
                             "--weight-decay nan: must be a finite number", "out.safetensors"),
    "lr-inf": Case(lambda d, s: _train(s, "--lr", "inf", "--out", "out.safetensors"), 2,
                   "--lr inf: must be a finite number", "out.safetensors"),
    # issue 19: outputs that are inputs, or each other; names checked up front; all or nothing
    "distill-out-is-the-teacher": Case(_distill_onto_teacher, 2, "is the input --teacher"),
    "dump-onto-the-model": Case(_dump_onto_model, 2, "is the input --model"),
    "out-and-noisy-out-the-same": Case(lambda d, s: _detect(_good_dump(d, s), "same.csv", "--noisy-out", "same.csv"),
                                       2, "are the same file", "same.csv"),
    "noisy-out-in-missing-directory": Case(lambda d, s: _detect(_good_dump(d, s), "c.csv", "--noisy-out",
                                                                "no/n.csv"), 3, "--noisy-out no/n.csv", "c.csv"),
    "out-missing-with-noisy-out": Case(lambda d, s: _detect(_good_dump(d, s), "no/c.csv", "--noisy-out", "noisy.csv"),
                                       3, "--out no/c.csv", "noisy.csv"),
    "noisy-out-disk-full": Case(lambda d, s: _detect(_good_dump(d, s), "c.csv", "--noisy-out", "/dev/full"), 3,
                                "cannot write /dev/full: No space left on device"),
    "out-name-too-long": Case(lambda d, s: _train(s, "--out", "x" * 227), 2, "the file name is too long"),
    "out-name-not-utf8": Case(lambda d, s: _train(s, "--out", os.fsdecode(b"\xff.safetensors")), 2,
                              "not valid UTF-8"),
    "clean-export-disk-full": Case(lambda d, s: ["clean", "--model", s["teacher"], "--out", "c.csv", "--export",
                                                 "/dev/full", "--device", "cpu"], 3,
                                   "cannot write /dev/full: No space left on device"),
    "clean-export-dir-in-missing-directory": Case(lambda d, s: ["clean", "--model", s["teacher"], "--out", "c.csv",
                                                                "--export-dir", "missing/exp", "--device", "cpu"], 3,
                                                  "--export-dir missing/exp: missing does not exist"),
    # issue 28: files that others can plant or tamper with; readers with bounded memory
    "lock-is-a-symlink": Case(_victim_link("out.safetensors.lock"), 3, "out.safetensors.lock is a symbolic link",
                              "out.safetensors"),
    "lock-is-a-hard-link": Case(_victim_link("out.safetensors.lock", hard=True), 3, "has other names (hard links)",
                                "out.safetensors"),
    "lock-is-not-a-lock": Case(_victim_link("out.safetensors.lock", content="notes\n"), 3,
                               "does not hold a kdfine lock line", "out.safetensors"),
    "resume-state-is-a-symlink": Case(_victim_link("out.safetensors.state.safetensors", "--resume"), 3,
                                      "resume state out.safetensors.state.safetensors: is a symbolic link",
                                      "out.safetensors"),
    "resume-state-epoch-text": Case(_tampered_state(epoch="1"), 3, "its epoch is not a number of epochs",
                                    "out.safetensors"),
    "resume-state-nested-json": Case(_tampered_state(config=json.loads("[" * 50 + "]" * 50),
                                                     history=[[]]), 3, "history is not one record per epoch",
                                   "out.safetensors"),
    "resume-state-config-a-list": Case(_tampered_state(config=[]), 3, "its config is not what kdfine writes",
                                       "out.safetensors"),
    "resume-state-optimizer-junk": Case(_tampered_state(optimizers=[{"state": {"0": {"m": {"tensor": "nowhere"}}},
                                                                     "param_groups": []}]), 3,
                                        "optimizer state is not what kdfine writes", "out.safetensors"),
    "dump-json-nested-deeply": Case(_json("[" * 100000 + "]" * 100000), 3, "nested too deeply", "out.csv"),
    "dump-json-huge-num-classes": Case(_json('{"num_classes": 1000000000000000}'), 3,
                                       "1,000,000,000,000,000 classes (its json's num_classes) x 8 dims need",
                                       "out.csv"),
    "resume-state-json-nested-deeply": Case(_tampered_state("[" * 100000 + "]" * 100000), 3,
                                            "resume state out.safetensors.state.safetensors: unreadable",
                                            "out.safetensors"),
    "dump-labels-huge-label": Case(_huge_label, 3,
                                   "1,000,000,000,000,001 classes (its largest label)", "out.csv"),
    "dump-json-classes-not-strings": Case(_json('{"classes": [1, 2, 3]}'), 3, "'classes' must be a list of strings",
                                          "out.csv"),
    "dump-json-dim-of-another-dump": Case(_json(f'{{"dim": {D + 1}}}'), 3, "come from different dumps", "out.csv"),
    "dump-logits-strings": Case(_string_logits, 3, "holds <U4, expected float values", "out.csv"),
    "dump-npy-header-lies": Case(_npy_header_lies, 3, "its header declares (1000000000000,) int64", "out.csv"),
    "index-csv-line-over-128k": Case(_header_only("v.csv", "index\n" + "7" * 200_000 + "\n"), 3,
                                     "line 2: longer than 128 KiB", "out.csv"),
    "index-csv-field-over-128k": Case(_header_only("v.csv", 'index\n"' + ("x" * 1000 + "\n") * 200 + '"\n'), 3,
                                      "not a CSV row (field larger than field limit", "out.csv"),
    "index-csv-more-rows-than-samples": Case(_header_only("v.csv", "index\n" + "0\n" * (N + 1)), 3,
                                             f"lists more than {N} indices", "out.csv"),
    "clean-export-dir-is-a-symlink": Case(_export_dir_link, 3, "--export-dir exp: is a symbolic link", "c.csv"),
    "teacher-stdin-empty": Case(lambda d, s: ["distill", "--teacher", "-", "--arch", "mlp", "--epochs", "1",
                                              "--out", "out.safetensors"], 3, "nothing was read from stdin",
                                "out.safetensors", stdin=""),
    # issue 27: outputs that would destroy an input (the same file, a hard link, a symbolic link)
    "export-out-is-the-model": Case(_export_onto(None), 2, "is the input --model"),
    "export-out-hard-link-to-the-model": Case(_export_onto("hard"), 2, "is the input --model"),
    "export-out-symlink-to-the-model": Case(_export_onto("sym"), 2, "is the input --model"),
    "export-out-stdout": Case(lambda d, s: ["export", "--model", _copy_teacher(d, s), "--out", "-"], 2,
                              "export --out -: the model is a binary file"),
    "export-out-dev-stdout": Case(lambda d, s: ["export", "--model", _copy_teacher(d, s), "--out", "/dev/stdout"], 2,
                                  "export --out /dev/stdout: the model is a binary file"),
    "predict-out-is-the-model": Case(_predict_onto_model(None), 2, "is the input --model"),
    "predict-out-hard-link-to-the-model": Case(_predict_onto_model("hard"), 2, "is the input --model"),
    "predict-out-is-an-image": Case(_predict_onto_image(None), 2, "is the input PATH"),
    "predict-out-symlink-to-an-image": Case(_predict_onto_image("sym"), 2, "is the input PATH"),
    "predict-out-hard-link-to-an-image": Case(_predict_onto_image("hard"), 2, "is the input PATH"),
    "init-is-the-out": Case(_init_onto("--out", None), 2, "is the input --init"),
    "init-hard-link-is-the-out": Case(_init_onto("--out", "hard"), 2, "is the input --init"),
    "init-is-the-log": Case(_init_onto("--log", None), 2, "is the input --init"),
    "init-symlink-is-the-log": Case(_init_onto("--log", "sym"), 2, "is the input --init"),
    # issue 27: checkpoint metadata is checked when the file is read
    "meta-image-size-huge": Case(_huge_size, 3, "'image_size' must be a whole number in [1, 4096], not 100000",
                                 "out.csv"),
    "meta-image-size-zero": Case(_predict_meta(image_size="0"), 3, "'image_size' must be a whole number", "out.csv"),
    "meta-image-size-negative": Case(_predict_meta(image_size="-8"), 3, "'image_size' must be", "out.csv"),
    "meta-image-size-bool": Case(_predict_meta(image_size="true"), 3, "'image_size' must be", "out.csv"),
    "meta-image-size-float": Case(_predict_meta(image_size="8.5"), 3, "'image_size' must be", "out.csv"),
    "meta-num-classes-zero": Case(_predict_meta(num_classes="0", classes="[]"), 3, "'num_classes' must be", "out.csv"),
    "meta-in-channels-bool": Case(_predict_meta(in_channels="true"), 3, "'in_channels' must be", "out.csv"),
    "meta-mean-too-long": Case(_predict_meta(mean="[0.1, 0.2, 0.3]"), 3, "'mean' must be 1 finite numbers",
                               "out.csv"),
    "meta-std-zero": Case(_predict_meta(std="[0]"), 3, "'std' must be 1 positive finite numbers", "out.csv"),
    "meta-std-nan": Case(_predict_meta(std="[NaN]"), 3, "'std' must be 1 positive", "out.csv"),
    "meta-mean-inf": Case(_predict_meta(mean="[Infinity]"), 3, "'mean' must be 1 finite numbers", "out.csv"),
    "meta-resize-unknown": Case(_predict_meta(config=json.dumps({"resize": "stretch"})), 3,
                                "records the resize mode 'stretch'", "out.csv"),
    "checkpoint-nan-weights": Case(lambda d, s: _predict(_nan_checkpoint(d, s), _png(d)), 3,
                                   "holds NaN or inf weights", "out.csv"),
    "checkpoint-int-weights": Case(lambda d, s: _predict(_int_checkpoint(d, s), _png(d)), 3,
                                   "wrong shape or type head.weight", "out.csv"),
    "onnx-meta-image-size-huge": Case(_onnx_meta(image_size="100000"), 3, "'image_size' must be a whole number",
                                      "out.csv"),
    "onnx-meta-std-zero": Case(_onnx_meta(std="[0]"), 3, "'std' must be 1 positive", "out.csv"),
    "onnx-meta-input-mismatch": Case(_onnx_meta(image_size="16", decode=json.dumps({"size": 16, "channels": 1})), 3,
                                     "its input is", "out.csv"),
    "onnx-without-kdfine-metadata": Case(_onnx_meta(classes=""), 3, "malformed kdfine metadata", "out.csv"),
    # issue 27: crafted --init files
    "init-empty-pt": Case(_init_file("w.pt", lambda: b""), 3, "w.pt: the file is empty", "out.safetensors"),
    "init-non-string-keys": Case(_init_file("w.pt", _mlp_state(_int_keys)), 3, "key 7 is not a name",
                                 "out.safetensors"),
    "init-meta-tensor": Case(_init_file("w.pt", _mlp_state(_meta_tensor)), 3, "is meta", "out.safetensors"),
    "init-sparse-tensor": Case(_init_file("w.pt", _mlp_state(_sparse)), 3, "is sparse_coo", "out.safetensors"),
    "init-quantized-tensor": Case(_init_file("w.pt", _mlp_state(_quantized)), 3, "is quantized", "out.safetensors"),
    "init-nan-weights": Case(_init_file("w.pt", _mlp_state(_nan_weight)), 3, "'body.1.weight' holds NaN or inf",
                             "out.safetensors"),
    "init-inf-weights": Case(_init_file("w.pt", _mlp_state(_inf_weight)), 3, "'head.bias' holds NaN or inf",
                             "out.safetensors"),
    "init-integer-weights": Case(_init_file("w.pt", _mlp_state(_int_weight)), 3, "body.1.weight holds int64, not float32",
                                 "out.safetensors"),
    "init-tv-extra-head-key": Case(_tv_extra_head_key, 3, "unexpected fc.bogus", "out.safetensors"),
    "init-not-a-state-dict": Case(_init_file("w.pt", lambda: [1, 2]), 3, "holds no state dict", "out.safetensors"),
    # issue 27: special files are refused before they are opened (a FIFO blocks the reader)
    "checkpoint-is-a-fifo": Case(_fifo("--model"), 3, "pipe.safetensors: is a FIFO (named pipe), not a regular file",
                                 "out.csv"),
    "init-is-a-fifo": Case(_fifo("--init"), 3, "pipe.safetensors: is a FIFO (named pipe), not a regular file",
                           "out.safetensors"),
    "init-is-a-directory": Case(lambda d, s: _train(s, "--init", ".", "--out", "out.safetensors"), 3,
                                "--init .: is a directory", "out.safetensors"),
    "max-pixels-not-a-number": Case(lambda d, s: _predict(s["teacher"], _png(d)), 2, "KDFINE_MAX_PIXELS=lots",
                                    "out.csv", env={"KDFINE_MAX_PIXELS": "lots"}),
}

# --debug must keep each kind of failure's exit code: a checkpoint, a feature dump, an index list, an
# OS error, a failed write during training and an empty stdin stand for the rest.
DEBUG_CASES = ["truncated-safetensors", "features-with-nan", "index-duplicate", "unreadable-path",
               "disk-full-checkpoint", "teacher-stdin-empty", "dump-json-null"]

WARNINGS: dict[str, tuple[Callable, str]] = {
    "keep-leaves-a-class-empty": (_keep("index\n" + "\n".join(str(i) for i in range(60) if i % 3 != 2) + "\n"),
                                  "kdfine: warning: --keep keep.csv leaves no sample of class 2"),
    "class-with-all-scores-equal": (_equal_scores, "kdfine: warning: class 1: all scores equal; kept whole"),
    "predict-skips-a-fifo": (_fifo_beside_an_image, "kdfine: warning: imgs/b.png: not a regular file; skipped"),
    "predict-skips-a-decompression-bomb": (_bomb_beside_an_image, "kdfine: warning: imgs/b-bomb.png: 400,000,000 "
                                           "pixels, above the limit of 120,000,000 (KDFINE_MAX_PIXELS); skipped"),
}


def snapshot(d: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() and os.access(p, os.R_OK) else None)
            for p in sorted(d.rglob("*"))}


def dev_full_sidecars() -> list[str]:
    return sorted(p.name for p in Path("/dev").glob("full.*"))


# The cases that run as a real ``python -m kdfine`` process. The rest run in this process through
# the same entry point (conftest.run_kdfine: the same parsing, exit codes, stdout and stderr).
IN_A_PROCESS = {
    "export-out-dev-stdout",  # /dev/stdout is the process's file descriptor 1
    "teacher-stdin-empty",  # stdin is a real, empty pipe
    "checkpoint-is-a-fifo", "init-is-a-fifo", "predict-skips-a-fifo",  # a regression blocks: the timeout ends it
    "truncated-safetensors", "disk-full-checkpoint", "seed-too-large",  # exit 3 on read, on write, exit 2
}


def _run_process(args: list, cwd: Path, stdin: str | None, debug: bool, env: dict) -> subprocess.CompletedProcess:
    """A process of its own (conftest.run_cli) with exactly ``env``."""
    argv = [*(["--debug"] if debug else []), *map(str, args)]
    return run_cli(*argv, input=stdin if stdin is not None else "", cwd=cwd, timeout=300, whole_env=env)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, digits_teacher) -> dict:
    with safe_open(str(digits_teacher), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    small = tmp_path_factory.mktemp("small") / "small.npz"
    rng = np.random.default_rng(0)
    np.savez(small, x=rng.integers(0, 256, (60, 8, 8, 1), dtype=np.uint8), y=np.arange(60) % 3,
             x_test=rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8), y_test=np.arange(12) % 3)
    return {"teacher": digits_teacher, "meta": meta, "tensors": tensors, "small": small}


def _jobs() -> dict[str, tuple[Callable, str | None, str | None, bool, dict | None]]:
    """Every command of this module by key (a case, ``CASE+debug``, a warning): make, out, stdin,
    debug, env."""
    jobs = {}
    for name, case in CASES.items():
        jobs[name] = (case.make, case.out, case.stdin, False, case.env)
        if name in DEBUG_CASES:
            jobs[f"{name}+debug"] = (case.make, case.out, case.stdin, True, case.env)
    jobs.update({name: (make, None, None, False, None) for name, (make, _) in WARNINGS.items()})
    return jobs


@pytest.fixture(scope="module")
def results(tmp_path_factory, shared) -> Callable[[str], tuple]:
    """``outcome(key)``: the command's result, its directory and snapshots before and after. The
    cases of IN_A_PROCESS start at once, two at a time in the background; the others run in this
    process when a test asks for them."""
    root = tmp_path_factory.mktemp("bad")
    jobs = _jobs()

    def prepare(key):
        make, out, stdin, debug, env = jobs[key]
        d = root / key
        d.mkdir()
        args = make(d, shared)
        if out:
            (d / out).write_bytes(SENTINEL)
        return args, d, snapshot(d)

    def in_a_process(key, args, d, before, env):
        make, out, stdin, debug, _ = jobs[key]
        r = _run_process(args, d, stdin, debug, env)
        return r, d, before, snapshot(d)

    pool = ThreadPoolExecutor(2)
    started: dict[str, Future] = {}
    for key in jobs:
        if key.split("+")[0] in IN_A_PROCESS:  # prepared here: the environment is read before a test changes it
            env = cli_env({"OMP_NUM_THREADS": "1", **(jobs[key][4] or {})})
            started[key] = pool.submit(in_a_process, key, *prepare(key), env)

    def outcome(key):
        if key in started:
            return started[key].result()
        args, d, before = prepare(key)
        make, out, stdin, debug, env = jobs[key]
        r = run_kdfine(*(["--debug"] if debug else []), *args, input=stdin, env=env, cwd=d)
        return r, d, before, snapshot(d)

    yield outcome
    pool.shutdown(wait=True, cancel_futures=True)
    for p in root.rglob("*"):  # let pytest clean up what a case made unreadable
        if p.exists() and not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_cleanly(results, name):
    case = CASES[name]
    r, d, before, after = results(name)
    assert r.returncode == case.code, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{r.stderr}"
    assert lines[0].startswith("kdfine: error: ") and case.message in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    assert after == before, "the command changed its directory (partial output or a touched file)"
    assert dev_full_sidecars() == [], "nothing may be written beside /dev/full"


@pytest.mark.parametrize("name", DEBUG_CASES)
def test_debug_shows_the_traceback_and_keeps_the_exit_code(results, name):
    case = CASES[name]
    r, d, before, after = results(f"{name}+debug")
    assert r.returncode == case.code, r.stderr
    assert "Traceback (most recent call last):" in r.stderr
    assert f"kdfine{os.sep}" in r.stderr  # frames inside kdfine
    assert r.stderr.splitlines()[-1].startswith("kdfine: error: ") and case.message in r.stderr.splitlines()[-1]
    assert after == before


@pytest.mark.parametrize("name", list(WARNINGS))
def test_warning_is_one_line_and_the_command_succeeds(results, name):
    r, d, before, after = results(name)
    expected = WARNINGS[name][1]
    assert r.returncode == 0, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("kdfine: warning:")]
    assert warnings == [expected], r.stderr
    assert "Traceback" not in r.stderr
    new = set(after) - set(before)
    assert new, "the command wrote its output"
    if name.startswith("predict-skips-"):  # the other image is predicted all the same
        assert (d / "out.csv").read_text().splitlines()[1].startswith("imgs/a.png,")
    if name == "class-with-all-scores-equal":
        assert r.stderr.strip() == expected  # --json: the table is not printed; the warning is all
        kept = np.loadtxt(d / "out.csv", delimiter=",", skiprows=1, usecols=(0, 1), dtype=np.int64)
        assert (kept[:, 1] == 1).sum() == N // K, "the class that cannot be split is kept whole"
        assert json.loads(r.stdout)["kept"] == kept.shape[0]
