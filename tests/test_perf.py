"""Issue 16 (performance): `python3 proxy.py` re-runs itself from its bytecode cache.

A script's parse tree stays in memory while the script runs, and proxy.py's runs for months; so a
script start hands over (os.execv, same pid) to an interpreter that loads the file's
__pycache__ entry. These tests start a copy of proxy.py in a temporary folder (its cache lands
there) with bytecode caches allowed, as on a user's machine; the rest of the suite runs with
PYTHONDONTWRITEBYTECODE=1 and so exercises the plain script start.
"""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import unittest

from support import ROOT
from test_service import ServiceTestCase, _read

HAS_RERUN = hasattr(sys, "orig_argv") and os.name == "posix"


def _cmdline(pid: int) -> list:
    with open("/proc/%d/cmdline" % pid, "rb") as handle:
        return handle.read().decode("utf-8", "replace").split("\0")[:-1]


def _vmrss_mib(pid: int) -> float:
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS for pid %d" % pid)


@unittest.skipUnless(HAS_RERUN and os.path.exists("/proc/self/cmdline"),
                     "the re-run needs sys.orig_argv (3.10+), POSIX, and /proc to observe it")
class RerunFromCacheTests(ServiceTestCase):

    def setUp(self):
        super().setUp()
        self.app = self.mkdir("app")
        self.script = os.path.join(self.app, "proxy.py")
        shutil.copy(os.path.join(ROOT, "proxy.py"), self.script)
        self.cache = importlib.util.cache_from_source(self.script)
        self.run_dir = self.mkdir("run")
        self.copy_test_certs(os.path.join(self.run_dir, "certs"))
        self.config = self.loopback_config(self.run_dir)

    def caching_env(self, **overrides) -> dict:
        env = self.env(**overrides)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        return env

    def start(self, env, *options):
        """proxy.py copy started as `python3 [options] app/proxy.py --config ...`."""
        name = "perf-%d" % len(self.children)
        err_path = os.path.join(self.tmp, name + ".stderr")
        with open(err_path, "wb") as err:
            child = subprocess.Popen([sys.executable] + list(options)
                                     + [self.script, "--config", self.config],
                                     cwd=self.run_dir, env=env, stdout=subprocess.DEVNULL,
                                     stderr=err, stdin=subprocess.DEVNULL)
        self.children.append(child)
        return child, self.wait_for_port(err_path, child), err_path

    def test_a_script_start_reruns_from_the_cache_in_the_same_process(self):
        child, port, err = self.start(self.caching_env(), "-X", "utf8")
        argv = _cmdline(child.pid)          # the pid Popen started is the one serving
        self.assertIn("-c", argv)
        self.assertEqual(argv[1:3], ["-X", "utf8"], "interpreter options kept")
        self.assertEqual(argv[-3:], [self.script, "--config", self.config], "arguments kept")
        self.assertTrue(os.path.exists(self.cache), "no %s" % self.cache)
        self.get_tags(port)
        code, _ = self.signal_and_wait(child, signal.SIGTERM)
        self.assertEqual(code, 0, _read(err))
        self.assert_stats_requests(os.path.join(self.run_dir, "stats.json"), 1)
        self.assert_no_traceback(_read(err))

        # The next start loads that cache as it is.
        stamp = os.stat(self.cache).st_mtime_ns
        child, port, err = self.start(self.caching_env())
        self.assertIn("-c", _cmdline(child.pid))
        self.get_tags(port)
        self.assertEqual(os.stat(self.cache).st_mtime_ns, stamp)
        self.assertEqual(self.signal_and_wait(child, signal.SIGTERM)[0], 0, _read(err))

    def test_the_rerun_keeps_the_parse_tree_out_of_memory(self):
        # Measured (issue 16): 42 MiB as a script, 27 MiB re-run from the cache.
        self.start(self.caching_env())[0].send_signal(signal.SIGTERM)   # writes the cache
        plain, _, _ = self.start(self.caching_env(LLM_PROXY_NO_RERUN="1"))
        rerun, _, _ = self.start(self.caching_env())
        self.assertNotIn("-c", _cmdline(plain.pid))
        self.assertIn("-c", _cmdline(rerun.pid))
        self.assertLess(_vmrss_mib(rerun.pid), _vmrss_mib(plain.pid) - 6.0)

    def test_no_rerun_when_no_cache_may_be_written(self):
        # PYTHONDONTWRITEBYTECODE and no cache: re-running would compile a second time.
        child, port, err = self.start(self.env())
        self.assertNotIn("-c", _cmdline(child.pid))
        self.assertEqual(_cmdline(child.pid)[-3:], [self.script, "--config", self.config])
        self.assertFalse(os.path.exists(self.cache))
        self.get_tags(port)
        self.assertEqual(self.signal_and_wait(child, signal.SIGTERM)[0], 0, _read(err))

    def test_an_edited_file_is_never_run_from_a_stale_cache(self):
        self.start(self.caching_env())[0].send_signal(signal.SIGTERM)
        self.assertTrue(os.path.exists(self.cache))
        with open(self.script) as handle:
            text = handle.read()
        with open(self.script, "w") as handle:      # one line more at the top, after the rerun
            handle.write(text.replace("\nimport argparse\n", "\nimport argparse\nimport sys as "
                                      "_edited; print('edited copy', file=_edited.stderr)\n", 1))
        os.utime(self.script, (1, 1))       # even with an mtime older than the cache's
        child, port, err = self.start(self.caching_env())
        self.assertIn("-c", _cmdline(child.pid))
        self.get_tags(port)
        self.assertEqual(self.signal_and_wait(child, signal.SIGTERM)[0], 0, _read(err))
        self.assertIn("edited copy", _read(err))

    def test_a_cache_others_could_write_is_never_run(self):
        # cron often runs proxy.py as root: a .pyc planted in a folder another user can write
        # must not become root's code. Plant one that would announce itself, matching the header.
        self.start(self.caching_env())[0].send_signal(signal.SIGTERM)     # writes a real cache
        source = os.stat(self.script)
        planted = compile("import sys\nsys.stderr.write('PLANTED CODE RAN\\n')\nsys.exit(7)\n",
                          self.script, "exec")
        import marshal
        with open(self.cache, "wb") as handle:
            handle.write(importlib.util.MAGIC_NUMBER + bytes(4)
                         + (int(source.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
                         + (source.st_size & 0xFFFFFFFF).to_bytes(4, "little")
                         + marshal.dumps(planted))
        for loose in (os.path.dirname(self.cache), self.cache):
            os.chmod(loose, 0o777 if loose != self.cache else 0o666)
            child, port, err = self.start(self.caching_env())
            self.assertNotIn("-c", _cmdline(child.pid), "ran a cache others could write")
            self.get_tags(port)
            self.assertEqual(self.signal_and_wait(child, signal.SIGTERM)[0], 0, _read(err))
            self.assertNotIn("PLANTED", _read(err))
            os.chmod(loose, 0o755 if loose != self.cache else 0o644)

    def test_version_and_exit_codes_are_the_same_either_way(self):
        for env in (self.caching_env(), self.caching_env(LLM_PROXY_NO_RERUN="1")):
            shown = subprocess.run([sys.executable, self.script, "--version"], env=env,
                                   capture_output=True, text=True, timeout=30)
            self.assertEqual((shown.returncode, shown.stdout.split()[0]), (0, "proxy.py"))
            bad = subprocess.run([sys.executable, self.script, "--no-such-option"], env=env,
                                 capture_output=True, text=True, timeout=30)
            self.assertEqual(bad.returncode, 2, bad.stderr)
            self.assertIn("--no-such-option", bad.stderr)
            self.assertIn("proxy.py", bad.stderr.splitlines()[0], "usage names the file")


class StartImportsTests(unittest.TestCase):
    """What a start imports is what it pays for, in time and in idle RSS (issue 16)."""

    def run_python(self, code: str) -> str:
        done = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True,
                              timeout=60, cwd=ROOT)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout

    def test_logging_handlers_is_imported_only_for_a_log_file(self):
        # 12M instructions and 0.6 MiB (with pickle and queue) that a start without a log file
        # never uses; a start with one still gets the size-rotated, symlink-refusing file.
        out = self.run_python(
            "import os, sys, tempfile; sys.path.insert(0, sys.argv[1]); import proxy\n"
            "proxy.setup_logging('info')\n"
            "print('logging.handlers' in sys.modules)\n"
            "path = os.path.join(tempfile.mkdtemp(), 'proxy.log')\n"
            "proxy.setup_logging('info', path)\n"
            "handler = proxy.log.handlers[0]\n"
            "import logging.handlers\n"
            "print(isinstance(handler, logging.handlers.RotatingFileHandler), handler.maxBytes,"
            " handler.backupCount, handler.encoding)\n"
            "proxy.log.warning('written'); handler.close()\n"
            "print(open(path).read().rstrip().endswith('WARNING written'))\n")
        self.assertEqual(out.split(), ["False", "True", str(5 * 1024 * 1024), "3", "utf-8",
                                       "True"])


if __name__ == "__main__":
    unittest.main()
