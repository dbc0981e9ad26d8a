"""An exported ONNX model run by onnxruntime, without torch: ``kdfine predict --model FILE.onnx``.

The file is what ``kdfine export`` wrote: input ``images`` float32 (N, C, S, S) in [0, 1], output
``logits`` (N, K), and metadata properties naming the classes, the normalisation (applied inside
the graph) and the decoding of image files (``decode``, see
:meth:`kdfine.data.decode.DecodeSpec.record`). The metadata is checked like a checkpoint's
(:func:`kdfine.models.meta.check_model_meta`) and against the graph's input shape.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdfine.data.decode import RESIZE_MODES, DecodeSpec
from kdfine.errors import DeviceError, InputError, KdfineWarning, UsageError
from kdfine.files.inputs import regular_file
from kdfine.models.meta import check_model_meta

EXPORT_HINT = "pip install 'kdfine[export]'"


@dataclass
class OnnxModel:
    """A loaded ONNX file: its session, validated metadata, class names and decoding."""

    path: str
    session: Any
    meta: dict[str, Any]
    spec: DecodeSpec
    batch_size: int = 256

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Logits (N, K) float32 of uint8 images (N, S, S, C), run ``batch_size`` at a time."""
        out = []
        for lo in range(0, len(images), self.batch_size):
            x = images[lo:lo + self.batch_size].astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
            out.append(self.session.run(["logits"], {"images": np.ascontiguousarray(x)})[0])
        return np.concatenate(out) if out else np.zeros((0, len(self.meta["classes"])), np.float32)


def _providers(device: str) -> list[str]:
    """onnxruntime's execution providers for ``--device``: the CPU's, or CUDA's when asked for
    (``cuda``, ``cuda:N``) or available (``auto``)."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    opt = device.strip().lower()
    if opt in ("cpu", "mps"):  # onnxruntime has no MPS provider: the CPU runs it
        return ["CPUExecutionProvider"]
    if opt.startswith("cuda"):
        if "CUDAExecutionProvider" not in have:
            raise DeviceError(f"--device {device}: onnxruntime here has no CUDA provider (install "
                              "onnxruntime-gpu), or use --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if opt != "auto":
        raise UsageError(f"--device {device}: expected auto, cpu, cuda, cuda:N or mps")
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def read_meta(props: dict[str, str], input_shape: list[Any], where: str) -> dict[str, Any]:
    """The kdfine metadata of an ONNX file's properties, decoded and checked (ValueError)."""
    if "classes" not in props or "image_size" not in props or "mean" not in props:
        raise ValueError("no kdfine metadata (classes, image_size, mean, std); export it with kdfine export")
    meta: dict[str, Any] = {k: json.loads(props[k]) for k in ("classes", "mean", "std", "image_size")}
    meta["in_channels"] = json.loads(props["in_channels"]) if "in_channels" in props else len(meta["mean"])
    meta["num_classes"] = json.loads(props["num_classes"]) if "num_classes" in props else len(meta["classes"])
    check_model_meta(meta)
    c, s = meta["in_channels"], meta["image_size"]
    if len(input_shape) != 4 or list(input_shape[1:]) != [c, s, s]:
        raise ValueError(f"its input is {input_shape}, its metadata says (N, {c}, {s}, {s})")
    if "decode" in props:
        meta["decode"] = json.loads(props["decode"])
    else:
        warnings.warn(f"{where}: no decoding recorded (an older export); images are decoded with --resize crop",
                      KdfineWarning, stacklevel=3)
        meta["decode"] = {"size": s, "channels": c, "resize": "crop"}
    return meta


def load_onnx(path: str, device: str = "auto", batch_size: int = 256, what: str = "--model") -> OnnxModel:
    """The ONNX file at ``path`` ready to run; exit 2 without onnxruntime, 3 for a file that is
    not a kdfine export or whose metadata is out of bounds, 4 for a device onnxruntime lacks."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError(f"predict --model FILE.onnx needs the onnxruntime package; {EXPORT_HINT}") from None
    p = regular_file(path, what, "an ONNX file written by kdfine export")
    providers = _providers(device)
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # onnxruntime's own warnings are not the user's business
        session = ort.InferenceSession(str(p), options, providers=providers)
    except Exception as e:
        raise InputError(f"{what} {p}: not a readable ONNX model ({str(e).splitlines()[0][:160]})") from None
    props = dict(session.get_modelmeta().custom_metadata_map)
    try:
        meta = read_meta(props, session.get_inputs()[0].shape, f"{what} {p}")
        spec = DecodeSpec.from_record(meta["decode"])
        if (spec.size, spec.channels) != (meta["image_size"], meta["in_channels"]) or spec.resize not in RESIZE_MODES:
            raise ValueError(f"its decoding {str(meta['decode'])[:80]} does not match its input")
        if spec.channels not in (1, 3):
            raise ValueError(f"it takes {spec.channels}-channel input; image files decode to 1 or 3 channels")
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(f"{what} {p}: malformed kdfine metadata ({str(e)[:200]})") from None
    if [o.name for o in session.get_outputs()] != ["logits"] or session.get_inputs()[0].name != "images":
        raise InputError(f"{what} {p}: expected an input 'images' and an output 'logits' (a kdfine export)")
    return OnnxModel(str(p), session, meta, spec, batch_size)
