"""Issue 13 items 3, 4 and 7 (part): the request record handed to stats, the stats document
(whose JSON is stats.json, loaded in one walk), and the one atomic writer."""

from support import proxy, FakeLLM, https, start_proxy, start_upstream, wait_until

import dataclasses
import json
import os
import shutil
import stat
import tempfile
import unittest
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))


def _tmpdir(test):
    directory = tempfile.mkdtemp(prefix="llm-proxy-statsdoc-")
    test.addCleanup(shutil.rmtree, directory, True)
    return directory


class TestOneAtomicWriter(unittest.TestCase):
    """Certificates, stats.json and the --add-key config writer share _write_file_atomic()."""

    def test_stats_save_goes_through_the_one_writer(self):
        path = os.path.join(_tmpdir(self), "stats.json")
        store = proxy.StatsStore(path=path)
        store.reset()                                  # something to save
        real = proxy._write_file_atomic
        with mock.patch.object(proxy, "_write_file_atomic", side_effect=real) as writer:
            self.assertTrue(store.save())
        writer.assert_called_once()
        self.assertEqual(writer.call_args[0][0], path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o644)
        self.assertFalse(hasattr(proxy, "_stats_atomic_write"))

    def test_stats_save_does_not_create_a_missing_folder(self):
        # A wrong stats path is reported (lastError), not silently created.
        path = os.path.join(_tmpdir(self), "missing", "stats.json")
        store = proxy.StatsStore(path=path)
        store.reset()
        self.assertFalse(store.save())
        self.assertFalse(os.path.exists(os.path.dirname(path)))
        self.assertIn("cannot save stats", store.snapshot()["persistence"]["lastError"])

    def test_a_filesystem_that_refuses_modes_still_saves_stats(self):
        # As _stats_atomic_write did: widening to 0644 is best effort; the file stays 0600.
        path = os.path.join(_tmpdir(self), "stats.json")
        store = proxy.StatsStore(path=path)
        store.reset()
        with mock.patch.object(proxy.os, "fchmod", side_effect=PermissionError(1, "refused")):
            self.assertTrue(store.save())
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_add_key_config_goes_through_the_one_writer(self):
        config = os.path.join(_tmpdir(self), "config.json")
        real = proxy._write_file_atomic
        with mock.patch.object(proxy, "_write_file_atomic", side_effect=real) as writer:
            proxy._write_config_document(config, {"access": {"keys": {}}})
        self.assertEqual(writer.call_args[0][0], config)
        self.assertTrue(writer.call_args[1]["private"])
        self.assertEqual(stat.S_IMODE(os.stat(config).st_mode), 0o600)

    def test_stale_temp_files_use_the_writers_naming(self):
        # The clean-up removes exactly what an interrupted _write_file_atomic() leaves.
        directory = _tmpdir(self)
        path = os.path.join(directory, "cert.pem")
        real_replace = os.replace

        def killed(src, dst):
            raise KeyboardInterrupt         # stands for a kill between write and rename
        with mock.patch.object(proxy.os, "replace", killed), \
                mock.patch.object(proxy.os, "unlink", side_effect=OSError("gone")):
            with self.assertRaises(KeyboardInterrupt):
                proxy._write_file_atomic(path, b"pem", private=False)
        left = [n for n in os.listdir(directory) if n.endswith(".tmp")]
        self.assertEqual(len(left), 1, left)
        other = os.path.join(directory, ".key.pem.abc.tmp")
        open(other, "w").close()
        proxy.remove_stale_temp_files(path)
        self.assertEqual(sorted(os.listdir(directory)), [".key.pem.abc.tmp"])
        self.assertIs(os.replace, real_replace)


class TestRequestRecord(unittest.TestCase):
    """Item 3: the HTTP layer hands stats a typed RequestRecord; values are made safe once, there."""

    def test_every_field_is_documented_by_a_comment(self):
        import inspect
        source = inspect.getsource(proxy.RequestRecord).splitlines()
        for f in dataclasses.fields(proxy.RequestRecord):
            line = next(i for i, text in enumerate(source)
                        if text.strip().startswith(f.name + ":"))
            self.assertTrue(source[line - 1].strip().startswith("#"), f.name)

    def test_values_are_made_safe_when_built(self):
        r = proxy.RequestRecord(time=float("nan"), method="X" * 40, path="/p" + "a" * 500,
                                status=True, model="bad\ud800", usage={"prompt": 10 ** 5000,
                                "completion": 7, "total": -1}, usage_source="made-up",
                                ttfb_ms=float("inf"), duration_ms=-3, bytes=2.5e300, key="")
        self.assertIsNone(r.time)
        self.assertEqual(len(r.method), 16)
        self.assertLessEqual(len(r.path), 200)
        self.assertEqual(r.status, 0)
        self.assertEqual(r.model, "bad?")
        self.assertEqual(r.usage, {"prompt": 0, "completion": 7, "total": 7, "cacheRead": 0,
                                   "cacheWrite": 0, "reasoning": 0})
        self.assertIsNone(r.usage_source)
        self.assertIsNone(r.ttfb_ms)
        self.assertIsNone(r.duration_ms)
        self.assertEqual(r.bytes, 0)
        self.assertIsNone(r.key)

    def test_the_http_layer_hands_over_a_request_record(self):
        llm = FakeLLM()
        upstream = start_upstream(self, llm)
        server = start_proxy(self, upstream.port)
        handed = []
        real = server.stats.record
        server.stats.record = lambda rec: (handed.append(rec), real(rec))
        conn = https(server)
        body = json.dumps({"model": "qwen3:8b", "messages": [{"role": "user", "content": "hi"}]})
        conn.request("POST", "/v1/chat/completions?secret=1", body,
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        conn.close()
        self.assertEqual(response.status, 200)
        self.assertTrue(wait_until(lambda: handed))
        rec = handed[0]
        self.assertIsInstance(rec, proxy.RequestRecord)
        self.assertEqual((rec.method, rec.path, rec.status, rec.completion, rec.client),
                         ("POST", "/v1/chat/completions", 200, True, "127.0.0.1"))
        self.assertEqual(rec.usage_source, "reported")
        self.assertGreater(rec.usage["total"], 0)
        self.assertGreater(rec.bytes, 0)


DATA = os.path.join(HERE, "data")
# Both files were written at this fake time (2026-09-02T05:00:00Z).
WRITTEN_AT = 86400 * 20698 + 5 * 3600


class TestStatsDocument(unittest.TestCase):
    """Item 4: the store holds one document whose JSON is stats.json, loaded in one walk."""

    def load(self, name):
        directory = _tmpdir(self)
        path = os.path.join(directory, "stats.json")
        shutil.copy(os.path.join(DATA, name), path)
        with open(path) as handle:
            original = json.load(handle)
        store = proxy.StatsStore(path=path, clock=lambda: WRITTEN_AT, version="now")
        self.assertTrue(store.load())
        return store, original, path

    def test_a_file_of_the_previous_release_loads(self):
        # tests/data/stats-previous-release.json: written by `git show 6deee52:proxy.py` (the
        # release before access keys), so it has no byKey, refused or keyDays.
        store, original, path = self.load("stats-previous-release.json")
        for key in ("byKey", "refused", "keyDays"):
            self.assertNotIn(key, original)
        snap = store.snapshot()
        self.assertEqual((snap["requests"], snap["completions"], snap["errors"], snap["bytes"]),
                         (3, 1, 1, 1280))
        self.assertEqual(snap["tokens"]["total"], 150)
        self.assertEqual(snap["usageReports"], {"reported": 1, "injected": 0, "missing": 1})
        self.assertEqual(snap["byModel"]["qwen3:8b"]["tokensPerSecond"], 51.0)
        self.assertEqual(snap["byModel"]["qwen3:8b"]["avgTtfbMs"], 120.0)
        self.assertEqual([r["path"] for r in snap["recent"]],
                         ["/v1/models", "/v1/messages", "/v1/chat/completions"])
        self.assertNotIn("key", snap["recent"][0])
        self.assertEqual((snap["byKey"], snap["refused"]), ({}, 0))
        self.assertEqual(sum(b["requests"] for b in snap["hourly"]), 3)
        self.assertEqual(snap["persistence"]["lastSaved"], "2026-09-02T05:00:00Z")
        metrics = proxy.render_metrics(store)
        self.assertIn("llm_proxy_requests_total 3", metrics)
        self.assertIn("llm_proxy_request_duration_seconds_count 3", metrics)
        # Saved again, it is the same document plus the access-key fields.
        store.record_refusal(None)
        self.assertTrue(store.save())
        with open(path) as handle:
            again = json.load(handle)
        self.assertEqual(again["refused"], 1)
        for key in ("version", "savedAt", "byKey", "refused", "keyDays"):
            again.pop(key)
            original.pop(key, None)
        self.assertEqual(again, original)

    def test_a_file_of_main_before_this_change_round_trips(self):
        # tests/data/stats-main-before-issue13.json: written by main's StatsStore just before
        # this change, with access keys (byKey, refused, keyDays, recent[].key).
        store, original, path = self.load("stats-main-before-issue13.json")
        snap = store.snapshot()
        self.assertEqual(snap["byKey"]["alice"]["refused"], 1)
        self.assertEqual(snap["byKey"]["(no valid key)"]["refused"], 1)
        self.assertEqual(snap["refused"], 2)
        self.assertEqual(snap["recent"][-1]["key"], "alice")
        store.record_refusal(None)
        self.assertTrue(store.save())
        with open(path) as handle:
            again = json.load(handle)
        self.assertEqual(again["refused"], 3)
        self.assertEqual(again["byKey"]["(no valid key)"]["refused"], 2)
        today = proxy._stats_local_day(WRITTEN_AT)
        original["keyDays"] = {k: d for k, d in original["keyDays"].items() if d["day"] == today}
        for doc in (again, original):
            for key in ("version", "savedAt", "refused"):
                doc.pop(key)
            doc["byKey"].pop("(no valid key)")
        self.assertEqual(again, original)
        self.assertEqual(list(again), list(original))          # same key order too

    def test_the_document_is_the_file(self):
        # What the store holds is what stats.json holds: the file has exactly the empty
        # document's keys, and a fresh store saves the empty document.
        path = os.path.join(_tmpdir(self), "stats.json")
        store = proxy.StatsStore(path=path, clock=lambda: WRITTEN_AT, version="now")
        store.reset()
        self.assertTrue(store.save())
        with open(path) as handle:
            saved = json.load(handle)
        empty = proxy._stats_empty_document(WRITTEN_AT, "now")
        empty["savedAt"] = WRITTEN_AT
        self.assertEqual(saved, empty)

    def test_one_bad_field_anywhere_names_itself_and_moves_the_file_aside(self):
        with open(os.path.join(DATA, "stats-main-before-issue13.json")) as handle:
            good = json.load(handle)
        cases = [
            (("byKey", "alice", "lastUsed"), "yesterday", "byKey['alice'].lastUsed"),
            (("keyDays", "alice", "day"), "02/09/2026", "keyDays['alice'].day"),
            (("recent", 0, "usage"), "guessed", "recent[0].usage"),
            (("recent", 1, "error"), 0, "recent[1].error"),
            (("histograms", "ttfb", "counts"), [1, 2], "histograms.ttfb"),
            (("hourly", 0, "start"), -1, "hourly[0].start"),
            (("since",), float("inf"), "file.since"),
        ]
        for where, value, named in cases:
            with self.subTest(named):
                doc = json.loads(json.dumps(good))
                target = doc
                for step in where[:-1]:
                    target = target[step]
                target[where[-1]] = value
                directory = _tmpdir(self)
                path = os.path.join(directory, "stats.json")
                with open(path, "w") as handle:
                    json.dump(doc, handle)
                store = proxy.StatsStore(path=path, clock=lambda: WRITTEN_AT)
                with self.assertLogs("llm-proxy", level="WARNING") as logs:
                    self.assertFalse(store.load())
                self.assertIn(named, "\n".join(logs.output))
                self.assertEqual(len([n for n in os.listdir(directory) if ".corrupt-" in n]), 1)
                self.assertEqual(store.snapshot()["requests"], 0)

    def test_the_old_parser_and_its_helpers_are_gone(self):
        for name in ("_stats_parse_file", "_statsfile_int", "_statsfile_histogram"):
            self.assertFalse(hasattr(proxy, name), name)


if __name__ == "__main__":
    unittest.main()
