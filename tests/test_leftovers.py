"""Four gaps the last closing note left open, each tried as a user and as a hostile local user:
stats.json opened like the pidfile and log (a FIFO or symlink there no longer hangs or is
followed), stale temp files beside the certificates cleaned at start, a stats file missing a
field every version writes moved aside instead of loaded half-empty, and the usage readers'
failure counts in /_proxy/stats and /_proxy/metrics."""

from support import FakeLLM, https, proxy, start_proxy, start_upstream, wait_until
from test_service import ServiceTestCase, _read
from test_stats import parse_prometheus_text, sample_map

import json
import logging
import os
import shutil
import signal
import stat
import tempfile
import threading
import unittest
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
FIXTURE = os.path.join(DATA, "stats-main-before-issue13.json")
# The fixtures were written at this fake time (2026-09-02T05:00:00Z).
WRITTEN_AT = 86400 * 20698 + 5 * 3600


def _tmpdir(test):
    directory = tempfile.mkdtemp(prefix="llm-proxy-leftovers-")
    test.addCleanup(shutil.rmtree, directory, True)
    return directory


def _set_aside(directory):
    return sorted(n for n in os.listdir(directory) if ".corrupt-" in n)


# -- 1. stats.json is opened as the pidfile and the log are ---------------------------------------

class StatsFileNotRegularTests(unittest.TestCase):
    """A FIFO, a symlink or a device at the stats path: the start goes on, nothing is lost.

    Chosen: anything but a regular file is moved aside like a corrupt file (the FIFO, device
    node or link itself, renamed; what a link points to is never read or touched), with a
    warning that says what it is; then the proxy saves a fresh stats.json there. A symlink is
    not followed, as for the pidfile and the log; the warning says how to keep stats elsewhere.
    """

    def setUp(self):
        self.dir = _tmpdir(self)
        self.path = os.path.join(self.dir, "stats.json")

    def load(self, store):
        """store.load() in a thread; fails (instead of hanging the suite) if it blocks."""
        result = {}
        thread = threading.Thread(target=lambda: result.update(loaded=store.load()), daemon=True)
        with self.assertLogs("llm-proxy", level="WARNING") as logs:
            thread.start()
            thread.join(10)
            if thread.is_alive():
                self._unblock()
                thread.join(10)
                self.fail("StatsStore.load() hangs on what is at the stats path")
        self.assertFalse(result["loaded"])
        return "\n".join(logs.output)

    def _unblock(self):
        # A reader stuck in open() of a FIFO returns once a writer opens it.
        for name in os.listdir(self.dir):
            full = os.path.join(self.dir, name)
            try:
                os.close(os.open(full, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    def assert_saves_a_regular_file(self, store):
        store.reset()
        self.assertTrue(store.save())
        self.assertTrue(stat.S_ISREG(os.lstat(self.path).st_mode))

    def test_a_fifo_is_moved_aside_and_the_start_goes_on(self):
        os.mkfifo(self.path)
        store = proxy.StatsStore(path=self.path)
        warning = self.load(store)
        self.assertIn("is not a regular file (a FIFO, socket or device)", warning)
        moved = _set_aside(self.dir)
        self.assertEqual(len(moved), 1, moved)
        self.assertIn(moved[0], warning)
        self.assertTrue(stat.S_ISFIFO(os.lstat(os.path.join(self.dir, moved[0])).st_mode))
        self.assert_saves_a_regular_file(store)

    def test_a_symlink_to_a_fifo_is_not_followed(self):
        elsewhere = _tmpdir(self)
        fifo = os.path.join(elsewhere, "fifo")
        os.mkfifo(fifo)
        os.symlink(fifo, self.path)
        store = proxy.StatsStore(path=self.path)
        warning = self.load(store)
        self.assertIn("is a symbolic link, which is not followed", warning)
        moved = _set_aside(self.dir)
        self.assertEqual(os.readlink(os.path.join(self.dir, moved[0])), fifo)   # the link, kept
        self.assertTrue(stat.S_ISFIFO(os.lstat(fifo).st_mode))
        self.assert_saves_a_regular_file(store)

    def test_a_symlink_to_a_stats_file_is_not_followed_and_its_target_is_untouched(self):
        # Saving always replaced such a link with a regular file, leaving the target behind
        # with old numbers; now the start says so, and where to point tracking.statsFile.
        target = os.path.join(_tmpdir(self), "real-stats.json")
        shutil.copy(FIXTURE, target)
        with open(target, "rb") as handle:
            before = handle.read()
        os.symlink(target, self.path)
        store = proxy.StatsStore(path=self.path, clock=lambda: WRITTEN_AT)
        warning = self.load(store)
        self.assertIn("symbolic link", warning)
        self.assertIn("set tracking.statsFile", warning)
        self.assertEqual(store.snapshot()["requests"], 0)
        self.assert_saves_a_regular_file(store)
        with open(target, "rb") as handle:
            self.assertEqual(handle.read(), before)
        self.assertEqual(os.readlink(os.path.join(self.dir, _set_aside(self.dir)[0])), target)

    def test_a_symlink_to_a_device_is_not_followed(self):
        os.symlink("/dev/zero", self.path)
        warning = self.load(proxy.StatsStore(path=self.path))
        self.assertIn("symbolic link", warning)

    @unittest.skipUnless(hasattr(os, "geteuid") and os.geteuid() == 0, "mknod needs root")
    def test_a_device_node_is_moved_aside(self):
        os.mknod(self.path, stat.S_IFCHR | 0o600, os.makedev(1, 3))     # /dev/null's numbers
        warning = self.load(proxy.StatsStore(path=self.path))
        self.assertIn("is not a regular file", warning)
        self.assertTrue(stat.S_ISCHR(os.lstat(os.path.join(self.dir,
                                                           _set_aside(self.dir)[0])).st_mode))

    def test_a_hard_linked_stats_file_still_loads(self):
        # A backup made with `cp -al` leaves stats.json with two names: reading it is harmless
        # and save() replaces the name, so the backup's copy is never written into.
        backup = os.path.join(_tmpdir(self), "stats.json")
        shutil.copy(FIXTURE, backup)
        os.link(backup, self.path)
        with open(backup, "rb") as handle:
            before = handle.read()
        store = proxy.StatsStore(path=self.path, clock=lambda: WRITTEN_AT)
        self.assertTrue(store.load())
        store.record_refusal(None)
        self.assertTrue(store.save())
        with open(backup, "rb") as handle:
            self.assertEqual(handle.read(), before)

    def test_reading_stats_json_changes_nothing_about_it(self):
        # Only files the proxy writes into are narrowed to 0644 on open: a stats file is only
        # read (a filesystem that refuses chmod must not get it moved aside at every start).
        shutil.copy(FIXTURE, self.path)
        os.chmod(self.path, 0o666)
        store = proxy.StatsStore(path=self.path, clock=lambda: WRITTEN_AT)
        with mock.patch.object(proxy.os, "fchmod", side_effect=PermissionError(1, "refused")):
            self.assertTrue(store.load())
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o666)

    def test_a_folder_at_the_stats_path_is_still_left_alone(self):
        os.mkdir(self.path)
        store = proxy.StatsStore(path=self.path)
        self.assertIn("is a directory; not saving stats", self.load(store))
        self.assertTrue(os.path.isdir(self.path))
        self.assertEqual(_set_aside(self.dir), [])


class StatsFileNotRegularProcessTests(ServiceTestCase):
    """As a user: `python3 proxy.py` with a FIFO planted at its stats path starts and serves."""

    def test_a_fifo_at_the_stats_path_does_not_hang_the_start(self):
        work = self.mkdir("work")
        self.copy_test_certs(os.path.join(work, "certs"))
        config = self.loopback_config(work)
        stats_file = os.path.join(work, "stats.json")
        os.mkfifo(stats_file)
        self.addCleanup(self._open_fifo_for_writing, stats_file)
        child, port, err_path = self.start_proxy(["--config", config], cwd=work)
        self.get_tags(port)
        code, _ = self.signal_and_wait(child, signal.SIGTERM)
        self.assertEqual(code, 0)
        err = _read(err_path)
        self.assertIn("is not a regular file (a FIFO, socket or device); moved it to", err)
        self.assert_no_traceback(err)
        self.assert_stats_requests(stats_file, 1)
        moved = _set_aside(work)
        self.assertTrue(stat.S_ISFIFO(os.lstat(os.path.join(work, moved[0])).st_mode))

    def test_list_keys_does_not_hang_on_a_fifo_either(self):
        work = self.mkdir("work")
        settings = {"access": {"keys": {"alice": "sk-test-0123456789abcdef"}},
                    "tracking": {"statsFile": "stats.json"}}
        config = self.write_config(work, settings)
        stats_file = os.path.join(work, "stats.json")
        os.mkfifo(stats_file)
        self.addCleanup(self._open_fifo_for_writing, stats_file)
        out = self.run_proxy(["--config", config, "--list-keys"], cwd=work, timeout=20)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("alice", out.stdout)
        self.assertTrue(stat.S_ISFIFO(os.lstat(stats_file).st_mode), "--list-keys moves nothing")

    @staticmethod
    def _open_fifo_for_writing(path):
        # Releases a process stuck opening the FIFO (the old code), so cleanup can kill it.
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


# -- 2. stale temp files beside the certificates ---------------------------------------------------

def _interrupted_write(path, data=b"-----BEGIN PRIVATE KEY-----\nhalf"):
    """What a kill between write and rename leaves beside `path`: _write_file_atomic()'s own
    temp file (so the test follows the writer's naming, whatever it is). Returns its path."""
    directory = os.path.dirname(path)
    before = set(os.listdir(directory))

    def killed(src, dst):
        raise KeyboardInterrupt
    with mock.patch.object(proxy.os, "replace", killed), \
            mock.patch.object(proxy.os, "unlink", side_effect=OSError("killed first")):
        with unittest.TestCase().assertRaises(KeyboardInterrupt):
            proxy._write_file_atomic(path, data, private=True)
    (name,) = set(os.listdir(directory)) - before
    return os.path.join(directory, name)


class CertificateTempFileTests(unittest.TestCase):
    """At start, what an interrupted certificate write left is removed, as for stats.json:
    only our own temp names, regular files we own; never a symlink, folder or other name."""

    def setUp(self):
        from support import certs_dir
        self.dir = os.path.join(_tmpdir(self), "certs")
        shutil.copytree(certs_dir(), self.dir)
        self.cert = os.path.join(self.dir, "cert.pem")
        self.key = os.path.join(self.dir, "key.pem")

    def plant(self):
        """Leftovers of killed writes of every file, and things that only look like them."""
        leftovers = [_interrupted_write(os.path.join(self.dir, name))
                     for name in ("key.pem", "cert.pem", "combined.pem", "ca.pem", "ca-key.pem")]
        secret = os.path.join(_tmpdir(self), "secret")
        with open(secret, "w") as handle:
            handle.write("not the proxy's")
        decoys = {".key.pem.abcdefgh.tmp": "symlink", ".cert.pem.zzzzzzzz.tmp": "folder",
                  ".cert.pem.backup.tmp": "", ".key.pem.abcdefgh.tmp.orig": "",
                  "key.pem.abcdefgh.tmp": "", ".notes.txt.abcdefgh.tmp": "",
                  ".ca.pem.ABCDEFGH.tmp": ""}
        for name, kind in decoys.items():
            full = os.path.join(self.dir, name)
            if kind == "symlink":
                os.symlink(secret, full)
            elif kind == "folder":
                os.mkdir(full)
            else:
                open(full, "w").close()
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            foreign = os.path.join(self.dir, ".ca.pem.abcd1234.tmp")   # our name, not our file
            open(foreign, "w").close()
            os.chown(foreign, 12345, 12345)
            decoys[os.path.basename(foreign)] = "foreign"
        return leftovers, sorted(decoys), secret

    def test_a_start_removes_only_our_leftovers(self):
        leftovers, decoys, secret = self.plant()
        proxy.ensure_certificates(self.cert, self.key, dry_run=True)    # --check writes nothing
        for path in leftovers:
            self.assertTrue(os.path.exists(path), "--check removed %s" % path)
        with self.assertLogs("llm-proxy", level="INFO") as logs:
            status = proxy.ensure_certificates(self.cert, self.key)
        self.assertEqual(status.action, "kept")
        left = sorted(n for n in os.listdir(self.dir) if "tmp" in n)
        self.assertEqual(left, decoys)
        self.assertTrue(os.path.islink(os.path.join(self.dir, ".key.pem.abcdefgh.tmp")))
        with open(secret) as handle:
            self.assertEqual(handle.read(), "not the proxy's")
        said = "\n".join(logs.output)
        for path in leftovers:
            self.assertIn("removed %s, left by an interrupted write" % path, said)


class CertificateTempFileProcessTests(ServiceTestCase):
    """As a user: the next `python3 proxy.py` after a crash mid-write leaves no key copy behind."""

    def test_the_next_start_cleans_the_certs_folder(self):
        work = self.mkdir("work")
        certs = self.copy_test_certs(os.path.join(work, "certs"))
        config = self.loopback_config(work)
        key_copy = _interrupted_write(os.path.join(certs, "ca-key.pem"))
        other = os.path.join(certs, ".ca-key.pem.old.tmp")
        open(other, "w").close()
        check = self.run_proxy(["--config", config, "--check"], cwd=work)
        self.assertTrue(os.path.exists(key_copy), check.stdout + check.stderr)
        child, port, err_path = self.start_proxy(["--config", config], cwd=work)
        self.get_tags(port)
        self.assertFalse(os.path.exists(key_copy))
        self.assertTrue(os.path.exists(other))
        self.assertIn("removed %s, left by an interrupted write" % key_copy, _read(err_path))
        self.assertEqual(self.signal_and_wait(child, signal.SIGTERM)[0], 0)


# -- 3. a stats file missing a field every version writes -------------------------------------------

class MissingStatsFieldTests(unittest.TestCase):
    """Chosen: a stats file that lacks a field every version writes is damaged or not ours, so
    it is moved aside with the corrupt-file warning (naming the field) and its bytes are kept;
    before, it loaded with that field at zero and the next save wrote the zero over the user's
    count. Fields a later version added (byKey, refused, keyDays, usageReaderFailures) and
    null-able ones may be missing: the earlier releases' files in tests/data still load."""

    def load_without(self, *where):
        with open(FIXTURE) as handle:
            doc = json.load(handle)
        target = doc
        for step in where[:-1]:
            target = target[step]
        del target[where[-1]]
        directory = _tmpdir(self)
        path = os.path.join(directory, "stats.json")
        data = json.dumps(doc).encode()
        with open(path, "wb") as handle:
            handle.write(data)
        store = proxy.StatsStore(path=path, clock=lambda: WRITTEN_AT)
        return store, directory, data

    def test_a_missing_core_field_moves_the_file_aside_and_loses_nothing(self):
        cases = [(("requests",), "file.requests"),
                 (("tokens", "prompt"), "file.tokens.prompt"),
                 (("usageReports", "missing"), "file.usageReports.missing"),
                 (("byModel", "qwen3:8b", "errors"), "file.byModel['qwen3:8b'].errors"),
                 (("byKey", "alice", "refused"), "file.byKey['alice'].refused"),
                 (("keyDays", "alice", "tokens"), "file.keyDays['alice'].tokens"),
                 (("recent", 0, "status"), "file.recent[0].status"),
                 (("hourly", 0, "total"), "file.hourly[0].total"),
                 (("histograms", "ttfb", "sum"), "file.histograms.ttfb.sum"),
                 (("histograms", "duration"), "file.histograms.duration"),
                 (("since",), "file.since")]
        for where, named in cases:
            with self.subTest(named):
                store, directory, data = self.load_without(*where)
                with self.assertLogs("llm-proxy", level="WARNING") as logs:
                    self.assertFalse(store.load())
                self.assertIn("%s: missing; moved it to" % named, "\n".join(logs.output))
                moved = _set_aside(directory)
                self.assertEqual(len(moved), 1, moved)
                with open(os.path.join(directory, moved[0]), "rb") as handle:
                    self.assertEqual(handle.read(), data)           # nothing lost
                self.assertEqual(store.snapshot()["requests"], 0)

    def test_added_and_null_able_fields_may_be_missing(self):
        for where in (("byKey",), ("refused",), ("keyDays",), ("savedAt",), ("version",),
                      ("recent", 0, "model"), ("recent", 0, "ttfbMs"), ("recent", 0, "usage"),
                      ("byKey", "alice", "lastUsed")):
            with self.subTest(where):
                store, directory, _ = self.load_without(*where)
                self.assertTrue(store.load())
                self.assertEqual(_set_aside(directory), [])
                self.assertGreater(store.snapshot()["requests"], 0)

    def test_the_earlier_releases_files_load(self):
        for name in ("stats-previous-release.json", "stats-main-before-issue13.json"):
            with self.subTest(name):
                path = os.path.join(_tmpdir(self), "stats.json")
                shutil.copy(os.path.join(DATA, name), path)
                self.assertTrue(proxy.StatsStore(path=path, clock=lambda: WRITTEN_AT).load())


# -- 4. the usage readers' failure counts in /_proxy/stats and /_proxy/metrics ---------------------

class ReaderFailureReportTests(unittest.TestCase):
    """Chosen: usageReaderFailures (per API format) is a stats counter like the others: in
    /_proxy/stats, in /_proxy/metrics as llm_proxy_usage_reader_failures_total{format}, saved in
    stats.json (only once there is one), zeroed by a reset. Every format read shows, at 0."""

    def broken_reader(self, kind):
        def extract(found, obj, event):
            raise KeyError("a shape the reader did not expect")
        return mock.patch.dict(proxy._API_FORMAT_BY_KIND,
                               {kind: proxy.api_format(kind)._replace(extract=extract)})

    def get(self, server, path, method="GET"):
        conn = https(server)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        self.assertEqual(response.status, 200, body[:300])
        return body

    def chat(self, server, stream):
        conn = https(server)
        body = json.dumps({"model": "qwen3:8b", "stream": stream,
                           "messages": [{"role": "user", "content": "hello there"}]})
        try:
            conn.request("POST", "/v1/chat/completions", body,
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
        finally:
            conn.close()
        self.assertEqual(response.status, 200)

    def test_failures_are_in_stats_metrics_and_stats_json(self):
        upstream = start_upstream(self, FakeLLM())
        server = start_proxy(self, upstream.port)
        fresh = json.loads(self.get(server, "/_proxy/stats"))["usageReaderFailures"]
        kinds = [f.kind for f in proxy.API_FORMATS if f.usage]
        self.assertEqual(fresh, dict.fromkeys(kinds, 0))
        with self.broken_reader("openai_chat"), self.assertLogs("llm-proxy", level="WARNING"):
            self.chat(server, stream=False)
            self.chat(server, stream=True)
            self.assertTrue(wait_until(lambda: server.stats.snapshot()["requests"] == 2))
        stats = json.loads(self.get(server, "/_proxy/stats"))
        self.assertEqual(stats["usageReaderFailures"], dict(fresh, openai_chat=2))
        self.assertEqual(stats["usageReports"]["missing"], 2)
        samples = sample_map(parse_prometheus_text(
            self.get(server, "/_proxy/metrics").decode("utf-8")))
        name = "llm_proxy_usage_reader_failures_total"
        self.assertEqual(samples[(name, (("format", "openai_chat"),))], 2)
        self.assertEqual(samples[(name, (("format", "ollama_chat"),))], 0)
        # Saved and loaded like every counter; a reset zeroes it.
        self.assertTrue(server.stats.save())
        with open(server.stats.path) as handle:
            self.assertEqual(json.load(handle)["usageReaderFailures"], {"openai_chat": 2})
        again = proxy.StatsStore(path=server.stats.path)
        self.assertTrue(again.load())
        self.assertEqual(again.snapshot()["usageReaderFailures"]["openai_chat"], 2)
        self.get(server, "/_proxy/reset", "POST")
        self.assertEqual(json.loads(self.get(server, "/_proxy/stats"))["usageReaderFailures"],
                         fresh)

    def test_without_failures_stats_json_is_what_earlier_versions_wrote(self):
        path = os.path.join(_tmpdir(self), "stats.json")
        store = proxy.StatsStore(path=path)
        store.reset()
        self.assertTrue(store.save())
        with open(path) as handle:
            self.assertNotIn("usageReaderFailures", json.load(handle))

    def test_a_damaged_count_in_the_file_is_named(self):
        with open(FIXTURE) as handle:
            doc = json.load(handle)
        doc["usageReaderFailures"] = {"openai_chat": -1}
        path = os.path.join(_tmpdir(self), "stats.json")
        with open(path, "w") as handle:
            json.dump(doc, handle)
        with self.assertLogs("llm-proxy", level="WARNING") as logs:
            self.assertFalse(proxy.StatsStore(path=path, clock=lambda: WRITTEN_AT).load())
        self.assertIn("file.usageReaderFailures['openai_chat']", "\n".join(logs.output))

    def test_readme_names_the_field_and_the_metric(self):
        with open(os.path.join(os.path.dirname(HERE), "README.md"), encoding="utf-8") as handle:
            readme = handle.read()
        for name in ("`usageReaderFailures`", "llm_proxy_usage_reader_failures_total"):
            self.assertTrue(name in readme, "README.md does not name %s" % name)
