"""report.html: self-contained (no script or style from the network) and, in headless Chromium, one point per
run, hover text with the run's overrides, a sortable table, legend toggling, and no console error."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from raee import report
from tests.test_report import RUNS, make_sweep

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
                  "--disable-dev-shm-usage", "--window-size=1400,1000")


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    root = make_sweep(tmp_path_factory.mktemp("html") / "sweep")
    with contextlib.redirect_stdout(io.StringIO()):
        assert report.main([str(root), "--out", str(root / "rep")]) == 0
    return root / "rep" / "report.html"


def test_report_html_is_self_contained(page):
    text = page.read_text()
    assert 'data-runs="7"' in text and 'data-points="7"' in text  # the oracle's speed-up comes from the sweep's full run
    # nothing loaded from elsewhere: no tag with a src or href (scripts and styles are inline), the plotly
    # bundle inlined (its own strings mention plotly.com's links, which load nothing)
    assert external_references(text) == []
    assert len(text) > 1_000_000
    for run in RUNS:
        assert run in text  # every run's directory is in the table (and the hover text)


def external_references(text: str) -> list[str]:
    """src/href attributes of the page's tags (script bodies are not parsed as tags)."""
    from html.parser import HTMLParser

    found: list[str] = []

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.extend(f"<{tag} {k}={v}>" for k, v in attrs if k in ("src", "href") and v and not v.startswith("#"))

    Parser().feed(text)
    return found


def chromium_driver(tmp_dir: Path):
    """A Selenium driver of Debian's chromium + chromium-driver, or a skip naming what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not browser or not driver_path:
        pytest.skip("headless Chromium not found: apt-get install -y chromium chromium-driver (.ci/run does)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_dir}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not look for a driver online
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


@pytest.mark.slow
def test_report_html_in_headless_chromium(page):
    with tempfile.TemporaryDirectory() as profile:
        driver = chromium_driver(Path(profile))
        try:
            driver.get(page.as_uri())
            from selenium.webdriver.support.ui import WebDriverWait

            WebDriverWait(driver, 60).until(lambda d: d.execute_script(
                "return document.readyState === 'complete' && document.querySelectorAll('.js-plotly-plot').length"))
            points = "return document.querySelectorAll('[id^=speed-] .scatterlayer path.point').length"
            assert driver.execute_script(points) == len(RUNS)  # one point per run
            # hovering a point shows its run's overrides and numbers
            hover = driver.execute_script("""
                var gd = document.getElementById('speed-0');
                var i = gd.data.findIndex(function (t) { return t.name === 'entropy'; });
                Plotly.Fx.hover(gd, [{curveNumber: i, pointNumber: 0}]);
                return gd.querySelector('.hoverlayer').textContent;""")
            assert "exit=entropy" in hover and "exit.threshold=0.1" in hover and "accuracy: 0.9400" in hover
            assert "layers computed: 5.00" in hover
            # a click on a method in the legend hides its points
            driver.execute_script("""
                var items = document.querySelectorAll('#speed-0 .legend .traces');
                items.forEach(function (t) { if (t.textContent === 'entropy') {
                    t.querySelector('.legendtoggle').dispatchEvent(new MouseEvent('mouseup', {bubbles: true})); } });""")
            WebDriverWait(driver, 10).until(lambda d: d.execute_script(points) == len(RUNS) - 3)
            # the table sorts by a header's column
            order = """return Array.from(document.querySelectorAll('#results tbody tr')).map(
                function (r) { return r.cells[COL].textContent; });"""
            headers = driver.execute_script("return Array.from(document.querySelectorAll('#results th'))"
                                            ".map(function (h) { return h.textContent; });")
            col = headers.index("accuracy")
            driver.execute_script(f"document.querySelectorAll('#results th')[{col}].click();")
            values = [float(v) for v in driver.execute_script(order.replace("COL", str(col)))]
            assert values == sorted(values) and len(values) == len(RUNS)
            assert driver.execute_script("return document.querySelectorAll('[id^=exits-] .bars path').length") > 0
            if os.environ.get("RAEE_SCREENSHOT"):  # look at it: RAEE_SCREENSHOT=/tmp/report.png pytest ...
                driver.execute_script("window.scrollTo(0, 0);")
                driver.save_screenshot(os.environ["RAEE_SCREENSHOT"])
            errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
            assert errors == []
        finally:
            driver.quit()
