"""The receiving half of the Redis backplane: one subscriber link, kept up.

Theory of operation
-------------------

redis-py's ``PubSub`` reconnects and re-subscribes on its own when its
connection drops, losing messages without telling anybody (see the shared
FACTS), so the receiving connection is driven by hand, on a redis-py
connection of our own.

A *link* (``SubscriberLink``) is that connection plus everything Redis
confirmed on it: its subscriptions, and the de-duplication state of its
stream. When anything goes wrong the link is thrown away whole and a new one
built. Each link has two tasks. Its *reader* reads every reply and hands it
to the ``Dispatcher``, which calls ``deliver()`` synchronously. Its *health*
task sends ``PING`` every ``socket_timeout`` seconds (at once when a publish
failed) and gives up on the link when nothing comes back within
``socket_timeout``: that is how a half-open or black-holed link is noticed,
within two ``socket_timeout``.

The ``Receiver`` keeps one link up; its ``run()`` is the backplane's
*supervisor* task. It connects (every step bounded by ``socket_timeout``,
redis-py's retries off), re-subscribes everything still wanted, reports the
link up (the backplane turns ``ready`` on), waits until the link is lost,
reports it down (``ready`` off, queued publishes failed), then reconnects: at
once the first time, then with capped exponential backoff and jitter
(``broker.backoff``). It logs one warning when the link is lost and one info
line when it is back, only debug lines in between.

Link events, for the backplane's ``Listener``:

* ``link_lost()``: once per established link that is lost, after that link's
  reader has stopped (so no delivery from it follows) and ``ready`` is false.
  Not for connection attempts that fail while down, and not for ``close()``.
* ``link_restored()``: once, when the first link after a loss is up with
  every wanted subscription restored and ``ready`` is true again. Not for the
  very first connection. Messages on the new link may be delivered before it,
  as soon as the first subscriptions are confirmed.

Subscriptions follow the backplane's interest: ``reconcile()`` compares, under
one lock, what is wanted with what the current link has confirmed, sends the
one command needed and waits for Redis's confirmation (the link counts them).
The lock and the re-check after it make racing calls for the same pattern end
in the state of the last call. Restoring a new link holds the same lock.

Messages: one publish reaches this process once per matching Redis
subscription, the copies back to back on the link; the link's
``Deduplicator`` keeps the first (on a cluster the ``Dispatcher`` picks the
copy by its shard channel instead). The channel is checked (a glob can match
names that are not broker channels) through a small cache. ``data`` is parsed
as JSON only when nobody checked it yet: a bare payload, or an envelope whose
id is not a broker node's (``redis_wire.from_broker_node``); a broker node
validated its own data when it was published. Malformed messages are dropped
and counted, with one log line per 1,000.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable, Collection
from typing import Any

from redis.exceptions import ResponseError

from broker.backoff import backoff_delay
from broker.backplane import Listener
from broker.backplane.cluster_map import shard_target, split_head
from broker.backplane.dedupe import Deduplicator
from broker.backplane.redis_publisher import (
    LINK_ERRORS,
    Publisher,
    RedisConnection,
    describe_error,
    disconnect_quietly,
    is_redirect,
)
from broker.backplane.redis_wire import (
    EnvelopeError,
    RedisSubscription,
    channel_from_redis,
    decode_envelope,
    from_broker_node,
)
from broker.codec import check_data
from broker.exceptions import BackplaneError, BadFrame

__all__ = ["Dispatcher", "Receiver", "SubscriberLink", "close_pair", "stop_tasks"]

logger = logging.getLogger(__name__)

#: Most names in one SUBSCRIBE or PSUBSCRIBE when restoring after a reconnect.
_RESTORE_CHUNK = 512
#: Log one line per this many dropped messages (and the first one).
_LOG_EVERY = 1000
#: Redis channel names remembered with their broker name (or None: invalid).
_NAME_CACHE = 4096
#: Ceiling of the first wait between reconnect attempts, in seconds; it doubles.
_RECONNECT_BASE = 0.1

_VERBS = {
    (True, False): "SUBSCRIBE",
    (True, True): "PSUBSCRIBE",
    (False, False): "UNSUBSCRIBE",
    (False, True): "PUNSUBSCRIBE",
}
#: Sharded pub/sub (a Redis Cluster): one verb each way, no patterns.
_SHARD_VERBS = {True: "SSUBSCRIBE", False: "SUNSUBSCRIBE"}
_CONFIRMATIONS = frozenset(
    {b"subscribe", b"unsubscribe", b"psubscribe", b"punsubscribe", b"ssubscribe", b"sunsubscribe"}
)


class SubscriberLink:
    """One receiving connection and the subscriptions Redis confirmed on it.

    ``timeout`` bounds the wait for each confirmation. ``lost`` is set once, when
    the link ends for any reason (``error`` says why); a link is never reused.
    """

    def __init__(self, conn: RedisConnection, timeout: float) -> None:
        self.conn = conn
        self.timeout = timeout
        self.active: set[RedisSubscription] = set()
        self.dedupe = Deduplicator()
        #: On a cluster: the last copy read on a channel's own shard channel, whose
        #: bucket copy (if it is next) is dropped. See ``Dispatcher``.
        self.last_own: tuple[bytes, bytes] | None = None
        self.reads = 0  # replies read so far: proof the link is alive
        self.pong = asyncio.Event()
        self.lost = asyncio.Event()
        self.error: BaseException | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self._confirm_left = 0
        self._confirm_kind = b""
        self._confirmed: asyncio.Future[None] | None = None

    async def send(self, *args: bytes | str) -> None:
        """Send one command; raises ``BackplaneError`` once the link has ended."""
        # Never let redis-py reconnect this connection behind our back.
        if self.lost.is_set() or not self.conn.is_connected:
            raise BackplaneError("pub/sub connection is closed")
        await self.conn.send_command(*args, check_health=False)

    async def command(self, verb: str, names: list[bytes]) -> None:
        """Send one (P)(UN)SUBSCRIBE and wait until Redis confirmed every name.

        Raises ``ResponseError`` when Redis refused it (the link is fine), and
        ``BackplaneError`` or a network error when the link failed meanwhile.
        """
        self._confirmed = asyncio.get_running_loop().create_future()
        self._confirm_left = len(names)
        self._confirm_kind = verb.lower().encode()
        try:
            await self.send(verb, *names)
            async with asyncio.timeout(self.timeout):
                await self._confirmed
        except TimeoutError:
            raise BackplaneError(f"no confirmation of {verb} within {self.timeout:g} s") from None
        finally:
            self._confirmed = None
            self._confirm_left = 0

    def on_confirmation(self, kind: bytes) -> bool:
        """Count one (un)subscribe confirmation read; False when no command asked for it.

        A ``sunsubscribe`` Redis sends by itself (a slot left the node) does not
        confirm an ``ssubscribe`` in flight.
        """
        # Our subscriptions changed at this point of the stream: see Deduplicator.
        self.dedupe.reset()
        if self._confirm_left == 0 or kind != self._confirm_kind:
            return False
        self._confirm_left -= 1
        done = self._confirmed
        if self._confirm_left == 0 and done is not None and not done.done():
            done.set_result(None)
        return True

    def on_error_reply(self, error: ResponseError) -> bool:
        """Hand an error reply to the command waiting for one; False if none is."""
        done = self._confirmed
        if done is None or done.done():
            return False
        self._confirm_left = 0  # a refused command gets one error, no confirmations
        done.set_exception(error)
        return True

    def mark_lost(self, error: BaseException) -> bool:
        """Record why the link ended; return False when it had already ended."""
        if self.lost.is_set():
            return False
        self.error = error
        self.lost.set()
        if self._confirmed is not None and not self._confirmed.done():
            self._confirmed.set_exception(BackplaneError(f"connection lost: {error}"))
        return True


class Dispatcher:
    """Turns the replies read on a link into deliveries; synchronous, no I/O.

    A message is decoded, de-duplicated, its channel checked, its data parsed
    unless a broker node already validated it, then handed to
    ``listener.deliver``; a confirmation or a PONG is handed to the link.
    ``prefix`` is the backplane's Redis prefix. Malformed messages are dropped
    and counted in ``dropped``; ``deliver()`` raising is counted in
    ``deliver_errors``. ``listener`` is set when the backplane starts.

    On a cluster (``sharded``) messages come as ``smessage``, on a channel's
    own shard channel or on a bucket's with the channel at the head of the
    payload (``cluster_map``). A publish sends both copies in one script, so
    they are adjacent on the link (same slot, same master): a bucket copy is
    dropped when it repeats the channel copy read just before it (the link
    holds both subscriptions; the channel copy was delivered), and when
    ``accept`` (the local patterns) does not want the channel. That is exact
    whatever the (un)subscriptions in flight, as no confirmation can come
    between the two copies; and an outside program's bucket-only publish is
    still delivered. A ``sunsubscribe`` nobody asked for means Redis moved a
    slot away from this node (a reshard or a failover): ``on_moved`` is called.
    """

    def __init__(
        self,
        prefix: bytes,
        *,
        sharded: bool = False,
        accept: Callable[[str], bool] | None = None,
        on_moved: Callable[[], None] | None = None,
    ) -> None:
        self.listener: Listener | None = None
        self._on_moved = on_moved
        self.dropped = 0
        self.deliver_errors = 0
        self._sharded = sharded
        self._shard_prefix = prefix
        self._prefix = b"" if sharded else prefix
        self._accept = accept
        self._names: dict[bytes, str | None] = {}
        #: Shard channel -> the channel it carries, b"" (a bucket), or None (not ours).
        self._shards: dict[bytes, bytes | None] = {}

    def dispatch(self, link: SubscriberLink, reply: Any) -> None:
        """Handle one reply read on ``link``, in the order read."""
        if not isinstance(reply, list) or not reply:
            if reply == b"PONG":  # PING on a connection without subscriptions
                link.pong.set()
            return
        kind = reply[0]
        if kind == b"message" and len(reply) == 3:
            self._on_message(link, None, reply[1], reply[2])
        elif kind == b"pmessage" and len(reply) == 4:
            self._on_message(link, reply[1], reply[2], reply[3])
        elif kind == b"smessage" and len(reply) == 3:
            target = self._shard_target(reply[1])
            if target:
                link.last_own = (target, reply[2])
                self._on_message(link, None, target, reply[2])
                return
            own, link.last_own = link.last_own, None
            if target is None:
                self._drop(reply[1], "not one of our shard channels")
                return
            try:  # a bucket
                raw_channel, payload = split_head(reply[2])
            except ValueError as exc:
                self._drop(reply[1], str(exc))
                return
            if own != (raw_channel, payload):  # else delivered through the channel's own
                self._on_message(link, None, raw_channel, payload, via_bucket=True)
        elif kind in _CONFIRMATIONS:
            if not link.on_confirmation(kind) and kind == b"sunsubscribe" and len(reply) == 3:
                # Redis dropped it: the slot left this node. Not ours any more here.
                link.active.discard(RedisSubscription(False, reply[1]))
                if self._on_moved:
                    self._on_moved()
        elif kind == b"pong":
            link.pong.set()

    def _shard_target(self, name: bytes) -> bytes | None:
        """What a shard channel carries: one channel's name, ``b""`` (a bucket), or None."""
        try:
            return self._shards[name]
        except KeyError:
            if len(self._shards) >= _NAME_CACHE:
                self._shards.clear()
            try:
                target = shard_target(self._shard_prefix, name)
            except ValueError:
                target = None
            else:
                target = target or b""
            self._shards[name] = target
            return target

    def _channel(self, raw_channel: bytes) -> str | None:
        try:
            return self._names[raw_channel]
        except KeyError:
            if len(self._names) >= _NAME_CACHE:
                self._names.clear()
            channel = self._names[raw_channel] = channel_from_redis(self._prefix, raw_channel)
            return channel

    def _on_message(
        self,
        link: SubscriberLink,
        source: bytes | None,
        raw_channel: bytes,
        payload: bytes,
        *,
        via_bucket: bool = False,
    ) -> None:
        try:
            message_id, position, data = decode_envelope(payload)
        except EnvelopeError as exc:
            self._drop(raw_channel, str(exc))
            return
        if not self._sharded:
            key = payload if message_id is None else message_id
            if not link.dedupe.first(raw_channel, key, source):
                return
        channel = self._channel(raw_channel)
        if channel is None:
            self._drop(raw_channel, "not a valid channel name")
            return
        if via_bucket and (self._accept is None or not self._accept(channel)):
            return  # another channel of the bucket: no local pattern wants it
        if message_id is None or not from_broker_node(message_id):
            # From an outside program: nobody has checked this data yet.
            try:
                check_data(data)
            except BadFrame as exc:
                self._drop(raw_channel, str(exc))
                return
        assert self.listener is not None
        try:
            self.listener.deliver(channel, data, position)
        except Exception:
            # deliver must not raise; if it does, keep reading but say so, sparingly.
            self.deliver_errors += 1
            if self.deliver_errors % _LOG_EVERY == 1:
                logger.exception(
                    "redis backplane: deliver() raised (%d times so far)", self.deliver_errors
                )

    def _drop(self, raw_channel: bytes, reason: str) -> None:
        self.dropped += 1
        if self.dropped % _LOG_EVERY == 1:
            logger.warning(
                "redis backplane: dropped a message on %r: %s (%d dropped so far, one line per %d)",
                raw_channel,
                reason,
                self.dropped,
                _LOG_EVERY,
            )


class Receiver:
    """Keeps one ``SubscriberLink`` up, with every wanted subscription on it.

    ``make_connection`` builds an unconnected redis-py connection. ``interest``
    is the backplane's live collection of wanted subscriptions, read here and
    never changed. ``timeout`` bounds every wait on Redis; ``reconnect_max``
    caps the wait between reconnect attempts; ``where`` and ``node_id`` only go
    into log lines. ``on_up`` is called when a link is ready (connected,
    everything restored); ``on_down`` when the link in use goes away (lost,
    failed while restoring, or closed), possibly more than once per link.

    The backplane runs ``run(listener)`` as its supervisor task, and stops it by
    setting ``closing`` and then cancelling the task.
    """

    def __init__(
        self,
        make_connection: Callable[[], RedisConnection],
        interest: Collection[RedisSubscription],
        *,
        prefix: bytes,
        timeout: float,
        reconnect_max: float,
        where: str,
        node_id: str,
        on_up: Callable[[], None],
        on_down: Callable[[], None],
        sharded: bool = False,
        accept: Callable[[str], bool] | None = None,
        on_moved: Callable[[], None] | None = None,
    ) -> None:
        self.closing = False
        #: Set once the first connection attempt is over, whatever its outcome.
        self.first_attempt = asyncio.Event()
        self._make_connection = make_connection
        self._interest = interest
        self._timeout = timeout
        self._reconnect_max = reconnect_max
        self._where = where
        self._node_id = node_id
        self._on_up = on_up
        self._on_down = on_down
        self._sharded = sharded
        self._dispatcher = Dispatcher(prefix, sharded=sharded, accept=accept, on_moved=on_moved)
        self._on_moved = on_moved
        #: On a cluster: wanted subscriptions a master refused because their slot
        #: is elsewhere or moving; ``retry_unplaced()`` tries them again.
        self.unplaced: set[RedisSubscription] = set()
        self._listener: Listener | None = None
        self._link: SubscriberLink | None = None
        self._lock = asyncio.Lock()
        self._probe = asyncio.Event()  # a publish failed: check the link now
        self._losses = 0

    @property
    def losses(self) -> int:
        """How many times an established link was lost."""
        return self._losses

    @property
    def dropped(self) -> int:
        """Messages read but not delivered: malformed payload or channel."""
        return self._dispatcher.dropped

    def probe(self) -> None:
        """Check the link now (a publish failed): the health task PINGs at once."""
        self._probe.set()

    async def run(self, listener: Listener) -> None:
        """The supervisor task: keep a link up until cancelled."""
        self._listener = self._dispatcher.listener = listener
        try:
            await self._keep_connected()
        finally:
            self.first_attempt.set()  # never leave the backplane's start() waiting

    async def reconcile(self, sub: RedisSubscription) -> None:
        """Make the current link's state of ``sub`` match ``interest``; never raises.

        Without a link, does nothing: the next link restores what is wanted. A
        refusal by Redis is logged and tried again on the next link; on a
        cluster, a refusal because the slot is elsewhere is kept in
        ``unplaced`` and the topology looked at again.
        """
        async with self._lock:
            wanted = sub in self._interest
            if not wanted:
                self.unplaced.discard(sub)
            link = self._link
            if link is None or link.lost.is_set():
                return  # recorded; the next link restores it
            if wanted == (sub in link.active):
                return
            verb = _SHARD_VERBS[wanted] if self._sharded else _VERBS[wanted, sub.is_pattern]
            try:
                await link.command(verb, [sub.name])
            except ResponseError as exc:
                if self._sharded and is_redirect(exc):
                    if wanted:
                        self._unplaced(sub, exc)
                    else:  # the slot left this node, and with it the subscription
                        link.active.discard(sub)
                    return
                _refused(verb, sub.name, exc)  # wanted still; tried again after a reconnect
                return
            except LINK_ERRORS as exc:
                self._lose(link, exc)
                return
            if wanted:
                link.active.add(sub)
                self.unplaced.discard(sub)
            else:
                link.active.discard(sub)

    def forget(self, sub: RedisSubscription) -> None:
        """``sub``'s slot left this node: Redis drops it there by itself, so send nothing."""
        self.unplaced.discard(sub)
        if self._link is not None:
            self._link.active.discard(sub)

    async def retry_unplaced(self) -> None:
        """Try the subscriptions in ``unplaced`` again (the topology may have settled)."""
        for sub in list(self.unplaced):
            await self.reconcile(sub)

    def _unplaced(self, sub: RedisSubscription, error: ResponseError) -> None:
        logger.debug("redis backplane: %r is not served here (%s); retried", sub.name, error)
        if sub not in self.unplaced:
            self.unplaced.add(sub)
            if self._on_moved is not None:
                self._on_moved()  # the first refusal: look at the topology now

    # -- the supervisor ---------------------------------------------------------

    async def _keep_connected(self) -> None:
        attempt = 0
        connected_before = False
        complained = False  # one warning per outage, not one per attempt
        while not self.closing:
            delay = backoff_delay(
                attempt, base=_RECONNECT_BASE, cap=self._reconnect_max, rand=random.random
            )
            if delay:
                await asyncio.sleep(delay)
            attempt += 1
            try:
                link = await self._open_link()
            except Exception as exc:
                self.first_attempt.set()
                if not isinstance(exc, LINK_ERRORS):
                    # Our bug, or a setting redis-py refuses late: say so loudly, keep trying.
                    logger.exception("redis backplane: unexpected error while connecting")
                elif not complained:
                    logger.warning(
                        "redis backplane: cannot connect to %s: %s (retrying)",
                        self._where,
                        describe_error(exc),
                    )
                else:
                    logger.debug(
                        "redis backplane: attempt %d failed: %s", attempt, describe_error(exc)
                    )
                complained = True
                continue
            self.first_attempt.set()
            if connected_before:
                logger.info(
                    "redis backplane: reconnected, %d subscriptions restored", len(link.active)
                )
                if self._listener is not None:
                    self._listener.link_restored()
            else:
                logger.info(
                    "redis backplane: connected to %s as node %s", self._where, self._node_id
                )
            connected_before = True
            complained = False
            try:
                await link.lost.wait()
            finally:
                await self._close_link(link)
            self._losses += 1
            if self._listener is not None:
                self._listener.link_lost()
            logger.warning(
                "redis backplane: connection lost: %s",
                describe_error(link.error or RuntimeError()),
            )
            complained = True
            attempt = 0

    async def _open_link(self) -> SubscriberLink:
        """Connect, start the reader and health tasks, restore subscriptions, go up."""
        conn = self._make_connection()
        link = SubscriberLink(conn, self._timeout)
        try:
            async with asyncio.timeout(self._timeout * 2):
                await conn.connect()  # a connect and a few handshake round trips
            self._link = link
            link.tasks = [
                asyncio.create_task(self._read_loop(link), name="redis-backplane-reader"),
                asyncio.create_task(self._health_loop(link), name="redis-backplane-health"),
            ]
            async with self._lock:
                await self._restore(link)
                if link.lost.is_set():
                    raise BackplaneError(f"connection lost: {link.error}")
                if self.closing:  # a swallowed cancellation (see stop_tasks) let us get here
                    raise BackplaneError("closed")
                self._on_up()
        except BaseException:
            await self._close_link(link)
            raise
        return link

    async def _restore(self, link: SubscriberLink) -> None:
        """Subscribe everything wanted on a fresh link (the caller holds the lock)."""
        wanted = list(self._interest)
        self.unplaced.clear()
        # SSUBSCRIBE takes names of one slot only: one bucket per command.
        kinds = (
            ((False, "SSUBSCRIBE", 1),)
            if self._sharded
            else ((False, "SUBSCRIBE", _RESTORE_CHUNK), (True, "PSUBSCRIBE", _RESTORE_CHUNK))
        )
        for is_pattern, verb, size in kinds:
            subs = [sub for sub in wanted if sub.is_pattern is is_pattern]
            for start in range(0, len(subs), size):
                chunk = subs[start : start + size]
                try:
                    await link.command(verb, [sub.name for sub in chunk])
                except ResponseError:
                    # Redis refuses a whole command for one bad name: find it, keep the rest.
                    for sub in chunk:
                        try:
                            await link.command(verb, [sub.name])
                        except ResponseError as exc:
                            if self._sharded and is_redirect(exc):
                                self._unplaced(sub, exc)
                            else:
                                _refused(verb, sub.name, exc)
                        else:
                            link.active.add(sub)
                else:
                    link.active.update(chunk)

    async def _close_link(self, link: SubscriberLink) -> None:
        link.mark_lost(BackplaneError("closed"))
        if self._link is link:
            self._link = None
            self._on_down()
        try:
            await stop_tasks(link.tasks)
        finally:
            await disconnect_quietly(link.conn)

    def _lose(self, link: SubscriberLink, error: BaseException) -> None:
        """End ``link`` because of ``error``; the supervisor takes it from there."""
        if link.mark_lost(error) and self._link is link:
            self._on_down()

    # -- the link's tasks -------------------------------------------------------

    async def _read_loop(self, link: SubscriberLink) -> None:
        """Read every reply of the link's connection until it fails."""
        read = link.conn.read_response
        dispatch = self._dispatcher.dispatch
        try:
            while True:
                # math.inf: block without redis-py's socket timeout; _health_loop watches.
                try:
                    reply = await read(timeout=math.inf, disconnect_on_error=False)
                except ResponseError as exc:
                    # Redis refused a (P)SUBSCRIBE (an ACL, say): that command fails, the
                    # link is fine. An error nobody waits for means we are out of step.
                    link.reads += 1
                    if link.on_error_reply(exc):
                        continue
                    if self._sharded and is_redirect(exc):
                        # The answer to an unsubscribe whose confirmation Redis had
                        # already sent by itself when the slot left: nothing is out of step.
                        logger.debug("redis backplane: late %s", exc)
                        continue
                    raise
                link.reads += 1
                dispatch(link, reply)
        except LINK_ERRORS as exc:
            self._lose(link, exc)
        except Exception as exc:
            logger.exception("redis backplane: reader failed")
            self._lose(link, exc)

    async def _health_loop(self, link: SubscriberLink) -> None:
        """PING every ``timeout``, or at once when a publish failed."""
        try:
            while True:
                try:
                    async with asyncio.timeout(self._timeout):
                        await self._probe.wait()
                    self._probe.clear()
                except TimeoutError:
                    pass
                await self._ping(link)
        except LINK_ERRORS as exc:
            self._lose(link, exc)

    async def _ping(self, link: SubscriberLink) -> None:
        link.pong.clear()
        before = link.reads
        await link.send("PING")
        while True:
            try:
                async with asyncio.timeout(self._timeout):
                    await link.pong.wait()
                return
            except TimeoutError:
                # Replies still coming in (a backlog ahead of the PONG) prove the link alive.
                if link.reads == before:
                    raise BackplaneError(f"no reply to PING within {self._timeout:g} s") from None
                before = link.reads


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they end, cancelling again while any runs on.

    Python 3.11's ``asyncio.wait_for``, which redis-py uses for every write, can
    swallow a cancellation that lands as the write completes; the task then
    carries on as if nothing happened. A second cancel lands elsewhere. A
    cancellation of the caller meanwhile is honoured once the tasks have ended.
    """
    pending = {task for task in tasks if not task.done()}
    interrupted = False
    while pending:
        for task in pending:
            task.cancel()
        try:
            _, pending = await asyncio.wait(pending, timeout=0.1)
        except asyncio.CancelledError:
            # Our owner is stopping us too (it re-cancels as we do): stop the
            # children first, or they would outlive everything, then go.
            interrupted = True
            pending = {task for task in pending if not task.done()}
    if interrupted:
        raise asyncio.CancelledError


async def close_pair(
    receiver: Receiver, publisher: Publisher, tasks: list[asyncio.Task[None]], what: str
) -> None:
    """Stop a receiver and a publisher (and their ``tasks``), then close the publisher.

    Queued publishes fail; a task that ended with an error is logged, as ``what``.
    """
    receiver.closing = True
    publisher.accepting = False
    await stop_tasks(tasks)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: task failed", what, exc_info=task.exception())
    await publisher.close()


def _refused(verb: str, name: bytes, error: ResponseError) -> None:
    logger.warning("redis backplane: Redis refused %s %r: %s", verb, name, error)
