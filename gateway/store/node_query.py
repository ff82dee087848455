"""One-off questions to one Redis node over a short-lived connection, bounded in time: the
cluster's slot map (CLUSTER SLOTS), the primary a sentinel names (SENTINEL
get-master-addr-by-name), and the admin list's one script call a cluster node a page
(gateway.store.listing). Never per request.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from typing import Any, Final

import hiredis

from gateway.errors import StoreUnavailable
from gateway.redis_topology import NodeAddress
from gateway.store.pipeline import auth, pack

SLOTS_COUNT: Final = 16384


async def ask(
    address: NodeAddress,
    commands: Sequence[Sequence[str | int | bytes]],
    *,
    timeout: float,
    tls: bool = False,
    username: str | None = None,
    password: str | None = None,
    decode: bool = False,
) -> list[Any]:
    """Send `commands` (after AUTH when a password is given) and return their replies (as
    str with `decode`); StoreUnavailable when the node cannot be reached, refuses, or is
    slower than `timeout`."""
    setup = auth(username, password)
    wanted = [*setup, *commands]
    reader = hiredis.Reader(encoding="utf-8") if decode else hiredis.Reader()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            stream, writer = await asyncio.open_connection(
                address.host, address.port, ssl=ssl.create_default_context() if tls else None
            )
            writer.write(b"".join(pack(*c) for c in wanted))
            replies: list[Any] = []
            while len(replies) < len(wanted):
                data = await stream.read(65536)
                if not data:
                    raise ConnectionResetError("closed by the node")
                reader.feed(data)
                while (reply := reader.gets()) is not False:
                    replies.append(reply)
    except (OSError, TimeoutError) as exc:
        raise StoreUnavailable(f"Redis node {address} could not be asked: {exc!r}") from exc
    finally:
        if writer is not None:
            writer.close()
    for reply in replies:
        if isinstance(reply, hiredis.ReplyError):
            raise StoreUnavailable(f"Redis node {address} refused: {reply}")
    return replies[len(setup) :]


def slot_map(reply: Any, asked: NodeAddress) -> list[NodeAddress | None]:
    """CLUSTER SLOTS' reply (from the node `asked`) as the primary of every slot (None where
    no node serves it). A node that does not know its own endpoint names it "": the one
    asked, whose address was reachable."""
    slots: list[NodeAddress | None] = [None] * SLOTS_COUNT
    for entry in reply:
        start, end, primary = int(entry[0]), int(entry[1]), entry[2]
        host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
        address = NodeAddress(host if host not in ("", "?") else asked.host, int(primary[1]))
        for slot in range(start, end + 1):
            slots[slot] = address
    return slots
