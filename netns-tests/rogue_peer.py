"""A modified client: a valid certificate, but it puts whatever packets it likes into
its session. The real client only forwards its own source address, so testing the
gateway's anti-spoofing needs this. Run inside a namespace:

    python rogue_peer.py CA CERT KEY HOST:PORT SERVER_NAME HEXPKT [HEXPKT ...]

Prints one JSON line: the CONFIG it got and how many packets it sent.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from vpnd.proto import ConfigReceived, Session, SessionConfig
from vpnd.transport.connection import connect
from vpnd.transport.tlsctx import client_context


async def main(argv: list[str]) -> int:
    ca, cert, key, server, server_name, *packets = argv
    host, _, port = server.rpartition(":")
    ctx = client_context(ca=Path(ca), cert=Path(cert), key=Path(key))
    conn = await connect(host, int(port), ctx, server_hostname=server_name, timeout=10)
    session = Session(SessionConfig(role="client"), time.monotonic())
    got: asyncio.Future[dict[str, object]] = asyncio.get_running_loop().create_future()

    def on_data(data: bytes) -> None:
        session.receive_data(data, time.monotonic())
        while (ev := session.next_event()) is not None:
            if isinstance(ev, ConfigReceived) and not got.done():
                got.set_result({"address": str(ev.config.address)})
        out = session.data_to_send()
        if out:
            conn.write(out)

    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_close(_exc: Exception | None) -> None:
        if not ended.done():
            ended.set_result(None)

    conn.set_receiver(on_data, on_close)
    conn.write(session.data_to_send())  # HELLO
    config = await asyncio.wait_for(got, 10)
    session.send_packets([bytes.fromhex(p) for p in packets], time.monotonic())
    conn.write(session.data_to_send())
    print(json.dumps({"config": config, "sent": len(packets)}))
    # close() flushes what is queued, then ends TLS; the loop must live until the
    # connection is really gone, or the DATA could die unsent with it.
    conn.close()
    await asyncio.wait_for(ended, 10)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
