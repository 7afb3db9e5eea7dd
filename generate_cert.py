#!/usr/bin/env python3
"""Create the local CA and the TLS certificate for the LLM proxy (standard library only).

    python3 generate_cert.py                # make what is missing, then print the trust steps
    python3 generate_cert.py --host llm.lan # add a name or IP address (repeatable), same CA
    python3 generate_cert.py --renew        # new server certificate now, same CA
    python3 generate_cert.py --force        # start over: new CA and certificate

The server certificate names this machine: localhost, its host name, <host name>.local, 127.0.0.1,
::1 and every LAN address, plus --host. Install ca.pem as trusted once on each device. The proxy
(python3 proxy.py) also creates these files at start-up when they are missing, and re-issues its
certificate (same CA) before it expires or when this machine's addresses change.
"""

import argparse
import importlib.util
import os
import sys
from typing import List, Optional


def _load_proxy_module():
    """Load the proxy.py that sits beside this file: all the certificate machinery lives there
    (proxy.py must work when copied alone), and this is only its command line. Loaded by path,
    so an unrelated module named "proxy" elsewhere on sys.path can never be picked up instead."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "proxy.py")
    spec = importlib.util.spec_from_file_location("proxy", path)
    if spec is None or not os.path.exists(path):
        sys.exit("error: generate_cert.py needs proxy.py in the same folder (%s)" % path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["proxy"] = module      # dataclasses look their module up while the file loads
    spec.loader.exec_module(module)
    return module


proxy = _load_proxy_module()


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a whole number of days, got %r" % text) from None
    if not 1 <= value <= proxy.SERVER_CERT_MAX_DAYS:
        raise argparse.ArgumentTypeError(
            "must be between 1 and %d (Apple rejects TLS certificates valid for longer), got %d"
            % (proxy.SERVER_CERT_MAX_DAYS, value))
    return value


def _host(text: str) -> str:
    try:
        proxy.normalize_hosts([text])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of generate_cert.py."""
    parser = argparse.ArgumentParser(
        prog="generate_cert.py",
        description="Create a local CA and a TLS server certificate for the LLM proxy "
                    "(like mkcert, standard library only).")
    parser.add_argument("--out", metavar="DIR", default=proxy.CERT_DIR_DEFAULT,
                        help="directory for ca.pem, ca-key.pem, cert.pem, key.pem, combined.pem "
                             "(default: %(default)s)")
    parser.add_argument("--host", metavar="NAME_OR_IP", action="append", default=[], type=_host,
                        help="extra DNS name or IP address for the certificate (repeatable); "
                             "this machine's names and addresses are always included")
    parser.add_argument("--days", metavar="N", type=_days, default=proxy.SERVER_CERT_DEFAULT_DAYS,
                        help="server certificate validity, at most %d (default: %%(default)s)"
                             % proxy.SERVER_CERT_MAX_DAYS)
    parser.add_argument("--renew", action="store_true",
                        help="re-issue only the server certificate, signed by the existing CA "
                             "(devices that trust the CA need nothing new)")
    parser.add_argument("--force", action="store_true",
                        help="allow overwriting existing files; without --renew this makes a "
                             "new CA too, which every device must trust again")
    return parser


def _run(args: argparse.Namespace) -> int:
    out = args.out
    ca_cert, ca_key = proxy.ca_paths(out)
    cert_file = os.path.join(out, proxy.SERVER_CERT_FILENAME)
    key_file = os.path.join(out, proxy.SERVER_KEY_FILENAME)
    combined = os.path.join(out, proxy.COMBINED_FILENAME)
    hosts = proxy.discover_hosts() + list(args.host)
    ca_created = False

    if args.renew:
        if not os.path.exists(ca_cert) or not os.path.exists(ca_key):
            raise proxy.CertificateError(
                "--renew needs the existing CA, but %s is missing; run without --renew to create "
                "a CA and certificate" % " and ".join(
                    path for path in (ca_cert, ca_key) if not os.path.exists(path)))
        ca_info, _ca_key = proxy.load_ca(out)
        if os.path.exists(cert_file) and not args.force:
            try:
                ours = proxy.certificate_issued_by(proxy.read_certificate_info(cert_file), ca_info)
            except proxy.CertificateError:
                ours = False
            if not ours:
                raise proxy.CertificateError(
                    "%s was not issued by %s, so --renew will not replace it; add --force to "
                    "replace it anyway" % (cert_file, ca_cert))
    elif not args.force:
        return _ensure(args, cert_file, key_file)
    else:
        proxy.create_ca_files(out, args.host)  # --host names widen the CA's constraints
        ca_created = True

    # A CA made since name constraints exist signs only local names and addresses (and the
    # --host values it was created with): leave the rest out, and say so.
    hosts, outside = proxy.split_permitted(proxy.read_certificate_info(ca_cert), hosts)
    info = proxy.issue_server_files(cert_file, key_file, hosts, args.days, out)

    written = []
    if ca_created:
        written += [(ca_cert, "local CA certificate: install this one as trusted"),
                    (ca_key, "CA private key: keep it private, it signs what your devices trust")]
    written += [(cert_file, "server certificate, valid until %s UTC"
                 % info.not_after.strftime("%Y-%m-%d %H:%M")),
                (key_file, "server private key"),
                (combined, "certificate + key in one file")]
    width = max(len(path) for path, _ in written)
    print("Wrote:")
    for path, what in written:
        print("  %-*s  %s" % (width, path, what))
    print("Names: %s" % ", ".join(info.dns_names + info.ip_addresses))
    if outside:
        print("Left out (the CA may not sign for them; a public name or address must be given "
              "with --host when the CA is created): %s" % ", ".join(outside))
    print()
    if ca_created:
        print(proxy.trust_instructions(ca_cert))
    else:
        print("The CA (%s) is unchanged: devices that already trust it need nothing new."
              % ca_cert)
        print("Devices that do not trust it yet:")
        print()
        print(proxy.trust_instructions(ca_cert))
    return 0


def _ensure(args: argparse.Namespace, cert_file: str, key_file: str) -> int:
    """Without --renew or --force: what the proxy does at start-up. Create what is missing, add
    --host names (re-issuing with the same CA), renew a certificate that expires soon, keep a
    good one; then print the trust steps. Running it again is harmless."""
    status = proxy.ensure_certificates(
        cert_file, key_file, extra_hosts=args.host, days=args.days,
        progress=lambda text: print(text, file=sys.stderr, flush=True))
    if status.action == "external":
        raise proxy.CertificateError(
            "%s was not issued by the CA in %s, so it is left alone; use --force to replace it "
            "with a new CA and certificate (devices must then trust the new CA)"
            % (cert_file, args.out))
    files = [(status.ca_file, "local CA certificate: install this one as trusted"),
             (proxy.ca_paths(os.path.dirname(status.ca_file))[1],
              "CA private key: keep it private, it signs what your devices trust"),
             (status.cert_file, "server certificate (%s), valid until %s UTC" % (
                 status.action, status.not_after.strftime("%Y-%m-%d %H:%M"))),
             (status.key_file, "server private key"),
             (status.combined_file, "certificate + key in one file (for servers that want one)")]
    width = max(len(path) for path, _ in files)
    print("Files:")
    for path, what in files:
        print("  %-*s  %s" % (width, path, what))
    if status.reasons:
        print("Why: %s" % "; ".join(status.reasons))
    if status.action == "kept" and args.days != proxy.SERVER_CERT_DEFAULT_DAYS:
        print("Note: the certificate is still good, so --days changed nothing; add --renew to "
              "issue one for %d days now." % args.days)
    print("Names: %s" % ", ".join(status.dns_names + status.ip_addresses))
    for warning in status.warnings:
        print("Warning: %s" % warning)
    print()
    if not status.ca_created:
        print("The CA (%s) is unchanged: devices that already trust it need nothing new."
              % status.ca_file)
        print("Devices that do not trust it yet:")
        print()
    print(proxy.trust_instructions(status.ca_file))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; return the exit status (0 ok, 2 user error, 1 I/O error)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except proxy.ProxyError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    except OSError as exc:
        print("error: %s: %s" % (exc.filename or args.out, exc.strerror or exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
