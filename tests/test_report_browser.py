"""report.html in a browser: its tables are there and every plot image loads.

The browser check runs in headless Chromium through playwright (when it and its browser are installed) or a
chromium / chrome binary on PATH (`--headless --dump-dom`); nothing is downloaded, and without either it is
skipped with the reason. The structural check beside it runs everywhere: every plot the report wrote is
embedded as a PNG that decodes."""
import base64
import os
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from benchmarks.report import write_report
from test_bench_report import _record, _records

_BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome", "headless_shell")
# Appended to a copy of the report: once every image settled, the page records what the browser saw.
_PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-probe', JSON.stringify({
    tables: document.querySelectorAll('table').length,
    rows: document.querySelectorAll('table tr').length,
    images: imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])}));
});
</script>"""


def _report(tmp_path) -> Path:
    records = _records() + [_record("02-export", 20.6, 90.0, 31.0, 271_000_000, 134_500_000, backend="ort-cpu"),
                            _record("source", 20.0, 200.0, 26.0, 540_500_000, 134_500_000, base=True,
                                    backend="ort-cpu")]
    write_report(records, tmp_path, "browser check")
    return tmp_path / "report.html"


class _Parts(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.images = 0, []

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables += 1
        elif tag == "img":
            self.images.append(dict(attrs))


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_html_embeds_every_plot_as_a_png_that_decodes(tmp_path):
    parts = _Parts()
    parts.feed(_report(tmp_path).read_text())
    plots = sorted(tmp_path.glob("*.png"))
    assert parts.tables >= 3 and len(plots) == 2 and len(parts.images) == len(plots)
    embedded = {base64.b64decode(img["src"].split(",", 1)[1]) for img in parts.images}
    assert embedded == {p.read_bytes() for p in plots}
    for data in embedded:
        w, h = _png_size(data)
        assert w > 300 and h > 200
    assert all(img.get("alt") for img in parts.images)


def _browser() -> tuple[str, str | None]:
    import importlib.util

    if importlib.util.find_spec("playwright") is not None:
        return "playwright", None
    for name in _BINARIES:
        path = shutil.which(name)
        if path:
            return "binary", path
    return "", None


def test_report_html_renders_in_headless_chromium(tmp_path):
    kind, binary = _browser()
    if not kind:
        pytest.skip("no headless Chromium here: neither playwright nor a chromium / chrome binary on PATH "
                    f"({', '.join(_BINARIES)}); nothing is downloaded")
    page = tmp_path / "probe.html"
    page.write_text(_report(tmp_path).read_text().replace("</body>", _PROBE + "</body>"))
    n_plots = len(list(tmp_path.glob("*.png")))
    if kind == "playwright":
        import json

        from playwright.sync_api import Error, sync_playwright

        try:
            with sync_playwright() as p:
                browser = p.chromium.launch()
                tab = browser.new_page()
                tab.goto(page.as_uri())
                tab.wait_for_function("document.body.hasAttribute('data-probe')", timeout=20_000)
                probe = json.loads(tab.get_attribute("body", "data-probe"))
                browser.close()
        except Error as exc:
            if "Executable doesn't exist" in str(exc):
                pytest.skip("playwright is installed but its Chromium is not (`playwright install chromium`)")
            raise
    else:
        import html
        import json
        import re

        env = dict(os.environ, HOME=str(tmp_path))
        # No background networking: this machine's closed network refuses Chromium's update / sync calls.
        flags = ["--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-quic",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom"]
        dom = subprocess.run([binary, *flags, page.as_uri()], capture_output=True, text=True, timeout=120,
                             env=env).stdout
        found = re.search(r'data-probe="([^"]*)"', dom)
        assert found, "the page's load handler did not run in the browser"
        probe = json.loads(html.unescape(found.group(1)))
    assert probe["tables"] >= 3 and probe["rows"] >= 6
    assert len(probe["images"]) == n_plots
    assert all(complete and w > 300 and h > 200 for complete, w, h in probe["images"]), probe["images"]
