"""report.html of `moescope analyze` renders in headless Chromium: every image loads, the
console stays clean, nothing is fetched.

The browser is driven through the Chrome DevTools Protocol over ``--remote-debugging-pipe``
(NUL-separated JSON on file descriptors 3 and 4), with the standard library only: no
playwright, no websocket client, nothing downloaded. Skipped (with the reason) only when
no Chromium executable is found: Debian's ``/usr/bin/chromium`` (``apt-get install
chromium``), or set ``MOESCOPE_CHROMIUM``.

A negative control runs the same checker on a page with a broken image and an external
reference, so the checker itself is shown able to fail.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from conftest import save_tiny_checkpoint
from moescope.data import stdlib_dir

DATA = stdlib_dir() / "bisect.py"


def _chromium() -> str | None:
    env = os.environ.get("MOESCOPE_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


_TRAMPOLINE = (
    "import fcntl, os, sys\n"
    "a = fcntl.fcntl(int(sys.argv[1]), fcntl.F_DUPFD, 10)\n"
    "b = fcntl.fcntl(int(sys.argv[2]), fcntl.F_DUPFD, 10)\n"
    "os.dup2(a, 3)\n"
    "os.dup2(b, 4)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


class CDPPage:
    """One headless Chromium with one page, driven over ``--remote-debugging-pipe``."""

    def __init__(self, exe: str, user_data_dir: Path, timeout: float = 60.0) -> None:
        self.timeout = timeout
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-extensions", "--disable-default-apps", "--mute-audio",
            f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        # Chromium reads commands on fd 3 and writes replies on fd 4. A tiny Python
        # trampoline maps the pipes there (via fds >= 10, so that a pipe already numbered
        # 3 or 4 is not clobbered) and execs the browser.
        cmd = [sys.executable, "-c", _TRAMPOLINE, str(to_chrome_r), str(from_chrome_w), exe, *flags]
        self.proc = subprocess.Popen(
            cmd,
            pass_fds=(to_chrome_r, from_chrome_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    def _send(self, method: str, params: dict[str, Any] | None = None, session: bool = True) -> int:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        return self._next_id

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_chrome], [], [], left)
            if ready:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the pipe (exit {self.proc.poll()})")
                self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        return json.loads(raw)

    def call(
        self, method: str, params: dict[str, Any] | None = None, session: bool = True
    ) -> dict[str, Any]:
        mid = self._send(method, params, session)
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._read_message(deadline)
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, method: str) -> dict[str, Any]:
        for ev in self.events:
            if ev["method"] == method:
                return ev
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._read_message(deadline)
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == method:
                    return msg

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)
        att = self.call(
            "Target.attachToTarget",
            {"targetId": target["targetId"], "flatten": True},
            session=False,
        )
        self.session = att["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.events.clear()
        self.call("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"evaluate failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries (CSP, network)."""
        # Let late messages (image decode, CSP reports) arrive.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._from_chrome], [], [], 0.1)
            if ready or b"\0" in self._buf:
                try:
                    msg = self._read_message(time.monotonic() + 1.0)
                except TimeoutError:
                    break
                if "method" in msg:
                    self.events.append(msg)
        out = []
        for ev in self.events:
            p = ev.get("params", {})
            if ev["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(
                    "console: "
                    + " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", []))
                )
            elif ev["method"] == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:300])
            elif ev["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                e = p["entry"]
                out.append(f"log[{e.get('source')}]: {e.get('text')} {e.get('url', '')}")
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


_IMAGES_JS = (
    "JSON.stringify(Array.from(document.images).map(i => ({src: i.src.slice(0, 22), "
    "complete: i.complete, w: i.naturalWidth, h: i.naturalHeight})))"
)
_RESOURCES_JS = (
    "JSON.stringify(performance.getEntriesByType('resource').map(e => e.name.slice(0, 80)))"
)


def inspect_page(exe: str, html_path: Path, tmp: Path) -> dict[str, Any]:
    """Images, fetched resources, console errors and text of ``html_path`` as Chromium
    renders it."""
    page = CDPPage(exe, tmp / "chromium-profile")
    try:
        page.open(html_path.resolve().as_uri())
        images = json.loads(page.evaluate(_IMAGES_JS))
        resources = json.loads(page.evaluate(_RESOURCES_JS))
        text = page.evaluate("document.body.innerText")
        title = page.evaluate("document.title")
        scripts = page.evaluate("document.scripts.length")
        errors = page.errors()
    finally:
        page.close()
    return {
        "images": images,
        "resources": resources,
        "text": text,
        "title": title,
        "scripts": scripts,
        "errors": errors,
    }


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = _chromium()
    if exe is None:
        pytest.skip(
            "no Chromium executable found (looked for chromium, chromium-browser, "
            "google-chrome; set MOESCOPE_CHROMIUM or `apt-get install chromium`)"
        )
    return exe


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moescope.analysis import run_analyze

    tmp = tmp_path_factory.mktemp("chromium-report")
    ckpt = save_tiny_checkpoint(tmp / "ckpt", seed=0)
    other = tmp / "other.py"
    other.write_bytes((stdlib_dir() / "colorsys.py").read_bytes())
    return run_analyze(
        model=str(ckpt),
        data=[str(DATA), str(other)],
        neurons=True,
        max_tokens=600,
        batch_size=4,
        seq_len=64,
        out=str(tmp / "out"),
        progress=False,
    )


def test_report_renders_with_every_image_loaded(
    chromium: str, report: Path, tmp_path: Path
) -> None:
    res = inspect_page(chromium, report, tmp_path)
    pngs = sorted(report.parent.glob("*.png"))
    # Every written figure is embedded once, and every embedded image decoded.
    assert len(res["images"]) == len(pngs) >= 8, (res["images"], pngs)
    for img in res["images"]:
        assert img["src"].startswith("data:image/png;base64"), img
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, img
    assert res["errors"] == [], res["errors"]
    assert res["resources"] == [], res["resources"]  # nothing fetched: fully self-contained
    assert res["scripts"] == 0
    assert res["title"].startswith("moescope analysis")
    for heading in (
        "Expert usage",
        "Co-activation",
        "Neurons",
        "Parameters and FLOPs",
        "Routing per domain",
        "Expert specialisation",
    ):
        assert heading in res["text"], heading


def test_compare_report_renders(chromium: str, report: Path, tmp_path: Path) -> None:
    from moescope.analysis.compare import compare_sources, write_comparison

    cmp = compare_sources(report.parent, report.parent / "summary.json", labels=["x", "y"])
    page = write_comparison(cmp, tmp_path / "cmp")
    res = inspect_page(chromium, page, tmp_path)
    pngs = sorted(page.parent.glob("*.png"))
    assert len(res["images"]) == len(pngs) == 3, (res["images"], pngs)  # no series: no log
    assert all(img["complete"] and img["w"] > 0 for img in res["images"]), res["images"]
    assert res["errors"] == [] and res["resources"] == [] and res["scripts"] == 0
    assert res["title"] == "moescope compare: x vs y"
    assert "0 nats" in res["text"]  # a run against itself: no divergence


def test_agree_report_renders(chromium: str, tmp_path: Path) -> None:
    import torch

    from moescope.analysis.agree import agree, write_agreement

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", seed=0)
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 256, (48,), generator=gen) for _ in range(6)]
    res = agree(str(ckpt), str(ckpt), tokens=tokens, dtype_b="bfloat16", labels=["fp32", "bf16"])
    page = write_agreement(res, tmp_path / "agree")
    out = inspect_page(chromium, page, tmp_path)
    pngs = sorted(page.parent.glob("*.png"))
    assert len(out["images"]) == len(pngs) >= 2, (out["images"], pngs)
    assert all(img["complete"] and img["w"] > 0 for img in out["images"]), out["images"]
    assert out["errors"] == [] and out["resources"] == [] and out["scripts"] == 0
    assert out["title"] == "moescope agree: fp32 vs bf16"
    assert res.verdict.split(":")[0] in out["text"] and "Agreement by position" in out["text"]


def test_checker_catches_broken_and_external_images(chromium: str, tmp_path: Path) -> None:
    # Negative control: the same checker must flag what a broken report would contain.
    from moescope.report import html as H

    doc = H.page(
        "broken",
        [
            H.Section("s", "S").add(
                '<img src="data:image/png;base64,AAAA" alt="broken">',
                '<img src="http://198.51.100.1/x.png" alt="external">',
            )
        ],
    )
    path = tmp_path / "broken.html"
    path.write_text(doc)
    res = inspect_page(chromium, path, tmp_path)
    assert len(res["images"]) == 2
    assert all(img["w"] == 0 for img in res["images"]), res["images"]
    assert res["errors"], "the CSP violation / broken image produced no console error"
    assert any("198.51.100.1" in e or "Content Security Policy" in e for e in res["errors"]), res


if __name__ == "__main__":  # pragma: no cover - manual run
    sys.exit(pytest.main([__file__, "-q"]))
