"""Running proxy.py as a program: first run, --daemon/--stop, signals, --check, --healthcheck.

Every test starts the real `python3 proxy.py` as a subprocess in a temporary directory, talks to
it over real TLS on 127.0.0.1 only, and reads the port it chose from its log (`proxy.port: 0`).
Each process we start carries a marker in its environment; a cleanup finds every process with
that marker (daemons included, which are not our children) and kills it by pid, so nothing is
left running even when a test fails half-way.
"""

import fcntl
import glob
import http.client
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import uuid

from support import ROOT, certs_dir, client_context, proxy, start_upstream, wait_until

if os.name != "posix":
    raise unittest.SkipTest("service tests need POSIX signals and fork (--daemon is POSIX-only)")

PROXY_PY = os.path.join(ROOT, "proxy.py")
GENERATE_CERT_PY = os.path.join(ROOT, "generate_cert.py")

# Settings a developer may have exported that would change what the child process does.
_SCRUBBED_ENV = ("PROXY_PORT", "TARGET_HOST", "TARGET_PORT", "CERT_FILE", "KEY_FILE",
                 "ALLOWED_ORIGINS", "JOURNAL_STREAM", "NOTIFY_SOCKET", "PYTHONSTARTUP")
_MARKER_VAR = "LLM_PROXY_SERVICE_TEST"
_LISTENING = re.compile(r"listening on https://(\S+):(\d+), forwarding to")
_REQUEST_LINE = re.compile(r"127\.0\.0\.1 GET /api/tags 200 \d+B \d+ms")
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")
_LEVEL_FIRST = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) ")

START_TIMEOUT = 30.0      # keygen in pure Python on a slow core takes a few seconds
EXIT_TIMEOUT = 15.0


def _waits_for_the_pipe(pid: int) -> bool:
    """True when another thread of `pid` is parked writing to a full pipe and the main thread
    sleeps on a lock (a futex) or on that pipe too: it can do nothing more until the pipe drains.
    Read from /proc/PID/task/*/stat and wchan (Linux)."""
    def look(tid):
        base = "/proc/%d/task/%s/" % (pid, tid)
        with open(base + "stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
        with open(base + "wchan") as handle:
            return state, handle.read()
    try:
        threads = {int(tid): look(tid) for tid in os.listdir("/proc/%d/task" % pid)}
    except (OSError, IndexError):
        return False                     # a thread ended between the listing and the look
    main_state, main_wchan = threads.pop(pid, ("?", ""))
    parked = any("pipe_write" in wchan for _, wchan in threads.values())
    return parked and main_state == "S" and ("futex" in main_wchan or "pipe_write" in main_wchan)


def _read(path, mode="r"):
    try:
        with open(path, mode) as handle:
            return handle.read()
    except FileNotFoundError:
        return b"" if "b" in mode else ""


# Linux shows every process's environment in /proc; elsewhere (macOS) the few checks that count
# processes are skipped and cleanup falls back to the pidfiles and our own children.
HAVE_PROC = os.path.isdir("/proc/self/fd")


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie has exited: it only waits for its parent to reap it)."""
    if HAVE_PROC:
        try:
            with open("/proc/%d/stat" % pid) as handle:
                return handle.read().rpartition(")")[2].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _pids_with_marker(marker: str, pidfiles_under: str = ""):
    """Live processes whose environment carries `marker` (ours, daemons included).

    Without /proc: the live pids named by *.pid files under `pidfiles_under`.
    """
    if not HAVE_PROC:
        pids = set()
        for path in glob.glob(os.path.join(pidfiles_under, "**", "*.pid"), recursive=True):
            try:
                pids.add(int(_read(path).strip()))
            except ValueError:
                continue
        return sorted(pid for pid in pids if pid > 0 and _alive(pid))
    needle = ("%s=%s" % (_MARKER_VAR, marker)).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/environ" % entry, "rb") as handle:
                if needle in handle.read().split(b"\0") and _alive(int(entry)):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _served_certificate(port: int, hostname: str = "localhost"):
    """The DER certificate a NEW connection to the proxy gets (verified against the test CA)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with client_context().wrap_socket(raw, server_hostname=hostname) as tls:
            return tls.getpeercert(binary_form=True)


def _serial(der: bytes) -> int:
    return proxy.parse_certificate_der(der).serial


def _pythons():
    """Other interpreters on this machine in the supported range 3.9-3.13, one per version.

    The version running the suite is left out: every other test here already runs it.
    """
    candidates = []
    for minor in ("3.9", "3.10", "3.11", "3.12", "3.13"):
        candidates += sorted(glob.glob("/root/.pyenv/versions/%s*/bin/python3" % minor))
        on_path = shutil.which("python" + minor)
        if on_path:
            candidates.append(on_path)
    found = {"%d.%d" % sys.version_info[:2]: None}
    for path in candidates:
        try:
            out = subprocess.run([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        version = out.stdout.strip()
        if out.returncode == 0 and version and version not in found:
            found[version] = path
    return {version: path for version, path in found.items() if path}


class ServiceTestCase(unittest.TestCase):
    """Temp dir, a fake backend, and helpers to run proxy.py and clean up after it."""

    def setUp(self):
        self.tmp = os.path.realpath(tempfile.mkdtemp(prefix="llm-proxy-service-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.marker = uuid.uuid4().hex
        self.children = []
        self.addCleanup(self._kill_leftovers)
        self.upstream = start_upstream(self)

    def _kill_leftovers(self):
        for child in self.children:
            if child.poll() is None:
                child.kill()
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for pid in _pids_with_marker(self.marker, self.tmp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # -- files -----------------------------------------------------------------------------------

    def mkdir(self, *parts) -> str:
        path = os.path.join(self.tmp, *parts)
        os.makedirs(path, exist_ok=True)
        return path

    def copy_test_certs(self, directory: str) -> str:
        """The suite's CA and server certificate copied into `directory` (no keygen needed)."""
        shutil.copytree(certs_dir(), directory)
        return directory

    def write_config(self, directory: str, settings: dict) -> str:
        path = os.path.join(directory, "config.json")
        with open(path, "w") as handle:
            json.dump(settings, handle)
        return path

    def loopback_config(self, directory: str, **tracking) -> str:
        """A config on 127.0.0.1, port 0, with paths relative to the config's own folder."""
        settings = {"proxy": {"port": 0, "bind": "127.0.0.1"},
                    "target": {"host": "127.0.0.1", "port": self.upstream.port},
                    "tls": {"cert": "certs/cert.pem", "key": "certs/key.pem"},
                    "tracking": dict({"statsFile": "stats.json", "persistInterval": 3600},
                                     **tracking)}
        return self.write_config(directory, settings)

    # -- processes -------------------------------------------------------------------------------

    def env(self, **overrides) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        env[_MARKER_VAR] = self.marker
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.update({k: str(v) for k, v in overrides.items()})
        return env

    def run_proxy(self, args, cwd=None, env=None, python=sys.executable, timeout=EXIT_TIMEOUT):
        """Run proxy.py to completion; returns the CompletedProcess (text)."""
        return subprocess.run([python, PROXY_PY] + list(args), cwd=cwd or self.tmp,
                              env=env or self.env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def start_proxy(self, args=(), cwd=None, env=None, python=sys.executable):
        """Start proxy.py in the foreground; returns (Popen, port, stderr path) once it listens."""
        name = "proxy-%d" % len(self.children)
        err_path = os.path.join(self.tmp, name + ".stderr")
        out_path = os.path.join(self.tmp, name + ".stdout")
        with open(err_path, "wb") as err, open(out_path, "wb") as out:
            child = subprocess.Popen([python, PROXY_PY] + list(args), cwd=cwd or self.tmp,
                                     env=env or self.env(), stdout=out, stderr=err,
                                     stdin=subprocess.DEVNULL)
        self.children.append(child)
        port = self.wait_for_port(err_path, child)
        return child, port, err_path

    def wait_for_port(self, log_path, child=None, timeout=START_TIMEOUT) -> int:
        """The port from the `listening on https://host:port` line of a log file."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            matches = _LISTENING.findall(_read(log_path))
            if matches:
                return int(matches[-1][1])      # the latest start, if the log is appended to
            if child is not None and child.poll() is not None:
                self.fail("proxy.py exited with %s before listening:\n%s"
                          % (child.returncode, _read(log_path)))
            time.sleep(0.05)
        self.fail("proxy.py did not log 'listening on' within %gs:\n%s"
                  % (timeout, _read(log_path)))

    def signal_and_wait(self, child, signum, timeout=EXIT_TIMEOUT):
        """Send `signum`; returns (exit code, seconds it took)."""
        started = time.monotonic()
        child.send_signal(signum)
        try:
            code = child.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail("proxy.py still running %gs after %s"
                      % (timeout, signal.Signals(signum).name))
        return code, time.monotonic() - started

    # -- clients ---------------------------------------------------------------------------------

    def https(self, port, hostname="localhost", context=None, timeout=10.0):
        """A keep-alive HTTPS connection to 127.0.0.1:port that verifies `hostname` strictly."""
        context = context or client_context()
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
        conn.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout),
                                        server_hostname=hostname)
        self.addCleanup(conn.close)
        return conn

    def get(self, conn, path="/api/tags"):
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()

    def get_tags(self, port, hostname="localhost", context=None):
        """One GET /api/tags on a fresh connection; asserts it reached the backend."""
        before = len(self.upstream.requests)
        conn = self.https(port, hostname, context)
        try:
            status, body = self.get(conn)
        finally:
            conn.close()        # an idle keep-alive connection would delay the proxy's exit
        self.assertEqual(status, 200, body[:300])
        self.assertEqual(json.loads(body)["path"], "/api/tags")
        self.assertEqual(len(self.upstream.requests), before + 1)

    def assert_stats_requests(self, stats_file, count):
        self.assertTrue(os.path.exists(stats_file), "no %s after shutdown" % stats_file)
        with open(stats_file) as handle:
            saved = json.load(handle)
        self.assertEqual(saved["requests"], count, "stats.json: %s" % json.dumps(saved)[:300])
        self.assertEqual(sum(1 for r in saved["recent"] if r["path"] == "/api/tags"), count)

    def assert_no_traceback(self, *texts):
        for text in texts:
            self.assertNotIn("Traceback", text)


# ==================================================================================================
# First run with no set-up at all (issue 3's "done when")
# ==================================================================================================

class FirstRunTests(ServiceTestCase):

    def test_first_run_makes_certificates_that_strict_clients_accept_and_reuses_them(self):
        run_dir = self.mkdir("fresh")
        env = self.env(PROXY_PORT=0, TARGET_PORT=self.upstream.port)
        # No config file and no proxy.bind: the defaults listen on every interface; the test only
        # ever connects to 127.0.0.1.
        child, port, err = self.start_proxy(cwd=run_dir, env=env)
        certs = os.path.join(run_dir, "certs")
        for name, private in (("ca.pem", False), ("ca-key.pem", True), ("cert.pem", False),
                              ("key.pem", True), ("combined.pem", True)):
            path = os.path.join(certs, name)
            self.assertTrue(os.path.isfile(path), "%s was not created" % name)
            mode = stat.S_IMODE(os.stat(path).st_mode)
            if private:
                self.assertEqual(mode, 0o600, "%s has mode %o" % (name, mode))
            else:
                self.assertFalse(mode & 0o022, "%s is writable by others: %o" % (name, mode))
        banner = err[:-len(".stderr")] + ".stdout"
        self.assertTrue(wait_until(lambda: "on this machine:" in _read(banner)), _read(banner))
        self.assertRegex(_read(banner), r"CA certificate: https://\S+:%d/_proxy/ca.pem  \(NEW"
                         % port)
        self.assertIn("on this machine: %s" % os.path.join(certs, "ca.pem"), _read(banner))

        strict = ssl.create_default_context(cafile=os.path.join(certs, "ca.pem"))
        strict.verify_flags |= ssl.VERIFY_X509_STRICT
        self.get_tags(port, "localhost", strict)
        self.get_tags(port, "127.0.0.1", strict)
        # The negatives: a name the certificate does not cover, and a CA the client never trusted.
        with self.assertRaises(ssl.SSLCertVerificationError):
            self.https(port, "proxy.invalid", strict).request("GET", "/api/tags")
        with self.assertRaises(ssl.SSLCertVerificationError):
            self.https(port, "localhost", client_context()).request("GET", "/api/tags")

        code, _ = self.signal_and_wait(child, signal.SIGTERM)
        self.assertEqual(code, 0, _read(err))
        self.assert_stats_requests(os.path.join(run_dir, "stats.json"), 2)

        before = {name: _read(os.path.join(certs, name), "rb")
                  for name in ("ca.pem", "ca-key.pem", "cert.pem", "key.pem")}
        child, port, err = self.start_proxy(cwd=run_dir, env=env)
        self.assertIn("TLS certificate kept", _read(err))
        banner = err[:-len(".stderr")] + ".stdout"
        self.assertTrue(wait_until(lambda: "on this machine:" in _read(banner)), _read(banner))
        self.assertNotIn("(NEW", _read(banner))
        for name, data in before.items():
            self.assertEqual(_read(os.path.join(certs, name), "rb"), data, "%s changed" % name)
        self.get_tags(port, "localhost", strict)
        self.assertEqual(self.signal_and_wait(child, signal.SIGTERM)[0], 0)
        self.assert_stats_requests(os.path.join(run_dir, "stats.json"), 3)   # loaded, then added


# ==================================================================================================
# --daemon, --stop, pidfile, log file (the cron recipe of the README)
# ==================================================================================================

class DaemonTests(ServiceTestCase):

    def setUp(self):
        super().setUp()
        self.etc = self.mkdir("etc")           # where the config lives (/opt/llm-proxy)
        self.home = self.mkdir("home")         # where cron starts us ($HOME)
        self.copy_test_certs(os.path.join(self.etc, "certs"))
        self.config = self.loopback_config(self.etc)
        self.pidfile = os.path.join(self.etc, "llm-proxy.pid")
        self.logfile = os.path.join(self.etc, "llm-proxy.log")

    def cron(self, *args):
        return self.run_proxy(["--config", self.config] + list(args), cwd=self.home,
                              env=self.env(HOME=self.home))

    def daemon_pids(self):
        return _pids_with_marker(self.marker, self.tmp)

    def test_daemon_twice_is_one_process_then_stop_saves_stats_and_removes_the_pidfile(self):
        first = self.cron("--daemon")
        self.assertEqual(first.returncode, 0, first.stdout + first.stderr)
        match = re.search(r"started \(pid (\d+)\), logging to (\S+)", first.stdout)
        self.assertTrue(match, first.stdout)
        pid = int(match.group(1))
        self.assertEqual(match.group(2), self.logfile)
        self.assertEqual(_read(self.pidfile).strip(), str(pid))
        self.assertTrue(_alive(pid))

        second = self.cron("--daemon")
        self.assertEqual(second.returncode, 0, second.stdout + second.stderr)
        self.assertIn("already running (pid %d)" % pid, second.stdout)
        self.assertEqual(self.daemon_pids(), [pid])
        self.assertEqual(_read(self.pidfile).strip(), str(pid))

        port = self.wait_for_port(self.logfile)
        self.get_tags(port)
        self.get_tags(port)
        self.assertTrue(wait_until(lambda: len(_REQUEST_LINE.findall(_read(self.logfile))) == 2),
                        _read(self.logfile))

        self.assertFalse(os.path.exists(os.path.join(self.etc, "stats.json")))   # saved at exit
        stop = self.cron("--stop")
        self.assertEqual(stop.returncode, 0, stop.stdout + stop.stderr)
        self.assertIn("stopped (pid %d)" % pid, stop.stdout)
        # --stop returns once the daemon let go of the pidfile; its interpreter may need a few
        # more milliseconds to exit.
        self.assertTrue(wait_until(lambda: not _alive(pid), timeout=3),
                        "the daemon still runs after --stop")
        self.assertFalse(os.path.exists(self.pidfile))
        self.assert_stats_requests(os.path.join(self.etc, "stats.json"), 2)
        self.assertIn("received SIGTERM", _read(self.logfile))
        # Nothing landed in the directory cron started us in.
        self.assertEqual(os.listdir(self.home), [])

        again = self.cron("--stop")
        self.assertEqual(again.returncode, 0)
        self.assertIn("not running", again.stdout)

    def test_a_stale_pidfile_is_taken_over(self):
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        # A dead pid, then a live pid that is not a proxy (this test): the lock decides, not the
        # number.
        for stale_pid in (dead.pid, os.getpid()):
            with self.subTest(stale_pid=stale_pid):
                pidfile = os.path.join(self.home, "run", "proxy.pid")
                os.makedirs(os.path.dirname(pidfile), exist_ok=True)
                with open(pidfile, "w") as handle:
                    handle.write("%d\n" % stale_pid)
                # Relative --pidfile and --log-file are taken from the directory we were run in.
                log_name = "proxy-%d.log" % stale_pid
                started = self.cron("--daemon", "--pidfile", "run/proxy.pid",
                                    "--log-file", "run/" + log_name)
                self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
                self.assertNotIn("already running", started.stdout)
                pid = int(_read(pidfile).strip())
                self.assertNotEqual(pid, stale_pid)
                self.assertEqual(self.daemon_pids(), [pid])
                self.get_tags(self.wait_for_port(os.path.join(self.home, "run", log_name)))
                stop = self.cron("--stop", "--pidfile", pidfile)
                self.assertEqual(stop.returncode, 0, stop.stdout + stop.stderr)
                self.assertTrue(wait_until(lambda: not _alive(pid), timeout=3))
                self.assertFalse(os.path.exists(pidfile))

    def test_stop_never_signals_a_process_that_does_not_hold_the_pidfile(self):
        # A stale pidfile may name a pid the system has since given to another program.
        # The bystander reports any SIGTERM and answers each line on stdin: once it answers a
        # line sent after --stop returned, a signal sent by --stop would have been handled
        # (and reported) before it, so no sleep is needed to wait for one.
        bystander = subprocess.Popen(
            [sys.executable, "-c", "import signal, sys\n"
             "signal.signal(signal.SIGTERM, lambda *a: print('signalled', flush=True))\n"
             "for line in sys.stdin:\n    print('pong', flush=True)\n"],
            env=self.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.children.append(bystander)
        self.addCleanup(bystander.stdout.close)
        self.addCleanup(bystander.stdin.close)

        def ping():
            bystander.stdin.write("ping\n")
            bystander.stdin.flush()
            return bystander.stdout.readline().strip()
        self.assertEqual(ping(), "pong")                # its SIGTERM handler is in place
        with open(self.pidfile, "w") as handle:
            handle.write("%d\n" % bystander.pid)
        stop = self.cron("--stop")
        self.assertEqual(stop.returncode, 0, stop.stdout + stop.stderr)
        self.assertIn("not running (removed stale pidfile", stop.stdout)
        self.assertEqual(ping(), "pong", "--stop signalled a process it does not own")
        self.assertIsNone(bystander.poll(), "--stop signalled a process it does not own")
        self.assertFalse(os.path.exists(self.pidfile))

    def test_a_second_daemon_during_the_first_ones_start_names_a_real_pid(self):
        # The first start makes the CA and the certificate (seconds on a Raspberry Pi); the pidfile
        # is locked meanwhile but empty, so a second --daemon said "already running (pid -1)" and
        # --stop "locked but holds no pid".
        etc = self.mkdir("slow")
        config = self.loopback_config(etc)           # no certs/: the first start makes them
        pidfile = os.path.join(etc, "llm-proxy.pid")
        first = subprocess.Popen([sys.executable, PROXY_PY, "--config", config, "--daemon"],
                                 cwd=self.home, env=self.env(), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.children.append(first)
        self.assertTrue(wait_until(lambda: os.path.exists(pidfile), timeout=10))
        second = self.run_proxy(["--config", config, "--daemon"], cwd=self.home)
        still_starting = not os.path.exists(os.path.join(etc, "certs", "cert.pem"))
        out, err = first.communicate(timeout=START_TIMEOUT)
        self.assertEqual(first.returncode, 0, out + err)
        self.run_proxy(["--config", config, "--stop"])
        if not still_starting:
            self.skipTest("the first start was done before the second looked; nothing to see")
        self.assertEqual(second.returncode, 0, second.stdout + second.stderr)
        match = re.search(r"already running \(pid (-?\d+)\)", second.stdout)
        self.assertTrue(match, second.stdout)
        self.assertGreater(int(match.group(1)), 0, second.stdout)

    def test_defaults_resolve_beside_the_config_not_in_the_cron_cwd(self):
        # A minimal config (as a user would write one) that leaves tls.* and statsFile at their
        # defaults. The pidfile and log already default to the config's folder; the certificates
        # and stats should too, or the cron recipe scatters them into $HOME.
        etc = self.mkdir("minimal")
        config = self.write_config(etc, {"proxy": {"port": 0, "bind": "127.0.0.1"},
                                         "target": {"port": self.upstream.port}})
        self.copy_test_certs(os.path.join(etc, "certs"))
        result = self.run_proxy(["--config", config, "--check"], cwd=self.home)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("certificate: %s (ok)" % os.path.join(etc, "certs", "cert.pem"),
                      result.stdout)


# ==================================================================================================
# Start-up failures: port in use, --check
# ==================================================================================================

class StartupErrorTests(ServiceTestCase):

    def busy_port(self) -> int:
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        return holder.getsockname()[1]

    def config_on(self, port: int) -> str:
        directory = self.mkdir("etc")
        if not os.path.exists(os.path.join(directory, "certs")):
            self.copy_test_certs(os.path.join(directory, "certs"))
        return self.write_config(directory, {
            "proxy": {"port": port, "bind": "127.0.0.1"},
            "target": {"port": self.upstream.port},
            "tls": {"cert": "certs/cert.pem", "key": "certs/key.pem"},
            "tracking": {"statsFile": "stats.json"}})

    def test_port_in_use_is_exit_1_with_a_clear_message(self):
        port = self.busy_port()
        config = self.config_on(port)
        result = self.run_proxy(["--config", config])
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("error: port %d is already in use" % port, result.stderr)
        self.assert_no_traceback(result.stderr, result.stdout)

    def test_port_in_use_with_daemon_leaves_no_daemon_and_no_locked_pidfile(self):
        port = self.busy_port()
        config = self.config_on(port)
        result = self.run_proxy(["--config", config, "--daemon"])
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("error: port %d is already in use" % port, result.stderr)
        self.assert_no_traceback(result.stderr, result.stdout)
        self.assertEqual(_pids_with_marker(self.marker, self.tmp), [])
        pidfile = os.path.join(os.path.dirname(config), "llm-proxy.pid")
        if os.path.exists(pidfile):
            fd = os.open(pidfile, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # raises if someone holds it
            finally:
                os.close(fd)
        # And the next cron run, once the port is free, starts normally.
        self.assertEqual(self.run_proxy(["--config", self.config_on(0), "--daemon"]).returncode, 0)
        self.assertEqual(self.run_proxy(["--config", config, "--stop"]).returncode, 0)

    def test_failed_daemon_start_leaves_no_pidfile_behind(self):
        port = self.busy_port()
        config = self.config_on(port)
        self.assertEqual(self.run_proxy(["--config", config, "--daemon"]).returncode, 1)
        self.assertFalse(os.path.exists(os.path.join(os.path.dirname(config), "llm-proxy.pid")))

    def test_a_pidfile_that_cannot_be_created_is_a_clear_error(self):
        # e.g. `--pidfile /run/llm-proxy/llm-proxy.pid` before the directory exists, or as non-root.
        config = self.config_on(0)
        pidfile = os.path.join(self.tmp, "no-such-dir", "llm-proxy.pid")
        result = self.run_proxy(["--config", config, "--daemon", "--pidfile", pidfile])
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertTrue(result.stderr.startswith("error: "), result.stderr)
        self.assertIn(pidfile, result.stderr)
        self.assert_no_traceback(result.stderr)
        self.assertEqual(_pids_with_marker(self.marker, self.tmp), [])

    def test_a_log_file_that_cannot_be_written_is_a_clear_error(self):
        config = self.config_on(0)
        log_file = os.path.join(self.tmp, "no-such-dir", "llm-proxy.log")
        for mode in ([], ["--daemon"]):
            with self.subTest(mode=mode):
                result = self.run_proxy(["--config", config, "--log-file", log_file] + mode)
                self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
                # Not "see the log file": there is none. Name the path and the reason instead.
                self.assertIn("error: cannot write log file %s" % log_file, result.stderr)
                self.assert_no_traceback(result.stderr)
                self.assertEqual(_pids_with_marker(self.marker, self.tmp), [])
                self.assertFalse(os.path.exists(os.path.join(os.path.dirname(config),
                                                             "llm-proxy.pid")))

    def test_check_accepts_a_good_config_without_serving_or_writing(self):
        port = self.busy_port()       # if --check tried to listen, it would fail with exit 1
        config = self.config_on(port)
        directory = os.path.dirname(config)
        before = sorted(os.listdir(directory))
        result = self.run_proxy(["--config", config, "--check"])
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("certificate: %s (ok)" % os.path.join(directory, "certs", "cert.pem"),
                      result.stdout)
        self.assertEqual(sorted(os.listdir(directory)), before)

    def test_check_never_creates_certificates(self):
        directory = self.mkdir("bare")
        config = self.write_config(directory, {"proxy": {"port": self.busy_port(),
                                                         "bind": "127.0.0.1"}})
        result = self.run_proxy(["--config", config, "--check"], cwd=directory)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("will be created at first start", result.stdout)
        self.assertEqual(os.listdir(directory), ["config.json"])

    def test_check_reports_invalid_json_with_line_and_column(self):
        directory = self.mkdir("badjson")
        path = os.path.join(directory, "config.json")
        text = '{\n  "proxy": {\n    "port": 8443,\n  }\n}\n'      # a trailing comma
        with open(path, "w") as handle:
            handle.write(text)
        # Where the json module puts the error depends on the Python version (3.13 blames the
        # comma, older ones the brace after it); the proxy must report the same place.
        with self.assertRaises(json.JSONDecodeError) as caught:
            json.loads(text)
        self.assertGreater(caught.exception.lineno, 1)
        result = self.run_proxy(["--config", path, "--check"])
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn(path, result.stderr)
        self.assertIn("line %d, column %d" % (caught.exception.lineno, caught.exception.colno),
                      result.stderr)
        self.assertTrue(result.stderr.startswith("error: "), result.stderr)
        self.assert_no_traceback(result.stderr, result.stdout)

    def test_check_reports_a_garbage_certificate_and_leaves_it_alone(self):
        config = self.config_on(0)
        cert = os.path.join(os.path.dirname(config), "certs", "cert.pem")
        with open(cert, "wb") as handle:
            handle.write(b"this is not a certificate\n")
        result = self.run_proxy(["--config", config, "--check"])
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn(cert, result.stderr)
        self.assert_no_traceback(result.stderr, result.stdout)
        self.assertEqual(_read(cert, "rb"), b"this is not a certificate\n")
        # Starting for real with it fails the same way (exit 2), and still does not overwrite it.
        started = self.run_proxy(["--config", config])
        self.assertEqual(started.returncode, 2, started.stdout + started.stderr)
        self.assert_no_traceback(started.stderr)
        self.assertEqual(_read(cert, "rb"), b"this is not a certificate\n")


# ==================================================================================================
# Signals: SIGTERM/SIGINT stop cleanly, SIGHUP and the maintenance thread swap the certificate
# ==================================================================================================

class SignalTests(ServiceTestCase):
    def test_sighup_while_the_first_start_makes_its_ca_does_not_end_it(self):
        # `systemctl reload` right after a first start: the CA is still being made (1-3 s of
        # key generation) and serve() has not installed its reload handler yet.
        run_dir = self.mkdir("fresh")
        config = self.loopback_config(run_dir)          # no certs/ yet: this start makes them
        err_path = os.path.join(self.tmp, "fresh.stderr")
        with open(err_path, "wb") as err:
            child = subprocess.Popen([sys.executable, PROXY_PY, "--config", config], cwd=run_dir,
                                     env=self.env(), stdout=subprocess.DEVNULL, stderr=err,
                                     stdin=subprocess.DEVNULL)
        self.children.append(child)
        self.assertTrue(wait_until(lambda: "creating a local certificate authority"
                                   in _read(err_path) or child.poll() is not None,
                                   timeout=30, interval=0.01), _read(err_path))
        child.send_signal(signal.SIGHUP)
        port = self.wait_for_port(err_path, child)
        made = ssl.create_default_context(cafile=os.path.join(run_dir, "certs", "ca.pem"))
        self.get_tags(port, context=made)
        self.assertEqual(self.signal_and_wait(child, signal.SIGTERM)[0], 0, _read(err_path))


    def setUp(self):
        super().setUp()
        self.etc = self.mkdir("etc")
        self.copy_test_certs(os.path.join(self.etc, "certs"))
        self.config = self.loopback_config(self.etc)
        self.cert = os.path.join(self.etc, "certs", "cert.pem")
        self.key = os.path.join(self.etc, "certs", "key.pem")

    def check_stop_signal(self, signum):
        child, port, err = self.start_proxy(["--config", self.config])
        self.get_tags(port)
        self.get_tags(port)
        stats_file = os.path.join(self.etc, "stats.json")
        self.assertFalse(os.path.exists(stats_file))     # persistInterval is an hour: not yet saved
        code, _ = self.signal_and_wait(child, signum)
        log_text = _read(err)
        self.assertEqual(code, 0, log_text)
        self.assertIn("received %s; shutting down" % signal.Signals(signum).name, log_text)
        self.assert_no_traceback(log_text)
        self.assert_stats_requests(stats_file, 2)
        # Without JOURNAL_STREAM every line carries its own time stamp.
        lines = [line for line in log_text.splitlines() if line.strip()]
        self.assertTrue(lines)
        for line in lines:
            self.assertRegex(line, _TIMESTAMP)

    def test_sigterm_exits_0_and_saves_stats(self):
        self.check_stop_signal(signal.SIGTERM)

    def test_sigint_exits_0_and_saves_stats(self):
        self.check_stop_signal(signal.SIGINT)

    def test_an_idle_keep_alive_client_does_not_hold_up_shutdown(self):
        # Browsers and SDKs keep connections open between requests. An idle connection is not
        # an in-flight request: SIGTERM should not wait out the 5 s grace period for it (Go's
        # http.Server.Shutdown closes idle connections at once).
        child, port, err = self.start_proxy(["--config", self.config])
        conn = self.https(port)
        self.assertEqual(self.get(conn)[0], 200)
        code, took = self.signal_and_wait(child, signal.SIGTERM)
        self.assertEqual(code, 0)
        self.assertNotIn("still in flight", _read(err))
        self.assertLess(took, 2.0)

    def test_sigterm_lets_an_in_flight_request_finish(self):
        def slow(handler, request):
            time.sleep(1.0)
            handler.send_json(200, {"path": request.path})
        self.upstream.responder = slow
        child, port, err = self.start_proxy(["--config", self.config])
        conn = self.https(port)
        conn.request("GET", "/api/tags")
        self.assertTrue(wait_until(lambda: len(self.upstream.requests) == 1, timeout=5))
        child.send_signal(signal.SIGTERM)
        # It stops accepting at once...
        def refused():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return False
            except ConnectionRefusedError:
                return True
            except ConnectionResetError:
                # Queued in the backlog just as the listener closed: not yet "refused", ask again.
                return False
        self.assertTrue(wait_until(refused, timeout=3, interval=0.05))
        # ...but the request already being served gets its whole answer.
        response = conn.getresponse()
        self.assertEqual((response.status, json.loads(response.read())),
                         (200, {"path": "/api/tags"}))
        conn.close()
        self.assertEqual(child.wait(EXIT_TIMEOUT), 0, _read(err))
        self.assertNotIn("still in flight", _read(err))

    @unittest.skipUnless(HAVE_PROC, "needs /proc/self/fd to reopen a pipe (Linux)")
    def test_the_request_finished_during_the_grace_period_is_in_the_saved_stats(self):
        # serve() saves the stats once wait_for_requests() says nothing is in flight. The request
        # must have been recorded by then. To make the ordering observable every time, the
        # proxy's stderr is a pipe this test fills up after "received SIGTERM": the handler's
        # log line then blocks until the test drains the pipe, and whatever serve() does in
        # the meantime happens without waiting for the record.
        def slow(handler, request):
            time.sleep(1.0)
            handler.send_json(200, {"path": request.path})
        self.upstream.responder = slow
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        collected, drain, parked, stop = [], threading.Event(), threading.Event(), threading.Event()
        drain.set()

        def reader():
            while not stop.is_set():
                if not drain.is_set():
                    parked.set()
                    time.sleep(0.01)
                    continue
                parked.clear()
                if select.select([read_end], [], [], 0.05)[0]:
                    collected.append(os.read(read_end, 65536).decode("utf-8", "replace"))
        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        self.addCleanup(stop.set)

        child = subprocess.Popen([sys.executable, PROXY_PY, "--config", self.config],
                                 cwd=self.tmp, env=self.env(), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=write_end)
        self.children.append(child)
        self.assertTrue(wait_until(lambda: _LISTENING.search("".join(collected)), START_TIMEOUT),
                        "".join(collected))
        port = int(_LISTENING.search("".join(collected)).group(2))

        conn = self.https(port)
        answer = {}

        def ask():
            conn.request("GET", "/api/tags")
            response = conn.getresponse()
            answer["status"], answer["body"] = response.status, response.read()
            conn.close()
        client = threading.Thread(target=ask, daemon=True)
        client.start()
        self.assertTrue(wait_until(lambda: len(self.upstream.requests) == 1, timeout=5))
        child.send_signal(signal.SIGTERM)
        self.assertTrue(wait_until(lambda: "received SIGTERM" in "".join(collected), timeout=5))
        drain.clear()
        self.assertTrue(parked.wait(2))
        # A separate open file description: O_NONBLOCK on the proxy's own would make its writes
        # fail instead of wait.
        filler = os.open("/proc/self/fd/%d" % write_end, os.O_WRONLY | os.O_NONBLOCK)
        try:
            while True:
                os.write(filler, b"\n" * 65536)
        except BlockingIOError:
            pass                         # the pipe is full: the proxy's next log line waits
        finally:
            os.close(filler)
        client.join(5)
        # Let serve() do all it can before the pipe drains (the wrong order would save now):
        # wait until its main thread sleeps on a lock or on the pipe, with the handler's log
        # line parked on the pipe, and that stays so for a few looks in a row.
        streak = [0]

        def serve_is_stuck():
            streak[0] = streak[0] + 1 if _waits_for_the_pipe(child.pid) else 0
            return streak[0] >= 5
        self.assertTrue(wait_until(serve_is_stuck, timeout=10, interval=0.02))
        drain.set()
        self.assertEqual(child.wait(EXIT_TIMEOUT), 0, "".join(collected))
        client.join(5)
        self.assertEqual(answer.get("status"), 200)
        self.assert_stats_requests(os.path.join(self.etc, "stats.json"), 1)

    def reissue(self):
        """A new server certificate on disk (new key, new serial), issued by the same CA.

        Issued beside, then renamed into place back to back, so the proxy never sees the new
        key with the old certificate (that pair would be refused, and logged as an error).
        """
        staging = self.mkdir("staging-%s" % uuid.uuid4().hex[:8])
        info = proxy.issue_server_files(os.path.join(staging, "cert.pem"),
                                        os.path.join(staging, "key.pem"),
                                        ["localhost", "127.0.0.1"],
                                        ca_dir=os.path.dirname(self.cert))
        os.replace(os.path.join(staging, "key.pem"), self.key)
        os.replace(os.path.join(staging, "cert.pem"), self.cert)
        return info.serial

    def test_sighup_swaps_the_certificate_for_new_connections_only(self):
        child, port, err = self.start_proxy(["--config", self.config])
        kept = self.https(port)
        self.assertEqual(self.get(kept)[0], 200)
        old_serial = _serial(kept.sock.getpeercert(binary_form=True))
        self.assertEqual(_serial(_served_certificate(port)), old_serial)

        # The README's way: renew with the same CA, then reload (systemctl reload = SIGHUP).
        renew = subprocess.run([sys.executable, GENERATE_CERT_PY, "--out",
                                os.path.dirname(self.cert), "--renew"], capture_output=True,
                               text=True, timeout=60, env=self.env())
        self.assertEqual(renew.returncode, 0, renew.stdout + renew.stderr)
        new_serial = proxy.read_certificate_info(self.cert).serial
        self.assertNotEqual(new_serial, old_serial)
        child.send_signal(signal.SIGHUP)
        self.assertTrue(wait_until(lambda: _serial(_served_certificate(port)) == new_serial,
                                   timeout=3, interval=0.1),
                        "new connections still get the old certificate:\n" + _read(err))
        self.assertTrue(wait_until(lambda: "reloaded TLS certificate (SIGHUP)" in _read(err)),
                        _read(err))
        # The connection opened before the reload carries on with its own session.
        self.assertEqual(self.get(kept)[0], 200)
        self.assertEqual(_serial(kept.sock.getpeercert(binary_form=True)), old_serial)
        kept.close()
        self.get_tags(port, "127.0.0.1")
        self.assertIsNone(child.poll())
        self.assertEqual(self.signal_and_wait(child, signal.SIGTERM)[0], 0)

    def test_sighup_with_a_broken_certificate_keeps_the_old_one(self):
        child, port, err = self.start_proxy(["--config", self.config])
        old_serial = _serial(_served_certificate(port))
        with open(self.cert, "wb") as handle:
            handle.write(b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
        child.send_signal(signal.SIGHUP)
        self.assertTrue(wait_until(lambda: "kept the previous certificate" in _read(err)),
                        _read(err))
        self.assertEqual(_serial(_served_certificate(port)), old_serial)
        self.get_tags(port)
        self.assertEqual(self.signal_and_wait(child, signal.SIGTERM)[0], 0)

    def test_a_replaced_certificate_is_picked_up_without_a_signal(self):
        child, port, err = self.start_proxy(["--config", self.config])
        old_serial = _serial(_served_certificate(port))
        new_serial = self.reissue()
        self.assertTrue(wait_until(lambda: _serial(_served_certificate(port)) == new_serial,
                                   timeout=8, interval=0.25),
                        "still serving serial %x after 8 s:\n%s" % (old_serial, _read(err)))
        self.assertIn("reloaded TLS certificate (certificate files changed on disk)", _read(err))
        self.assertEqual(self.signal_and_wait(child, signal.SIGTERM)[0], 0)


# ==================================================================================================
# --healthcheck and the log format under systemd
# ==================================================================================================

class HealthAndLoggingTests(ServiceTestCase):

    def setUp(self):
        super().setUp()
        self.etc = self.mkdir("etc")
        self.copy_test_certs(os.path.join(self.etc, "certs"))
        self.config = self.loopback_config(self.etc)

    def test_healthcheck_is_0_against_a_running_proxy_and_1_when_nothing_listens(self):
        child, port, err = self.start_proxy(["--config", self.config])
        healthy = self.run_proxy(["--config", self.config, "--healthcheck"],
                                 env=self.env(PROXY_PORT=port))
        self.assertEqual(healthy.returncode, 0, healthy.stdout + healthy.stderr)
        self.assertEqual(json.loads(healthy.stdout)["status"], "ok")
        # Health and dashboard polls are not request-logged at INFO (issue 12 item 9).
        self.assertNotIn("/_proxy/health", _read(err))

        # A port that is bound but not listening refuses connections, and nobody can take it.
        closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(closed.close)
        closed.bind(("127.0.0.1", 0))
        unhealthy = self.run_proxy(["--config", self.config, "--healthcheck"],
                                   env=self.env(PROXY_PORT=closed.getsockname()[1]))
        self.assertEqual(unhealthy.returncode, 1, unhealthy.stdout + unhealthy.stderr)
        self.assertIn("unhealthy", unhealthy.stdout)
        self.assert_no_traceback(unhealthy.stderr)
        self.assertEqual(self.signal_and_wait(child, signal.SIGTERM)[0], 0)

    def test_banner_shows_only_the_address_it_listens_on(self):
        # Bound to 127.0.0.1, the proxy cannot be reached on the LAN addresses its certificate
        # names; telling the user to point their apps there sends them to a closed port.
        child, port, err = self.start_proxy(["--config", self.config])
        self.assertEqual(self.signal_and_wait(child, signal.SIGTERM)[0], 0)
        banner = _read(err[:-len(".stderr")] + ".stdout")
        endpoints = re.findall(r"https://(\S+):%d/v1$" % port, banner, re.M)
        self.assertEqual(endpoints, ["127.0.0.1"], banner)
        self.assertIn("Dashboard: https://127.0.0.1:%d/_proxy/dashboard" % port, banner)

    def test_under_systemd_log_lines_have_no_second_time_stamp(self):
        child, port, err = self.start_proxy(["--config", self.config],
                                            env=self.env(JOURNAL_STREAM="8:123456"))
        self.get_tags(port)
        self.assertEqual(self.signal_and_wait(child, signal.SIGTERM)[0], 0)
        lines = [line for line in _read(err).splitlines() if line.strip()]
        self.assertTrue(any(_REQUEST_LINE.search(line) for line in lines), lines)
        for line in lines:
            self.assertRegex(line, _LEVEL_FIRST)
            self.assertNotRegex(line, r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


# ==================================================================================================
# Dockerfile, docker-compose.yml and README agree with proxy.py
# ==================================================================================================

def _dockerfile_instructions(text: str):
    """[(INSTRUCTION, arguments)] with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = whole.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _exec_form(arguments: str):
    """The argv of a CMD/ENTRYPOINT (JSON exec form, or shell form split like sh would)."""
    arguments = arguments.strip()
    return json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)


def _compose_list(text: str, key: str):
    """The `- item` entries under `key:` in docker-compose.yml (by indentation, no YAML lib)."""
    items, indent = [], None
    for line in text.splitlines():
        if not line.strip() or line.strip().startswith("#"):
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            if line.strip() == key + ":":
                indent = depth
            continue
        if depth <= indent:
            break
        if line.strip().startswith("- "):
            items.append(line.strip()[2:].split(" #")[0].strip().strip("\"'"))
    return items


class DockerTests(unittest.TestCase):

    def setUp(self):
        self.dockerfile = _read(os.path.join(ROOT, "Dockerfile"))
        self.compose = _read(os.path.join(ROOT, "docker-compose.yml"))
        self.readme = _read(os.path.join(ROOT, "README.md"))
        self.assertTrue(self.dockerfile and self.compose and self.readme)
        self.instructions = _dockerfile_instructions(self.dockerfile)

    def instruction(self, keyword):
        found = [args for kw, args in self.instructions if kw == keyword]
        self.assertTrue(found, "no %s in the Dockerfile" % keyword)
        return found[-1]          # the last one wins (CMD, USER, HEALTHCHECK...)

    def test_every_copied_file_exists(self):
        copies = [args for kw, args in self.instructions if kw in ("COPY", "ADD")]
        self.assertTrue(copies)
        for args in copies:
            parts = [p for p in _exec_form(args) if not p.startswith("--")]
            for source in parts[:-1]:
                self.assertTrue(os.path.isfile(os.path.join(ROOT, source)),
                                "Dockerfile copies %s, which is not in the repository" % source)
                self.assertNotIn(source, self.ignored_by_git(),
                                 "Dockerfile copies %s, which a fresh clone does not have" % source)
            self.assertTrue(parts[-1].startswith("/app"), args)
        self.assertFalse(os.path.exists(os.path.join(ROOT, ".dockerignore")) and any(
            line.strip() in ("*", "proxy.py") for line in _read(os.path.join(ROOT, ".dockerignore"))
            .splitlines()), "a .dockerignore keeps proxy.py out of the build context")

    def ignored_by_git(self):
        """Files the Dockerfile might copy that .gitignore keeps out of the repository."""
        git = shutil.which("git")
        if not git or not os.path.isdir(os.path.join(ROOT, ".git")):
            return []
        sources = [p for kw, args in self.instructions if kw in ("COPY", "ADD")
                   for p in _exec_form(args)[:-1] if not p.startswith("--")]
        result = subprocess.run([git, "-C", ROOT, "check-ignore"] + sources,
                                capture_output=True, text=True, timeout=30)
        return result.stdout.split()

    def test_cmd_is_what_the_readme_says(self):
        cmd = _exec_form(self.instruction("CMD"))
        self.assertEqual(cmd, ["python3", "/app/proxy.py"])
        self.assertIn("runs `%s`" % " ".join(cmd), self.readme)
        self.assertNotIn("ENTRYPOINT", [kw for kw, _ in self.instructions])
        image = self.instruction("FROM").split()[0]
        self.assertIn("`%s`" % image, self.readme)
        version = re.match(r"python:(\d+)\.(\d+)", image)
        self.assertTrue(version, image)
        self.assertTrue((3, 9) <= (int(version.group(1)), int(version.group(2))) <= (3, 13), image)

    def test_healthcheck_runs_an_option_proxy_py_accepts(self):
        healthcheck = self.instruction("HEALTHCHECK")
        _, _, command = healthcheck.partition("CMD ")
        argv = _exec_form(command)
        self.assertEqual(argv[:2], ["python3", "/app/proxy.py"])
        self.assertEqual(argv[2:], ["--healthcheck"])
        self.assertTrue(proxy.build_parser().parse_args(argv[2:]).healthcheck)
        self.assertIn("`%s`" % " ".join(argv), self.readme)

    def test_the_image_carries_the_bytecode_cache_a_start_loads(self):
        # The user cannot write to /app: without this, every start compiles (issue 16).
        run = self.instruction("RUN")
        self.assertIn("python3 -m compileall -q --invalidation-mode timestamp /app/proxy.py", run)
        copy = [n for n, (kw, _) in enumerate(self.instructions) if kw == "COPY"]
        runs = [n for n, (kw, _) in enumerate(self.instructions) if kw == "RUN"]
        self.assertLess(copy[0], runs[-1], "the cache is written after proxy.py is copied")

    def test_port_user_and_data_volume(self):
        default_port = proxy.CONFIG_DEFAULTS["proxy"]["port"]
        self.assertEqual(self.instruction("EXPOSE").split(), [str(default_port)])
        user = self.instruction("USER").split(":")[0]
        self.assertNotIn(user, ("root", "0", ""))
        self.assertRegex(self.instruction("RUN"), r"useradd\b.*\b%s\b" % re.escape(user))
        self.assertEqual(self.instruction("WORKDIR"), "/data")
        self.assertIn("/data", self.instruction("VOLUME"))

    def test_compose_file_maps_the_host_the_port_and_the_data_volume(self):
        self.assertIn("host.docker.internal:host-gateway",
                      _compose_list(self.compose, "extra_hosts"))
        ports = _compose_list(self.compose, "ports")
        self.assertIn("8443:8443", ports)
        mounts = [m for m in _compose_list(self.compose, "volumes") if m.endswith(":/data")]
        self.assertEqual(len(mounts), 1, self.compose)
        volume = mounts[0].split(":")[0]
        if not volume.startswith(("/", ".", "~")):     # a named volume must be declared
            self.assertRegex(self.compose, r"(?m)^volumes:\s*\n\s+%s:" % re.escape(volume))
        env = _compose_list(self.compose, "environment")
        self.assertIn("TARGET_HOST=host.docker.internal", env)
        names = {name for name, _ in proxy.ENV_OVERRIDES}
        for entry in env:
            self.assertIn(entry.split("=")[0], names, "compose sets an unknown variable: " + entry)

    def test_image_builds_and_answers_its_health_check(self):
        docker = shutil.which("docker")
        if not docker:
            self.skipTest("no docker client on this machine")
        info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
        if info.returncode != 0:
            self.skipTest("docker client present but no Docker engine (`docker info` failed); "
                          "image build/run not exercised")
        tag = "local-llm-proxy-test:%s" % uuid.uuid4().hex[:8]
        build = subprocess.run([docker, "build", "-q", "-t", tag, ROOT], capture_output=True,
                               text=True, timeout=600)
        self.assertEqual(build.returncode, 0, build.stderr)
        self.addCleanup(subprocess.run, [docker, "rmi", "-f", tag], capture_output=True)
        run = subprocess.run([docker, "run", "-d", "-p", "127.0.0.1::8443", tag],
                             capture_output=True, text=True, timeout=60)
        self.assertEqual(run.returncode, 0, run.stderr)
        container = run.stdout.strip()
        self.addCleanup(subprocess.run, [docker, "rm", "-f", container], capture_output=True)
        self.assertTrue(wait_until(lambda: subprocess.run(
            [docker, "exec", container, "python3", "/app/proxy.py", "--healthcheck"],
            capture_output=True).returncode == 0, timeout=60, interval=1.0))
        user = subprocess.run([docker, "exec", container, "id", "-u"], capture_output=True,
                              text=True)
        self.assertNotEqual(user.stdout.strip(), "0")


# ==================================================================================================
# The supported Python range, 3.9-3.13, with the interpreters this machine has
# ==================================================================================================

class PythonRangeTests(ServiceTestCase):

    def test_each_interpreter_runs_the_proxy_end_to_end(self):
        pythons = _pythons()
        if not pythons:
            self.skipTest("no python3.9-3.13 interpreters found")
        by_version = sorted(pythons.items(), key=lambda item: tuple(map(int, item[0].split("."))))
        for version, python in by_version:
            with self.subTest(python=version):
                shown = subprocess.run([python, PROXY_PY, "--version"], capture_output=True,
                                       text=True, timeout=30, env=self.env())
                self.assertEqual(shown.returncode, 0, shown.stderr)
                self.assertEqual(shown.stdout.strip(), "proxy.py " + proxy.VERSION)

                run_dir = self.mkdir("py" + version)
                self.copy_test_certs(os.path.join(run_dir, "certs"))
                config = self.loopback_config(run_dir)
                child, port, err = self.start_proxy(["--config", config], python=python)
                self.get_tags(port)
                code, _ = self.signal_and_wait(child, signal.SIGTERM)
                self.assertEqual(code, 0, _read(err))
                self.assert_no_traceback(_read(err))
                self.assert_stats_requests(os.path.join(run_dir, "stats.json"), 1)


if __name__ == "__main__":
    unittest.main()
