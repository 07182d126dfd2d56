#!/usr/bin/env python3
"""Memory of a running rollgate: RSS idle, and with N idle keep-alive client connections.

Starts `rollgate mock-model` (the upstream) and `rollgate run` on loopback with a two-version
config (evaluator on), sends one request on each of N client connections (so each is a real
keep-alive connection that served a request, then sits idle) and reads the proxy's VmRSS
from /proc. Everything it starts is stopped on exit.

    python3 benches/memory.py [--bin target/release/rollgate] [--connections 10000]
"""
import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def wait_port(port, deadline=10.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


async def open_idle(port, n, batch=500):
    conns = []
    request = b"GET /v1/models HTTP/1.1\r\nHost: bench\r\n\r\n"

    async def one():
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(request)
        await w.drain()
        head = await r.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await r.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head[:80])
        return r, w

    for i in range(0, n, batch):
        conns += await asyncio.gather(*(one() for _ in range(min(batch, n - i))))
    return conns


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/rollgate")
    ap.add_argument("--connections", type=int, default=10000)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.connections + 1000
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            up, data, admin = free_port(), free_port(), free_port()
            procs.append(subprocess.Popen(
                [args.bin, "mock-model", "--listen", f"127.0.0.1:{up}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_port(up)
            cfg = os.path.join(tmp, "rollgate.yaml")
            with open(cfg, "w") as f:
                f.write(
                    f"listen: 127.0.0.1:{data}\nadmin: {{listen: 127.0.0.1:{admin}}}\n"
                    f"state_dir: {tmp}/state\nversions:\n"
                    f"  a: {{endpoints: [http://127.0.0.1:{up}]}}\n"
                    f"  b: {{endpoints: [http://127.0.0.1:{up}]}}\n"
                    "routes:\n  - {name: r, match: {path_prefix: /}, baseline: a, split: {a: 95, b: 5}}\n")
            proxy = subprocess.Popen([args.bin, "run", "-c", cfg],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proxy)
            wait_port(data)
            time.sleep(1.0)
            idle = rss_mib(proxy.pid)
            t0 = time.monotonic()
            conns = asyncio.run(hold(data, args.connections, proxy.pid))
            print(f"rollgate RSS idle (started, no connections): {idle:.1f} MiB")
            print(f"rollgate RSS with {args.connections} idle keep-alive connections: "
                  f"{conns:.1f} MiB ({(conns - idle) * 1024 / args.connections:.1f} KiB per connection; "
                  f"opened in {time.monotonic() - t0:.1f} s)")
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()


async def hold(port, n, pid):
    conns = await open_idle(port, n)
    await asyncio.sleep(1.0)
    rss = rss_mib(pid)
    for _, w in conns:
        w.close()
    return rss


if __name__ == "__main__":
    sys.exit(main())
