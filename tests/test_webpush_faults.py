"""WebPush when storage is down: 503 errno 201 with Retry-After, and nothing queued.

The server here uses a memcached of its own, which the test stops; the
other backends' storage faults are tested with their own stores.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from simplepush.config import StorageSettings
from tests.conftest import Memcached
from tests.webpush_device import assert_error, assert_retry_after, push, webpush_device

pytestmark = pytest.mark.gen_test(timeout=15)


@pytest.fixture
def own_memcached() -> Iterator[Memcached]:
    server = Memcached()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def storage_settings(own_memcached: Memcached) -> StorageSettings:
    """This module's server uses its own memcached, so the test may stop it."""
    return StorageSettings(backend="memcached", servers=(own_memcached.address,), timeout=1.0)


@pytest.fixture
def origin(http_port: int) -> str:
    return f"http://127.0.0.1:{http_port}"


async def test_storage_down_is_503_with_retry_after(connect, origin, own_memcached):
    device = await webpush_device(connect, origin)
    subscription = await device.register()
    own_memcached.stop()
    response, _ = await push(subscription, b"nowhere to keep it", ttl=60)
    assert_error(response, 503, 201)
    assert_retry_after(response)
    # memcached closed the connection: the device is told to come back and say hello (1012)
    assert await device.device.expect_closed() == 1012
