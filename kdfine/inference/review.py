"""The review page of ``detect-noise --review`` (and ``clean --review``): one self-contained HTML file.

The suspects (the rejected samples), most likely wrong first (lowest ``p_clean``, then lowest
score: :func:`suspects_order`), each with its thumbnail (:mod:`kdfine.data.thumbnails`, inlined as a ``data:`` URI), dataset
index, source path, given and suggested label, the suggestion's probability, score and ``p_clean``.
The page itself (``review_page/``: HTML, CSS and JavaScript, no library) filters, pages, takes the
reviewer's decisions by keyboard and mouse, and downloads them as ``labels.csv`` (``index,label`` for
every sample: ``train-teacher --labels``) and ``keep.csv`` (``index,label`` of the samples to train
on: ``train-teacher --keep``).

The file opens from disk and asks for nothing: its Content-Security-Policy allows only the page's
own inline script and style (by hash) and ``data:`` images, so no request can leave it, and
the data (class names and file paths come from users) is JSON read with ``JSON.parse`` and shown as
text, never as HTML. Torch-free.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

PAGE_SIZE = 48  # cards per page: a page renders in milliseconds whatever the number of suspects


@dataclass
class Review:
    """What the page shows. labels (N,) the given labels; suggested, suggested_p, scores, p_clean
    (N,); rejected (N,) bool; classes: K names; paths: each row's source file (image folders) or
    None; info: the dump's json (data spec, split); method and evidence: what detected and what
    suggested; min_p: ``--relabel-min-p``; title: the page's heading."""

    labels: np.ndarray
    suggested: np.ndarray
    suggested_p: np.ndarray
    scores: np.ndarray
    p_clean: np.ndarray
    rejected: np.ndarray
    classes: list[str]
    paths: list[str] | None
    info: dict[str, Any]
    method: str
    evidence: str
    min_p: float
    title: str


def suspects_order(review: Review) -> np.ndarray:
    """Indices of the rejected samples, most likely wrong first: by ``p_clean`` to three decimals
    (finer differences of a posterior near 0 mean nothing), then by score, then by index."""
    idx = np.flatnonzero(review.rejected)
    return idx[np.lexsort((idx, review.scores[idx], np.round(review.p_clean[idx], 3)))]


def page_html(review: Review, stem: str = "review") -> str:
    """The review page as one HTML document; ``stem`` names its downloads (``stem.labels.csv``)."""
    from kdfine.data.thumbnails import thumbnails

    from kdfine.data.cache import decode_workers

    order = suspects_order(review)
    with ThreadPoolExecutor(decode_workers()) as pool:  # the encoders release the GIL
        thumbs = list(pool.map(data_uri, thumbnails(review.info, order)))
    doc = _document(review, order, thumbs, stem)
    return render(doc, review.title)


def _document(review: Review, order: np.ndarray, thumbs: list[str], stem: str) -> dict[str, Any]:
    """The JSON the page's script reads (columns of the suspects, in display order)."""
    as_list = lambda a: np.round(np.nan_to_num(np.asarray(a, np.float64)), 4).tolist()
    suspects = {"index": order.tolist(), "label": review.labels[order].tolist(),
                "suggested": review.suggested[order].tolist(), "p": as_list(review.suggested_p[order]),
                "score": as_list(review.scores[order]), "p_clean": as_list(review.p_clean[order]),
                "path": [review.paths[i] for i in order.tolist()] if review.paths is not None else None,
                "thumb": thumbs}
    body = {"labels": review.labels.tolist(), "suspects": suspects}
    page_id = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return {"title": review.title, "data": str(review.info.get("data") or "unknown data"),
            "split": str(review.info.get("split") or "train"), "method": review.method, "evidence": review.evidence,
            "classes": list(review.classes), "min_p": review.min_p, "policy": "drop", "page_size": PAGE_SIZE,
            "stem": stem, "id": page_id, **body}


def data_uri(thumb: np.ndarray | None) -> str:
    """A thumbnail (h, w, C) uint8 as a ``data:`` URI: PNG for grey or enlarged images (exact
    pixels), JPEG for colour photos (a tenth of the size); "" for None."""
    if thumb is None:
        return ""
    from PIL import Image

    grey = thumb.shape[2] == 1
    im = Image.fromarray(thumb[..., 0] if grey else thumb)
    buf = io.BytesIO()
    if grey or max(thumb.shape[:2]) <= 64:
        im.save(buf, "PNG")  # (optimize=True: 10x the time for 0-3% smaller files)
        kind = "png"
    else:
        im.save(buf, "JPEG", quality=88)
        kind = "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _asset(name: str) -> str:
    return (resources.files("kdfine.inference") / "review_page" / name).read_text(encoding="utf-8")


def _sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def csp(script: str, style: str) -> str:
    """A policy that lets the page run its own script and style (by hash) and show ``data:`` and
    ``blob:`` images, and nothing else: no request leaves the page, no other script runs."""
    return (f"default-src 'none'; script-src {_sha(script)}; style-src {_sha(style)}; img-src data: blob:; "
            "connect-src 'none'; font-src 'none'; media-src 'none'; object-src 'none'; frame-src 'none'; "
            "worker-src 'none'; manifest-src 'none'; form-action 'none'; base-uri 'none'")


def render(doc: dict[str, Any], title: str) -> str:
    """The page: the template with its style, script, policy and the JSON ``doc`` filled in."""
    script, style = _asset("page.js"), _asset("page.css")
    # JSON inside <script>: "<" escaped so that no value can close the element or open a comment
    data = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    parts = {"CSP": html.escape(csp(script, style), quote=False), "TITLE": html.escape(title), "STYLE": style,
             "SCRIPT": script, "DATA": data}
    # one pass over the template: a value that contains a placeholder is never substituted again
    return re.sub(r"\{\{(CSP|TITLE|STYLE|SCRIPT|DATA)\}\}", lambda m: parts[m.group(1)], _asset("page.html"))


def stem_of(path: str | Path) -> str:
    """The downloads' name stem: the page's file name without ``.html``."""
    name = Path(path).name
    return name[:-5] if name.lower().endswith(".html") else (Path(name).stem or "review")
