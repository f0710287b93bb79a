"""The storage interface that sessions and the router see.

Every backend keeps, per UAID, the set of registered channels and at most
one pending update per channel (the highest version while un-acked). The
interface is async so that a networked backend drops in without touching
sessions or handlers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from simplepush.protocol import Wakeup
from simplepush.updates import Update


class StoreError(Exception):
    """The backend cannot answer now; callers answer 503 and lose nothing."""


@dataclass(slots=True, frozen=True)
class Holder:
    """Which node holds a UAID's socket, and since when: the newest connection wins."""

    node: str  # the holding node's internal router URL
    connected_at: float


class Store(ABC):
    @abstractmethod
    async def known(self, uaid: str) -> bool:
        """Whether the server can vouch for this UAID's registrations."""

    @abstractmethod
    async def hello(self, uaid: str, wakeup: Wakeup | None, holder: Holder) -> Holder | None:
        """Create the UAID's record if absent, keep its wake-up details, record the holder.

        Returns the other connection involved, if any: one with a later
        connected_at keeps the record (this one must close), an earlier one
        was displaced (its node must close it).
        """

    @abstractmethod
    async def release(self, uaid: str, holder: Holder) -> None:
        """Forget the holder, only if the record still names exactly this one."""

    @abstractmethod
    async def wakeup(self, uaid: str) -> Wakeup | None:
        """The UDP wake-up details from the UAID's last hello, for a future waker."""

    @abstractmethod
    async def drop(self, uaid: str) -> None:
        """Forget the UAID, its channels and everything pending for it."""

    @abstractmethod
    async def register(self, uaid: str, chid: str, spelling: str, max_channels: int) -> bool:
        """Register a channel (idempotent, keeps any pending update); False past max_channels."""

    @abstractmethod
    async def unregister(self, uaid: str, chid: str) -> None:
        """Remove the channel and its pending update; unknown channels are fine."""

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
