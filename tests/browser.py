"""Headless-Chromium render check for generated HTML reports (e.g. DVC plots).

Small helper module (not a test file). Usage from a test::

    from browser import render_check      # tests/ is on sys.path under pytest
    result = render_check(Path("reports/plots/index.html"))
    assert result["nonempty_canvases"] + result["svgs"] >= 2
    assert result["external_requests"] == []

or from the shell: ``python tests/browser.py reports/plots/index.html``.

Requirements: ``selenium`` (tested with 4.51.0) and Debian's ``chromium`` +
``chromium-driver`` packages (``/usr/bin/chromium``, ``/usr/bin/chromedriver``).
Both binaries are passed explicitly, so Selenium Manager never has to look for
(or download) a browser or driver.

External requests are recorded from ChromeDriver's performance log (every
``Network.requestWillBeSent`` / ``Network.webSocketCreated`` of the page, so
attempted requests are caught even if they fail offline) plus the page's
``performance.getEntriesByType('resource')``.  A URL counts as external when
it uses a network scheme (http, https, ws, wss, ftp) and its host is not the
local machine; file:, data:, blob:, about: and browser-internal chrome:// URLs
(Chromium's own new-tab page loads those) are not network traffic.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

NETWORK_SCHEMES = {"http", "https", "ws", "wss", "ftp"}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}

DEFAULT_CHROMEDRIVER = "/usr/bin/chromedriver"

# Returns the counts in one pass; evaluated repeatedly until they are stable.
_PROBE_JS = r"""
function canvasNonEmpty(c) {
  if (!c.width || !c.height) return false;
  try {
    var blank = document.createElement('canvas');
    blank.width = c.width; blank.height = c.height;
    if (c.toDataURL() !== blank.toDataURL()) return true;
  } catch (e) { /* tainted canvas: fall through */ }
  try {
    var ctx = c.getContext('2d');
    if (!ctx) return false;
    var d = ctx.getImageData(0, 0, c.width, c.height).data;
    for (var i = 3; i < d.length; i += 4) { if (d[i] !== 0) return true; }
  } catch (e) {}
  return false;
}
var MARKS = 'path,line,polyline,polygon,rect,circle,ellipse,text,image,use';
var canvases = Array.from(document.querySelectorAll('canvas'));
// Outermost SVGs that contain drawn marks and are not tiny icons (vega-embed's
// "..." actions button is a ~14px SVG, which must not count as a chart).
var svgs = Array.from(document.querySelectorAll('svg')).filter(function (s) {
  if (s.parentElement && s.parentElement.closest('svg')) return false;
  var r = s.getBoundingClientRect();
  return r.width >= 20 && r.height >= 20 && s.querySelector(MARKS) !== null;
});
var imgs = Array.from(document.images);
var resources = performance.getEntriesByType('resource').map(function (e) { return e.name; });
return {
  ready: document.readyState,
  canvases: canvases.length,
  nonempty_canvases: canvases.filter(canvasNonEmpty).length,
  svgs: svgs.length,
  images_loaded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
  images_total: imgs.length,
  resources: resources
};
"""


def _is_external(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme.lower() in NETWORK_SCHEMES and parts.hostname not in LOCAL_HOSTS


def _make_driver(chromium: str | None, chromedriver: str, profile_dir: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: no downloads
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium or shutil.which("chromium") or "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--window-size=1200,900",
        f"--user-data-dir={profile_dir}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(executable_path=chromedriver))


@contextlib.contextmanager
def chrome(chromium: str | None = None, chromedriver: str = DEFAULT_CHROMEDRIVER):
    """A headless Chromium WebDriver with a throw-away profile, quit on exit (for tests that navigate)."""
    profile_dir = tempfile.mkdtemp(prefix="chrome_")
    driver = _make_driver(chromium, chromedriver, profile_dir)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile_dir, ignore_errors=True)


def render_check(
    html_path: Path,
    *,
    timeout_s: float = 15.0,
    settle_s: float = 1.0,
    chromium: str | None = None,
    chromedriver: str = DEFAULT_CHROMEDRIVER,
) -> dict:
    """Open ``html_path`` in headless Chromium and report what rendered.

    Waits until the document is loaded and the counts have not changed for
    ``settle_s`` seconds (at most ``timeout_s``).  Returns::

        {"canvases": n, "nonempty_canvases": n, "svgs": n,
         "images_loaded": n, "images_total": n,
         "external_requests": [urls], "console_errors": [messages]}

    ``svgs`` counts outermost SVGs of at least 20x20 px containing at least one
    mark element; ``console_errors`` are the page's SEVERE console entries
    (e.g. a missing vendor script shows up there as net::ERR_FILE_NOT_FOUND).
    """
    url = Path(html_path).resolve().as_uri()
    profile_dir = tempfile.mkdtemp(prefix="render_check_")
    driver = _make_driver(chromium, chromedriver, profile_dir)
    try:
        driver.set_page_load_timeout(timeout_s)
        driver.get_log("performance")  # drop events from before our navigation
        driver.get(url)
        deadline = time.monotonic() + timeout_s
        last_key, stable_since, probe = None, time.monotonic(), {}
        while True:
            probe = driver.execute_script(_PROBE_JS)
            key = tuple(probe[k] for k in ("ready", "canvases", "nonempty_canvases",
                                           "svgs", "images_loaded", "images_total"))
            now = time.monotonic()
            if key != last_key:
                last_key, stable_since = key, now
            elif probe["ready"] == "complete" and now - stable_since >= settle_s:
                break
            if now >= deadline:
                break
            time.sleep(0.2)

        requested: list[str] = []
        for entry in driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            method, params = msg.get("method"), msg.get("params", {})
            if method == "Network.requestWillBeSent":
                requested.append(params.get("request", {}).get("url", ""))
            elif method == "Network.webSocketCreated":
                requested.append(params.get("url", ""))
        requested.extend(probe.get("resources", []))
        external = sorted({u for u in requested if _is_external(u)})

        console_errors = [
            e.get("message", "") for e in driver.get_log("browser")
            if e.get("level") == "SEVERE"
        ]
    finally:
        driver.quit()
        shutil.rmtree(profile_dir, ignore_errors=True)

    return {
        "canvases": probe.get("canvases", 0),
        "nonempty_canvases": probe.get("nonempty_canvases", 0),
        "svgs": probe.get("svgs", 0),
        "images_loaded": probe.get("images_loaded", 0),
        "images_total": probe.get("images_total", 0),
        "external_requests": external,
        "console_errors": console_errors,
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} PATH/TO/index.html")
    print(json.dumps(render_check(Path(sys.argv[1])), indent=2))
