import orjson
from websockets.asyncio.client import connect

from tests.inproc import running_broker
from tests.wait import within


async def test_publish_reaches_pattern_subscriber_once() -> None:
    async with running_broker() as broker:
        url = f"ws://127.0.0.1:{broker.ws_port}/ws"
        async with connect(url) as sub, connect(url) as pub:
            await sub.send('{"op":"subscribe","id":1,"channel":"s.*"}')
            await sub.send('{"op":"subscribe","id":2,"channel":"s.>"}')
            assert orjson.loads(await within(sub.recv())) == {"op": "ok", "id": 1}
            assert orjson.loads(await within(sub.recv())) == {"op": "ok", "id": 2}
            await pub.send('{"op":"publish","id":"p","channel":"s.k","data":{"t":1}}')
            assert orjson.loads(await within(pub.recv())) == {"op": "ok", "id": "p"}
            assert orjson.loads(await within(sub.recv())) == {
                "op": "message",
                "channel": "s.k",
                "data": {"t": 1},
            }
            await sub.send('{"op":"ping","id":3}')
            # The next frame is the pong: the message above was not delivered twice.
            assert orjson.loads(await within(sub.recv())) == {"op": "pong", "id": 3}
