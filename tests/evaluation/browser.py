"""Render a page in Debian's headless Chromium and collect every console error it causes.

Chromium is driven through the DevTools protocol over `--remote-debugging-pipe` (JSON
messages separated by NUL bytes on file descriptors 3 and 4), so there is no port to pick,
no websocket client to write, and no log format to parse: console calls, uncaught
exceptions and browser log entries (failed loads, Content-Security-Policy violations)
arrive as structured events. Chromium's own stderr chatter (D-Bus and GPU warnings on a
headless box) is therefore irrelevant and ignored.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclass
class Rendered:
    errors: list = field(default_factory=list)  # one line per console error, exception or error log entry
    warnings: list = field(default_factory=list)
    png: bytes = b""
    load_s: float = 0.0


class _Pipe:
    def __init__(self, write_fd: int, read_fd: int, proc: subprocess.Popen):
        self.w, self.r, self.proc = write_fd, read_fd, proc
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params=None, session=None) -> int:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        return self.next_id

    def recv(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self.r], [], [], left)
            if ready:
                data = os.read(self.r, 1 << 20)
                if not data:
                    raise RuntimeError(f"chromium closed the pipe (exit status {self.proc.poll()})")
                self.buf += data
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params=None, session=None, timeout: float = 30.0) -> dict:
        want = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(deadline)
            if msg.get("id") == want:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_for(self, method: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            msg = self.recv(deadline)
            if "method" in msg:
                self.events.append(msg)

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while True:
                msg = self.recv(deadline)
                if "method" in msg:
                    self.events.append(msg)
        except TimeoutError:
            pass


def _describe(event: dict):
    """(level, text) for an event that reports a problem, else None."""
    m, p = event.get("method"), event.get("params", {})
    if m == "Runtime.consoleAPICalled":
        text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
        level = {"error": "error", "assert": "error", "warning": "warning"}.get(p.get("type"))
        return (level, f"console.{p.get('type')}: {text}") if level else None
    if m == "Runtime.exceptionThrown":
        d = p.get("exceptionDetails", {})
        return "error", f"exception: {d.get('text', '')} {d.get('exception', {}).get('description', '')}".strip()
    if m == "Log.entryAdded":
        e = p.get("entry", {})
        level = {"error": "error", "warning": "warning"}.get(e.get("level"))
        return (level, f"{e.get('source')}: {e.get('text')} {e.get('url', '')}".strip()) if level else None
    return None


def render(page: Path, width: int = 1280, height: int = 2000, timeout: float = 90.0) -> Rendered:
    """Load `page` (a file) in headless Chromium; return its console errors and a screenshot."""
    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} not found: apt-get install -y chromium")
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()

    def child_fds():  # the protocol's fixed descriptors: 3 for commands in, 4 for replies out
        a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
        os.dup2(a, 3)
        os.dup2(b, 4)
        os.set_inheritable(3, True)
        os.set_inheritable(4, True)

    args = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
            f"--window-size={width},{height}", "about:blank"]
    proc = subprocess.Popen(args, preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    pipe = _Pipe(to_chrome_w, from_chrome_r, proc)
    out = Rendered()
    try:
        target = pipe.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
        session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            pipe.call(f"{domain}.enable", session=session)
        pipe.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        t0 = time.monotonic()
        nav = pipe.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        if nav.get("errorText"):
            out.errors.append(f"navigation: {nav['errorText']}")
        pipe.wait_for("Page.loadEventFired", timeout)
        out.load_s = time.monotonic() - t0
        pipe.drain(0.5)  # late events: errors logged just after load
        shot = pipe.call("Page.captureScreenshot", {"format": "png"}, session=session, timeout=timeout)
        out.png = base64.b64decode(shot["data"])
        for event in pipe.events:
            found = _describe(event)
            if found:
                (out.errors if found[0] == "error" else out.warnings).append(found[1])
        try:
            pipe.call("Browser.close", timeout=10)
        except Exception:  # noqa: BLE001 - closing races the pipe shutting down
            pass
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(to_chrome_w)
        os.close(from_chrome_r)
        shutil.rmtree(profile, ignore_errors=True)
    return out
