"""Offsets, history, recovery and idempotent publishes through a real server (memory).

The same scenarios across processes on Redis, and under faults, are in
``test_delivery_faults.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from broker.app import Running
from tests.inproc import running_broker
from tests.wait import within

RULES = [
    {"pattern": "h.>", "history_size": 50, "history_ttl": 300},
    {"pattern": "tiny.>", "history_size": 3},
    {"pattern": "hot.>", "history_size": 1000},
]


def url(broker: Running) -> str:
    return f"ws://127.0.0.1:{broker.ws_port}/ws"


async def send(ws: ClientConnection, **frame: Any) -> None:
    await ws.send(orjson.dumps(frame).decode())


async def recv(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    frame: dict[str, Any] = orjson.loads(await within(ws.recv(), timeout))
    return frame


async def call(ws: ClientConnection, **frame: Any) -> dict[str, Any]:
    await send(ws, **frame)
    return await recv(ws)


async def publish(ws: ClientConnection, channel: str, count: int, start: int = 0) -> list[Any]:
    """Publish ``count`` numbered messages with ids; return their acks in order."""
    for i in range(start, start + count):
        await send(ws, op="publish", id=i, channel=channel, data={"n": i})
    return [await recv(ws) for _ in range(count)]


async def test_history_channels_carry_offsets_and_epochs_others_do_not() -> None:
    async with running_broker(channels=RULES) as broker, connect(url(broker)) as ws:
        sub = await call(ws, op="subscribe", id="s", channel="h.a")
        assert sub == {"op": "ok", "id": "s", "offset": 0, "epoch": sub["epoch"]}
        acks = await publish(ws, "h.a", 1)
        message, ack = (acks[0], await recv(ws)) if acks[0]["op"] == "message" else (None, None)
        assert message is not None and ack is not None
        assert message == {
            "op": "message", "channel": "h.a", "data": {"n": 0}, "offset": 1,
            "epoch": sub["epoch"],
        }  # fmt: skip
        assert ack == {"op": "ok", "id": 0, "offset": 1, "epoch": sub["epoch"]}
        plain = await call(ws, op="subscribe", id="p", channel="plain")
        assert plain == {"op": "ok", "id": "p"}
        await send(ws, op="publish", id=9, channel="plain", data=1)
        assert await recv(ws) == {"op": "message", "channel": "plain", "data": 1}
        assert await recv(ws) == {"op": "ok", "id": 9}


async def test_since_replays_exactly_what_was_missed_then_goes_live() -> None:
    async with running_broker(channels=RULES) as broker, connect(url(broker)) as pub:
        acks = await publish(pub, "h.a", 5)
        epoch = acks[0]["epoch"]
        async with connect(url(broker)) as sub:
            reply = await call(
                sub, op="subscribe", id=1, channel="h.a", since={"offset": 2, "epoch": epoch}
            )
            assert reply == {
                "op": "ok",
                "id": 1,
                "recovered": True,
                "offset": 5,
                "epoch": epoch,
            }
            replayed = [await recv(sub) for _ in range(3)]
            assert [m["offset"] for m in replayed] == [3, 4, 5]
            assert [m["data"]["n"] for m in replayed] == [2, 3, 4]
            await publish(pub, "h.a", 1, start=5)
            assert (await recv(sub))["offset"] == 6


@pytest.mark.parametrize(
    ("since", "reason"),
    [
        ({"offset": 1, "epoch": "not-this-one"}, "epoch_changed"),
        ({"offset": 99, "epoch": None}, "epoch_changed"),
        ({"offset": 0, "epoch": None}, "trimmed"),
    ],
)
async def test_never_a_partial_replay(since: dict[str, Any], reason: str) -> None:
    async with running_broker(channels=RULES) as broker, connect(url(broker)) as ws:
        acks = await publish(ws, "tiny.a", 6)
        epoch = acks[0]["epoch"]
        since = {**since, "epoch": since["epoch"] or epoch}
        reply = await call(ws, op="subscribe", id="r", channel="tiny.a", since=since)
        assert reply == {
            "op": "ok", "id": "r", "recovered": False, "reason": reason, "offset": 6,
            "epoch": epoch,
        }  # fmt: skip
        await publish(ws, "tiny.a", 1, start=6)
        assert (await recv(ws))["offset"] == 7  # nothing replayed, live goes on


async def test_since_on_a_channel_without_history() -> None:
    async with running_broker(channels=RULES) as broker, connect(url(broker)) as ws:
        reply = await call(
            ws, op="subscribe", id=1, channel="plain", since={"offset": 3, "epoch": "e"}
        )
        assert reply == {"op": "ok", "id": 1, "recovered": False, "reason": "no_history"}
        reply = await call(ws, op="subscribe", id=2, channel="other", history=3)
        assert reply["code"] == "bad_request"


async def test_history_n_gives_the_last_n_then_live() -> None:
    async with running_broker(channels=RULES) as broker, connect(url(broker)) as ws:
        await publish(ws, "h.state", 10)
        reply = await call(ws, op="subscribe", id="h", channel="h.state", history=4)
        assert (reply["op"], reply["offset"]) == ("ok", 10)
        got = [await recv(ws) for _ in range(4)]
        assert [m["offset"] for m in got] == [7, 8, 9, 10]
        await publish(ws, "h.state", 1, start=10)
        assert (await recv(ws))["offset"] == 11


async def test_a_keyed_retry_is_acknowledged_as_a_duplicate_and_not_delivered() -> None:
    async with (
        running_broker(channels=RULES) as broker,
        connect(url(broker)) as pub,
        connect(url(broker)) as sub,
    ):
        await call(sub, op="subscribe", id=1, channel="h.k")
        await call(sub, op="subscribe", id=2, channel="plain")
        first = await call(pub, op="publish", id=1, channel="h.k", data=1, key="order-42")
        again = await call(pub, op="publish", id=2, channel="h.k", data=1, key="order-42")
        assert first == {"op": "ok", "id": 1, "offset": 1, "epoch": first["epoch"]}
        assert again == {**first, "id": 2, "duplicate": True}
        assert (await call(pub, op="publish", id=3, channel="plain", data=2, key="k")) == {
            "op": "ok", "id": 3,
        }  # fmt: skip
        assert (await call(pub, op="publish", id=4, channel="plain", data=2, key="k")) == {
            "op": "ok", "id": 4, "duplicate": True,
        }  # fmt: skip
        # The same key on another channel is another message.
        other = await call(pub, op="publish", id=5, channel="h.other", data=3, key="order-42")
        assert "duplicate" not in other
        delivered = [await recv(sub) for _ in range(2)]
        assert [(m["channel"], m["data"]) for m in delivered] == [("h.k", 1), ("plain", 2)]
        with pytest.raises(TimeoutError):
            await recv(sub, timeout=0.3)


async def test_many_clients_recover_while_a_publisher_hammers_the_channel() -> None:
    """Every client ends with a contiguous run of offsets, no duplicate, no hole."""
    total = 600
    async with running_broker(channels=RULES, max_connections=1000) as broker:
        async with connect(url(broker)) as pub:
            warm = await publish(pub, "hot.x", 20)
            epoch = warm[0]["epoch"]

            async def hammer() -> None:
                for i in range(20, total):
                    await send(pub, op="publish", channel="hot.x", data={"n": i})
                    if i % 50 == 0:
                        await asyncio.sleep(0)

            async def recovering_client(since: int) -> list[int]:
                async with connect(url(broker), max_queue=None) as ws:
                    reply = await call(
                        ws, op="subscribe", id=1, channel="hot.x",
                        since={"offset": since, "epoch": epoch},
                    )  # fmt: skip
                    assert reply["recovered"] is True, reply
                    offsets = [since]
                    while offsets[-1] < total:
                        frame = await recv(ws, timeout=20)
                        offsets.append(frame["offset"])
                    return offsets[1:]

            clients = [recovering_client(since) for since in range(0, 20) for _ in range(5)]
            results = await within(asyncio.gather(hammer(), *clients), 60)
        for since_index, offsets in enumerate(results[1:]):
            since = since_index // 5
            assert offsets == list(range(since + 1, total + 1)), (since, offsets[:20])
    print(f"messages_lost_silently=0 ({len(results) - 1} clients, {total} messages)")


async def test_while_history_cannot_be_read_a_plain_subscribe_is_still_taken() -> None:
    """Only a replay needs history now; a plain subscribe is answered without a position."""
    from broker.backplane.memory import MemoryBackplane

    backplane = MemoryBackplane()
    async with running_broker(backplane, channels=RULES) as broker, connect(url(broker)) as ws:
        backplane.fail_reads = True
        assert await call(ws, op="subscribe", id=1, channel="h.a") == {"op": "ok", "id": 1}
        reply = await call(ws, op="subscribe", id=2, channel="h.b", history=2)
        assert (reply["code"], reply["id"]) == ("unavailable", 2)
        reply = await call(
            ws, op="subscribe", id=3, channel="h.c", since={"offset": 0, "epoch": "e"}
        )
        assert (reply["code"], reply["id"]) == ("unavailable", 3)
        backplane.fail_reads = False
        await send(ws, op="publish", id=4, channel="h.a", data=1)
        assert (await recv(ws))["offset"] == 1  # subscribed all along
