#!/usr/bin/env python3
"""Benchmark proxy.py against nginx and a direct connection (issue 7), against the bare shape of
its own design and proxy-py (issue 16), and soak-test it (issue 8).

    python3 tests/bench.py              full run: every scenario, 3 interleaved rounds, minutes
    python3 tests/bench.py --quick      smoke run of 1-2 minutes: 1 round, smaller counts
    python3 tests/bench.py --json       the same figures, machine-readable on stdout
    python3 tests/bench.py --soak [S]   bounded soak of proxy.py alone (default 60 s)
    python3 tests/bench.py --proxy P    measure another copy of proxy.py (e.g. with a patch applied)
    python3 tests/bench.py --only a,d   some scenarios only (g, the idle figures, always runs)
    python3 tests/bench.py --instructions  instructions per SSE event and per request, proxy.py
                                        and the bare shape under valgrind's callgrind: counted,
                                        so repeatable on a busy machine (needs valgrind; ~3 min)
    more: --rounds N, --no-nginx, --no-proxypy, --nginx-workers N, --client-procs N (default 2),
          --seed N (soak), --proxy-pid-file PATH (to attach a profiler such as py-spy)

Not part of the test run (tests/run.py discovers test_*.py only). Standard library only; every
socket is on 127.0.0.1; every child process is ended and the temporary directory removed on exit,
also after Ctrl-C or an error.

What runs where, and why (a 2-core machine is noisy; each piece must be honest about its share):

  upstream  This file started again as `bench.py --serve-upstream`, in its own process: an asyncio
            HTTP/1.1 server on raw transports (keep-alive, fixed JSON answers, SSE whose events
            carry their monotonic send time, a 256 MiB body, OpenAI/Anthropic/Ollama shapes with
            token usage). It is measured alone first ("direct"), so the table shows its ceiling.
  proxy.py  Its own process: `python3 proxy.py --config <tmp>/proxy-config.json --quiet`, with
            tracking enabled and the stats file on, as in production.
  nginx     When installed: a child process with its own prefix and config, `daemon off`,
            `master_process on`, `worker_processes 1` (see NGINX_CONF for why), TLS with the same
            certificate as proxy.py, `proxy_buffering off`, HTTP/1.1 and keep-alive upstream.
  clients   Raw sockets + ssl. Sequential scenarios run in this process. Concurrent ones run in
            forked client processes, each an event loop over non-blocking sockets (no threads, so
            no GIL hand-offs inside the measuring client), started together by an Event once every
            connection is open.

The scenarios (see each bench_* function for how it is measured):
  a  small non-streamed POST, sequentially over one keep-alive connection: p50/p99 latency
  b  the same with a new connection (TCP + TLS handshake) per request: p50/p99
  c  requests/s with 32 concurrent keep-alive clients, plus CPU used by server, upstream, clients
  d  SSE: 20 streams x 200 events 5 ms apart: per-event latency (receive time minus the
     upstream's send time; CLOCK_MONOTONIC is system-wide on Linux), added latency (a target's
     percentile minus direct's in the same round), time to first byte, complete streams
  e  one 256 MiB response: MB/s (10^6 bytes per second)
  f  200 simultaneous streams x 100 events 20 ms apart: failures, per-event p99, peak RSS
  g  idle RSS at start and end, certificate generation time
  h  one chunked response of h_chunks 1-byte chunks written at once (issue 11): seconds to
     receive it all; a relay that writes each chunk on its own takes ~40 s for 2 million
  i  d's streams without stream_options.include_usage: proxy.py then injects it and strips
     the usage from the stream (d and f ask for it themselves, as issue 16's benchmark does)

Memory is counted with shared pages once (see footprint_mib): for proxy.py that is its VmRSS.
Each target's CPU use is read from /proc during c, d and f, so a saturated server shows.

Every scenario runs against direct, nginx, bare, proxy-py and proxy.py in the same run,
interleaved: each round rotates the order, so slow drift of the machine spreads over all of them.
Figures are medians over the rounds.

  bare      tests/bare_proxy.py (issue 16): ThreadingHTTPServer + ssl + http.client, read1()
            streaming, one upstream connection per client connection, nothing else: the floor
            of proxy.py's own design. Issue 16's table gives every figure as a ratio to nginx
            and to it.
  proxy-py  When `pip install proxy.py` (the PyPI name of proxy-py) has been done: its defaults
            with the catch-all reverse-proxy plugin of tests/proxypy_plugin.py; --no-proxypy
            leaves it out.
  start     proxy.py restarted with the same config: start to first answer and VmRSS, both as it
            starts now (re-run from its bytecode cache) and with LLM_PROXY_NO_RERUN=1 (as a plain
            script), interleaved.
"""

import argparse
import asyncio
import ctypes
import gc
import glob
import json
import math
import multiprocessing
import os
import platform
import random
import re
import select
import selectors
import shutil
import signal
import socket
import ssl
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_PROXY = os.path.join(ROOT, "proxy.py")
MiB = 1024 * 1024


# ==================================================================================================
# Settings: the two presets (full and --quick)
# ==================================================================================================

FULL = {
    "rounds": 3,
    "a_requests": 2000,
    "b_requests": 200,
    "c_clients": 32, "c_warmup": 0.5, "c_seconds": 3.0,
    "d_streams": 20, "d_events": 200, "d_interval_ms": 5.0,
    "e_bytes": 256 * MiB,
    "f_streams": 200, "f_events": 100, "f_interval_ms": 20.0,
    "h_chunks": 2000000,
    "cert_runs": 3,
    "startup_runs": 5,
}

# --quick keeps every scenario and its concurrency (200 streams still measure the peak RSS) but
# shortens counts and durations; 64 MiB instead of 256 MiB is enough to see a throughput.
QUICK = dict(FULL, rounds=1, a_requests=500, b_requests=50, c_warmup=0.3, c_seconds=1.5,
             d_events=50, e_bytes=64 * MiB, f_events=25, h_chunks=200000, cert_runs=1,
             startup_runs=3)


class BenchError(Exception):
    """A failure that makes the figures meaningless: a child died, a response was malformed."""


def say(message: str) -> None:
    """Progress goes to stderr, so `--json` keeps stdout for the JSON document alone."""
    print(message, file=sys.stderr, flush=True)


# ==================================================================================================
# Small helpers: percentiles, /proc readers, ports
# ==================================================================================================

def percentile(values: List[float], q: float) -> Optional[float]:
    """Nearest-rank percentile (q from 0 to 100) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(math.ceil(q / 100.0 * len(ordered))) - 1))
    return ordered[rank]


def median(values) -> Optional[float]:
    """Median of the non-None values; None when there are none."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1000.0


def proc_status_kib(pid: int, field: str) -> int:
    """A kB figure from /proc/<pid>/status (VmRSS, VmHWM); 0 if the process is gone."""
    try:
        with open("/proc/%d/status" % pid) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def rss_mib(pids: List[int]) -> float:
    """Summed VmRSS of `pids` in MiB (nginx is a master and its workers: all of them count)."""
    return sum(proc_status_kib(pid, "VmRSS") for pid in pids) / 1024.0


def footprint_mib(pids: List[int]) -> float:
    """Memory of a group of processes with shared pages counted once, in MiB: the private pages
    of each plus the shared pages of the largest (/proc/<pid>/smaps_rollup). For one process
    this is its VmRSS; for nginx (master + worker share the binary and libssl) summing VmRSS
    would count those pages twice."""
    private, shared = 0, 0
    for pid in pids:
        fields = {}
        try:
            with open("/proc/%d/smaps_rollup" % pid) as handle:
                for line in handle:
                    parts = line.split()
                    if len(parts) >= 2 and parts[1].isdigit():
                        fields[parts[0].rstrip(":")] = int(parts[1])
        except OSError:
            continue
        private += fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
        shared = max(shared, fields.get("Shared_Clean", 0) + fields.get("Shared_Dirty", 0))
    return (private + shared) / 1024.0


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pids: List[int]) -> float:
    """User + system CPU time used so far by `pids` (from /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as handle:
                data = handle.read()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2:].split()   # the name may contain spaces
        total += int(fields[11]) + int(fields[12])     # utime, stime (fields 14, 15)
    return total / float(_CLOCK_TICKS)


def child_pids(parent: int) -> List[int]:
    """Pids whose parent is `parent` (nginx's workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as handle:
                data = handle.read()
        except OSError:
            continue
        if int(data[data.rindex(")") + 2:].split()[1]) == parent:
            found.append(int(entry))
    return found


def free_port() -> int:
    """An unused loopback port. proxy.py and nginx take a port number, not a socket, so this is
    the one place where a port is picked and released; start_* retry if another program takes it
    in between."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RssSampler(threading.Thread):
    """Samples the memory of some processes every `interval` seconds and keeps the peaks: the
    summed VmRSS (`peak`) and the footprint with shared pages counted once (`peak_footprint`)."""

    def __init__(self, pids: List[int], interval: float = 0.02, every: float = 0.0):
        super().__init__(name="rss-sampler", daemon=True)
        self.pids = list(pids)
        self.interval = interval
        self.every = every                      # also keep (seconds, MiB) this often, if > 0
        self.timeline: List[Tuple[float, float]] = []
        self.peak = rss_mib(self.pids)
        self.peak_footprint = footprint_mib(self.pids)
        self._stop_event = threading.Event()

    def run(self):
        started = next_mark = time.monotonic()
        while not self._stop_event.wait(self.interval):
            rss = rss_mib(self.pids)
            self.peak = max(self.peak, rss)
            self.peak_footprint = max(self.peak_footprint, footprint_mib(self.pids))
            now = time.monotonic()
            if self.every and now >= next_mark:
                self.timeline.append((round(now - started, 1), round(rss, 1)))
                next_mark += self.every

    def stop(self) -> float:
        """Stop sampling; returns the peak summed VmRSS in MiB."""
        self._stop_event.set()
        self.join(2)
        return self.peak


# ==================================================================================================
# Client side: HTTP/1.1 over raw sockets, timed to the microsecond
# ==================================================================================================

_HEAD, _FIXED, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE = range(7)

# Each bench event carries the upstream's send time as its first JSON field.
_EVENT_TIME = re.compile(rb'"t":([0-9]+\.[0-9]+)')


class ResponseReader:
    """Incremental parser for one HTTP/1.1 response, fed with whatever recv() returned.

    Knows the framings a proxy may choose (RFC 9112 §6.3): Content-Length, chunked, or until
    close. De-chunked body data goes to `on_body` as it arrives; `done` turns true at the end.
    A client measuring a proxy must not guess at bad framing, so a malformed one raises BenchError.
    With pause_after_head, feed() stops after the head and leaves the body in `pending`.
    """

    def __init__(self, on_body: Optional[Callable[[bytes], None]] = None,
                 pause_after_head: bool = False):
        self.on_body = on_body
        self.pause_after_head = pause_after_head
        self.status = 0
        self.headers: Dict[str, str] = {}
        self.body_bytes = 0
        self.done = False
        self.keep_alive = True
        self.remaining = 0
        self.state = _HEAD
        self.pending = bytearray()

    def feed(self, data: bytes) -> None:
        """Consume bytes from the socket."""
        buf = self.pending
        buf += data
        while buf and not self.done:
            state = self.state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > 65536:
                        raise BenchError("response head over 64 KiB")
                    return
                head = bytes(buf[:end])
                del buf[:end + 4]
                self._parse_head(head)
                if self.pause_after_head and self.state != _HEAD:
                    return
            elif state == _FIXED or state == _CHUNK_DATA:
                take = min(len(buf), self.remaining)
                self._body(bytes(buf[:take]))
                del buf[:take]
                self.remaining -= take
                if not self.remaining:
                    if state == _FIXED:
                        self.done = True
                    else:
                        self.state = _CHUNK_END
            elif state == _CHUNK_END:
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise BenchError("chunk data not followed by CRLF")
                del buf[:2]
                self.state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 4096:
                        raise BenchError("chunk size line too long")
                    return
                line = bytes(buf[:end])
                del buf[:end + 2]
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise BenchError("bad chunk size line %r" % line[:40]) from None
                if size:
                    self.remaining = size
                    self.state = _CHUNK_DATA
                else:
                    self.state = _TRAILER
            elif state == _TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[:end + 2]
                if end == 0:
                    self.done = True
            else:  # _UNTIL_CLOSE
                self._body(bytes(buf))
                del buf[:]

    def eof(self) -> None:
        """The server closed the connection: the end of an until-close body, else an error."""
        if self.state == _UNTIL_CLOSE:
            self.done = True
            self.keep_alive = False
        elif not self.done:
            raise BenchError("connection closed in the middle of a response")

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise BenchError("malformed status line %r" % lines[0][:60])
        self.status = int(parts[1])
        if 100 <= self.status < 200:       # an interim answer (100 Continue): the real one follows
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        self.headers = headers
        if parts[0] == b"HTTP/1.0" or "close" in headers.get("connection", "").lower():
            self.keep_alive = False
        if self.status in (204, 304):
            self.done = True
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self.state = _CHUNK_SIZE
        elif "content-length" in headers:
            self.remaining = int(headers["content-length"])
            self.state = _FIXED
            self.done = self.remaining == 0
        else:
            self.state = _UNTIL_CLOSE
            self.keep_alive = False

    def _body(self, piece: bytes) -> None:
        self.body_bytes += len(piece)
        if self.on_body is not None:
            self.on_body(piece)


class EventClock:
    """Times the SSE events of one stream as their bytes arrive.

    The caller sets `now` (time.monotonic() at socket readiness) before feeding the reader; every
    complete event found in the body is then `now - t`, t being the upstream's send time.
    """

    def __init__(self, latencies: List[float]):
        self.latencies = latencies   # shared by every stream of a client process
        self.now = 0.0
        self.events = 0
        self.done_seen = False
        self._partial = bytearray()

    def on_body(self, piece: bytes) -> None:
        buf = self._partial
        buf += piece
        end = buf.rfind(b"\n\n")
        if end < 0:
            return
        block = bytes(buf[:end])
        del buf[:end + 2]
        now = self.now
        for match in _EVENT_TIME.finditer(block):
            self.latencies.append(now - float(match.group(1)))
            self.events += 1
        if b"data: [DONE]" in block:
            self.done_seen = True


def open_socket(target: "Target", timeout: float = 30.0):
    """A connected, handshaken socket to `target` (TLS unless it is the direct upstream)."""
    raw = socket.create_connection((target.host, target.port), timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if target.context is None:
        return raw
    try:
        return target.context.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise


class Connection:
    """One blocking client connection; exchange() sends a request and reads its whole answer."""

    def __init__(self, target: "Target", timeout: float = 30.0):
        self.sock = open_socket(target, timeout)

    def exchange(self, request: bytes, on_body=None) -> ResponseReader:
        """Send one request, read one response. BenchError if the framing is broken."""
        self.sock.sendall(request)
        reader = ResponseReader(on_body)
        recv = self.sock.recv
        while not reader.done:
            data = recv(262144)
            if not data:
                reader.eof()
                break
            reader.feed(data)
        if reader.pending:
            raise BenchError("%d bytes after the end of a response" % len(reader.pending))
        return reader

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def send_nonblocking(sock, data: bytes) -> None:
    """sendall() for a non-blocking (TLS) socket: requests are small, so this rarely waits."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            select.select([], [sock], [], 1.0)
            continue
        view = view[sent:]


# What an SDK sends: a realistic header set, so header parsing costs what it costs in production.
_SDK_HEADERS = (
    "Host: localhost\r\n"
    "User-Agent: OpenAI/Python 1.54.0\r\n"
    "Accept: application/json\r\n"
    "Accept-Encoding: gzip, deflate\r\n"
    "Content-Type: application/json\r\n"
    "Authorization: Bearer sk-bench-not-a-real-key\r\n"
    "X-Stainless-Lang: python\r\n"
    "X-Stainless-Package-Version: 1.54.0\r\n"
    "X-Stainless-OS: Linux\r\n"
    "X-Stainless-Arch: x64\r\n"
    "X-Stainless-Runtime: CPython\r\n"
    "X-Stainless-Runtime-Version: 3.11.7\r\n"
)


def post_request(path: str, body: bytes, extra: str = "") -> bytes:
    """A complete POST request with SDK-like headers."""
    return ("POST %s HTTP/1.1\r\n%s%sContent-Length: %d\r\n\r\n"
            % (path, _SDK_HEADERS, extra, len(body))).encode("latin-1") + body


def get_request(path: str, extra: str = "") -> bytes:
    return ("GET %s HTTP/1.1\r\nHost: localhost\r\nUser-Agent: llm-proxy-bench\r\n"
            "Accept: */*\r\n%s\r\n" % (path, extra)).encode("latin-1")


def _json_body(payload) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


SMALL_BODY = _json_body({
    "model": "bench-model", "max_tokens": 16, "stream": False,
    "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
})
SMALL_REQUEST = post_request("/v1/chat/completions", SMALL_BODY)


def stream_request(events: int, interval_ms: float, include_usage: bool = True) -> bytes:
    """An OpenAI streaming chat request; the query tells the upstream how many events and when.

    With include_usage (d, f: as issue 16's outside benchmark asks) every chunk carries
    "usage":null and the last one the usage, which proxy.py reads and passes on as they are.
    Without it (i) proxy.py asks the backend for usage itself and strips it from the stream.
    """
    payload = {
        "model": "bench-model", "max_tokens": events, "stream": True,
        "messages": [{"role": "user", "content": "Count slowly."}],
    }
    if include_usage:
        payload["stream_options"] = {"include_usage": True}
    body = _json_body(payload)
    return post_request("/v1/chat/completions?events=%d&interval_ms=%g" % (events, interval_ms),
                        body)


# ==================================================================================================
# Client processes: forked, started together, each an event loop over non-blocking sockets
# ==================================================================================================

_LIVE_WORKERS: List[Any] = []


def _client_main(worker, args, results, ready, go):
    """Body of a client process: run `worker`, send its result (or the traceback) to the parent."""
    try:
        result = worker(*args, ready=ready, go=go)
    except BaseException:
        result = {"error": traceback.format_exc(limit=6)}
    finally:
        ready.set()        # a worker that failed early must not leave the parent waiting
    results.send(result)
    results.close()


def run_client_processes(worker, argsets: List[tuple], timeout: float,
                         on_go: Optional[Callable[[], None]] = None) -> List[dict]:
    """Fork one client process per argument tuple; when all are ready, start them together.

    Fork rather than spawn: the children inherit the target and its TLS context, and start in
    milliseconds. Returns their result dicts; raises BenchError if one failed or overran.
    """
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    readies, pipes, procs = [], [], []
    for args in argsets:
        ready = ctx.Event()
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_client_main, args=(worker, args, send, ready, go), daemon=True)
        proc.start()
        send.close()
        readies.append(ready)
        pipes.append(receive)
        procs.append(proc)
    _LIVE_WORKERS.extend(procs)
    try:
        deadline = time.monotonic() + 60
        for ready in readies:
            if not ready.wait(max(0.0, deadline - time.monotonic())):
                raise BenchError("a client process did not open its connections within 60 s")
        if on_go is not None:
            on_go()
        go.set()
        started = time.monotonic()
        results = []
        for pipe in pipes:
            if not pipe.poll(max(0.0, started + timeout - time.monotonic())):
                raise BenchError("a client process did not finish within %.0f s" % timeout)
            results.append(pipe.recv())
        for result in results:
            if "error" in result:
                raise BenchError("client process failed:\n" + result["error"])
        return results
    finally:
        for proc in procs:
            proc.join(2)
            if proc.is_alive():
                proc.terminate()
                proc.join(2)
            _LIVE_WORKERS.remove(proc)
        for pipe in pipes:
            pipe.close()


def _rps_worker(target, connections, request, warmup, duration, ready, go):
    """Closed loop: each connection sends the next request as soon as the last answer is in.
    Counts answers completed inside [warmup, warmup + duration] after go."""
    socks = [open_socket(target) for _ in range(connections)]
    ready.set()
    go.wait(60)
    cpu_start = os.times()
    sel = selectors.DefaultSelector()
    start = time.monotonic()
    window_start, end = start + warmup, start + warmup + duration
    for sock in socks:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, [sock, ResponseReader()])
        send_nonblocking(sock, request)
    completed = errors = 0
    now = start
    while now < end:
        for key, _ in sel.select(end - now):
            state = key.data
            sock, reader = state
            while True:
                try:
                    data = sock.recv(65536)
                except (ssl.SSLWantReadError, BlockingIOError):
                    break
                if not data:
                    raise BenchError("the server closed a keep-alive connection")
                reader.feed(data)
                if reader.done:
                    finished = time.monotonic()
                    if reader.status != 200:
                        errors += 1
                    elif window_start <= finished < end:
                        completed += 1
                    reader = state[1] = ResponseReader()
                    if finished < end:
                        send_nonblocking(sock, request)
                    break
        now = time.monotonic()
    cpu_end = os.times()
    for sock in socks:
        sock.close()
    return {"completed": completed, "errors": errors,
            "cpu": (cpu_end[0] - cpu_start[0]) + (cpu_end[1] - cpu_start[1]),
            "wall": time.monotonic() - start}


def _stream_worker(target, count, request, events, deadline_s, ready, go):
    """Open `count` connections, then on go send one streaming request on each and time every
    event as it arrives (one event loop, so a busy stream never delays the clock of another
    beyond the loop's own turn). Between two sends the loop reads whatever already arrived, so
    a stream's time to first byte is not inflated by the sending of the streams after it."""
    socks = [open_socket(target) for _ in range(count)]
    ready.set()
    go.wait(60)
    latencies: List[float] = []
    sel = selectors.DefaultSelector()
    states = []
    open_count = [0]

    def service(timeout: float) -> None:
        """One select() pass: read every ready socket, time its events, close finished ones."""
        for key, _ in sel.select(timeout):
            state = key.data
            now = time.monotonic()
            reader, clock, sock = state["reader"], state["clock"], state["sock"]
            finished = False
            try:
                while True:
                    try:
                        data = sock.recv(65536)
                    except (ssl.SSLWantReadError, BlockingIOError):
                        break
                    if not data:
                        reader.eof()
                        finished = True
                        break
                    if state["first"] is None:
                        state["first"] = now
                    clock.now = now
                    reader.feed(data)
                    if reader.done:
                        finished = True
                        break
            except (OSError, BenchError) as exc:
                state["failure"] = "%s: %s" % (type(exc).__name__, exc)
                finished = True
            if finished:
                sel.unregister(sock)
                sock.close()
                open_count[0] -= 1

    for sock in socks:
        sock.setblocking(False)
        clock = EventClock(latencies)
        state = {"sock": sock, "clock": clock, "reader": ResponseReader(clock.on_body),
                 "sent": time.monotonic(), "first": None, "failure": None}
        send_nonblocking(sock, request)
        sel.register(sock, selectors.EVENT_READ, state)
        states.append(state)
        open_count[0] += 1
        service(0)
    deadline = time.monotonic() + deadline_s
    while open_count[0]:
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            break
        service(timeout)
    ttfb, failures, complete = [], [], 0
    for state in states:
        reader, clock = state["reader"], state["clock"]
        if state["first"] is not None:
            ttfb.append(state["first"] - state["sent"])
        problem = state["failure"]
        if problem is None:
            if not reader.done:
                problem = "timed out after %d of %d events" % (clock.events, events)
            elif reader.status != 200:
                problem = "HTTP %d" % reader.status
            elif clock.events != events or not clock.done_seen:
                problem = "%d of %d events%s" % (clock.events, events,
                                                 "" if clock.done_seen else ", no [DONE]")
        if problem is None:
            complete += 1
        else:
            failures.append(problem)
        if state["sock"].fileno() >= 0:
            state["sock"].close()
    return {"latencies": latencies, "ttfb": ttfb, "complete": complete, "failures": failures}


# ==================================================================================================
# The upstream: a fast fake LLM backend (asyncio, raw transports), run as its own process
# ==================================================================================================

_BLOB = os.urandom(MiB)
_BLOB_VIEW = memoryview(_BLOB)

# OpenAI chat chunk; "t" (the monotonic send time) comes first so clients find it cheaply.
_OAI_CHUNK = (b'data: {"t":%.6f,"id":"chatcmpl-bench","object":"chat.completion.chunk",'
              b'"created":1700000000,"model":%s,"system_fingerprint":"fp_bench","choices":'
              b'[{"index":0,"delta":{"content":" token%d"},"logprobs":null,"finish_reason":null}]'
              b'%s}\n\n')
_ANTHROPIC_DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","t":%.6f,'
                    b'"index":0,"delta":{"type":"text_delta","text":" token%d"}}\n\n')
_OLLAMA_CHAT_LINE = (b'{"model":%s,"t":%.6f,"created_at":"2024-06-01T12:00:00.000000Z",'
                     b'"message":{"role":"assistant","content":" token%d"},"done":false}\n')
_OLLAMA_GENERATE_LINE = (b'{"model":%s,"t":%.6f,"created_at":"2024-06-01T12:00:00.000000Z",'
                         b'"response":" token%d","done":false}\n')

EMITTED_FIELDS = ("prompt", "completion", "total", "cacheRead", "cacheWrite", "reasoning")


class _UpstreamRequest:
    __slots__ = ("method", "path", "query", "headers", "body", "keep_alive")

    def __init__(self, method, path, query, headers, body, keep_alive):
        self.method, self.path, self.query = method, path, query
        self.headers, self.body, self.keep_alive = headers, body, keep_alive


def _parse_upstream_request(buf: bytearray):
    """One complete request from the front of `buf` (removed from it), or None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).split(b"\r\n")
    method, target, version = lines[0].split(b" ")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    pos = end + 4
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        body = bytearray()
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
            pos = line_end + 2
            if size == 0:
                while True:                         # trailers, up to the empty line
                    line_end = buf.find(b"\r\n", pos)
                    if line_end < 0:
                        return None
                    empty, pos = line_end == pos, line_end + 2
                    if empty:
                        break
                break
            if len(buf) < pos + size + 2:
                return None
            body += buf[pos:pos + size]
            pos += size + 2
        body = bytes(body)
    else:
        length = int(headers.get(b"content-length", b"0"))
        if len(buf) < pos + length:
            return None
        body = bytes(buf[pos:pos + length])
        pos += length
    del buf[:pos]
    keep_alive = version == b"HTTP/1.1" and b"close" not in headers.get(b"connection", b"").lower()
    path, _, query_string = target.decode("latin-1").partition("?")
    query = dict(item.partition("=")[::2] for item in query_string.split("&") if item)
    return _UpstreamRequest(method.decode("latin-1"), path, query, headers, body, keep_alive)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class UpstreamProtocol(asyncio.Protocol):
    """One backend connection: parses requests (keep-alive, one at a time) and lets FakeBackend
    answer; respects the transport's flow control for the big body."""

    def __init__(self, backend: "FakeBackend"):
        self.backend = backend
        self.loop = backend.loop
        self.transport = None
        self.buf = bytearray()
        self.busy = False
        self.keep_alive = True
        self.closed = False
        self.paused = False
        self.on_resume: Optional[Callable[[], None]] = None
        self.timer = None

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        if self.on_resume is not None:
            self.on_resume()

    def data_received(self, data):
        self.buf += data
        if not self.busy:
            self.process()

    def process(self):
        while not self.busy and not self.closed:
            try:
                request = _parse_upstream_request(self.buf)
            except ValueError:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                     b"Connection: close\r\n\r\n")
                self.transport.close()
                return
            if request is None:
                return
            self.busy = True
            self.keep_alive = request.keep_alive
            self.backend.handle(self, request)

    def send(self, data) -> None:
        if not self.closed:
            self.transport.write(data)

    def respond(self, status: int, content_type: str, body: bytes) -> None:
        """A complete answer with Content-Length, head and body in one write."""
        head = "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
            status, "OK" if status == 200 else "Error", content_type, len(body),
            "" if self.keep_alive else "Connection: close\r\n")
        self.send(head.encode("latin-1") + body)
        self.finish()

    def start_stream(self, content_type: str) -> None:
        self.send(("HTTP/1.1 200 OK\r\nContent-Type: %s\r\nCache-Control: no-cache\r\n"
                   "Transfer-Encoding: chunked\r\n%s\r\n"
                   % (content_type, "" if self.keep_alive else "Connection: close\r\n"))
                  .encode("latin-1"))

    def finish(self) -> None:
        """The response is out: take the next request, or close."""
        self.busy = False
        self.on_resume = None
        self.timer = None
        if not self.keep_alive:
            self.transport.close()
        elif self.buf:
            self.process()


class TimedStream:
    """One chunked streaming answer on a fixed schedule: event i leaves at start + (i+1) * interval
    (loop.call_at, so the schedule never drifts), each stamped with time.monotonic() just before
    its write; then the tail pieces and the last chunk; then `on_complete`."""

    def __init__(self, proto: UpstreamProtocol, make_event, count: int, interval: float,
                 tail: List[bytes], on_complete: Callable[[], None]):
        self.proto, self.make_event, self.count = proto, make_event, count
        self.interval, self.tail, self.on_complete = interval, tail, on_complete
        self.index = 0
        self.start = proto.loop.time()

    def schedule(self) -> None:
        if self.index >= self.count:
            self.end()
            return
        self.proto.timer = self.proto.loop.call_at(self.start + (self.index + 1) * self.interval,
                                                   self.tick)

    def tick(self) -> None:
        if self.proto.closed:
            return
        self.proto.send(_chunk(self.make_event(self.index, time.monotonic())))
        self.index += 1
        self.schedule()

    def end(self) -> None:
        for piece in self.tail:
            self.proto.send(_chunk(piece))
        self.proto.send(b"0\r\n\r\n")
        if not self.proto.closed:
            self.on_complete()
        self.proto.finish()


class FakeBackend:
    """The upstream's routes. Counts the token usage it emits, in the stats store's terms
    (PROTOCOLS.md: Anthropic prompt = input + cache creation + cache read), so the soak can check
    the proxy's totals against it exactly.

      POST /v1/chat/completions   OpenAI (stream, stream_options.include_usage honoured)
      POST /v1/messages           Anthropic (message_start / message_delta usage)
      POST /api/chat, /api/generate   Ollama (NDJSON, streams unless "stream": false)
      GET  /v1/models, /api/tags  model lists
      GET  /bench/blob?bytes=N    N bytes with Content-Length, under transport flow control
      GET  /_upstream/emitted, POST /_upstream/reset: the counters (asked directly, not via a proxy)
    Streams take ?events=N&interval_ms=M from the query, else the body's token limit.
    """

    def __init__(self, loop):
        self.loop = loop
        self.reset()

    def reset(self) -> None:
        self.emitted = {"requests": 0, "usageResponses": 0}
        self.emitted.update(dict.fromkeys(EMITTED_FIELDS, 0))

    def count_usage(self, prompt, completion, total, cache_read=0, cache_write=0, reasoning=0):
        emitted = self.emitted
        emitted["usageResponses"] += 1
        emitted["prompt"] += prompt
        emitted["completion"] += completion
        emitted["total"] += total
        emitted["cacheRead"] += cache_read
        emitted["cacheWrite"] += cache_write
        emitted["reasoning"] += reasoning

    def handle(self, proto: UpstreamProtocol, req: _UpstreamRequest) -> None:
        path = req.path
        if path.startswith("/_upstream/"):
            if path == "/_upstream/reset":
                self.reset()
            proto.respond(200, "application/json", _json_body(self.emitted))
            return
        self.emitted["requests"] += 1
        if path == "/bench/blob":
            self.blob(proto, int(req.query.get("bytes", "0")))
            return
        if path == "/bench/tiny":
            self.tiny_chunks(proto, int(req.query.get("chunks", "0")))
            return
        if path in ("/v1/models", "/api/tags"):
            models = {"object": "list", "data": [{"id": "bench-model", "object": "model",
                                                  "created": 1700000000, "owned_by": "bench"}]}
            if path == "/api/tags":
                models = {"models": [{"name": "bench-model:latest", "model": "bench-model:latest",
                                      "size": 4661224676, "digest": "0" * 64}]}
            proto.respond(200, "application/json", _json_body(models))
            return
        try:
            payload = json.loads(req.body) if req.body else {}
        except ValueError:
            payload = {}
        if not isinstance(payload, dict):
            payload = {}
        if path == "/v1/chat/completions":
            self.openai_chat(proto, req, payload)
        elif path == "/v1/messages":
            self.anthropic(proto, req, payload)
        elif path in ("/api/chat", "/api/generate"):
            self.ollama(proto, req, payload, path == "/api/chat")
        else:
            proto.respond(404, "application/json",
                          b'{"error":{"message":"not found","type":"invalid_request_error"}}')

    # -- shapes ------------------------------------------------------------------------------

    @staticmethod
    def _plan(req, payload, limit):
        """(events, interval in seconds, prompt tokens) for one request; deterministic."""
        events = req.query.get("events") or limit or 16
        interval = float(req.query.get("interval_ms", "5")) / 1000.0
        prompt = 8 + len(req.body) // 8
        return max(0, min(int(events), 100000)), interval, prompt

    def openai_chat(self, proto, req, payload):
        count, interval, prompt = self._plan(req, payload, payload.get("max_tokens"))
        model = json.dumps(str(payload.get("model", "bench-model"))).encode()
        cached = prompt // 4 if prompt % 3 == 0 else 0
        reasoning = count // 5
        usage = {"prompt_tokens": prompt, "completion_tokens": count,
                 "total_tokens": prompt + count,
                 "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                 "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                               "accepted_prediction_tokens": 0,
                                               "rejected_prediction_tokens": 0}}

        def counted():
            self.count_usage(prompt, count, prompt + count, cache_read=cached, reasoning=reasoning)

        if not payload.get("stream"):
            body = (b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,'
                    b'"model":%s,"choices":[{"index":0,"message":{"role":"assistant","content":'
                    b'%s,"refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":%s,'
                    b'"system_fingerprint":"fp_bench"}'
                    % (model, json.dumps("token " * min(count, 64)).encode(), _json_body(usage)))
            counted()
            proto.respond(200, "application/json", body)
            return
        options = payload.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        usage_field = b',"usage":null' if include_usage else b""
        proto.start_stream("text/event-stream; charset=utf-8")
        proto.send(_chunk(b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk",'
                          b'"created":1700000000,"model":%s,"choices":[{"index":0,"delta":'
                          b'{"role":"assistant","content":"","refusal":null},"logprobs":null,'
                          b'"finish_reason":null}]%s}\n\n' % (model, usage_field)))
        tail = [b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk",'
                b'"created":1700000000,"model":%s,"choices":[{"index":0,"delta":{},'
                b'"logprobs":null,"finish_reason":"stop"}]%s}\n\n' % (model, usage_field)]
        if include_usage:
            tail.append(b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk",'
                        b'"created":1700000000,"model":%s,"choices":[],"usage":%s}\n\n'
                        % (model, _json_body(usage)))
        tail.append(b"data: [DONE]\n\n")
        TimedStream(proto, lambda i, now: _OAI_CHUNK % (now, model, i, usage_field), count,
                    interval, tail, counted if include_usage else (lambda: None)).schedule()

    def anthropic(self, proto, req, payload):
        count, interval, prompt = self._plan(req, payload, payload.get("max_tokens"))
        model = json.dumps(str(payload.get("model", "claude-bench"))).encode()
        cache_read = prompt // 2 if prompt % 2 == 0 else 0
        cache_write = prompt // 5 if prompt % 5 == 0 else 0
        whole_prompt = prompt + cache_read + cache_write

        def counted():
            self.count_usage(whole_prompt, count, whole_prompt + count, cache_read=cache_read,
                             cache_write=cache_write)

        if not payload.get("stream"):
            body = _json_body({
                "id": "msg_bench", "type": "message", "role": "assistant",
                "model": json.loads(model), "content": [{"type": "text",
                                                         "text": "token " * min(count, 64)}],
                "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": prompt, "cache_creation_input_tokens": cache_write,
                          "cache_read_input_tokens": cache_read, "output_tokens": count}})
            counted()
            proto.respond(200, "application/json", body)
            return
        proto.start_stream("text/event-stream; charset=utf-8")
        proto.send(_chunk(
            b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_bench",'
            b'"type":"message","role":"assistant","model":%s,"content":[],"stop_reason":null,'
            b'"stop_sequence":null,"usage":{"input_tokens":%d,"cache_creation_input_tokens":%d,'
            b'"cache_read_input_tokens":%d,"output_tokens":1}}}\n\n'
            % (model, prompt, cache_write, cache_read)))
        proto.send(_chunk(b'event: content_block_start\ndata: {"type":"content_block_start",'
                          b'"index":0,"content_block":{"type":"text","text":""}}\n\n'
                          b'event: ping\ndata: {"type": "ping"}\n\n'))
        tail = [b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
                b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
                b'"end_turn","stop_sequence":null},"usage":{"output_tokens":%d}}\n\n' % count,
                b'event: message_stop\ndata: {"type":"message_stop"}\n\n']
        TimedStream(proto, lambda i, now: _ANTHROPIC_DELTA % (now, i), count, interval, tail,
                    counted).schedule()

    def ollama(self, proto, req, payload, chat):
        options = payload.get("options") if isinstance(payload.get("options"), dict) else {}
        count, interval, prompt = self._plan(req, payload, options.get("num_predict"))
        model = json.dumps(str(payload.get("model", "bench-model"))).encode()
        final = {"model": json.loads(model), "created_at": "2024-06-01T12:00:01.000000Z",
                 "done": True, "done_reason": "stop", "total_duration": 1234567890,
                 "load_duration": 1234567, "prompt_eval_count": prompt,
                 "prompt_eval_duration": 12345678, "eval_count": count,
                 "eval_duration": 987654321}
        if chat:
            final["message"] = {"role": "assistant", "content": ""}
        else:
            final["response"] = ""
            final["context"] = [1, 2, 3]

        def counted():
            self.count_usage(prompt, count, prompt + count)

        if payload.get("stream") is False:       # Ollama streams unless told not to
            if chat:
                final["message"]["content"] = "token " * min(count, 64)
            else:
                final["response"] = "token " * min(count, 64)
            counted()
            proto.respond(200, "application/json; charset=utf-8", _json_body(final))
            return
        template = _OLLAMA_CHAT_LINE if chat else _OLLAMA_GENERATE_LINE
        proto.start_stream("application/x-ndjson")
        TimedStream(proto, lambda i, now: template % (model, now, i), count, interval,
                    [_json_body(final) + b"\n"], counted).schedule()

    def tiny_chunks(self, proto, count: int) -> None:
        """`count` chunks of one byte each ("1\\r\\nx\\r\\n"), written as fast as accepted."""
        proto.start_stream("text/plain")
        remaining = [count]
        block = b"1\r\nx\r\n" * 65536

        def pump():
            while remaining[0] and not proto.paused and not proto.closed:
                n = min(remaining[0], 65536)
                proto.transport.write(block if n == 65536 else block[:6 * n])
                remaining[0] -= n
            if not remaining[0] and not proto.closed:
                proto.send(b"0\r\n\r\n")
                proto.finish()
            elif proto.closed:
                proto.finish()

        proto.on_resume = pump
        pump()

    def blob(self, proto, size: int) -> None:
        """`size` bytes with Content-Length, written while the transport accepts them."""
        proto.send(("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    "Content-Length: %d\r\n\r\n" % size).encode("latin-1"))
        remaining = [size]

        def pump():
            while remaining[0] and not proto.paused and not proto.closed:
                n = min(remaining[0], MiB)
                proto.transport.write(_BLOB if n == MiB else _BLOB_VIEW[:n])
                remaining[0] -= n
            if not remaining[0] or proto.closed:
                proto.finish()

        proto.on_resume = pump
        pump()


def serve_upstream(workdir: Optional[str] = None) -> int:
    """--serve-upstream: serve on 127.0.0.1:<ephemeral>, print the port, stop when stdin closes
    (the benchmark holds the other end: if it dies, however it dies, the upstream follows).
    If the benchmark died, remove its `workdir`: even a SIGKILLed run leaves nothing behind."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    backend = FakeBackend(loop)
    server = loop.run_until_complete(loop.create_server(
        lambda: UpstreamProtocol(backend), "127.0.0.1", 0, backlog=4096))
    print(server.sockets[0].getsockname()[1], flush=True)

    parent = os.getppid()

    def on_stdin():
        if not os.read(0, 4096):
            loop.stop()

    if stat.S_ISFIFO(os.fstat(0).st_mode):   # started by the benchmark (by hand: Ctrl-C stops it)
        loop.add_reader(0, on_stdin)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, loop.stop)
    gc.freeze()            # the start-up objects need no more collecting: fewer pauses later
    try:
        loop.run_forever()
    finally:
        server.close()
    # Re-parented: the benchmark died without cleaning up (SIGTERM here came from
    # PR_SET_PDEATHSIG or the lifeline closed), so its temporary directory is ours to remove.
    if os.getppid() != parent and workdir and os.path.basename(workdir).startswith("llm-proxy-"):
        time.sleep(2)          # proxy.py and nginx got SIGTERM too (PR_SET_PDEATHSIG): let them go
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


# ==================================================================================================
# Child processes: upstream, certificates, proxy.py, nginx
# ==================================================================================================

try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:       # not Linux: children then rely on the cleanup in main() alone
    _LIBC = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the benchmark dies (even by SIGKILL)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Children:
    """The processes this run started. Each gets its own session (a Ctrl-C in the terminal reaches
    the benchmark, which then stops them in order) and a log file in the work directory."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.procs: List[subprocess.Popen] = []

    def spawn(self, name: str, argv: List[str], **kwargs) -> subprocess.Popen:
        log_path = os.path.join(self.workdir, name + ".log")
        with open(log_path, "ab") as log_file:
            kwargs.setdefault("stdout", log_file)
            kwargs.setdefault("stdin", subprocess.DEVNULL)
            proc = subprocess.Popen(argv, stderr=log_file, start_new_session=True,
                                    preexec_fn=_die_with_parent, **kwargs)
        proc.bench_log = log_path       # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def log_tail(self, proc, limit: int = 3000) -> str:
        try:
            with open(proc.bench_log, "rb") as handle:
                return handle.read()[-limit:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM, then SIGKILL after 5 s; by pid, never by name."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            try:
                self.stop(proc)
            except OSError:
                pass


class Target:
    """One way to reach the upstream: "direct" (plain HTTP to it), "nginx" or "proxy" (TLS)."""

    def __init__(self, name: str, port: int, context: Optional[ssl.SSLContext],
                 pids: Callable[[], List[int]], proc: Optional[subprocess.Popen] = None):
        self.name = name
        self.host = "127.0.0.1"
        self.port = port
        self.context = context
        self.pids = pids
        self.proc = proc

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None


def start_upstream(children: Children) -> Tuple[subprocess.Popen, int]:
    """The upstream in its own process; returns it and its port."""
    proc = children.spawn("upstream", [sys.executable, os.path.abspath(__file__),
                                       "--serve-upstream", "--workdir", children.workdir],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    line = proc.stdout.readline() if ready else b""
    if not line.strip().isdigit():
        raise BenchError("the upstream did not start:\n" + children.log_tail(proc))
    return proc, int(line)


_CERT_SCRIPT = r"""
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("proxy", sys.argv[1])
proxy = importlib.util.module_from_spec(spec)
sys.modules["proxy"] = proxy
spec.loader.exec_module(proxy)
out = {}
started = time.perf_counter()
proxy.ensure_certificates(sys.argv[2], sys.argv[3])
out["ensure_certificates_s"] = time.perf_counter() - started
keygen = getattr(proxy, "generate_rsa_key", None)
if keygen is not None:
    started = time.perf_counter()
    keygen()
    out["rsa_keygen_s"] = time.perf_counter() - started
print(json.dumps(out))
"""


def make_certificates(proxy_path: str, directory: str) -> dict:
    """Run proxy.ensure_certificates on a fresh directory in a fresh interpreter; returns the
    timings (module import excluded) and the paths. Times generate_rsa_key too, if proxy.py has
    it."""
    os.makedirs(directory, exist_ok=True)
    proxy_path = os.path.abspath(proxy_path)
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    done = subprocess.run([sys.executable, "-c", _CERT_SCRIPT, proxy_path, cert, key],
                          cwd=directory, capture_output=True, timeout=600,
                          preexec_fn=_die_with_parent)
    if done.returncode != 0 or not os.path.exists(cert):
        raise BenchError("proxy.ensure_certificates failed:\n"
                         + done.stderr.decode("utf-8", "replace")[-3000:])
    timing = json.loads(done.stdout.decode().strip().splitlines()[-1])
    ca = os.path.join(directory, "ca.pem")
    timing.update(cert=cert, key=key, ca=ca if os.path.exists(ca) else None)
    return timing


def client_context(ca_file: Optional[str]) -> ssl.SSLContext:
    """What a browser with our CA installed does: verify the chain and the name "localhost".
    Without a ca.pem beside the certificate, verification is off (and the report says so)."""
    if ca_file:
        context = ssl.create_default_context(cafile=ca_file)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


def _wait_until_serving(target: Target, probe: bytes, timeout: float) -> Optional[str]:
    """Poll `target` with `probe` until it answers 200; returns None, or the last problem."""
    deadline = time.monotonic() + timeout
    problem = "no answer"
    while time.monotonic() < deadline:
        if not target.alive():
            return "exited"
        try:
            conn = Connection(target, timeout=2)
            try:
                reader = conn.exchange(probe)
            finally:
                conn.close()
            if reader.status == 200:
                return None
            problem = "HTTP %d" % reader.status
        except (OSError, BenchError) as exc:
            problem = "%s: %s" % (type(exc).__name__, exc)
        time.sleep(0.05)
    return problem


START_TIMEOUT = 20.0          # seconds for a proxy to answer after its start (--instructions: more)


def _start_on_free_port(children: Children, name: str, start: Callable[[int], Target],
                        probe: bytes, timeout: float) -> Target:
    """start(port) on a free port until the target answers `probe` with 200; on another port
    when it lost that port to another program meanwhile (5 tries), else BenchError."""
    for _attempt in range(5):
        target = start(free_port())
        problem = _wait_until_serving(target, probe, timeout)
        if problem is None:
            return target
        log_text = children.log_tail(target.proc)
        children.stop(target.proc)
        if "already in use" not in log_text:
            raise BenchError("%s did not start (%s):\n%s" % (name, problem, log_text))
    raise BenchError("%s found no free port in 5 tries" % name)


def start_proxy(children: Children, proxy_path: str, workdir: str, upstream_port: int,
                certs: dict, context: ssl.SSLContext) -> Target:
    """proxy.py in its own process, tracking and the stats file on (as in production)."""
    proxy_path = os.path.abspath(proxy_path)

    def start(port: int) -> Target:
        config = {
            "proxy": {"port": port, "bind": "127.0.0.1", "allowedOrigins": "*",
                      "clientTimeout": 30},
            "target": {"host": "127.0.0.1", "port": upstream_port, "connectTimeout": 10,
                       "readTimeout": 600},
            "tls": {"cert": certs["cert"], "key": certs["key"]},
            "tracking": {"enabled": True, "statsFile": os.path.join(workdir, "stats.json"),
                         "persistInterval": 30, "historySize": 100},
        }
        config_path = os.path.join(workdir, "proxy-config.json")
        with open(config_path, "w") as handle:
            json.dump(config, handle, indent=2)
        proc = children.spawn("proxy", [sys.executable, proxy_path, "--config", config_path,
                                        "--quiet"], cwd=workdir, env=proxy_env())
        return Target("proxy", port, context, lambda p=proc: [p.pid], proc)

    return _start_on_free_port(children, "proxy.py", start, get_request("/_proxy/health"),
                               START_TIMEOUT)


BARE_PROXY = os.path.join(HERE, "bare_proxy.py")


def start_bare(children: Children, upstream_port: int, certs: dict,
               context: ssl.SSLContext) -> Target:
    """The bare shape (tests/bare_proxy.py, issue 16): ThreadingHTTPServer + ssl + http.client
    with read1() streaming and nothing else; the floor our own design can reach."""
    def start(port: int) -> Target:
        proc = children.spawn("bare", [sys.executable, BARE_PROXY, str(port), certs["cert"],
                                       certs["key"], str(upstream_port)])
        return Target("bare", port, context, lambda p=proc: [p.pid], proc)

    return _start_on_free_port(children, "the bare shape", start, get_request("/v1/models"),
                               START_TIMEOUT)


def proxypy_version() -> Optional[str]:
    """proxy-py's version when the package is installed (`pip install proxy.py`), else None.
    Asked from the temporary directory, so our own proxy.py cannot shadow the package."""
    try:
        done = subprocess.run([sys.executable, "-c", "import proxy.common.version as v; "
                               "print(v.__version__)"], capture_output=True, timeout=30,
                              cwd=tempfile.gettempdir())
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.decode().strip() or None if done.returncode == 0 else None


def start_proxypy(children: Children, workdir: str, upstream_port: int, certs: dict,
                  context: ssl.SSLContext) -> Target:
    """proxy-py (the PyPI package proxy.py) as a TLS reverse proxy with the catch-all plugin of
    tests/proxypy_plugin.py; its defaults otherwise (one acceptor/worker process per CPU)."""
    env = dict(os.environ, BENCH_UPSTREAM_PORT=str(upstream_port), PYTHONPATH=HERE)
    def start(port: int) -> Target:
        proc = children.spawn("proxy-py", [
            sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", str(port),
            "--enable-reverse-proxy", "--plugins", "proxypy_plugin.CatchAllReverseProxy",
            "--cert-file", certs["cert"], "--key-file", certs["key"], "--log-level", "WARNING"],
            cwd=workdir, env=env)
        return Target("proxy-py", port, context, lambda p=proc: [p.pid] + child_pids(p.pid),
                      proc)

    return _start_on_free_port(children, "proxy-py", start, get_request("/v1/models"), 30)


def _first_answer_s(target: Target, deadline: float) -> Optional[float]:
    """Poll every 2 ms until `target` answers /_proxy/health; returns when it did (monotonic)."""
    probe = get_request("/_proxy/health")
    while time.monotonic() < deadline and target.alive():
        try:
            conn = Connection(target, timeout=5)
            try:
                if conn.exchange(probe).status == 200:
                    return time.monotonic()
            finally:
                conn.close()
        except (OSError, BenchError):
            time.sleep(0.002)
    return None


def proxy_env(**extra) -> dict:
    """proxy.py's environment as on a user's machine: bytecode caches allowed (tests/run.py and
    some shells set PYTHONDONTWRITEBYTECODE, which would hide proxy.py's cache; the bench runs a
    copy in its temporary directory, so the cache lands there)."""
    env = dict(os.environ, **extra)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def measure_startup(children: Children, proxy_path: str, workdir: str, runs: int,
                    context: ssl.SSLContext, env: Optional[dict] = None,
                    as_module: bool = False) -> dict:
    """Start proxy.py `runs` more times with the config start_proxy wrote (existing certificates,
    tracking on): seconds from spawn to the first answer, and its RSS (VmRSS) then (VmHWM would
    not do: a re-exec resets it). The first run may write a bytecode cache; the medians are over
    the runs after it."""
    config_path = os.path.join(workdir, "proxy-config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    startup_dir = os.path.join(workdir, "startup")
    os.makedirs(startup_dir, exist_ok=True)
    times, peaks = [], []
    for _run in range(runs + 1):
        port = free_port()
        config["proxy"]["port"] = port
        config["tracking"]["statsFile"] = os.path.join(startup_dir, "stats.json")
        path = os.path.join(startup_dir, "config.json")
        with open(path, "w") as handle:
            json.dump(config, handle)
        started = time.monotonic()
        # as_module: `python3 -m proxy` with the file's folder on the path, which loads the
        # bytecode cache at once (a script is compiled before its first line runs).
        command = ["-m", os.path.basename(proxy_path)[:-3]] if as_module else [proxy_path]
        proc = children.spawn("startup", [sys.executable] + command + ["--config", path, "--quiet"],
                              cwd=startup_dir, env=env or proxy_env(
                                  PYTHONPATH=os.path.dirname(proxy_path)) if as_module
                              else env or proxy_env())
        target = Target("proxy", port, context, lambda p=proc: [p.pid], proc)
        answered = _first_answer_s(target, started + 30)
        peak = proc_status_kib(proc.pid, "VmRSS") / 1024.0 if proc.poll() is None else None
        children.stop(proc)
        if answered is None:
            raise BenchError("proxy.py did not answer after a restart:\n"
                             + children.log_tail(proc))
        times.append(answered - started)
        peaks.append(peak)
    return {"first_s": times[0], "start_to_answer_s": median(times[1:]),
            "rss_mib": median([p for p in peaks[1:] if p is not None]), "runs": runs}


# worker_processes 1: proxy.py is one process, and on a 2-core machine the client processes and
# the upstream need the other core; a second nginx worker would add contention, not capacity.
# keepalive_requests is raised because scenario a sends 2,000 requests on one connection (the
# default closes after 1,000). proxy_buffer_size stays at nginx's default (one page): that is
# what `proxy_buffering off` gives a stock nginx, and it bounds nginx's read size in scenario e.
NGINX_CONF = """\
# Written by tests/bench.py: nginx as a TLS reverse proxy in front of the bench upstream.
daemon off;
master_process on;
worker_processes %(workers)s;
%(user)s
pid %(prefix)s/nginx.pid;
error_log %(prefix)s/error.log warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
    client_body_temp_path %(prefix)s/client_body;
    proxy_temp_path %(prefix)s/proxy_temp;
    fastcgi_temp_path %(prefix)s/fastcgi_temp;
    uwsgi_temp_path %(prefix)s/uwsgi_temp;
    scgi_temp_path %(prefix)s/scgi_temp;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_max_body_size 0;
    upstream bench_upstream {
        server 127.0.0.1:%(upstream_port)d;
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }
    server {
        listen 127.0.0.1:%(port)d ssl;
        ssl_certificate %(cert)s;
        ssl_certificate_key %(key)s;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_buffering off;
            proxy_read_timeout 600s;
        }
    }
}
"""


def nginx_version(executable: str) -> str:
    done = subprocess.run([executable, "-v"], capture_output=True, timeout=10)
    return (done.stderr or done.stdout).decode("utf-8", "replace").strip().replace(
        "nginx version: ", "")


def start_nginx(children: Children, workdir: str, upstream_port: int, certs: dict,
                context: ssl.SSLContext, workers: str) -> Target:
    executable = shutil.which("nginx") or "/usr/sbin/nginx"
    prefix = os.path.join(workdir, "nginx")
    os.makedirs(prefix, exist_ok=True)
    user = ""
    if os.geteuid() == 0:
        # As root, nginx would switch its workers to "nobody" and a group Debian lacks.
        import grp
        import pwd
        user = "user %s %s;" % (pwd.getpwuid(os.geteuid()).pw_name,
                                grp.getgrgid(os.getegid()).gr_name)
    for _attempt in range(5):
        port = free_port()
        conf_path = os.path.join(prefix, "nginx.conf")
        with open(conf_path, "w") as handle:
            handle.write(NGINX_CONF % {
                "workers": workers, "user": user, "prefix": prefix, "port": port,
                "upstream_port": upstream_port, "cert": certs["cert"], "key": certs["key"]})
        proc = children.spawn("nginx", [executable, "-p", prefix, "-c", conf_path,
                                        "-e", os.path.join(prefix, "error.log")])
        target = Target("nginx", port, context, lambda p=proc: [p.pid] + child_pids(p.pid), proc)
        problem = _wait_until_serving(target, get_request("/v1/models"), START_TIMEOUT)
        if problem is None:
            return target
        try:
            with open(os.path.join(prefix, "error.log")) as handle:
                log_text = handle.read()[-3000:]
        except OSError:
            log_text = children.log_tail(proc)
        children.stop(proc)
        if "Address already in use" not in log_text:
            raise BenchError("nginx did not start (%s):\n%s" % (problem, log_text))
    raise BenchError("nginx found no free port in 5 tries")


# ==================================================================================================
# Scenarios a-g: each measures one target once and returns a flat dict of figures
# ==================================================================================================

def _check_ok(reader: ResponseReader) -> None:
    if reader.status != 200:
        raise BenchError("HTTP %d" % reader.status)


def bench_keepalive(target: Target, s: dict) -> dict:
    """a. Small non-streamed POSTs one after another on one keep-alive connection.

    Latency = send of the request to the last byte of the response (perf_counter). The bench
    process's garbage collector is off while timing, so client pauses do not land on one target.
    """
    conn = Connection(target)
    latencies = []
    clock = time.perf_counter
    try:
        for _ in range(50):                       # warm: pooled upstream connection, caches
            _check_ok(conn.exchange(SMALL_REQUEST))
        gc.disable()
        try:
            for _ in range(s["a_requests"]):
                started = clock()
                reader = conn.exchange(SMALL_REQUEST)
                latencies.append(clock() - started)
                _check_ok(reader)
        finally:
            gc.enable()
    finally:
        conn.close()
    return {"p50_ms": ms(percentile(latencies, 50)), "p99_ms": ms(percentile(latencies, 99)),
            "requests": len(latencies)}


def bench_new_connection(target: Target, s: dict) -> dict:
    """b. The same request on a new connection each time: TCP connect + full TLS handshake (no
    session resumption, like a first visit) + request + response. Direct is plain TCP."""
    latencies = []
    clock = time.perf_counter
    cipher = None
    gc.disable()
    try:
        for _ in range(s["b_requests"]):
            started = clock()
            conn = Connection(target)
            reader = conn.exchange(SMALL_REQUEST)
            latencies.append(clock() - started)
            if cipher is None and target.context is not None:
                cipher = "%s %s" % (conn.sock.version(), conn.sock.cipher()[0])
            conn.close()
            _check_ok(reader)
    finally:
        gc.enable()
    result = {"p50_ms": ms(percentile(latencies, 50)), "p99_ms": ms(percentile(latencies, 99))}
    if cipher:
        result["tls"] = cipher
    return result


def bench_rps(target: Target, s: dict, upstream_pid: int, procs: int) -> dict:
    """c. Requests/s with `c_clients` keep-alive connections in a closed loop, spread over `procs`
    client processes. CPU time of the server, the upstream and the clients is measured over the
    same window: whichever sits near 100% of a core is the bottleneck."""
    clients = s["c_clients"]
    split = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    server_pids = target.pids()
    marks = {}

    def on_go():
        marks["t"] = time.monotonic()
        marks["server"] = cpu_seconds(server_pids)
        marks["upstream"] = cpu_seconds([upstream_pid])

    results = run_client_processes(
        _rps_worker,
        [(target, n, SMALL_REQUEST, s["c_warmup"], s["c_seconds"]) for n in split if n],
        timeout=s["c_warmup"] + s["c_seconds"] + 60, on_go=on_go)
    wall = time.monotonic() - marks["t"]
    completed = sum(r["completed"] for r in results)
    server_cpu = cpu_seconds(server_pids) - marks["server"]
    result = {
        "rps": completed / s["c_seconds"],
        "errors": sum(r["errors"] for r in results),
        "server_cpu_pct": 100.0 * server_cpu / wall,
        # All requests answered in the window, warm-up included, share the CPU measured.
        "server_cpu_us_per_request": 1e6 * server_cpu / max(1, completed * wall / s["c_seconds"]),
        "client_cpu_pct": 100.0 * sum(r["cpu"] for r in results) / max(r["wall"] for r in results),
        "client_procs": len(results),
    }
    if target.name != "direct":
        upstream_cpu = cpu_seconds([upstream_pid]) - marks["upstream"]
        result["upstream_cpu_pct"] = 100.0 * upstream_cpu / wall
    return result


def bench_streams(target: Target, streams: int, events: int, interval_ms: float, procs: int,
                  sample_rss: bool = False, include_usage: bool = True) -> dict:
    """d and f. `streams` SSE streams started together (all connections are open and handshaken
    before go). Per-event latency = arrival time at the client minus the upstream's send time
    stamped in the event; TTFB = request sent to first response byte. A stream is complete when
    all events and [DONE] arrived over a correctly framed response."""
    request = stream_request(events, interval_ms, include_usage)
    split = [streams // procs + (1 if i < streams % procs else 0) for i in range(procs)]
    budget = events * interval_ms / 1000.0 + 30
    server_pids = target.pids()
    sampler = RssSampler(server_pids) if sample_rss else None
    marks = {}

    def on_go():
        marks["t"], marks["cpu"] = time.monotonic(), cpu_seconds(server_pids)
        if sampler is not None:
            sampler.start()

    try:
        results = run_client_processes(
            _stream_worker, [(target, n, request, events, budget) for n in split if n],
            timeout=budget + 30, on_go=on_go)
    finally:
        peak = sampler.stop() if sampler and sampler.is_alive() else None
    cpu_used = cpu_seconds(server_pids) - marks["cpu"]
    cpu_pct = 100.0 * cpu_used / (time.monotonic() - marks["t"])
    latencies = [x for r in results for x in r["latencies"]]
    ttfb = [x for r in results for x in r["ttfb"]]
    failures = [x for r in results for x in r["failures"]]
    result = {
        "event_p50_ms": ms(percentile(latencies, 50)),
        "event_p99_ms": ms(percentile(latencies, 99)),
        "ttfb_p50_ms": ms(percentile(ttfb, 50)), "ttfb_p99_ms": ms(percentile(ttfb, 99)),
        "complete": sum(r["complete"] for r in results), "streams": streams,
        "failures": len(failures), "events": len(latencies), "server_cpu_pct": cpu_pct,
        # CPU seconds are counted in clock ticks (10 ms): a rough figure for short runs.
        "server_cpu_us_per_event": 1e6 * cpu_used / len(latencies) if latencies else None,
    }
    if failures:
        result["failure_samples"] = sorted(set(failures))[:5]
    if peak is not None:
        result["peak_rss_sum_mib"] = peak
        result["peak_rss_mib"] = sampler.peak_footprint
    return result


def bench_throughput(target: Target, s: dict) -> dict:
    """e. One GET of e_bytes (Content-Length) read with recv_into into a reused 1 MiB buffer:
    MB/s = bytes / (last byte - request sent) / 10^6."""
    size = s["e_bytes"]
    conn = Connection(target, timeout=120)
    buffer = bytearray(MiB)
    view = memoryview(buffer)
    try:
        started = time.perf_counter()
        conn.sock.sendall(get_request("/bench/blob?bytes=%d" % size))
        reader = ResponseReader(pause_after_head=True)
        while reader.state == _HEAD:
            data = conn.sock.recv(65536)
            if not data:
                raise BenchError("closed before the response head")
            reader.feed(data)
        _check_ok(reader)
        if reader.state == _FIXED:
            remaining = reader.remaining - len(reader.pending)
            recv_into = conn.sock.recv_into
            while remaining > 0:
                got = recv_into(view, min(MiB, remaining))
                if not got:
                    raise BenchError("closed with %d bytes to go" % remaining)
                remaining -= got
            received = reader.remaining
            framing = "content-length"
        else:                                       # chunked: the generic (slower) reader
            reader.pause_after_head = False
            reader.feed(b"")
            while not reader.done:
                data = conn.sock.recv(262144)
                if not data:
                    reader.eof()
                    break
                reader.feed(data)
            received = reader.body_bytes
            framing = "chunked"
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    if received != size:
        raise BenchError("received %d of %d bytes" % (received, size))
    return {"mb_s": size / elapsed / 1e6, "seconds": elapsed, "framing": framing}


def bench_tiny_chunks(target: Target, s: dict) -> dict:
    """h. One GET answered with h_chunks 1-byte chunks: seconds from request to the last byte."""
    count = s["h_chunks"]
    conn = Connection(target, timeout=300)
    try:
        started = time.perf_counter()
        reader = conn.exchange(get_request("/bench/tiny?chunks=%d" % count))
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    _check_ok(reader)
    if reader.body_bytes != count:
        raise BenchError("received %d of %d bytes" % (reader.body_bytes, count))
    return {"seconds": elapsed}


def idle_rss(target: Target) -> float:
    """Idle memory, shared pages counted once (see footprint_mib)."""
    return footprint_mib(target.pids())


# ==================================================================================================
# The run: set up, warm up, the upstream alone first, then interleaved rounds
# ==================================================================================================

SCENARIOS = "abcdefhi"


def warm_up(target: Target, overlap: int = 32) -> None:
    """A few requests and one short stream, so caches and code paths are warm; then `overlap`
    streams at once, so nginx's and proxy.py's upstream pools (64 each) hold that many idle
    connections. Without it, scenario d's time to first byte would include the cost of opening
    upstream connections for nginx and proxy.py but not for direct, whose clients connect
    before the clock starts."""
    conn = Connection(target)
    try:
        for _ in range(100):
            _check_ok(conn.exchange(SMALL_REQUEST))
        clock = EventClock([])
        _check_ok(conn.exchange(stream_request(20, 1), clock.on_body))
        _check_ok(conn.exchange(get_request("/bench/blob?bytes=%d" % (4 * MiB))))
    finally:
        conn.close()
    problems: List[str] = []
    barrier = threading.Barrier(overlap)

    def one_stream():
        try:
            stream = Connection(target)
            try:
                barrier.wait(30)
                _check_ok(stream.exchange(stream_request(5, 20)))
            finally:
                stream.close()
        except (OSError, BenchError, threading.BrokenBarrierError) as exc:
            problems.append("%s: %s" % (type(exc).__name__, exc))

    threads = [threading.Thread(target=one_stream, daemon=True) for _ in range(overlap)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if problems:
        raise BenchError("warm-up of %s failed: %s" % (target.name, problems[0]))


def upstream_alone(direct: Target, s: dict, upstream_pid: int, procs: int) -> dict:
    """Measure the upstream by itself before anything else: its keep-alive req/s with the same
    clients as scenario c, with its own CPU use, and its throughput for scenario e."""
    say("upstream alone: req/s with %d clients, then %d MiB" % (s["c_clients"],
                                                                 s["e_bytes"] // MiB))
    rps = bench_rps(direct, s, upstream_pid, procs)
    throughput = bench_throughput(direct, s)
    return {"rps": rps["rps"], "upstream_cpu_pct": rps["server_cpu_pct"],
            "client_cpu_pct": rps["client_cpu_pct"], "mb_s": throughput["mb_s"]}


def run_scenario(letter: str, target: Target, s: dict, upstream_pid: int, procs: int) -> dict:
    if letter == "a":
        return bench_keepalive(target, s)
    if letter == "b":
        return bench_new_connection(target, s)
    if letter == "c":
        return bench_rps(target, s, upstream_pid, procs)
    if letter == "d":
        return bench_streams(target, s["d_streams"], s["d_events"], s["d_interval_ms"], 1)
    if letter == "e":
        return bench_throughput(target, s)
    if letter == "f":
        return bench_streams(target, s["f_streams"], s["f_events"], s["f_interval_ms"],
                             max(1, min(procs, 4)), sample_rss=True)
    if letter == "h":
        return bench_tiny_chunks(target, s)
    if letter == "i":
        return bench_streams(target, s["d_streams"], s["d_events"], s["d_interval_ms"], 1,
                             include_usage=False)
    raise ValueError(letter)


def busy_fraction(seconds: float = 1.0) -> Optional[float]:
    """Share of the machine's CPU time that was busy over `seconds` (/proc/stat), 0..1."""
    def sample():
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)    # idle + iowait
        return sum(fields), idle
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def machine_info() -> dict:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION, "kernel": platform.release()}


def run_benchmark(args, s: dict) -> dict:
    """Start everything, measure, stop everything. Returns the results document."""
    letters = [c for c in SCENARIOS if c in (args.only or SCENARIOS)]
    workdir = tempfile.mkdtemp(prefix="llm-proxy-bench-")
    children = Children(workdir)
    doc: Dict[str, Any] = {"machine": machine_info(), "settings": dict(s), "proxy": args.proxy,
                           "scenarios": letters, "notes": []}
    # Nothing of ours runs yet: whatever keeps the CPUs busy now will add noise to every figure.
    doc["busy_before"] = busy_fraction()
    if doc["busy_before"] is not None and doc["busy_before"] > 0.15:
        doc["notes"].append("the machine was %.0f%% busy with other work before the run: absolute "
                            "figures are noisy (the interleaved ratios less so)"
                            % (100 * doc["busy_before"]))
    # A copy in the work directory: its bytecode cache (see proxy_env) goes there, not beside
    # the file measured.
    proxy_path = os.path.join(workdir, "app", "proxy.py")
    os.makedirs(os.path.dirname(proxy_path))
    shutil.copy(args.proxy, proxy_path)
    try:
        upstream_proc, upstream_port = start_upstream(children)
        direct = Target("direct", upstream_port, None, lambda: [upstream_proc.pid], upstream_proc)
        say("certificates: proxy.ensure_certificates on a fresh directory (%d run%s)"
            % (s["cert_runs"], "s" if s["cert_runs"] > 1 else ""))
        certs = make_certificates(proxy_path, os.path.join(workdir, "certs"))
        cert_times = [certs]
        for run in range(1, s["cert_runs"]):
            cert_times.append(make_certificates(proxy_path, os.path.join(workdir, "certs%d" % run)))
        doc["certificates"] = {
            "ensure_certificates_s": median([c["ensure_certificates_s"] for c in cert_times]),
            "rsa_keygen_s": median([c.get("rsa_keygen_s") for c in cert_times]),
            "runs": len(cert_times), "verified_by_client": bool(certs["ca"])}
        if not certs["ca"]:
            doc["notes"].append("no ca.pem beside cert.pem: clients did not verify the certificate")
        context = client_context(certs["ca"])
        proxy = start_proxy(children, proxy_path, workdir, upstream_port, certs, context)
        if args.proxy_pid_file:
            with open(args.proxy_pid_file, "w") as handle:
                handle.write("%d\n" % proxy.proc.pid)
        # Interleaved, like the scenarios: as it starts now, and as it started before issue 16
        # (LLM_PROXY_NO_RERUN=1 keeps the script start: compiled, never re-run from its cache).
        startups: Dict[str, List[dict]] = {"now": [], "script": [], "module": []}
        for _round in range(2):
            startups["now"].append(measure_startup(children, proxy_path, workdir,
                                                   s["startup_runs"], context))
            startups["script"].append(measure_startup(
                children, proxy_path, workdir, s["startup_runs"], context,
                proxy_env(LLM_PROXY_NO_RERUN="1")))
            startups["module"].append(measure_startup(
                children, proxy_path, workdir, s["startup_runs"], context, as_module=True))
        doc["startup"] = {mode: {key: median([r[key] for r in rounds])
                                 for key in ("first_s", "start_to_answer_s", "rss_mib", "runs")}
                          for mode, rounds in startups.items()}
        targets = [direct]
        if args.no_nginx:
            doc["notes"].append("nginx skipped (--no-nginx)")
        elif shutil.which("nginx") or os.path.exists("/usr/sbin/nginx"):
            executable = shutil.which("nginx") or "/usr/sbin/nginx"
            nginx = start_nginx(children, workdir, upstream_port, certs, context,
                                args.nginx_workers)
            targets.append(nginx)
            doc["nginx"] = {"version": nginx_version(executable),
                            "worker_processes": args.nginx_workers}
        else:
            doc["notes"].append("nginx is not installed (apt-get install -y nginx): "
                                "no nginx column, no proxy/nginx ratios")
        targets.append(start_bare(children, upstream_port, certs, context))
        version = None if args.no_proxypy else proxypy_version()
        if version:
            targets.append(start_proxypy(children, workdir, upstream_port, certs, context))
            doc["proxy-py"] = {"version": version}
        else:
            doc["notes"].append("proxy-py left out (%s)" % (
                "--no-proxypy" if args.no_proxypy else "pip install proxy.py to add it"))
        targets.append(proxy)
        time.sleep(0.5)
        doc["idle_rss_start_mib"] = {t.name: idle_rss(t) for t in targets}
        for target in targets:
            warm_up(target)
        procs = args.client_procs
        if "c" in letters or "e" in letters:
            doc["upstream_alone"] = upstream_alone(direct, s, upstream_proc.pid, procs)
        results: Dict[str, Dict[str, List[dict]]] = {}
        for letter in letters:
            results[letter] = {t.name: [] for t in targets}
            for round_no in range(s["rounds"]):
                shift = round_no % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    say("%s round %d/%d: %s" % (letter, round_no + 1, s["rounds"], target.name))
                    try:
                        figures = run_scenario(letter, target, s, upstream_proc.pid, procs)
                    except (BenchError, OSError) as exc:
                        figures = {"error": "%s: %s" % (type(exc).__name__, exc)}
                        say("  failed: %s" % figures["error"])
                    for each in targets:
                        if not each.alive():
                            raise BenchError("%s exited during scenario %s:\n%s" % (
                                each.name, letter, children.log_tail(each.proc)))
                    results[letter][target.name].append(figures)
        time.sleep(1.0)
        doc["idle_rss_end_mib"] = {t.name: idle_rss(t) for t in targets}
        doc["results"] = results
        doc["targets_measured"] = [t.name for t in targets]
        proxy_log = children.log_tail(proxy.proc, 200000)
        doc["proxy_log"] = {"warnings": proxy_log.count(" WARNING "),
                            "errors": proxy_log.count(" ERROR "),
                            "tail": proxy_log[-1500:]}
    finally:
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return doc


# ==================================================================================================
# Report: medians, ratios, the issue's targets
# ==================================================================================================

# (scenario, key, label). "added" rows are computed: a target's figure minus direct's, per round.
ROWS = [
    ("a", "p50_ms", "a keep-alive POST p50 (ms)"),
    ("a", "p99_ms", "a keep-alive POST p99 (ms)"),
    ("b", "p50_ms", "b new connection p50 (ms)"),
    ("b", "p99_ms", "b new connection p99 (ms)"),
    ("c", "rps", "c req/s, 32 keep-alive clients"),
    ("c", "server_cpu_pct", "c   server CPU (% of a core)"),
    ("c", "upstream_cpu_pct", "c   upstream CPU (% of a core)"),
    ("c", "client_cpu_pct", "c   clients CPU (% of a core)"),
    ("c", "server_cpu_us_per_request", "c   server CPU per request (us)"),
    ("d", "event_p50_ms", "d SSE per-event latency p50 (ms)"),
    ("d", "event_p99_ms", "d SSE per-event latency p99 (ms)"),
    ("d", "added_p50_ms", "d   added over direct p50 (ms)"),
    ("d", "added_p99_ms", "d   added over direct p99 (ms)"),
    ("d", "ttfb_p50_ms", "d time to first byte p50 (ms)"),
    ("d", "ttfb_p99_ms", "d time to first byte p99 (ms)"),
    ("d", "complete", "d complete streams"),
    ("d", "server_cpu_pct", "d   server CPU (% of a core)"),
    ("d", "server_cpu_us_per_event", "d   server CPU per event (us)"),
    ("e", "mb_s", "e big response (MB/s)"),
    ("f", "failures", "f failed streams (of 200)"),
    ("f", "event_p50_ms", "f per-event latency p50 (ms)"),
    ("f", "event_p99_ms", "f per-event latency p99 (ms)"),
    ("f", "added_p99_ms", "f   added over direct p99 (ms)"),
    ("f", "server_cpu_pct", "f   server CPU (% of a core)"),
    ("f", "server_cpu_us_per_event", "f   server CPU per event (us)"),
    ("f", "peak_rss_mib", "f peak RSS, shared once (MiB)"),
    ("f", "peak_rss_sum_mib", "f   peak VmRSS summed (MiB)"),
    ("h", "seconds", "h 1-byte chunks, all received (s)"),
    ("i", "event_p50_ms", "i d without include_usage: p50 (ms)"),
    ("i", "event_p99_ms", "i   per-event latency p99 (ms)"),
    ("i", "server_cpu_us_per_event", "i   server CPU per event (us)"),
]

# (label, scenario, key, comparison of proxy/nginx, limit). The e target is ambiguous: read
# literally, proxy.py would need 1.5x nginx's MB/s; read as "no more than 1.5x slower", it needs
# 0.67x. Both are shown.
TARGETS = [
    ("d per-event added latency p50 <= 1.1x", "d", "added_p50_ms", "<=", 1.1),
    ("d per-event added latency p99 <= 1.5x", "d", "added_p99_ms", "<=", 1.5),
    ("d time to first byte p50 <= 1.3x", "d", "ttfb_p50_ms", "<=", 1.3),
    ("f 200 streams per-event p99 <= 2x", "f", "event_p99_ms", "<=", 2.0),
    ("a keep-alive small request p50 <= 2x", "a", "p50_ms", "<=", 2.0),
    ("b new-connection p50 <= 1.3x", "b", "p50_ms", "<=", 1.3),
    ("c requests/s at 32 clients >= 0.25x", "c", "rps", ">=", 0.25),
    ("e MB/s, literal: proxy >= 1.5x nginx", "e", "mb_s", ">=", 1.5),
    ("e MB/s, 'at most 1.5x slower': >= 0.67x", "e", "mb_s", ">=", 1 / 1.5),
    ("f peak RSS <= 1.2x nginx", "f", "peak_rss_mib", "<=", 1.2),
]
RSS_LIMIT_MIB = 50.0


def summarize(doc: dict) -> dict:
    """Medians over rounds, the computed rows, ratios and target verdicts, added to `doc`."""
    results = doc.get("results", {})
    names = doc.get("targets_measured", [])
    medians: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for letter, per_target in results.items():
        medians[letter] = {}
        for name, rounds in per_target.items():
            keys = sorted({k for r in rounds for k, v in r.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)})
            med = {k: median([r.get(k) for r in rounds]) for k in keys}
            errors = [r["error"] for r in rounds if "error" in r]
            if errors:
                med["error"] = errors[0]
            samples = [x for r in rounds for x in r.get("failure_samples", [])]
            if samples:
                med["failure_samples"] = sorted(set(samples))[:5]
            if rounds and "tls" in rounds[0]:
                med["tls"] = rounds[0]["tls"]
            medians[letter][name] = med
        # Added latency: per round, a target's percentile minus direct's in the same round.
        direct_rounds = per_target.get("direct", [])
        for name, rounds in per_target.items():
            if name == "direct":
                continue
            for key in ("event_p50_ms", "event_p99_ms"):
                added = [r.get(key) - d.get(key) for r, d in zip(rounds, direct_rounds)
                         if r.get(key) is not None and d.get(key) is not None]
                medians[letter][name][key.replace("event", "added")] = median(added)
    doc["medians"] = medians

    def value(letter, name, key):
        return medians.get(letter, {}).get(name, {}).get(key)

    def ratio(a, b):
        if a is None or b is None or b <= 0:
            return None
        return a / b

    table = []
    for letter, key, label in ROWS:
        if letter not in medians:
            continue
        row = {"scenario": letter, "key": key, "label": label,
               "values": {n: value(letter, n, key) for n in names}}
        row["proxy/nginx"] = ratio(row["values"].get("proxy"), row["values"].get("nginx"))
        row["nginx/direct"] = ratio(row["values"].get("nginx"), row["values"].get("direct"))
        row["proxy/direct"] = ratio(row["values"].get("proxy"), row["values"].get("direct"))
        row["proxy/bare"] = ratio(row["values"].get("proxy"), row["values"].get("bare"))
        if key == "complete":
            streams = doc["settings"]["d_streams"]
            row["values"] = {n: None if v is None else "%d/%d" % (v, streams)
                             for n, v in row["values"].items()}
            row["proxy/nginx"] = row["nginx/direct"] = row["proxy/direct"] = None
            row["proxy/bare"] = None
        table.append(row)
    doc["table"] = table

    verdicts = []
    for label, letter, key, op, limit in TARGETS:
        if letter not in medians:
            continue
        measured = ratio(value(letter, "proxy", key), value(letter, "nginx", key))
        if measured is None and key.startswith("added_"):
            # nginx's figure minus direct's came out at or below zero (direct had the worse
            # tail in this run: noise); judge on the plain per-event latency instead.
            key = key.replace("added_", "event_")
            measured = ratio(value(letter, "proxy", key), value(letter, "nginx", key))
            label += " [judged on plain latency: added undefined]"
        met = None if measured is None else (measured <= limit if op == "<=" else measured >= limit)
        verdicts.append({"target": label, "proxy/nginx": measured, "limit": limit, "op": op,
                         "met": met})
    if "f" in medians:
        peak = value("f", "proxy", "peak_rss_mib")
        verdicts.append({"target": "f peak RSS < 50 MiB (absolute, MiB)", "proxy/nginx": None,
                         "measured": peak, "limit": RSS_LIMIT_MIB, "op": "<",
                         "met": None if peak is None else peak < RSS_LIMIT_MIB})
    doc["verdicts"] = verdicts
    doc["issue16"] = issue16_table(doc, value)

    notes = doc["notes"]
    notes.append("memory counts shared pages once (private pages of each process + the shared "
                 "pages of the largest, from smaps_rollup): equal to VmRSS for proxy.py, while "
                 "nginx's master + worker VmRSS sum would count its binary and libssl twice")
    alone = doc.get("upstream_alone")
    if alone and "c" in medians:
        proxy_rps = value("c", "proxy", "rps")
        nginx_rps = value("c", "nginx", "rps")
        if proxy_rps:
            notes.append("upstream alone: %.0f req/s at %.0f%% of a core (%.1fx proxy.py's req/s), "
                         "%.0f MB/s: not the bottleneck for proxy.py"
                         % (alone["rps"], alone["upstream_cpu_pct"], alone["rps"] / proxy_rps,
                            alone["mb_s"]))
        if nginx_rps and nginx_rps > 0.6 * alone["rps"]:
            notes.append("nginx reached %.0f%% of the client+upstream ceiling in c: its req/s is "
                         "bounded by the Python client/upstream on this machine, so proxy/nginx "
                         "for c overstates proxy.py" % (100 * nginx_rps / alone["rps"]))
    return doc


# Issue 16's table: (label, scenario, key, higher is better). Scenario "g" is the idle RSS.
ISSUE16_ROWS = [
    ("keep-alive small POST p50", "a", "p50_ms", False),
    ("new TLS connection + POST p50", "b", "p50_ms", False),
    ("requests/s at 32 clients (higher better)", "c", "rps", True),
    ("20 SSE streams: per-event p50", "d", "event_p50_ms", False),
    ("20 SSE streams: per-event p99", "d", "event_p99_ms", False),
    ("20 SSE streams: time to first byte p50", "d", "ttfb_p50_ms", False),
    ("big body MB/s (higher better)", "e", "mb_s", True),
    ("200 streams: per-event p99", "f", "event_p99_ms", False),
    ("idle RSS (MiB, absolute)", "g", "idle", False),
    ("peak RSS with 200 streams (MiB, absolute)", "f", "peak_rss_mib", False),
]
# Issue 16's targets, on proxy.py / bare from the same run: (row label, op, limit).
ISSUE16_TARGETS = {
    "keep-alive small POST p50": ("<=", 1.0),
    "new TLS connection + POST p50": ("<=", 1.0),
    "requests/s at 32 clients (higher better)": (">=", 1.0),
    "20 SSE streams: per-event p50": ("<=", 1.05),
    "20 SSE streams: per-event p99": ("<=", 1.05),
    "20 SSE streams: time to first byte p50": ("<=", 1.05),
    "big body MB/s (higher better)": (">=", 1.0),
    "200 streams: per-event p99": ("<=", 1.5),
    "peak RSS with 200 streams (MiB, absolute)": ("<=", 1.25),
}
PEERS = ("bare", "proxy", "proxy-py")


def issue16_table(doc: dict, value) -> List[dict]:
    """Issue 16's rows: each peer's figure, its ratio to nginx and to the bare shape, and the
    verdict of the issue's target for proxy.py (all from the same interleaved run)."""
    rows = []
    for label, letter, key, _higher in ISSUE16_ROWS:
        if letter == "g":
            figures = {n: doc.get("idle_rss_start_mib", {}).get(n) for n in ("nginx",) + PEERS}
        elif letter in doc.get("medians", {}):
            figures = {n: value(letter, n, key) for n in ("nginx",) + PEERS}
        else:
            continue
        row = {"label": label, "values": figures,
               "x_nginx": {n: _safe_ratio(figures.get(n), figures.get("nginx")) for n in PEERS},
               "x_bare": {n: _safe_ratio(figures.get(n), figures.get("bare")) for n in PEERS}}
        measured = row["x_bare"].get("proxy")
        if label in ISSUE16_TARGETS:
            op, limit = ISSUE16_TARGETS[label]
        elif letter == "g":
            # idle RSS <= bare + 6 MiB, an absolute margin
            op, limit = "<=", 6.0
            measured = (None if figures.get("proxy") is None or figures.get("bare") is None
                        else figures["proxy"] - figures["bare"])
        row["target"] = "%s %s%s" % (op, limit, " MiB over bare" if letter == "g" else "x bare")
        row["met"] = None if measured is None else (
            measured <= limit if op == "<=" else measured >= limit)
        if label == "200 streams: per-event p99" and row["met"] is not None:
            peer = figures.get("proxy-py")
            if peer is not None:
                row["met"] = row["met"] and figures["proxy"] < peer
                row["target"] += ", < proxy-py"
        rows.append(row)
    return rows


def render_issue16(rows: List[dict]) -> List[str]:
    """Issue 16's table: x nginx for each peer, x bare for proxy.py and proxy-py, the verdict."""
    out = ["issue 16 table (ratios to nginx and to the bare shape, same run; RSS rows in MiB)"]
    head = "%-42s%9s%9s%9s%9s%10s%9s%9s  %s" % (
        "metric", "nginx", "bare", "proxy.py", "proxy-py", "ours/bare", "ppy/bare", "ours",
        "target")
    out.append(head)
    out.append("-" * len(head))
    for row in rows:
        v, xn, xb = row["values"], row["x_nginx"], row["x_bare"]
        absolute = "MiB" in row["label"]
        cells = [_fmt(v.get("nginx"))] if absolute else ["1.00x" if v.get("nginx") else "-"]
        for name in PEERS:
            cells.append(_fmt(v.get(name)) if absolute else _fmt_ratio(xn.get(name)))
        cells += [_fmt_ratio(xb.get("proxy")), _fmt_ratio(xb.get("proxy-py"))]
        verdict = "n/a" if row["met"] is None else ("met" if row["met"] else "MISSED")
        out.append("%-42s%9s%9s%9s%9s%10s%9s%9s  %s" % ((row["label"],) + tuple(cells)
                                                       + (verdict, row["target"])))
    return out


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    magnitude = abs(value)
    if magnitude >= 1000:
        return "{:,.0f}".format(value)
    if magnitude >= 100:
        return "%.1f" % value
    if magnitude >= 1:
        return "%.2f" % value
    return "%.3f" % value


def _fmt_ratio(value) -> str:
    return "-" if value is None else "%.2fx" % value


def render_table(doc: dict) -> str:
    """The human report: machine, the figures table, the targets, notes."""
    m = doc["machine"]
    names = doc.get("targets_measured", [])
    s = doc["settings"]
    out = []
    nginx = doc.get("nginx", {})
    out.append("machine: %s CPUs (nproc), %s; Python %s; %s; nginx %s (worker_processes %s)" % (
        m["nproc"], m["cpu"], m["python"], m["openssl"], nginx.get("version", "-"),
        nginx.get("worker_processes", "-")))
    out.append("proxy: %s; %d round(s), interleaved; medians over rounds" % (
        doc["proxy"], s["rounds"]))
    out.append("")
    head = "%-36s" % "figure" + "".join("%10s" % n for n in names) + \
        "%13s%12s%12s" % ("nginx/direct", "proxy/nginx", "proxy/bare")
    out.append(head)
    out.append("-" * len(head))
    for row in doc.get("table", []):
        out.append("%-36s" % row["label"]
                   + "".join("%10s" % _fmt(row["values"].get(n)) for n in names)
                   + "%13s%12s%12s" % (_fmt_ratio(row["nginx/direct"]),
                                      _fmt_ratio(row["proxy/nginx"]),
                                      _fmt_ratio(row.get("proxy/bare"))))
    g = []
    for key, label in (("idle_rss_start_mib", "g idle RSS at start (MiB)"),
                       ("idle_rss_end_mib", "g idle RSS at end (MiB)")):
        if key in doc:
            values = doc[key]
            g.append("%-36s" % label + "".join("%10s" % _fmt(values.get(n)) for n in names)
                     + "%13s%12s%12s" % (
                         _fmt_ratio(_safe_ratio(values.get("nginx"), values.get("direct"))),
                         _fmt_ratio(_safe_ratio(values.get("proxy"), values.get("nginx"))),
                         _fmt_ratio(_safe_ratio(values.get("proxy"), values.get("bare")))))
    out.extend(g)
    certs = doc.get("certificates")
    if certs:
        out.append("g certificate generation: ensure_certificates %.2f s%s (median of %d, fresh "
                   "directory, fresh interpreter)" % (
                       certs["ensure_certificates_s"],
                       "; generate_rsa_key %.2f s" % certs["rsa_keygen_s"]
                       if certs.get("rsa_keygen_s") is not None else "", certs["runs"]))
    startup = doc.get("startup")
    if startup:
        for mode, label in (("now", "re-run from its cache"),
                             ("script", "LLM_PROXY_NO_RERUN=1, as before"),
                             ("module", "as python3 -m proxy")):
            if mode not in startup:
                continue
            figures = startup[mode]
            out.append("g proxy.py start to first answer, %s: %.3f s, VmRSS then %s MiB "
                       "(medians of 2x%d restarts, interleaved)" % (
                           label, figures["start_to_answer_s"], _fmt(figures["rss_mib"]),
                           figures["runs"]))
    if doc.get("issue16"):
        out.append("")
        out.extend(render_issue16(doc["issue16"]))
    out.append("")
    out.append("%-46s%13s%10s   %s" % ("target (proxy.py / nginx)", "measured", "limit", "verdict"))
    for v in doc.get("verdicts", []):
        measured = _fmt(v["measured"]) if "measured" in v else _fmt_ratio(v["proxy/nginx"])
        verdict = "n/a" if v["met"] is None else ("MET" if v["met"] else "NOT MET")
        out.append("%-46s%13s%10s   %s" % (v["target"], measured,
                                            "%s %.2f" % (v["op"], v["limit"]), verdict))
    details = []
    for letter, per_target in doc.get("medians", {}).items():
        for name, med in per_target.items():
            if "error" in med:
                details.append("%s/%s: %s" % (letter, name, med["error"].splitlines()[0][:200]))
            if med.get("failure_samples"):
                details.append("%s/%s failures: %s"
                               % (letter, name, "; ".join(med["failure_samples"])))
            if med.get("tls") and letter == "b":
                details.append("b/%s negotiated %s" % (name, med["tls"]))
    if doc.get("proxy_log"):
        details.append("proxy.py log: %d warning(s), %d error(s)" % (
            doc["proxy_log"]["warnings"], doc["proxy_log"]["errors"]))
    out.append("")
    for note in doc.get("notes", []) + details:
        out.append("note: " + note)
    return "\n".join(out)


def _safe_ratio(a, b):
    return None if a is None or b is None or b <= 0 else a / b


# ==================================================================================================
# Soak (issue 8): mixed traffic through proxy.py, then its stats checked against the backend
# ==================================================================================================

SOAK_MODELS = ("llama3.1:8b", "qwen2.5:14b", "gpt-4o-mini", "claude-3-5-haiku-latest")
# (action, weight): streaming dominates, as it does for chat apps.
SOAK_MIX = (("openai_stream_usage", 15), ("openai_stream", 15), ("openai", 15),
            ("anthropic_stream", 15), ("anthropic", 10), ("ollama_chat_stream", 10),
            ("ollama_chat", 5), ("ollama_generate_stream", 10), ("models", 5))


def _soak_action(conn: Connection, rng: random.Random, action: str) -> Optional[str]:
    """Send one request of kind `action` and check the whole answer; returns a problem or None."""
    n = rng.randint(3, 40)
    interval = rng.randint(0, 8)
    prompt = "word " * rng.randint(2, 80)
    model = rng.choice(SOAK_MODELS)
    body = bytearray()
    if action == "models":
        reader = conn.exchange(get_request(rng.choice(("/v1/models", "/api/tags"))), body.extend)
        return None if reader.status == 200 and json.loads(bytes(body)) else "bad model list"
    if action.startswith("openai"):
        stream = action != "openai"
        payload = {"model": model, "messages": [{"role": "user", "content": prompt}],
                   "max_tokens": n, "stream": stream}
        if action == "openai_stream_usage":
            payload["stream_options"] = {"include_usage": True}
        request = post_request("/v1/chat/completions?interval_ms=%d" % interval,
                               _json_body(payload))
    elif action.startswith("anthropic"):
        payload = {"model": model, "max_tokens": n, "stream": action == "anthropic_stream",
                   "messages": [{"role": "user", "content": prompt}]}
        request = post_request("/v1/messages?interval_ms=%d" % interval, _json_body(payload),
                               "x-api-key: sk-ant-bench\r\nanthropic-version: 2023-06-01\r\n")
    else:
        chat = action.startswith("ollama_chat")
        payload = {"model": model, "options": {"num_predict": n}}
        if chat:
            payload["messages"] = [{"role": "user", "content": prompt}]
        else:
            payload["prompt"] = prompt
        if not action.endswith("_stream"):
            payload["stream"] = False
        path = "/api/%s?interval_ms=%d" % ("chat" if chat else "generate", interval)
        request = post_request(path, _json_body(payload))
    reader = conn.exchange(request, body.extend)
    if reader.status != 200:
        return "%s: HTTP %d" % (action, reader.status)
    data = bytes(body)
    try:
        if action == "openai":
            usage = json.loads(data)["usage"]
            return None if usage["completion_tokens"] == n else "openai: wrong usage"
        if action.startswith("openai_stream"):
            events = [e[6:] for e in data.split(b"\n\n") if e.startswith(b"data: ")]
            if not events or events[-1] != b"[DONE]":
                return "%s: no [DONE]" % action
            chunks = [json.loads(e) for e in events[:-1]]
            tokens = sum(1 for c in chunks if c.get("choices")
                         and c["choices"][0].get("delta", {}).get("content"))
            usages = [c for c in chunks if c.get("usage")]
            wanted = 1 if action == "openai_stream_usage" else 0
            if tokens != n or len(usages) != wanted:
                return "%s: %d/%d tokens, %d usage chunk(s)" % (action, tokens, n, len(usages))
            return None
        if action == "anthropic":
            usage = json.loads(data)["usage"]
            return None if usage["output_tokens"] == n else "anthropic: wrong usage"
        if action == "anthropic_stream":
            types = [json.loads(line[6:])["type"] for line in data.split(b"\n")
                     if line.startswith(b"data: ")]
            if types.count("content_block_delta") != n or types[-1:] != ["message_stop"]:
                return "anthropic_stream: %d/%d deltas" % (types.count("content_block_delta"), n)
            return None
        lines = [json.loads(line) for line in data.split(b"\n") if line.strip()]
        if not lines or not lines[-1].get("done") or lines[-1].get("eval_count") != n:
            return "%s: no final done line" % action
        if action.endswith("_stream") and len(lines) != n + 1:
            return "%s: %d/%d lines" % (action, len(lines) - 1, n)
        return None
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return "%s: unparsable answer (%s)" % (action, exc)


def _soak_client(target: Target, rng: random.Random, deadline: float, tally: dict) -> None:
    """One soak client: keep-alive requests until the deadline, a new connection now and then."""
    actions = [a for a, _ in SOAK_MIX]
    weights = [w for _, w in SOAK_MIX]
    conn = None
    while time.monotonic() < deadline:
        action = rng.choices(actions, weights)[0]
        try:
            if conn is None or rng.random() < 0.05:
                if conn is not None:
                    conn.close()
                conn = Connection(target)
            tally["requests"] += 1
            tally["by_action"][action] = tally["by_action"].get(action, 0) + 1
            problem = _soak_action(conn, rng, action)
        except (OSError, BenchError) as exc:
            problem = "%s: %s: %s" % (action, type(exc).__name__, exc)
            if conn is not None:
                conn.close()
            conn = None
        if problem:
            tally["errors"] += 1
            if len(tally["samples"]) < 10:
                tally["samples"].append(problem)
    if conn is not None:
        conn.close()


def _soak_worker(target, threads, duration, seed, ready, go):
    """A soak client process: `threads` blocking clients (correctness, not timing, matters here)."""
    ready.set()
    go.wait(60)
    deadline = time.monotonic() + duration
    tallies = [{"requests": 0, "errors": 0, "samples": [], "by_action": {}} for _ in range(threads)]
    workers = [threading.Thread(target=_soak_client, daemon=True,
                                args=(target, random.Random(seed * 1000 + i), deadline, tallies[i]))
               for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(duration + 120)
    merged = {"requests": 0, "errors": 0, "samples": [], "by_action": {}}
    for tally in tallies:
        merged["requests"] += tally["requests"]
        merged["errors"] += tally["errors"]
        merged["samples"].extend(tally["samples"])
        for action, count in tally["by_action"].items():
            merged["by_action"][action] = merged["by_action"].get(action, 0) + count
    return merged


def _get_json(target: Target, path: str, method: str = "GET") -> dict:
    conn = Connection(target, timeout=10)
    body = bytearray()
    try:
        request = get_request(path) if method == "GET" else \
            ("POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n" % path).encode()
        reader = conn.exchange(request, body.extend)
    finally:
        conn.close()
    if reader.status != 200:
        raise BenchError("%s %s: HTTP %d" % (method, path, reader.status))
    return json.loads(bytes(body))


def run_soak(args, seconds: float) -> dict:
    """Soak proxy.py with 50 concurrent clients for `seconds`; returns the report document."""
    workdir = tempfile.mkdtemp(prefix="llm-proxy-soak-")
    children = Children(workdir)
    clients, procs = 50, max(1, args.client_procs)
    doc: Dict[str, Any] = {"machine": machine_info(), "proxy": args.proxy, "seconds": seconds,
                           "clients": clients}
    try:
        upstream_proc, upstream_port = start_upstream(children)
        direct = Target("direct", upstream_port, None, lambda: [upstream_proc.pid], upstream_proc)
        certs = make_certificates(args.proxy, os.path.join(workdir, "certs"))
        proxy = start_proxy(children, args.proxy, workdir, upstream_port, certs,
                            client_context(certs["ca"]))
        if args.proxy_pid_file:
            with open(args.proxy_pid_file, "w") as handle:
                handle.write("%d\n" % proxy.proc.pid)
        warm_up(proxy)
        _get_json(proxy, "/_proxy/reset", "POST")
        _get_json(direct, "/_upstream/reset", "POST")
        pid = proxy.proc.pid
        doc["rss_start_mib"] = rss_mib([pid])
        doc["threads_start"] = proc_status_kib(pid, "Threads")
        # A leak climbs steadily; allocator growth levels off: the timeline tells them apart.
        sampler = RssSampler([pid], interval=0.25, every=max(1.0, seconds / 12))
        split = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        say("soak: %d clients in %d processes for %.0f s" % (clients, procs, seconds))
        started = time.monotonic()
        results = run_client_processes(
            _soak_worker, [(proxy, n, seconds, args.seed + i) for i, n in enumerate(split) if n],
            timeout=seconds + 180, on_go=sampler.start)
        doc["elapsed_s"] = time.monotonic() - started
        doc["rss_peak_mib"] = sampler.stop()
        doc["rss_timeline"] = sampler.timeline
        requests = sum(r["requests"] for r in results)
        by_action: Dict[str, int] = {}
        for r in results:
            for action, count in r["by_action"].items():
                by_action[action] = by_action.get(action, 0) + count
        doc["client"] = {
            "requests": requests, "errors": sum(r["errors"] for r in results),
            "error_samples": [x for r in results for x in r["samples"]][:10],
            "by_action": by_action}
        # The proxy records a request after its last byte went out: let the last ones land.
        deadline = time.monotonic() + 10
        stats = _get_json(proxy, "/_proxy/stats")
        while (stats["requests"] < requests or stats["inFlight"]) and time.monotonic() < deadline:
            time.sleep(0.1)
            stats = _get_json(proxy, "/_proxy/stats")
        emitted = _get_json(direct, "/_upstream/emitted")
        time.sleep(1.0)
        doc["rss_end_mib"] = rss_mib([pid])
        doc["threads_end"] = proc_status_kib(pid, "Threads")
        checks = [("requests", requests, emitted["requests"], stats["requests"]),
                  ("errors", 0, 0, stats["errors"])]
        for field in EMITTED_FIELDS:
            checks.append(("tokens." + field, None, emitted[field], stats["tokens"].get(field)))
        doc["checks"] = [{"figure": name, "clients": c, "backend": b, "proxy_stats": p,
                          "match": p == b and (c is None or c == b)}
                         for name, c, b, p in checks]
        doc["usage_reports"] = stats.get("usageReports")
        doc["ok"] = doc["client"]["errors"] == 0 and all(c["match"] for c in doc["checks"])
        proxy_log = children.log_tail(proxy.proc, 200000)
        doc["proxy_log"] = {"warnings": proxy_log.count(" WARNING "),
                            "errors": proxy_log.count(" ERROR "), "tail": proxy_log[-1500:]}
    finally:
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return doc


def render_soak(doc: dict) -> str:
    m = doc["machine"]
    c = doc["client"]
    out = ["machine: %s CPUs, %s; Python %s" % (m["nproc"], m["cpu"], m["python"]),
           "soak of %s: %d clients for %.0f s: %d requests (%.0f/s), %d client-side errors" % (
               doc["proxy"], doc["clients"], doc["seconds"], c["requests"],
               c["requests"] / doc["elapsed_s"], c["errors"]),
           "mix: " + ", ".join("%s %d" % kv for kv in sorted(c["by_action"].items())),
           "proxy RSS: start %.1f MiB, peak %.1f MiB, end %.1f MiB; threads %d -> %d" % (
               doc["rss_start_mib"], doc["rss_peak_mib"], doc["rss_end_mib"],
               doc["threads_start"], doc["threads_end"]),
           "proxy RSS over time (s: MiB): " + ", ".join("%g: %.1f" % point
                                                         for point in doc.get("rss_timeline", [])),
           "",
           "%-20s%12s%16s%14s   %s" % ("figure", "clients", "backend sent", "proxy stats", "")]
    for check in doc["checks"]:
        out.append("%-20s%12s%16s%14s   %s" % (
            check["figure"], "-" if check["clients"] is None else check["clients"],
            check["backend"], check["proxy_stats"], "ok" if check["match"] else "MISMATCH"))
    out.append("usage reports: %s" % json.dumps(doc.get("usage_reports")))
    for sample in c["error_samples"]:
        out.append("client error: " + sample)
    out.append("proxy.py log: %d warning(s), %d error(s)" % (doc["proxy_log"]["warnings"],
                                                           doc["proxy_log"]["errors"]))
    out.append("RESULT: %s" % ("PASS" if doc["ok"] else "FAIL"))
    return "\n".join(out)


# ==================================================================================================
# Command line
# ==================================================================================================

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark proxy.py against nginx and a direct connection (loopback only).")
    parser.add_argument("--quick", action="store_true", help="a ~20 s smoke run (1 round)")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout (progress stays on stderr)")
    parser.add_argument("--soak", nargs="?", const=60.0, type=float, metavar="SECONDS",
                        help="soak proxy.py alone for SECONDS (default 60) and check its stats")
    parser.add_argument("--proxy", default=DEFAULT_PROXY, metavar="PATH",
                        help="the proxy.py to measure (default: the one beside tests/)")
    parser.add_argument("--only", metavar="LETTERS",
                        help="only these scenarios, e.g. a,d (idle RSS and certificates always)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, --quick 1)")
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out")
    parser.add_argument("--no-proxypy", action="store_true",
                        help="leave proxy-py (pip install proxy.py) out")
    parser.add_argument("--nginx-workers", default="1", metavar="N",
                        help="nginx worker_processes (default 1; see NGINX_CONF for why)")
    parser.add_argument("--client-procs", type=int, default=2, metavar="N",
                        help="client processes for the concurrent scenarios (default 2)")
    parser.add_argument("--seed", type=int, default=7, help="random seed of the soak clients")
    parser.add_argument("--proxy-pid-file", metavar="PATH",
                        help="write proxy.py's pid here once it serves (to attach a profiler)")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per event and per request under valgrind's "
                             "callgrind instead of timing (repeatable on a busy machine)")
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser


# ==================================================================================================
# Instructions (--instructions): what each design costs, counted, not timed
# ==================================================================================================

def _callgrind_total(children: Children, proc, action) -> int:
    """Instructions `proc` (started under callgrind, instrumentation off) executes during
    action(): instrumentation on, counters zeroed, action, dump; the dump's total."""
    pid = str(proc.pid)
    for command in (["-i", "on"], ["-z"]):
        subprocess.run(["callgrind_control"] + command + [pid], capture_output=True, timeout=60)
    action()
    pattern = os.path.join(children.workdir, "callgrind-%s.out.*" % pid)
    before = set(glob.glob(pattern))
    subprocess.run(["callgrind_control", "-d", pid], capture_output=True, timeout=60)
    for path in set(glob.glob(pattern)) - before:
        with open(path) as handle:
            for line in handle:
                if line.startswith("totals:"):
                    return int(line.split()[1])
    raise BenchError("callgrind wrote no dump for pid %s" % pid)


def run_instructions(args) -> dict:
    """proxy.py and the bare shape under valgrind's callgrind, one at a time: instructions per
    streamed event (one stream at a time, 10 ms apart, with and without include_usage; the
    marginal cost between a 250-event and a 50-event stream) and per keep-alive POST.

    Instruction counts repeat to a few parts in a thousand whatever else the machine does, where
    timings on a shared 2-core VM vary by tens of percent: this is how issue 16's changes were
    compared. Kernel work (syscalls, TCP) is not counted; both designs make the same calls."""
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise BenchError("--instructions needs valgrind (apt-get install valgrind)")
    workdir = tempfile.mkdtemp(prefix="llm-proxy-instr-")
    children = Children(workdir)
    original_spawn = children.spawn

    def spawn_under_callgrind(name, argv, **kwargs):
        if name in ("proxy", "bare"):
            argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                    "--callgrind-out-file=" + os.path.join(workdir, "callgrind-%p.out")] + argv
            kwargs["env"] = dict(kwargs.get("env") or os.environ, LLM_PROXY_NO_RERUN="1")
        return original_spawn(name, argv, **kwargs)

    children.spawn = spawn_under_callgrind
    global START_TIMEOUT
    START_TIMEOUT = 300.0                        # compiling proxy.py under valgrind is slow
    rows = {}
    try:
        _, upstream_port = start_upstream(children)
        certs = make_certificates(args.proxy, os.path.join(workdir, "certs"))
        context = client_context(certs["ca"])
        for name in ("bare", "proxy"):
            say("instructions: starting %s under callgrind" % name)
            if name == "bare":
                target = start_bare(children, upstream_port, certs, context)
            else:
                directory = os.path.join(workdir, "proxy")
                os.makedirs(directory)
                target = start_proxy(children, args.proxy, directory, upstream_port, certs,
                                     context)
            row = {}
            for usage in (True, False):
                bench_streams(target, 1, 20, 1, 1, include_usage=usage)      # warm
                counts = [_callgrind_total(children, target.proc, lambda n=n: bench_streams(
                    target, 1, n, 10, 1, include_usage=usage)) for n in (50, 250)]
                row["event_include_usage" if usage else "event_injected"] = \
                    (counts[1] - counts[0]) / 200.0
            conn = Connection(target, timeout=60)
            conn.exchange(SMALL_REQUEST)
            row["keepalive_post"] = _callgrind_total(
                children, target.proc, lambda: [conn.exchange(SMALL_REQUEST) for _ in range(50)]) / 50.0
            conn.close()
            rows[name] = row
            children.stop(target.proc)
    finally:
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def render_instructions(rows: dict) -> str:
    lines = ["instructions (callgrind, user space)          bare  proxy.py   ratio",
             "-" * 70]
    for key, label in (("event_include_usage", "per SSE event, client asks include_usage"),
                       ("event_injected", "per SSE event, proxy injects and strips"),
                       ("keepalive_post", "per keep-alive POST (non-streamed)")):
        bare, ours = rows["bare"][key], rows["proxy"][key]
        lines.append("%-42s %8.1fk %8.1fk %6.2fx" % (label, bare / 1e3, ours / 1e3, ours / bare))
    return "\n".join(lines)


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt()


def main(argv=None) -> int:
    """Run the benchmark or the soak; returns the exit code (soak: 1 if the check failed)."""
    args = build_parser().parse_args(argv)
    if args.serve_upstream:
        return serve_upstream(args.workdir)
    args.proxy = os.path.abspath(args.proxy)
    if not os.path.isfile(args.proxy):
        print("error: --proxy %s: no such file" % args.proxy, file=sys.stderr)
        return 2
    if args.only:
        letters = args.only.replace(",", "").lower()
        bad = sorted(set(letters) - set(SCENARIOS + "g"))
        if bad:
            print("error: --only: unknown scenario %s (choose from a-h)" % ",".join(bad),
                  file=sys.stderr)
            return 2
        args.only = letters
    if args.client_procs < 1 or args.client_procs > 16:
        print("error: --client-procs must be 1 to 16", file=sys.stderr)
        return 2
    if args.soak is not None and not 1 <= args.soak <= 3600:
        print("error: --soak takes 1 to 3600 seconds", file=sys.stderr)
        return 2
    settings = dict(QUICK if args.quick else FULL)
    if args.rounds is not None:
        if not 1 <= args.rounds <= 20:
            print("error: --rounds must be 1 to 20", file=sys.stderr)
            return 2
        settings["rounds"] = args.rounds
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    started = time.monotonic()
    try:
        if args.instructions:
            rows = run_instructions(args)
            print(json.dumps(rows, indent=2) if args.json else render_instructions(rows))
            return 0
        if args.soak is not None:
            doc = run_soak(args, args.soak)
            print(json.dumps(doc, indent=2) if args.json else render_soak(doc))
            return 0 if doc["ok"] else 1
        doc = summarize(run_benchmark(args, settings))
        doc["elapsed_s"] = time.monotonic() - started
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            print(render_table(doc))
            print("(took %.0f s)" % doc["elapsed_s"])
        return 0
    except BenchError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; child processes stopped", file=sys.stderr)
        return 130
    finally:
        for proc in list(_LIVE_WORKERS):
            if proc.is_alive():
                proc.terminate()


if __name__ == "__main__":
    sys.exit(main())
