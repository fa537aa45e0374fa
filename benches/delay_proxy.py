#!/usr/bin/env python3
"""A TCP proxy on loopback that behaves like a long, rate-limited link.

    delay_proxy.py --target 127.0.0.1:PORT [--delay-ms 10] [--rate-mbit 1000]
                   [--lifetime-s 600]

Listens on 127.0.0.1 (a free port, printed as the first line of stdout) and
forwards every connection to --target. Each direction is a link of its own:
bytes are serialised at --rate-mbit (one packet after the other) and then
delivered --delay-ms later, so a round trip costs 2 x delay plus the
serialisation time. The proxy reads without bound (an unlimited router
buffer): what limits the bytes in flight is the endpoints' HTTP/2 flow
control, which is what benches/latency_link.sh measures. TCP's own slow
start over the long path is not modelled (each side talks to the proxy over
loopback). Exits after --lifetime-s seconds at most. Standard library only.
"""

import argparse
import asyncio
import sys
import time

CHUNK = 64 * 1024


async def pipe(reader, writer, delay, rate):
    """Copies reader to writer through one direction of the link."""
    queue = asyncio.Queue()
    link_free = 0.0

    async def deliver():
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:
                break
            writer.write(data)
            await writer.drain()
        try:
            writer.write_eof()
        except (OSError, RuntimeError):
            pass

    delivering = asyncio.ensure_future(deliver())
    try:
        while True:
            data = await reader.read(CHUNK)
            now = time.monotonic()
            start = max(now, link_free)
            link_free = start + (len(data) / rate if data else 0.0)
            queue.put_nowait((link_free + delay, data or None))
            if not data:
                break
    except (OSError, asyncio.IncompleteReadError):
        queue.put_nowait((time.monotonic(), None))
    try:
        await delivering
    except OSError:
        pass


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, help="HOST:PORT to forward to (loopback)")
    ap.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay (default 10)")
    ap.add_argument("--rate-mbit", type=float, default=1000.0, help="link rate per direction (default 1000)")
    ap.add_argument("--lifetime-s", type=float, default=600.0, help="exit after this long (default 600)")
    args = ap.parse_args()
    host, port = args.target.rsplit(":", 1)
    if host not in ("127.0.0.1", "::1", "localhost"):
        sys.exit(f"delay_proxy: --target must be on loopback, got {host}")
    delay, rate = args.delay_ms / 1000.0, args.rate_mbit * 1e6 / 8.0

    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            pipe(client_r, server_w, delay, rate),
            pipe(server_r, client_w, delay, rate),
            return_exceptions=True,
        )
        for w in (client_w, server_w):
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await asyncio.sleep(args.lifetime_s)


if __name__ == "__main__":
    asyncio.run(main())
