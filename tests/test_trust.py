"""Trust material and the files the proxy writes (issue 11, items 5-7).

* A new CA is name-constrained (critical nameConstraints): real clients (OpenSSL/curl, Python in
  strict mode, the openai SDK, Chromium with the CA in NSS) accept the proxy's certificate, and
  refuse a certificate for a public name or address signed by the very same CA key.
* An older, unconstrained CA keeps working and is never replaced.
* Certificates are not loaded (at start, on reload, for /_proxy/ca.pem) from a directory other
  users can write, or from files owned by another user; the certificate directory is made 0700
  even under umask 000.
* The pidfile and log file do not follow planted symlinks; atomic writes do not chmod or rename
  through a planted temp-file symlink.
"""

import contextlib
import http.client
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import browser
import support
from support import FakeLLM, ROOT, start_upstream

import proxy

try:
    import openai
except ImportError:  # pragma: no cover - depends on the machine
    openai = None

OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")
PUBLIC_NAME = "example.com"
PUBLIC_IP = "8.8.8.8"


def _tmpdir(test, prefix="trust-"):
    path = tempfile.mkdtemp(prefix=prefix)
    test.addCleanup(shutil.rmtree, path, True)
    return path


def _write_leaf(directory, ca_dir, hosts, bypass_constraints=False):
    """Issue a leaf for ``hosts`` with the CA in ``ca_dir`` into ``directory``/cert.pem, key.pem.

    bypass_constraints signs what our own issuer refuses to sign: a stolen CA key would."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    patch = mock.patch.object(proxy.CertificateInfo, "permits", lambda self, host: True) \
        if bypass_constraints else contextlib.nullcontext()
    with patch:
        proxy.issue_server_files(os.path.join(directory, "cert.pem"),
                                 os.path.join(directory, "key.pem"), hosts, ca_dir=ca_dir)
    return os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")


class _Fixture:
    """One constrained CA (made by ensure_certificates, as at first start) shared by this module,
    plus a stock of RSA keys so that leaves are cheap."""
    dir = None
    status = None

    @classmethod
    def get(cls):
        if cls.dir is None:
            cls.dir = tempfile.mkdtemp(prefix="trust-ca-")
            cls.status = proxy.ensure_certificates(
                os.path.join(cls.dir, "cert.pem"), os.path.join(cls.dir, "key.pem"),
                extra_hosts=["proxy.example.test", "93.184.216.7"])
        return cls

    @classmethod
    def ca(cls):
        return os.path.join(cls.get().dir, "ca.pem")


def tearDownModule():
    if _Fixture.dir:
        shutil.rmtree(_Fixture.dir, ignore_errors=True)


def _serve(test, cert_file, key_file, upstream_port=1):
    """The real proxy serving ``cert_file`` on 127.0.0.1 (port 0)."""
    return support.start_proxy(test, upstream_port, cert_file=cert_file, key_file=key_file)


def _python_handshake(port, ca_file, server_hostname):
    """A strict Python client (VERIFY_X509_STRICT, as Python 3.13 defaults to) against port."""
    context = ssl.create_default_context(cafile=ca_file)
    context.verify_flags |= getattr(ssl, "VERIFY_X509_STRICT", 0)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            tls.sendall(b"GET /_proxy/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return support.read_http_response(tls)


# ==================================================================================================
# Item 7: a name-constrained CA
# ==================================================================================================

class NameConstrainedCaTests(unittest.TestCase):
    def setUp(self):
        self.fixture = _Fixture.get()
        self.ca = proxy.read_certificate_info(_Fixture.ca())

    def test_new_ca_carries_critical_permitted_subtrees(self):
        self.assertTrue(self.fixture.status.ca_created)
        self.assertTrue(self.fixture.status.ca_constrained)
        for base in ("localhost", "local", "lan", "home.arpa", "internal", "proxy.example.test"):
            self.assertIn(base, self.ca.permitted_dns)
        for network in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                        "169.254.0.0/16", "100.64.0.0/10", "::1/128", "fc00::/7", "fe80::/10",
                        "93.184.216.7/32"):
            self.assertIn(network, self.ca.permitted_networks)
        self.assertNotIn(PUBLIC_IP + "/32", self.ca.permitted_networks)
        # The extension's DER, byte for byte where it matters: critical BOOLEAN TRUE, then
        # NameConstraints SEQUENCE { [0] { SEQUENCE { [2] "localhost" } ... } }.
        ext = bytes.fromhex("0603551d1e") + bytes.fromhex("0101ff")
        self.assertIn(ext, self.ca.der)
        self.assertIn(b"\x30\x0b\x82\x09localhost", self.ca.der)
        self.assertIn(b"\x30\x0a\x87\x08" + bytes([10, 0, 0, 0, 255, 0, 0, 0]), self.ca.der)
        self.assertIn("CA signs only local names", self.fixture.status.describe())

    @unittest.skipIf(OPENSSL is None, "openssl is not installed")
    def test_openssl_reads_the_constraints_as_critical(self):
        text = subprocess.run([OPENSSL, "x509", "-noout", "-text", "-in", _Fixture.ca()],
                              capture_output=True, text=True, check=True).stdout
        self.assertIn("X509v3 Name Constraints: critical", text)
        for needle in ("DNS:localhost", "DNS:local\n", "DNS:home.arpa", "IP:10.0.0.0/255.0.0.0",
                       "IP:100.64.0.0/255.192.0.0", "IP:FC00:0:0:0:0:0:0:0/FE00:0:0:0:0:0:0:0",
                       "IP:93.184.216.7/255.255.255.255"):
            self.assertIn(needle, text)

    def test_leaf_names_only_what_the_ca_permits(self):
        leaf = proxy.read_certificate_info(os.path.join(self.fixture.dir, "cert.pem"))
        for host in leaf.dns_names + leaf.ip_addresses:
            self.assertTrue(self.ca.permits(host), host)
        self.assertIn("proxy.example.test", leaf.dns_names)
        self.assertIn("93.184.216.7", leaf.ip_addresses)  # public, but in tls.hosts at creation
        ca_key = proxy.read_private_key(os.path.join(self.fixture.dir, "ca-key.pem"))
        for host in (PUBLIC_NAME, PUBLIC_IP, "2001:4860::8888"):
            with self.assertRaisesRegex(ValueError, "name constraints do not permit"):
                proxy.issue_server_certificate(self.ca.der, ca_key, ["localhost", host])

    def test_permits(self):
        for host in ("localhost", "a.localhost", "nas.local", "x.y.lan", "home.arpa",
                     "printer.home.arpa", "svc.internal", "proxy.example.test",
                     "a.proxy.example.test", "*.nas.lan", "127.0.0.2", "10.200.1.1", "172.31.255.255",
                     "192.168.178.20", "169.254.1.1", "100.127.0.1", "::1", "fd12::1", "fe80::1",
                     "93.184.216.7",
                     # never routed on the internet: documentation and benchmarking ranges
                     "192.0.2.2", "198.51.100.9", "203.0.113.200", "198.19.255.1", "2001:db8::1"):
            self.assertTrue(self.ca.permits(host), host)
        for host in ("example.com", "local.example.com", "xlan", "notlocal", "lan.evil.com",
                     "example.test", "8.8.8.8", "172.32.0.1", "100.128.0.1", "93.184.216.8",
                     "2001:db9::1", "198.20.0.1", "192.0.3.1", "::2", "::ffff:10.0.0.1"):
            self.assertFalse(self.ca.permits(host), host)

    def test_the_banner_names_an_address_the_certificate_carries(self):
        # A machine whose first address is public (left out of the certificate) must not be
        # shown as the URL to paste: every device would fail the TLS check on it.
        status = self.fixture.status._replace(ip_addresses=("127.0.0.1", "192.168.1.5"),
                                              dns_names=("localhost",))
        config = support.make_config(bind="", tls_hosts=("93.184.216.1", "192.168.1.5"))
        self.assertEqual(proxy.public_host(config, status), "192.168.1.5")
        config = support.make_config(bind="", tls_hosts=("93.184.216.1",))
        self.assertEqual(proxy.public_host(config, status), "93.184.216.1")  # nothing better

    @unittest.skipIf(OPENSSL is None, "openssl is not installed")
    def test_openssl_strict_accepts_the_leaf_and_rejects_public_ones(self):
        good = os.path.join(self.fixture.dir, "cert.pem")
        ip_only, _ = _write_leaf(os.path.join(_tmpdir(self), "ip"), self.fixture.dir,
                                 ["10.9.8.7"])  # CN "llm-proxy server" is not a host name
        for leaf in (good, ip_only):
            result = subprocess.run([OPENSSL, "verify", "-x509_strict", "-CAfile", _Fixture.ca(),
                                     leaf], capture_output=True, text=True)
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        for hosts in ([PUBLIC_NAME], ["localhost", PUBLIC_IP], ["localhost", "2001:4860::8888"]):
            bad, _ = _write_leaf(os.path.join(_tmpdir(self), "bad"), self.fixture.dir, hosts,
                                 bypass_constraints=True)
            result = subprocess.run([OPENSSL, "verify", "-x509_strict", "-CAfile", _Fixture.ca(),
                                     bad], capture_output=True, text=True)
            self.assertNotEqual(result.returncode, 0, hosts)
            self.assertIn("permitted subtree violation", result.stdout + result.stderr)

    def test_python_strict_accepts_the_proxy_and_rejects_a_public_leaf(self):
        server = _serve(self, os.path.join(self.fixture.dir, "cert.pem"),
                        os.path.join(self.fixture.dir, "key.pem"))
        port = server.server_address[1]
        for name in ("localhost", "127.0.0.1", "proxy.example.test"):
            self.assertIn(b" 200 ", _python_handshake(port, _Fixture.ca(), name)[:20])

        # Same CA key, a leaf that also names a public name / address: refused by the chain
        # check itself, even though the name asked for (127.0.0.1) is in the certificate.
        for hosts, asked in (([PUBLIC_NAME, "127.0.0.1"], PUBLIC_NAME),
                             (["127.0.0.1", PUBLIC_IP], "127.0.0.1")):
            cert, key = _write_leaf(os.path.join(_tmpdir(self), "bad"), self.fixture.dir, hosts,
                                    bypass_constraints=True)
            bad = _serve(self, cert, key)
            with self.assertRaises(ssl.SSLCertVerificationError) as caught:
                _python_handshake(bad.server_address[1], _Fixture.ca(), asked)
            self.assertIn("permitted subtree violation", str(caught.exception))

    @unittest.skipIf(CURL is None, "curl is not installed")
    def test_curl_accepts_the_proxy_and_rejects_a_public_leaf(self):
        server = _serve(self, os.path.join(self.fixture.dir, "cert.pem"),
                        os.path.join(self.fixture.dir, "key.pem"))
        url = "https://localhost:%d/_proxy/health" % server.server_address[1]
        result = subprocess.run([CURL, "-sS", "--max-time", "10", "--cacert", _Fixture.ca(), url],
                                capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        # The proxy answered over TLS; its backend here is down, so it reports "degraded".
        self.assertIn(json.loads(result.stdout)["status"], ("ok", "degraded"))

        cert, key = _write_leaf(os.path.join(_tmpdir(self), "bad"), self.fixture.dir,
                                ["localhost", PUBLIC_NAME], bypass_constraints=True)
        bad = _serve(self, cert, key)
        result = subprocess.run([CURL, "-sS", "--max-time", "10", "--cacert", _Fixture.ca(),
                                 "https://localhost:%d/_proxy/health" % bad.server_address[1]],
                                capture_output=True, text=True)
        self.assertEqual(result.returncode, 60, result.stdout + result.stderr)
        self.assertIn("permitted subtree violation", result.stderr)

    @unittest.skipIf(openai is None, "the openai SDK is not installed")
    def test_openai_sdk_accepts_the_proxy(self):
        llm = FakeLLM()
        upstream = start_upstream(self, llm)
        server = support.start_proxy(self, upstream.port,
                                     cert_file=os.path.join(self.fixture.dir, "cert.pem"),
                                     key_file=os.path.join(self.fixture.dir, "key.pem"))
        context = ssl.create_default_context(cafile=_Fixture.ca())
        context.verify_flags |= getattr(ssl, "VERIFY_X509_STRICT", 0)
        client = openai.OpenAI(base_url="https://localhost:%d/v1" % server.server_address[1],
                               api_key="sk-test-not-a-secret", max_retries=0,
                               http_client=openai.DefaultHttpxClient(verify=context, timeout=10))
        completion = client.chat.completions.create(
            model="qwen3:8b", messages=[{"role": "user", "content": "Say hello"}])
        self.assertEqual(completion.choices[0].message.content, "Hello from the fake model.")

    @unittest.skipIf(browser.find_chromium() is None or shutil.which("certutil") is None,
                     "Chromium or certutil is not installed")
    def test_chromium_accepts_the_proxy_and_rejects_a_public_leaf(self):
        server = _serve(self, os.path.join(self.fixture.dir, "cert.pem"),
                        os.path.join(self.fixture.dir, "key.pem"))
        cert, key = _write_leaf(os.path.join(_tmpdir(self), "bad"), self.fixture.dir,
                                ["127.0.0.1", PUBLIC_NAME], bypass_constraints=True)
        bad = _serve(self, cert, key)
        # The control: made the same way, but naming only permitted hosts.
        cert, key = _write_leaf(os.path.join(_tmpdir(self), "control"), self.fixture.dir,
                                ["127.0.0.1", "nas.lan"], bypass_constraints=True)
        control = _serve(self, cert, key)
        home = browser.make_trust_home(_Fixture.ca(), _tmpdir(self))
        errors = {}
        with browser.Browser(home) as chromium:
            result, _ = browser.load_page(
                chromium, "https://localhost:%d/_proxy/health" % server.server_address[1],
                "document.readyState === 'complete'", settle=0)
            for name, target in (("control", control), ("bad", bad)):
                tab = chromium.new_tab()
                try:
                    errors[name] = tab.navigate("https://127.0.0.1:%d/_proxy/health"
                                                % target.server_address[1])
                finally:
                    tab.close()
        self.assertIsNone(result.load_error)
        shown = result.text.replace('":"', '": "')
        self.assertTrue('"status": "ok"' in shown or '"status": "degraded"' in shown, shown)
        self.assertIsNone(errors["control"])
        # Chromium's own verifier reports a constraint violation in a root as ERR_CERT_INVALID.
        self.assertIn(errors["bad"], ("net::ERR_CERT_INVALID",
                                      "net::ERR_CERT_NAME_CONSTRAINT_VIOLATION"))


class CaLifecycleTests(unittest.TestCase):
    def test_an_old_unconstrained_ca_keeps_working_and_is_never_replaced(self):
        directory = _tmpdir(self)
        cert_der, key = proxy.create_ca(constrained=False)
        ca_path = os.path.join(directory, "ca.pem")
        with open(ca_path, "wb") as handle:
            handle.write(proxy._pem_encode(cert_der, "CERTIFICATE"))
        with open(os.path.join(directory, "ca-key.pem"), "wb") as handle:
            handle.write(proxy.private_key_to_pem(key))
        before = open(ca_path, "rb").read()
        status = proxy.ensure_certificates(os.path.join(directory, "cert.pem"),
                                           os.path.join(directory, "key.pem"),
                                           extra_hosts=["proxy.example.com", PUBLIC_IP])
        self.assertFalse(status.ca_created)
        self.assertFalse(status.ca_constrained)
        self.assertNotIn("CA signs only", status.describe())
        self.assertIn("proxy.example.com", status.dns_names)  # as before: no constraints
        self.assertIn(PUBLIC_IP, status.ip_addresses)
        self.assertEqual(open(ca_path, "rb").read(), before)
        again = proxy.ensure_certificates(os.path.join(directory, "cert.pem"),
                                          os.path.join(directory, "key.pem"),
                                          extra_hosts=["proxy.example.com", PUBLIC_IP])
        self.assertEqual(again.action, "kept")
        self.assertEqual(open(ca_path, "rb").read(), before)

    def test_a_public_host_added_after_creation_is_left_out_with_a_warning(self):
        directory = _tmpdir(self)
        shutil.copy(_Fixture.ca(), directory)
        shutil.copy(os.path.join(_Fixture.get().dir, "ca-key.pem"), directory)
        cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        first = proxy.ensure_certificates(cert, key, extra_hosts=["later.example.com", "nas.lan"])
        self.assertEqual(first.action, "created")
        self.assertIn("nas.lan", first.dns_names)
        self.assertNotIn("later.example.com", first.dns_names)
        self.assertTrue(any("later.example.com" in w and "tls.hosts" in w
                            for w in first.warnings), first.warnings)
        # Not wanted again at every start: the certificate is kept, the warning repeated.
        second = proxy.ensure_certificates(cert, key, extra_hosts=["later.example.com", "nas.lan"])
        self.assertEqual(second.action, "kept")
        self.assertEqual(second.serial, first.serial)
        self.assertTrue(any("later.example.com" in w for w in second.warnings))
        # A renewal for a new local name says it too.
        third = proxy.ensure_certificates(cert, key, extra_hosts=["later.example.com", "nas2.lan"])
        self.assertEqual(third.action, "renewed")
        self.assertIn("nas2.lan", third.dns_names)
        self.assertIn("nas.lan", third.dns_names)
        self.assertTrue(any("later.example.com" in w for w in third.warnings), third.warnings)
        self.assertFalse(self.ca_permits_anything_public(third))

    @staticmethod
    def ca_permits_anything_public(status):
        ca = proxy.read_certificate_info(status.ca_file)
        return any(ca.permits(host) for host in ("example.com", "8.8.8.8", "2001:4860::8888"))

    @unittest.skipIf(OPENSSL is None, "openssl is not installed")
    def test_generate_cert_hosts_widen_a_new_ca(self):
        out = os.path.join(_tmpdir(self), "certs")
        result = subprocess.run([sys.executable, os.path.join(ROOT, "generate_cert.py"), "--out",
                                 out, "--host", "93.184.216.9", "--host", "proxy.example.org"],
                                capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        ca = proxy.read_certificate_info(os.path.join(out, "ca.pem"))
        leaf = proxy.read_certificate_info(os.path.join(out, "cert.pem"))
        self.assertIn("proxy.example.org", ca.permitted_dns)
        self.assertIn("93.184.216.9/32", ca.permitted_networks)
        self.assertIn("proxy.example.org", leaf.dns_names)
        self.assertIn("93.184.216.9", leaf.ip_addresses)
        self.assertEqual(_mode(out), 0o700)
        verify = subprocess.run([OPENSSL, "verify", "-x509_strict", "-CAfile",
                                 os.path.join(out, "ca.pem"), os.path.join(out, "cert.pem")],
                                capture_output=True, text=True)
        self.assertEqual(verify.returncode, 0, verify.stdout + verify.stderr)


# ==================================================================================================
# Item 5: trust material another local user could have written
# ==================================================================================================

PROXY_PY = os.path.join(ROOT, "proxy.py")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _run_cli(args, cwd, umask=None, timeout=120):
    """Run proxy.py as a program (umask applied by a shell: no preexec_fn in a threaded test)."""
    argv = [sys.executable, PROXY_PY] + list(args)
    if umask is not None:
        argv = ["/bin/sh", "-c", 'umask %s; exec "$@"' % umask, "sh"] + argv
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def _served_serial(port):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    return proxy.parse_certificate_der(der).serial


@unittest.skipUnless(os.name == "posix" and hasattr(os, "fork"), "POSIX permissions and --daemon")
class UmaskTests(unittest.TestCase):
    def test_umask_000_leaves_nothing_writable_by_others(self):
        home = _tmpdir(self)
        config = os.path.join(home, "config.json")
        with open(config, "w") as handle:
            json.dump({"proxy": {"port": 0, "bind": "127.0.0.1"}}, handle)
        started = _run_cli(["--config", config, "--daemon"], home, umask="000")
        self.addCleanup(_run_cli, ["--config", config, "--stop"], home)
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        self.assertEqual(_mode(os.path.join(home, "certs")), 0o700)
        for name, mode in (("certs/ca-key.pem", 0o600), ("certs/key.pem", 0o600),
                           ("certs/combined.pem", 0o600), ("certs/ca.pem", 0o644),
                           ("certs/cert.pem", 0o644), ("llm-proxy.pid", 0o644),
                           ("llm-proxy.log", 0o644)):
            self.assertEqual(_mode(os.path.join(home, name)), mode, name)
        stopped = _run_cli(["--config", config, "--stop"], home)
        self.assertEqual(stopped.returncode, 0, stopped.stderr)

    def test_certificate_folders_are_made_0700_under_umask_000(self):
        # Also the parents the proxy has to create (tls.cert = deep/inside/certs/cert.pem).
        home = _tmpdir(self)
        code = ("import sys; sys.path.insert(0, %r); import proxy; proxy._write_file_atomic("
                "'deep/inside/certs/ca.pem', b'x', private=False)" % ROOT)
        result = subprocess.run(["/bin/sh", "-c", 'umask 000; exec "$@"', "sh", sys.executable,
                                 "-c", code], cwd=home, capture_output=True, text=True,
                                timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        for folder in ("deep", "deep/inside", "deep/inside/certs"):
            self.assertEqual(_mode(os.path.join(home, folder)), 0o700, folder)
        self.assertEqual(_mode(os.path.join(home, "deep/inside/certs/ca.pem")), 0o644)


@unittest.skipUnless(os.name == "posix", "POSIX ownership and modes")
class PlantedTrustMaterialTests(unittest.TestCase):
    def setUp(self):
        self.dir = _tmpdir(self, "trust-certs-")
        for name in ("ca.pem", "ca-key.pem", "cert.pem", "key.pem", "combined.pem"):
            shutil.copy2(os.path.join(_Fixture.get().dir, name), self.dir)
        self.cert = os.path.join(self.dir, "cert.pem")
        self.key = os.path.join(self.dir, "key.pem")

    def plant_attacker_files(self):
        """What a local user does with a writable folder: their own CA and certificate."""
        attacker = _tmpdir(self, "attacker-")
        proxy.create_ca_files(attacker)
        _write_leaf(attacker, attacker, ["localhost", "127.0.0.1"])
        for name in ("ca.pem", "cert.pem", "key.pem"):
            os.replace(os.path.join(attacker, name), os.path.join(self.dir, name) + ".new")
        # Key first, certificate last, each by rename, as an attacker would to look atomic.
        for name in ("key.pem", "ca.pem", "cert.pem"):
            os.replace(os.path.join(self.dir, name) + ".new", os.path.join(self.dir, name))

    def test_world_writable_folder_is_refused_with_the_fix(self):
        os.chmod(self.dir, 0o777)
        for call in (lambda: proxy.ensure_certificates(self.cert, self.key),
                     lambda: proxy.make_server_ssl_context(self.cert, self.key),
                     lambda: proxy.load_ca(self.dir)):
            with self.assertRaises(proxy.CertificateError) as caught:
                call()
            message = str(caught.exception)
            self.assertIn("writable by every local user", message)
            self.assertIn("chmod go-w " + self.dir, message)

    def test_group_writable_folder_is_refused_unless_the_group_is_ours_alone(self):
        os.chmod(self.dir, 0o770)
        if IS_ROOT:
            os.chown(self.dir, 0, 65534)  # a shared group ("nogroup")
            with self.assertRaisesRegex(proxy.CertificateError, "writable by its group"):
                proxy.make_server_ssl_context(self.cert, self.key)
        import grp
        import pwd
        me = pwd.getpwuid(os.geteuid()).pw_name
        if grp.getgrgid(os.getegid()).gr_name == me:  # a user-private group, as root's is
            os.chown(self.dir, os.geteuid(), os.getegid())
            proxy.make_server_ssl_context(self.cert, self.key)  # accepted

    @unittest.skipUnless(IS_ROOT, "changing a file's owner needs root")
    def test_files_owned_by_another_user_are_refused(self):
        for name in ("key.pem", "cert.pem"):
            path = os.path.join(self.dir, name)
            os.chown(path, 65534, -1)
            with self.assertRaises(proxy.CertificateError) as caught:
                proxy.make_server_ssl_context(self.cert, self.key)
            self.assertIn("belongs to user nobody", str(caught.exception))
            self.assertIn("chown root " + path, str(caught.exception))
            os.chown(path, 0, -1)
        os.chown(self.dir, 65534, -1)
        with self.assertRaisesRegex(proxy.CertificateError, "folder .* belongs to"):
            proxy.ensure_certificates(self.cert, self.key)
        os.chown(self.dir, 0, -1)
        proxy.make_server_ssl_context(self.cert, self.key)  # root reading its own files: fine

    def test_file_watcher_does_not_load_planted_certificates(self):
        server = _serve(self, self.cert, self.key)
        port = server.server_address[1]
        original = _served_serial(port)
        watcher = proxy.Maintenance(server, interval=0.05)
        watcher.start()
        self.addCleanup(watcher.join, 5)
        self.addCleanup(watcher.stopped.set)
        os.chmod(self.dir, 0o777)  # e.g. made under umask 000 by an older version
        self.plant_attacker_files()
        self.assertTrue(support.wait_until(
            lambda: "kept the previous certificate" in support.LOG_BUFFER.getvalue(), 10),
            "the watcher never looked at the planted files")
        self.assertIn("chmod go-w", support.LOG_BUFFER.getvalue())
        self.assertEqual(_served_serial(port), original)
        # After the fix the owner asked for (chmod), a certificate they put there loads.
        os.chmod(self.dir, 0o700)
        proxy.reload_certificate(server, "test")
        self.assertNotEqual(_served_serial(port), original)

    def test_ca_download_refuses_a_planted_ca(self):
        server = _serve(self, self.cert, self.key)
        with open(os.path.join(self.dir, "ca.pem"), "rb") as handle:
            ours = handle.read()
        context = ssl.create_default_context(cafile=_Fixture.ca())

        def connect():
            return http.client.HTTPSConnection("localhost", server.server_address[1],
                                               context=context, timeout=10)
        conn = connect()
        conn.request("GET", "/_proxy/ca.pem")
        answer = conn.getresponse()
        self.assertEqual((answer.status, answer.read()), (200, ours))
        conn.close()
        os.chmod(self.dir, 0o777)
        self.plant_attacker_files()
        for path in ("/_proxy/ca.pem", "/_proxy/ca.crt"):
            conn = connect()  # the TLS context loaded at start is still ours
            conn.request("GET", path)
            answer = conn.getresponse()
            body = answer.read()
            conn.close()
            self.assertEqual(answer.status, 503, body)
            self.assertNotIn(b"BEGIN CERTIFICATE", body)
        self.assertIn("not serving the CA", support.LOG_BUFFER.getvalue())

    def test_check_reports_a_planted_folder(self):
        home = _tmpdir(self)
        config = os.path.join(home, "config.json")
        with open(config, "w") as handle:
            json.dump({"tls": {"cert": self.cert, "key": self.key}}, handle)
        os.chmod(self.dir, 0o777)
        result = _run_cli(["--config", config, "--check"], home)
        self.assertEqual(result.returncode, 2, result.stdout)
        self.assertIn("chmod go-w " + self.dir, result.stderr)


SETPRIV = shutil.which("setpriv")
SYSTEM_PYTHON = "/usr/bin/python3"


@unittest.skipUnless(IS_ROOT and SETPRIV and os.path.exists(SYSTEM_PYTHON),
                     "needs root, setpriv and /usr/bin/python3 to run as another user")
class ServiceUserTests(unittest.TestCase):
    """The proxy as an unprivileged service user (nobody), as under systemd or in Docker."""

    def test_a_service_user_trusts_its_own_and_roots_files_only(self):
        base = _tmpdir(self)
        os.chmod(base, 0o755)
        certs = os.path.join(base, "certs")
        os.mkdir(certs, 0o700)
        for name in ("ca.pem", "cert.pem", "key.pem"):
            shutil.copy(os.path.join(_Fixture.get().dir, name), certs)
            os.chown(os.path.join(certs, name), 65534, 65534)
        os.chown(certs, 65534, 65534)
        program = os.path.join(base, "proxy.py")
        shutil.copy(PROXY_PY, program)
        config = os.path.join(base, "config.json")
        with open(config, "w") as handle:
            json.dump({"tls": {"cert": "certs/cert.pem", "key": "certs/key.pem"}}, handle)
        cert = os.path.join(certs, "cert.pem")

        def check():
            return subprocess.run([SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups",
                                   SYSTEM_PYTHON, program, "--config", config, "--check"],
                                  cwd=base, capture_output=True, text=True, timeout=60)
        result = check()
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        os.chown(cert, 1234, -1)  # another (unprivileged) user's file
        result = check()
        self.assertEqual(result.returncode, 2, result.stdout)
        self.assertIn("belongs to user 1234, not to nobody", result.stderr)
        self.assertIn("chown nobody " + cert, result.stderr)
        os.chown(cert, 0, -1)  # root's file, readable: root is trusted anyway
        self.assertEqual(check().returncode, 0)
        os.chmod(certs, 0o770)  # group "nogroup" is shared, not nobody's private group
        result = check()
        self.assertEqual(result.returncode, 2, result.stdout)
        self.assertIn("writable by its group (gid 65534)", result.stderr)

# ==================================================================================================
# Item 6: no symlinks followed for files the proxy writes
# ==================================================================================================

@unittest.skipUnless(os.name == "posix" and hasattr(os, "fork"), "POSIX symlinks and --daemon")
class PlantedSymlinkTests(unittest.TestCase):
    def setUp(self):
        self.home = _tmpdir(self)
        self.config = os.path.join(self.home, "config.json")
        with open(self.config, "w") as handle:
            json.dump({"proxy": {"port": 0, "bind": "127.0.0.1"}}, handle)
        self.victim = os.path.join(self.home, "victim")
        with open(self.victim, "w") as handle:
            handle.write("precious\n")
        os.chmod(self.victim, 0o600)

    def start(self, *extra):
        result = _run_cli(["--config", self.config, "--daemon"] + list(extra), self.home)
        if result.returncode == 0:  # it started after all (as before the fix): stop it again
            self.addCleanup(_run_cli, ["--config", self.config, "--stop"], self.home)
        return result

    def assert_victim_untouched(self):
        with open(self.victim) as handle:
            self.assertEqual(handle.read(), "precious\n")
        self.assertEqual(_mode(self.victim), 0o600)

    def test_pidfile_symlink_is_refused(self):
        os.symlink(self.victim, os.path.join(self.home, "llm-proxy.pid"))
        result = self.start()
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("llm-proxy.pid: it is a symbolic link, which is not followed",
                      result.stderr)
        self.assert_victim_untouched()
        stopped = _run_cli(["--config", self.config, "--stop"], self.home)
        self.assertEqual(stopped.returncode, 1)
        self.assertIn("symbolic link", stopped.stderr)
        self.assertNotIn("Traceback", stopped.stderr)
        self.assert_victim_untouched()

    def test_log_file_symlink_is_refused(self):
        log_file = os.path.join(self.home, "proxy.log")
        os.symlink(self.victim, log_file)
        result = self.start("--log-file", log_file)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("cannot write log file %s: it is a symbolic link" % log_file,
                      result.stderr)
        self.assert_victim_untouched()
        self.assertFalse(os.path.exists(os.path.join(self.home, "llm-proxy.pid")))

    def test_fifo_and_hard_link_are_refused(self):
        pidfile = os.path.join(self.home, "llm-proxy.pid")
        os.mkfifo(pidfile)
        result = self.start()
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("not a regular file", result.stderr)
        os.unlink(pidfile)
        os.link(self.victim, pidfile)
        result = self.start()
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("hard links", result.stderr)
        self.assert_victim_untouched()
        os.unlink(pidfile)
        log_file = os.path.join(self.home, "fifo.log")
        os.mkfifo(log_file)
        result = self.start("--log-file", log_file)  # would block on open() without a reader
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn("not a regular file", result.stderr)


@unittest.skipUnless(os.name == "posix", "POSIX symlinks")
class AtomicWriteSymlinkTests(unittest.TestCase):
    """A temp file swapped for a symlink between mkstemp() and os.replace() (a race a local
    user can win in a folder they can write) is neither chmod-ed through nor renamed into place."""

    def planting_mkstemp(self, victim):
        real = tempfile.mkstemp

        def mkstemp(*args, **kwargs):
            fd, tmp = real(*args, **kwargs)
            os.unlink(tmp)
            os.symlink(victim, tmp)
            return fd, tmp
        return mock.patch.object(proxy.tempfile, "mkstemp", mkstemp)

    def check(self, write, target):
        victim = os.path.join(_tmpdir(self), "victim")
        with open(victim, "w") as handle:
            handle.write("precious")
        os.chmod(victim, 0o600)
        with self.planting_mkstemp(victim):
            with self.assertRaises(OSError):
                write()
        self.assertEqual(_mode(victim), 0o600)
        with open(victim) as handle:
            self.assertEqual(handle.read(), "precious")
        self.assertFalse(os.path.islink(target), "the planted symlink took the file's name")

    def test_stats_json(self):
        target = os.path.join(_tmpdir(self), "stats.json")
        self.check(lambda: proxy._write_file_atomic(target, b"{}", private=False, make_dirs=False),
                   target)

    def test_certificate_files(self):
        target = os.path.join(_tmpdir(self), "cert.pem")
        self.check(lambda: proxy._write_file_atomic(target, b"pem", private=False), target)


if __name__ == "__main__":
    unittest.main()
