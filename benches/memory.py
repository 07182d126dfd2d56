#!/usr/bin/env python3
"""Memory of rollgate, and of nginx and HAProxy doing the same job: RSS idle, with N idle
keep-alive client connections, and with N open SSE streams.

For every (target, scenario) pair, everything is started fresh, on loopback only:

* Upstream: two `rollgate mock-model` processes, versions `a` and `b`, on two ports. They
  stream with `--chunks 2 --chunk-interval 600s`: a stream's first SSE event goes out at
  once and the next one ten minutes later, so every stream stays open while RSS is read.
* The proxy under test, one worker/thread, splitting 95/5 over the two upstream ports with
  keep-alive upstream pools, with the essential settings of the peer benchmark's configs
  (../shared/bench/peers/conf/nginx-proxy.conf and haproxy.cfg):
    rollgate  `rollgate run --workers 1`, route `split: {a: 95, b: 5}`, evaluator on
              (defaults)
    nginx     worker_processes 1, split_clients on $request_id (95 % / *), upstream
              keepalive 128, keepalive_requests 10000000, keepalive_timeout 75s,
              proxy_http_version 1.1, proxy_buffering on, access_log off
    haproxy   nbthread 1, balance roundrobin weights 95/5, option http-keep-alive,
              http-reuse safe, tune.bufsize 16384, timeout http-keep-alive 60s
  Only limits that would refuse or cut the load differ from those files: nginx
  worker_connections is 2N + N/8 + 1024 (nginx starts closing "reusable" connections, such
  as fresh clients that have not sent their request yet, once fewer than 1/16 of its slots
  are free, and a stream takes two slots), HAProxy maxconn is N + 50, and the
  upstream-silence timeouts are 300 s everywhere (nginx proxy_read_timeout, HAProxy timeout
  server/client, rollgate `timeouts.idle`; all default to 60 s) so no proxy cuts a held
  stream. nginx and HAProxy preallocate per-slot tables for those limits at start, so that
  part of their per-connection cost is in their *idle* RSS (compare idle RSS across N).

Scenarios (N = --connections):

* idle     N client connections each send `GET /v1/models`, read the whole response, and
           then sit idle in keep-alive.
* streams  N client connections each send `POST /v1/chat/completions` with `"stream": true`,
           read the response head and the first `data:` event, and hold the stream open
           (so the proxy also holds N upstream connections).

Memory is VmRSS from /proc/PID/status of every process of the proxy that serves: rollgate's
one process, HAProxy's one process, nginx's master + worker (reported as the sum and, on its
own row, the worker alone). "idle" is read 1 s after the proxy's port opens (no request
served yet), "loaded" 1 s after the last of the N connections got its response (or first
event). At that read the script also counts, from /proc/net/tcp, the connections still
established at the proxy's port ("held") and at the upstream ports, to show the load really
was there. KiB per connection/stream = (loaded - idle) / held. A second table splits each
process's RSS into anonymous / file / shmem pages.

The client is a small epoll loop (500 connections in flight) rather than asyncio streams, so
that 10,000 connections open in a few seconds: rollgate closes a keep-alive connection that
has been idle for 10 s (hyper's header_read_timeout, HEADER_READ_TIMEOUT in
src/proxy/server.rs, runs while it waits for the next request head), so a slower client
would measure fewer connections than it opened. The output lists any that closed early.

RLIMIT_NOFILE is raised (soft and, with CAP_SYS_RESOURCE, hard) to fit 2N + 256; the
proxies inherit it. Where the hard limit is lower, N is lowered to fit, for every target and
scenario alike, and the output says so (a held stream takes 2 descriptors in any proxy, and
HAProxy reserves 2 per maxconn even for idle connections). Every wait is bounded; everything
started is stopped on exit (each process group gets SIGTERM, then SIGKILL after 10 s).

    python3 benches/memory.py [--bin target/release/rollgate] [--connections 10000]
        [--targets rollgate,nginx,haproxy] [--scenario idle,streams]
"""
import argparse
import errno
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter

TARGETS = ("rollgate", "nginx", "haproxy")
SCENARIOS = ("idle", "streams")
HOLD_TIMEOUT = "300s"        # upstream-silence timeout given to every proxy
MOCK_CHUNK_INTERVAL = "600s"  # gap between a mock stream's first and second event
SETTLE = 1.0                 # seconds between "started"/"all open" and the RSS read
CONNECT_WINDOW = 500         # client connections being opened at once
PER_CONN_TIMEOUT = 15.0      # connect + request + response (or first event), per connection
STOP_GRACE = 10.0            # SIGTERM -> SIGKILL
FD_SLACK = 256               # descriptors a proxy needs besides 2 per connection

IDLE_REQUEST = b"GET /v1/models HTTP/1.1\r\nHost: bench\r\n\r\n"
_STREAM_BODY = json.dumps({
    "model": "bench", "stream": True,
    "messages": [{"role": "user", "content": "hold this stream open"}],
}).encode()
STREAM_REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n"
    b"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
    b"Content-Length: " + str(len(_STREAM_BODY)).encode() + b"\r\n\r\n" + _STREAM_BODY)


# ---------------------------------------------------------------------------- helpers

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, deadline=10.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def proc_status(pid):
    """VmRSS, RssAnon, RssFile, RssShmem of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1])
    if "VmRSS" not in out:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return out


def children(pid):
    """PIDs whose parent is pid."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may contain spaces; the ppid is 2 fields after its ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry))
    return kids


def established(ports):
    """Established TCP connections whose local port is in ports, counted per port."""
    counts = dict.fromkeys(ports, 0)
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split(None, 4)
            if fields[3] != "01":  # TCP_ESTABLISHED
                continue
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if port in counts:
                counts[port] += 1
    return counts


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    try:  # raising the hard limit needs CAP_SYS_RESOURCE (root); children inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(need, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Processes:
    """Starts processes in their own process groups and stops every group on exit."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.procs = []

    def start(self, name, argv, cwd=None):
        log = open(os.path.join(self.logdir, f"{name}.log"), "wb")
        p = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        p.name = name
        self.procs.append(p)
        return p

    def check_alive(self):
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.returncode}: {self.log_tail(p.name)}")

    def log_tail(self, name, n=600):
        try:
            with open(os.path.join(self.logdir, f"{name}.log"), "rb") as f:
                return f.read()[-n:].decode(errors="replace").strip()
        except OSError:
            return ""

    def stop_all(self):
        # Proxy first (started last), so it lets go of the upstreams before they stop.
        for p in reversed(self.procs):
            self._signal(p, signal.SIGTERM)
        end = time.monotonic() + STOP_GRACE
        for p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # Also reaps group members the leader left behind (nginx's worker).
            self._signal(p, signal.SIGKILL)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                print(f"warning: {p.name} (pid {p.pid}) did not exit", file=sys.stderr)
        self.procs = []

    @staticmethod
    def _signal(p, sig):
        try:
            os.killpg(p.pid, sig)  # the group start_new_session made: p and its children
        except (ProcessLookupError, PermissionError):
            pass


# ---------------------------------------------------------------------------- targets

def start_mocks(procs, bin_path):
    ups = {}
    for version in ("a", "b"):
        port = free_port()
        procs.start(f"mock-{version}", [
            bin_path, "mock-model", "--listen", f"127.0.0.1:{port}", "--name", version,
            "--chunks", "2", "--chunk-interval", MOCK_CHUNK_INTERVAL])
        ups[version] = port
    for port in ups.values():
        wait_port(port)
    return ups


def start_rollgate(procs, tmp, port, ups, args):
    cfg = os.path.join(tmp, "rollgate.yaml")
    with open(cfg, "w") as f:
        f.write(
            f"listen: 127.0.0.1:{port}\n"
            f"admin: {{listen: 127.0.0.1:{free_port()}}}\n"
            f"state_dir: {tmp}/state\n"
            "versions:\n"
            f"  a: {{endpoints: [http://127.0.0.1:{ups['a']}]}}\n"
            f"  b: {{endpoints: [http://127.0.0.1:{ups['b']}]}}\n"
            "routes:\n"
            "  - {name: r, match: {path_prefix: /}, baseline: a, split: {a: 95, b: 5},\n"
            f"     timeouts: {{idle: {HOLD_TIMEOUT}}}}}\n")
    p = procs.start("rollgate", [args.bin, "run", "--workers", "1", "-c", cfg])
    return lambda: [p.pid]


def start_nginx(procs, tmp, port, ups, args):
    prefix = os.path.join(tmp, "nginx") + "/"
    for d in ("body", "proxy", "fcgi", "uwsgi", "scgi"):
        os.makedirs(os.path.join(prefix, "tmp", d), exist_ok=True)
    os.chmod(tmp, 0o755)  # the worker runs as nobody
    cfg = os.path.join(prefix, "nginx.conf")
    with open(cfg, "w") as f:
        f.write(f"""\
worker_processes 1;
daemon off;
pid nginx.pid;
error_log stderr warn;
events {{
    worker_connections {2 * args.connections + args.connections // 8 + 1024};
}}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    upstream version_a {{ server 127.0.0.1:{ups['a']}; keepalive 128; keepalive_requests 10000000; }}
    upstream version_b {{ server 127.0.0.1:{ups['b']}; keepalive 128; keepalive_requests 10000000; }}
    split_clients "${{request_id}}" $version {{ 95% version_a; * version_b; }}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffering on;
    proxy_read_timeout {HOLD_TIMEOUT};
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://$version; }}
    }}
}}
""")
    master = procs.start("nginx", ["nginx", "-p", prefix, "-c", cfg, "-e", "stderr"])

    def pids():
        end = time.monotonic() + 5
        while time.monotonic() < end:
            workers = children(master.pid)
            if workers:
                return [master.pid] + workers
            time.sleep(0.05)
        raise RuntimeError("nginx worker never appeared")
    return pids


def start_haproxy(procs, tmp, port, ups, args):
    cfg = os.path.join(tmp, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(f"""\
global
    nbthread 1
    maxconn {args.connections + 50}
    tune.bufsize 16384

defaults
    mode http
    maxconn {args.connections + 50}
    timeout connect 5s
    timeout client  {HOLD_TIMEOUT}
    timeout server  {HOLD_TIMEOUT}
    timeout http-keep-alive 60s
    option http-keep-alive
    http-reuse safe

frontend fe
    bind 127.0.0.1:{port}
    default_backend versions

backend versions
    balance roundrobin
    server a 127.0.0.1:{ups['a']} weight 95
    server b 127.0.0.1:{ups['b']} weight 5
""")
    p = procs.start("haproxy", ["haproxy", "-db", "-f", cfg])
    return lambda: [p.pid]


STARTERS = {"rollgate": start_rollgate, "nginx": start_nginx, "haproxy": start_haproxy}


# ---------------------------------------------------------------------------- load
# A small epoll loop rather than asyncio streams: it opens 10,000 connections in a few
# seconds even on a busy machine, and it must, because rollgate closes a keep-alive
# connection that stays idle for 10 s (see the note in report()).

def response_done(buf, scenario):
    """True once buf holds the whole response (idle) or the head and first event (streams)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    head, body = bytes(buf[:end]).lower(), buf[end + 4:]
    if not head.startswith(b"http/1.1 200"):
        raise RuntimeError(bytes(buf[:end]).split(b"\r\n", 1)[0].decode(errors="replace"))
    if b"\r\nconnection: close" in head:
        raise RuntimeError("proxy answered Connection: close")
    if scenario == "streams":
        first = body.find(b"data:")
        return first >= 0 and body.find(b"\n\n", first) >= 0
    if b"\r\ntransfer-encoding: chunked" in head:
        return body == b"0\r\n\r\n" or body.endswith(b"\r\n0\r\n\r\n")
    length = head.split(b"\r\ncontent-length:", 1)
    return len(length) == 2 and len(body) >= int(length[1].split(b"\r\n", 1)[0])


def open_connections(port, n, scenario):
    """Opens n client connections, CONNECT_WINDOW at a time, each sending one request and
    reading its response (or first event). Returns (open sockets, Counter of errors)."""
    request = STREAM_REQUEST if scenario == "streams" else IDLE_REQUEST
    sel = selectors.DefaultSelector()
    held, errors = [], Counter()
    started = 0
    give_up = time.monotonic() + max(60.0, n / 50)

    def fail(sock, why):
        sel.unregister(sock)
        sock.close()
        errors[why[:100]] += 1

    try:
        while started < n or sel.get_map():
            now = time.monotonic()
            if now > give_up:
                errors["gave up: opening took too long"] += n - started
                break
            while started < n and len(sel.get_map()) < CONNECT_WINDOW:
                started += 1
                sock = socket.socket()
                sock.setblocking(False)
                err = sock.connect_ex(("127.0.0.1", port))
                if err not in (0, errno.EINPROGRESS):
                    sock.close()
                    errors[f"connect: {os.strerror(err)}"] += 1
                    continue
                sel.register(sock, selectors.EVENT_WRITE, (bytearray(), now + PER_CONN_TIMEOUT))
            for key, events in sel.select(timeout=0.2):
                sock, (buf, _) = key.fileobj, key.data
                try:
                    if events & selectors.EVENT_WRITE:
                        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise OSError(err, f"connect: {os.strerror(err)}")
                        sock.send(request)  # a few hundred bytes: fits the fresh send buffer
                        sel.modify(sock, selectors.EVENT_READ, key.data)
                        continue
                    data = sock.recv(65536)
                    if not data:
                        raise RuntimeError("closed by the proxy before answering")
                    buf += data
                    if response_done(buf, scenario):
                        sel.unregister(sock)
                        held.append(sock)
                except (OSError, RuntimeError) as e:
                    fail(sock, f"{type(e).__name__}: {e}")
            for key in [k for k in sel.get_map().values() if k.data[1] < now]:
                fail(key.fileobj, f"no answer within {PER_CONN_TIMEOUT:.0f} s")
        for key in list(sel.get_map().values()):
            fail(key.fileobj, "unfinished")
    except BaseException:
        close_all(held)
        raise
    finally:
        sel.close()
    return held, errors


def close_all(socks):
    for sock in socks:
        sock.close()
    socks.clear()


# ---------------------------------------------------------------------------- one run

def measure(target, scenario, args):
    """One fresh upstream pair + proxy, idle read, load, loaded read. Returns a result dict."""
    with tempfile.TemporaryDirectory(prefix=f"memory-{target}-") as tmp:
        procs = Processes(tmp)
        try:
            ups = start_mocks(procs, args.bin)
            port = free_port()
            pids_of = STARTERS[target](procs, tmp, port, ups, args)
            try:
                wait_port(port)
            except RuntimeError:
                procs.check_alive()
                raise
            time.sleep(SETTLE)
            procs.check_alive()
            pids = pids_of()
            idle = {pid: proc_status(pid) for pid in pids}

            t0 = time.monotonic()
            held, errors = open_connections(port, args.connections, scenario)
            try:
                secs = time.monotonic() - t0
                time.sleep(SETTLE)
                loaded = {pid: proc_status(pid) for pid in pids}
                socks = established([port, ups["a"], ups["b"]])
                opened = len(held)
            finally:
                close_all(held)
            procs.check_alive()
            return {
                "target": target, "scenario": scenario, "pids": pids, "idle": idle,
                "loaded": loaded, "opened": opened, "held": min(opened, socks[port]),
                "errors": errors, "secs": secs,
                "upstream_conns": socks[ups["a"]] + socks[ups["b"]],
            }
        finally:
            procs.stop_all()


# ---------------------------------------------------------------------------- report

def rows_of(res):
    """Table rows of one result: one per target, nginx as master+worker and worker alone."""
    pids = res["pids"]
    if res["target"] == "nginx":
        return [("nginx (master+worker)", pids), ("nginx worker", pids[1:])]
    return [(res["target"], pids)]


def mib(kib):
    return kib / 1024


def report(results, args):
    print(f"\nN = {args.connections} connections per run{args.cap_note}. held = connections "
          "that got their response (or first event) and were still established at the proxy "
          "when RSS was read; KiB per connection/stream = (loaded - idle) / held.\n")
    print("| target | scenario | RSS idle MiB | RSS loaded MiB | KiB per connection/stream "
          "| held | upstream conns at read | open time s |")
    print("|---|---|--:|--:|--:|--:|--:|--:|")
    for res in results:
        if "error" in res:
            print(f"| {res['target']} | {res['scenario']} | failed: {res['error']} | | | | | |")
            continue
        for name, pids in rows_of(res):
            idle = sum(res["idle"][p]["VmRSS"] for p in pids)
            loaded = sum(res["loaded"][p]["VmRSS"] for p in pids)
            print(f"| {name} | {res['scenario']} | {mib(idle):.1f} | {mib(loaded):.1f} "
                  f"| {per_conn(res, loaded - idle)} | {res['held']} | {res['upstream_conns']} "
                  f"| {res['secs']:.1f} |")
    print("\nRSS by kind, per process (VmRSS = RssAnon + RssFile + RssShmem):\n")
    print("| target | scenario | process | anon idle -> loaded MiB | file idle -> loaded MiB "
          "| shmem idle -> loaded MiB | anon KiB per connection/stream |")
    print("|---|---|---|--:|--:|--:|--:|")
    for res in results:
        if "error" in res:
            continue
        for i, pid in enumerate(res["pids"]):
            role = res["target"] if res["target"] != "nginx" else ("master", "worker")[min(i, 1)]
            a, b = res["idle"][pid], res["loaded"][pid]
            cells = [f"{mib(a.get(k, 0)):.1f} -> {mib(b.get(k, 0)):.1f}"
                     for k in ("RssAnon", "RssFile", "RssShmem")]
            anon = per_conn(res, b.get("RssAnon", 0) - a.get("RssAnon", 0))
            print(f"| {res['target']} | {res['scenario']} | {role} | {' | '.join(cells)} | {anon} |")
    notes = []
    for res in results:
        for msg, count in sorted((res.get("errors") or {}).items()):
            notes.append(f"{res['target']} {res['scenario']}: {count} connections failed: {msg}")
        if "error" not in res and res["held"] < res["opened"]:
            notes.append(
                f"{res['target']} {res['scenario']}: the proxy closed {res['opened'] - res['held']} "
                f"of {res['opened']} connections before the read (opening took "
                f"{res['secs']:.1f} s); their memory may still be counted in 'loaded'.")
    if notes:
        print()
        for note in notes:
            print(f"- {note}")


def per_conn(res, delta_kib):
    return f"{delta_kib / res['held']:.1f}" if res["held"] else "n/a"


def versions(args):
    def first_line(argv):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    out = []
    if "rollgate" in args.targets:
        out.append(f"rollgate: {args.bin} (mtime {time.ctime(os.path.getmtime(args.bin))})")
    if "nginx" in args.targets:
        out.append(first_line(["nginx", "-v"]))
    if "haproxy" in args.targets:
        out.append(first_line(["haproxy", "-v"]))
    return out


# ---------------------------------------------------------------------------- main

def csv(allowed):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}")
        return items
    return parse


def main():
    available = [t for t in TARGETS if t == "rollgate" or shutil.which(t)]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="target/release/rollgate",
                    help="rollgate binary (proxy under test and the mock upstream)")
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--targets", type=csv(TARGETS), default=available,
                    help=f"comma-separated, default: the available ones of {','.join(TARGETS)}")
    ap.add_argument("--scenario", type=csv(SCENARIOS), default=list(SCENARIOS),
                    help="comma-separated: idle,streams")
    args = ap.parse_args()
    args.bin = os.path.abspath(args.bin)
    if not os.access(args.bin, os.X_OK):
        ap.error(f"{args.bin} is not an executable (it is also the mock upstream)")
    for t in args.targets:
        if t != "rollgate" and not shutil.which(t):
            ap.error(f"{t} is not installed")

    # A proxy holds 2 sockets per stream (client + upstream), HAProxy reserves 2 per
    # connection whatever the scenario: raise the limit to fit, or lower N to the limit.
    nofile = raise_nofile(2 * args.connections + FD_SLACK)
    args.nofile, args.cap_note = nofile, ""
    fit = (nofile - FD_SLACK) // 2 // 100 * 100
    if fit < args.connections:
        args.cap_note = (f" (asked for {args.connections}; RLIMIT_NOFILE is {nofile} and "
                         f"cannot be raised, a proxy needs 2 sockets per stream + {FD_SLACK})")
        print(f"warning: N lowered to {fit}:{args.cap_note}", file=sys.stderr)
        args.connections = fit
    # SIGTERM -> SystemExit, so the finally blocks stop everything that was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    print(f"# memory.py: {time.strftime('%Y-%m-%d %H:%M:%S')}, {platform.node()}, "
          f"Linux {platform.release()}, {os.cpu_count()} CPUs")
    for line in versions(args):
        print(f"# {line}")
    results = []
    for target in args.targets:
        for scenario in args.scenario:
            print(f"# {target} {scenario} ...", flush=True)
            try:
                results.append(measure(target, scenario, args))
            except (RuntimeError, OSError) as e:
                results.append({"target": target, "scenario": scenario,
                                "error": str(e).replace("\n", " ")[:300]})
    report(results, args)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
