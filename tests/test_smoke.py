import pytest

from tests.conftest import new_id


@pytest.mark.gen_test
async def test_hello_register_put_ack(connect, put):
    device = await connect()
    await device.hello()
    chid = new_id()
    endpoint = await device.register(chid)
    response = await put(endpoint, "version=7")
    assert (response.code, response.body) == (200, b"{}")
    assert await device.recv() == {
        "messageType": "notification",
        "updates": [{"channelID": chid, "version": 7}],
    }
    await device.ack(chid, 7)
    await device.expect_silence()
