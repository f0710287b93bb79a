"""The storage interface that sessions and the router see.

Every backend keeps, per UAID, its kind (SimplePush or WebPush), the set of
registered channels, and what waits for the device: for SimplePush at most
one pending update per channel (the highest version while un-acked), for
WebPush a queue of messages in the order they were accepted. The interface
is async so that a networked backend drops in without touching sessions or
handlers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from simplepush.protocol import Wakeup
from simplepush.updates import Update
from simplepush.webpush import Message


class StoreError(Exception):
    """The backend cannot answer now; callers answer 503 and lose nothing."""


class WrongUAID(Exception):
    """hello: the record is of the other kind, or absent where it must exist.

    The session then starts the device over with a new UAID (docs/WEBPUSH.md).
    """


class Enqueued(Enum):
    """What became of a WebPush message offered to the store."""

    ACCEPTED = "accepted"  # stored (TTL > 0), or TTL 0 and the channel exists
    UNKNOWN = "unknown"  # no such WebPush UAID or channel
    FULL = "full"  # max_queued messages already wait on the channel


@dataclass(slots=True, frozen=True)
class Holder:
    """Which node holds a UAID's socket, and since when: the newest connection wins."""

    node: str  # the holding node's internal router URL
    connected_at: float


@dataclass(slots=True, frozen=True)
class Fresh:
    """A freshly minted UAID's hello, which wrote nothing: its first register records it.

    A UAID the server just made up has no other holder, nothing pending and
    no endpoint until a channel is registered, so the store first hears of
    it then, in the same write: one storage operation per new device instead
    of two, and none for one that leaves without registering.
    """

    holder: Holder
    webpush: bool
    wakeup: Wakeup | None


class Store(ABC):
    @abstractmethod
    async def known(self, uaid: str) -> bool:
        """Whether the server can vouch for this UAID's registrations."""

    @abstractmethod
    async def hello(
        self,
        uaid: str,
        wakeup: Wakeup | None,
        holder: Holder,
        webpush: bool = False,
        create: bool = True,
    ) -> Holder | None:
        """Create the UAID's record if absent, keep its wake-up details, record the holder.

        Returns the other connection involved, if any: one with a later
        connected_at keeps the record (this one must close), an earlier one
        was displaced (its node must close it). Raises WrongUAID, writing
        nothing, when the record is of the other kind, or absent and not to
        be created.
        """

    @abstractmethod
    async def release(self, uaid: str, holder: Holder) -> None:
        """Forget the holder, only if the record still names exactly this one."""

    @abstractmethod
    async def wakeup(self, uaid: str) -> Wakeup | None:
        """The UDP wake-up details from the UAID's last hello, if it gave any."""

    @abstractmethod
    async def claim_wakeup(self, uaid: str, interval: int) -> Wakeup | None:
        """The wake-up details, if the last hello gave some and no claim came in `interval` s.

        A claim that returns details is recorded; one that returns None
        records nothing. Atomic across every node sharing the store: of
        several nodes claiming at once one gets the details, so one datagram
        goes out (simplepush/waker.py).
        """

    @abstractmethod
    async def drop(self, uaid: str) -> None:
        """Forget the UAID, its channels and everything pending for it."""

    @abstractmethod
    async def register(
        self, uaid: str, chid: str, spelling: str, max_channels: int, fresh: Fresh | None = None
    ) -> bool:
        """Register a channel (idempotent, keeps any pending update); False past max_channels.

        With `fresh`, a UAID without a record gets one as its hello would
        have made it (holder, kind, wake-up details), in the same write.
        """

    @abstractmethod
    async def unregister(self, uaid: str, chid: str) -> None:
        """Remove the channel and what waits on it; unknown channels are fine."""

    @abstractmethod
    async def update(
        self, uaid: str, chid: str, version: int, data: str | None
    ) -> tuple[Update, Holder | None] | None:
        """Record a new version; None when the channel is not registered.

        Returns the channel's pending update afterwards (a lower version than
        the pending one does not replace it) and who holds the UAID's socket.
        """

    @abstractmethod
    async def pending(self, uaid: str) -> list[Update]:
        """Every un-acked update of the UAID."""

    @abstractmethod
    async def ack(self, uaid: str, acks: Sequence[tuple[str, int]]) -> list[Update]:
        """Clear each pending entry that an acked version covers; return what is left."""

    @abstractmethod
    async def enqueue(
        self, uaid: str, chid: str, message: Message, max_queued: int
    ) -> tuple[Enqueued, Holder | None]:
        """Queue a WebPush message (TTL 0: only check the channel) and say who holds the device.

        A message with a topic replaces the undelivered one of the same topic
        on the channel and takes the end of the queue; past max_queued
        undelivered messages on the channel nothing is added (FULL).
        """

    @abstractmethod
    async def messages(self, uaid: str) -> list[Message]:
        """The UAID's unexpired WebPush messages, in the order they were accepted."""

    @abstractmethod
    async def remove(self, uaid: str, removals: Sequence[tuple[str, str]]) -> None:
        """Delete each (chid, message id) queued; ids no longer queued are fine."""

    @abstractmethod
    async def sweep(self) -> int:
        """Delete a bounded slice of expired messages; how many (backends that expire
        on their own answer 0)."""

    @abstractmethod
    def changed_elsewhere(self, uaid: str) -> None:
        """Another node changed uaid's record (it routed an update here): a backend that
        remembers records this node wrote forgets this one rather than trip over it."""

    async def stats(self) -> dict[str, Any]:
        """What /realstatus tells operators of the backend's data; nothing by default."""
        return {}

    @abstractmethod
    async def check(self) -> None:
        """Raise StoreError when the backend is unhealthy."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections at shutdown."""

    @abstractmethod
    def watch_losses(self, lost: Callable[[Callable[[str], bool]], None]) -> None:
        """Have lost(affected) called when records may have vanished behind the server's back.

        memcached restarts empty; `affected(uaid)` tells whose records lived
        on the server that went away.
        """
