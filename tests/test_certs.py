"""Tests for the certificates section: DER, RSA, X.509 issue/renewal, real TLS, generate_cert.py.

RSA-2048 key generation in pure Python takes ~0.5 s, so keys are made once per class (or once
for the module, see _Shared) and never inside a timed assertion.
"""
from support import proxy, ROOT

import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import unittest
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
GENERATE_CERT = os.path.join(ROOT, "generate_cert.py")
OPENSSL = shutil.which("openssl")


# --------------------------------------------------------------------------- shared fixtures

class _Shared:
    """One directory with a CA + server certificate made by ensure_certificates(), and a second,
    unrelated CA: made on first use, removed in tearDownModule()."""
    dir = None
    status = None
    other_ca_dir = None

    @classmethod
    def get(cls):
        if cls.dir is None:
            cls.dir = tempfile.mkdtemp(prefix="certs-test-")
            cls.status = proxy.ensure_certificates(
                os.path.join(cls.dir, "cert.pem"), os.path.join(cls.dir, "key.pem"),
                extra_hosts=["proxy.example.test", "10.11.12.13"])
            cls.other_ca_dir = tempfile.mkdtemp(prefix="certs-test-other-")
            proxy.create_ca_files(cls.other_ca_dir)
        return cls

    @classmethod
    def path(cls, name):
        return os.path.join(cls.get().dir, name)


def tearDownModule():
    for directory in (_Shared.dir, _Shared.other_ca_dir):
        if directory:
            shutil.rmtree(directory, ignore_errors=True)


def _read(path):
    with open(path, "rb") as handle:
        return handle.read()


# --------------------------------------------------------------------------- DER

class DerEncodingTests(unittest.TestCase):
    def test_integers(self):
        self.assertEqual(proxy._der_integer(0), bytes.fromhex("020100"))
        self.assertEqual(proxy._der_integer(127), bytes.fromhex("02017f"))
        self.assertEqual(proxy._der_integer(128), bytes.fromhex("02020080"))
        self.assertEqual(proxy._der_integer(255), bytes.fromhex("020200ff"))
        self.assertEqual(proxy._der_integer(256), bytes.fromhex("02020100"))
        self.assertEqual(proxy._der_integer(65537), bytes.fromhex("0203010001"))
        self.assertEqual(proxy._der_integer(2 ** 127),
                         bytes.fromhex("021100") + b"\x80" + bytes(15))

    def test_lengths(self):
        self.assertEqual(proxy._der_len(0), b"\x00")
        self.assertEqual(proxy._der_len(127), b"\x7f")
        self.assertEqual(proxy._der_len(128), b"\x81\x80")
        self.assertEqual(proxy._der_len(255), b"\x81\xff")
        self.assertEqual(proxy._der_len(256), b"\x82\x01\x00")
        self.assertEqual(proxy._der_octet_string(bytes(128))[:3], b"\x04\x81\x80")
        self.assertEqual(proxy._der_octet_string(bytes(256))[:4], b"\x04\x82\x01\x00")

    def test_oids(self):
        self.assertEqual(proxy._der_oid("1.2.840.113549.1.1.11"),
                         bytes.fromhex("06092a864886f70d01010b"))
        self.assertEqual(proxy._der_oid("2.5.29.17"), bytes.fromhex("0603551d11"))
        self.assertEqual(proxy._der_oid("1.3.6.1.5.5.7.3.1"), bytes.fromhex("06082b06010505070301"))
        for dotted in ("1.2.840.113549.1.1.11", "2.5.4.3", "2.16.840.1.101.3.4.2.1", "2.999.1"):
            node = proxy._der_parse_one(proxy._der_oid(dotted))
            self.assertEqual(proxy._der_to_oid(node), dotted)

    def test_simple_types(self):
        self.assertEqual(proxy._der_null(), b"\x05\x00")
        self.assertEqual(proxy._der_boolean(True), b"\x01\x01\xff")
        self.assertEqual(proxy._der_sequence(), b"\x30\x00")
        self.assertEqual(proxy._der_utf8_string("é"), b"\x0c\x02\xc3\xa9")
        self.assertEqual(proxy._der_printable_string("US"), b"\x13\x02US")
        self.assertRaises(ValueError, proxy._der_printable_string, "a@b")
        self.assertEqual(proxy._der_context(0, b"\x02\x01\x02"), b"\xa0\x03\x02\x01\x02")
        self.assertEqual(proxy._der_context(2, b"ab", constructed=False), b"\x82\x02ab")
        # SET OF is sorted by encoding in DER
        self.assertEqual(proxy._der_set(b"\x02\x01\x05", b"\x02\x01\x01"),
                         b"\x31\x06\x02\x01\x01\x02\x01\x05")

    def test_key_usage_bits(self):
        # digitalSignature + keyEncipherment: bits 0 and 2 -> 0xA0, 5 unused bits
        self.assertEqual(proxy._der_named_bits([0, 2]), bytes.fromhex("030205a0"))
        # digitalSignature + keyCertSign + cRLSign: bits 0, 5, 6 -> 0x86, 1 unused bit
        self.assertEqual(proxy._der_named_bits([0, 5, 6]), bytes.fromhex("03020186"))
        self.assertEqual(proxy._der_named_bits([8]), bytes.fromhex("0303070080"))

    def test_times(self):
        utc = datetime.timezone.utc
        t2049 = datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=utc)
        t2050 = datetime.datetime(2050, 1, 1, 0, 0, 0, tzinfo=utc)
        self.assertEqual(proxy._der_time(t2049), b"\x17\x0d491231235959Z")
        self.assertEqual(proxy._der_time(t2050), b"\x18\x0f20500101000000Z")
        for moment in (t2049, t2050, datetime.datetime(1999, 1, 2, 3, 4, 5, tzinfo=utc)):
            self.assertEqual(proxy._der_to_time(proxy._der_parse_one(proxy._der_time(moment))),
                             moment)
        # a non-UTC aware datetime is converted, not mislabelled
        cet = datetime.timezone(datetime.timedelta(hours=1))
        self.assertEqual(proxy._der_time(datetime.datetime(2030, 1, 1, 1, 0, tzinfo=cet)),
                         b"\x17\x0d300101000000Z")

    def test_reader(self):
        encoded = proxy._der_sequence(proxy._der_integer(300), proxy._der_octet_string(bytes(200)))
        node = proxy._der_parse_one(encoded, 0x30)
        first, second = proxy._der_children(node.content)
        self.assertEqual(proxy._der_to_int(first), 300)
        self.assertEqual(second.content, bytes(200))
        self.assertEqual(node.raw, encoded)
        self.assertRaises(ValueError, proxy._der_parse_one, encoded[:-1])        # truncated
        self.assertRaises(ValueError, proxy._der_parse_one, encoded + b"\x00")   # trailing
        self.assertRaises(ValueError, proxy._der_parse_one, b"\x30\x80\x00\x00")  # indefinite
        self.assertRaises(ValueError, proxy._der_parse_one, encoded, 0x31)       # wrong tag


# --------------------------------------------------------------------------- RSA

class RsaTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # The shared CA key was made by generate_rsa_key(); reading it back also tests PKCS#8.
        cls.key = proxy.read_private_key(_Shared.path("ca-key.pem"))

    def test_key_is_consistent(self):
        k = self.key
        self.assertEqual(k.n.bit_length(), 2048)
        self.assertEqual(k.e, 65537)
        self.assertEqual(k.n, k.p * k.q)
        self.assertNotEqual(k.p, k.q)
        self.assertTrue(proxy._is_probable_prime(k.p, 10) and proxy._is_probable_prime(k.q, 10))
        lam = (k.p - 1) * (k.q - 1) // __import__("math").gcd(k.p - 1, k.q - 1)
        self.assertEqual(k.d * k.e % lam, 1)
        self.assertEqual(k.dp, k.d % (k.p - 1))
        self.assertEqual(k.dq, k.d % (k.q - 1))
        self.assertEqual(k.qinv * k.q % k.p, 1)
        self.assertEqual(pow(pow(12345, k.e, k.n), k.d, k.n), 12345)

    def test_sign_verify(self):
        sig = proxy.rsa_sign_sha256(self.key, b"hello")
        self.assertEqual(len(sig), 256)
        self.assertTrue(proxy.rsa_verify_sha256(self.key.n, self.key.e, b"hello", sig))
        self.assertFalse(proxy.rsa_verify_sha256(self.key.n, self.key.e, b"hellp", sig))
        tampered = bytes([sig[0] ^ 1]) + sig[1:]
        self.assertFalse(proxy.rsa_verify_sha256(self.key.n, self.key.e, b"hello", tampered))
        self.assertFalse(proxy.rsa_verify_sha256(self.key.n, self.key.e, b"hello", sig[1:]))
        other = proxy.read_private_key(os.path.join(_Shared.get().other_ca_dir, "ca-key.pem"))
        self.assertFalse(proxy.rsa_verify_sha256(other.n, other.e, b"hello", sig))

    def test_pem_round_trip_pkcs8_and_pkcs1(self):
        pem = proxy.private_key_to_pem(self.key)
        self.assertTrue(pem.startswith(b"-----BEGIN PRIVATE KEY-----\n"))
        self.assertEqual(proxy.load_private_key_pem(pem), self.key)
        # PKCS#1 "RSA PRIVATE KEY" is read too (inner structure of the PKCS#8 one).
        inner = proxy._der_children(proxy._der_parse_one(proxy.ca_pem_to_der(
            pem.replace(b"PRIVATE KEY", b"CERTIFICATE"))).content)[2].content
        self.assertEqual(proxy.load_private_key_pem(proxy._pem_encode(inner, "RSA PRIVATE KEY")),
                         self.key)
        self.assertRaises(proxy.CertificateError, proxy.load_private_key_pem, b"nothing here")

    def test_miller_rabin(self):
        for prime in (2, 3, 5, 7919, 2 ** 61 - 1, 2 ** 127 - 1):
            self.assertTrue(proxy._is_probable_prime(prime), prime)
        for composite in (1, 4, 561, 1105, 2 ** 61 + 1, (2 ** 61 - 1) * (2 ** 31 - 1)):
            self.assertFalse(proxy._is_probable_prime(composite), composite)

    @unittest.skipUnless(OPENSSL, "openssl not installed")
    def test_openssl_agrees_on_signatures(self):
        with tempfile.TemporaryDirectory() as tmp:
            key_path = os.path.join(tmp, "key.pem")
            with open(key_path, "wb") as handle:
                handle.write(proxy.private_key_to_pem(self.key))
            msg, sig_path, pub = (os.path.join(tmp, n) for n in ("msg", "sig", "pub.pem"))
            with open(msg, "wb") as handle:
                handle.write(b"message to sign")
            with open(sig_path, "wb") as handle:
                handle.write(proxy.rsa_sign_sha256(self.key, b"message to sign"))
            subprocess.run([OPENSSL, "pkey", "-in", key_path, "-pubout", "-out", pub], check=True,
                           capture_output=True)
            ok = subprocess.run([OPENSSL, "dgst", "-sha256", "-verify", pub, "-signature",
                                 sig_path, msg], capture_output=True)
            self.assertEqual(ok.returncode, 0, ok.stdout + ok.stderr)
            # and we accept OpenSSL's signature of the same message
            made = subprocess.run([OPENSSL, "dgst", "-sha256", "-sign", key_path, msg],
                                  capture_output=True, check=True).stdout
            self.assertTrue(proxy.rsa_verify_sha256(self.key.n, self.key.e, b"message to sign",
                                                    made))


# --------------------------------------------------------------------------- TLS

class _TlsServer:
    """A TLS server on 127.0.0.1 that greets each client with b"hello" after the handshake."""

    def __init__(self, certfile, keyfile=None):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certfile, keyfile)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"hello")
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate: that is what negative tests expect

    def close(self):
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()


def _client_hello(port, cafile, server_hostname):
    context = ssl.create_default_context(cafile=cafile)
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # what Python 3.13 clients do by default
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            return tls.recv(5)


class TlsTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        shared = _Shared.get()
        cls.ca = _Shared.path("ca.pem")
        cls.other_ca = os.path.join(shared.other_ca_dir, "ca.pem")
        cls.server = _TlsServer(_Shared.path("cert.pem"), _Shared.path("key.pem"))
        cls.combined_server = _TlsServer(_Shared.path("combined.pem"))

    @classmethod
    def tearDownClass(cls):
        cls.server.close()
        cls.combined_server.close()

    def test_handshake_by_name_and_ip(self):
        for name in ("localhost", "127.0.0.1", "::1", "proxy.example.test", "10.11.12.13"):
            with self.subTest(name=name):
                self.assertEqual(_client_hello(self.server.port, self.ca, name), b"hello")

    def test_handshake_with_discovered_names(self):
        # Only the name checked differs; the connection always goes to 127.0.0.1. A public
        # address of this machine is left out: the name-constrained CA may not sign for it.
        ca = proxy.read_certificate_info(self.ca)
        for name in proxy.discover_hosts():
            if not ca.permits(name):
                self.assertNotIn(name, proxy.read_certificate_info(_Shared.path("cert.pem"))
                                 .ip_addresses)
                continue
            with self.subTest(name=name):
                self.assertEqual(_client_hello(self.server.port, self.ca, name), b"hello")

    def test_combined_pem_serves(self):
        self.assertEqual(_client_hello(self.combined_server.port, self.ca, "localhost"), b"hello")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(_Shared.path("combined.pem"))  # raises if unreadable

    def test_wrong_host_name_fails(self):
        for name in ("not-this-host.example", "127.0.0.2", "::2"):
            with self.subTest(name=name):
                with self.assertRaises(ssl.SSLCertVerificationError) as caught:
                    _client_hello(self.server.port, self.ca, name)
                self.assertIn("mismatch", caught.exception.verify_message.lower())

    def test_other_ca_fails(self):
        with self.assertRaises(ssl.SSLCertVerificationError):
            _client_hello(self.server.port, self.other_ca, "localhost")

    def test_ca_pem_to_der(self):
        pem = _read(self.ca)
        self.assertEqual(proxy.ca_pem_to_der(pem), ssl.PEM_cert_to_DER_cert(pem.decode()))
        self.assertRaises(proxy.CertificateError, proxy.ca_pem_to_der, b"junk")


class CertificateContentTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.ca = proxy.read_certificate_info(_Shared.path("ca.pem"))
        cls.cert = proxy.read_certificate_info(_Shared.path("cert.pem"))

    def test_server_certificate_fields(self):
        cert = self.cert
        self.assertIn("localhost", cert.dns_names)
        self.assertIn("proxy.example.test", cert.dns_names)
        self.assertIn("127.0.0.1", cert.ip_addresses)
        self.assertIn("::1", cert.ip_addresses)
        self.assertIn("10.11.12.13", cert.ip_addresses)
        for name in cert.dns_names:  # IP literals never end up as DNS names
            self.assertRaises(ValueError, ipaddress.ip_address, name)
        self.assertFalse(cert.is_ca)
        self.assertTrue(cert.server_auth)
        self.assertEqual(cert.subject_cn, "localhost")
        self.assertEqual(cert.authority_key_id, self.ca.subject_key_id)
        self.assertEqual(cert.signature_algorithm, "1.2.840.113549.1.1.11")
        self.assertLessEqual(cert.not_after - cert.not_before, datetime.timedelta(days=825))
        self.assertTrue(0 < cert.serial < 2 ** 159)
        self.assertLess(cert.not_before, datetime.datetime.now(datetime.timezone.utc)
                        - datetime.timedelta(minutes=50))
        self.assertTrue(proxy.certificate_issued_by(cert, self.ca))

    def test_ca_fields(self):
        self.assertTrue(self.ca.is_ca)
        self.assertTrue(self.ca.subject_cn.startswith("llm-proxy local CA ("))
        self.assertEqual(self.ca.subject_der, self.ca.issuer_der)
        self.assertGreater(self.ca.not_after - self.ca.not_before, datetime.timedelta(days=3600))
        self.assertTrue(proxy.certificate_issued_by(self.ca, self.ca))
        other = proxy.read_certificate_info(os.path.join(_Shared.get().other_ca_dir, "ca.pem"))
        self.assertFalse(proxy.certificate_issued_by(self.cert, other))

    def test_validity_cap(self):
        ca_key = proxy.read_private_key(_Shared.path("ca-key.pem"))
        server_key = proxy.read_private_key(_Shared.path("key.pem"))  # reuse: no keygen
        der, _ = proxy.issue_server_certificate(self.ca.der, ca_key, ["localhost"], days=825,
                                                key=server_key)
        info = proxy.parse_certificate_der(der)
        self.assertLessEqual(info.not_after - info.not_before, datetime.timedelta(days=825))
        self.assertRaises(ValueError, proxy.issue_server_certificate, self.ca.der, ca_key,
                          ["localhost"], 826, server_key)
        self.assertRaises(proxy.CertificateError, proxy.issue_server_certificate, self.ca.der,
                          server_key, ["localhost"], 30, server_key)  # wrong CA key


@unittest.skipUnless(OPENSSL, "openssl not installed")
class OpensslTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        _Shared.get()

    def openssl(self, *args):
        return subprocess.run([OPENSSL] + list(args), capture_output=True, text=True)

    def test_verify_chain(self):
        result = self.openssl("verify", "-x509_strict", "-purpose", "sslserver", "-CAfile",
                              _Shared.path("ca.pem"), _Shared.path("cert.pem"))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("OK", result.stdout)
        wrong = self.openssl("verify", "-CAfile", os.path.join(_Shared.get().other_ca_dir,
                                                               "ca.pem"), _Shared.path("cert.pem"))
        self.assertNotEqual(wrong.returncode, 0)

    def test_text_dump(self):
        text = self.openssl("x509", "-in", _Shared.path("cert.pem"), "-noout", "-text").stdout
        for needle in ("DNS:localhost", "DNS:proxy.example.test", "IP Address:127.0.0.1",
                       "IP Address:0:0:0:0:0:0:0:1", "IP Address:10.11.12.13",
                       "TLS Web Server Authentication", "Digital Signature, Key Encipherment",
                       "CA:FALSE", "Public-Key: (2048 bit)", "sha256WithRSAEncryption",
                       "X509v3 Subject Key Identifier", "X509v3 Authority Key Identifier"):
            self.assertIn(needle, text)
        self.assertRegex(text, r"X509v3 Key Usage: critical")
        ca_text = self.openssl("x509", "-in", _Shared.path("ca.pem"), "-noout", "-text").stdout
        self.assertRegex(ca_text, r"X509v3 Basic Constraints: critical\s+CA:TRUE")
        self.assertIn("Certificate Sign, CRL Sign", ca_text)
        self.assertIn("CN = llm-proxy local CA (", ca_text)

    def test_validity_at_most_825_days(self):
        out = self.openssl("x509", "-in", _Shared.path("cert.pem"), "-noout", "-startdate",
                           "-enddate").stdout
        dates = dict(line.split("=", 1) for line in out.strip().splitlines())
        parse = lambda s: datetime.datetime.strptime(s.replace("  ", " "), "%b %d %H:%M:%S %Y GMT")
        length = parse(dates["notAfter"]) - parse(dates["notBefore"])
        self.assertLessEqual(length, datetime.timedelta(days=825))
        self.assertGreater(length, datetime.timedelta(days=700))

    def test_keys_check(self):
        for name in ("key.pem", "ca-key.pem"):
            result = self.openssl("rsa", "-check", "-noout", "-in", _Shared.path(name))
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn("RSA key ok", result.stdout)


# --------------------------------------------------------------------------- ensure_certificates

class EnsureCertificatesTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="certs-ensure-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def paths(self, directory=None):
        directory = directory or self.tmp
        return os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")

    def copy_shared(self, *names):
        for name in names:
            shutil.copy2(_Shared.path(name), os.path.join(self.tmp, name))

    def test_first_run_created_files_and_modes(self):
        status = _Shared.get().status
        self.assertEqual(status.action, "created")
        self.assertTrue(status.ca_created)
        self.assertEqual(status.ca_file, _Shared.path("ca.pem"))
        self.assertIn("proxy.example.test", status.dns_names)
        self.assertIn("describe", dir(status))
        self.assertIn("NEW", status.describe())
        if os.name == "posix":
            for name, mode in (("ca-key.pem", 0o600), ("key.pem", 0o600), ("combined.pem", 0o600),
                               ("ca.pem", 0o644), ("cert.pem", 0o644)):
                self.assertEqual(stat.S_IMODE(os.stat(_Shared.path(name)).st_mode), mode, name)
        leftovers = [n for n in os.listdir(_Shared.dir) if n.endswith(".tmp")]
        self.assertEqual(leftovers, [])

    def test_second_run_keeps_everything(self):
        shared = _Shared.get()
        before = {n: _read(_Shared.path(n)) for n in os.listdir(shared.dir)}
        status = proxy.ensure_certificates(_Shared.path("cert.pem"), _Shared.path("key.pem"),
                                           extra_hosts=["proxy.example.test", "10.11.12.13"])
        self.assertEqual(status.action, "kept")
        self.assertEqual(status.serial, shared.status.serial)
        self.assertFalse(status.ca_created)
        self.assertEqual({n: _read(_Shared.path(n)) for n in os.listdir(shared.dir)}, before)

    def test_renews_near_expiry_and_for_new_host_with_same_ca(self):
        self.copy_shared("ca.pem", "ca-key.pem")
        ca_before = _read(os.path.join(self.tmp, "ca.pem"))
        cert, key = self.paths()
        first = proxy.ensure_certificates(cert, key, days=10)
        self.assertEqual(first.action, "created")
        self.assertFalse(first.ca_created)  # existing CA reused

        renewed = proxy.ensure_certificates(cert, key)  # expires within 30 days -> re-issue
        self.assertEqual(renewed.action, "renewed")
        self.assertIn("expires", renewed.reasons[0])
        self.assertNotEqual(renewed.serial, first.serial)
        self.assertGreater(renewed.not_after - first.not_after, datetime.timedelta(days=700))

        # (a name inside the CA's constraints: a CA now signs only local names)
        added = proxy.ensure_certificates(cert, key, extra_hosts=["new-name.home.arpa"])
        self.assertEqual(added.action, "renewed")
        self.assertIn("new-name.home.arpa", added.reasons[0])
        self.assertIn("new-name.home.arpa", added.dns_names)

        again = proxy.ensure_certificates(cert, key)  # old names are kept on renewal
        self.assertEqual(again.action, "kept")
        self.assertIn("new-name.home.arpa", again.dns_names)

        self.assertEqual(_read(os.path.join(self.tmp, "ca.pem")), ca_before)
        ca = proxy.read_certificate_info(os.path.join(self.tmp, "ca.pem"))
        self.assertTrue(proxy.certificate_issued_by(proxy.read_certificate_info(cert), ca))
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(os.path.join(self.tmp,
                                                                             "combined.pem"))

    def test_user_supplied_certificate_is_never_touched(self):
        # Our server cert without its CA is, for this directory, somebody else's certificate.
        self.copy_shared("cert.pem", "key.pem")
        cert, key = self.paths()
        before = (_read(cert), _read(key), os.stat(cert).st_mtime_ns)
        status = proxy.ensure_certificates(cert, key, extra_hosts=["other.example.test"])
        self.assertEqual(status.action, "external")
        self.assertIsNone(status.ca_file)
        self.assertTrue(any("other.example.test" in w for w in status.warnings))
        self.assertEqual((_read(cert), _read(key), os.stat(cert).st_mtime_ns), before)
        self.assertEqual(sorted(os.listdir(self.tmp)), ["cert.pem", "key.pem"])

        # ... and an unrelated CA beside it changes nothing.
        for name in ("ca.pem", "ca-key.pem"):
            shutil.copy2(os.path.join(_Shared.get().other_ca_dir, name), self.tmp)
        status = proxy.ensure_certificates(cert, key, extra_hosts=["other.example.test"])
        self.assertEqual(status.action, "external")
        self.assertEqual((_read(cert), _read(key), os.stat(cert).st_mtime_ns), before)

    @unittest.skipUnless(OPENSSL, "openssl not installed")
    def test_user_supplied_ec_certificate_from_openssl(self):
        cert, key = self.paths()
        subprocess.run([OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "5", "-subj", "/CN=user.example", "-addext",
                        "subjectAltName=DNS:user.example,IP:192.0.2.77"],
                       check=True, capture_output=True)
        before = (_read(cert), _read(key))
        status = proxy.ensure_certificates(cert, key)
        self.assertEqual(status.action, "external")
        self.assertEqual(status.dns_names, ("user.example",))
        self.assertEqual(status.ip_addresses, ("192.0.2.77",))
        self.assertTrue(any("expires" in w for w in status.warnings))
        self.assertEqual((_read(cert), _read(key)), before)

    def test_half_pairs_are_errors(self):
        cert, key = self.paths()
        self.copy_shared("cert.pem", "ca.pem", "ca-key.pem")
        with self.assertRaises(proxy.CertificateError) as caught:
            proxy.ensure_certificates(cert, key)
        self.assertIn("key.pem", str(caught.exception))
        self.assertIsInstance(caught.exception, proxy.ProxyError)
        os.remove(cert)
        self.copy_shared("key.pem")
        before = _read(key)
        with self.assertRaises(proxy.CertificateError):
            proxy.ensure_certificates(cert, key)
        self.assertEqual(_read(key), before)
        self.assertFalse(os.path.exists(cert))

    def test_half_a_ca_is_an_error(self):
        self.copy_shared("ca.pem")
        cert, key = self.paths()
        with self.assertRaises(proxy.CertificateError) as caught:
            proxy.ensure_certificates(cert, key)
        self.assertIn("ca-key.pem", str(caught.exception))
        self.assertEqual(os.listdir(self.tmp), ["ca.pem"])

    def test_mismatched_key_is_an_error(self):
        self.copy_shared("cert.pem", "ca.pem", "ca-key.pem")
        shutil.copy2(_Shared.path("ca-key.pem"), os.path.join(self.tmp, "key.pem"))
        with self.assertRaises(proxy.CertificateError) as caught:
            proxy.ensure_certificates(*self.paths())
        self.assertIn("does not belong", str(caught.exception))

    def test_bad_arguments_are_certificate_errors(self):
        self.assertRaises(proxy.CertificateError, proxy.ensure_certificates, *self.paths(),
                          extra_hosts=["bad host!"])
        self.assertRaises(proxy.CertificateError, proxy.ensure_certificates, *self.paths(),
                          days=826)
        self.assertEqual(os.listdir(self.tmp), [])


# --------------------------------------------------------------------------- hosts

class HostTests(unittest.TestCase):
    def test_normalize_hosts(self):
        dns, ips = proxy.normalize_hosts(["Example.COM.", "127.0.0.1", "[::1]", "example.com",
                                          "*.lan.example", "FD00::0002", "bücher.example"])
        self.assertEqual(dns, ["example.com", "*.lan.example", "xn--bcher-kva.example"])
        self.assertEqual(ips, ["127.0.0.1", "::1", "fd00::2"])
        for bad in ("bad host", "*.com", "a..b", "-x.example", "x" * 64 + ".example", "",
                    "fe80::1%eth0", "1.2.3.4:80"):
            with self.subTest(bad=bad):
                self.assertRaises(ValueError, proxy.normalize_hosts, [bad])

    def test_discover_hosts_basics(self):
        hosts = proxy.discover_hosts()
        self.assertEqual(hosts[0], "localhost")
        self.assertIn("127.0.0.1", hosts)
        self.assertIn("::1", hosts)
        self.assertEqual(len(hosts), len(set(hosts)))
        dns, ips = proxy.normalize_hosts(hosts)  # everything is valid
        for ip in ips:
            self.assertFalse(ipaddress.ip_address(ip).is_link_local, ip)

    def test_discovery_sends_nothing(self):
        forbidden = mock.Mock(side_effect=AssertionError("network use during discovery"))
        with mock.patch.object(socket.socket, "connect", forbidden), \
                mock.patch.object(socket.socket, "sendto", forbidden), \
                mock.patch.object(socket.socket, "send", forbidden):
            proxy.discover_hosts()
        forbidden.assert_not_called()

    def test_discovery_degrades_on_other_platforms(self):
        def boom(*args, **kwargs):
            raise OSError("no")
        with mock.patch.object(proxy.sys, "platform", "darwin"), \
                mock.patch.object(proxy.socket, "getaddrinfo", boom), \
                mock.patch.object(proxy.socket, "gethostname", boom):
            self.assertEqual(proxy.discover_hosts(), ["localhost", "127.0.0.1", "::1"])
        fake = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.168.7.9", 0)),
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fe80::1%en0", 0, 0, 4)),
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::5", 0, 0, 0))]
        with mock.patch.object(proxy.sys, "platform", "win32"), \
                mock.patch.object(proxy.socket, "getaddrinfo", return_value=fake), \
                mock.patch.object(proxy.socket, "gethostname", return_value="DESKTOP-1"):
            self.assertEqual(proxy.discover_hosts(),
                             ["localhost", "desktop-1", "desktop-1.local", "127.0.0.1", "::1",
                              "192.168.7.9", "2001:db8::5"])

    def test_proc_if_inet6_parsing(self):
        lines = [
            "fe8000000000000000fc00fffe000001 04 40 20 80     eth0",   # link-local (kept here,
            "fd000000000000000000000000000002 04 40 00 82     eth0",   #   dropped by discover)
            "20010db8000000000000000000000009 04 40 00 01     eth0",   # temporary: skipped
            "20010db8000000000000000000000010 04 40 00 20     eth0",   # deprecated: skipped
            "20010db8000000000000000000000011 04 40 00 00     eth0",
            "00000000000000000000000000000001 01 80 10 80       lo",
        ]
        with tempfile.NamedTemporaryFile("w", delete=False) as handle:
            handle.write("\n".join(lines) + "\n")
        self.addCleanup(os.remove, handle.name)
        self.assertEqual(proxy._linux_ipv6_addresses(handle.name),
                         ["fe80::fc:ff:fe00:1", "fd00::2", "2001:db8::11", "::1"])

    def test_trust_instructions(self):
        text = proxy.trust_instructions("/x/certs/ca.pem", "https://192.0.2.1:8443/_proxy/ca.crt")
        for needle in ("security add-trusted-cert", "certutil -addstore -f Root /x/certs/ca.pem",
                       "update-ca-certificates", "update-ca-trust", "about:config",
                       "Certificate Trust Settings", "Install a certificate",
                       "https://192.0.2.1:8443/_proxy/ca.crt", "/x/certs/ca-key.pem"):
            self.assertIn(needle, text)


# --------------------------------------------------------------------------- generate_cert.py

class GenerateCertCliTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="certs-cli-")
        cls.out = os.path.join(cls.tmp, "certs")
        cls.first = cls.run_cli("--out", cls.out, "--host", "cli.example.test")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @staticmethod
    def run_cli(*args):
        return subprocess.run([sys.executable, GENERATE_CERT] + list(args), capture_output=True,
                              text=True, timeout=120)

    def file(self, name):
        return os.path.join(self.out, name)

    def test_a_first_run_writes_everything(self):
        self.assertEqual(self.first.returncode, 0, self.first.stderr)
        for name in ("ca.pem", "ca-key.pem", "cert.pem", "key.pem", "combined.pem"):
            self.assertIn(self.file(name), self.first.stdout)
            self.assertTrue(os.path.exists(self.file(name)))
        self.assertIn("cli.example.test", self.first.stdout)
        self.assertIn("Certificate Trust Settings", self.first.stdout)
        self.assertIn("cli.example.test",
                      proxy.read_certificate_info(self.file("cert.pem")).dns_names)

    def test_b_second_run_without_force_keeps_everything_and_prints_the_steps(self):
        # README: `python3 generate_cert.py` prints the trust steps, also after the first start.
        before = {n: _read(self.file(n)) for n in os.listdir(self.out)}
        result = self.run_cli("--out", self.out)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("server certificate (kept)", result.stdout)
        self.assertIn("Certificate Trust Settings", result.stdout)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual({n: _read(self.file(n)) for n in os.listdir(self.out)}, before)

    def test_c_renew_keeps_ca_and_changes_serial(self):
        ca_before = _read(self.file("ca.pem"))
        ca_key_before = _read(self.file("ca-key.pem"))
        serial_before = proxy.read_certificate_info(self.file("cert.pem")).serial
        result = self.run_cli("--out", self.out, "--renew", "--days", "30")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(_read(self.file("ca.pem")), ca_before)
        self.assertEqual(_read(self.file("ca-key.pem")), ca_key_before)
        cert = proxy.read_certificate_info(self.file("cert.pem"))
        self.assertNotEqual(cert.serial, serial_before)
        self.assertLessEqual(cert.not_after - cert.not_before, datetime.timedelta(days=30, hours=1))
        self.assertTrue(proxy.certificate_issued_by(
            cert, proxy.read_certificate_info(self.file("ca.pem"))))
        self.assertIn("unchanged", result.stdout)
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.file("combined.pem"))
        if os.name == "posix":
            self.assertEqual(stat.S_IMODE(os.stat(self.file("key.pem")).st_mode), 0o600)

    def test_days_over_825_is_a_usage_error(self):
        out = os.path.join(self.tmp, "never")
        result = self.run_cli("--out", out, "--days", "900")
        self.assertEqual(result.returncode, 2)
        self.assertIn("error: argument --days", result.stderr)
        self.assertIn("825", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertFalse(os.path.exists(out))

    def test_bad_host_and_renew_without_ca(self):
        out = os.path.join(self.tmp, "empty")
        result = self.run_cli("--out", out, "--host", "not a host")
        self.assertEqual(result.returncode, 2)
        self.assertIn("argument --host", result.stderr)
        result = self.run_cli("--out", out, "--renew")
        self.assertEqual(result.returncode, 2)
        self.assertTrue(result.stderr.startswith("error: --renew needs the existing CA"),
                        result.stderr)
        self.assertFalse(os.path.exists(os.path.join(out, "key.pem")))

    def test_parser_is_importable(self):
        sys.path.insert(0, ROOT)
        try:
            import generate_cert
        finally:
            sys.path.remove(ROOT)
        args = generate_cert.build_parser().parse_args(["--host", "a.example", "--host", "::1"])
        self.assertEqual(args.host, ["a.example", "::1"])
        self.assertEqual(args.days, proxy.SERVER_CERT_DEFAULT_DAYS)
        self.assertEqual(args.out, "./certs")


if __name__ == "__main__":
    unittest.main()
