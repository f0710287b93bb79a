#!/usr/bin/env python3
"""docs/heka-dashboard.png: Heka's dashboard graphing a simplepush server under load.

    .venv/bin/python scripts/heka_screenshot.py [--warmup 300] [--out docs/heka-dashboard.png]

As tests/test_heka.py does, hekad (../shared/heka) runs contrib/heka/hekad.toml
with its paths and ports substituted, and a simplepush server (level info)
logs JSON into its log directory and sends it statsd. The load of
tests/test_dashboard_browser.py runs on it (devices, PUTs delivered, stored
and refused, WebPush POSTs, acks, reconnects) for --warmup seconds. Then
headless Chromium opens one page holding, for each of our filters' outputs,
the dashboard's own "Embed" view of it (#sandboxes/<filter>/outputs/<file>/embed,
captioned with the output's name); each graph is zoomed, by a drag as a
person would, to the minutes of load (the buffers keep an hour), and the
page is saved as a PNG.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import free_port  # noqa: E402
from tests.test_dashboard_browser import CHROMEDRIVER, CHROMIUM, Load  # noqa: E402
from tests.test_heka import Heka, outputs, poll, start_heka, start_server  # noqa: E402

WIDTH = 1440
# Filters, in the order shown; each with every output it makes.
FILTERS = (
    "SimplepushTraffic",
    "SimplepushDevices",
    "SimplepushLatency",
    "SimplepushPutErrors",
    "SimplepushWebPush",
    "SimplepushLogEvents",
)
PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><style>
html {{ overflow: hidden; }}
body {{ font: 15px sans-serif; margin: 12px; background: #fff; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }}
p {{ margin: 0 0 10px; color: #555; }}
.grid {{ display: grid; grid-template-columns: 1fr 1fr; gap: 10px; }}
figure {{ margin: 0; border: 1px solid #ddd; }}
figcaption {{ font-weight: bold; padding: 6px 10px 0; }}
iframe {{ width: 100%; height: 420px; border: 0; }}
iframe.table {{ height: 330px; }}
</style></head><body>
<h1>Heka 0.10 dashboard, contrib/heka/hekad.toml: simplepush under load</h1>
<p>Each panel is the dashboard's Embed view of one output (http://127.0.0.1:4352/#sandboxes),
zoomed to the last {minutes} minutes; one row per 5 s.</p>
<div class="grid">{figures}</div>
</body></html>
"""


def chromium() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={WIDTH},1200")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def page(heka: Heka, minutes: int) -> str:
    listed = outputs(heka)
    figures = []
    for name in FILTERS:
        for output, filename in sorted(listed[name].items()):
            short = filename.removeprefix("data/")
            url = f"http://127.0.0.1:{heka.dashboard_port}/#sandboxes/{name}/outputs/{short}/embed"
            kind = "graph" if short.endswith(".cbuf") else "table"
            figures.append(
                f"<figure><figcaption>{output}</figcaption>"
                f'<iframe class="{kind}" scrolling="no" src="{url}"></iframe></figure>'
            )
    return PAGE.format(minutes=minutes, figures="".join(figures))


def zoom(driver: Any, seconds: float) -> None:
    """In each frame, drag across the graph's last `seconds` of its hour: Dygraph zooms to it."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    for frame in driver.find_elements(By.TAG_NAME, "iframe"):
        driver.switch_to.frame(frame)
        canvases = driver.find_elements(By.CSS_SELECTOR, ".sandbox-graph canvas")
        if canvases:
            plot = canvases[-1]  # Dygraph's event layer lies on top
            # offsets from the canvas's centre; Dygraph follows the moves in between
            half = plot.size["width"] // 2
            start = int(half - 2 * half * seconds / 3600)
            drag = ActionChains(driver).move_to_element_with_offset(plot, start, 0).click_and_hold()
            for step in range(1, 11):
                drag.move_to_element_with_offset(plot, start + (half - 2 - start) * step // 10, 0)
            # then off the graph, or Dygraph shows the values of the point under the mouse
            legend = driver.find_element(By.CSS_SELECTOR, ".sandbox-graph-legend")
            drag.release().move_to_element(legend).perform()
        driver.switch_to.default_content()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=float, default=300.0, help="seconds of load (300)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "heka-dashboard.png")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="heka-screenshot-") as name:
        tmp = Path(name)
        heka = start_heka(tmp)
        server = start_server(tmp, heka, free_port(), level="info")
        load = Load(server)
        driver = None
        try:
            load.start()
            time.sleep(options.warmup)
            poll(lambda: all(name in outputs(heka) for name in FILTERS), 30, "every graph")
            html = tmp / "heka-dashboard.html"
            html.write_text(page(heka, round(options.warmup / 60)), encoding="utf-8")
            driver = chromium()
            driver.get(html.as_uri())
            # the viewport as tall as the page (the window's frame takes some of its height)
            height = driver.execute_script("return document.documentElement.scrollHeight")
            frame = driver.get_window_size()["height"] - driver.execute_script(
                "return window.innerHeight"
            )
            driver.set_window_size(WIDTH, height + frame)
            time.sleep(5)  # the frames load and draw their graphs
            zoom(driver, options.warmup + 20)
            time.sleep(1)
            assert driver.save_screenshot(str(options.out))
        finally:
            if driver is not None:
                driver.quit()
            load.finish()
            server.proc.terminate()
            server.proc.wait(timeout=10)
            heka.stop()
    print(f"wrote {options.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
