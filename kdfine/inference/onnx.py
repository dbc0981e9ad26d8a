"""A checkpoint as a standalone model file: ONNX (run by onnxruntime) or TorchScript.

The exported graph takes float32 NCHW images in [0, 1] (RGB, or grey for 1-channel models) with a
dynamic batch axis, normalises them with the checkpoint's mean/std and returns logits (B, K). ONNX
files carry the class names as the metadata property ``classes`` (a JSON list), with ``mean``,
``std``, ``image_size``, ``in_channels``, ``num_classes``, ``arch`` and ``decode`` (how image
files become the input: :meth:`kdfine.data.decode.DecodeSpec.record`, the decoding the model was
trained with); TorchScript files carry the same as extra files (``classes.json``, ``meta.json``).
``kdfine predict --model FILE.onnx`` runs such a file without torch (:mod:`kdfine.inference.onnx_run`). Each export is run on real inputs and compared with the
checkpoint's own outputs before the file is written: no match to 1e-4, no file.
"""

from __future__ import annotations

import copy
import io
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdfine.errors import InputError, UsageError

FORMATS = ("onnx", "torchscript")
EXPORT_HINT = "pip install 'kdfine[export]'"
TOLERANCE = 1e-4


def require(fmt: str) -> None:
    """Exit 2 at once when ``fmt`` is unknown or the ONNX packages are missing."""
    if fmt not in FORMATS:
        raise UsageError(f"--format '{fmt}': expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        for module in ("onnx", "onnxruntime", "onnxscript"):
            try:
                __import__(module)
            except ImportError:
                raise UsageError(f"export --format onnx needs the {module} package, which is not installed; "
                                 f"{EXPORT_HINT}") from None


class Normalised(nn.Module):
    """``model((x - mean) / std)`` for x (B, C, H, W) in [0, 1]: the normalisation in the graph."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def sample_inputs(meta: dict[str, Any], test: Any = None, n: int = 8) -> tuple[np.ndarray, str]:
    """Up to ``n`` images of ``test`` (the checkpoint's recorded test split, an ArrayDataset, or
    None when that data cannot be loaded here) as float32 NCHW in [0, 1], and where they came
    from; seeded uniform noise without them."""
    c, s = int(meta["in_channels"]), int(meta["image_size"])
    if test is not None and len(test) and test.images.shape[1:] == (s, s, c):
        x = test.images[:n].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        return np.ascontiguousarray(x), f"{len(x)} test images of {test.spec}"
    return np.random.default_rng(0).random((n, c, s, s), dtype=np.float32), f"{n} random images"


def _metadata(meta: dict[str, Any]) -> dict[str, str]:
    """The metadata properties of an export: what ``predict --model FILE.onnx`` (and anyone who
    runs the file) needs: class names, input shape, normalisation and how to decode image files."""
    import kdfine
    from kdfine.inference.predict import spec_for

    out = {"classes": json.dumps(list(meta["classes"])), "mean": json.dumps(list(meta["mean"])),
           "std": json.dumps(list(meta["std"])), "image_size": str(meta["image_size"]),
           "in_channels": str(meta["in_channels"]), "num_classes": str(meta["num_classes"]), "arch": str(meta["arch"]),
           "input": "float32 NCHW in [0, 1], normalised inside", "kdfine_version": kdfine.__version__}
    try:
        out["decode"] = json.dumps(spec_for(meta).record())
    except InputError:  # a model of 2 or 4+ channels (npz data): no image file decodes to its input
        pass
    return out


def _compare(got: np.ndarray, want: np.ndarray, fmt: str) -> None:
    if got.shape != want.shape or not np.allclose(got, want, rtol=TOLERANCE, atol=TOLERANCE):
        diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("nan")
        raise InputError(f"export: the {fmt} model's outputs differ from the checkpoint's by up to {diff:.2e} "
                         f"(tolerance {TOLERANCE:g}); nothing written")


def out_of_place(net: nn.Module) -> nn.Module:
    """A copy of ``net`` whose activations return new tensors instead of overwriting their input
    (``inplace=False``; the same values). Under a dynamic batch axis the exporter decomposes an
    in-place activation (torchvision's ``Hardswish(inplace=True)``) into symbolic clamps, which
    took half of a MobileNet's export time, for the same ONNX graph."""
    net = copy.deepcopy(net)
    for m in net.modules():
        if getattr(m, "inplace", None) is True:
            m.inplace = False
    return net


def to_onnx(net: Normalised, x: np.ndarray, meta: dict[str, Any], opset: int | None) -> bytes:
    """The ONNX file of ``net`` (dynamic batch axis), checked with onnxruntime on ``x`` and on
    its first 3 rows (another batch size) against torch's outputs."""
    import onnx
    import onnxruntime as ort

    net = out_of_place(net)
    example = torch.from_numpy(x[:2])
    batch = torch.export.Dim("batch", min=1)
    with tempfile.TemporaryDirectory(prefix="kdfine-export-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model.onnx"
        try:
            program = torch.onnx.export(net, (example,), dynamo=True, input_names=["images"],
                                        output_names=["logits"], dynamic_shapes={"x": {0: batch}},
                                        opset_version=opset, verbose=False)
            program.save(str(path))
        except Exception as e:
            raise InputError(f"export: torch could not export {meta['arch']} to ONNX "
                             f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
        model = onnx.load(str(path))
    for k, v in _metadata(meta).items():
        prop = model.metadata_props.add()
        prop.key, prop.value = k, v
    data = model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for rows in (x, x[:3]):
            want = net(torch.from_numpy(rows)).numpy()
            _compare(session.run(["logits"], {"images": rows})[0], want, "ONNX")
    return data


def to_torchscript(net: Normalised, x: np.ndarray, meta: dict[str, Any]) -> bytes:
    """The traced TorchScript file of ``net``, loaded back and checked on ``x`` and its first 3 rows."""
    extra = {"classes.json": json.dumps(list(meta["classes"])), "meta.json": json.dumps(_metadata(meta))}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(net, torch.from_numpy(x[:2]), check_trace=False)
        except Exception as e:
            raise InputError(f"export: torch could not trace {meta['arch']} ({str(e).splitlines()[0][:200]})") from None
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files=extra)
        loaded = torch.jit.load(io.BytesIO(buf.getvalue()), map_location="cpu")
        for rows in (x, x[:3]):
            _compare(loaded(torch.from_numpy(rows)).numpy(), net(torch.from_numpy(rows)).numpy(), "TorchScript")
    return buf.getvalue()


def export(ckpt: Any, fmt: str = "onnx", opset: int | None = None, test: Any = None) -> tuple[bytes, str]:
    """The bytes of ``ckpt`` (a loaded :class:`kdfine.models.checkpoint.Checkpoint`) in ``fmt``, checked
    on images of ``test`` (see :func:`sample_inputs`), and a note on what it was checked with."""
    require(fmt)
    net = Normalised(ckpt.model.float().cpu().eval(), ckpt.meta["mean"], ckpt.meta["std"]).eval()
    x, where = sample_inputs(ckpt.meta, test)
    data = to_onnx(net, x, ckpt.meta, opset) if fmt == "onnx" else to_torchscript(net, x, ckpt.meta)
    return data, where
