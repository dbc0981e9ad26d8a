"""``eval``'s work: each checkpoint's logits over a split, its metrics (teacher agreement with
teachers), and the feature dump of the first one, staged in the command's outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from kdfine import features, metrics
from kdfine.data.noise import parse_noise
from kdfine.data.prepare import Prepared
from kdfine.data.sources import ArrayDataset, row_sources
from kdfine.detect import dump as dumps
from kdfine.files.outputs import Outputs
from kdfine.models.checkpoint import Checkpoint
from kdfine.runtime import distributed
from kdfine.runtime.device import use_channels_last


def evaluate_models(loaded: Sequence[Checkpoint], tloaded: Sequence[Checkpoint], prepared: Prepared,
                    ds: ArrayDataset, split: str, ctx: distributed.Context, *, batch_size: int, precision: str,
                    dump_features: str | None, outputs: Outputs,
                    on_logits: Callable[[Checkpoint, np.ndarray, ArrayDataset], None] | None = None) -> list[dict]:
    """One result per model (:func:`model_result`); the first model's dump staged in ``outputs``
    when ``dump_features``; ``on_logits(ckpt, logits (N, K), ds)`` on rank 0 for each model."""
    run = forward(ds, ctx, batch_size, precision)
    teacher_logits = np.mean([run(t, False)[1] for t in tloaded], axis=0) if tloaded else None
    results = []
    for i, ck in enumerate(loaded):
        f, z = run(ck, bool(dump_features) and i == 0)
        r = model_result(ck, z, ds, prepared, split, teacher_logits, tloaded)
        if on_logits is not None and ctx.is_main:
            on_logits(ck, z, ds)
        if f is not None:
            distributed.main_only(dumps.write_dump, dump_features, f, z, ds.labels,
                                  dump_info(ck, prepared, ds, split, f),
                                  prepared.truth if split == "train" else None, outputs=outputs)
            r["dump"] = dump_features
        results.append(r)
    return results


def forward(ds: ArrayDataset, ctx: distributed.Context, batch_size: int, precision: str) -> Callable:
    """``run(ckpt, want_features) -> (features or None, logits)`` of a checkpoint over ``ds``."""

    def run(ck: Checkpoint, want_features: bool):
        ck.model.to(ctx.device)
        f, z = features.extract(ck.model, ds.images, ck.meta["mean"], ck.meta["std"], device=ctx.device,
                                batch_size=batch_size, precision=precision, features=want_features,
                                channels_last=use_channels_last("auto", ctx.device))
        ck.model.to("cpu")
        return f, z

    return run


def model_result(ck: Checkpoint, z: np.ndarray, ds: ArrayDataset, prepared: Prepared, split: str,
                 teacher_logits: np.ndarray | None, tloaded: Sequence[Checkpoint]) -> dict[str, Any]:
    r: dict[str, Any] = {"model": ck.path, "arch": ck.arch, "stage": ck.meta.get("stage"),
                         "parents": ck.meta.get("parents", []), **metrics.classification(z, ds.labels)}
    if split == "train" and prepared.truth is not None:
        r["top1_true_labels"] = metrics.topk_accuracy(z, prepared.truth, 1)
    if teacher_logits is not None:
        r.update(metrics.teacher_agreement(z, teacher_logits))
        r["teachers"] = [t.path for t in tloaded]
    return r


def dump_info(ck: Checkpoint, prepared: Prepared, ds: ArrayDataset, split: str, f: np.ndarray) -> dict[str, Any]:
    """The dump's json: which checkpoint, data, split and noise made it, and where each row's image
    is (:func:`kdfine.data.sources.row_sources`: the review page's thumbnails, the CSVs' paths)."""
    opts = prepared.options
    return {"checkpoint": str(Path(ck.path).resolve()), "checkpoint_sha256": ck.sha256,
            "data": opts.data, "split": split, "label_noise": str(parse_noise(opts.label_noise)),
            "noise_seed": opts.noise_seed, "num_classes": ds.num_classes, "classes": ds.classes,
            "n": len(ds), "dim": int(f.shape[1]),
            **row_sources(ds, opts.data, test_fraction=opts.test_fraction, resize=opts.resize,
                          data_root=opts.data_root)}
