"""Suggested labels, --labels-out and the review page (detect-noise --review), the page driven in a
real headless Chromium from file:// (tests/browser.py): its suspects and labels, a decision by key
and one by click, the downloads fed back to train-teacher, and no request leaving the page."""

from __future__ import annotations

import csv
import http.server
import io
import json
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from browser import Browser, chromium
from conftest import read_json, run_kdfine, write_png_tree

from kdfine.data.noise import apply_noise
from kdfine.data.sources import load_source
from kdfine.detect.dump import write_dump
from kdfine.detect.suggest import relabel


def rows_of(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    text = path.read_text(encoding="utf-8")
    return text.splitlines()[0].split(","), list(csv.DictReader(io.StringIO(text)))


def page_data(page: Path) -> dict:
    """The JSON the review page embeds (what its script reads)."""
    m = re.search(r'<script type="application/json" id="review-data">(.*?)</script>', page.read_text(), re.S)
    return json.loads(m[1])


@pytest.fixture(scope="module")
def digits_dump(tmp_path_factory) -> Path:
    """A dump of the digits training split made without training: the pixels as features, 25%
    symmetric noise, and the logits of a nearest-centroid classifier fitted to the noisy labels."""
    train = load_source("digits").train
    x = train.images.reshape(len(train), -1).astype(np.float32) / 255
    noisy = apply_noise(train.labels, "sym:0.25", 10, seed=0)
    centroids = np.stack([x[noisy == c].mean(0) for c in range(10)])
    logits = -((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    path = tmp_path_factory.mktemp("digits-dump") / "f.npy"
    write_dump(path, x, logits, noisy, {"data": "digits", "split": "train", "num_classes": 10,
                                        "classes": train.classes, "label_noise": "sym:0.25", "test_fraction": 0.2},
               train.labels)
    return path


@pytest.fixture(scope="module")
def detected(digits_dump, tmp_path_factory):
    """detect-noise with every output of this issue, run once."""
    d = tmp_path_factory.mktemp("review")
    r = run_kdfine("detect-noise", "-f", digits_dump, "--out", d / "clean.csv", "--noisy-out", d / "noisy.csv",
                   "--labels-out", d / "labels.csv", "--review", d / "review.html", "--json")
    assert r.returncode == 0, r.stderr
    return d, read_json(r.stdout)


def test_csvs_carry_suggestions_and_class_names(detected, digits_dump):
    d, doc = detected
    y, truth = np.load(str(digits_dump)[:-4] + ".labels.npy"), np.load(str(digits_dump)[:-4] + ".truth.npy")
    header, noisy = rows_of(d / "noisy.csv")
    assert header == ["index", "label", "score", "p_clean", "suggested", "suggested_p", "class", "suggested_class"]
    assert rows_of(d / "clean.csv")[0] == header
    for r in noisy:  # a rejected sample's suggestion is another class, with its probability
        assert int(r["suggested"]) != int(r["label"]) and 0 < float(r["suggested_p"]) <= 1
        assert r["class"] == r["label"] and r["suggested_class"] == r["suggested"]  # digits: names are digits
    rejected = np.zeros(y.size, bool)
    rejected[[int(r["index"]) for r in noisy]] = True
    sugg = np.array([int(r["suggested"]) for r in noisy])
    assert doc["suggest"]["top1_rejected"] == pytest.approx((sugg == truth[rejected]).mean())
    assert [c["name"] for c in doc["classes"]] == [str(c) for c in range(10)]
    # --labels-out: every sample; the suggestion where rejected and likely enough, the given label elsewhere
    _, labels = rows_of(d / "labels.csv")
    assert [int(r["index"]) for r in labels] == list(range(y.size))
    p = np.zeros(y.size)
    s = y.copy()
    for r in noisy:
        p[int(r["index"])], s[int(r["index"])] = float(r["suggested_p"]), int(r["suggested"])
    want = relabel(y, rejected, s, p, 0.5)
    np.testing.assert_array_equal([int(r["label"]) for r in labels], want)
    assert doc["suggest"]["relabelled"] == int((want != y).sum()) > 0
    assert doc["suggest"]["labels_right_after"] > doc["suggest"]["labels_right_before"]  # relabelling helps here
    r = run_kdfine("detect-noise", "-f", digits_dump, "--out", d / "c2.csv", "--labels-out", d / "l2.csv",
                   "--relabel-min-p", "1", "-q")
    assert r.returncode == 0, r.stderr
    assert [int(x["label"]) for x in rows_of(d / "l2.csv")[1]] == y.tolist()  # nothing is that sure
    r = run_kdfine("detect-noise", "-f", digits_dump, "--out", d / "c2.csv", "--labels-out", "-", "-q")
    assert r.returncode == 0 and r.stdout == (d / "labels.csv").read_text()  # stdout takes it too
    r = run_kdfine("detect-noise", "-f", digits_dump, "--out", "-", "--labels-out", "-")
    assert r.returncode == 2 and r.stdout == "" and "both want stdout" in r.stderr


def test_the_review_page_embeds_the_suspects_most_likely_wrong_first(detected):
    d, _ = detected
    data = page_data(d / "review.html")
    _, noisy = rows_of(d / "noisy.csv")
    by_index = {int(r["index"]): r for r in noisy}
    s = data["suspects"]
    assert sorted(s["index"]) == sorted(by_index)
    keys = [(round(float(by_index[i]["p_clean"]), 3), float(by_index[i]["score"]), i) for i in s["index"]]
    assert keys == sorted(keys)
    assert all(t.startswith("data:image/png;base64,") for t in s["thumb"])
    assert len(data["labels"]) == 1438 and data["classes"] == [str(c) for c in range(10)]
    html = (d / "review.html").read_text()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html)[1]
    assert "default-src 'none'" in csp and "connect-src 'none'" in csp and "unsafe-inline" not in csp
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", html)  # nothing to fetch


class _Sink(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        self.hits.append(self.path)
        self.send_response(204)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def browser():
    if chromium() is None:
        pytest.fail("chromium is missing: `make test` installs it (Debian: apt-get install chromium)")
    with Browser() as b:
        for domain in ("Network.enable", "Page.enable", "Runtime.enable"):
            b.page(domain)
        yield b


def _left_the_page(b: Browser, page: Path) -> list[str]:
    """URLs the page requested other than itself, data: and blob: (its images and downloads)."""
    urls = [p["request"]["url"] for m, p in b.events if m == "Network.requestWillBeSent"]
    return [u for u in urls if not (u == page.as_uri() or u.startswith(("data:", "blob:")))]


def test_review_in_a_browser_then_retrain_on_the_decisions(detected, browser, tmp_path):
    d, _ = detected
    page, b = d / "review.html", browser
    data = page_data(page)
    s = data["suspects"]
    b.open(page.as_uri())
    cards = b.eval("[...document.querySelectorAll('[data-index]')].map(e => [+e.dataset.index,"
                   " e.querySelector('.given').textContent, e.querySelector('.suggested').textContent])")
    assert len(cards) == min(48, len(s["index"]))  # one page of cards, most likely wrong first
    assert cards == [[i, str(g), str(sg)] for i, g, sg in zip(s["index"], s["label"], s["suggested"])][:len(cards)]
    assert str(len(s["index"])) in b.eval("document.getElementById('facts').textContent")
    first, second = s["index"][0], s["index"][1]
    b.key("r")  # the first suspect has the cursor: relabel it to the suggestion; the cursor moves on
    b.click(f'[data-index="{second}"] button.act-drop')  # the second: dropped with the mouse
    b.key("3")  # the cursor is on the third now: relabel it to class 3 ...
    third = s["index"][2]
    b.click(f'[data-index="{third}"] .idx')
    b.key("u")  # ... and undo that
    state = b.eval("[...window.kdfineReview.decisions.entries()]")
    assert state == [[0, {"kind": "relabel", "label": s["suggested"][0]}], [1, {"kind": "drop", "label": s["label"][1]}]]
    b.downloads_to(tmp_path)
    labels_csv = b.download("#dl-labels", tmp_path)
    keep_csv = b.download("#dl-keep", tmp_path)
    assert _left_the_page(b, page) == []
    # undecided suspects are dropped (the default); the relabelled one is kept with its new label
    y = data["labels"]
    _, labels = rows_of(labels_csv)
    assert len(labels) == len(y) and int(labels[first]["label"]) == s["suggested"][0]
    assert all(int(r["label"]) == y[int(r["index"])] for r in labels if int(r["index"]) != first)
    kept = [int(r["index"]) for r in rows_of(keep_csv)[1]]
    assert kept == sorted(set(range(len(y))) - set(s["index"]) | {first})
    r = run_kdfine("train-teacher", "--labels", labels_csv, "--keep", keep_csv, "--epochs", "1", "--out",
                   tmp_path / "t.safetensors")
    assert r.returncode == 0, r.stderr
    assert f"{len(kept)} kept by --keep" in r.stderr


def test_decisions_survive_a_reload_and_no_request_can_leave(detected, browser):
    d, b = detected[0], browser
    page = d / "review.html"
    b.open(page.as_uri())
    b.key("d")
    b.open(page.as_uri())
    assert b.eval("window.kdfineReview.decisions.size") == 1
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/x"
    try:  # the policy blocks what a script (an injected one, say) would try
        b.eval(f"fetch('{url}').catch(() => 0)")
        b.eval(f"(() => {{ const i = new Image(); i.src = '{url}'; document.body.appendChild(i); "
               f"navigator.sendBeacon && navigator.sendBeacon('{url}'); }})()")
        b.eval("new Promise(r => setTimeout(r, 300))")
    finally:
        server.shutdown()
    assert _Sink.hits == []


def test_ten_thousand_suspects_render_one_page(tmp_path, browser):
    """Only the visible page is in the document, whatever the number of suspects."""
    from kdfine.inference.review import PAGE_SIZE, Review, page_html

    rng = np.random.default_rng(0)
    n, k = 12_000, 10
    y = rng.integers(0, k, n)
    rejected = np.zeros(n, bool)
    rejected[rng.permutation(n)[:10_000]] = True
    sugg = (y + rng.integers(1, k, n)) % k
    review = Review(y, sugg, rng.random(n), rng.random(n), rng.random(n) * 0.4, rejected,
                    [f"class {c}" for c in range(k)], None, {}, "gmm", "logits", 0.5, "synthetic")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no data behind it: no thumbnails
        page = tmp_path / "big.html"
        page.write_text(page_html(review), encoding="utf-8")
    b = browser
    b.open(page.as_uri())
    count = "document.querySelectorAll('[data-index]').length"
    assert b.eval(count) == PAGE_SIZE
    b.key("n")
    assert b.eval(count) == PAGE_SIZE and "page 2 of" in b.eval("document.getElementById('page-of').textContent")
    pair = (y[rejected] == 2) & (sugg[rejected] == 5)
    b.click('#confusion td[data-pair="2>5"]')
    assert b.eval(count) == min(PAGE_SIZE, int(pair.sum()))
    assert "class 2 (2)" in b.eval("document.querySelector('[data-index] .given').textContent")


def test_review_and_labels_out_stay_torch_free(digits_dump, tmp_path):
    code = ("import sys; from kdfine.cli import main\n"
            f"sys.argv = ['kdfine', 'detect-noise', '-f', {str(digits_dump)!r}, '--out', {str(tmp_path / 'c.csv')!r},"
            f" '--labels-out', {str(tmp_path / 'l.csv')!r}, '--review', {str(tmp_path / 'r.html')!r}, '-q']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r.html").stat().st_size > 0 and (tmp_path / "l.csv").exists()


def test_image_folder_rows_carry_their_files(tmp_path):
    """eval --dump-features records each row's file; the CSVs name it; the page shows it, decoded
    upright at thumbnail size by the training decoder."""
    from PIL import Image

    from kdfine.data.cache import DecodeSpec, decode_image
    from kdfine.data.thumbnails import SIZE, thumbnails

    root = write_png_tree(tmp_path / "tree", classes=("cat", "dog,fox", "=emu"), per_class=8, size=16)
    sideways = np.zeros((16, 24, 3), np.uint8)
    sideways[:, :10] = 255  # a white bar on the left, which EXIF orientation 6 turns to the top
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(sideways).save(root / "train" / "cat" / "zz rotated.jpg", exif=exif, quality=95)
    ck, dump = tmp_path / "t.safetensors", tmp_path / "f.npy"
    for args in (("train-teacher", "--data", f"imagefolder:{root}", "--epochs", "1", "--image-size", "16",
                  "--out", ck, "-q"),
                 ("eval", "--model", ck, "--split", "train", "--dump-features", dump, "-q")):
        r = run_kdfine(*args)
        assert r.returncode == 0, r.stderr
    info = json.loads(dump.with_suffix(".json").read_text())
    assert info["root"] == str(root.resolve()) and info["paths"][0] == "train/=emu/000.png"
    assert "train/cat/zz rotated.jpg" in info["paths"] and len(info["paths"]) == info["n"] == 25
    r = run_kdfine("detect-noise", "-f", dump, "--zeta", "0.99", "--out", tmp_path / "c.csv",
                   "--noisy-out", tmp_path / "n.csv", "--review", tmp_path / "r.html")
    assert r.returncode == 0, r.stderr
    assert "dog,fox" in r.stderr  # the report names the classes
    header, rows = rows_of(tmp_path / "n.csv")
    assert header[-3:] == ["class", "suggested_class", "path"] and rows
    names = {"cat": "cat", "dog,fox": "dog,fox", "=emu": "'=emu"}  # a formula is neutralised for spreadsheets
    for row in rows:
        assert row["path"] == info["paths"][int(row["index"])] and row["class"] == names[row["path"].split("/")[1]]
    s = page_data(tmp_path / "r.html")["suspects"]
    assert s["path"] == [info["paths"][i] for i in s["index"]] and all(s["thumb"])
    at = info["paths"].index("train/cat/zz rotated.jpg")
    (thumb,) = thumbnails(info, np.array([at]))
    np.testing.assert_array_equal(thumb, decode_image(root / "train/cat/zz rotated.jpg", DecodeSpec(SIZE, 3))[0])
    assert thumb[:20].mean() > 200 and thumb[-30:].mean() < 60  # upright: the bar is on top
    # clean: the same outputs in one step, and an exported tree that keeps the files' names
    r = run_kdfine("clean", "--model", ck, "--zeta", "0.99", "--out", tmp_path / "c3.csv", "--labels-out",
                   tmp_path / "l3.csv", "--review", tmp_path / "r3.html", "--export-dir", tmp_path / "out", "--json")
    assert r.returncode == 0, r.stderr
    assert len(rows_of(tmp_path / "l3.csv")[1]) == 25 and page_data(tmp_path / "r3.html")["suspects"]["path"]
    kept = [info["paths"][int(x["index"])] for x in rows_of(tmp_path / "c3.csv")[1]]
    exported = sorted(p.name for p in (tmp_path / "out" / "train").rglob("*") if p.is_file())
    assert exported == sorted(Path(p).name for p in kept)
