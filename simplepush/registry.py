"""The node's live sockets, resident on the IOLoop thread.

Only the IOLoop touches it, so it needs no locks. It holds every open
socket (for /status, max_connections and shutdown) and maps each
identified UAID to the one session that may receive its notifications.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from simplepush.updates import Update
from simplepush.webpush import Message


class Live(Protocol):
    connected_at: float

    def close(self, code: int, reason: str) -> None:
        """Close the device's socket."""

    def deliver(self, update: Update | Message) -> bool:
        """Write one live notification; False when the socket is gone."""


SUPERSEDED = (4000, "superseded by a newer connection")
# RFC 6455 1012, Service Restart: reconnect (after a random delay) and say hello again.
STORAGE_RESTARTED = (1012, "storage restarted")


class Registry:
    def __init__(self) -> None:
        self.connections: set[Live] = set()
        self._by_uaid: dict[str, Live] = {}
        # UAIDs whose hello has written this node into the store and not yet claimed here.
        self._arriving: dict[str, Live] = {}

    def __len__(self) -> int:
        return len(self.connections)

    def get(self, uaid: str) -> Live | None:
        return self._by_uaid.get(uaid)

    def arrive(self, uaid: str, session: Live) -> None:
        self._arriving[uaid] = session

    def arrived(self, uaid: str, session: Live) -> None:
        if self._arriving.get(uaid) is session:
            del self._arriving[uaid]

    def arriving(self, uaid: str) -> bool:
        """A hello for uaid is between naming this node in the store and claiming it here.

        An update routed meanwhile finds no session, yet must not clear the
        holder record: it was stored first, and that hello's flush sends it.
        """
        return uaid in self._arriving

    def claim(self, uaid: str, session: Live) -> bool:
        """Bind uaid to session unless a newer connection holds it; the older one is closed."""
        current = self._by_uaid.get(uaid)
        if current is not None and current is not session:
            if current.connected_at > session.connected_at:
                return False
            del self._by_uaid[uaid]
            current.close(*SUPERSEDED)
        self._by_uaid[uaid] = session
        return True

    def release(self, uaid: str, session: Live) -> None:
        if self._by_uaid.get(uaid) is session:
            del self._by_uaid[uaid]

    def close_where(self, chosen: Callable[[str], bool], code: int, reason: str) -> int:
        """Close the identified sockets whose UAID is chosen; returns how many."""
        doomed = [session for uaid, session in self._by_uaid.items() if chosen(uaid)]
        for session in doomed:
            session.close(code, reason)
        return len(doomed)

    def close_all(self, code: int, reason: str) -> None:
        for connection in list(self.connections):
            connection.close(code, reason)
