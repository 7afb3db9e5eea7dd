#!/usr/bin/env python3
"""Benchmark WebSocket tunnels: proxy.py beside a direct connection (and nginx when installed).

    python3 tests/bench_websocket.py            3 interleaved rounds (about a minute)
    python3 tests/bench_websocket.py --rounds 1 --no-nginx --json

Every process has its own interpreter: the echo backend (tests/wsbackend.py), proxy.py (tracking
on, as in production) and nginx; the measuring client is this process. All on 127.0.0.1.

Measured per target, in the same run, rounds rotating the order:
  latency     2,000 sequential echo round trips of a 32-byte text message: p50/p99; "added" is a
              target's p50 minus direct's p50 in the same round
  download    one 10 MiB binary message backend -> client: MB/s (10^6 bytes/s), send to last
              byte, the better of two transfers
  realtime    the same on /v1/realtime, where proxy.py also reads the frames for usage
  echo        one 10 MiB binary message client -> backend -> client: MB/s of the 20 MiB moved
  threads     proxy.py's thread count with 50 tunnels open minus with none (per tunnel)
The direct connection is plain ws:// (no TLS); proxy.py and nginx terminate TLS, as in use.
Not part of the test run (tests/run.py discovers test_*.py only).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import proxy  # noqa: E402
import wsbackend  # noqa: E402

MESSAGE = 10 * 1024 * 1024
NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid %(prefix)s/nginx.pid;
error_log %(prefix)s/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path %(prefix)s/client_body;
    proxy_temp_path %(prefix)s/proxy_temp;
    server {
        listen 127.0.0.1:%(port)d ssl;
        ssl_certificate %(cert)s;
        ssl_certificate_key %(key)s;
        location / {
            proxy_pass http://127.0.0.1:%(backend)d;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
        }
    }
}
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listens on port %d" % port)


class Target:
    def __init__(self, name, port, context):
        self.name, self.port, self.context = name, port, context

    def open(self, path="/ws"):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.context is not None:
            sock = self.context.wrap_socket(sock, server_hostname="localhost")
        answer = wsbackend.handshake(sock, "localhost:%d" % self.port, path)
        if answer.status != 101:
            raise RuntimeError("%s: handshake answered %d" % (self.name, answer.status))
        return answer.ws


def latency(target, count):
    ws = target.open()
    payload = "x" * 32
    times = []
    for _ in range(count):
        started = time.perf_counter()
        ws.send_text(payload)
        ws.recv()
        times.append(time.perf_counter() - started)
    ws.close()
    ws.sock.close()
    times.sort()
    return times[len(times) // 2] * 1e3, times[int(len(times) * 0.99)] * 1e3


def download(target, path="/ws"):
    ws = target.open(path)
    started = time.perf_counter()
    ws.send_text("cmd:send:%d" % MESSAGE)
    _, data = ws.recv()
    seconds = time.perf_counter() - started
    assert len(data) == MESSAGE
    ws.sock.close()
    return MESSAGE / seconds / 1e6


def echo(target, blob):
    ws = target.open()
    started = time.perf_counter()
    ws.send_binary(blob)
    _, data = ws.recv()
    seconds = time.perf_counter() - started
    assert data == blob
    ws.sock.close()
    return 2 * MESSAGE / seconds / 1e6


def proc_threads(pid: int) -> int:
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def threads_per_tunnel(target, pid, count=50):
    before = proc_threads(pid)
    sockets = [target.open() for _ in range(count)]
    for ws in sockets:                       # every tunnel has carried a message
        ws.send_text("t")
        ws.recv()
    during = proc_threads(pid)
    for ws in sockets:
        ws.sock.close()
    return (during - before) / count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=2000, help="round trips for the latency")
    parser.add_argument("--no-nginx", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="ws-bench-")
    children = []
    try:
        cert, key = os.path.join(workdir, "cert.pem"), os.path.join(workdir, "key.pem")
        proxy.ensure_certificates(cert, key)
        context = ssl.create_default_context(cafile=os.path.join(workdir, "ca.pem"))
        backend = subprocess.Popen([sys.executable, os.path.join(HERE, "wsbackend.py")],
                                   stdout=subprocess.PIPE)
        children.append(backend)
        backend_port = int(backend.stdout.readline())
        targets = [Target("direct", backend_port, None)]
        port = free_port()
        config = {"proxy": {"port": port, "bind": "127.0.0.1"},
                  "target": {"host": "127.0.0.1", "port": backend_port},
                  "tls": {"cert": cert, "key": key},
                  "tracking": {"statsFile": os.path.join(workdir, "stats.json")}}
        with open(os.path.join(workdir, "config.json"), "w") as handle:
            json.dump(config, handle)
        proxy_proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "proxy.py"), "--config",
                                       os.path.join(workdir, "config.json"), "--quiet"],
                                      cwd=workdir)
        children.append(proxy_proc)
        wait_port(port)
        targets.append(Target("proxy.py", port, context))
        nginx = shutil.which("nginx") or (os.path.exists("/usr/sbin/nginx") and "/usr/sbin/nginx")
        if nginx and not args.no_nginx:
            nport = free_port()
            with open(os.path.join(workdir, "nginx.conf"), "w") as handle:
                handle.write(NGINX_CONF % {"prefix": workdir, "port": nport, "cert": cert,
                                           "key": key, "backend": backend_port})
            children.append(subprocess.Popen([nginx, "-p", workdir, "-c",
                                              os.path.join(workdir, "nginx.conf")],
                                             stderr=subprocess.DEVNULL))
            wait_port(nport)
            targets.append(Target("nginx", nport, context))
        blob = os.urandom(MESSAGE)
        results = {t.name: {"p50": [], "p99": [], "added": [], "download": [], "echo": [],
                            "realtime": []} for t in targets}
        for round_number in range(args.rounds):
            order = targets[round_number % len(targets):] + targets[:round_number % len(targets)]
            direct_p50 = None
            p50s = {}
            for target in order:
                p50, p99 = latency(target, args.count)
                p50s[target.name] = p50
                results[target.name]["p50"].append(p50)
                results[target.name]["p99"].append(p99)
                # Best of two: the first transfer after the latency run is slowed by its
                # aftermath (seen even on the direct connection), whichever path comes first.
                results[target.name]["download"].append(max(download(target), download(target)))
                realtime = "/v1/realtime?model=m"
                results[target.name]["realtime"].append(max(download(target, realtime),
                                                            download(target, realtime)))
                results[target.name]["echo"].append(echo(target, blob))
            direct_p50 = p50s["direct"]
            for name, p50 in p50s.items():
                results[name]["added"].append(p50 - direct_p50)
        summary = {name: {key: round(statistics.median(values), 3)
                          for key, values in figures.items()}
                   for name, figures in results.items()}
        summary["proxy.py"]["threadsPerTunnel"] = threads_per_tunnel(targets[1], proxy_proc.pid)
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print("%-9s %9s %9s %10s %14s %14s %10s" % (
                "target", "p50 ms", "p99 ms", "added ms", "download MB/s", "realtime MB/s",
                "echo MB/s"))
            for name, row in summary.items():
                print("%-9s %9.3f %9.3f %10.3f %14.1f %14.1f %10.1f" % (
                    name, row["p50"], row["p99"], row["added"], row["download"], row["realtime"],
                    row["echo"]))
            print("proxy.py threads per open tunnel: %.2f"
                  % summary["proxy.py"]["threadsPerTunnel"])
        return 0
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        shutil.rmtree(workdir, True)


if __name__ == "__main__":
    sys.exit(main())
