"""The dashboard page in a real browser: Debian's headless Chromium driven by selenium.

A console-script server with an [admin] token (and, in a second run, two
workers on memcached routing to each other) runs under a small load
(devices connecting and leaving, PUTs delivered, stored and rejected,
WebPush POSTs delivered and rejected, acks). The browser opens
/?token=..., the page polls /api/stats, and the test waits until every
plot has points, then checks that every number on the page (elements with
data-key, the WebPush ones included) is the one /api/stats gives for the
same sample (?at=<the page's data-t>), and saves a screenshot.

DASHBOARD_SCREENSHOT=docs/dashboard.png also copies the two workers'
screenshot there, after DASHBOARD_WARMUP seconds of load (default 0) so
the plots fill out: that is how the README's picture is made.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import free_port, new_id
from tests.test_cluster import Device, cluster, memcached_proc, put, token_key  # noqa: F401

# `start`: the console-script server with its dashboard on
from tests.test_dashboard import TOKEN, WebPushDevice, post, start, stats  # noqa: F401

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Bounds for waiting on the page, not performance thresholds.
PAGE_TIMEOUT = 30.0
CHARTS = (
    "chart-updates",
    "chart-webpush",
    "chart-latency",
    "chart-webpush-latency",
    "chart-devices-traffic",
    "chart-devices",
    "chart-storage",
)
MIN_POINTS = 5


class Load(threading.Thread):
    """A few devices under a slowly swelling and ebbing stream of PUTs, acks and reconnects."""

    def __init__(self, server: Any, devices: int = 6, webpush: int = 3) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.devices = [self._device() for _ in range(devices)]
        self.webpush = [self._device(WebPushDevice) for _ in range(webpush)]

    def _device(self, kind: type[Device] = Device) -> tuple[Any, str, str]:
        device = kind(self.server)
        device.hello()
        chid = new_id()
        return device, chid, device.register(chid)

    def run(self) -> None:
        try:
            version = 0
            while not self.stop.is_set():
                version += 1
                device, chid, endpoint = random.choice(self.devices)
                assert put(endpoint, f"version={version}").status == 200
                device.recv()
                device.ack((chid, version))
                if version % 7 == 0:
                    assert put(self.server.url("/update/not-a-token"), "version=1").status == 404
                # WebPush alongside: a POST delivered live and acked; now and then a refused one
                pusher, pushed, push_endpoint = random.choice(self.webpush)
                assert post(push_endpoint).status == 201
                pusher.ack_version(pushed, pusher.receive(pushed))
                if version % 5 == 0:
                    assert post(self.server.url("/wpush/v1/not-a-token")).status == 404
                if version % 9 == 0:
                    assert post(push_endpoint, headers={"TTL": None}).status == 400
                if version % 11 == 0:
                    index = random.randrange(len(self.devices))
                    self.devices[index][0].disconnect()
                    assert put(self.devices[index][2], f"version={version}").status == 202
                    self.devices[index] = self._device()
                # the rate swells and ebbs, so that the plots show more than flat lines
                self.stop.wait(0.035 + 0.025 * math.sin(time.monotonic() / 15))
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=10)
        for device, _, _ in self.devices + self.webpush:
            device.ws.close(timeout=0)
        if self.error is not None:
            raise self.error


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} missing: the dashboard test needs a real browser;"
            " apt-get install chromium chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument("--window-size=1440,1700")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def lookup(view: dict[str, Any], key: str) -> Any:
    value: Any = view
    for part in key.split("/"):
        value = value[int(part)] if isinstance(value, list) else value.get(part)
    return value


# One atomic read of the page: the sample it shows and every number with its raw value.
READ_PAGE = """
return {
  t: document.getElementById('sample').dataset.t,
  shown: Array.from(document.querySelectorAll('[data-key]')).map(
    (el) => [el.dataset.key, el.dataset.value, el.textContent]),
  points: Object.fromEntries(Array.from(document.querySelectorAll('figure.chart svg')).map(
    (svg) => [svg.parentElement.id, Number(svg.dataset.points || 0)])),
  lines: document.querySelectorAll('figure.chart svg path.line').length,
  windows: Object.fromEntries(Array.from(document.querySelectorAll('figure.chart')).map(
    (figure) => [figure.id, figure.querySelector('.legend .window')?.textContent])),
  first_x: Math.min(...Array.from(document.querySelectorAll('#chart-devices path.line')).map(
    (path) => parseFloat(path.getAttribute('d').slice(1)))),
};
"""
# The plots' left margin (dashboard.js MARGIN.left): where a fresh server's first second is drawn.
PLOT_LEFT = 58.0
# What each chart's legend numbers cover, as its legend says.
LEGEND_WINDOWS = {
    "chart-updates": "last 5 s:",
    "chart-webpush": "last 5 s:",
    "chart-latency": "last 60 s:",
    "chart-webpush-latency": "last 60 s:",
    "chart-devices-traffic": "last 5 s:",
    "chart-devices": "now:",
    "chart-storage": "last check:",
}


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-workers"])
def test_the_page_plots_live_numbers_that_match_the_json(browser, tmp_path, request, processes):
    """One process with a token; two workers on memcached, without one, routing to each other."""
    from selenium.webdriver.support.ui import WebDriverWait

    if processes == 1:
        server, admin = request.getfixturevalue("start")(token=TOKEN)
        token, page_url = TOKEN, f"http://127.0.0.1:{admin}/?token={TOKEN}"
    else:
        admin = free_port()
        server = request.getfixturevalue("cluster")(processes=2, admin_port=admin)
        token, page_url = "", f"http://127.0.0.1:{admin}/"
    load = Load(server)
    load.start()
    try:
        time.sleep(float(os.environ.get("DASHBOARD_WARMUP", "0")))
        browser.get(page_url)
        assert browser.current_url == f"http://127.0.0.1:{admin}/"  # the token left the URL

        def plotted(driver: Any) -> dict[str, Any] | None:
            page = driver.execute_script(READ_PAGE)
            values = {key: value for key, value, _ in page["shown"]}
            ready = (
                page["t"]
                and all(page["points"].get(chart, 0) >= MIN_POINTS for chart in CHARTS)
                and json.loads(values.get("rates/delivered", "0")) > 0
                and json.loads(values.get("latency_ms/p99", "null")) is not None
                and json.loads(values.get("webpush/rates/incoming", "0")) > 0
                and json.loads(values.get("webpush/latency_ms/p99", "null")) is not None
            )
            return page if ready else None

        page = WebDriverWait(browser, PAGE_TIMEOUT, poll_frequency=0.25).until(plotted)
        same = stats(admin, f"?at={page['t']}", token=token)
        assert same["t"] == int(page["t"])
        keys = [key for key, _, _ in page["shown"]]
        assert {"devices", "rates/updates", "latency_ms/p50", "storage/ok", "memory_bytes"} <= set(
            keys
        )
        webpush_keys = {"incoming", "delivered", "stored", "routed", "rejected/401+403"}
        assert {f"webpush/rates/{key}" for key in webpush_keys} <= set(keys)
        assert {f"webpush/latency_ms/{key}" for key in ("p50", "p95", "p99", "count")} <= set(keys)
        assert {f"workers/{index}/webpush/rates/incoming" for index in range(processes)} <= set(
            keys
        )
        assert {f"workers/{index}/devices" for index in range(processes)} <= set(keys)
        if processes == 2:
            assert same["totals"].get("put.routed", 0) > 0
            assert same["totals"].get("post.routed", 0) > 0
        assert same["webpush"]["latency_ms"]["count"] > 0
        assert same["totals"]["post.invalid_token"] > 0
        for key, raw, shown in page["shown"]:
            assert json.loads(raw) == lookup(same, key), key
            assert shown.strip() or key == "storage/error", key
        # every rate line (PUT 5, WebPush 5, traffic 3, devices 1), storage and both latencies
        assert page["lines"] >= 18
        # Legends show the tiles' numbers (data-key, checked above) and say over what window.
        assert page["windows"] == LEGEND_WINDOWS
        assert {"rates/rejected/all", "webpush/rates/rejected/all", "storage/rtt_ms"} <= set(keys)
        if not os.environ.get("DASHBOARD_WARMUP"):
            # A server younger than 15 minutes: the time axis starts at its start.
            assert page["first_x"] == PLOT_LEFT
        screenshot = tmp_path / "dashboard.png"
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1440, height + 16)
        assert browser.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
        if os.environ.get("DASHBOARD_SCREENSHOT") and processes == 2:
            shutil.copyfile(screenshot, os.environ["DASHBOARD_SCREENSHOT"])
    finally:
        load.finish()
