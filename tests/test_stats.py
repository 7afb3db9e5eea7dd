"""The stats store: exact counters, capped breakdowns, buckets, persistence, metrics text."""

from support import proxy

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import unittest
from unittest import mock

# Day-aligned (hence hour-aligned) fake epoch: 2026-09-02T00:00:00Z.
BASE = 86400 * 20698
HOUR = 3600
DAY = 86400


class FakeClock(object):
    """A settable clock for StatsStore(clock=...)."""

    def __init__(self, now):
        self.now = float(now)

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def usage(prompt=0, completion=0, total=None, cacheRead=0, cacheWrite=0, reasoning=0):
    return {"prompt": prompt, "completion": completion,
            "total": prompt + completion if total is None else total,
            "cacheRead": cacheRead, "cacheWrite": cacheWrite, "reasoning": reasoning}


def rec(**kw):
    r = {"time": BASE + 10, "method": "POST", "path": "/v1/chat/completions",
         "client": "192.168.1.20", "status": 200, "completion": True, "model": "qwen3:8b",
         "usage": usage(10, 20), "usage_source": "reported", "error": False,
         "ttfb_ms": 100.0, "duration_ms": 1100.0, "bytes": 1000}
    r.update(kw)
    return proxy.RequestRecord(**r)


def mixed_records():
    """Seven records covering every counting rule (expected values in TestRecording)."""
    t = BASE + 5 * HOUR
    return [
        # a: streamed chat, 50 completion tokens over 1.0 s of generation
        rec(time=t + 1, model="A", usage=usage(100, 50, 150, cacheRead=10, cacheWrite=5, reasoning=7),
            ttfb_ms=100.0, duration_ms=1100.0, client="10.0.0.1", bytes=500),
        # b: injected usage, 150 tokens over 3.0 s
        rec(time=t + 2, model="A", usage=usage(200, 150, 350), usage_source="injected",
            ttfb_ms=300.0, duration_ms=3300.0, client="10.0.0.1", bytes=700),
        # c: messages with zero completion tokens: no tokens/s
        rec(time=t + 3, path="/v1/messages", model="B", usage=usage(10, 0, 10),
            ttfb_ms=50.0, duration_ms=60.0, client="10.0.0.2", bytes=100),
        # d: backend 500 on a completion endpoint: error, not a completion
        rec(time=t + 4, path="/v1/messages", model="B", usage=None, usage_source="missing",
            status=500, error=True, ttfb_ms=20.0, duration_ms=25.0, client="10.0.0.2", bytes=50),
        # e: model listing: not a completion, no model, no usage, not a usage endpoint
        rec(time=t + 5, method="GET", path="/api/tags", completion=False, model=None, usage=None,
            usage_source=None, ttfb_ms=5.0, duration_ms=6.0, client="10.0.0.3", bytes=300),
        # f: stream aborted midway after a 200: error AND (2xx completion); usage without model
        rec(time=t + 6, model=None, usage=usage(5, 0, 5), usage_source="missing", error=True,
            ttfb_ms=40.0, duration_ms=45.0, client="10.0.0.3", bytes=10),
        # g: proxy-made 502, no ttfb
        rec(time=t + 7, model="A", usage=None, usage_source="missing", status=502, error=True,
            ttfb_ms=None, duration_ms=30000.0, client="10.0.0.1", bytes=80),
    ]


class TempDirMixin(object):
    def make_tmp(self):
        d = tempfile.mkdtemp(prefix="stats-test-")
        self.addCleanup(shutil.rmtree, d, True)
        return d


# ----------------------------------------------------------------------
# Formatting helpers
# ----------------------------------------------------------------------

class TestFormatting(unittest.TestCase):
    def test_format_tokens_table(self):
        table = [(0, "0"), (7, "7"), (999, "999"), (1000, "1.0k"), (1049, "1.0k"),
                 (1050, "1.1k"), (20800, "20.8k"), (20850, "20.9k"), (999949, "999.9k"),
                 (999950, "1.0M"), (1500000, "1.5M"), (999950000, "1.0B"),
                 (2100000000, "2.1B"), (-1500, "-1.5k")]
        for n, want in table:
            with self.subTest(n=n):
                self.assertEqual(proxy.format_tokens(n), want)

    def test_format_uptime_table(self):
        table = [(0, "0s"), (45, "45s"), (59.9, "59s"), (60, "1m"), (720, "12m"), (3599, "59m"),
                 (3600, "1h 0m"), (8100, "2h 15m"), (86399, "23h 59m"), (86400, "1d 0h"),
                 (3 * DAY + 4 * HOUR + 59 * 60, "3d 4h"), (-5, "0s")]
        for s, want in table:
            with self.subTest(seconds=s):
                self.assertEqual(proxy.format_uptime(s), want)

    def test_iso_utc(self):
        self.assertEqual(proxy.iso_utc(0), "1970-01-01T00:00:00Z")
        self.assertEqual(proxy.iso_utc(BASE + 3723.9), "2026-09-02T01:02:03Z")
        self.assertIsNone(proxy.iso_utc(None))


# ----------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------

class TestRecording(unittest.TestCase):
    def setUp(self):
        self.clock = FakeClock(BASE + 6 * HOUR)
        self.store = proxy.StatsStore(clock=self.clock)
        for r in mixed_records():
            self.store.record(r)
        self.snap = self.store.snapshot()

    def test_totals_and_definitions(self):
        s = self.snap
        self.assertEqual(s["requests"], 7)
        self.assertEqual(s["completions"], 4)   # a, b, c, f: completion endpoint + 2xx
        self.assertEqual(s["errors"], 3)        # d, f, g
        self.assertEqual(s["bytes"], 1740)
        want_tokens = {"prompt": 315, "completion": 200, "total": 515,
                       "cacheRead": 10, "cacheWrite": 5, "reasoning": 7, "formatted": "515"}
        self.assertEqual(s["tokens"], want_tokens)
        self.assertEqual(s["usageReports"], {"reported": 2, "injected": 1, "missing": 3})

    def test_by_model(self):
        bm = self.snap["byModel"]
        self.assertEqual(set(bm), {"A", "B", "(unknown)"})  # e has neither model nor usage
        self.assertEqual(bm["A"], {"requests": 3, "errors": 1, "prompt": 300, "completion": 200,
                                   "total": 500, "cacheRead": 10, "cacheWrite": 5,
                                   "avgTtfbMs": 200.0,          # (100+300)/2, g had no ttfb
                                   "tokensPerSecond": 50.0})    # 200 tokens / 4.0 s
        self.assertEqual(bm["B"], {"requests": 2, "errors": 1, "prompt": 10, "completion": 0,
                                   "total": 10, "cacheRead": 0, "cacheWrite": 0,
                                   "avgTtfbMs": 35.0, "tokensPerSecond": None})
        self.assertEqual(bm["(unknown)"]["requests"], 1)
        self.assertEqual(bm["(unknown)"]["errors"], 1)
        self.assertEqual(bm["(unknown)"]["total"], 5)

    def test_by_endpoint_and_client(self):
        be = self.snap["byEndpoint"]
        self.assertEqual({k: v["requests"] for k, v in be.items()},
                         {"/v1/chat/completions": 4, "/v1/messages": 2, "/api/tags": 1})
        self.assertEqual(be["/v1/chat/completions"]["errors"], 2)
        self.assertEqual(be["/v1/chat/completions"]["total"], 505)
        self.assertEqual(be["/v1/chat/completions"]["avgTtfbMs"], 146.7)  # (100+300+40)/3
        bc = self.snap["byClient"]
        self.assertEqual({k: v["requests"] for k, v in bc.items()},
                         {"10.0.0.1": 3, "10.0.0.2": 2, "10.0.0.3": 2})
        self.assertEqual(bc["10.0.0.1"]["tokensPerSecond"], 50.0)

    def test_recent_order_and_fields(self):
        recent = self.snap["recent"]
        self.assertEqual(len(recent), 7)
        self.assertEqual([r["time"] for r in recent],
                         [proxy.iso_utc(BASE + 5 * HOUR + i) for i in range(7, 0, -1)])
        g, a = recent[0], recent[-1]
        self.assertEqual(g["status"], 502)
        self.assertIs(g["error"], True)
        self.assertIsNone(g["ttfbMs"])
        self.assertEqual(a, {"time": "2026-09-02T05:00:01Z", "method": "POST",
                             "path": "/v1/chat/completions", "model": "A", "status": 200,
                             "client": "10.0.0.1",
                             "tokens": {"prompt": 100, "completion": 50, "total": 150,
                                        "cacheRead": 10, "cacheWrite": 5},
                             "durationMs": 1100.0, "ttfbMs": 100.0, "tokensPerSecond": 50.0,
                             "usage": "reported", "error": False})
        self.assertIsNone(recent[1]["model"])  # f: "(unknown)" only in byModel

    def test_recent_is_bounded(self):
        store = proxy.StatsStore(history_size=5, clock=self.clock)
        for i in range(12):
            store.record(rec(path="/p%d" % i))
        recent = store.snapshot()["recent"]
        self.assertEqual([r["path"] for r in recent], ["/p11", "/p10", "/p9", "/p8", "/p7"])
        self.assertEqual(store.snapshot()["requests"], 12)

    def test_snapshot_is_a_copy(self):
        snap = self.store.snapshot()
        snap["recent"][0]["tokens"]["prompt"] = 999999
        snap["byModel"]["A"]["requests"] = 999999
        again = self.store.snapshot()
        self.assertEqual(again["byModel"]["A"]["requests"], 3)
        self.assertNotEqual(again["recent"][0]["tokens"]["prompt"], 999999)

    def test_tokens_per_second_streamed_flag(self):
        store = proxy.StatsStore(clock=self.clock)
        # Non-streamed: the first byte only comes after generation, so
        # duration - ttfb (10 ms) would claim 10000 tok/s.
        store.record(rec(model="ns", usage=usage(1, 100), ttfb_ms=1990.0, duration_ms=2000.0,
                         streamed=False))
        store.record(rec(model="st", usage=usage(1, 100), ttfb_ms=1990.0, duration_ms=2000.0))
        bm = store.snapshot()["byModel"]
        self.assertEqual(bm["ns"]["tokensPerSecond"], 50.0)
        self.assertEqual(bm["st"]["tokensPerSecond"], 10000.0)

    def test_total_falls_back_to_prompt_plus_completion(self):
        store = proxy.StatsStore(clock=self.clock)
        store.record(rec(usage={"prompt": 3, "completion": 4}))
        self.assertEqual(store.snapshot()["tokens"]["total"], 7)

    def test_odd_values_do_not_raise(self):
        store = proxy.StatsStore(clock=self.clock)
        store.record(proxy.RequestRecord(path="/x"))
        store.record(rec(usage={"prompt": -5, "completion": "7", "total": float("nan")},
                         ttfb_ms=float("inf"), duration_ms=-1, status=True, time="yesterday",
                         model="bad\ud800model"))
        snap = store.snapshot()
        self.assertEqual(snap["requests"], 2)
        self.assertEqual(snap["tokens"]["total"], 0)
        self.assertIn("bad?model", snap["byModel"])
        json.dumps(snap).encode("utf-8")
        proxy.render_metrics(store).encode("utf-8")

    def test_in_flight(self):
        store = proxy.StatsStore(clock=self.clock)
        store.request_started()
        store.request_started()
        store.request_finished()
        self.assertEqual(store.snapshot()["inFlight"], 1)
        store.request_finished()
        store.request_finished()  # unbalanced: stays at 0
        self.assertEqual(store.snapshot()["inFlight"], 0)

    def test_reset(self):
        self.clock.advance(100)
        self.store.request_started()
        self.store.reset()
        s = self.store.snapshot()
        self.assertEqual((s["requests"], s["completions"], s["errors"], s["bytes"]), (0, 0, 0, 0))
        self.assertEqual(s["tokens"]["total"], 0)
        self.assertEqual(s["tokens"]["formatted"], "0")
        self.assertEqual(s["usageReports"], {"reported": 0, "injected": 0, "missing": 0})
        self.assertEqual((s["byModel"], s["byEndpoint"], s["byClient"]), ({}, {}, {}))
        self.assertEqual((s["recent"], s["hourly"], s["daily"]), ([], [], []))
        self.assertEqual(s["since"], proxy.iso_utc(self.clock.now))
        self.assertEqual(s["startedAt"], proxy.iso_utc(BASE + 6 * HOUR))  # process start kept
        self.assertEqual(s["inFlight"], 1)
        self.assertIn("llm_proxy_request_duration_seconds_count 0\n", proxy.render_metrics(self.store))


class TestCardinality(unittest.TestCase):
    def test_maps_are_capped_with_other(self):
        clock = FakeClock(BASE)
        store = proxy.StatsStore(clock=clock, max_keys=3)
        for i in range(10):
            store.record(rec(model="m%d" % i, path="/p%d" % i, client="10.0.0.%d" % i,
                             usage=usage(1, 1)))
        store.record(rec(model="m0", path="/p0", client="10.0.0.0", usage=usage(1, 1)))
        s = store.snapshot()
        for name in ("byModel", "byEndpoint", "byClient"):
            table = s[name]
            self.assertLessEqual(len(table), 3, name)
            self.assertEqual(sum(v["requests"] for v in table.values()), 11, name)
            self.assertEqual(table["(other)"]["requests"], 8, name)
        self.assertEqual(set(s["byModel"]), {"m0", "m1", "(other)"})
        self.assertEqual(s["byModel"]["m0"]["requests"], 2)
        self.assertEqual(s["byModel"]["(other)"]["total"], 16)
        self.assertEqual(s["requests"], 11)

    def test_hostile_long_keys_are_bounded(self):
        store = proxy.StatsStore(clock=FakeClock(BASE))
        store.record(rec(path="/" + "a" * 65536, model="m" * 10000))
        s = store.snapshot()
        for key in list(s["byEndpoint"]) + list(s["byModel"]) + [s["recent"][0]["path"]]:
            self.assertLessEqual(len(key), 200)

    def test_loaded_table_over_cap_is_folded(self):
        tmp = tempfile.mkdtemp(prefix="stats-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "stats.json")
        big = proxy.StatsStore(path=path, clock=FakeClock(BASE), max_keys=50)
        for i in range(10):
            for _ in range(i + 1):
                big.record(rec(model="m%d" % i))
        self.assertTrue(big.save())
        small = proxy.StatsStore(path=path, clock=FakeClock(BASE), max_keys=4)
        self.assertTrue(small.load())
        bm = small.snapshot()["byModel"]
        self.assertEqual(set(bm), {"m9", "m8", "m7", "(other)"})  # the busiest stay
        self.assertEqual(bm["(other)"]["requests"], sum(range(1, 8)))


class TestBuckets(unittest.TestCase):
    def test_hourly_and_daily(self):
        clock = FakeClock(BASE)
        store = proxy.StatsStore(clock=clock)
        store.record(rec(time=BASE + 10, usage=usage(1, 2)))
        clock.now = BASE + HOUR + 100
        store.record(rec(time=BASE + HOUR + 5, usage=usage(10, 20), error=True, status=500))
        store.record(rec(time=BASE + HOUR + 50, usage=usage(100, 200)))
        s = store.snapshot()
        self.assertEqual(s["hourly"], [
            {"start": "2026-09-02T00:00:00Z", "requests": 1, "errors": 0, "prompt": 1,
             "completion": 2, "total": 3},
            {"start": "2026-09-02T01:00:00Z", "requests": 2, "errors": 1, "prompt": 110,
             "completion": 220, "total": 330},
        ])
        self.assertEqual(s["daily"], [
            {"start": "2026-09-02T00:00:00Z", "requests": 3, "errors": 1, "prompt": 111,
             "completion": 222, "total": 333},
        ])
        # 47 h later the first hour is still inside the 48-bucket window...
        clock.now = BASE + 47 * HOUR + 10
        self.assertEqual(len(store.snapshot()["hourly"]), 2)
        # ...one hour more and it is dropped; a new bucket appears oldest first.
        clock.now = BASE + 48 * HOUR + 10
        store.record(rec(time=clock.now))
        hourly = store.snapshot()["hourly"]
        self.assertEqual([b["start"] for b in hourly],
                         ["2026-09-02T01:00:00Z", "2026-09-04T00:00:00Z"])
        daily = store.snapshot()["daily"]
        self.assertEqual([(b["start"], b["requests"]) for b in daily],
                         [("2026-09-02T00:00:00Z", 3), ("2026-09-04T00:00:00Z", 1)])
        # A request that started before the window counts, but in no hourly bucket.
        store.record(rec(time=clock.now - 49 * HOUR))
        self.assertEqual(sum(b["requests"] for b in store.snapshot()["hourly"]), 3)  # unchanged
        self.assertEqual(sum(b["requests"] for b in store.snapshot()["daily"]), 5)
        # 90 daily buckets: day 0 stays until day 90 begins.
        clock.now = BASE + 89 * DAY + 10
        self.assertEqual(store.snapshot()["daily"][0]["start"], "2026-09-02T00:00:00Z")
        self.assertEqual(store.snapshot()["hourly"], [])
        clock.now = BASE + 90 * DAY + 10
        self.assertEqual([b["start"] for b in store.snapshot()["daily"]], ["2026-09-04T00:00:00Z"])
        self.assertEqual(store.snapshot()["requests"], 5)  # totals are never pruned


class TestConcurrency(unittest.TestCase):
    def test_50_threads_200_records(self):
        store = proxy.StatsStore(clock=FakeClock(BASE), max_keys=20)
        barrier = threading.Barrier(50)
        failures = []

        def worker(n):
            try:
                barrier.wait()
                for i in range(200):
                    store.request_started()
                    store.record(rec(model="m%d" % (n % 30), client="10.0.%d.1" % n,
                                     usage=usage(1, 2), error=(i % 2 == 0),
                                     status=500 if i % 2 == 0 else 200))
                    store.request_finished()
            except Exception as exc:  # surfaced in the test thread
                failures.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(failures, [])
        s = store.snapshot()
        self.assertEqual(s["requests"], 10000)
        self.assertEqual(s["errors"], 5000)
        self.assertEqual(s["completions"], 5000)
        self.assertEqual(s["tokens"]["prompt"], 10000)
        self.assertEqual(s["tokens"]["completion"], 20000)
        self.assertEqual(s["tokens"]["total"], 30000)
        self.assertEqual(s["inFlight"], 0)
        self.assertEqual(len(s["recent"]), 100)
        for name in ("byModel", "byClient"):
            self.assertLessEqual(len(s[name]), 20)
            self.assertEqual(sum(v["requests"] for v in s[name].values()), 10000)
            self.assertEqual(sum(v["total"] for v in s[name].values()), 30000)
        self.assertEqual(sum(b["requests"] for b in s["hourly"]), 10000)


class TestSnapshotShape(unittest.TestCase):
    def test_spec_fields_and_types(self):
        clock = FakeClock(BASE)
        store = proxy.StatsStore(clock=clock)
        store.record(rec(model="qwen3:8b-q4_K_M", usage=usage(12500, 8300)))
        clock.advance(8100)
        s = json.loads(json.dumps(store.snapshot()))  # JSON-serialisable, round trips
        # Every field of the spec's example response.
        self.assertEqual(s["uptime"], "2h 15m")
        self.assertIsInstance(s["requests"], int)
        self.assertIsInstance(s["completions"], int)
        self.assertIsInstance(s["errors"], int)
        for k in ("prompt", "completion", "total"):
            self.assertIsInstance(s["tokens"][k], int)
        self.assertEqual(s["tokens"]["formatted"], "20.8k")
        self.assertEqual(s["byModel"]["qwen3:8b-q4_K_M"]["requests"], 1)
        self.assertEqual(s["byModel"]["qwen3:8b-q4_K_M"]["total"], 20800)
        # The additions.
        self.assertEqual(s["uptimeSeconds"], 8100)
        self.assertEqual(s["version"], proxy.VERSION)
        iso = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z")
        self.assertRegex(s["startedAt"], iso)
        self.assertRegex(s["since"], iso)
        self.assertEqual(s["inFlight"], 0)
        for k in ("cacheRead", "cacheWrite", "reasoning"):
            self.assertIsInstance(s["tokens"][k], int)
        self.assertEqual(set(s["usageReports"]), {"reported", "injected", "missing"})
        breakdown_keys = {"requests", "errors", "prompt", "completion", "total", "cacheRead",
                          "cacheWrite", "avgTtfbMs", "tokensPerSecond"}
        for name in ("byModel", "byEndpoint", "byClient"):
            for entry in s[name].values():
                self.assertEqual(set(entry), breakdown_keys)
        self.assertEqual(set(s["recent"][0]), {"time", "method", "path", "model", "status", "client",
                                               "tokens", "durationMs", "ttfbMs", "tokensPerSecond",
                                               "usage", "error"})
        self.assertIsInstance(s["hourly"], list)
        self.assertIsInstance(s["daily"], list)
        self.assertEqual(s["persistence"], {"enabled": False, "file": None, "lastSaved": None,
                                            "lastError": None})

    def test_version_passed_in(self):
        self.assertEqual(proxy.StatsStore(version="9.9").snapshot()["version"], "9.9")


# ----------------------------------------------------------------------
# Persistence
# ----------------------------------------------------------------------

def volatile_removed(snap):
    snap = dict(snap)
    for k in ("uptime", "uptimeSeconds", "startedAt", "inFlight"):
        snap.pop(k)
    return snap


class TestPersistence(TempDirMixin, unittest.TestCase):
    def setUp(self):
        self.dir = self.make_tmp()
        self.path = os.path.join(self.dir, "stats.json")
        self.clock = FakeClock(BASE + 6 * HOUR)

    def new_store(self, **kw):
        kw.setdefault("path", self.path)
        kw.setdefault("clock", self.clock)
        return proxy.StatsStore(**kw)

    def corrupt_files(self):
        return sorted(f for f in os.listdir(self.dir) if ".corrupt-" in f)

    def test_round_trip(self):
        a = self.new_store()
        for r in mixed_records():
            a.record(r)
        a.record(rec(streamed=False, usage=usage(5, 500), ttfb_ms=9000.0, duration_ms=10000.0))
        a.request_started()
        self.assertTrue(a.save())
        self.clock.advance(500)
        b = self.new_store()
        self.assertTrue(b.load())
        sa, sb = a.snapshot(), b.snapshot()
        self.assertEqual(volatile_removed(sa), volatile_removed(sb))
        self.assertEqual(sb["persistence"]["lastSaved"], proxy.iso_utc(BASE + 6 * HOUR))
        self.assertEqual(sb["inFlight"], 0)           # not persisted
        self.assertEqual(sb["uptimeSeconds"], 0)      # process uptime, not persisted
        # Histograms survive too: /metrics is identical apart from uptime and in-flight.
        strip = re.compile(r"^llm_proxy_(uptime_seconds|in_flight_requests) .*$", re.M)
        self.assertEqual(strip.sub("", proxy.render_metrics(a)),
                         strip.sub("", proxy.render_metrics(b)))
        # A freshly loaded store is clean: nothing to write.
        self.assertFalse(b.save())

    def test_file_format(self):
        s = self.new_store()
        r = rec()
        r.headers = {"authorization": "Bearer sk-SECRET"}  # must never reach the disk
        s.record(r)
        self.assertTrue(s.save())
        with open(self.path, "rb") as f:
            raw = f.read()
        self.assertNotIn(b"SECRET", raw)
        doc = json.loads(raw.decode("ascii"))
        self.assertEqual(doc["format"], "llm-proxy-stats")
        self.assertEqual(doc["formatVersion"], 1)
        self.assertEqual(doc["requests"], 1)
        self.assertEqual(doc["savedAt"], self.clock.now)
        self.assertEqual(set(doc), {"format", "formatVersion", "version", "savedAt", "since",
                                    "requests", "completions", "errors", "bytes", "tokens",
                                    "usageReports", "byModel", "byEndpoint", "byClient", "recent",
                                    "hourly", "daily", "histograms",
                                    "byKey", "refused", "keyDays"})
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o644)

    def test_save_only_when_dirty(self):
        s = self.new_store()
        self.assertFalse(s.save())                   # nothing recorded yet
        self.assertFalse(os.path.exists(self.path))
        s.record(rec())
        self.assertTrue(s.save())
        st1 = os.stat(self.path)
        time.sleep(0.02)
        self.assertFalse(s.save())
        st2 = os.stat(self.path)
        self.assertEqual((st1.st_ino, st1.st_mtime_ns), (st2.st_ino, st2.st_mtime_ns))
        s.snapshot()                                  # reading does not dirty
        self.assertFalse(s.save())
        s.record(rec())
        self.assertTrue(s.save())
        self.assertNotEqual(os.stat(self.path).st_ino, st1.st_ino)  # replaced, not rewritten
        s.reset()
        self.assertTrue(s.save())                     # a reset must reach the disk
        with open(self.path) as f:
            self.assertEqual(json.load(f)["requests"], 0)

    def test_atomic_no_temp_files_and_always_valid(self):
        s = self.new_store()
        s.record(rec())
        self.assertTrue(s.save())
        stop = threading.Event()
        bad = []
        reads = [0]

        def reader():
            while not stop.is_set():
                with open(self.path, "rb") as f:
                    data = f.read()
                try:
                    json.loads(data.decode("ascii"))
                    reads[0] += 1
                except ValueError as exc:
                    bad.append(exc)

        t = threading.Thread(target=reader)
        t.start()
        try:
            for i in range(40):
                s.record(rec(path="/p%d" % i))
                self.assertTrue(s.save())
        finally:
            stop.set()
            t.join(10)
        self.assertEqual(bad, [])
        self.assertGreater(reads[0], 0)
        self.assertEqual(os.listdir(self.dir), ["stats.json"])

    def test_failed_write_leaves_no_temp_and_retries(self):
        s = self.new_store()
        s.record(rec())
        err = OSError(28, "No space left on device")
        with mock.patch.object(proxy.os, "replace", side_effect=err):
            with self.assertLogs("llm-proxy", level="WARNING") as cm:
                self.assertFalse(s.save())
                self.assertFalse(s.save())   # same error again: not logged again
                logging.getLogger("llm-proxy").warning("sentinel")
        warnings = [m for m in cm.output if "No space left" in m]
        self.assertEqual(len(warnings), 1, cm.output)
        self.assertEqual(os.listdir(self.dir), [])     # temp file removed
        self.assertIn("No space left", s.snapshot()["persistence"]["lastError"])
        self.assertTrue(s.save())                      # still dirty: the retry writes
        self.assertIsNone(s.snapshot()["persistence"]["lastError"])
        self.assertEqual(os.listdir(self.dir), ["stats.json"])

    def check_corrupt(self, data):
        with open(self.path, "wb") as f:
            f.write(data)
        s = self.new_store()
        with self.assertLogs("llm-proxy", level="WARNING") as cm:
            self.assertFalse(s.load())
        self.assertFalse(os.path.exists(self.path))
        moved = self.corrupt_files()
        self.assertEqual(len(moved), 1)
        self.assertRegex(moved[0], r"^stats\.json\.corrupt-\d{8}-\d{6}$")
        moved_path = os.path.join(self.dir, moved[0])
        with open(moved_path, "rb") as f:
            self.assertEqual(f.read(), data)            # original bytes kept
        msg = "\n".join(cm.output)
        self.assertIn(self.path, msg)
        self.assertIn(moved_path, msg)
        self.assertEqual(s.snapshot()["requests"], 0)
        # The store works and writes a fresh file; the moved one is untouched.
        s.record(rec())
        self.assertTrue(s.save())
        with open(self.path) as f:
            self.assertEqual(json.load(f)["requests"], 1)
        with open(moved_path, "rb") as f:
            self.assertEqual(f.read(), data)

    def valid_file_bytes(self):
        s = self.new_store(path=os.path.join(self.dir, "tmp-valid.json"))
        for r in mixed_records():
            s.record(r)
        s.save()
        with open(s.path, "rb") as f:
            data = f.read()
        os.unlink(s.path)
        return data

    def test_corrupt_garbage(self):
        self.check_corrupt(b"\x00\xff\xfe not json at all")

    def test_corrupt_truncated(self):
        data = self.valid_file_bytes()
        self.check_corrupt(data[:len(data) // 2])

    def test_corrupt_empty(self):
        self.check_corrupt(b"")

    def test_wrong_shape_list(self):
        self.check_corrupt(b"[1, 2, 3]")

    def test_wrong_shape_object(self):
        self.check_corrupt(b'{"requests": "many", "tokens": {}}')

    def test_wrong_shape_deep_field(self):
        doc = json.loads(self.valid_file_bytes())
        doc["byModel"]["A"]["total"] = "lots"
        self.check_corrupt(json.dumps(doc).encode())

    def test_newer_format_version_is_not_overwritten(self):
        doc = json.loads(self.valid_file_bytes())
        doc["formatVersion"] = 99
        self.check_corrupt(json.dumps(doc).encode())

    def test_corrupt_file_that_cannot_be_moved_is_never_overwritten(self):
        with open(self.path, "wb") as f:
            f.write(b"garbage")
        s = self.new_store()
        with mock.patch.object(proxy.os, "replace", side_effect=OSError(30, "Read-only file system")):
            with self.assertLogs("llm-proxy", level="WARNING"):
                self.assertFalse(s.load())
        s.record(rec())
        self.assertFalse(s.save())
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"garbage")
        self.assertIn("not saving", s.snapshot()["persistence"]["lastError"])

    def test_missing_file_is_a_fresh_start(self):
        s = self.new_store()
        self.assertFalse(s.load())
        self.assertEqual(self.corrupt_files(), [])
        self.assertEqual(s.snapshot()["requests"], 0)

    def test_unwritable_parent_is_a_file(self):
        parent = os.path.join(self.dir, "regular-file")
        with open(parent, "w") as f:
            f.write("x")
        s = self.new_store(path=os.path.join(parent, "stats.json"))
        self.assertFalse(s.load())
        s.record(rec())
        with self.assertLogs("llm-proxy", level="WARNING") as cm:
            self.assertFalse(s.save())
        self.assertIn("cannot save stats", "\n".join(cm.output))
        self.assertEqual(s.snapshot()["requests"], 1)   # still serving
        self.assertIsNotNone(s.snapshot()["persistence"]["lastError"])

    @unittest.skipIf(hasattr(os, "geteuid") and os.geteuid() == 0,
                     "root ignores directory permissions")
    def test_unwritable_directory_chmod(self):
        ro = os.path.join(self.dir, "ro")
        os.mkdir(ro)
        os.chmod(ro, 0o500)
        self.addCleanup(os.chmod, ro, 0o700)
        s = self.new_store(path=os.path.join(ro, "stats.json"))
        s.record(rec())
        with self.assertLogs("llm-proxy", level="WARNING"):
            self.assertFalse(s.save())

    def test_path_is_a_directory(self):
        os.mkdir(self.path)
        s = self.new_store()
        with self.assertLogs("llm-proxy", level="WARNING"):
            self.assertFalse(s.load())
        s.record(rec())
        self.assertFalse(s.save())
        self.assertTrue(os.path.isdir(self.path))

    def test_disabled_never_touches_disk(self):
        s = self.new_store(enabled=False)
        s.record(rec())
        s.record(rec(error=True, status=500))
        snap = s.snapshot()
        self.assertEqual((snap["requests"], snap["errors"], snap["completions"]), (2, 1, 1))
        self.assertFalse(s.save())
        self.assertFalse(os.path.exists(self.path))
        before = set(threading.enumerate())
        s.start_autosave(0.01)
        # No saver thread at all (nothing to wait for): none can ever write the file.
        self.assertEqual([t.name for t in set(threading.enumerate()) - before
                          if t.name == "llm-proxy-stats-autosave"], [])
        s.stop_autosave()
        self.assertFalse(os.path.exists(self.path))
        self.assertEqual(snap["persistence"]["enabled"], False)
        # load() ignores even a garbage file: no read, no move.
        with open(self.path, "wb") as f:
            f.write(b"garbage")
        self.assertFalse(s.load())
        self.assertEqual(os.listdir(self.dir), ["stats.json"])

    def test_no_path_means_no_persistence(self):
        s = proxy.StatsStore(clock=self.clock)
        s.record(rec())
        self.assertFalse(s.load())
        self.assertFalse(s.save())


class TestAutosave(TempDirMixin, unittest.TestCase):
    def setUp(self):
        self.dir = self.make_tmp()
        self.path = os.path.join(self.dir, "stats.json")

    def read_requests(self):
        try:
            with open(self.path) as f:
                return json.load(f)["requests"]
        except FileNotFoundError:
            return None

    def test_interval_saves_and_stop_saves(self):
        s = proxy.StatsStore(path=self.path)
        self.addCleanup(s.stop_autosave)
        s.start_autosave(0.05)
        s.record(rec())
        deadline = time.monotonic() + 3
        while self.read_requests() != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(self.read_requests(), 1)
        s.stop_autosave()
        s.record(rec())
        s.stop_autosave()             # twice is fine, and still saves
        self.assertEqual(self.read_requests(), 2)
        self.assertEqual([t for t in threading.enumerate() if t.name == "llm-proxy-stats-autosave"], [])

    def test_stop_is_immediate_and_final_save(self):
        s = proxy.StatsStore(path=self.path)
        s.start_autosave(30)
        s.record(rec())
        t0 = time.monotonic()
        s.stop_autosave()
        self.assertLess(time.monotonic() - t0, 1.0)
        self.assertEqual(self.read_requests(), 1)

    def test_no_thread_at_construction(self):
        before = threading.active_count()
        proxy.StatsStore(path=self.path)
        self.assertEqual(threading.active_count(), before)
        self.assertFalse(os.path.exists(self.path))


# ----------------------------------------------------------------------
# Metrics: a strict parser for the text exposition format 0.0.4
# ----------------------------------------------------------------------

class PromFormatError(AssertionError):
    pass


_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_VALUE = re.compile(r"([+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]Inf|NaN)\Z")
_TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


def _unescape(s, allowed, lineno):
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "\\":
            if i + 1 >= len(s) or s[i + 1] not in allowed:
                raise PromFormatError("line %d: bad escape in %r" % (lineno, s))
            out.append({"\\": "\\", "n": "\n", '"': '"'}[s[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _parse_labels(line, i, lineno):
    """Parse `{a="b",c="d"}` starting at line[i] == "{"; return (labels, index after "}")."""
    labels = {}
    i += 1
    if line[i:i + 1] == "}":
        return labels, i + 1
    while True:
        eq = line.find("=", i)
        if eq < 0:
            raise PromFormatError("line %d: label without =" % lineno)
        name = line[i:eq]
        if not _LABEL_NAME.match(name) or name.startswith("__"):
            raise PromFormatError("line %d: bad label name %r" % (lineno, name))
        if name in labels:
            raise PromFormatError("line %d: duplicate label %r" % (lineno, name))
        if line[eq + 1:eq + 2] != '"':
            raise PromFormatError("line %d: label value not quoted" % lineno)
        j = eq + 2
        raw = []
        while True:
            if j >= len(line):
                raise PromFormatError("line %d: unterminated label value" % lineno)
            c = line[j]
            if c == "\\":
                raw.append(line[j:j + 2])
                j += 2
                continue
            if c == '"':
                break
            raw.append(c)
            j += 1
        labels[name] = _unescape("".join(raw), '\\"n', lineno)
        j += 1
        if line[j:j + 1] == ",":
            i = j + 1
            if line[i:i + 1] == "}":
                raise PromFormatError("line %d: trailing comma" % lineno)
            continue
        if line[j:j + 1] == "}":
            return labels, j + 1
        raise PromFormatError("line %d: expected , or } after label" % lineno)


def parse_prometheus_text(text):
    """Parse format 0.0.4 strictly; return {family: {"type", "help", "samples": [(name, labels, value)]}}."""
    if not text.endswith("\n"):
        raise PromFormatError("must end with a newline")
    families = {}
    series = set()
    current = None
    closed = set()
    for lineno, line in enumerate(text[:-1].split("\n"), 1):
        if line == "":
            raise PromFormatError("line %d: empty line" % lineno)
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[0] == "#" and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not _METRIC_NAME.match(name):
                    raise PromFormatError("line %d: bad metric name %r" % (lineno, name))
                fam = families.setdefault(name, {"type": None, "help": None, "samples": []})
                if fam["samples"] or name in closed:
                    raise PromFormatError("line %d: %s after samples of %s" % (lineno, parts[1], name))
                if parts[1] == "HELP":
                    if fam["help"] is not None:
                        raise PromFormatError("line %d: second HELP for %s" % (lineno, name))
                    fam["help"] = _unescape(parts[3] if len(parts) > 3 else "", "\\n", lineno)
                else:
                    if fam["type"] is not None:
                        raise PromFormatError("line %d: second TYPE for %s" % (lineno, name))
                    if len(parts) != 4 or parts[3] not in _TYPES:
                        raise PromFormatError("line %d: bad TYPE line" % lineno)
                    fam["type"] = parts[3]
                if current is not None and current != name:
                    closed.add(current)
                current = name
            continue
        m = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
        if not m:
            raise PromFormatError("line %d: no metric name" % lineno)
        name, i = m.group(0), m.end()
        labels = {}
        if line[i:i + 1] == "{":
            labels, i = _parse_labels(line, i, lineno)
        if line[i:i + 1] != " ":
            raise PromFormatError("line %d: expected one space before the value" % lineno)
        rest = line[i + 1:].split(" ")
        if len(rest) not in (1, 2) or not _VALUE.match(rest[0]):
            raise PromFormatError("line %d: bad value %r" % (lineno, line[i + 1:]))
        if len(rest) == 2 and not re.match(r"-?\d+\Z", rest[1]):
            raise PromFormatError("line %d: bad timestamp" % lineno)
        value = float(rest[0])
        # Which declared family does this sample belong to?
        fam_name = None
        if name in families and families[name]["type"] in ("counter", "gauge", "untyped"):
            fam_name = name
        else:
            for suffix in ("_bucket", "_sum", "_count"):
                base = name[:-len(suffix)]
                if name.endswith(suffix) and families.get(base, {}).get("type") == "histogram":
                    fam_name = base
        if fam_name is None:
            raise PromFormatError("line %d: sample %s has no TYPE declared before it" % (lineno, name))
        fam = families[fam_name]
        if fam["type"] == "counter" and not name.endswith("_total"):
            raise PromFormatError("line %d: counter %s does not end in _total" % (lineno, name))
        if ("le" in labels) != name.endswith("_bucket") and fam["type"] == "histogram":
            raise PromFormatError("line %d: le label misuse" % lineno)
        if fam_name != current:
            if fam_name in closed:
                raise PromFormatError("line %d: samples of %s are not contiguous" % (lineno, fam_name))
            if current is not None:
                closed.add(current)
            current = fam_name
        key = (name, tuple(sorted(labels.items())))
        if key in series:
            raise PromFormatError("line %d: duplicate series %r" % (lineno, key))
        series.add(key)
        fam["samples"].append((name, labels, value))
    for fam_name, fam in families.items():
        if fam["type"] == "histogram":
            _check_histogram(fam_name, fam["samples"])
    return families


def _check_histogram(fam_name, samples):
    groups = {}
    for name, labels, value in samples:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        g = groups.setdefault(key, {"buckets": [], "sum": None, "count": None})
        if name.endswith("_bucket"):
            g["buckets"].append((labels["le"], value))
        elif name.endswith("_sum"):
            g["sum"] = value
        else:
            g["count"] = value
    for key, g in groups.items():
        les = [float(le) for le, _ in g["buckets"]]
        if not g["buckets"] or g["buckets"][-1][0] != "+Inf":
            raise PromFormatError("%s%r: last bucket must be le=\"+Inf\"" % (fam_name, key))
        if les != sorted(les) or len(set(les)) != len(les):
            raise PromFormatError("%s%r: le not strictly increasing" % (fam_name, key))
        counts = [v for _, v in g["buckets"]]
        if any(b < a for a, b in zip(counts, counts[1:])):
            raise PromFormatError("%s%r: bucket counts not cumulative" % (fam_name, key))
        if g["count"] is None or g["sum"] is None:
            raise PromFormatError("%s%r: missing _sum or _count" % (fam_name, key))
        if counts[-1] != g["count"]:
            raise PromFormatError("%s%r: +Inf bucket != _count" % (fam_name, key))


def sample_map(families):
    out = {}
    for fam in families.values():
        for name, labels, value in fam["samples"]:
            out[(name, tuple(sorted(labels.items())))] = value
    return out


class TestStrictParser(unittest.TestCase):
    """The parser used below must be able to fail."""

    GOOD = ('# HELP a_total Help \\\\ with \\n escapes.\n# TYPE a_total counter\n'
            'a_total{x="q\\"\\\\\\n"} 1\n')

    def test_good(self):
        fams = parse_prometheus_text(self.GOOD)
        self.assertEqual(fams["a_total"]["help"], "Help \\ with \n escapes.")
        self.assertEqual(fams["a_total"]["samples"], [("a_total", {"x": 'q"\\\n'}, 1.0)])

    def test_rejects(self):
        h = "# TYPE h histogram\n"
        bad = {
            "no TYPE": "a_total 1\n",
            "no final newline": "# TYPE a_total counter\na_total 1",
            "bad escape": '# TYPE a_total counter\na_total{x="\\t"} 1\n',
            "duplicate series": "# TYPE a_total counter\na_total 1\na_total 2\n",
            "counter name": "# TYPE a counter\na 1\n",
            "bad value": "# TYPE g gauge\ng one\n",
            "two TYPEs": "# TYPE g gauge\n# TYPE g gauge\ng 1\n",
            "TYPE after sample": "# TYPE g gauge\ng 1\n# HELP g late\n",
            "not contiguous": "# TYPE g gauge\n# TYPE f gauge\ng 1\nf 1\ng{a=\"b\"} 1\n",
            "no +Inf": h + 'h_bucket{le="1.0"} 1\nh_sum 1\nh_count 1\n',
            "not cumulative": h + 'h_bucket{le="1.0"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n',
            "+Inf != count": h + 'h_bucket{le="+Inf"} 2\nh_sum 1\nh_count 1\n',
            "unquoted": "# TYPE g gauge\ng{a=b} 1\n",
            "empty line": "# TYPE g gauge\n\ng 1\n",
        }
        for why, text in bad.items():
            with self.subTest(why):
                with self.assertRaises(PromFormatError):
                    parse_prometheus_text(text)


class TestMetrics(unittest.TestCase):
    def setUp(self):
        self.clock = FakeClock(BASE + 6 * HOUR)
        self.store = proxy.StatsStore(clock=self.clock, version="1.2.3")
        for r in mixed_records():
            self.store.record(r)
        self.store.request_started()
        self.clock.advance(42.5)

    def test_content_type(self):
        self.assertEqual(proxy.METRICS_CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")

    def test_parses_and_matches_store(self):
        text = proxy.render_metrics(self.store)
        fams = parse_prometheus_text(text)
        m = sample_map(fams)
        snap = self.store.snapshot()
        for fam in fams.values():
            self.assertIsNotNone(fam["help"])
            self.assertIsNotNone(fam["type"])
        self.assertTrue(all(name.startswith("llm_proxy_") for name in fams))
        self.assertEqual(m[("llm_proxy_info", (("version", "1.2.3"),))], 1)
        self.assertEqual(m[("llm_proxy_uptime_seconds", ())], 42.5)
        self.assertEqual(m[("llm_proxy_in_flight_requests", ())], 1)
        self.assertEqual(m[("llm_proxy_requests_total", ())], snap["requests"])
        self.assertEqual(m[("llm_proxy_completions_total", ())], snap["completions"])
        self.assertEqual(m[("llm_proxy_errors_total", ())], snap["errors"])
        self.assertEqual(m[("llm_proxy_response_bytes_total", ())], snap["bytes"])
        for field, label in (("prompt", "prompt"), ("completion", "completion"),
                             ("cacheRead", "cache_read"), ("cacheWrite", "cache_write"),
                             ("reasoning", "reasoning")):
            self.assertEqual(m[("llm_proxy_tokens_total", (("type", label),))],
                             snap["tokens"][field])
        for source, n in snap["usageReports"].items():
            self.assertEqual(m[("llm_proxy_usage_reports_total", (("source", source),))], n)
        for model, e in snap["byModel"].items():
            self.assertEqual(m[("llm_proxy_model_requests_total", (("model", model),))], e["requests"])
            self.assertEqual(m[("llm_proxy_model_errors_total", (("model", model),))], e["errors"])
            self.assertEqual(m[("llm_proxy_model_tokens_total",
                                (("model", model), ("type", "completion")))], e["completion"])
        for path, e in snap["byEndpoint"].items():
            self.assertEqual(m[("llm_proxy_endpoint_requests_total", (("endpoint", path),))],
                             e["requests"])
        for client, e in snap["byClient"].items():
            self.assertEqual(m[("llm_proxy_client_requests_total", (("client", client),))],
                             e["requests"])
        # Duration histogram: 7 observations; durations 6/25/45/60 ms, 1.1/3.3/30 s.
        dur = "llm_proxy_request_duration_seconds"
        self.assertEqual(fams[dur]["type"], "histogram")
        self.assertEqual(m[(dur + "_count", ())], 7)
        self.assertAlmostEqual(m[(dur + "_sum", ())], 34.536, places=6)
        self.assertEqual(m[(dur + "_bucket", (("le", "0.05"),))], 3)
        self.assertEqual(m[(dur + "_bucket", (("le", "0.1"),))], 4)
        self.assertEqual(m[(dur + "_bucket", (("le", "2.5"),))], 5)
        self.assertEqual(m[(dur + "_bucket", (("le", "5.0"),))], 6)
        self.assertEqual(m[(dur + "_bucket", (("le", "30.0"),))], 7)
        self.assertEqual(m[(dur + "_bucket", (("le", "+Inf"),))], 7)
        ttfb = "llm_proxy_time_to_first_byte_seconds"
        self.assertEqual(m[(ttfb + "_count", ())], 6)  # g had no ttfb

    def test_escaping(self):
        store = proxy.StatsStore(clock=self.clock)
        nasty = 'we"ird\\mo\ndel'
        store.record(rec(model=nasty, path='/a"b\\c'))
        text = proxy.render_metrics(store)
        self.assertIn('model="we\\"ird\\\\mo\\ndel"', text)
        m = sample_map(parse_prometheus_text(text))
        self.assertEqual(m[("llm_proxy_model_requests_total", (("model", nasty),))], 1)
        self.assertEqual(m[("llm_proxy_endpoint_requests_total", (("endpoint", '/a"b\\c'),))], 1)
        self.assertEqual(proxy._prom_escape_help('a\\b\nc"d'), 'a\\\\b\\nc"d')

    def test_empty_store_parses(self):
        fams = parse_prometheus_text(proxy.render_metrics(proxy.StatsStore()))
        self.assertEqual(fams["llm_proxy_model_requests_total"]["samples"], [])
        self.assertEqual(sample_map(fams)[("llm_proxy_requests_total", ())], 0)

    def test_capped_labels(self):
        store = proxy.StatsStore(clock=self.clock, max_keys=5)
        for i in range(100):
            store.record(rec(model="m%d" % i, path="/p%d" % i, client="10.1.0.%d" % i))
        fams = parse_prometheus_text(proxy.render_metrics(store))
        for name in ("llm_proxy_model_requests_total", "llm_proxy_endpoint_requests_total",
                     "llm_proxy_client_requests_total"):
            self.assertEqual(len(fams[name]["samples"]), 5)
            self.assertEqual(sum(v for _, _, v in fams[name]["samples"]), 100)

    def test_prometheus_client_parser(self):
        try:
            from prometheus_client.parser import text_string_to_metric_families
        except ImportError:
            self.skipTest("prometheus_client not installed")
        self.store.record(rec(model='x"y\\z\nw'))
        text = proxy.render_metrics(self.store)
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        # prometheus_client drops the _total suffix from counter family names.
        self.assertEqual(fams["llm_proxy_requests"].type, "counter")
        self.assertEqual(fams["llm_proxy_requests"].samples[0].value, 8)
        hist = fams["llm_proxy_request_duration_seconds"]
        self.assertEqual(hist.type, "histogram")
        count = [s.value for s in hist.samples if s.name.endswith("_count")]
        self.assertEqual(count, [8])
        models = {s.labels["model"] for s in fams["llm_proxy_model_requests"].samples}
        self.assertIn('x"y\\z\nw', models)


if __name__ == "__main__":
    unittest.main()
