"""`nnx report` in a real browser: headless Chromium, driven over the DevTools protocol
on a pipe (--remote-debugging-pipe: JSON messages ended by a NUL byte on file
descriptors 3 and 4; no port, no extra package). Skips when no Chromium is installed
(.ci/run installs Debian's chromium). Loads the page from file://, checks that every
image decoded, clicks a table header with the mouse and reads the order back."""
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from typer.testing import CliRunner

from cli.app import app
from experiments.sweep import Sweep, run_sweep

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((path for path in map(shutil.which, BROWSERS) if path), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (apt-get install chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,2000", "--remote-debugging-pipe"]
TIMEOUT = 60


class Chromium:
    """A headless Chromium showing ``url``; ``evaluate`` runs JavaScript in the page."""

    def __init__(self, url: str):
        self.profile = tempfile.mkdtemp(prefix="nnx-chromium-")
        to_browser, self.commands = os.pipe()
        self.replies, from_browser = os.pipe()
        # The browser reads commands on fd 3 and writes replies on fd 4: a small Python
        # puts the pipe ends there, then becomes the browser. They are moved above 9 first,
        # so that putting one on 3 or 4 cannot overwrite the other.
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_browser, from_browser)]
        for fd in (to_browser, from_browser):
            os.close(fd)
        place = (f"import os, sys; os.dup2({ends[0]}, 3); os.dup2({ends[1]}, 4); "
                 "os.execv(sys.argv[1], sys.argv[1:])")
        self.process = subprocess.Popen([sys.executable, "-c", place, BROWSER, *FLAGS,
                                         f"--user-data-dir={self.profile}", "about:blank"],
                                        pass_fds=ends, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in ends:
            os.close(fd)
        self.buffer, self.next_id, self.session, self.events = b"", 0, None, []
        page = self.wait_for_page("about:blank")
        self.session = self.call("Target.attachToTarget", targetId=page, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        self.wait_for_event("Page.loadEventFired")

    def close(self):
        self.process.kill()
        self.process.wait()
        os.close(self.commands)
        os.close(self.replies)
        shutil.rmtree(self.profile, ignore_errors=True)

    def wait_for_page(self, url: str) -> str:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            pages = [t for t in self.call("Target.getTargets")["targetInfos"]
                     if t["type"] == "page" and t["url"] == url]
            if pages:
                return pages[0]["targetId"]
            time.sleep(0.1)
        raise TimeoutError(f"Chromium did not open {url}")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            if "method" in reply:
                self.events.append(reply["method"])

    def wait_for_event(self, name: str) -> None:
        while name not in self.events:
            message = self.read()
            if "method" in message:
                self.events.append(message["method"])

    def read(self) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.replies], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self.replies, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) in the middle of the element."""
        box = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                            "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
                            "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left",
                      clickCount=1)

    def screenshot(self, path) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory):
    spec = Sweep({"data": "moons", "points": 40, "optimizer": "adam", "lr": 0.05, "batch_size": 0,
                  "epochs": 12, "val_size": 0.25, "snapshot_every": 4},
                 {"hidden": [[3], [8], [20]], "reg": [0.001, 0.1], "seed": [0, 1]})
    out = run_sweep(spec, tmp_path_factory.mktemp("sweep") / "sweep", workers=0).out
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    return out / "report.html"


@pytest.fixture(scope="module")
def browser(sweep_report):
    chromium = Chromium(sweep_report.resolve().as_uri())
    yield chromium
    chromium.close()


def test_every_figure_of_the_page_renders(browser, sweep_report, tmp_path_factory):
    images = browser.evaluate("Promise.all([...document.images].map(i => i.decode().then(() => "
                              "[i.alt, i.naturalWidth, i.naturalHeight], () => [i.alt, 0, 0])))")
    assert len(images) == 6, images         # curves, regions, animation, spread, two heatmaps
    assert all(width > 100 and height > 100 for _, width, height in images), images
    drawn = browser.evaluate("[...document.images].map(i => i.getBoundingClientRect().width)")
    assert all(width > 100 for width in drawn)           # laid out on the page, not only decoded
    browser.screenshot(sweep_report.with_name("report.png"))   # to look at: pytest's tmp folder


def column(browser, table: str, name: str) -> list:
    return browser.evaluate(f"""(() => {{
        const table = document.getElementById({json.dumps(table)});
        const index = [...table.tHead.rows[0].cells].findIndex(c => c.textContent === {json.dumps(name)});
        return [...table.tBodies[0].rows].map(
            r => r.cells[index].dataset.value ?? r.cells[index].textContent);
    }})()""")


def test_clicking_a_header_sorts_the_table_and_clicking_again_reverses_it(browser):
    def header(name):
        index = browser.evaluate(f"[...document.querySelectorAll('#summary th')].findIndex("
                                 f"c => c.textContent === {json.dumps(name)}) + 1")
        return f"#summary th:nth-child({index})"

    before = [float(v) for v in column(browser, "summary", "mean_best_val_acc")]
    browser.click(header("mean_best_val_acc"))
    ascending = [float(v) for v in column(browser, "summary", "mean_best_val_acc")]
    assert ascending == sorted(before)
    assert browser.evaluate(f"document.querySelector('{header('mean_best_val_acc')}')"
                            ".getAttribute('aria-sort')") == "ascending"
    browser.click(header("mean_best_val_acc"))
    assert [float(v) for v in column(browser, "summary", "mean_best_val_acc")] == sorted(before, reverse=True)
    browser.click(header("hidden"))                      # text columns sort as numbers read
    assert column(browser, "summary", "hidden") == ["3", "3", "8", "8", "20", "20"]
    rows = browser.evaluate("[...document.querySelectorAll('#summary tbody tr')].map(r => r.cells.length)")
    assert len(rows) == 6 and len(set(rows)) == 1        # whole rows moved, none lost


def test_the_page_made_no_request_to_anywhere(browser):
    entries = browser.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
    assert [e for e in entries if not e.startswith("data:")] == []
