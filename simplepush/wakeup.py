"""UDP wake-up rules, without I/O: which address a datagram may go to, and the settings' syntax.

A device on a mobile network may give an address in hello and drop its
socket; a datagram to that address makes it reconnect (docs/PROTOCOL.md).
A server that sent datagrams wherever devices asked would be a reflector
for anyone (docs/SECURITY.md): only addresses inside the configured
networks qualify, and with per-operator ranges only inside the ranges of
the device's own operator. The sender is simplepush/waker.py.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping, Sequence

from simplepush.protocol import Wakeup

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Operator = tuple[str, str]  # (mcc, mnc) as the device spells them
# What GECKO reads as "the server will wake you by UDP: do not reconnect until then".
CLOSE_CODE = 4774
CLOSE_REASON = "wait for a UDP wake-up"
# The payload does not matter: any datagram wakes the device.
DATAGRAM = b"w"


class Refusal(enum.Enum):
    """Why no datagram goes to a device's address; the value names it in logs."""

    NO_PORT = "no_port"  # the device could not open its UDP listener
    OUTSIDE_NETWORKS = "outside_networks"
    UNKNOWN_OPERATOR = "unknown_operator"  # mobile_networks set, the device's mcc/mnc not in it
    OUTSIDE_OPERATOR = "outside_operator"  # not in its operator's ranges


def target(wakeup: Wakeup) -> tuple[str, int]:
    """Where the datagram goes; an IPv4-mapped IPv6 address is the IPv4 address it maps."""
    address = ipaddress.ip_address(wakeup.ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), wakeup.port or 0


def refusal(
    wakeup: Wakeup, networks: Sequence[Network], operators: Mapping[Operator, Sequence[Network]]
) -> Refusal | None:
    """None when a datagram may go to the device's address, else why not.

    Empty `networks` refuses everything (wake-up is off); `operators`, when
    not empty, admits only the operators listed, each inside its own ranges.
    """
    if wakeup.port is None:
        return Refusal.NO_PORT
    address = ipaddress.ip_address(target(wakeup)[0])
    if not any(address in network for network in networks):
        return Refusal.OUTSIDE_NETWORKS
    if operators:
        ranges = operators.get((wakeup.mcc or "", wakeup.mnc or ""))
        if ranges is None:
            return Refusal.UNKNOWN_OPERATOR
        if not any(address in network for network in ranges):
            return Refusal.OUTSIDE_OPERATOR
    return None


# --- the settings' syntax, for config.py ------------------------------------------------


def parse_networks(text: str) -> tuple[Network, ...]:
    """`10.0.0.0/8, fd00::/8`: comma- or space-separated CIDR networks; empty is none."""
    return tuple(_network(part) for part in text.replace(",", " ").split())


def parse_operators(text: str) -> dict[Operator, tuple[Network, ...]]:
    """`214-07: 10.0.0.0/8 100.64.0.0/10, 310-260: 100.64.0.0/10`: mcc-mnc, then its ranges."""
    operators: dict[Operator, tuple[Network, ...]] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, colon, ranges = entry.partition(":")
        mcc, dash, mnc = name.strip().partition("-")
        if not (colon and dash and _digits(mcc) and _digits(mnc)):
            raise ValueError(f"{entry!r} is not mcc-mnc: networks (e.g. 214-07: 10.0.0.0/8)")
        if (mcc, mnc) in operators:
            raise ValueError(f"{mcc}-{mnc} is listed twice")
        networks = parse_networks(ranges)
        if not networks:
            raise ValueError(f"{mcc}-{mnc} has no networks")
        operators[mcc, mnc] = networks
    return operators


def outside(
    operators: Mapping[Operator, Sequence[Network]], networks: Sequence[Network]
) -> str | None:
    """The first operator range not inside any of `networks` ("mcc-mnc range"), or None."""
    for (mcc, mnc), ranges in operators.items():
        for network in ranges:
            if not any(_inside(network, allowed) for allowed in networks):
                return f"{mcc}-{mnc} {network}"
    return None


def _inside(network: Network, allowed: Network) -> bool:
    return network.version == allowed.version and network.subnet_of(allowed)  # type: ignore[arg-type]


def _network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a network ({exc})") from None


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()
