"""wss:// and https:// on the public port, with a certificate made by the test."""

from __future__ import annotations

import dataclasses
import json
import ssl
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError
from tornado.websocket import websocket_connect

from simplepush.bench.selfsigned import write_self_signed
from simplepush.config import ConfigError, ServerSettings, Settings, StorageSettings, load
from simplepush.tokens import generate_key
from simplepush.wsframes import GOING_AWAY, NORMAL
from tests.conftest import Device

pytestmark = [pytest.mark.usefixtures("http_server"), pytest.mark.gen_test(timeout=30)]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (certfile, keyfile)."""
    return write_self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def storage_settings() -> StorageSettings:
    return StorageSettings(backend="memory")


@pytest.fixture
def server_settings(http_port: int, certificate: tuple[Path, Path]) -> Settings:
    certfile, keyfile = certificate
    server = dataclasses.replace(
        ServerSettings(),
        port=http_port,
        endpoint_url=f"https://127.0.0.1:{http_port}",
        token_key=(generate_key(),),
        ssl_certfile=str(certfile),
        ssl_keyfile=str(keyfile),
    )
    return Settings(server=server)


@pytest.fixture
def trusting(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    """A client context that trusts only the test's certificate, hostname checked."""
    return ssl.create_default_context(cafile=str(certificate[0]))


@pytest.fixture
def wss(http_port: int, trusting: ssl.SSLContext):
    opened: list[Device] = []

    async def _connect() -> Device:
        request = HTTPRequest(f"wss://127.0.0.1:{http_port}/", ssl_options=trusting)
        device = Device(await websocket_connect(request))
        opened.append(device)
        return device

    yield _connect
    for device in opened:
        device.close()


async def https_put(endpoint: str, body: str, context: ssl.SSLContext) -> tuple[int, bytes]:
    request = HTTPRequest(
        endpoint,
        method="PUT",
        body=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        ssl_options=context,
    )
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    return response.code, response.body


async def test_a_device_over_wss_gets_an_https_endpoint_and_its_updates(wss, trusting, http_port):
    device = await wss()
    await device.hello()
    channel = "c1b6a7d2-5a3e-4f8b-9c0d-1e2f3a4b5c6d"
    endpoint = await device.register(channel)
    assert endpoint.startswith(f"https://127.0.0.1:{http_port}/update/")
    assert await https_put(endpoint, "version=12&data=over%20tls", trusting) == (200, b"{}")
    message = await device.recv()
    assert message["updates"] == [{"channelID": channel, "version": 12, "data": "over tls"}]
    await device.ack(channel, 12)
    assert await device.request("{}") == {}


async def test_a_device_away_gets_what_was_stored_when_it_comes_back_over_wss(wss, trusting):
    device = await wss()
    await device.hello()
    channel = "d2c7b8e3-6b4f-4a9c-8d1e-2f3a4b5c6d7e"
    endpoint = await device.register(channel)
    uaid = device.uaid
    device.close()
    await device.expect_closed()
    assert (await https_put(endpoint, "version=3", trusting))[0] == 202
    again = await wss()
    await again.hello(uaid, [channel])
    assert (await again.recv())["updates"] == [{"channelID": channel, "version": 3}]


async def test_status_pages_answer_over_https(http_port, trusting):
    request = HTTPRequest(f"https://127.0.0.1:{http_port}/status", ssl_options=trusting)
    response = await AsyncHTTPClient().fetch(request)
    assert json.loads(response.body)["status"] == "OK"


async def test_closing_handshakes_over_tls_both_ways(wss, node):
    closing = await wss()
    await closing.hello()
    closing.conn.close(NORMAL)
    assert await closing.recv_text() is None
    assert closing.conn.close_code == NORMAL
    closed = await wss()
    await closed.hello()
    node.registry.close_all(GOING_AWAY, "server shutting down")
    assert await closed.expect_closed() == GOING_AWAY


async def test_plain_http_on_the_tls_port_gets_no_answer(http_port):
    with pytest.raises((StreamClosedError, HTTPClientError, ConnectionError)):
        await AsyncHTTPClient().fetch(f"http://127.0.0.1:{http_port}/status")


async def test_a_client_that_does_not_trust_the_certificate_is_refused(http_port):
    request = HTTPRequest(f"https://127.0.0.1:{http_port}/status")
    with pytest.raises(ssl.SSLError):
        await AsyncHTTPClient().fetch(request)


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.ini"
    path.write_text("[server]\n" + text)
    return str(path)


def test_tls_settings_that_cannot_work_are_one_line_config_errors(tmp_path, certificate):
    certfile, keyfile = certificate
    cases = {
        f"ssl_certfile = {certfile}\n": "ssl_keyfile: must be set too when ssl_certfile is",
        f"ssl_keyfile = {keyfile}\n": "ssl_certfile: must be set too when ssl_keyfile is",
        f"ssl_certfile = {tmp_path}/missing.pem\nssl_keyfile = {keyfile}\n": "cannot load",
        f"ssl_certfile = {keyfile}\nssl_keyfile = {keyfile}\n": "cannot load",
    }
    for text, fragment in cases.items():
        with pytest.raises(ConfigError) as error:
            load(write_config(tmp_path, text))
        message = str(error.value)
        assert fragment in message and "\n" not in message, message


def test_a_good_certificate_loads(tmp_path, certificate):
    certfile, keyfile = certificate
    settings = load(write_config(tmp_path, f"ssl_certfile = {certfile}\nssl_keyfile = {keyfile}\n"))
    assert settings.server.ssl_certfile == str(certfile)
