"""The Python client's pure parts: pattern matching, backoff, frame codec, error mapping.

Also what keeps the clients in step with the server: the wire codes of both
clients against ``broker_protocol``, the client's matcher against the
server's, and the direction of the imports between the client's modules.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import random
import re
from pathlib import Path

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker import channels as server_channels
from broker import codes as server_codes
from broker_client import (
    ERROR_CODES,
    Backoff,
    BadFrame,
    BadRequest,
    BrokerError,
    ConnectionClosed,
    Forbidden,
    Gap,
    Internal,
    OutboxFull,
    Position,
    PublishResult,
    RequestError,
    Subscription,
    Timeout,
    error_for_code,
    matches,
)
from broker_client._auth import refresh_delay
from broker_client._link import _BACK_OFF_CODES
from broker_client._outbox import MAX_WRITES, Lost, Outbox, Outgoing
from broker_client._table import Outcome, SubscriptionTable
from broker_client.frames import (
    GapNotice,
    Message,
    Reply,
    Unknown,
    Unsubscribed,
    check_key,
    check_replay,
    decode,
    encode,
)
from broker_protocol import CloseCode, ErrorCode

CLIENTS = Path(__file__).resolve().parent.parent / "clients"
PYTHON_CLIENT = CLIENTS / "python" / "broker_client"


# A small alphabet, so that tokens often coincide and patterns often match.
TOKENS = st.sampled_from(["a", "b", "c-1", "x:y", "_"])


@st.composite
def channel_and_pattern(draw: st.DrawFn) -> tuple[str, str]:
    """A valid channel and a valid pattern, the pattern often derived from the channel."""
    have = draw(st.lists(TOKENS, min_size=1, max_size=5))
    if draw(st.booleans()):
        # The channel with some tokens made wildcards, and sometimes one token more.
        want = [draw(st.sampled_from([token, "*"])) for token in have]
        want += draw(st.lists(st.one_of(TOKENS, st.just("*")), max_size=1))
    else:
        want = draw(st.lists(st.one_of(TOKENS, st.just("*")), min_size=1, max_size=5))
    if draw(st.booleans()):
        want = [*want[: draw(st.integers(0, len(want) - 1))], ">"]
    return ".".join(have), ".".join(want)


@settings(max_examples=500, deadline=None)
@given(channel_and_pattern())
@example(("a", ">"))
@example(("a", "a.>"))
@example(("a.b", "a.*.>"))
def test_matches_agrees_with_the_server(case: tuple[str, str]) -> None:
    channel, pattern = case
    server_channels.check_channel(channel)
    server_channels.check_pattern(pattern)
    assert matches(pattern, channel) is server_channels.matches(pattern, channel)


def test_backoff_is_jittered_capped_and_resets() -> None:
    backoff = Backoff(0.1, 2.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(20)]
    assert 0 <= delays[0] <= 0.1
    assert all(0.1 <= d <= 2.0 for d in delays[1:])
    assert max(delays) > 1.0  # it grows towards the cap
    assert len(set(delays)) == len(delays)  # jittered
    backoff.reset()
    assert backoff.next_delay() <= 0.1
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_encode_leaves_out_a_missing_id() -> None:
    assert orjson.loads(encode("publish", None, channel="a", data=None)) == {
        "op": "publish",
        "channel": "a",
        "data": None,
    }
    assert orjson.loads(encode("ping", 3)) == {"op": "ping", "id": 3}


def test_decode_server_frames() -> None:
    message = decode(b'{"op":"message","channel":"a.b","data":{"t":1},"offset":7}')
    assert message == Message("a.b", {"t": 1})
    assert isinstance(message, Message) and message.extra == {"offset": 7}
    assert decode('{"op":"ok","id":1}') == Reply("ok", 1)
    error = decode(b'{"op":"error","id":null,"code":"forbidden","message":"no"}')
    assert error == Reply("error", None, "forbidden", "no")
    assert decode(b'{"op":"presence","who":[]}') == Unknown("presence")
    for bad in (b"nope", b"[1]", b'{"op":"message"}', b'{"id":1}', b'{"op":"ok","id":[1]}'):
        with pytest.raises(BadFrame):
            decode(bad)


def test_error_tree() -> None:
    assert ERROR_CODES == server_codes.ERROR_CODES
    for code in ERROR_CODES:
        exc = error_for_code(code, "why", request_id=5)
        assert exc.code == code and exc.message == "why" and exc.request_id == 5
        assert type(exc) is not RequestError
    assert isinstance(error_for_code("forbidden", "x"), Forbidden)
    assert isinstance(error_for_code("internal", "x"), Internal)
    future = error_for_code("new_code", "from a newer broker")
    assert type(future) is RequestError and future.code == "new_code"
    assert str(future) == "new_code: from a newer broker"
    timeout = Timeout("slow")
    assert isinstance(timeout, BrokerError) and isinstance(timeout, TimeoutError)
    assert timeout.code == "timeout"


# --- the wire codes: one source, checked in every client ----------------------


def test_every_error_code_has_its_exception_class() -> None:
    for code in ErrorCode:
        exc = error_for_code(code, "why")
        assert type(exc) is not RequestError, f"no exception class for {code!r}"
        assert exc.code == code and type(exc.code) is str  # a plain str to users
    classes = RequestError.__subclasses__()
    assert sorted(cls.code for cls in classes) == sorted(ErrorCode)


def test_the_browser_client_has_the_same_codes() -> None:
    source = (CLIENTS / "js" / "broker.js").read_text(encoding="utf-8")
    listed = re.search(r"export const ERROR_CODES = Object\.freeze\(\[(.*?)\]\);", source, re.S)
    assert listed is not None, "ERROR_CODES not found in broker.js"
    assert re.findall(r'"(\w+)"', listed.group(1)) == [code.value for code in ErrorCode]

    types = (CLIENTS / "js" / "broker.d.ts").read_text(encoding="utf-8")
    declared = re.search(r"export type ErrorCode =(.*?);", types, re.S)
    assert declared is not None, "type ErrorCode not found in broker.d.ts"
    assert re.findall(r'"(\w+)"', declared.group(1)) == [code.value for code in ErrorCode]

    # The close codes it treats specially are the Python client's, and the
    # protocol's; the ones it sends are the protocol's or private (4000-4999).
    compared = {int(c) for c in re.findall(r"\bcode === (\d+)", source)}
    assert compared == _BACK_OFF_CODES
    sent = {int(c) for c in re.findall(r"\.close\((\d+)", source)}
    assert CloseCode.NORMAL in sent
    assert all(c in set(CloseCode) or 4000 <= c < 5000 for c in sent), sent


# --- the client's modules import downwards only --------------------------------

# Each module may import only modules of the layers below its own.
LAYERS = [
    {"client", "async_http"},
    {"_link", "http"},
    {"_requests"},
    {"_session"},
    {"_auth", "_outbox", "_table", "_hooks"},
    {"subscription", "backoff"},
    {"frames"},
    {"errors"},
]
NO_IO = {"_auth", "_table", "frames", "errors", "backoff"}


def _client_imports(name: str) -> set[str]:
    """The modules ``broker_client.<name>`` imports, as absolute names."""
    tree = ast.parse((PYTHON_CLIENT / f"{name}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "broker_client." if node.level else ""
            found.add(base + (node.module or ""))
    return found


def test_every_client_module_is_in_a_layer() -> None:
    modules = {p.stem for p in PYTHON_CLIENT.glob("*.py")} - {"__init__"}
    assert modules == set().union(*LAYERS), "new module: put it in a layer in this test"


@pytest.mark.parametrize("depth", range(len(LAYERS)))
def test_client_modules_import_downwards_only(depth: int) -> None:
    allowed = set().union(*LAYERS[depth + 1 :])
    for name in LAYERS[depth]:
        imported = _client_imports(name)
        ours = {m.removeprefix("broker_client.") for m in imported if m.startswith("broker_client")}
        assert ours <= allowed, f"{name} imports {sorted(ours - allowed)}"
        assert not any(m == "broker" or m.startswith("broker.") for m in imported), name
        if name in NO_IO:
            assert not imported & {"asyncio", "websockets", "socket", "urllib.request"}, name


# --- version 2: frames, positions, gaps, tokens, the outbox (no I/O) ---------------------


def test_decode_version_2_frames() -> None:
    assert decode(b'{"op":"gap","channel":"a.>","reason":"offset_hole"}') == GapNotice(
        "a.>", "offset_hole"
    )
    assert decode(b'{"op":"unsubscribed","channel":"a.b","code":"forbidden"}') == Unsubscribed(
        "a.b", "forbidden"
    )
    for bad in (b'{"op":"gap","channel":"a"}', b'{"op":"unsubscribed","code":"forbidden"}'):
        with pytest.raises(BadFrame):
            decode(bad)
    message = decode(b'{"op":"message","channel":"a","data":1,"offset":7,"epoch":"e"}')
    assert isinstance(message, Message)
    assert (message.offset, message.epoch, message.position) == (7, "e", Position(7, "e"))
    plain = Message("a", 1)
    assert (plain.offset, plain.epoch, plain.position) == (None, None, None)
    assert PublishResult.from_fields({"offset": 3, "epoch": "e", "duplicate": True}) == (
        PublishResult(3, "e", True)
    )
    assert PublishResult.from_fields({"ok": True, "offset": True}) == PublishResult()


def test_gap_stays_a_frozen_dataclass_and_takes_a_channel() -> None:
    gap = Gap("trimmed", 1.0, 2.0, channel="a.b")
    assert (gap.reason, gap.dropped, gap.channel) == ("trimmed", 0, "a.b")
    assert Gap("reconnect", 1.0, 2.0).channel is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        gap.reason = "reconnect"  # type: ignore[misc]


def test_check_replay_and_check_key_refuse_what_the_broker_would() -> None:
    assert check_replay(("a.b",), (3, "e"), None) == Position(3, "e")
    assert check_replay(("a.b",), None, 5) is None
    assert check_replay(("a.*", "b"), None, None) is None
    for patterns, since, history in [
        (("a.*",), (1, "e"), None),
        (("a.>",), None, 1),
        (("a",), (1, "e"), 2),
        (("a",), (-1, "e"), None),
        (("a",), (True, "e"), None),
        (("a",), (1, 2), None),
        (("a",), "nope", None),
        (("a",), None, 0),
    ]:
        with pytest.raises(BadRequest):
            check_replay(patterns, since, history)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        check_replay(("a", "b"), None, 1)
    assert check_key("k" * 128) == "k" * 128
    with pytest.raises(BadRequest):
        check_key("")
    with pytest.raises(TypeError):
        check_key(1)


def _confirmed(table: SubscriptionTable, *patterns: str) -> Subscription:
    async def unsubscribe(sub: Subscription) -> None:
        return None

    sub = Subscription(patterns, unsubscribe=unsubscribe)
    table.add_pending(sub)
    table.activate(sub, 1)
    return sub


def _message(channel: str, offset: int, epoch: str = "e") -> Message:
    return Message(channel, offset, {"offset": offset, "epoch": epoch})


def _drain(sub: Subscription) -> list[object]:
    items = list(sub._items)
    sub._items.clear()
    return [i.data if isinstance(i, Message) else (i.reason, i.channel) for i in items]


def test_table_drops_replayed_copies_and_sees_epoch_changes() -> None:
    table = SubscriptionTable()
    exact = _confirmed(table, "a.b")
    pattern = _confirmed(table, "a.*")
    table.confirm(None, "a.b", {"offset": 2, "epoch": "e"})
    assert table.position("a.b") == Position(2, "e")
    for offset in (3, 2, 4, 3, 5):
        table.route(_message("a.b", offset))
    table.route(_message("a.b", 1, "f"))
    assert _drain(exact) == [3, 4, 5, ("epoch_changed", "a.b"), 1]
    # A pattern sees what comes: it is not tracked (at least once).
    assert _drain(pattern) == [3, 2, 4, 3, 5, 1]
    assert table.position("a.b") == Position(1, "f")
    table.route(_message("a.c", 9))
    assert _drain(exact) == [] and _drain(pattern) == [9]
    assert table.position("a.c") is None  # only exact channels held are tracked


def test_table_outcomes_of_re_subscriptions() -> None:
    table = SubscriptionTable()
    recovered = _confirmed(table, "a.b")
    lost = _confirmed(table, "a.c")
    mixed = _confirmed(table, "a.d", "x.>")
    for channel in ("a.b", "a.c", "a.d"):
        table.confirm(None, channel, {"offset": 4, "epoch": "e"})
    since = Position(4, "e")
    outcomes = {
        "a.b": table.confirm(
            None, "a.b", {"recovered": True, "offset": 6, "epoch": "e"}, since=since
        ),
        "a.c": table.confirm(
            None,
            "a.c",
            {"recovered": False, "reason": "trimmed", "offset": 9, "epoch": "e"},
            since=since,
            lost_since=1.0,
        ),
        "a.d": table.confirm(
            None, "a.d", {"recovered": True, "offset": 4, "epoch": "e"}, since=since
        ),
        "x.>": table.confirm(None, "x.>", {}),
    }
    assert outcomes == {
        "a.b": Outcome.RECOVERED,
        "a.c": Outcome.REPORTED,
        "a.d": Outcome.RECOVERED,
        "x.>": Outcome.LOST,
    }
    assert table.position("a.b") == Position(4, "e") and table.position("a.c") == Position(9, "e")
    [trimmed] = list(lost._items)
    assert isinstance(trimmed, Gap) and (trimmed.reason, trimmed.channel, trimmed.since) == (
        "trimmed",
        "a.c",
        1.0,
    )
    table.mark_gap(Gap("reconnect", 1.0, 2.0), 2, outcomes)
    assert _drain(recovered) == [] and _drain(lost) == [("trimmed", "a.c")]
    assert _drain(mixed) == [("reconnect", None)]  # its pattern could not be recovered


def test_table_refuse_returns_the_other_patterns_to_drop() -> None:
    table = SubscriptionTable()
    ended = _confirmed(table, "a", "b")
    kept = _confirmed(table, "b", "c")
    error = Forbidden("no")
    assert table.refuse("a", error) == []  # b is still held by the other subscription
    assert ended.closed and not kept.closed
    assert table.refuse("c", error) == ["b"]
    assert table.patterns() == []
    table.gap("b", "backplane_interrupted")  # nobody holds it: nothing happens


def test_refresh_delay_is_in_the_last_tenth_to_fifth_and_a_few_seconds_early() -> None:
    rng = random.Random(3)
    for lifetime in (3600.0, 600.0, 60.0):
        delays = [refresh_delay(lifetime, rng) for _ in range(200)]
        assert all(lifetime * 0.8 - 1e-9 <= d <= lifetime - 5.0 for d in delays)
        assert len(set(delays)) > 100  # jittered
    assert refresh_delay(3.0, rng) == 1.5  # half the lifetime early, at most
    assert refresh_delay(0.0, rng) == 1.0  # never a busy loop


async def test_outbox_requeues_keyed_publishes_in_order_and_fails_the_others() -> None:
    outbox = Outbox(limit=3)
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[Reply] = loop.create_future()
    unkeyed = Outgoing("c", b"1", None, waiter)
    keyed = Outgoing("c", b"2", "k")
    plain = Outgoing("c", b"3")
    for item in (unkeyed, keyed, plain):
        outbox.put(item)
    outbox.put(Outgoing("c", b"4"))
    with pytest.raises(OutboxFull):
        outbox.put(Outgoing("c", b"5"))
    ids = iter(range(1, 100))
    taken = [outbox.take(lambda: next(ids)) for _ in range(3)]
    assert [t[1] for t in taken if t] == [1, 2, None]  # fire and forget: no id
    assert orjson.loads(keyed.frame(2)) == {
        "op": "publish",
        "id": 2,
        "channel": "c",
        "data": 2,
        "key": "k",
    }
    assert outbox.connection_lost() == []
    assert isinstance(waiter.exception(), Lost)
    # The keyed one goes back in front of what was never written.
    assert [i.data for i in outbox._queue] == [b"2", b"4"]
    for _ in range(MAX_WRITES - 2):  # written once already
        taken_again = outbox.take(lambda: next(ids))
        assert taken_again is not None and taken_again[0] is keyed
        outbox.connection_lost()
    given_up = outbox.take(lambda: next(ids))
    assert given_up is not None and given_up[0] is keyed
    assert outbox.connection_lost() == [keyed]  # written MAX_WRITES times: given up
    assert len(outbox) == 1
    assert outbox.close(ConnectionClosed("closed")) == 1
