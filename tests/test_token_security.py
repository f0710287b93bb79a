"""Endpoint tokens over the wire: only a URL the server handed out reaches a channel.

The codec's own properties are in test_protocol.py; here a real server
answers, on both backends, and nothing it stores changes on a refusal.
"""

from __future__ import annotations

import base64
import json
import uuid

import pytest

from simplepush.tokens import TokenCodec
from tests.conftest import token_of

pytestmark = [pytest.mark.usefixtures("http_server"), pytest.mark.gen_test(timeout=30)]

OLD_KEY = "4ySzL_0mzFfvBnxg8WJ0S3uB0NnNZSmpgWmbLHbxY1s="
NEW_KEY = "h0sQ5mXU1kQxVTrU6Wz7n5zJb0lY3qzEoX1d3FhPZxU="
INVALID_TOKEN = {"status": 404, "error": "Invalid Token"}


def base_of(endpoint: str) -> str:
    return endpoint.rsplit("/update/", 1)[0] + "/update/"


def padded(token: str) -> str:
    return token + "=" * (-len(token) % 4)


def forgeries(token: str) -> dict[str, str]:
    """Every way a token can be bent while still looking like one."""
    raw = base64.urlsafe_b64decode(padded(token))
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x01
    middle = len(token) // 2
    swapped = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    return {
        "one character changed": swapped,
        "one bit of the ciphertext flipped": base64.urlsafe_b64encode(flipped).decode().rstrip("="),
        "truncated by one": token[:-1],
        "truncated by half": token[: len(token) // 2],
        "extended": token + "AAAA",
        "padded": padded(token) if len(token) % 4 else token + "====",
        "standard base64": base64.b64encode(raw).decode(),
        "percent-encoded": "".join(f"%{ord(c):02X}" for c in token),
        "upper-cased": token.upper(),
    }


async def test_a_bent_token_is_404_and_changes_nothing(connect, put):
    device = await connect()
    await device.hello()
    channel = str(uuid.uuid4())
    endpoint = await device.register(channel)
    while not set(token_of(endpoint)) & set("-_"):  # else standard base64 spells it the same
        endpoint = await device.register(channel)
    token = token_of(endpoint)
    for how, forged in forgeries(token).items():
        assert forged != token, how
        response = await put(base_of(endpoint) + forged, "version=5")
        assert (response.code, json.loads(response.body)) == (404, INVALID_TOKEN), how
    await device.expect_silence()
    assert (await put(endpoint, "version=6")).code == 200
    assert (await device.recv())["updates"] == [{"channelID": channel, "version": 6}]


async def test_a_token_from_a_foreign_key_is_404_and_creates_no_uaid(connect, put, ws_url):
    uaid, channel = uuid.uuid4().hex, str(uuid.uuid4())
    foreign = TokenCodec([OLD_KEY]).encode(uaid, uuid.UUID(channel).hex)
    device = await connect()
    await device.hello()
    endpoint = await device.register()
    response = await put(base_of(endpoint) + foreign, "version=5")
    assert (response.code, json.loads(response.body)) == (404, INVALID_TOKEN)
    stranger = await connect()
    reply = await stranger.hello(uaid, [channel])
    assert reply["uaid"] != uaid, "the refused PUT left a record behind"


@pytest.mark.server(token_key=(NEW_KEY, OLD_KEY))
async def test_after_rotation_old_urls_still_work_and_new_ones_use_the_new_key(connect, put):
    device = await connect()
    await device.hello()
    channel = str(uuid.uuid4())
    endpoint = await device.register(channel)
    assert TokenCodec([NEW_KEY]).decode(token_of(endpoint)) is not None
    old_url = base_of(endpoint) + TokenCodec([OLD_KEY]).encode(device.uaid, uuid.UUID(channel).hex)
    assert (await put(old_url, "version=7")).code == 200
    assert (await device.recv())["updates"] == [{"channelID": channel, "version": 7}]


@pytest.mark.server(token_key=(NEW_KEY,))
async def test_once_the_old_key_is_removed_its_urls_are_404(connect, put):
    device = await connect()
    await device.hello()
    channel = str(uuid.uuid4())
    endpoint = await device.register(channel)
    old_url = base_of(endpoint) + TokenCodec([OLD_KEY]).encode(device.uaid, uuid.UUID(channel).hex)
    response = await put(old_url, "version=7")
    assert (response.code, json.loads(response.body)) == (404, INVALID_TOKEN)
    await device.expect_silence()


async def test_an_endpoint_url_reveals_neither_uaid_nor_channel_id(connect):
    device = await connect()
    await device.hello()
    channel = str(uuid.uuid4())
    endpoints = [await device.register(channel) for _ in range(3)]
    uaid, chid = uuid.UUID(device.uaid), uuid.UUID(channel)
    for endpoint in endpoints:
        text = endpoint.lower()
        raw = base64.urlsafe_b64decode(padded(token_of(endpoint)))
        for value in (uaid, chid):
            assert value.hex not in text and str(value) not in text
            assert value.bytes not in raw and value.hex.encode() not in raw
    assert len(set(endpoints)) == 3, "the same channel must get a fresh URL each time"
