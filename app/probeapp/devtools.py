"""A real server and a real browser for the app's end-to-end test, its first-paint benchmark and
its screenshots: ``streamlit run`` on a loopback port, and Chromium (Debian's ``chromium``)
driven headless over the DevTools protocol with ``websocket-client``.

Streamlit sends its content over a websocket after the HTML shell, so a page is "painted" when
the rendered DOM shows the expected text, the app reports itself connected and idle and no
skeleton placeholders remain; only then is a screenshot meaningful.

    PYTHONPATH=app python -m probeapp.devtools screenshots --store STORE --out docs/screenshots
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

APP = Path(__file__).resolve().parents[1] / "main.py"

READY_JS = """(() => {
  const app = document.querySelector('[data-testid="stApp"]');
  if (!app) return false;
  const conn = app.getAttribute('data-test-connection-state');
  const script = app.getAttribute('data-test-script-state');
  const skeleton = document.querySelector('[data-testid="stSkeleton"]');
  const running = document.querySelector('[data-testid="stStatusWidget"]');
  return (conn === null || conn === 'CONNECTED') && (script === null || script === 'notRunning') && !skeleton
         && !running;
})()"""


class BrowserError(RuntimeError):
    """The server or the browser did not do what was expected; the message says what and where to look."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _stop(proc: subprocess.Popen[Any] | None) -> None:
    """Stop a process we started, and its process group (chromium forks helpers)."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def streamlit_server(store: str | Path, log: str | Path, port: int | None = None,
                     env: dict[str, str] | None = None, timeout: float = 60.0) -> Iterator[str]:
    """``streamlit run app/main.py`` on 127.0.0.1 against `store`; yields its base URL once
    ``/_stcore/health`` answers ``ok``. Its output goes to `log` (a pipe can deadlock). Stopped on exit."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none"]
    full_env = {**os.environ, "PROBE_STORE": str(store), **(env or {})}
    proc = None
    with open(log, "ab") as out:
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=APP.parents[1],
                                    start_new_session=True)
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise BrowserError(f"streamlit exited with status {proc.returncode}; see {log}")
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                        if r.read().strip() == b"ok":
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise BrowserError(f"streamlit did not answer /_stcore/health within {timeout:.0f} s; see {log}")
                time.sleep(0.2)
            yield url
        finally:
            _stop(proc)


class Chromium:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, binary: str, log: str | Path, width: int = 1400, height: int = 1000) -> None:
        self.binary, self.log, self.width, self.height = binary, Path(log), width, height
        self.proc: subprocess.Popen[Any] | None = None
        self.ws: Any = None
        self._id = 0
        self._profile = tempfile.mkdtemp(prefix="probe-chromium-")

    def __enter__(self) -> Chromium:
        import websocket  # websocket-client (the dev extra)

        port = free_port()
        cmd = [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
               f"--remote-debugging-port={port}", "--remote-allow-origins=*", f"--user-data-dir={self._profile}",
               f"--window-size={self.width},{self.height}", "about:blank"]
        out = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()
        deadline = time.monotonic() + 30
        target = None
        while target is None:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with status {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
                target = pages[0] if pages else None
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise BrowserError(f"chromium's DevTools endpoint did not come up; see {self.log}")
            if target is None:
                time.sleep(0.2)
        self.ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                         "deviceScaleFactor": 1, "mobile": False})
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                self.ws.close()
        _stop(self.proc)
        shutil.rmtree(self._profile, ignore_errors=True)

    def send(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """One DevTools command; events arriving meanwhile are dropped."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error']}")
                return msg.get("result", {})
        raise BrowserError(f"{method}: no answer within {timeout} s")

    def evaluate(self, expression: str) -> Any:
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise BrowserError(f"script failed: {r['exceptionDetails'].get('text')}: {expression[:80]}")
        return r.get("result", {}).get("value")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def text(self) -> str:
        return str(self.evaluate("document.body ? document.body.innerText : ''") or "")

    def wait_for_text(self, needles: list[str], timeout: float = 60.0, ready: bool = True) -> float:
        """Wait until the page's text holds every needle and (with `ready`) the app is idle;
        returns the seconds waited."""
        t0 = time.monotonic()
        while True:
            body = self.text()
            if all(n in body for n in needles) and (not ready or self.evaluate(READY_JS)):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                missing = [n for n in needles if n not in body]
                raise BrowserError(f"after {timeout:.0f} s the page lacks {missing} (or is still running); "
                                   f"its text begins: {body[:300]!r}")
            time.sleep(0.1)

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        t0 = time.monotonic()
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() - t0 > timeout:
                raise BrowserError(f"after {timeout:.0f} s this is still false: {expression[:120]}")
            time.sleep(0.1)

    def click_nav(self, title: str) -> None:
        """Click the sidebar navigation link whose text is `title`."""
        js = f"""(() => {{
          const links = [...document.querySelectorAll('[data-testid="stSidebarNav"] a, a[data-testid="stSidebarNavLink"]')];
          const a = links.find(l => l.innerText.trim().split('\\n').pop().trim() === {json.dumps(title)});
          if (!a) return false;
          a.click();
          return true;
        }})()"""
        if not self.evaluate(js):
            raise BrowserError(f"no navigation link {title!r}; the page's text begins: {self.text()[:300]!r}")

    def images_loaded(self) -> list[dict[str, float]]:
        """Bounding boxes of the app's images that have loaded (CSS pixels)."""
        return self.evaluate("""[...document.querySelectorAll('[data-testid="stImage"] img, [data-testid="stFullScreenFrame"] img')]
            .filter(i => i.complete && i.naturalWidth > 0)
            .map(i => { const r = i.getBoundingClientRect(); return {x: r.x, y: r.y, width: r.width, height: r.height}; })
            .filter(r => r.width > 20 && r.height > 20)""") or []

    def image_box(self, caption: str) -> dict[str, float] | None:
        """The bounding box (CSS pixels) of the loaded image whose caption contains `caption`."""
        return self.evaluate(f"""(() => {{
          for (const el of document.querySelectorAll('[data-testid="stImage"]')) {{
            const img = el.querySelector('img');
            if (!img || !img.complete || img.naturalWidth === 0) continue;
            if (!el.innerText.includes({json.dumps(caption)})) continue;
            const r = img.getBoundingClientRect();
            return {{x: r.x, y: r.y, width: r.width, height: r.height}};
          }}
          return null;
        }})()""")

    def screenshot(self) -> bytes:
        """The viewport as PNG (Streamlit scrolls inside its main area: make the window as tall as
        the part of the page you need)."""
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"}, timeout=60)["data"])


# ------------------------------------------------------------------------------ screenshots for the docs
SHOTS = (("Runs", "runs", ["Runs"]), ("Attention", "attention", ["Attention", "Query token"]),
         ("Flow and tokens", "flow", ["Which tokens read a patch"]), ("Ablation", "ablation", ["Captions per variant"]),
         ("Attribution", "attribution", ["Attribution"]), ("Faithfulness", "faithfulness", ["Maps of a scored word"]),
         ("Patching", "patching", ["Patching"]), ("Cross-attention and fusion", "cross_attention", ["Fusion table"]),
         ("Probes", "probes", ["best layer"]), ("UMAP and modality gap", "umap", ["UMAP is for looking"]),
         ("Logit lens", "logit_lens", ["What each patch says"]),
         ("Compare", "compare", ["What differs"]), ("Any run", "any_run", ["Arrays"]))


def screenshots(store: Path, out: Path, width: int = 1280, height: int = 1600, scale: float = 0.6) -> list[Path]:
    """One PNG per page against `store`, in a tall viewport (Streamlit scrolls inside its main
    area, so a full-page capture would be cut at the viewport), scaled by `scale` and reduced to a
    palette (small files for the docs)."""
    import io

    from PIL import Image

    binary = chromium_binary()
    if binary is None:
        raise BrowserError("no chromium: apt-get install chromium")
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="probe-shots-"))
    written = []
    with streamlit_server(store, logs / "streamlit.log") as url, \
            Chromium(binary, logs / "chromium.log", width, height) as b:
        b.navigate(url)
        b.wait_for_text(["Runs"])
        for title, name, needles in SHOTS:
            b.click_nav(title)
            b.wait_for_text(needles)
            time.sleep(1.5)  # charts draw after the script finishes
            b.wait_for_text(needles)
            img = Image.open(io.BytesIO(b.screenshot())).convert("RGB")
            img = img.resize((int(img.width * scale), int(img.height * scale)), Image.LANCZOS)
            path = out / f"{name}.png"
            img.quantize(colors=96, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
            written.append(path)
    shutil.rmtree(logs, ignore_errors=True)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("screenshots", help="one PNG per page of the app")
    s.add_argument("--store", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    for path in screenshots(args.store, args.out):
        sys.stdout.write(f"{path} ({path.stat().st_size // 1024} KiB)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
