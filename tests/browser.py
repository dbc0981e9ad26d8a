"""A headless Chromium driven over the Chrome DevTools Protocol, standard library only.

``--remote-debugging-pipe`` makes the browser read commands on its file descriptor 3 and write
replies and events on 4, each a JSON message ended by a NUL byte: no port, no websocket. Used by
tests/test_review.py and scripts/review_screenshot.py; Debian's ``chromium`` package (``make test``
installs it).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def chromium() -> str | None:
    """The Chromium executable, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(RuntimeError):
    pass


class Browser:
    """One headless browser with one page (a flattened session); ``events`` holds every event
    received, ``(method, params)``."""

    def __init__(self, exe: str | None = None, width: int = 1280, height: int = 900):
        exe = exe or chromium()
        if exe is None:
            raise CDPError("no chromium on PATH (Debian: apt-get install chromium)")
        self.profile = tempfile.mkdtemp(prefix="kdfine-chromium-")
        to_browser_r, self._w = os.pipe()
        self._r, from_browser_w = os.pipe()

        def pipes_as_3_and_4():  # in the child: the protocol's descriptors, inherited by the browser
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w)]  # free 3 and 4
            for fd, target in zip(high, (3, 4)):
                os.dup2(fd, target)
                os.set_inheritable(target, True)

        args = [exe, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                f"--user-data-dir={self.profile}", "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--disable-default-apps", "--mute-audio", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, close_fds=False, preexec_fn=pipes_as_3_and_4)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._replies: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self._next = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    # ---------------------------------------------------------------------------------- protocol
    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._r, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    q = self._replies.get(msg["id"])
                    if q is not None:
                        q.put(msg)
                else:
                    self.events.append((msg.get("method", ""), msg.get("params", {})))

    def call(self, method: str, session: bool = False, timeout: float = 30, **params: Any) -> dict[str, Any]:
        """Send ``method`` (to the page's session when ``session``) and return its result."""
        with self._lock:
            self._next += 1
            mid = self._next
            self._replies[mid] = queue.Queue()
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        try:
            reply = self._replies[mid].get(timeout=timeout)
        except queue.Empty:
            raise CDPError(f"{method}: no reply within {timeout} s") from None
        finally:
            self._replies.pop(mid, None)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.call(method, session=True, **params)

    def wait_event(self, method: str, timeout: float = 30, start: int = 0, **match: Any) -> dict[str, Any]:
        """The first event ``method`` (after ``events[start]``) whose params include ``match``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, params in self.events[start:]:
                if name == method and all(params.get(k) == v for k, v in match.items()):
                    return params
            time.sleep(0.02)
        raise CDPError(f"no {method} {match or ''} within {timeout} s")

    # ---------------------------------------------------------------------------------- actions
    def open(self, url: str, timeout: float = 30) -> None:
        """Navigate to ``url`` and wait for its load event."""
        start = len(self.events)
        self.page("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired", timeout, start)

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        r = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise CDPError(f"{expression[:60]}: {r['exceptionDetails'].get('exception', {}).get('description')}")
        return r["result"].get("value")

    def key(self, key: str) -> None:
        """Press and release a printable key, as a person would (keydown with its text, keyup)."""
        code = ord(key.upper()) if len(key) == 1 else 0
        common = {"key": key, "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code}
        self.page("Input.dispatchKeyEvent", type="keyDown", text=key, **common)
        self.page("Input.dispatchKeyEvent", type="keyUp", **common)

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the centre of the first element ``selector``."""
        box = self.eval(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
                        " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                        " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        if box is None:
            raise CDPError(f"no element {selector}")
        for kind in ("mousePressed", "mouseReleased"):
            self.page("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def downloads_to(self, folder: Path) -> None:
        self.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(folder), eventsEnabled=True)

    def download(self, selector: str, folder: Path, timeout: float = 30) -> Path:
        """Click ``selector`` and wait for the download it starts to complete; the file's path."""
        start = len(self.events)
        self.click(selector)
        began = self.wait_event("Browser.downloadWillBegin", timeout, start)
        self.wait_event("Browser.downloadProgress", timeout, start, guid=began["guid"], state="completed")
        return folder / began["suggestedFilename"]

    def screenshot(self, path: Path, width: int | None = None, height: int | None = None) -> None:
        params: dict[str, Any] = {"format": "png"}
        if width and height:
            params["clip"] = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
        path.write_bytes(base64.b64decode(self.page("Page.captureScreenshot", **params)["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (CDPError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
