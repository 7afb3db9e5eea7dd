#!/usr/bin/env python3
"""local-llm-proxy: an HTTPS front door for a plain-HTTP LLM backend on your network.

A browser app served over HTTPS cannot call http://192.168.x.y:11434 (mixed content). This proxy
terminates TLS with a locally trusted certificate, forwards every request 1:1 to one HTTP backend
(Ollama, llama.cpp, LM Studio, vLLM, LiteLLM, ...), streams responses as they are produced, answers
CORS and Chrome's private-network preflights, and counts the tokens that pass through.

Run it:      python3 proxy.py                 (standard library only, Python 3.9+)
Dashboard:   https://<this-machine>:8443/_proxy/dashboard
Set-up page: https://<this-machine>:8443/_proxy/

Contents, in file order (each a "# ====" banner; sub-sections are "# -- name ---" lines):
  Constants and defaults    the one place where the default configuration lives
  Errors                    one small tree; main() turns a ProxyError into an exit code
  Config                    load JSON, apply environment overrides, validate once
  Certificates              find or create the local CA and the server certificate
  Usage extraction          which endpoints report tokens, and an incremental tap that reads them
  Stats store               the request record, the stats document and its store (stats.json)
  Metrics                   the Prometheus text exposition
  HTTP layer, part 1        reading a client's request strictly (no smuggling past us)
  HTTP layer, part 2        the backend connection pool
  Access keys               who may have requests forwarded, and within which budget
  HTTP layer, part 3        the request handler (internal routes, CORS, the forwarding pipeline)
  HTTP layer, part 3b       WebSocket tunnels (the one upgrade we forward)
  HTTP layer, part 4        the TLS server
  Service                   pidfile, daemon mode, signals, the serve loop
  Command line              client snippets, arguments, key commands, banner and main()
  Web pages                 the dashboard and the device set-up page, served from this file
"""

import sys

# First of all, before anything newer than the running Python can fail with a traceback deep in
# certificate creation (Raspberry Pi OS Buster ships 3.7, Ubuntu 20.04 ships 3.8). Everything
# above and up to here must keep parsing on 3.7 for this line to be reached (tests check it).
if sys.version_info < (3, 9):
    sys.stderr.write("error: local-llm-proxy needs Python 3.9 or newer (this is %d.%d.%d)\n"
                     % tuple(sys.version_info[:3]))
    sys.exit(2)


def _rerun_from_bytecode_cache(script: str) -> None:
    """`python3 proxy.py`: run this file again from its bytecode cache, in this same process.

    Why: Python keeps the parse tree of a script until the script ends, and ours never ends:
    compiling this file leaves VmRSS at 42 MiB where importing it from its cache gives 27 MiB
    (issue 16; a bare ThreadingHTTPServer proxy idles at 22). So a script start hands over at
    once, before any import, to an interpreter that loads __pycache__/proxy.cpython-3X.pyc
    beside this file, writing it first when it can. Same pid, arguments and interpreter options
    (a pidfile, systemd or a daemon parent see nothing). Skipped where that is not possible:
    Python 3.9 (no sys.orig_argv), not POSIX (os.execv makes a new process there), no cache
    and none can be written (PYTHONDONTWRITEBYTECODE, a read-only folder), or
    LLM_PROXY_NO_RERUN=1. The cache is written from the code this start compiled, so even the
    first start compiles once.

    What it cannot save: Python compiles the whole file before this function runs, about half
    of a start's instructions (issue 16, Python 3.11: compile 478M; imports 248M, module body
    68M, main() to serving 47M, an interpreter 28M plus `site`). Only a start that does not
    name the file as a script skips it: `python3 -m proxy` with this folder on sys.path loads
    the cache directly and answers in about 0.4x the time.
    """
    import os
    import sys
    import importlib.util
    options = getattr(sys, "orig_argv", None)
    path = os.path.abspath(sys.argv[0])
    if options is None or os.name != "posix" or os.environ.get("LLM_PROXY_NO_RERUN") == "1" \
            or path != os.path.abspath(script) or not path.endswith(".py"):
        return
    options = options[1:len(options) - len(sys.argv)]      # -u, -X ..., but not -c or -m
    if "-c" in options or "-m" in options:
        return
    cache = importlib.util.cache_from_source(path)
    try:
        source = os.stat(path)
    except OSError:
        return
    try:
        with open(cache, "rb") as handle:
            header = handle.read(16)
            # Code we are about to run: only from a cache (and folder) nobody else could have
            # planted, the same rule as for key files (cron often runs this as root).
            trusted = all(st.st_uid in (0, os.getuid()) and not st.st_mode & 0o022
                          for st in (os.fstat(handle.fileno()), os.stat(os.path.dirname(cache))))
        # The header importlib checks: magic, flags 0 (timestamp-based), source mtime and size.
        fresh = (header[:4] == importlib.util.MAGIC_NUMBER and header[4:8] == bytes(4)
                 and int.from_bytes(header[8:12], "little") == int(source.st_mtime) & 0xFFFFFFFF
                 and int.from_bytes(header[12:16], "little") == source.st_size & 0xFFFFFFFF)
    except OSError:
        trusted, fresh = True, False
    if not trusted:
        return                      # carry on as a script; never overwrite what someone planted
    if not fresh:
        # Write the cache from the code object this start already compiled (the caller's frame
        # is the script's module), as importlib would; the re-run then compiles nothing.
        if sys.dont_write_bytecode:
            return
        import marshal
        partial = "%s.%d.tmp" % (cache, os.getpid())
        try:
            os.makedirs(os.path.dirname(cache), mode=0o755, exist_ok=True)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         source.st_mode & 0o644)
            with open(fd, "wb") as handle:
                handle.write(importlib.util.MAGIC_NUMBER + bytes(4)
                             + (int(source.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
                             + (source.st_size & 0xFFFFFFFF).to_bytes(4, "little")
                             + marshal.dumps(sys._getframe(1).f_code))
            os.replace(partial, cache)
        except (OSError, ValueError):
            try:
                os.unlink(partial)
            except OSError:
                pass
            return                  # a read-only folder: carry on as a script
    # What the script start would have had: argv[0] and, in sys.path, its folder where `-c` put
    # "" (not under -I, -P or PYTHONSAFEPATH). The module gets a __spec__, which ends the
    # handing-over there.
    loader = ("import sys, importlib.util as u; p = sys.argv.pop(1); sys.argv[0] = p; "
              "sys.path[:1] = [p.rpartition('/')[0]] if sys.path[:1] == [''] else sys.path[:1]; "
              "s = u.spec_from_file_location('__main__', p); m = u.module_from_spec(s); "
              "sys.modules['__main__'] = m; s.loader.exec_module(m)")
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable] + options + ["-c", loader, path]
                 + sys.argv[1:])
    except OSError:
        return                      # carry on as a script


if __name__ == "__main__" and __spec__ is None:
    _rerun_from_bytecode_cache(__file__)


import argparse
import base64
import bisect
import collections
import datetime
import difflib
import errno
import functools
import hashlib
import hmac
import http.client
import io
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import select
import signal
import socket
import socketserver
import ssl
import stat
import struct
import tempfile
import textwrap
import threading
import time
import urllib.parse
import zlib
import dataclasses
from dataclasses import dataclass, field, make_dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

__all__ = [
    "VERSION", "ProxyError", "ConfigError", "CertificateError", "Config", "load_config",
    "config_from", "ProxyServer", "ProxyHandler", "build_server", "build_parser", "main",
]

VERSION = "1.0.0"
log = logging.getLogger("llm-proxy")


# ==================================================================================================
# Constants and defaults: the one place where the default configuration lives
# ==================================================================================================

# Every config key, its default, its check, its environment variable and its documentation are
# one row each of SETTINGS (in the Config section, after the checks it names).

# Sections whose keys guard who may use the proxy (origins, admin token, access keys) and with
# which certificate: an unknown (probably misspelt) key in them is an error, not a warning.
SECURITY_SECTIONS = ("proxy", "tls", "access")

# One access key from the environment (Docker users without a config file). It is added to
# access.keys under this name, replacing a file entry of the same name.
ACCESS_KEY_ENV = "PROXY_API_KEY"
ACCESS_KEY_ENV_NAME = "default"
ACCESS_KEY_ENV_DOC = ("adds one access key named `default` to `access.keys` (replacing a "
                      "`default` entry)")

# Hop-by-hop headers describe one connection, not the message, so a proxy must not pass them on
# (RFC 9110 §7.6.1; Proxy-Connection and Keep-Alive are pre-standard but still sent, as Go's
# httputil.ReverseProxy notes). Every token named in a Connection header is dropped as well.
# Applied to requests and responses alike.
HOP_BY_HOP_HEADERS = (
    "connection", "proxy-connection", "keep-alive", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
)

# Limits on what a client may send before we answer 414/431 (nginx uses 8 KiB lines, 32 KiB heads).
MAX_REQUEST_LINE = 8192
MAX_HEADER_LINE = 16384
MAX_HEADER_BYTES = 65536
MAX_HEADER_COUNT = 128
MAX_CHUNK_LINE = 4096

# Request bodies up to this size are read whole before forwarding: usage tracking needs the model
# name and the stream flags, and an OpenAI stream request is rewritten to ask for usage. Larger
# bodies (base64 images) are streamed to the backend as they arrive; the tap sees their start.
BODY_BUFFER_LIMIT = 1024 * 1024
BODY_PEEK_LIMIT = 64 * 1024
# One read from the backend returns at most this much; a small SSE event comes back at once.
READ_CHUNK = 256 * 1024
# A piece smaller than this is sent together with the pieces already received behind it (tiny
# chunks that arrived together leave in one write), up to READ_CHUNK; nothing waits for more.
COALESCE_BELOW = 16 * 1024
# Internal routes never need a body; anything bigger is refused rather than read.
INTERNAL_BODY_LIMIT = 64 * 1024
# A request refused for its access key has its body read and dropped up to this size, so the
# client can read the refusal (a base64 image upload fits); a bigger one closes the connection.
REFUSED_BODY_DRAIN_LIMIT = 32 * 1024 * 1024

CORS_ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
# Browsers cap it (Chrome at 2 h); a long value saves a preflight before every chat request.
CORS_MAX_AGE = "86400"
# Response headers JavaScript may read without being listed (Fetch standard, CORS-safelisted).
CORS_SAFELISTED_RESPONSE_HEADERS = (
    "cache-control", "content-language", "content-length", "content-type", "expires",
    "last-modified", "pragma",
)

# A backend's response head (every interim 1xx head and the final one together) may be at most
# this big, and at most this many interim 1xx answers may come before the final one.
MAX_RESPONSE_HEAD_BYTES = 256 * 1024
MAX_INTERIM_RESPONSES = 20

# Methods a backend may receive twice without harm (RFC 9110 §9.2.2): only these are re-sent
# when a pooled connection dies before the reply.
IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE")

SHUTDOWN_GRACE_SECONDS = 5.0
# How many (client address / origin) keys the "explain it once" log memory holds.
SAY_ONCE_MEMORY = 4096
HEALTH_CACHE_SECONDS = 3.0

# A request body must arrive at this average rate once clientTimeout has passed: each byte
# received buys 1/BODY_MIN_RATE s more (Apache's mod_reqtimeout "body=20,MinRate=500" idea).
# clientTimeout alone bounds each read, so a client trickling a byte per read held a slot forever.
BODY_MIN_RATE = 500
# Connection slots kept back for /_proxy/health when all others are taken (at most 1/16 of
# proxy.maxConnections). A reserve slot serves one health check under a short deadline.
CONNECTION_RESERVE = 8
RESERVE_CLIENT_TIMEOUT = 5.0
# Each client connection may hold two descriptors (its socket and a backend socket); this many
# more cover the listener, idle pooled backend connections (64), the log, stats and certificate
# files. proxy.maxConnections is lowered to fit the open-file limit (RLIMIT_NOFILE).
FD_RESERVE = 100


# ==================================================================================================
# Errors: one small tree; main() turns a ProxyError into "error: ..." and an exit code
# ==================================================================================================

class ProxyError(Exception):
    """Base class for errors the proxy reports to the user without a traceback."""


class ConfigError(ProxyError):
    """The configuration file or an environment override is invalid."""


class CertificateError(ProxyError):
    """The TLS certificate or key is missing, unreadable, or inconsistent."""


# ==================================================================================================
# Config: load JSON, apply environment overrides, validate once into an immutable object
# ==================================================================================================

def _integer_from(low: int, high: int, low_means: str = ""):
    """A setting check: an integer (true/false is none) from low to high; the error text says
    the range, and what `low` means when it is special."""
    expected = "an integer from %d%s to %d" % (low, " (%s)" % low_means if low_means else "", high)

    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return expected
        return None
    return check


_check_port = _integer_from(1, 65535)
# 0 asks the system for a free port (tests, scripts); the banner shows the one chosen.
_check_listen_port = _integer_from(0, 65535)
_check_history_size = _integer_from(0, 100000)
_check_connection_limit = _integer_from(1, 100000)
_check_connection_share = _integer_from(0, 100000, "half of proxy.maxConnections")


def _check_positive_number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400 * 7:
        return "a number of seconds greater than 0"
    return None


def _check_bool(value):
    return None if isinstance(value, bool) else "true or false"


def _check_string(value):
    return None if isinstance(value, str) else "a string"


def _check_nonempty_string(value):
    return None if isinstance(value, str) and value.strip() else "a non-empty string"


def _check_string_list(value):
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
        return None
    return "a list of strings"


def _check_host_list(value):
    # Checked here, not only when a certificate is issued: a typo must stop the start before a
    # CA is made, and name the key.
    if _check_string_list(value) is not None:
        return "a list of host names or IP addresses"
    try:
        normalize_hosts(value)
    except ValueError as exc:
        return "a list of host names or IP addresses (%s)" % exc
    return None


def _check_origins(value):
    if not (isinstance(value, str) or _check_string_list(value) is None):
        return 'a string ("*" or a comma-separated list of origins) or a list of origins'
    for origin in _parse_origins(value):
        problem = _origin_problem(origin)
        if problem:
            return 'a list of origins like "https://studio.example.com" (scheme://host[:port]); ' \
                   + problem
    return None


def _origin_problem(origin: str) -> Optional[str]:
    """Why `origin` (as parsed by _parse_origins) can never match a browser's Origin header."""
    if origin in ("*", "null"):
        return None
    scheme, sep, rest = origin.partition("://")
    if not sep:
        return '"%s" has no scheme: write "https://%s" (or http:// for a page served over ' \
               'plain HTTP)' % (origin, origin)
    if scheme not in ("http", "https") or not rest:
        return '"%s" is not an http(s) origin' % origin
    if "/" in rest or "?" in rest or "#" in rest:
        return '"%s" has a path: an origin is only scheme://host[:port], so write "%s://%s"' % (
            origin, scheme, re.split(r"[/?#]", rest, 1)[0])
    return None


def _check_header_token(value):
    # Sent in a header as is: a newline would let the value write headers of its own.
    if isinstance(value, str) and (value == "" or _ACCESS_KEY_CHARS.match(value)):
        return None
    return "a string of visible ASCII characters without spaces"


def _check_access_keys(value):
    # Only the shape here; parse_access_keys() checks each entry and never quotes a key.
    return None if isinstance(value, dict) else 'an object like {"name": "key"}'


def _same(value):
    return value


class Setting(NamedTuple):
    """One config key: everything the proxy knows about it, in one row of SETTINGS.

    Defaults, validation, environment overrides, the Config attributes, --help and the README's
    configuration tables are all derived from these rows (a test compares the README).
    """

    key: str                        # dotted, as in config.json: "proxy.port"
    default: Any                    # as written in JSON
    check: Callable[[Any], Optional[str]]   # None when valid, else what the value must be
    attr: str                       # the Config attribute that holds the checked value
    doc: str                        # the README table's "Meaning" (Markdown, one line)
    env: Optional[str] = None       # environment variable that overrides the file
    convert: Optional[Callable[[Any], Any]] = _same   # checked JSON value -> attribute;
    #                                 None: load_config builds the attribute itself (see there)
    path: bool = False              # a file path: resolved like the config file's paths
    secret: bool = False            # errors name the key but never quote the value; no repr


# Keys and defaults of the original tool's README are kept exactly; the others are additions
# whose defaults keep the original behaviour (environment names are the original README's too).
SETTINGS = (
    Setting("proxy.port", 8443, _check_listen_port, "port",
            "HTTPS port (`0`: any free port, shown in the log)", env="PROXY_PORT"),
    Setting("proxy.allowedOrigins", "*", _check_origins, "allowed_origins",
            "origins whose pages may call the proxy: `\"*\"` or a comma-separated list (a JSON "
            "list works too) of `scheme://host[:port]`",
            env="ALLOWED_ORIGINS", convert=lambda value: _parse_origins(value)),
    Setting("proxy.bind", "", _check_string, "bind",
            "address to listen on; `\"\"` = every interface, IPv4 and IPv6", convert=str.strip),
    Setting("proxy.adminToken", "", _check_string, "admin_token",
            "when set, `/_proxy/stats`, `/_proxy/metrics` and `POST /_proxy/reset` need "
            "`Authorization: Bearer <token>`", secret=True),
    Setting("proxy.clientTimeout", 30, _check_positive_number, "client_timeout",
            "seconds a client may take for the TLS handshake, a request head, or idle "
            "keep-alive; a request body must then keep arriving at 500 bytes/s on average",
            convert=float),
    Setting("proxy.maxConnections", 512, _check_connection_limit, "max_connections",
            "open client connections (one thread each); further ones are closed at once. "
            "Lowered at start, with a warning, when the open-file limit cannot hold two "
            "descriptors per connection"),
    Setting("proxy.maxConnectionsPerClient", 0, _check_connection_share,
            "max_connections_per_client",
            "open connections one client address may hold; `0` = half of `maxConnections`"),
    Setting("proxy.websocketIdleTimeout", 3600, _check_positive_number, "websocket_idle_timeout",
            "seconds a WebSocket tunnel may carry no byte in either direction before it is "
            "closed", convert=float),
    # target.host may name a port too: load_config weighs it against target.port.
    Setting("target.host", "127.0.0.1", _check_nonempty_string, "target_host",
            "backend host; `host:port` and `http://host:port` work too (https:// is refused: "
            "the backend speaks plain HTTP)", env="TARGET_HOST", convert=None),
    Setting("target.port", 11434, _check_port, "target_port",
            "backend port (Ollama's default)", env="TARGET_PORT", convert=None),
    Setting("target.connectTimeout", 10, _check_positive_number, "connect_timeout",
            "seconds to connect to the backend (then 502/504)", convert=float),
    Setting("target.readTimeout", 600, _check_positive_number, "read_timeout",
            "seconds the backend may stay silent — long enough for a slow model's prompt "
            "processing on a Pi", convert=float),
    # The proxy owns CORS; Ollama answers 403 to unknown origins.
    Setting("target.forwardOrigin", False, _check_bool, "forward_origin",
            "pass the browser's `Origin` on (Ollama answers 403 to origins not in "
            "`OLLAMA_ORIGINS`)"),
    Setting("target.apiKey", "", _check_header_token, "target_api_key",
            "sent to the backend as `Authorization: Bearer <key>` instead of the client's "
            "credentials (vLLM / llama.cpp `--api-key`, LiteLLM's master key)",
            env="TARGET_API_KEY", secret=True),
    Setting("tls.cert", "./certs/cert.pem", _check_nonempty_string, "cert_file",
            "server certificate (created when missing)", env="CERT_FILE", path=True),
    Setting("tls.key", "./certs/key.pem", _check_nonempty_string, "key_file",
            "its private key", env="KEY_FILE", path=True),
    # A comma list in the environment: in Docker the container cannot see the host's names.
    Setting("tls.hosts", [], _check_host_list, "tls_hosts",
            "extra names/IPs for the generated certificate (a public one must be listed before "
            "the CA is first created)", env="TLS_HOSTS",
            convert=lambda hosts: tuple(h.strip() for h in hosts)),
    Setting("tracking.enabled", True, _check_bool, "tracking_enabled",
            "count tokens; `false` parses nothing and writes nothing"),
    Setting("tracking.statsFile", "./stats.json", _check_nonempty_string, "stats_file",
            "where stats persist", path=True),
    Setting("tracking.persistInterval", 30, _check_positive_number, "persist_interval",
            "seconds between saves (only when something changed)", convert=float),
    Setting("tracking.historySize", 100, _check_history_size, "history_size",
            "recent requests kept"),
    Setting("tracking.injectStreamUsage", True, _check_bool, "inject_stream_usage",
            "ask OpenAI-style streams for usage (see [Token tracking](#token-tracking))"),
    # A table, not a value: parse_access_keys() makes AccessKey objects of it, and
    # PROXY_API_KEY (ACCESS_KEY_ENV) adds one entry instead of replacing the whole table.
    Setting("access.keys", {}, _check_access_keys, "access_keys",
            "access keys: name → key, or name → `{\"key\", \"dailyTokens\", "
            "\"requestsPerMinute\"}`; empty = open to all (see [Access keys](#access-keys))",
            convert=None, secret=True),
)

# Derived views of SETTINGS, by the names the rest of the code (and tests) use.
SETTINGS_BY_KEY = {s.key: s for s in SETTINGS}
CONFIG_DEFAULTS: Dict[str, Dict[str, Any]] = {}
for _setting in SETTINGS:
    _section, _name = _setting.key.split(".", 1)
    CONFIG_DEFAULTS.setdefault(_section, {})[_name] = _setting.default
del _setting, _section, _name
CONFIG_CHECKS = {s.key: s.check for s in SETTINGS}
ENV_OVERRIDES = tuple((s.env, s.key) for s in SETTINGS if s.env)
SECRET_SETTINGS = tuple(s.key for s in SETTINGS if s.secret)


def settings_markdown() -> Tuple[List[str], List[str]]:
    """The README's configuration table rows and environment-variable table rows."""
    keys = ["| `%s` | `%s` | %s |" % (s.key, json.dumps(s.default), s.doc) for s in SETTINGS]
    env = ["| `%s` | `%s`%s |" % (s.env, s.key, " (comma-separated)"
                                    if isinstance(s.default, list) else "")
           for s in SETTINGS if s.env]
    env.append("| `%s` | %s |" % (ACCESS_KEY_ENV, ACCESS_KEY_ENV_DOC))
    return keys, env


# Access keys: long enough that guessing is hopeless, visible ASCII so they fit a header as is.
# Names show up in stats, logs, metrics labels and the dashboard: a short plain alphabet.
ACCESS_KEY_MIN_LENGTH = 16
ACCESS_KEY_MAX_LENGTH = 256
ACCESS_LIMIT_MAX = 10 ** 12
ACCESS_RATE_MAX = 100000
_ACCESS_KEY_CHARS = re.compile(r"[\x21-\x7e]+\Z")
_ACCESS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}\Z")
_ACCESS_ENTRY_FIELDS = ("key", "dailyTokens", "requestsPerMinute")


@dataclass(frozen=True)
class AccessKey:
    """One client key: its name (shown everywhere), the secret (shown nowhere) and its budgets."""

    name: str
    key: str = field(repr=False)                  # never in a repr, a log line or stats
    daily_tokens: Optional[int] = None            # tokens per local calendar day; None = no limit
    requests_per_minute: Optional[int] = None     # requests started per 60 s; None = no limit


def check_access_key_name(name) -> Optional[str]:
    """Why `name` cannot name an access key, or None when it can."""
    if not isinstance(name, str) or not _ACCESS_NAME.match(name):
        return ("must be 1-64 characters: letters, digits and . _ @ + - "
                "(starting with a letter or digit)")
    return None


def _parse_access_limit(entry: dict, field_name: str, upper: int, label: str) -> Optional[int]:
    value = entry.get(field_name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ValueError("%s must be an integer from 1 to %d (or left out for no limit), got %s"
                         % (label, upper, json.dumps(value)))
    return value


def parse_access_keys(table, where: str) -> Tuple[AccessKey, ...]:
    """Validate an access.keys table into AccessKey objects, in the table's order.

    `where` names the source (file or variable) in errors; an error names the entry
    (access.keys.NAME) and what is wrong, and never quotes a key. Raises ConfigError.
    """
    if not isinstance(table, dict):
        raise ConfigError('%s: access.keys must be an object like {"laptop": "<key>"}' % where)
    keys: List[AccessKey] = []
    owner_of: Dict[str, str] = {}
    for name, entry in table.items():
        label = "access.keys.%s" % name if isinstance(name, str) and len(name) <= 80 else \
            "an access.keys name"
        problem = check_access_key_name(name)
        if problem:
            raise ConfigError("%s: %s: the name %s" % (where, label, problem))
        if isinstance(entry, str):
            entry = {"key": entry}
        if not isinstance(entry, dict):
            raise ConfigError('%s: %s must be a key string or an object like {"key": "<key>", '
                              '"dailyTokens": 100000}' % (where, label))
        unknown = [f for f in entry if f not in _ACCESS_ENTRY_FIELDS]
        if unknown:
            raise ConfigError("%s: %s: unknown field '%s' (fields: %s)"
                              % (where, label, str(unknown[0])[:40], ", ".join(_ACCESS_ENTRY_FIELDS)))
        secret = entry.get("key")
        if not isinstance(secret, str):
            raise ConfigError("%s: %s.key must be a string" % (where, label))
        if not ACCESS_KEY_MIN_LENGTH <= len(secret) <= ACCESS_KEY_MAX_LENGTH \
                or not _ACCESS_KEY_CHARS.match(secret):
            raise ConfigError("%s: %s.key must be %d to %d visible ASCII characters without "
                              "spaces, got %d characters%s (python3 proxy.py --add-key makes one)"
                              % (where, label, ACCESS_KEY_MIN_LENGTH, ACCESS_KEY_MAX_LENGTH,
                                 len(secret), "" if _ACCESS_KEY_CHARS.match(secret or " ")
                                 else " including spaces or control characters"))
        if secret in owner_of:
            raise ConfigError("%s: %s.key is the same as access.keys.%s.key: each client needs "
                              "its own key" % (where, label, owner_of[secret]))
        owner_of[secret] = name
        try:
            daily = _parse_access_limit(entry, "dailyTokens", ACCESS_LIMIT_MAX,
                                        label + ".dailyTokens")
            rate = _parse_access_limit(entry, "requestsPerMinute", ACCESS_RATE_MAX,
                                       label + ".requestsPerMinute")
        except ValueError as exc:
            raise ConfigError("%s: %s" % (where, exc)) from None
        keys.append(AccessKey(name, secret, daily, rate))
    return tuple(keys)


class _ConfigMethods:
    """What Config adds to its attributes (the class itself is made from SETTINGS below)."""

    __slots__ = ()

    @property
    def target_url(self) -> str:
        """The backend's base URL, as shown in logs and errors."""
        return "http://" + authority(self.target_host, self.target_port)

    @property
    def any_origin(self) -> bool:
        """True when every origin may call the proxy (allowedOrigins "*")."""
        return "*" in self.allowed_origins

    def origin_allowed(self, origin: str) -> bool:
        """Whether a browser page from `origin` may read our responses."""
        return self.any_origin or origin.rstrip("/").lower() in self.allowed_origins


# One attribute per row of SETTINGS (its `attr`, in table order), then what load_config derives.
# No attribute has a default: a Config is only ever made by load_config() or config_from(), so
# tests run on the same defaults as production, and a new setting is one row of SETTINGS.
Config = make_dataclass(
    "Config",
    [(s.attr, Any, field(repr=not s.secret)) for s in SETTINGS] + [
        ("tls_managed", bool),                  # cert/key at the default paths: we may create them
        ("source", Optional[str]),              # the config file used, or None for defaults
        ("warnings", Tuple[str, ...], field(compare=False)),
    ],
    bases=(_ConfigMethods,), frozen=True,
    namespace={"__module__": __name__, "__doc__": "Validated settings. Paths are absolute; "
               "origins are parsed. Build it with load_config() or config_from()."})


def authority(host: str, port: int) -> str:
    """host:port as written in URLs and Host headers (IPv6 literals in brackets)."""
    if ":" in host and not host.startswith("["):
        host = "[%s]" % host
    return "%s:%d" % (host, port)


def _parse_origins(value) -> Tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    origins = tuple(item.strip().rstrip("/").lower() for item in items if item.strip())
    return origins or ("*",)


def _flatten(settings: dict) -> Dict[str, object]:
    return {"%s.%s" % (section, key): value
            for section, keys in settings.items() for key, value in keys.items()}


def _read_config_file(path: str) -> Tuple[dict, List[str]]:
    """Parse a config file; returns (flat {dotted key: value}, warnings). Raises ConfigError."""
    try:
        with open(path, "r", encoding="utf-8-sig") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError("cannot read config file %s: %s" % (path, exc.strerror or exc)) from None
    except UnicodeDecodeError:
        raise ConfigError("config file %s is not UTF-8 text" % path) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("%s: invalid JSON at line %d, column %d: %s"
                          % (path, exc.lineno, exc.colno, exc.msg)) from None
    if not isinstance(data, dict):
        raise ConfigError("%s: the top level must be a JSON object like {\"proxy\": {...}}" % path)
    flat, warnings = {}, []
    for section, keys in data.items():
        if section not in CONFIG_DEFAULTS:
            warnings.append(_unknown_key_warning(path, section, list(CONFIG_DEFAULTS)))
            continue
        if not isinstance(keys, dict):
            raise ConfigError("%s: %s must be a JSON object, got %s"
                              % (path, section, json.dumps(keys)))
        for key, value in keys.items():
            dotted = "%s.%s" % (section, key)
            if dotted not in CONFIG_CHECKS:
                choices = ["%s.%s" % (section, k) for k in CONFIG_DEFAULTS[section]]
                warning = _unknown_key_warning(path, dotted, choices)
                if section in SECURITY_SECTIONS:
                    # A misspelt allowedOrigins/adminToken/cert would silently leave its
                    # default in force (allowedOrigins "*": every website may call the proxy).
                    raise ConfigError(
                        warning.replace(" ignored", "", 1) + "; the %s section holds security "
                        "settings, so an unknown key there stops the start instead of leaving "
                        "a default in force: fix the name or remove the key" % section)
                warnings.append(warning)
                continue
            flat[dotted] = value
    return flat, warnings


def _unknown_key_warning(path: str, key: str, choices: List[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    hint = " (did you mean '%s'?)" % close[0] if close else ""
    return "%s: unknown key '%s' ignored%s" % (path, key, hint)


def _env_value(name: str, dotted: str, raw: str):
    """Convert an environment override to the type its config key takes."""
    default = SETTINGS_BY_KEY[dotted].default
    if isinstance(default, list):
        return [item.strip() for item in raw.split(",") if item.strip()]
    if isinstance(default, int):
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError("environment variable %s=%r: %s must be an integer"
                              % (name, raw, dotted)) from None
    return raw


def parse_target(value: str, default_port: int, what: str = "target.host") -> Tuple[str, int]:
    """(host, port) of a backend written as a host, host:port or http://host[:port].

    A value without a port keeps `default_port` (target.port). Raises ValueError with the fix
    for https:// (the backend must be plain HTTP), other schemes, paths, and bad ports.
    """
    text = value.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    scheme = scheme.lower()
    if scheme == "https":
        raise ValueError("%s %s: the backend must be plain HTTP (this proxy adds the TLS); "
                         "use http:// and the backend's HTTP port" % (what, json.dumps(value)))
    if scheme not in ("", "http"):
        raise ValueError("%s %s: unsupported scheme %s://; write http://HOST:PORT"
                         % (what, json.dumps(value), scheme))
    hostport, _, tail = rest.partition("/")
    if tail.strip("/") or "?" in hostport or "#" in hostport:
        raise ValueError("%s %s: give only the host and port; the proxy forwards every path as "
                         "the client sent it (so clients keep /v1 in their base URL)"
                         % (what, json.dumps(value)))
    if hostport.startswith("["):
        host, _, after = hostport[1:].partition("]")
        port_text = after[1:] if after.startswith(":") else None
        if after and port_text is None:
            raise ValueError("%s %s is not a host or http://HOST:PORT" % (what, json.dumps(value)))
    elif hostport.count(":") == 1:
        host, port_text = hostport.split(":")
    else:
        host, port_text = hostport, None     # a name, an IPv4 address or a bare IPv6 address
    if not host or any(c in host for c in " /@"):
        raise ValueError("%s %s is not a host or http://HOST:PORT" % (what, json.dumps(value)))
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError("%s %s: the port must be an integer from 1 to 65535"
                         % (what, json.dumps(value)))
    return host, int(port_text)


def _is_own_address(host: str) -> bool:
    """True when `host` names this machine (loopback, an interface address or our hostname)."""
    name = host.lower().strip("[]")
    if name in ("localhost", "0.0.0.0", "::", socket.gethostname().lower()):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name.endswith(".localhost")
    if address.is_loopback or address.is_unspecified:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        return name in _linux_ipv4_addresses()
    except (OSError, ImportError):
        return False


def load_config(path: Optional[str] = None, environ=None, search_cwd: bool = True,
                overrides: Optional[Dict[str, Tuple[str, object]]] = None) -> Config:
    """Build the Config from defaults, an optional JSON file and environment overrides.

    With no `path`, ./config.json is used when it exists, else the defaults. With a config file,
    relative paths from the file and the default paths (certs/, stats.json) resolve against that
    file's directory, like the pidfile and log of --daemon (cron starts programs in $HOME);
    without one they resolve against the current directory. Paths from the environment
    always resolve against the current directory.
    `overrides` ({dotted key: (where, value)}, e.g. from --port) win over file and environment.
    Raises ConfigError naming the file (or variable), the key and the value.
    """
    environ = os.environ if environ is None else environ
    if path is None and search_cwd and os.path.isfile("config.json"):
        path = "config.json"
    values = _flatten(CONFIG_DEFAULTS)
    warnings: List[str] = []
    origin_of = {key: None for key in values}       # None = default, else the file or env var
    if path is not None:
        path = os.path.abspath(path)
        if not os.path.exists(path):
            raise ConfigError("config file %s does not exist (copy config.example.json)" % path)
        file_values, warnings = _read_config_file(path)
        values.update(file_values)
        origin_of.update({key: path for key in file_values})
    _apply_environment(values, origin_of, environ)
    for dotted, (where, value) in (overrides or {}).items():
        values[dotted] = value
        origin_of[dotted] = where
    return _settle(values, origin_of, path, warnings, environ)


def config_from(settings: Dict[str, object], environ: Optional[Dict[str, str]] = None) -> Config:
    """Build a Config the way load_config() does, from {dotted key: value} instead of a file.

    Keys and values are as in config.json ({"proxy.port": 0, "tls.hosts": ["nas.lan"]}); the
    others keep their defaults. No environment variable applies unless `environ` is given.
    Relative paths resolve against the current directory. Raises ConfigError like load_config.
    """
    values = _flatten(CONFIG_DEFAULTS)
    origin_of: Dict[str, Optional[str]] = {key: None for key in values}
    for dotted, value in settings.items():
        if dotted not in SETTINGS_BY_KEY:
            raise ConfigError(_unknown_key_warning("settings", dotted, list(SETTINGS_BY_KEY))
                              .replace(" ignored", "", 1))
        values[dotted] = value
        origin_of[dotted] = "settings"
    _apply_environment(values, origin_of, environ or {})
    return _settle(values, origin_of, None, [], environ or {})


def _apply_environment(values: Dict[str, object], origin_of: Dict[str, Optional[str]],
                       environ) -> None:
    """Let each setting's environment variable (when set and not empty) replace its value."""
    for name, dotted in ENV_OVERRIDES:
        raw = environ.get(name)
        if raw:
            values[dotted] = _env_value(name, dotted, raw)
            origin_of[dotted] = "environment variable " + name


def _settle(values: Dict[str, object], origin_of: Dict[str, Optional[str]], path: Optional[str],
            warnings: List[str], environ) -> Config:
    """Check every value once and build the Config (load_config's and config_from's last step)."""
    for setting in SETTINGS:
        dotted = setting.key
        problem = setting.check(values[dotted])
        if problem:
            where = origin_of[dotted] or "default"
            shown = "a hidden value" if setting.secret else json.dumps(values[dotted])
            raise ConfigError("%s: %s must be %s, got %s" % (where, dotted, problem, shown))
    access_keys = parse_access_keys(values["access.keys"], origin_of["access.keys"] or "default")
    env_key = environ.get(ACCESS_KEY_ENV)
    if env_key:
        others = {k.name: {"key": k.key} for k in access_keys if k.name != ACCESS_KEY_ENV_NAME}
        parse_access_keys(dict(others, **{ACCESS_KEY_ENV_NAME: env_key}),
                          "environment variable " + ACCESS_KEY_ENV)        # format, uniqueness
        access_keys = tuple(k for k in access_keys if k.name != ACCESS_KEY_ENV_NAME) + \
            (AccessKey(ACCESS_KEY_ENV_NAME, env_key),)
    if not values["tracking.enabled"]:
        budgeted = [k.name for k in access_keys if k.daily_tokens]
        if budgeted:
            # Without tracking no token is counted: the budget would silently never apply.
            raise ConfigError("%s: access.keys.%s.dailyTokens needs tracking.enabled: true (the "
                              "proxy counts tokens only while tracking)"
                              % (origin_of["tracking.enabled"] or origin_of["access.keys"]
                                 or "default", budgeted[0]))
    base_dir = os.path.dirname(path) if path else os.getcwd()

    def resolve(dotted: str) -> str:
        value = os.path.expanduser(values[dotted])
        from_environment = origin_of[dotted] not in (None, path)
        relative_to = os.getcwd() if from_environment else base_dir
        return os.path.normpath(os.path.join(relative_to, value))

    # target.host written as a URL or host:port (a silent 502 on every request would otherwise
    # be the only sign): its port counts as set where the host was set, so the usual
    # precedence (default < file < environment < command line) decides against target.port.
    try:
        target_host, url_port = parse_target(values["target.host"], 0)
    except ValueError as exc:
        raise ConfigError("%s: %s" % (origin_of["target.host"] or "default", exc)) from None

    def rank(where) -> int:
        return 0 if where is None else 1 if where == path else \
            2 if where.startswith("environment") else 3

    target_port = values["target.port"]
    if url_port and url_port != target_port:
        host_rank, port_rank = rank(origin_of["target.host"]), rank(origin_of["target.port"])
        if host_rank == port_rank:
            raise ConfigError("%s: target.host %s names port %d but target.port is %d; keep "
                              "only one of them" % (origin_of["target.host"],
                                                   json.dumps(values["target.host"]), url_port,
                                                   target_port))
        if host_rank > port_rank:
            target_port = url_port
    target_host = target_host.strip("[]")
    if values["proxy.port"] and target_port == values["proxy.port"] and (
            _is_own_address(target_host) or target_host == values["proxy.bind"].strip("[]")):
        raise ConfigError(
            "target %s is this proxy itself (proxy.port %d): every request would loop back "
            "into it; point target.host/target.port at the LLM backend (Ollama listens on "
            "127.0.0.1:11434)" % (authority(target_host, target_port), values["proxy.port"]))
    # Only the default certificate location is ours to create files in: a configured path
    # that does not exist is a typo or a missing mount, never a place to generate a CA into.
    default_values = _flatten(CONFIG_DEFAULTS)
    tls_managed = all(
        origin_of[key] is None or resolve(key) == os.path.normpath(
            os.path.join(base_dir, default_values[key]))
        for key in ("tls.cert", "tls.key"))

    # Each setting's attribute from its row; the three with convert=None are built above.
    attributes = {s.attr: resolve(s.key) if s.path else s.convert(values[s.key])
                  for s in SETTINGS if s.path or s.convert}
    return Config(target_host=target_host, target_port=target_port, access_keys=access_keys,
                  tls_managed=tls_managed, source=path, warnings=tuple(warnings), **attributes)


# ==================================================================================================
# Certificates: find or create the local CA and the server certificate
# ==================================================================================================

# -- constants -------------------------------------------------------------------------------------

CERT_DIR_DEFAULT = "./certs"
CA_CERT_FILENAME = "ca.pem"
CA_KEY_FILENAME = "ca-key.pem"
SERVER_CERT_FILENAME = "cert.pem"
SERVER_KEY_FILENAME = "key.pem"
COMBINED_FILENAME = "combined.pem"

RSA_KEY_BITS = 2048          # accepted everywhere (Apple, Android, Windows, NSS, OpenSSL)
RSA_PUBLIC_EXPONENT = 65537
CA_VALIDITY_DAYS = 3650      # ~10 years: the CA is installed by hand once, so it should last.
# Apple rejects TLS server certificates valid for more than 825 days, even under a user-installed
# root (Apple HT210176, iOS 13 / macOS 10.15). The later 398-day limit (HT211025) applies only to
# certificates from publicly trusted roots, not to ours. issue_server_certificate() caps
# notAfter - notBefore (back-dating included) at 825 days; the default stays a little below that
# as a margin against any verifier that counts differently. ensure_certificates() re-issues 30
# days before expiry, so the length only decides how often that happens.
SERVER_CERT_MAX_DAYS = 825
SERVER_CERT_DEFAULT_DAYS = 800
CERT_RENEW_BEFORE_DAYS = 30
# notBefore is set this far in the past: a phone whose clock is a few minutes behind the proxy
# host would otherwise reject a certificate issued "in the future".
CERT_BACKDATE = datetime.timedelta(hours=1)
# Shown while the CA and the first certificate are made: two RSA-2048 keys in pure Python took
# 1.7-3.1 s on a 2-core VM (longer on a Raspberry Pi).
CA_PROGRESS_MESSAGE = "creating a local certificate authority (one time, ~2 s)..."

# Object identifiers (dotted strings; encoded by _der_oid).
_OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
_OID_SHA256_WITH_RSA = "1.2.840.113549.1.1.11"
_OID_COMMON_NAME = "2.5.4.3"
_OID_ORGANIZATION = "2.5.4.10"
_OID_ORG_UNIT = "2.5.4.11"
_OID_SUBJECT_KEY_ID = "2.5.29.14"
_OID_KEY_USAGE = "2.5.29.15"
_OID_SUBJECT_ALT_NAME = "2.5.29.17"
_OID_BASIC_CONSTRAINTS = "2.5.29.19"
_OID_AUTHORITY_KEY_ID = "2.5.29.35"
_OID_EXT_KEY_USAGE = "2.5.29.37"
_OID_NAME_CONSTRAINTS = "2.5.29.30"
_OID_KP_SERVER_AUTH = "1.3.6.1.5.5.7.3.1"

# keyUsage bit numbers, RFC 5280 section 4.2.1.3.
_KU_DIGITAL_SIGNATURE = 0
_KU_KEY_ENCIPHERMENT = 2
_KU_KEY_CERT_SIGN = 5
_KU_CRL_SIGN = 6

_CA_ORGANIZATION = "llm-proxy local CA"
_SERVER_ORGANIZATION = "llm-proxy"
_CN_MAX_LEN = 64  # ub-common-name, RFC 5280 Appendix A.1

# What a new CA may sign for (nameConstraints, RFC 5280 4.2.1.10): the names and addresses a
# proxy on a home network is reached by, so the CA every device trusts cannot vouch for a bank
# even if ca-key.pem leaks. create_ca() adds this machine's names and the tls.hosts given at
# creation (a public address only that way). A DNS base also covers every name below it.
CA_PERMITTED_DNS = ("localhost", "local", "lan", "home.arpa", "internal")
CA_PERMITTED_NETWORKS = (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # loopback, RFC 1918
    "169.254.0.0/16", "100.64.0.0/10",                               # link-local, CGNAT
    "::1/128", "fc00::/7", "fe80::/10",                              # loopback, ULA, link-local
    # Never routed on the internet, so a leaked key gains nothing there; test beds, lab
    # networks and some VPNs' "fake IP" pools (198.18/15) use them: documentation (RFC 5737,
    # RFC 3849) and benchmarking (RFC 2544).
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "198.18.0.0/15", "2001:db8::/32",
)


# -- DER encoding ----------------------------------------------------------------------------------
# Distinguished Encoding Rules (ITU-T X.690). Only what X.509 needs; every function returns the
# complete TLV (tag, length, value) as bytes.

def _der_len(length: int) -> bytes:
    """Encode a DER length: short form below 128, else 0x80|n followed by n big-endian bytes."""
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(content)) + content


def _der_integer(value: int) -> bytes:
    """Encode a non-negative INTEGER in the minimal two's-complement form (leading 0x00 if the
    top bit would otherwise be set, so the number stays positive)."""
    if value < 0:
        raise ValueError("negative INTEGERs are not needed here")
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")
    # bit_length()//8 + 1 bytes always leaves room for a clear sign bit; drop one redundant 0x00.
    if len(body) > 1 and body[0] == 0 and body[1] < 0x80:
        body = body[1:]
    return _der_tlv(0x02, body)


def _der_boolean(value: bool) -> bytes:
    # DER: TRUE is 0xFF (X.690 11.1).
    return _der_tlv(0x01, b"\xff" if value else b"\x00")


def _der_bit_string(data: bytes, unused_bits: int = 0) -> bytes:
    return _der_tlv(0x03, bytes([unused_bits]) + data)


def _der_named_bits(bits: Iterable[int]) -> bytes:
    """Encode a named-bit BIT STRING (e.g. keyUsage): bit 0 is the MSB of the first byte and, per
    X.690 11.2.2, trailing zero bits are removed."""
    bits = sorted(set(bits))
    if not bits:
        return _der_bit_string(b"")
    nbytes = bits[-1] // 8 + 1
    buf = bytearray(nbytes)
    for bit in bits:
        buf[bit // 8] |= 0x80 >> (bit % 8)
    return _der_bit_string(bytes(buf), 7 - bits[-1] % 8)


def _der_octet_string(data: bytes) -> bytes:
    return _der_tlv(0x04, data)


def _der_null() -> bytes:
    return b"\x05\x00"


def _der_oid(dotted: str) -> bytes:
    """Encode an OBJECT IDENTIFIER: the first two arcs as 40*a+b, then each arc in base 128
    with the high bit set on all but its last byte."""
    arcs = [int(part) for part in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40):
        raise ValueError("invalid OID %r" % dotted)
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1]] + arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return _der_tlv(0x06, bytes(body))


def _der_utf8_string(text: str) -> bytes:
    return _der_tlv(0x0C, text.encode("utf-8"))


def _der_printable_string(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9 '()+,\-./:=?]*", text):
        raise ValueError("not a PrintableString: %r" % text)
    return _der_tlv(0x13, text.encode("ascii"))


def _der_time(moment: datetime.datetime) -> bytes:
    """Encode a certificate time per RFC 5280 4.1.2.5: UTCTime (YYMMDDHHMMSSZ) through 2049,
    GeneralizedTime (YYYYMMDDHHMMSSZ) from 2050 on; always UTC, whole seconds."""
    moment = moment.astimezone(datetime.timezone.utc)
    if 1950 <= moment.year <= 2049:
        return _der_tlv(0x17, moment.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return _der_tlv(0x18, ("%04d" % moment.year + moment.strftime("%m%d%H%M%SZ")).encode("ascii"))


def _der_sequence(*items: bytes) -> bytes:
    return _der_tlv(0x30, b"".join(items))


def _der_set(*items: bytes) -> bytes:
    # DER sorts SET OF elements by their encodings (X.690 11.6).
    return _der_tlv(0x31, b"".join(sorted(items)))


def _der_context(number: int, content: bytes, constructed: bool = True) -> bytes:
    """Context-specific tag [number]: constructed for EXPLICIT tagging or IMPLICIT SEQUENCEs,
    primitive for IMPLICIT primitive types (e.g. dNSName [2], keyIdentifier [0])."""
    return _der_tlv((0xA0 if constructed else 0x80) | number, content)


# -- DER reading -----------------------------------------------------------------------------------

class _DerNode(NamedTuple):
    tag: int
    content: bytes
    raw: bytes  # the complete TLV, e.g. to hash or to compare names byte for byte


def _der_read(data: bytes, offset: int = 0) -> Tuple[_DerNode, int]:
    """Read one TLV at ``offset``; return (node, offset after it). Definite lengths only, as DER
    requires. Raises ValueError on malformed input."""
    if offset + 2 > len(data):
        raise ValueError("truncated DER")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte DER tags are not supported")
    first = data[offset + 1]
    pos = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    end = pos + length
    if end > len(data):
        raise ValueError("truncated DER")
    return _DerNode(tag, bytes(data[pos:end]), bytes(data[offset:end])), end


def _der_children(content: bytes) -> List[_DerNode]:
    """Split the content of a constructed value (SEQUENCE, SET, [n]) into its elements."""
    nodes = []
    offset = 0
    while offset < len(content):
        node, offset = _der_read(content, offset)
        nodes.append(node)
    return nodes


def _der_parse_one(data: bytes, tag: Optional[int] = None) -> _DerNode:
    node, end = _der_read(data)
    if end != len(data):
        raise ValueError("trailing data after DER value")
    if tag is not None and node.tag != tag:
        raise ValueError("expected DER tag 0x%02x, got 0x%02x" % (tag, node.tag))
    return node


def _der_to_int(node: _DerNode) -> int:
    if node.tag != 0x02:
        raise ValueError("expected INTEGER")
    return int.from_bytes(node.content, "big", signed=True)


def _der_to_oid(node: _DerNode) -> str:
    if node.tag != 0x06 or not node.content:
        raise ValueError("expected OBJECT IDENTIFIER")
    arcs = []
    value = 0
    for byte in node.content:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(arc) for arc in head + arcs[1:])


def _der_to_time(node: _DerNode) -> datetime.datetime:
    text = node.content.decode("ascii")
    if node.tag == 0x17:  # UTCTime; RFC 5280: YY >= 50 means 19YY
        year = int(text[:2])
        text = ("19" if year >= 50 else "20") + text
    elif node.tag != 0x18:
        raise ValueError("expected UTCTime or GeneralizedTime")
    if not text.endswith("Z"):
        raise ValueError("certificate time is not in UTC: %r" % text)
    text = text[:-1].split(".")[0]  # tolerate fractional seconds in certificates we did not make
    moment = datetime.datetime.strptime(text, "%Y%m%d%H%M%S")
    return moment.replace(tzinfo=datetime.timezone.utc)


# -- PEM -------------------------------------------------------------------------------------------

def _pem_encode(der: bytes, label: str) -> bytes:
    b64 = base64.b64encode(der).decode("ascii")
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    text = "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)
    return text.encode("ascii")


_PEM_BLOCK_RE = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)\s*-----END \1-----", re.DOTALL)


def _pem_blocks(data: bytes) -> List[Tuple[str, bytes]]:
    """Return every (label, DER) block of a PEM file, in order. Headers (Proc-Type...) make the
    block unreadable here, which is what we want for encrypted keys."""
    blocks = []
    for match in _PEM_BLOCK_RE.finditer(data):
        try:
            der = base64.b64decode(b"".join(match.group(2).split()), validate=True)
        except ValueError:
            continue
        blocks.append((match.group(1).decode("ascii"), der))
    return blocks


def ca_pem_to_der(pem_bytes: bytes) -> bytes:
    """Return the DER bytes of the first certificate in ``pem_bytes`` (for serving the CA as
    ``application/x-x509-ca-cert``, which iOS and Android install directly).
    Raises CertificateError if there is no certificate in it."""
    for label, der in _pem_blocks(pem_bytes):
        if label == "CERTIFICATE":
            return der
    raise CertificateError("no PEM certificate found")


# -- RSA -------------------------------------------------------------------------------------------

class RSAPrivateKey(NamedTuple):
    """An RSA private key with its CRT parameters (the fields of PKCS#1 RSAPrivateKey)."""
    n: int
    e: int
    d: int
    p: int
    q: int
    dp: int
    dq: int
    qinv: int

    @property
    def size_bytes(self) -> int:
        """Length of the modulus (and of every signature) in bytes."""
        return (self.n.bit_length() + 7) // 8


_SMALL_PRIMES_PRODUCT_CACHE: List[int] = []


def _rsa_small_primes_product() -> int:
    """Product of the odd primes below 2000, computed once on first use (not at import). One
    gcd() against it (done in C) rejects ~85% of random odd candidates before Miller-Rabin."""
    if not _SMALL_PRIMES_PRODUCT_CACHE:
        limit = 2000
        sieve = bytearray([1]) * limit
        sieve[0:2] = b"\x00\x00"
        for i in range(2, int(limit ** 0.5) + 1):
            if sieve[i]:
                sieve[i * i::i] = bytearray(len(sieve[i * i::i]))
        product = 1
        for i in range(3, limit):
            if sieve[i]:
                product *= i
        _SMALL_PRIMES_PRODUCT_CACHE.append(product)
    return _SMALL_PRIMES_PRODUCT_CACHE[0]


# FIPS 186-4 Appendix C.3 (Table C.3) asks for only 4 rounds for random 1024-bit candidates at a
# 2^-100 error rate; 40 rounds also bound the worst case (adversarial input) by 4^-40 = 2^-80, and
# cost only ~40 modular exponentiations per *accepted* prime (composites fail in round one).
_MILLER_RABIN_ROUNDS = 40


def _is_probable_prime(candidate: int, rounds: int = _MILLER_RABIN_ROUNDS) -> bool:
    """Miller-Rabin with random bases from ``secrets`` (FIPS 186-4 C.3.1)."""
    if candidate < 4:
        return candidate in (2, 3)
    if candidate % 2 == 0:
        return False
    d = candidate - 1
    s = 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for _ in range(rounds):
        base = 2 + secrets.randbelow(candidate - 3)  # uniform in [2, candidate-2]
        x = pow(base, d, candidate)
        if x == 1 or x == candidate - 1:
            continue
        for _ in range(s - 1):
            x = pow(x, 2, candidate)
            if x == candidate - 1:
                break
        else:
            return False
    return True


def _rsa_random_prime(bits: int, e: int) -> int:
    """Return a random prime of exactly ``bits`` bits with gcd(e, p-1) = 1.

    The two top bits are set so that p > sqrt(2) * 2^(bits-1) (FIPS 186-4 B.3.1) and the product
    of two such primes has exactly 2*bits bits."""
    sieve = _rsa_small_primes_product()
    top = (1 << (bits - 1)) | (1 << (bits - 2)) | 1
    while True:
        candidate = secrets.randbits(bits) | top
        if math.gcd(candidate, sieve) != 1:
            continue
        # e is prime, so gcd(e, p-1) = 1 exactly when p mod e != 1.
        if candidate % e == 1:
            continue
        if _is_probable_prime(candidate):
            return candidate


def generate_rsa_key(bits: int = RSA_KEY_BITS, e: int = RSA_PUBLIC_EXPONENT) -> RSAPrivateKey:
    """Generate an RSA private key (default 2048 bits, e = 65537) from the OS CSPRNG.

    Follows FIPS 186-4 B.3.3 where it matters: |p - q| > 2^(bits/2 - 100), d computed modulo
    lambda(n) = lcm(p-1, q-1) and d > 2^(bits/2). Takes a fraction of a second to a few seconds
    in CPython."""
    if bits < 1024 or bits % 2:
        raise ValueError("RSA key size must be an even number >= 1024")
    half = bits // 2
    while True:
        p = _rsa_random_prime(half, e)
        q = _rsa_random_prime(half, e)
        if abs(p - q) <= (1 << (half - 100)):
            continue  # also rules out p == q
        n = p * q
        lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
        if math.gcd(e, lam) != 1:
            continue
        d = pow(e, -1, lam)
        if d <= (1 << half):
            continue
        if p < q:
            p, q = q, p  # conventional (OpenSSL) order; qinv = q^-1 mod p
        return RSAPrivateKey(n, e, d, p, q, d % (p - 1), d % (q - 1), pow(q, -1, p))


# DigestInfo prefix for SHA-256, RFC 8017 section 9.2 note 1.
_SHA256_DIGEST_INFO_PREFIX = bytes.fromhex("3031300d060960864801650304020105000420")


def _emsa_pkcs1_v1_5_sha256(message: bytes, length: int) -> bytes:
    """EMSA-PKCS1-v1_5 encoding (RFC 8017 9.2): 00 01 FF..FF 00 || DigestInfo(SHA-256(M))."""
    t = _SHA256_DIGEST_INFO_PREFIX + hashlib.sha256(message).digest()
    if length < len(t) + 11:
        raise ValueError("RSA modulus too short")
    return b"\x00\x01" + b"\xff" * (length - len(t) - 3) + b"\x00" + t


def rsa_sign_sha256(key: RSAPrivateKey, message: bytes) -> bytes:
    """Sign ``message`` with RSASSA-PKCS1-v1_5 and SHA-256 (sha256WithRSAEncryption); return the
    signature (as many bytes as the modulus).

    Uses the CRT and checks the result with the public key before returning it, so that a
    computation fault can never release a signature that would leak a factor of n. No blinding:
    we only sign our own certificates, locally, so there is no timing oracle to hide."""
    k = key.size_bytes
    m = int.from_bytes(_emsa_pkcs1_v1_5_sha256(message, k), "big")
    m1 = pow(m, key.dp, key.p)
    m2 = pow(m, key.dq, key.q)
    h = (key.qinv * (m1 - m2)) % key.p
    s = m2 + h * key.q
    if pow(s, key.e, key.n) != m:
        raise CertificateError("RSA signature self-check failed (inconsistent private key)")
    return s.to_bytes(k, "big")


def rsa_verify_sha256(n: int, e: int, message: bytes, signature: bytes) -> bool:
    """Return True if ``signature`` is a valid RSASSA-PKCS1-v1_5 / SHA-256 signature of
    ``message`` under the public key (n, e)."""
    k = (n.bit_length() + 7) // 8
    if len(signature) != k:
        return False
    s = int.from_bytes(signature, "big")
    if s >= n:
        return False
    em = pow(s, e, n).to_bytes(k, "big")
    return hmac.compare_digest(em, _emsa_pkcs1_v1_5_sha256(message, k))


# Key serialisation: PKCS#8 PrivateKeyInfo (RFC 5208) wrapping a PKCS#1 RSAPrivateKey (RFC 8017
# A.1.2) - "BEGIN PRIVATE KEY", which OpenSSL, ssl.load_cert_chain and Node all read.

def _rsa_algorithm_identifier() -> bytes:
    # RFC 3279 2.3.1: parameters MUST be NULL for rsaEncryption.
    return _der_sequence(_der_oid(_OID_RSA_ENCRYPTION), _der_null())


def _rsa_public_key_der(n: int, e: int) -> bytes:
    return _der_sequence(_der_integer(n), _der_integer(e))


def _rsa_spki_der(n: int, e: int) -> bytes:
    """SubjectPublicKeyInfo for an RSA key (RFC 5280 4.1.2.7)."""
    return _der_sequence(_rsa_algorithm_identifier(), _der_bit_string(_rsa_public_key_der(n, e)))


def private_key_to_pem(key: RSAPrivateKey) -> bytes:
    """Serialise ``key`` as an unencrypted PKCS#8 PEM ("-----BEGIN PRIVATE KEY-----")."""
    pkcs1 = _der_sequence(*(_der_integer(v) for v in (
        0, key.n, key.e, key.d, key.p, key.q, key.dp, key.dq, key.qinv)))
    pkcs8 = _der_sequence(_der_integer(0), _rsa_algorithm_identifier(), _der_octet_string(pkcs1))
    return _pem_encode(pkcs8, "PRIVATE KEY")


def _rsa_key_from_pkcs1(der: bytes) -> RSAPrivateKey:
    fields = [_der_to_int(node) for node in _der_children(_der_parse_one(der, 0x30).content)]
    if len(fields) != 9 or fields[0] != 0:
        raise ValueError("not a two-prime RSAPrivateKey")
    key = RSAPrivateKey(*fields[1:])
    if key.p * key.q != key.n:
        raise ValueError("RSA key is inconsistent (n != p*q)")
    return key


def load_private_key_pem(data: bytes) -> RSAPrivateKey:
    """Read an unencrypted RSA private key from PEM (PKCS#8 "PRIVATE KEY" or PKCS#1
    "RSA PRIVATE KEY"). Raises CertificateError for anything else (EC keys, encrypted keys)."""
    for label, der in _pem_blocks(data):
        try:
            if label == "RSA PRIVATE KEY":
                return _rsa_key_from_pkcs1(der)
            if label == "PRIVATE KEY":
                _version, algorithm, octets = _der_children(_der_parse_one(der, 0x30).content)[:3]
                if _der_to_oid(_der_children(algorithm.content)[0]) != _OID_RSA_ENCRYPTION:
                    raise CertificateError("not an RSA private key")
                if octets.tag != 0x04:
                    raise ValueError("bad PrivateKeyInfo")
                return _rsa_key_from_pkcs1(octets.content)
        except (ValueError, IndexError) as exc:
            raise CertificateError("unreadable RSA private key: %s" % exc) from None
    raise CertificateError("no unencrypted RSA private key (PKCS#8 or PKCS#1 PEM) found")


# -- host names ------------------------------------------------------------------------------------

def _split_host(host: str):
    """Return an ipaddress object for an IP literal (brackets allowed), else a normalised
    lower-case ASCII DNS name (IDNA-encoded). Raises ValueError for anything else."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    if address is not None:
        if getattr(address, "scope_id", None):  # "fe80::1%eth0" (3.9+): no zone in a certificate
            raise ValueError("%r: an IP address with a zone index cannot be certified" % host)
        return address
    if "%" in text or ":" in text:
        raise ValueError("%r is not a valid host name or IP address" % host)
    name = text.rstrip(".").lower()
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError("%r is not a valid host name" % host) from None
    labels = name.split(".")
    if labels and labels[0] == "*" and len(labels) > 2:
        labels = labels[1:]  # a wildcard is allowed only as the whole left-most label
    if not name or len(name) > 253 or not all(
            re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", label) for label in labels):
        raise ValueError("%r is not a valid host name or IP address" % host)
    return name


def normalize_hosts(hosts: Iterable[str]) -> Tuple[List[str], List[str]]:
    """Split host names / IP addresses into (dns_names, ip_addresses), normalised, in order,
    without duplicates. IP literals always become IP entries (never DNS names).
    Raises ValueError naming the first invalid entry."""
    dns_names: List[str] = []
    ips: List[str] = []
    for host in hosts:
        value = _split_host(host)
        if isinstance(value, str):
            if value not in dns_names:
                dns_names.append(value)
        elif str(value) not in ips:
            ips.append(str(value))
    return dns_names, ips


def _linux_ipv4_addresses() -> List[str]:
    """IPv4 addresses of every interface, read with ioctl(SIOCGIFADDR) on an unconnected UDP
    socket: a local kernel query, nothing is sent on the network. Only the primary address of
    each interface is seen (unlabelled secondary addresses need netlink); use --host for those."""
    import fcntl  # Unix only; this function runs only on Linux

    siocgifaddr = 0x8915  # <linux/sockios.h>
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _index, name in socket.if_nameindex():
            ifreq = struct.pack("256s", name.encode()[:15])
            try:
                result = fcntl.ioctl(sock.fileno(), siocgifaddr, ifreq)
            except OSError:
                continue  # interface without IPv4 address, or down
            found.append(socket.inet_ntoa(result[20:24]))  # ifr_addr.sin_addr
    return found


def _linux_ipv6_addresses(path: str = "/proc/net/if_inet6") -> List[str]:
    """Stable IPv6 addresses from /proc/net/if_inet6 (no packets). Skips temporary (privacy)
    addresses, which rotate daily and would force a re-issue at every start, and addresses that
    are deprecated, tentative or failed duplicate detection."""
    skip_flags = 0x01 | 0x08 | 0x20 | 0x40  # IFA_F_TEMPORARY|DADFAILED|DEPRECATED|TENTATIVE
    found = []
    with open(path) as handle:
        for line in handle:
            fields = line.split()
            if len(fields) < 6 or len(fields[0]) != 32:
                continue
            if int(fields[4], 16) & skip_flags:
                continue
            found.append(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    return found


def _resolver_addresses(hostname: str) -> List[str]:
    """Addresses that getaddrinfo() gives for this machine's own name (used on macOS and Windows,
    which answer it from local data; not on Linux, see discover_hosts())."""
    found = []
    for info in socket.getaddrinfo(hostname, None, 0, socket.SOCK_STREAM):
        found.append(info[4][0].split("%")[0])
    return found


def discover_hosts() -> List[str]:
    """Return the names and addresses this machine is reached by on the LAN: "localhost", the
    host name, "<hostname>.local" (mDNS) when the name has no dot, 127.0.0.1, ::1 and every
    non-link-local address of every interface.

    Sends nothing on the network itself: on Linux interfaces are enumerated with ioctl and /proc
    and the resolver is never asked (a name missing from /etc/hosts would become a DNS or mDNS
    query); on macOS and Windows the machine's own name is resolved with getaddrinfo(), which the
    OS answers from local data. Never raises: whatever cannot be read is left out (add it with
    extra hosts)."""
    hosts = ["localhost"]
    hostname = ""
    try:
        hostname = socket.gethostname().strip().rstrip(".")
    except OSError:
        pass
    if hostname:
        try:
            hostname = _split_host(hostname)
        except ValueError:
            log.debug("host name %r is not a valid DNS name; not put in the certificate", hostname)
            hostname = ""
    if isinstance(hostname, str) and hostname and hostname != "localhost":
        hosts.append(hostname)
        if "." not in hostname:
            hosts.append(hostname + ".local")
    hosts += ["127.0.0.1", "::1"]

    addresses: List[str] = []
    if sys.platform.startswith("linux"):
        for reader in (_linux_ipv4_addresses, _linux_ipv6_addresses):
            try:
                addresses += reader()
            except (OSError, ValueError, ImportError) as exc:
                log.debug("could not enumerate addresses with %s: %s", reader.__name__, exc)
    elif isinstance(hostname, str) and hostname:
        try:
            addresses += _resolver_addresses(hostname)
        except (OSError, UnicodeError, ValueError) as exc:
            log.debug("could not resolve %s: %s", hostname, exc)

    for text in addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if address.is_loopback or address.is_link_local or address.is_unspecified \
                or address.is_multicast:
            continue  # loopback is already listed; link-local needs a zone id, useless in a URL
        if str(address) not in hosts:
            hosts.append(str(address))
    return hosts


# -- reading certificates --------------------------------------------------------------------------

class CertificateInfo(NamedTuple):
    """What we read back from a certificate (no I/O; see read_certificate_info())."""
    der: bytes
    serial: int
    subject_cn: str
    issuer_cn: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    dns_names: Tuple[str, ...]
    ip_addresses: Tuple[str, ...]
    is_ca: bool
    server_auth: bool           # EKU absent (any purpose) or containing serverAuth
    subject_key_id: Optional[bytes]
    authority_key_id: Optional[bytes]
    public_key: Optional[Tuple[int, int]]   # (n, e) for RSA keys, else None
    subject_der: bytes
    issuer_der: bytes
    tbs_der: bytes
    signature_algorithm: str    # dotted OID
    signature: bytes
    # nameConstraints permitted subtrees, per name type; None = that type is unconstrained.
    permitted_dns: Optional[Tuple[str, ...]] = None        # DNS bases, e.g. "lan"
    permitted_networks: Optional[Tuple[str, ...]] = None   # e.g. "10.0.0.0/8", "::1/128"

    def permits(self, host: str) -> bool:
        """True if this (CA) certificate's name constraints allow a leaf to name ``host`` (a DNS
        name or IP literal). A DNS base permits itself and every name below it (RFC 5280
        4.2.1.10; a leading dot: only names below it, as OpenSSL reads it)."""
        try:
            value = _split_host(host)
        except ValueError:
            return False  # nothing a verifier would accept either
        if isinstance(value, str):
            if self.permitted_dns is None:
                return True
            for base in self.permitted_dns:
                base = base.lower().rstrip(".")
                if base.startswith("."):
                    if value.endswith(base):
                        return True
                elif not base or value == base or value.endswith("." + base):
                    return True
            return False
        if self.permitted_networks is None:
            return True
        return any(value in network for network in map(ipaddress.ip_network,
                                                       self.permitted_networks)
                   if network.version == value.version)

    def covers(self, dns_names: Iterable[str], ip_addresses: Iterable[str]) -> bool:
        """True if every given DNS name and IP address is in this certificate's subjectAltName
        (compared exactly, case-insensitively; wildcards are not expanded)."""
        have_dns = {name.lower() for name in self.dns_names}
        have_ips = {str(ipaddress.ip_address(ip)) for ip in self.ip_addresses}
        return all(name.lower() in have_dns for name in dns_names) and all(
            str(ipaddress.ip_address(ip)) in have_ips for ip in ip_addresses)


def _name_common_name(name_der: bytes) -> str:
    for rdn in _der_children(_der_parse_one(name_der, 0x30).content):
        for attribute in _der_children(rdn.content):
            oid, value = _der_children(attribute.content)[:2]
            if _der_to_oid(oid) == _OID_COMMON_NAME:
                return value.content.decode("utf-8", "replace")
    return ""


def parse_certificate_der(der: bytes) -> CertificateInfo:
    """Read the fields we need from a DER X.509 certificate. Raises ValueError if malformed.
    Works for any v1/v3 certificate; the public key is read for RSA only."""
    try:
        return _parse_certificate_der(der)
    except (IndexError, UnicodeError) as exc:  # a missing element, an odd string
        raise ValueError("malformed certificate (%s)" % exc) from None


def _parse_certificate_der(der: bytes) -> CertificateInfo:
    cert = _der_children(_der_parse_one(der, 0x30).content)
    tbs, sig_alg, sig_value = cert[0], cert[1], cert[2]
    fields = _der_children(tbs.content)
    if fields[0].tag == 0xA0:  # [0] EXPLICIT version
        fields = fields[1:]
    serial = _der_to_int(fields[0])
    issuer, validity, subject, spki = fields[2], fields[3], fields[4], fields[5]
    not_before, not_after = (_der_to_time(node) for node in _der_children(validity.content))

    public_key = None
    algorithm, key_bits = _der_children(spki.content)
    if _der_to_oid(_der_children(algorithm.content)[0]) == _OID_RSA_ENCRYPTION:
        n_node, e_node = _der_children(_der_parse_one(key_bits.content[1:], 0x30).content)
        public_key = (_der_to_int(n_node), _der_to_int(e_node))

    dns_names: List[str] = []
    ips: List[str] = []
    is_ca = False
    server_auth = True
    ski = aki = None
    permitted_dns: Optional[List[str]] = None
    permitted_networks: Optional[List[str]] = None
    for node in fields[6:]:
        if node.tag != 0xA3:  # [3] EXPLICIT extensions; [1]/[2] unique IDs are ignored
            continue
        for extension in _der_children(_der_parse_one(node.content, 0x30).content):
            parts = _der_children(extension.content)
            oid, value = _der_to_oid(parts[0]), parts[-1].content
            if oid == _OID_SUBJECT_ALT_NAME:
                for general_name in _der_children(_der_parse_one(value, 0x30).content):
                    if general_name.tag == 0x82:  # dNSName
                        dns_names.append(general_name.content.decode("ascii", "replace"))
                    elif general_name.tag == 0x87:  # iPAddress
                        ips.append(str(ipaddress.ip_address(general_name.content)))
            elif oid == _OID_BASIC_CONSTRAINTS:
                items = _der_children(_der_parse_one(value, 0x30).content)
                is_ca = bool(items) and items[0].tag == 0x01 and items[0].content != b"\x00"
            elif oid == _OID_EXT_KEY_USAGE:
                purposes = [_der_to_oid(purpose) for purpose in
                            _der_children(_der_parse_one(value, 0x30).content)]
                server_auth = _OID_KP_SERVER_AUTH in purposes or "2.5.29.37.0" in purposes
            elif oid == _OID_SUBJECT_KEY_ID:
                ski = _der_parse_one(value, 0x04).content
            elif oid == _OID_AUTHORITY_KEY_ID:
                for item in _der_children(_der_parse_one(value, 0x30).content):
                    if item.tag == 0x80:  # keyIdentifier [0] IMPLICIT
                        aki = item.content
            elif oid == _OID_NAME_CONSTRAINTS:
                permitted_dns, permitted_networks = _parse_name_constraints(value)

    if sig_value.tag != 0x03 or not sig_value.content or sig_value.content[0] != 0:
        raise ValueError("bad signature BIT STRING")
    return CertificateInfo(
        der=bytes(der), serial=serial,
        subject_cn=_name_common_name(subject.raw), issuer_cn=_name_common_name(issuer.raw),
        not_before=not_before, not_after=not_after,
        dns_names=tuple(dns_names), ip_addresses=tuple(ips), is_ca=is_ca,
        server_auth=server_auth, subject_key_id=ski, authority_key_id=aki,
        public_key=public_key, subject_der=subject.raw, issuer_der=issuer.raw,
        tbs_der=tbs.raw, signature_algorithm=_der_to_oid(_der_children(sig_alg.content)[0]),
        signature=sig_value.content[1:],
        permitted_dns=None if permitted_dns is None else tuple(permitted_dns),
        permitted_networks=None if permitted_networks is None else tuple(permitted_networks))


def _parse_name_constraints(value: bytes) -> Tuple[Optional[List[str]], Optional[List[str]]]:
    """(permitted DNS bases, permitted networks) of a nameConstraints value; None for a name
    type with no permitted subtree. Excluded subtrees are not read: create_ca() writes none, and
    permits() is only asked about our own CA."""
    dns: Optional[List[str]] = None
    networks: Optional[List[str]] = None
    for part in _der_children(_der_parse_one(value, 0x30).content):
        if part.tag != 0xA0:  # permittedSubtrees [0]; excludedSubtrees [1] skipped
            continue
        for subtree in _der_children(part.content):
            base = _der_children(subtree.content)[0]
            if base.tag == 0x82:
                dns = (dns or []) + [base.content.decode("ascii", "replace")]
            elif base.tag == 0x87 and len(base.content) in (8, 32):
                half = len(base.content) // 2
                network = ipaddress.ip_network((ipaddress.ip_address(base.content[:half]),
                                                _mask_prefix(base.content[half:])), strict=False)
                networks = (networks or []) + [str(network)]
    return dns, networks


def _mask_prefix(mask: bytes) -> int:
    bits = bin(int.from_bytes(mask, "big"))[2:].zfill(len(mask) * 8)
    if "01" in bits:
        raise ValueError("non-contiguous address mask in nameConstraints")
    return bits.count("1")


def read_certificate_info(path: str) -> CertificateInfo:
    """Read the first certificate of a PEM file. Raises CertificateError (naming the file) if it
    cannot be read or parsed."""
    try:
        with open(path, "rb") as handle:
            der = ca_pem_to_der(handle.read())
        return parse_certificate_der(der)
    except OSError as exc:
        raise CertificateError("cannot read %s: %s" % (path, exc.strerror or exc)) from None
    except CertificateError:
        raise CertificateError("%s contains no PEM certificate" % path) from None
    except (ValueError, IndexError, UnicodeError) as exc:
        raise CertificateError("%s is not a certificate we can read: %s" % (path, exc)) from None


def read_private_key(path: str) -> RSAPrivateKey:
    """Read an unencrypted RSA private key file. Raises CertificateError naming the file."""
    try:
        with open(path, "rb") as handle:
            return load_private_key_pem(handle.read())
    except OSError as exc:
        raise CertificateError("cannot read %s: %s" % (path, exc.strerror or exc)) from None
    except CertificateError as exc:
        raise CertificateError("%s: %s" % (path, exc)) from None


def key_matches_certificate(key: RSAPrivateKey, cert: CertificateInfo) -> bool:
    """True if ``key`` is the private key of ``cert``'s public key."""
    return cert.public_key == (key.n, key.e)


def certificate_issued_by(cert: CertificateInfo, ca: CertificateInfo) -> bool:
    """True if ``cert`` names ``ca`` as issuer (issuer DN, and AKI when both have key ids) and its
    signature verifies with the CA's RSA public key."""
    if cert.issuer_der != ca.subject_der or ca.public_key is None:
        return False
    if cert.authority_key_id and ca.subject_key_id and cert.authority_key_id != ca.subject_key_id:
        return False
    if cert.signature_algorithm != _OID_SHA256_WITH_RSA:
        return False
    return rsa_verify_sha256(ca.public_key[0], ca.public_key[1], cert.tbs_der, cert.signature)


# -- making certificates ---------------------------------------------------------------------------

def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def _random_serial() -> int:
    # RFC 5280 4.1.2.2: positive, at most 20 octets; CA/B Forum wants >= 64 random bits.
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def _key_identifier(n: int, e: int) -> bytes:
    # RFC 5280 4.2.1.2 method (1): SHA-1 of the subjectPublicKey BIT STRING value.
    return hashlib.sha1(_rsa_public_key_der(n, e), usedforsecurity=False).digest()


def _x509_name(common_name: str, organization: str, unit: str = "") -> bytes:
    attributes = [(_OID_ORGANIZATION, organization)]
    if unit:
        attributes.append((_OID_ORG_UNIT, unit))
    attributes.append((_OID_COMMON_NAME, common_name))
    # One attribute per RDN (SET); RFC 5280 recommends UTF8String.
    return _der_sequence(*(
        _der_set(_der_sequence(_der_oid(oid), _der_utf8_string(value[:_CN_MAX_LEN])))
        for oid, value in attributes))


def _x509_extension(oid: str, critical: bool, value: bytes) -> bytes:
    # critical is BOOLEAN DEFAULT FALSE: DER omits a default value (X.690 11.5).
    parts = [_der_oid(oid)]
    if critical:
        parts.append(_der_boolean(True))
    parts.append(_der_octet_string(value))
    return _der_sequence(*parts)


def _x509_certificate(serial: int, issuer: bytes, subject: bytes, not_before: datetime.datetime,
                      not_after: datetime.datetime, subject_key: Tuple[int, int],
                      extensions: Sequence[bytes], signing_key: RSAPrivateKey) -> bytes:
    """Build and sign a v3 certificate; return its DER."""
    algorithm = _der_sequence(_der_oid(_OID_SHA256_WITH_RSA), _der_null())  # RFC 4055: NULL params
    tbs = _der_sequence(
        _der_context(0, _der_integer(2)),                     # version v3
        _der_integer(serial),
        algorithm,
        issuer,
        _der_sequence(_der_time(not_before), _der_time(not_after)),
        subject,
        _rsa_spki_der(*subject_key),
        _der_context(3, _der_sequence(*extensions)),
    )
    return _der_sequence(tbs, algorithm, _der_bit_string(rsa_sign_sha256(signing_key, tbs)))


def _ca_common_name(hostname: Optional[str] = None) -> str:
    if hostname is None:
        try:
            hostname = socket.gethostname()
        except OSError:
            hostname = ""
    hostname = (hostname or "").split(".")[0] or "unknown host"
    prefix = "llm-proxy local CA ("
    return prefix + hostname[:_CN_MAX_LEN - len(prefix) - 1] + ")"


def ca_name_constraints(extra_hosts: Iterable[str] = (),
                        machine_hosts: Optional[Iterable[str]] = None
                        ) -> Tuple[List[str], List[str]]:
    """The permitted subtrees for a new CA: (DNS bases, networks).

    CA_PERMITTED_DNS and CA_PERMITTED_NETWORKS, plus this machine's DNS names (discover_hosts()
    unless ``machine_hosts`` is given) and every name and address in ``extra_hosts`` (tls.hosts,
    --host) that these do not cover yet: an address as a single-address network. The machine's
    discovered public addresses are deliberately NOT added: they change with the ISP, and a CA
    good for a public address can vouch for whoever holds it next. Raises ValueError for an
    invalid host."""
    dns = list(CA_PERMITTED_DNS)
    networks = [ipaddress.ip_network(text) for text in CA_PERMITTED_NETWORKS]
    machine = discover_hosts() if machine_hosts is None else list(machine_hosts)
    machine_dns, _public_ips = normalize_hosts(machine)
    extra_dns, extra_ips = normalize_hosts(extra_hosts)
    for name in machine_dns + extra_dns:
        name = name[2:] if name.startswith("*.") else name
        if not any(name == base or name.endswith("." + base) for base in dns):
            dns.append(name)
    for text in extra_ips:
        address = ipaddress.ip_address(text)
        if not any(address in network for network in networks
                   if network.version == address.version):
            networks.append(ipaddress.ip_network(address))
    return dns, [str(network) for network in networks]


def _name_constraints_der(dns: Sequence[str], networks: Sequence[str]) -> bytes:
    # NameConstraints ::= SEQUENCE { permittedSubtrees [0] GeneralSubtrees OPTIONAL, ... }, in
    # the IMPLICIT module: [0] replaces the SEQUENCE OF tag. Each GeneralSubtree is a SEQUENCE of
    # its base GeneralName (minimum 0 is the DEFAULT, so omitted): dNSName [2] IA5String, or
    # iPAddress [7] with address and mask octets (8 bytes for IPv4, 32 for IPv6).
    subtrees = [_der_sequence(_der_tlv(0x82, name.encode("ascii"))) for name in dns]
    for text in networks:
        network = ipaddress.ip_network(text)
        subtrees.append(_der_sequence(_der_tlv(
            0x87, network.network_address.packed + network.netmask.packed)))
    return _der_sequence(_der_context(0, b"".join(subtrees)))


def create_ca(common_name: Optional[str] = None, days: int = CA_VALIDITY_DAYS,
              key: Optional[RSAPrivateKey] = None, extra_hosts: Iterable[str] = (),
              constrained: bool = True) -> Tuple[bytes, RSAPrivateKey]:
    """Create a self-signed CA certificate; return (certificate DER, private key).

    CN defaults to "llm-proxy local CA (<hostname>)" (iOS hides roots without a CN);
    basicConstraints CA:TRUE pathLen 0 and keyUsage keyCertSign/cRLSign/digitalSignature, both
    critical; SKI and AKI; ``days`` of validity (default ~10 years). Unless ``constrained`` is
    False (only tests make the old, unconstrained kind), a critical nameConstraints extension
    limits the CA to ca_name_constraints(extra_hosts).

    Critical, as RFC 5280 4.2.1.10 requires: a client that does not understand the extension
    must then refuse the CA instead of trusting it for every name. Everything current enforces
    it, also on a root: OpenSSL (so curl, Python, Node), NSS/Firefox, Chrome's own verifier
    (trust anchors since Chrome 112), Windows CryptoAPI, Apple since about 2015, Android, Go."""
    key = key or generate_rsa_key()
    now = _utc_now()
    name = _x509_name(common_name or _ca_common_name(), _CA_ORGANIZATION,
                      "created %s" % now.strftime("%Y-%m-%d"))
    key_id = _key_identifier(key.n, key.e)
    extensions = [
        _x509_extension(_OID_BASIC_CONSTRAINTS, True,
                        _der_sequence(_der_boolean(True), _der_integer(0))),
        _x509_extension(_OID_KEY_USAGE, True, _der_named_bits(
            [_KU_DIGITAL_SIGNATURE, _KU_KEY_CERT_SIGN, _KU_CRL_SIGN])),
        _x509_extension(_OID_SUBJECT_KEY_ID, False, _der_octet_string(key_id)),
        _x509_extension(_OID_AUTHORITY_KEY_ID, False,
                        _der_sequence(_der_context(0, key_id, constructed=False))),
    ]
    if constrained:
        extensions.append(_x509_extension(_OID_NAME_CONSTRAINTS, True, _name_constraints_der(
            *ca_name_constraints(extra_hosts))))
    der = _x509_certificate(_random_serial(), name, name, now - CERT_BACKDATE,
                            now + datetime.timedelta(days=days), (key.n, key.e), extensions, key)
    return der, key


def issue_server_certificate(ca_cert_der: bytes, ca_key: RSAPrivateKey, hosts: Iterable[str],
                             days: int = SERVER_CERT_DEFAULT_DAYS,
                             key: Optional[RSAPrivateKey] = None) -> Tuple[bytes, RSAPrivateKey]:
    """Issue a TLS server certificate for ``hosts`` (names and IP literals) signed by the CA;
    return (certificate DER, new private key).

    Subject CN is the first DNS name; every name goes in subjectAltName (IPs as iPAddress); EKU
    serverAuth; keyUsage digitalSignature+keyEncipherment and basicConstraints CA:FALSE, both
    critical; SKI/AKI. notBefore is back-dated by CERT_BACKDATE, notAfter is ``days`` from now,
    capped so the whole validity is <= 825 days and never beyond the CA's own notAfter.
    Raises ValueError for bad hosts or days, CertificateError if the CA key does not fit."""
    if not 1 <= days <= SERVER_CERT_MAX_DAYS:
        raise ValueError("server certificate validity must be 1..%d days" % SERVER_CERT_MAX_DAYS)
    dns_names, ips = normalize_hosts(hosts)
    if not dns_names and not ips:
        raise ValueError("a server certificate needs at least one host name or IP address")
    ca = parse_certificate_der(ca_cert_der)
    if not key_matches_certificate(ca_key, ca):
        raise CertificateError("the CA private key does not match the CA certificate")
    outside = [host for host in dns_names + ips if not ca.permits(host)]
    if outside:  # every verifier would refuse the certificate: say so now, sign nothing
        raise ValueError("the CA's name constraints do not permit %s" % ", ".join(outside))
    now = _utc_now()
    if ca.not_after <= now:
        raise CertificateError("the CA certificate expired on %s; create a new CA "
                               "(generate_cert.py --force) and trust it" % ca.not_after.date())
    key = key or generate_rsa_key()
    not_before = now - CERT_BACKDATE
    not_after = min(now + datetime.timedelta(days=days),
                    not_before + datetime.timedelta(days=SERVER_CERT_MAX_DAYS), ca.not_after)
    # GeneralName, RFC 5280 4.2.1.6: dNSName [2] IA5String, iPAddress [7] OCTET STRING (4 or 16
    # bytes), both IMPLICIT, hence primitive context tags 0x82 and 0x87.
    general_names = [_der_tlv(0x82, name.encode("ascii")) for name in dns_names]
    general_names += [_der_tlv(0x87, ipaddress.ip_address(ip).packed) for ip in ips]
    cn = next((name for name in dns_names if len(name) <= _CN_MAX_LEN), "llm-proxy server")
    extensions = [
        _x509_extension(_OID_BASIC_CONSTRAINTS, True, _der_sequence()),  # cA DEFAULT FALSE
        _x509_extension(_OID_KEY_USAGE, True, _der_named_bits(
            [_KU_DIGITAL_SIGNATURE, _KU_KEY_ENCIPHERMENT])),
        _x509_extension(_OID_EXT_KEY_USAGE, False, _der_sequence(_der_oid(_OID_KP_SERVER_AUTH))),
        _x509_extension(_OID_SUBJECT_ALT_NAME, False, _der_sequence(*general_names)),
        _x509_extension(_OID_SUBJECT_KEY_ID, False,
                        _der_octet_string(_key_identifier(key.n, key.e))),
        _x509_extension(_OID_AUTHORITY_KEY_ID, False, _der_sequence(
            _der_context(0, ca.subject_key_id or _key_identifier(ca_key.n, ca_key.e),
                         constructed=False))),
    ]
    der = _x509_certificate(_random_serial(), ca.subject_der, _x509_name(cn, _SERVER_ORGANIZATION),
                            not_before, not_after, (key.n, key.e), extensions, ca_key)
    return der, key


# -- files -----------------------------------------------------------------------------------------

def _user_name(uid: int) -> str:
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def _private_group(gid: int) -> bool:
    """True for our own user-private group (Debian/Ubuntu/Fedora give each user a group of the
    same name, and login umask 002 makes group-writable folders): writable by that group means
    writable by us only. Same rule as Debian's OpenSSH StrictModes patch."""
    try:
        import grp
        import pwd
        me = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(gid)
    except (ImportError, KeyError):
        return False
    return gid == os.getegid() and group.gr_name == me and set(group.gr_mem) <= {me}


def _unsafe_because(path: str, info: os.stat_result, kind: str) -> Optional[str]:
    """Why another local user could change ``path`` (a file or directory), with the command that
    fixes it; None when only we (or root) can."""
    me = os.geteuid()
    if info.st_uid not in (me, 0):
        return ("%s %s belongs to user %s, not to %s that runs the proxy, so that user can "
                "replace it; fix: chown %s %s (or run the proxy as %s)" % (
                    kind, path, _user_name(info.st_uid), _user_name(me), _user_name(me), path,
                    _user_name(info.st_uid)))
    if info.st_mode & stat.S_IWOTH:
        who = "every local user"
    elif info.st_mode & stat.S_IWGRP and not _private_group(info.st_gid):
        who = "its group (gid %d)" % info.st_gid
    else:
        return None
    return "%s %s is writable by %s (mode %04o); fix: chmod go-w %s" % (
        kind, path, who, stat.S_IMODE(info.st_mode), path)


def check_trusted_file(path: str, what: str = "certificate") -> None:
    """Refuse trust material another local user could have put there: raise CertificateError
    when the file, or the folder it is in (also the real folder behind a symlink), belongs to
    another user than ours or root, or is writable by group or others. Such a user could swap
    in their own CA (then handed to every device set up via /_proxy/ca.crt) or key. A missing
    file passes (its reader reports that). A no-op where there is no POSIX ownership."""
    if os.name != "posix":
        return
    checks = [(os.path.abspath(path), "file")]
    for folder in (os.path.dirname(os.path.abspath(path)),
                   os.path.dirname(os.path.realpath(path))):
        if (folder, "folder") not in checks:
            checks.append((folder, "folder"))
    for target, kind in checks:
        try:
            info = os.stat(target)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise CertificateError("cannot check %s: %s" % (target, exc.strerror or exc)) from None
        reason = _unsafe_because(target, info, kind)
        if reason:
            raise CertificateError("refusing to use the %s %s: %s" % (what, path, reason))


def _make_private_dirs(directory: str) -> None:
    """Create ``directory`` and any missing parents with mode 0700, whatever the umask (an
    umask of 000 would otherwise leave certs/ writable by every local user)."""
    missing = []
    while directory and not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            continue  # made meanwhile by someone else: check_trusted_file() judges it
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask


def _write_file_atomic(path: str, data: bytes, private: bool, make_dirs: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers (and a power cut) see the old or the new
    file, never half of one: a temp file in the same directory, fsync, os.replace, then fsync of
    the directory (POSIX) so the rename itself is durable. The one writer of certificates, keys,
    stats.json and the config file --add-key edits.

    mkstemp() creates the temp file with mode 0600, so a ``private`` file (a key, a config with
    keys) is never readable by others, not even for a moment; other files are widened to 0644
    before they take their name. ``make_dirs`` creates missing folders 0700 first (stats.json
    does not: a missing folder is reported, as a wrong path should be)."""
    directory = os.path.dirname(os.path.abspath(path))
    if make_dirs:
        _make_private_dirs(directory)
    fd, tmp = tempfile.mkstemp(prefix=_atomic_temp_prefix(path), suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            # Change the open file, not the name: chmod(tmp) would follow a symlink swapped in
            # for the temp file; and such a swap is found before it is renamed into place.
            if not private:
                try:
                    if hasattr(os, "fchmod"):
                        os.fchmod(handle.fileno(), 0o644)
                    else:
                        os.chmod(tmp, 0o644)  # Windows: no symlinks planted by others to fear
                except OSError:
                    pass  # a filesystem that keeps no modes (CIFS, some FUSE): stays 0600, no wider
            _check_still_ours(tmp, handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if os.name == "posix":  # make the rename durable
        try:
            dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass  # best effort: some filesystems refuse fsync on directories


def _atomic_temp_prefix(path: str) -> str:
    """How _write_file_atomic() names its temp files: ".<name>.<random>.tmp" beside ``path``."""
    return "." + os.path.basename(path) + "."


def remove_stale_temp_files(path: str) -> None:
    """Delete the temp files of _write_file_atomic() that a killed process left beside ``path``
    mid-write. Call it only where one process owns the file (at start-up): it would also
    remove the temp file of a write under way in another process.

    Only what mkstemp() makes for us: the exact name (prefix, 8 random characters, ".tmp"), a
    regular file (a symlink or folder by that name is someone else's, and is never followed),
    owned by us."""
    directory = os.path.dirname(os.path.abspath(path))
    ours = re.compile(re.escape(_atomic_temp_prefix(path)) + r"[a-z0-9_]{8}\.tmp\Z")
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not ours.match(name):
            continue
        full = os.path.join(directory, name)
        try:
            info = os.lstat(full)
            if not stat.S_ISREG(info.st_mode) or \
                    hasattr(os, "geteuid") and info.st_uid != os.geteuid():
                continue
            os.unlink(full)
            log.info("removed %s, left by an interrupted write", full)
        except OSError:
            pass


def _check_still_ours(tmp: str, fd: int) -> None:
    """Raise OSError unless ``tmp`` still names the file open as ``fd``: in a folder others can
    write, the temp file could be swapped for a symlink between mkstemp() and os.replace()."""
    if os.name != "posix":
        return
    have, want = os.lstat(tmp), os.fstat(fd)
    if (have.st_dev, have.st_ino) != (want.st_dev, want.st_ino):
        raise OSError(errno.EEXIST, "temporary file was replaced by another file while being "
                      "written (is the folder writable by others?)", tmp)


def ca_paths(directory: str) -> Tuple[str, str]:
    """Return (ca.pem path, ca-key.pem path) in ``directory``."""
    return os.path.join(directory, CA_CERT_FILENAME), os.path.join(directory, CA_KEY_FILENAME)


def create_ca_files(directory: str, extra_hosts: Iterable[str] = ()) -> CertificateInfo:
    """Generate a new CA and write ``ca.pem`` and ``ca-key.pem`` (0600) into ``directory``,
    replacing existing files (callers decide whether that is allowed). ``extra_hosts`` widen its
    name constraints (see ca_name_constraints()). Returns the CA's info."""
    cert_der, key = create_ca(extra_hosts=extra_hosts)
    ca_cert, ca_key = ca_paths(directory)
    _write_file_atomic(ca_key, private_key_to_pem(key), private=True)
    _write_file_atomic(ca_cert, _pem_encode(cert_der, "CERTIFICATE"), private=False)
    log.info("created local CA %s", ca_cert)
    return parse_certificate_der(cert_der)


def load_ca(directory: str) -> Tuple[CertificateInfo, RSAPrivateKey]:
    """Read ``ca.pem`` and ``ca-key.pem`` from ``directory`` and check they belong together.
    Raises CertificateError (naming the files) if either is missing or they do not match."""
    ca_cert, ca_key = ca_paths(directory)
    missing = [path for path in (ca_cert, ca_key) if not os.path.exists(path)]
    if missing:
        raise CertificateError("missing CA file%s: %s" % (
            "s" if len(missing) > 1 else "", ", ".join(missing)))
    check_trusted_file(ca_cert, "CA certificate")
    check_trusted_file(ca_key, "CA key")
    info = read_certificate_info(ca_cert)
    key = read_private_key(ca_key)
    if not key_matches_certificate(key, info):
        raise CertificateError("%s does not belong to %s" % (ca_key, ca_cert))
    return info, key


def issue_server_files(cert_file: str, key_file: str, hosts: Iterable[str],
                       days: int = SERVER_CERT_DEFAULT_DAYS,
                       ca_dir: Optional[str] = None) -> CertificateInfo:
    """Issue a server certificate with the CA in ``ca_dir`` (default: the directory of
    ``cert_file``) and write ``key_file`` (0600), ``cert_file`` and ``combined.pem`` (cert + key,
    0600) beside ``cert_file``, replacing existing files. Returns the new certificate's info."""
    ca_info, ca_key = load_ca(ca_dir or os.path.dirname(os.path.abspath(cert_file)))
    cert_der, key = issue_server_certificate(ca_info.der, ca_key, hosts, days)
    cert_pem = _pem_encode(cert_der, "CERTIFICATE")
    key_pem = private_key_to_pem(key)
    _write_file_atomic(key_file, key_pem, private=True)
    _write_file_atomic(cert_file, cert_pem, private=False)
    _write_file_atomic(_combined_path(cert_file), cert_pem + key_pem, private=True)
    return parse_certificate_der(cert_der)


def split_permitted(ca: CertificateInfo, hosts: Iterable[str]) -> Tuple[List[str], List[str]]:
    """Split ``hosts`` into (those the CA's name constraints permit, those they do not), keeping
    the order. Every host is permitted by an unconstrained (older) CA."""
    kept: List[str] = []
    dropped: List[str] = []
    for host in hosts:
        (kept if ca.permits(host) else dropped).append(host)
    return kept, dropped


def _outside_ca_warning(dropped: Sequence[str]) -> str:
    return ("left out of the certificate, outside what the local CA may sign for: %s (a public "
            "name or address needs to be in tls.hosts when the CA is created)" % ", ".join(dropped))


def _combined_path(cert_file: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(cert_file)), COMBINED_FILENAME)


# -- start-up entry point --------------------------------------------------------------------------

class CertStatus(NamedTuple):
    """Outcome of ensure_certificates(), for the start-up banner (no I/O in it).

    action: "created" (new server certificate), "renewed" (re-issued with the existing CA),
    "kept" (ours, still good) or "external" (not issued by our CA: reported, never touched)."""
    action: str
    cert_file: str
    key_file: str
    combined_file: Optional[str]     # None for external certificates
    ca_file: Optional[str]           # None when the certificate is not from our CA
    ca_created: bool                 # True when a new CA was made: it must be trusted first
    dns_names: Tuple[str, ...]
    ip_addresses: Tuple[str, ...]
    not_after: Optional[datetime.datetime]
    serial: Optional[int]
    reasons: Tuple[str, ...]         # why it was (re-)issued
    warnings: Tuple[str, ...]        # problems worth logging (expiring external cert, ...)
    ca_constrained: bool = False     # our CA carries name constraints (local names only)

    def describe(self) -> str:
        """A few human-readable lines for the start-up banner."""
        lines = ["TLS certificate %s: %s" % (self.action, self.cert_file)]
        if self.reasons:
            lines.append("  reason: " + "; ".join(self.reasons))
        if self.not_after is not None:
            lines.append("  valid until %s UTC" % self.not_after.strftime("%Y-%m-%d %H:%M"))
        names = list(self.dns_names) + list(self.ip_addresses)
        if names:
            lines.append("  names: " + ", ".join(names))
        if self.ca_file:
            lines.append("  CA: %s%s" % (self.ca_file, "  (%s)" % CA_NEW_NOTE
                                          if self.ca_created else ""))
        if self.ca_constrained:
            lines.append("  CA signs only local names and private addresses; a public address "
                         "only if it was in tls.hosts when the CA was created")
        for warning in self.warnings:
            lines.append("  warning: " + warning)
        return "\n".join(lines)


def ensure_certificates(cert_file: str, key_file: str, extra_hosts: Iterable[str] = (),
                        days: int = SERVER_CERT_DEFAULT_DAYS,
                        renew_before_days: int = CERT_RENEW_BEFORE_DAYS,
                        progress=None, dry_run: bool = False) -> CertStatus:
    """Make sure a usable server certificate exists; return what was done.

    ``progress(text)``, when given, is called before the slow step (a new CA: seconds of RSA key
    generation in pure Python), so a user at a terminal sees why the start pauses.

    The CA lives beside ``cert_file`` (``ca.pem``, ``ca-key.pem``).
    * cert and key missing: create the CA if it is missing too (reuse it otherwise), then issue
      the server certificate for discover_hosts() + ``extra_hosts`` and write combined.pem. A
      new CA is name-constrained (create_ca()); hosts outside its constraints are left out of
      the certificate and named in the warnings.
    * any of these files, or their folder, writable by or belonging to another local user:
      CertificateError (check_trusted_file()).
    * cert issued by our CA (its signature verifies with ca.pem and ca-key.pem is present):
      re-issue it when it expires within ``renew_before_days`` or its SANs miss a current name or
      address. The new certificate keeps the old names too, so names once added with
      generate_cert.py --host are not lost.
    * cert not issued by our CA: never touched, only reported (with warnings).
    * only one of cert/key present, key not matching cert, or half a CA: CertificateError, so
      that nothing the user made is overwritten silently.
    With ``dry_run`` nothing is written: the status says what a start would do (--check).
    Raises CertificateError only (also for an invalid extra host or ``days``, and for files that
    cannot be written)."""
    if not 1 <= days <= SERVER_CERT_MAX_DAYS:
        raise CertificateError("server certificate validity must be 1..%d days, not %s"
                               % (SERVER_CERT_MAX_DAYS, days))
    try:
        extra = list(extra_hosts)
        wanted = normalize_hosts(list(discover_hosts()) + extra)
    except ValueError as exc:
        raise CertificateError("invalid extra host: %s" % exc) from None
    try:
        return _ensure_certificates(os.path.abspath(cert_file), os.path.abspath(key_file),
                                    wanted[0], wanted[1], days, renew_before_days, extra,
                                    progress, dry_run)
    except OSError as exc:
        raise CertificateError("cannot write %s: %s" % (
            exc.filename or os.path.dirname(os.path.abspath(cert_file)),
            exc.strerror or exc)) from None


def _ensure_certificates(cert_file: str, key_file: str, wanted_dns: List[str],
                         wanted_ips: List[str], days: int, renew_before_days: int,
                         extra_hosts: Sequence[str] = (), progress=None,
                         dry_run: bool = False) -> CertStatus:
    ca_dir = os.path.dirname(cert_file)
    ca_cert_path, ca_key_path = ca_paths(ca_dir)
    combined_path = _combined_path(cert_file)
    # Nothing here is read, trusted or written next to files another local user can swap.
    for path, what in ((cert_file, "certificate"), (key_file, "key"),
                       (ca_cert_path, "CA certificate"), (ca_key_path, "CA key")):
        check_trusted_file(path, what)
    if not dry_run:
        # A start owns these files, as it owns stats.json: what a killed write left beside
        # them (a private key's temp file among them) goes, as stats.json's does.
        for path in (cert_file, key_file, combined_path, ca_cert_path, ca_key_path):
            remove_stale_temp_files(path)

    have_cert, have_key = os.path.exists(cert_file), os.path.exists(key_file)
    if have_cert != have_key:
        present, absent = (cert_file, key_file) if have_cert else (key_file, cert_file)
        raise CertificateError(
            "%s exists but %s is missing; restore it, or delete %s to have a new certificate "
            "issued" % (present, absent, present))

    def ca_warnings(ca_not_after: datetime.datetime) -> Tuple[str, ...]:
        if ca_not_after - _utc_now() >= datetime.timedelta(days=renew_before_days):
            return ()
        return ("the local CA %s expires on %s; then delete the CA and certificate files in %s "
                "to start over (and trust the new CA)" % (ca_cert_path, ca_not_after.date(),
                                                          ca_dir),)

    def issue(action: str, reasons: List[str], hosts: List[str], ca_created: bool) -> CertStatus:
        if dry_run:
            return CertStatus(action, cert_file, key_file, combined_path, ca_cert_path,
                              ca_created, (), (), None, None, tuple(reasons), ())
        ca_info = read_certificate_info(ca_cert_path)
        hosts, dropped = split_permitted(ca_info, hosts)
        info = issue_server_files(cert_file, key_file, hosts, days, ca_dir)
        log.info("TLS certificate %s: %s (%s)", action, cert_file, "; ".join(reasons))
        warnings = ca_warnings(ca_info.not_after)
        if dropped:
            warnings += (_outside_ca_warning(dropped),)
        return CertStatus(action, cert_file, key_file, combined_path, ca_cert_path, ca_created,
                          info.dns_names, info.ip_addresses, info.not_after, info.serial,
                          tuple(reasons), warnings, ca_info.permitted_dns is not None)

    if not have_cert:
        ca_created = False
        have_ca = [os.path.exists(path) for path in (ca_cert_path, ca_key_path)]
        if not any(have_ca):
            if not dry_run:
                if progress is not None:
                    progress(CA_PROGRESS_MESSAGE)
                create_ca_files(ca_dir, extra_hosts)
            ca_created = True
        elif not all(have_ca):
            raise CertificateError(
                "%s is missing, so no certificate can be issued; restore it, or delete %s to "
                "start over with a new CA (which must then be trusted again)" % (
                    ca_key_path if have_ca[0] else ca_cert_path,
                    ca_cert_path if have_ca[0] else ca_key_path))
        return issue("created", ["no certificate yet"], wanted_dns + wanted_ips, ca_created)

    try:
        cert = read_certificate_info(cert_file)
    except CertificateError as exc:
        # Not something our reader understands, so certainly not ours: leave it to the ssl
        # module, which reads far more formats, and only report it.
        return CertStatus("external", cert_file, key_file, None, None, False, (), (), None, None,
                          (), ("could not inspect the certificate: %s" % exc,))
    now = _utc_now()
    ca: Optional[CertificateInfo] = None
    if os.path.exists(ca_cert_path):
        try:
            candidate = read_certificate_info(ca_cert_path)
            if certificate_issued_by(cert, candidate):
                ca = candidate
        except CertificateError as exc:
            log.warning("ignoring unreadable CA: %s", exc)

    # A key that does not fit its certificate: TLS cannot start. Say so clearly instead of
    # letting ssl.load_cert_chain fail with "key values mismatch". (Keys we cannot parse, e.g.
    # EC or encrypted ones, are left for the ssl module to judge.)
    try:
        key: Optional[RSAPrivateKey] = read_private_key(key_file)
    except CertificateError:
        key = None
    if key is not None and not key_matches_certificate(key, cert):
        raise CertificateError("%s does not belong to %s; restore the right key, or %s" % (
            key_file, cert_file, "run generate_cert.py --renew to re-issue both" if ca
            else "delete both to have a new certificate issued"))

    reasons = []
    remaining = cert.not_after - now
    if remaining < datetime.timedelta(days=renew_before_days):
        reasons.append("expires %s" % cert.not_after.date() if remaining.total_seconds() > 0
                       else "expired %s" % cert.not_after.date())
    dropped: List[str] = []
    all_wanted = wanted_dns + wanted_ips
    if ca is not None:  # names this CA may not sign for are left out, not wanted each start
        wanted_dns, dropped = split_permitted(ca, wanted_dns)
        wanted_ips, dropped_ips = split_permitted(ca, wanted_ips)
        dropped += dropped_ips
    missing = [name for name in wanted_dns if not cert.covers([name], [])]
    missing += [ip for ip in wanted_ips if not cert.covers([], [ip])]
    if missing:
        reasons.append("does not name " + ", ".join(missing))

    if ca is None:
        return CertStatus("external", cert_file, key_file, None, None, False, cert.dns_names,
                          cert.ip_addresses, cert.not_after, cert.serial, (),
                          tuple("user-supplied certificate " + r for r in reasons))

    if reasons and os.path.exists(ca_key_path):
        # issue() leaves out, and warns about, what the CA may not sign for.
        hosts = all_wanted + list(cert.dns_names) + list(cert.ip_addresses)
        return issue("renewed", reasons, hosts, False)

    warnings = list(ca_warnings(ca.not_after))
    if dropped:
        warnings.append(_outside_ca_warning(dropped))
    if reasons:
        warnings.append("certificate %s, but %s is missing so it cannot be renewed"
                        % ("; ".join(reasons), ca_key_path))
    if key is not None and not os.path.exists(combined_path) and not dry_run:
        # combined.pem is derived from the other two; recreate it if someone removed it.
        with open(cert_file, "rb") as handle:
            cert_pem = handle.read()
        _write_file_atomic(combined_path, cert_pem + private_key_to_pem(key), private=True)
    return CertStatus("kept", cert_file, key_file,
                      combined_path if os.path.exists(combined_path) else None, ca_cert_path,
                      False, cert.dns_names, cert.ip_addresses, cert.not_after, cert.serial, (),
                      tuple(warnings), ca.permitted_dns is not None)


# -- trust instructions ----------------------------------------------------------------------------

# Said next to the CA's path or URL (banner, CertStatus.describe) when it was just made.
CA_NEW_NOTE = "NEW: trust it on every device"


class TrustStep(NamedTuple):
    """One thing to do. Markup in `text`: *bold*, `code`, [Menu > Path]; {ca} is the CA file and
    {ca_url} where a phone downloads it. `commands` are shell lines doing the same."""
    text: str
    commands: Tuple[str, ...] = ()


class TrustPlatform(NamedTuple):
    """How one platform comes to trust the CA. trust_instructions() (terminal), the set-up page
    and README's table (checked by a test) are all rendered from TRUST_PLATFORMS."""
    key: str                        # id on the set-up page (os-<key>), matched to the visitor
    name: str
    steps: Tuple[TrustStep, ...]
    note: str = ""                  # a caveat after the steps


TRUST_PLATFORMS = (
    TrustPlatform("ios", "iPhone and iPad", (
        TrustStep("In *Safari*, download {ca_url} and allow the configuration profile download."),
        TrustStep("Open [Settings > General > VPN & Device Management] (older iOS: [Settings > "
                  "Profile Downloaded]), tap the profile and choose *Install*."),
        TrustStep("Open [Settings > General > About > Certificate Trust Settings] and switch on "
                  "full trust for the proxy's CA; without it Safari still rejects the "
                  "certificate."),
    )),
    TrustPlatform("android", "Android", (
        TrustStep("In Chrome, download {ca_url}."),
        TrustStep("Open [Settings > Security & privacy > More security settings > Encryption & "
                  "credentials > Install a certificate > CA certificate], confirm *Install "
                  "anyway* and pick the file (menu names vary by vendor: search Settings for "
                  "\"CA certificate\")."),
        TrustStep("Restart Chrome."),
    ), "Chrome trusts user-installed CAs; most other apps do not. Firefox for Android needs "
       "[Settings > About Firefox] (tap the logo five times), then [Settings > Secret Settings "
       "> Use third party CA certificates]."),
    TrustPlatform("macos", "macOS", (
        TrustStep("Double-click {ca}: Keychain Access adds it; open it there, expand *Trust* and "
                  "set *When using this certificate* to *Always Trust*. Or in Terminal:",
                  ("sudo security add-trusted-cert -d -r trustRoot "
                   "-k /Library/Keychains/System.keychain {ca}",)),
        TrustStep("Quit and reopen the browser (Safari, Chrome and Edge use the keychain)."),
    )),
    TrustPlatform("windows", "Windows", (
        TrustStep("Download {ca_url} and double-click it (Windows opens .crt, not .pem), choose "
                  "*Install Certificate* > *Local Machine* > *Place all certificates in the "
                  "following store* > *Trusted Root Certification Authorities*. Or in an "
                  "administrator prompt:",
                  ("certutil -addstore -f Root {ca}",)),
        TrustStep("Restart the browser (Chrome and Edge use the Windows store)."),
    )),
    TrustPlatform("linux", "Linux", (
        TrustStep("System store (curl, Python, most tools), Debian and Ubuntu:",
                  ("sudo cp {ca} /usr/local/share/ca-certificates/llm-proxy-ca.crt",
                   "sudo update-ca-certificates")),
        TrustStep("Fedora and RHEL (Arch: `/etc/ca-certificates/trust-source/anchors/`):",
                  ("sudo cp {ca} /etc/pki/ca-trust/source/anchors/llm-proxy-ca.pem",
                   "sudo update-ca-trust")),
        TrustStep("Chrome and Chromium keep their own store: [Settings > Privacy and security > "
                  "Security > Manage certificates > Authorities > Import], tick *Trust this "
                  "certificate for identifying websites*. Or (package `libnss3-tools` or "
                  "`nss-tools`):",
                  ("certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n llm-proxy-ca -i {ca}",)),
        TrustStep("Restart the browser."),
    )),
    TrustPlatform("firefox", "Firefox (all desktop systems)", (
        TrustStep("Firefox keeps its own store: [Settings > Privacy & Security > Certificates > "
                  "View Certificates > Authorities > Import], pick {ca} and tick *Trust this CA "
                  "to identify websites*."),
        TrustStep("On Windows and macOS, Firefox 120 and newer trusts the system store by default "
                  "(older: set `security.enterprise_roots.enabled` to `true` in `about:config`)."),
    )),
)

# Markup in a step's text, and the two slots filled per rendering.
_TRUST_MARKUP = re.compile(
    r"\*(?P<bold>[^*]+)\*|`(?P<code>[^`]+)`|\[(?P<menu>[^\]]+)\]|\{(?P<slot>ca|ca_url)\}")


def render_trust_text(text: str, slots: Dict[str, str], escape=str, bold=str, code=str,
                      menu=str) -> str:
    """A TrustStep text in one output format: plain text goes through escape, each piece of
    markup through its function (given the escaped inside), {ca}/{ca_url} become slots[...]
    (already in the output format)."""
    out, pos = [], 0
    for m in _TRUST_MARKUP.finditer(text):
        out.append(escape(text[pos:m.start()]))
        kind = m.lastgroup
        out.append(slots[m.group(kind)] if kind == "slot" else
                   {"bold": bold, "code": code, "menu": menu}[kind](escape(m.group(kind))))
        pos = m.end()
    out.append(escape(text[pos:]))
    return "".join(out)


def trust_instructions(ca_path: str, ca_url: Optional[str] = None) -> str:
    """Return short, platform-by-platform instructions for trusting the CA at ``ca_path``
    (optionally also downloadable from ``ca_url``, e.g. https://<ip>:8443/_proxy/ca.crt).
    Browsers' fetch() needs this; clicking through a warning is not enough."""
    slots = {"ca": ca_path, "ca_url": ca_url or "https://<this machine>:<port>/_proxy/ca.crt"}
    lines = ["Trust the local CA once on every device that will call the proxy (it signs only",
             "this proxy's certificates; keep %s private)." % os.path.join(
                 os.path.dirname(ca_path) or ".", CA_KEY_FILENAME)]
    for platform in TRUST_PLATFORMS:
        lines += ["", "%s:" % platform.name]
        for number, step in enumerate(platform.steps, 1):
            lines += textwrap.wrap(render_trust_text(step.text, slots), 96,
                                   initial_indent="  %d. " % number, subsequent_indent="     ",
                                   break_on_hyphens=False, break_long_words=False)
            lines += ["       " + command.replace("{ca}", ca_path) for command in step.commands]
        if platform.note:
            lines += textwrap.wrap(render_trust_text(platform.note, slots), 96,
                                   initial_indent="  ", subsequent_indent="  ",
                                   break_on_hyphens=False, break_long_words=False)
    return "\n".join(lines)


def trust_table_markdown(ca: str = "certs/ca.pem",
                         ca_url: str = "https://<proxy>:8443/_proxy/ca.crt") -> str:
    """README's trust table (a test checks README shows exactly this): one row per platform."""
    slots = {"ca": "`%s`" % ca, "ca_url": "`%s`" % ca_url}
    style = {"bold": "**{}**".format, "code": "`{}`".format,
             "menu": lambda path: path.replace(" > ", " \u203a ")}
    rows = ["| Platform | How |", "|---|---|"]
    for platform in TRUST_PLATFORMS:
        parts = []
        for number, step in enumerate(platform.steps, 1):
            text = "%d. %s" % (number, render_trust_text(step.text, slots, **style))
            if step.commands:
                text += " `%s`" % " && ".join(c.replace("{ca}", ca) for c in step.commands)
            parts.append(text)
        if platform.note:
            parts.append(render_trust_text(platform.note, slots, **style))
        rows.append("| %s | %s |" % (platform.name, " ".join(parts)))
    return "\n".join(rows)


def make_server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server-side TLS context: TLS 1.2+, ALPN http/1.1, our certificate. Raises CertificateError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    check_trusted_file(cert_file, "certificate")  # at start, on SIGHUP and for the file watcher
    check_trusted_file(key_file, "key")
    for path, what in ((cert_file, "certificate"), (key_file, "private key")):
        # load_cert_chain's own errors name no file ("certificate file missing: None") or
        # only say "PEM lib": name the file and the fix first.
        if not os.path.exists(path):
            raise CertificateError("%s file missing: %s" % (what, path))
        problem = _pem_problem(path, what)
        if problem:
            raise CertificateError(problem)
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError("cannot load certificate %s with key %s: %s"
                               % (cert_file, key_file, exc)) from None
    return context


def _pem_problem(path: str, what: str) -> Optional[str]:
    """Why `path` cannot be the PEM file Python's ssl module needs (DER, empty...), or None."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(1 << 20)
    except OSError as exc:
        return "cannot read %s %s: %s" % (what, path, exc.strerror or exc)
    if b"-----BEGIN " in data:
        return None
    if not data.strip():
        return "%s file %s is empty" % (what, path)
    if data[:1] == b"\x30":
        tool = "x509" if what == "certificate" else "pkey"
        return ("%s %s is in DER (binary) form, but PEM (text, -----BEGIN ...) is needed; "
                "convert it: openssl %s -inform der -in %s -out %s.pem, and point the config "
                "at the .pem file" % (what, path, tool, path, os.path.splitext(path)[0]))
    return "%s %s is not a PEM file (no -----BEGIN line)" % (what, path)


def check_configured_certificate(config) -> None:
    """Refuse a configured (non-default) tls.cert/tls.key that does not exist.

    Only the default location is ours to create a CA and certificate in; a configured path
    that is missing is a typo or an unmounted volume, and generating into it would put a new
    CA into the user's own certificate folder. Raises CertificateError naming the fix."""
    if config.tls_managed:
        return
    missing = [path for path in (config.cert_file, config.key_file) if not os.path.exists(path)]
    if missing:
        raise CertificateError(
            "%s not exist (set by tls.cert/tls.key or CERT_FILE/KEY_FILE); the proxy "
            "creates certificates only in its default place, never at a configured path: fix "
            "the path, or remove tls.cert and tls.key to use the proxy's own certificate"
            % (" and ".join(missing) + (" do" if len(missing) > 1 else " does")))


# ==================================================================================================
# Usage extraction: which endpoints report tokens, and an incremental tap that reads them
# ==================================================================================================

# Request bodies up to BODY_BUFFER_LIMIT are inspected whole; above it the HTTP layer hands us only
# the first BODY_PEEK_LIMIT bytes (it has to stream the rest to the backend anyway).
# A non-streaming (JSON) response is buffered for parsing up to this many decoded bytes.  Above
# it we keep only its head and tail and look for usage in the tail (usage comes last in every API).
USAGE_MAX_JSON_BODY = 4 << 20
# One SSE event or NDJSON line longer than this is skipped instead of buffered.
USAGE_MAX_LINE = 1 << 20
# A compressed body stops being parsed once this much has been inflated (zip-bomb guard).
USAGE_MAX_DECODED = 64 << 20
# A token count at or above this is no count (no model reads 10^18 tokens): it counts as 0.
USAGE_MAX_COUNT = 10 ** 18
# The tap's work on one response is bounded: 4 KB of gzip can inflate to a million tiny JSON lines
# (seconds of CPU, and every other request slowed with it). Each line split costs one unit, each
# JSON parse 4 units plus one per 32 bytes; a response may spend USAGE_WORK_BASE units plus one
# per USAGE_WORK_BYTES bytes received from the backend. Real streams use a tenth of that (a vLLM
# chunk that carries usage every token: 13 units per 235 bytes). Past it the tap gives up and the
# usage is "missing"; the client's bytes are not touched.
USAGE_WORK_BASE = 50000
USAGE_WORK_BYTES = 8

_USAGE_HEAD_KEEP = 64 << 10
_USAGE_TAIL_KEEP = 256 << 10
_USAGE_INFLATE_CHUNK = 64 << 10
_USAGE_MODEL_PROBES = 3   # stream events parsed unconditionally while looking for the model name

_USAGE_JSON_WS = re.compile(r"[ \t\n\r]*")
_usage_json_decoder = json.JSONDecoder()
# Byte tests on every event ("byte tests") use bytes.find(), not `in`: on CPython 3.9-3.13
# `x in some_bytes` first tries x as an integer and formats (then drops) a TypeError, ~2,500
# instructions per test; find() does not (callgrind, issue 16). 3.13: 405 ns vs 58 ns for b"\r".
# How OpenAI, vLLM, llama.cpp and Ollama end every chunk once include_usage is on: the empty
# member, last, then the top-level object's brace (_usage_null_is_last_member).
_NULL_USAGE_TAIL = b',"usage":null}'
# The `"usage":null` member in any layout.  Matched at a position found by bytes.find (a regex
# scan over the whole line is ten times slower), on one data line without its line ending, so
# the whitespace classes never cross a line.
_USAGE_NULL_MEMBER = re.compile(rb'"usage"[ \t]*:[ \t]*null')
_USAGE_COMMA_AFTER = re.compile(rb'[ \t]*,[ \t]*')
_USAGE_BOM = b"\xef\xbb\xbf"


def classify_endpoint(path: str) -> Optional[str]:
    """Return the usage kind of a request path, or None when it is not an API we read usage from.

    ``path`` is the request path without its query string (a query is tolerated and ignored).
    Matching is by suffix, so a prefix in front still counts ("/ollama/v1/chat/completions"), and a
    trailing slash is tolerated; the longest matching suffix of API_FORMATS names the kind.
    Only POST requests should be classified: a GET of the same path (e.g. listing) creates no
    usage.
    """
    if not path:
        return None
    p = path.split("?", 1)[0].rstrip("/").lower()
    for suffix, kind in USAGE_ENDPOINT_SUFFIXES:
        if p.endswith(suffix):
            return kind
    return None


def is_usage_kind(kind: Optional[str]) -> bool:
    """True when responses of this kind carry token usage (everything but count_tokens / None)."""
    return kind in USAGE_KINDS


def is_completion_kind(kind: Optional[str]) -> bool:
    """True for the kinds counted as "completions" in the stats.

    Chat, legacy completions, Responses, Anthropic messages, Ollama generate/chat and llama.cpp
    /completion.  Embeddings use tokens but are not completions; count_tokens is neither.
    """
    return kind in USAGE_COMPLETION_KINDS


@dataclass(init=False)
class RequestInfo:
    """What the proxy learned from a request body.

    ``model``: the top-level "model" string or None.  ``stream``: the top-level "stream" boolean,
    None when absent (or not a boolean, or not found in a body prefix).  ``include_usage``: True
    when ``stream_options.include_usage`` is true.
    """

    # The dataclass gives __repr__ and __eq__ (and, being mutable, no __hash__). __init__ stays
    # hand-written because a 3.9 dataclass cannot have both __slots__ and field defaults.
    __slots__ = ("model", "stream", "include_usage")
    model: Optional[str]
    stream: Optional[bool]
    include_usage: bool

    def __init__(self, model: Optional[str] = None, stream: Optional[bool] = None,
                 include_usage: bool = False) -> None:
        self.model = model
        self.stream = stream
        self.include_usage = include_usage


def _usage_json_members(text: str) -> Tuple[List[Tuple[str, Any, int, int]], int]:
    """Walk the top-level JSON object in ``text`` one member at a time.

    Returns ``(members, close)``: ``members`` lists ``(key, value, value_start, value_end)`` (str
    indexes) for every member whose value parsed and was followed by "," or "}"; ``close`` is the
    index of the object's closing brace, or -1 when the text is not an object, breaks, or ends
    first (a body prefix).  Values are parsed by the stdlib decoder (C speed), so a big
    "messages" array costs one fast parse, not a Python loop over characters.
    """
    members: List[Tuple[str, Any, int, int]] = []
    ws = _USAGE_JSON_WS.match
    decode = _usage_json_decoder.raw_decode
    i = ws(text, 0).end()
    if text[i:i + 1] == "\ufeff":
        i = ws(text, i + 1).end()
    if text[i:i + 1] != "{":
        return members, -1
    i = ws(text, i + 1).end()
    if text[i:i + 1] == "}":
        return members, i
    try:
        while True:
            if text[i:i + 1] != '"':
                return members, -1
            key, i = decode(text, i)
            i = ws(text, i).end()
            if text[i:i + 1] != ":":
                return members, -1
            start = ws(text, i + 1).end()
            value, end = decode(text, start)
            i = ws(text, end).end()
            c = text[i:i + 1]
            if c not in (",", "}"):
                # Also where a prefix ends right after a value: "stream": tr|ue, or a number
                # that may continue -- only values with a delimiter after them are trusted.
                return members, -1
            members.append((key, value, start, end))
            if c == "}":
                return members, i
            i = ws(text, i + 1).end()
    except (ValueError, RecursionError):
        return members, -1


def _usage_loads_utf8(body: bytes) -> Any:
    """json.loads(body), or None where it raises; a UTF-8 body skips json.loads' layers.

    Every request to a usage endpoint is read once; json.loads(bytes) first guesses the
    encoding and goes through two Python layers before the C scanner (4.6 vs ~2 us for a small
    body, issue 16). Anything but plain UTF-8 JSON takes json.loads itself, so results match.
    """
    try:
        text = body.decode("utf-8")
        start = _USAGE_JSON_WS.match(text).end()
        obj, end = _usage_json_decoder.raw_decode(text, start)
        if _USAGE_JSON_WS.match(text, end).end() == len(text):
            return obj
    except (ValueError, RecursionError):
        pass
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _usage_fill_info(info: RequestInfo, get: Any) -> RequestInfo:
    model = get("model")
    info.model = model if isinstance(model, str) else None
    stream = get("stream")
    info.stream = stream if isinstance(stream, bool) else None
    options = get("stream_options")
    info.include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return info


def inspect_request(kind: Optional[str], body: Optional[bytes],
                    complete: bool = True) -> RequestInfo:
    """Read model, stream and stream_options.include_usage from a request body.

    ``complete`` says whether ``body`` is the whole body (then it is parsed as JSON) or only a
    prefix of a bigger one.  For a prefix (or a body that does not parse) the top-level object is
    walked member by member up to the first member that is cut off or broken: keys that come
    after that point stay unknown (model None, stream None, include_usage False).  Clients
    usually send "model" first, but "stream" often comes after a large "messages" array, so a
    stream flag beyond the prefix is simply not found.  Never raises; ``kind`` is accepted for
    symmetry with the other calls.
    """
    info = RequestInfo()
    if not body:
        return info
    try:
        if not isinstance(body, bytes):
            body = bytes(body)
        if complete:
            obj = _usage_loads_utf8(body)
            if isinstance(obj, dict):
                return _usage_fill_info(info, obj.get)
        text = body.decode("utf-8", "replace")
        found: Dict[str, Any] = {}
        for key, value, _start, _end in _usage_json_members(text)[0]:
            found[key] = value
        return _usage_fill_info(info, found.get)
    except Exception:  # never let a strange body break forwarding
        log.debug("usage: could not inspect request body", exc_info=True)
        return RequestInfo()


def inject_stream_usage(kind: Optional[str], body: Optional[bytes],
                        info: Optional[RequestInfo] = None) -> Optional[bytes]:
    """Return the request body with ``stream_options.include_usage: true`` added, or None.

    Only for openai_chat / openai_completions bodies that are one complete, valid JSON object with
    top-level ``"stream": true`` and include_usage not already true.  The edit is textual: every
    other byte stays as the client sent it.  A missing (or null) "stream_options" becomes
    ``"stream_options":{"include_usage":true}`` appended as the last member; an existing object
    keeps its other keys and gains ``"include_usage":true`` (only that small object is
    re-serialised).  Returns None when nothing should change (wrong kind, not streaming, already
    asked, invalid JSON, non-UTF-8 body, odd stream_options type).  Never raises.
    """
    if kind not in _USAGE_INJECT_KINDS or not body:
        return None
    if info is not None and (info.include_usage or info.stream is not True):
        return None     # inspect_request read the same members: no walk through them again
    try:
        text = bytes(body).decode("utf-8")
        members, close = _usage_json_members(text)
        if close < 0 or text[close + 1:].strip(" \t\n\r"):
            return None
        last: Dict[str, Tuple[Any, int, int]] = {}
        for key, value, start, end in members:
            last[key] = (value, start, end)   # duplicate keys: the last wins, as in json.loads
        if "stream" not in last or last["stream"][0] is not True:
            return None
        if "stream_options" not in last:
            added = ',"stream_options":{"include_usage":true}'
            return (text[:close] + added + text[close:]).encode("utf-8")
        options, start, end = last["stream_options"]
        if options is None:
            new = '{"include_usage":true}'
        elif isinstance(options, dict):
            if options.get("include_usage") is True:
                return None
            options = dict(options)
            options["include_usage"] = True
            new = json.dumps(options, separators=(",", ":"))
        else:
            return None
        return (text[:start] + new + text[end:]).encode("utf-8")
    except Exception:
        log.debug("usage: could not inject include_usage", exc_info=True)
        return None


def _usage_int(value: Any) -> int:
    """A token count from JSON: ints (not bools) and integral floats below 10**18; else 0.

    Ints are bounded like floats: a backend may report a 4,300-digit count, and such an int
    cannot become a float (tokens/s) nor, summed, a string (Python 3.11+ caps int digits).
    """
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value if 0 < value < USAGE_MAX_COUNT else 0
    if isinstance(value, float) and value == value and 0 < value < USAGE_MAX_COUNT:
        return int(value)
    return 0


def _usage_dig(obj: Dict[str, Any], key: str, sub: str) -> Any:
    inner = obj.get(key)
    return inner.get(sub) if isinstance(inner, dict) else None


def _usage_anthropic_counts(u: Dict[str, Any]) -> Tuple[int, int, int, int, int]:
    # Anthropic's input_tokens excludes the cached parts; all input = the three added up.
    cache_write = _usage_int(u.get("cache_creation_input_tokens"))
    cache_read = _usage_int(u.get("cache_read_input_tokens"))
    prompt = _usage_int(u.get("input_tokens")) + cache_write + cache_read
    return prompt, _usage_int(u.get("output_tokens")), cache_read, cache_write, 0


def _usage_openai_counts(u: Dict[str, Any]) -> Tuple[int, int, int, int, int]:
    # OpenAI chat / completions / embeddings: prompt_tokens already includes cached_tokens.
    return (_usage_int(u.get("prompt_tokens")), _usage_int(u.get("completion_tokens")),
            _usage_int(_usage_dig(u, "prompt_tokens_details", "cached_tokens")), 0,
            _usage_int(_usage_dig(u, "completion_tokens_details", "reasoning_tokens")))


def _usage_responses_counts(u: Dict[str, Any]) -> Tuple[int, int, int, int, int]:
    # OpenAI Responses: input_tokens already includes input_tokens_details.cached_tokens.
    return (_usage_int(u.get("input_tokens")), _usage_int(u.get("output_tokens")),
            _usage_int(_usage_dig(u, "input_tokens_details", "cached_tokens")), 0,
            _usage_int(_usage_dig(u, "output_tokens_details", "reasoning_tokens")))


def _usage_is_openai(u: Dict[str, Any]) -> bool:
    return "prompt_tokens" in u or "completion_tokens" in u


def _counts_compatible(u: Dict[str, Any]) -> Tuple[int, int, int, int, int]:
    """A ``usage`` object of an OpenAI-compatible API, whichever of the three shapes it has.

    Local servers answer on OpenAI paths with OpenAI, Responses or Anthropic-style objects.
    """
    if _usage_is_openai(u):
        return _usage_openai_counts(u)
    if "input_tokens_details" in u or "output_tokens_details" in u:
        return _usage_responses_counts(u)
    return _usage_anthropic_counts(u)


def _counts_anthropic(u: Dict[str, Any]) -> Tuple[int, int, int, int, int]:
    return _usage_openai_counts(u) if _usage_is_openai(u) else _usage_anthropic_counts(u)


def _counts_responses(u: Dict[str, Any]) -> Tuple[int, int, int, int, int]:
    return _usage_openai_counts(u) if _usage_is_openai(u) else _usage_responses_counts(u)


class UsageFindings:
    """What one response has told about itself so far; the extractors write here.

    ``counts`` is (prompt, completion, cacheRead, cacheWrite, reasoning) or None; ``final`` says
    they came from a usage report the API means as final (llama.cpp's running counts are not);
    ``state`` is scratch space for an extractor that must combine several events.
    """

    __slots__ = ("counts_of", "model", "counts", "final", "error", "state")

    def __init__(self, counts_of) -> None:
        self.counts_of = counts_of   # the format's normaliser of a `usage` object
        self.model: Optional[str] = None
        self.counts: Optional[Tuple[int, int, int, int, int]] = None
        self.final = False
        self.error: Optional[str] = None
        self.state: Dict[str, Any] = {}

    def see_model(self, model: Any) -> None:
        """Keep the first non-empty model name the response states."""
        if self.model is None and isinstance(model, str) and model:
            self.model = model

    def report(self, counts: Tuple[int, int, int, int, int], final: bool = True) -> None:
        """Counts from the response; a later report replaces an earlier one (cumulative)."""
        self.counts = counts
        self.final = self.final or final

    def note_error(self, err: Any) -> None:
        """Remember the first error: it is the cause, later ones are consequences."""
        if self.error is None:
            self.error = _usage_describe_error(err)


def _extract_compatible(found: UsageFindings, obj: Dict[str, Any], event: Optional[str]) -> None:
    """OpenAI-compatible bodies and chunks, with the shapes Ollama and llama.cpp add to them."""
    found.see_model(obj.get("model"))
    usage = obj.get("usage")
    if isinstance(usage, dict):
        # OpenAI (also vLLM's per-chunk cumulative usage: the last one wins), Anthropic and
        # Responses bodies.
        found.report(found.counts_of(usage))
        return
    if "prompt_eval_count" in obj or "eval_count" in obj or obj.get("done") is True:
        # Ollama: the final done:true object, or an /api/embed body.  Zero counts are omitted.
        found.report((_usage_int(obj.get("prompt_eval_count")),
                      _usage_int(obj.get("eval_count")), 0, 0, 0))
        return
    if found.final or obj.get("stop") is False:
        return   # llama.cpp partial chunks repeat running counts: only the final one counts
    timings = obj.get("timings")
    if not isinstance(timings, dict):
        timings = {}
    if "tokens_evaluated" in obj or "tokens_predicted" in obj or timings:
        # llama.cpp /completion final object (or `timings` on an OpenAI-style last chunk).
        prompt = obj.get("tokens_evaluated", timings.get("prompt_n"))
        completion = obj.get("tokens_predicted", timings.get("predicted_n"))
        found.report((_usage_int(prompt), _usage_int(completion), 0, 0, 0), final=False)


def _extract_anthropic(found: UsageFindings, obj: Dict[str, Any], event: Optional[str]) -> None:
    """Anthropic Messages: usage in message_start (input, cache) and message_delta (output).

    Both are cumulative, so each field keeps its last value; a cut stream counts what they said.
    """
    kind = obj.get("type")
    if not isinstance(kind, str):
        kind = event
    if kind == "message_start":
        message = obj.get("message")
        if not isinstance(message, dict):
            return
        found.see_model(message.get("model"))
        usage = message.get("usage")
    elif kind == "message_delta":
        usage = obj.get("usage")
    else:
        _extract_compatible(found, obj, event)   # a whole (non-streaming) message body
        return
    if isinstance(usage, dict):
        merged = found.state.setdefault("anthropic", {})
        for key in _USAGE_ANTHROPIC_FIELDS:
            if usage.get(key) is not None:   # cumulative: replace, never add
                merged[key] = usage[key]
        found.report(_usage_anthropic_counts(merged))


def _extract_responses(found: UsageFindings, obj: Dict[str, Any], event: Optional[str]) -> None:
    """OpenAI Responses: the model in every response.* event, usage in the terminal ones."""
    kind = obj.get("type")
    if not isinstance(kind, str):
        kind = event
    if kind is None or not kind.startswith("response."):
        _extract_compatible(found, obj, event)   # a whole (non-streaming) response body
        return
    response = obj.get("response")
    if not isinstance(response, dict):
        return
    found.see_model(response.get("model"))
    if kind in _USAGE_RESPONSES_TERMINAL:
        usage = response.get("usage")
        if isinstance(usage, dict):
            found.report(found.counts_of(usage))
        if kind == "response.failed":
            found.note_error(response.get("error") or "response.failed")


_USAGE_ANTHROPIC_FIELDS = (
    "input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
)
_USAGE_RESPONSES_TERMINAL = ("response.completed", "response.incomplete", "response.failed")


class ApiFormat(NamedTuple):
    """One API the proxy reads token usage from: a row of API_FORMATS, all it knows about it."""

    kind: str
    """Its name in the stats (byEndpoint) and the logs."""
    suffixes: Tuple[str, ...]
    """Request path endings, lower case, starting with "/" or ":" so that only whole segments
    match ("/v1/messagesX" is not "/messages"); the longest matching suffix of all rows wins."""
    completion: bool
    """Counted as a completion in the stats (embeddings use tokens but complete nothing)."""
    usage: bool = True
    """Its responses carry token usage (count_tokens returns a count, not usage)."""
    default_wire: Optional[str] = None
    """How a body without an SSE or JSON content type is read unless the request said
    ``"stream": false`` ("ndjson": Ollama streams by default); None: sniffed from its bytes."""
    inject_usage: bool = False
    """A streaming request may get ``stream_options.include_usage`` added (then stripped)."""
    markers: Tuple[bytes, ...] = ()
    """An unnamed SSE event or an NDJSON line holds usage, a model or an error only if it
    contains one of these (checked on the bytes, no parse); the first few events are parsed
    anyway while looking for the model."""
    empty_member: bytes = b""
    """A member that makes a payload hold nothing when its key (a marker) occurs only there
    (include_usage's ``"usage":null`` on every chunk)."""
    skip_events: frozenset = frozenset()
    """SSE event names (the `event:` field) that never hold usage, model or errors."""
    event_prefix: bytes = b""
    events: frozenset = frozenset()
    """SSE event names starting with ``event_prefix`` are parsed only when listed here."""
    tail_keys: Tuple[str, ...] = ("usage", "prompt_eval_count", "eval_count")
    """Members looked for (their last value) in the tail of a body too big to parse whole."""
    model_key: str = "model"
    """The member naming the model, looked for in the head and tail of such a body."""
    counts: Any = _counts_compatible
    """Normalises a ``usage`` object to (prompt, completion, cacheRead, cacheWrite, reasoning)."""
    extract: Any = _extract_compatible
    """``extract(found, obj, event)`` learns from one parsed JSON object (body, event or line)."""


# Bytes that announce usage, errors or llama.cpp's final counts in OpenAI-compatible chunks
# ("usage" first: it is also the key of their empty_member).
_COMPATIBLE_MARKERS = (b"usage", b"error", b'"type"', b"timings", b'"stop":true')
# Ollama's token lines say "done":false and nothing else of interest.
_OLLAMA_MARKERS = (b"eval_count", b"error", b'"done":true', b'"done": true')

API_FORMATS = (
    ApiFormat("openai_chat", ("/chat/completions",), True, inject_usage=True,
              markers=_COMPATIBLE_MARKERS, empty_member=b'"usage":null'),
    ApiFormat("openai_completions", ("/completions",), True, inject_usage=True,
              markers=_COMPATIBLE_MARKERS, empty_member=b'"usage":null'),
    ApiFormat("openai_embeddings", ("/embeddings",), False, markers=_COMPATIBLE_MARKERS),
    ApiFormat("openai_responses", ("/responses",), True, markers=_COMPATIBLE_MARKERS,
              event_prefix=b"response.", events=frozenset((
                  b"response.created", b"response.in_progress", b"response.completed",
                  b"response.incomplete", b"response.failed")),
              counts=_counts_responses, extract=_extract_responses),
    # Anthropic's ping and content_block_* events are the bulk of its streams.
    ApiFormat("anthropic_messages", ("/messages",), True, markers=_COMPATIBLE_MARKERS,
              skip_events=frozenset((b"ping", b"content_block_start", b"content_block_delta",
                                     b"content_block_stop", b"message_stop")),
              counts=_counts_anthropic, extract=_extract_anthropic),
    ApiFormat("anthropic_count_tokens", ("/messages/count_tokens",), False, usage=False),
    ApiFormat("ollama_generate", ("/api/generate",), True, default_wire="ndjson",
              markers=_OLLAMA_MARKERS),
    ApiFormat("ollama_chat", ("/api/chat",), True, default_wire="ndjson", markers=_OLLAMA_MARKERS),
    # /api/embeddings is the legacy Ollama endpoint (it reports no counts).
    ApiFormat("ollama_embed", ("/api/embed", "/api/embeddings"), False, markers=_OLLAMA_MARKERS),
    # llama.cpp /infill answers in the same shape as /completion.
    ApiFormat("llamacpp_completion", ("/completion", "/infill"), True,
              markers=_COMPATIBLE_MARKERS),
)
_API_FORMAT_BY_KIND = {f.kind: f for f in API_FORMATS}

# Derived from API_FORMATS (kept for the callers and tests that use them).
# Path suffix -> kind, longest first: the most specific suffix wins ("/api/embeddings" over
# "/embeddings", "/chat/completions" over "/completions" over "/completion").
USAGE_ENDPOINT_SUFFIXES = tuple(sorted(
    ((suffix, f.kind) for f in API_FORMATS for suffix in f.suffixes),
    key=lambda pair: -len(pair[0])))
USAGE_KINDS = frozenset(f.kind for f in API_FORMATS if f.usage)
USAGE_COMPLETION_KINDS = frozenset(f.kind for f in API_FORMATS if f.completion)
_USAGE_INJECT_KINDS = frozenset(f.kind for f in API_FORMATS if f.inject_usage)


def api_format(kind: Optional[str]) -> Optional[ApiFormat]:
    """The row of API_FORMATS for ``kind``, or None (no kind, or a kind that is not a format)."""
    return _API_FORMAT_BY_KIND.get(kind) if kind else None


def _usage_describe_error(err: Any) -> str:
    """A short one-line description of an error object: "type: message" (at most 200 chars)."""
    if isinstance(err, dict):
        inner = err.get("error")
        if isinstance(inner, dict):
            err = inner
        label = ""
        for key in ("type", "code"):
            v = err.get(key)
            if isinstance(v, (str, int)) and not isinstance(v, bool) and v != "" and v != "error":
                label = str(v)
                break
        message = err.get("message")
        if not isinstance(message, str):
            message = inner if isinstance(inner, str) else ""
        text = "%s: %s" % (label, message) if label and message else (label or message or "error")
    elif isinstance(err, bytes):
        text = err.decode("utf-8", "replace")
    else:
        text = str(err)
    text = " ".join(text.split())
    return text[:200] if text else "error"


def _usage_null_is_last_member(payload: bytes) -> bool:
    """True for a one-object chunk ending in `,"usage":null}` with no other "usage" in it.

    That is how OpenAI, vLLM, llama.cpp and Ollama lay out every chunk of an include_usage
    stream. The closing brace ends the payload, so it closes the top-level object and the member
    before it is the top-level `usage` (inside a string the payload would end with a quote).
    """
    # The first "usage" being the tail's own (a comma before it) means it is the only one.
    return (payload.endswith(_NULL_USAGE_TAIL) and payload[:1] == b"{"
            and payload.find(b'"usage"') == len(payload) - len(_NULL_USAGE_TAIL) + 1)


def _usage_member_value(text: str, key: str, last: bool) -> Any:
    """The value of the last ``"key":`` member in ``text`` (``last``), or the first string value.

    None when there is none or it does not decode.  Used on the head and tail of a body too
    big to parse whole: outside JSON strings a quoted key cannot be faked (quotes inside strings
    are escaped), and such bodies hold numbers and base64, so the last match is the top-level
    member.
    """
    starts = [m.end() for m in re.finditer(r'"%s"\s*:\s*' % re.escape(key), text)]
    if last:
        starts = starts[-1:]
    for start in starts:
        try:
            value = _usage_json_decoder.raw_decode(text, start)[0]
        except (ValueError, RecursionError):
            continue
        if last or isinstance(value, str):
            return value
    return None


class _UsageSseReader:
    """Incremental Server-Sent Events parser (WHATWG HTML "event stream interpretation").

    Accepts LF, CRLF and lone CR line endings, ":" comments, "event:" names, "data:" with or
    without the space, multi-line data (joined with "\\n"), unknown fields (ignored) and events
    split at any byte.  A line ending in CR at the very end of the buffered bytes is kept until
    the next byte shows whether an LF follows, so a CRLF split across two reads never makes an
    extra blank line.  Each complete event is handed to ``on_event(name, payload, raw_lines)``.

    In raw mode (used only to strip the usage the proxy injected) the reader also keeps the
    exact bytes of the pending event in ``held``; ``on_event`` returns None (pass the event on
    unchanged), b"" (drop it) or replacement bytes, and the bytes to send accumulate in ``out``.
    Comments and blank lines between events are passed on at once.
    """

    __slots__ = ("on_event", "max_line", "raw", "partial", "skipping", "skip_lf", "data",
                 "data_len", "event", "bad", "started", "held", "ev_lines", "ev_len", "out",
                 "lines", "at_boundary")

    def __init__(self, on_event, max_line, raw=False) -> None:
        self.on_event = on_event
        self.max_line = max_line
        self.raw = raw
        self.partial = bytearray()   # incomplete last line (non-raw mode)
        self.skipping = False        # discarding the rest of an over-long line
        self.skip_lf = False         # the discarded line ended in CR: drop an LF that follows
        self.data: Optional[List[bytes]] = None
        self.data_len = 0
        self.event: Optional[bytes] = None
        self.bad = False             # part of the pending event was lost: don't parse it
        self.started = False
        self.held = bytearray()      # raw mode: pending event + incomplete line, not yet sent
        self.ev_lines: List[bytes] = []
        self.ev_len = 0
        self.out: List[bytes] = []
        self.lines = 0               # complete lines split so far (the tap's work bound)
        self.at_boundary = False     # between two events, nothing held (see feed)

    def feed(self, data: bytes) -> None:
        if self.at_boundary and data[-2:] == b"\n\n" and data[:5] == b"data:" \
                and data.find(b"\r") < 0:
            # The hot path (issue 16): whole events of one data line each, arriving between
            # events -- how every backend sends its tokens (one per piece, or a few when the
            # proxy is behind). The same steps as _feed_lines without splitting lines: 2 lines
            # and one dispatch each; in raw mode each event goes out as it came unless on_event
            # edits it.
            if data.find(b"\n") == len(data) - 2:
                events = (data,)
            else:
                events = [event + b"\n\n" for event in data[:-2].split(b"\n\n")]
                if not all(e[:5] == b"data:" and e.find(b"\n") == len(e) - 2 for e in events):
                    events = ()
            if events and len(data) < self.max_line:
                for event in events:
                    self.lines += 2
                    payload = event[6:-2] if event[5:6] == b" " else event[5:-2]
                    if self.raw:
                        replacement = self.on_event(None, payload, [event[:-1], b"\n"])
                        self.out.append(event if replacement is None else replacement)
                    else:
                        self.on_event(None, payload, None)
                return
        self._feed_lines(data)

    def _feed_lines(self, data: bytes) -> None:
        self.at_boundary = False
        if self.raw:
            self.held += data
            if data.find(b"\n") < 0 and data.find(b"\r") < 0:
                return
            seg = bytes(self.held[self.ev_len:])
        else:
            if self.skipping:
                data = self._skip_rest(data)
                if not data:
                    return
            if data.find(b"\n") < 0 and data.find(b"\r") < 0:
                # No line end in the new bytes: only append (scanning just the new bytes keeps a
                # long line arriving in small pieces linear, not quadratic).
                self.partial += data
                if len(self.partial) > self.max_line:
                    self.partial = bytearray()
                    self.skipping = True
                    self.bad = True
                return
            if self.partial:
                self.partial += data
                seg = bytes(self.partial)
                self.partial = bytearray()
            else:
                seg = data
        lines = seg.splitlines(True)   # bytes.splitlines splits on \n, \r\n and \r only
        self.lines += len(lines)
        last = lines[-1]
        if last[-1:] == b"\n":
            last = b""
        else:
            lines.pop()   # incomplete, or ends in CR that may be half of a CRLF
        for line in lines:
            self._line(line)
        if last and not self.raw:
            if len(last) > self.max_line:
                self.skipping = True
                self.bad = True   # the over-long line belongs to the pending event
            else:
                self.partial += last
        # Nothing of an event pending, nothing of a line held: the next piece may take the
        # hot path in feed().
        self.at_boundary = self.data is None and self.event is None and not self.bad \
            and not self.skipping and not self.partial and not self.held and self.started

    def _skip_rest(self, data: bytes) -> bytes:
        """Drop bytes up to and including the end of the over-long line being skipped."""
        if self.skip_lf:
            self.skip_lf = False
            self.skipping = False
            return data[1:] if data[:1] == b"\n" else data
        n, r = data.find(b"\n"), data.find(b"\r")
        if n < 0 and r < 0:
            return b""
        if r < 0 or 0 <= n < r:
            self.skipping = False
            return data[n + 1:]
        if r + 1 == len(data):
            self.skip_lf = True   # CR at the end: an LF may come with the next read
            return b""
        self.skipping = False
        return data[r + 2:] if data[r + 1:r + 2] == b"\n" else data[r + 1:]

    def _line(self, raw_line: bytes) -> None:
        line = raw_line.rstrip(b"\r\n")
        if not self.started:
            self.started = True
            if line.startswith(_USAGE_BOM):   # a leading BOM is stripped (WHATWG)
                line = line[3:]
        if not line:
            if self.raw:
                self.ev_lines.append(raw_line)
                self.ev_len += len(raw_line)
            self._dispatch()
            return
        if self.raw:
            if self.ev_len == 0 and line[:1] == b":":
                self._emit_front(len(raw_line))   # a comment between events goes out at once
                return
            self.ev_lines.append(raw_line)
            self.ev_len += len(raw_line)
        if line[:5] == b"data:":
            value = line[5:]
            if value[:1] == b" ":
                value = value[1:]
        elif line[:1] == b":":
            return
        else:
            colon = line.find(b":")
            if colon < 0:
                field, value = line, b""
            else:
                field, value = line[:colon], line[colon + 1:]
                if value[:1] == b" ":
                    value = value[1:]
            if field == b"event":
                self.event = value
                return
            if field != b"data":
                return   # id, retry and unknown fields: nothing for us
        if self.bad:
            return
        self.data_len += len(value) + 1
        if self.data_len > self.max_line:
            self.data = None
            self.bad = True
            return
        if self.data is None:
            self.data = [value]
        else:
            self.data.append(value)

    def _emit_front(self, n: int) -> None:
        self.out.append(bytes(self.held[:n]))
        del self.held[:n]   # CPython bytearray drops a prefix without moving the rest

    def _dispatch(self) -> None:
        replacement = None
        data = self.data
        if data is not None and not self.bad:
            payload = data[0] if len(data) == 1 else b"\n".join(data)
            replacement = self.on_event(self.event, payload, self.ev_lines if self.raw else None)
        self.data = None
        self.data_len = 0
        self.event = None
        self.bad = False
        if self.raw:
            n = self.ev_len
            if replacement is None:
                self.out.append(bytes(self.held[:n]))
            elif replacement:
                self.out.append(replacement)
            del self.held[:n]
            self.ev_lines = []
            self.ev_len = 0

    def take_output(self) -> bytes:
        out = self.out
        if not out:
            return b""
        self.out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def take_everything_raw(self) -> bytes:
        """Give up raw mode: return every byte not yet sent, unchanged, and keep parsing only."""
        rest = bytes(self.held)
        tail = rest[self.ev_len:]
        self.at_boundary = False
        out = self.take_output() + rest
        self.raw = False
        self.held = bytearray()
        self.ev_lines = []
        self.ev_len = 0
        if len(tail) > self.max_line:
            self.skipping = True
            self.bad = True
        else:
            self.partial = bytearray(tail)
        return out

    def finish(self) -> bytes:
        """End of stream: parse the unterminated last line and dispatch a pending event.

        Lenient on purpose: a final event without its blank line still counts.  A truncated
        JSON payload simply fails to parse later.  Returns the bytes still to send (raw mode).
        """
        if self.raw:
            seg = bytes(self.held[self.ev_len:])
        else:
            seg = b"" if self.skipping else bytes(self.partial)
            self.partial = bytearray()
        if seg:
            for line in seg.splitlines(True):
                self._line(line)
        if self.data is not None or self.ev_len:
            self._dispatch()
        if self.raw and self.held:   # cannot happen; never lose bytes all the same
            self._emit_front(len(self.held))
        return self.take_output()

    def held_bytes(self) -> int:
        return len(self.held) + len(self.partial)


class _UsageLineReader:
    """Incremental NDJSON splitter: calls ``on_line(line)`` for every complete LF-ended line.

    Lines longer than ``max_line`` are dropped, not buffered.
    """

    __slots__ = ("on_line", "max_line", "partial", "skipping")
    lines = 0                        # lines are charged one by one (_on_ndjson_line)

    def __init__(self, on_line, max_line) -> None:
        self.on_line = on_line
        self.max_line = max_line
        self.partial = bytearray()
        self.skipping = False

    def feed(self, data: bytes) -> None:
        if data.find(b"\n") < 0:
            if not self.skipping:
                self.partial += data
                if len(self.partial) > self.max_line:
                    self.partial = bytearray()
                    self.skipping = True
            return
        if self.partial:
            self.partial += data
            data = bytes(self.partial)
            self.partial = bytearray()
        lines = data.split(b"\n")
        tail = lines.pop()
        if self.skipping:
            self.skipping = False
            del lines[0]   # the end of the over-long line
        for line in lines:
            self.on_line(line)
        if tail:
            if len(tail) > self.max_line:
                self.skipping = True
            else:
                self.partial += tail

    def finish(self) -> bytes:
        if self.partial and not self.skipping:
            self.on_line(bytes(self.partial))
        self.partial = bytearray()
        return b""

    def held_bytes(self) -> int:
        return len(self.partial)


class _UsageJsonBuffer:
    """Collects a non-streaming body for one parse at the end, bounded by ``max_body``.

    Beyond the bound only the first _USAGE_HEAD_KEEP and the last _USAGE_TAIL_KEEP bytes are
    kept; ``on_end(body, head, tail)`` gets either the whole body or (None, head, tail).
    """

    __slots__ = ("on_end", "max_body", "parts", "size", "head", "tail")
    lines = 0                        # one parse at the end, bounded by max_body

    def __init__(self, on_end, max_body) -> None:
        self.on_end = on_end
        self.max_body = max_body
        self.parts: List[bytes] = []
        self.size = 0
        self.head: Optional[bytes] = None
        self.tail = bytearray()

    def feed(self, data: bytes) -> None:
        if self.head is None:
            self.parts.append(data)
            self.size += len(data)
            if self.size > self.max_body:
                body = b"".join(self.parts)
                self.parts = []
                self.head = body[:_USAGE_HEAD_KEEP]
                self.tail = bytearray(body[-_USAGE_TAIL_KEEP:])
        else:
            self.tail += data
            if len(self.tail) > 2 * _USAGE_TAIL_KEEP:
                del self.tail[:-_USAGE_TAIL_KEEP]

    def finish(self) -> bytes:
        if self.head is None:
            body = b"".join(self.parts)
            self.parts = []
            self.on_end(body, None, None)
        else:
            self.on_end(None, self.head, bytes(self.tail[-_USAGE_TAIL_KEEP:]))
        return b""

    def held_bytes(self) -> int:
        return self.size if self.head is None else len(self.head) + len(self.tail)


class _UsageOverBudget(Exception):
    """The tap has done all the parsing one response may cost (see USAGE_WORK_BASE)."""


class UsageTap:
    """Incremental usage reader for one upstream response body; it never changes the body.

    Create it once the response headers of a 2xx answer for a usage kind are known, pass every
    piece of the body through ``feed`` and call ``finish`` at the end::

        tap = UsageTap(kind, info, content_type, content_encoding, injected=injected)
        tap.feed(data)                  # returns `data` itself
        _, usage = tap.finish(complete)

    What it reads comes from the kind's row of API_FORMATS: the tap itself knows wires (SSE,
    NDJSON, one JSON body), encodings and its work bound, not APIs.  Wire by content type:
    ``text/event-stream`` is SSE; ``application/x-ndjson`` is NDJSON; ``application/json`` is
    buffered as one JSON body (bounded; several JSON lines are read as NDJSON).  Without a JSON
    or SSE content type, a format with a ``default_wire`` is read that way unless the request
    said ``"stream": false`` (Ollama streams NDJSON by default), and anything else is sniffed: a
    body starting like SSE is SSE, otherwise JSON.  gzip and deflate bodies are inflated on a
    copy; other encodings (br, zstd...) are passed on unparsed (usage "missing").

    ``feed`` never raises and returns the very ``data`` object it was given.  Editing the
    client's stream (the usage the proxy injected) is InjectedUsageStripper's job.

    Usage (``usage`` property, and what ``finish`` returns) is a dict::

        {"model": str|None, "prompt": int, "completion": int, "total": int, "cacheRead": int,
         "cacheWrite": int, "reasoning": int, "source": str, "error": str|None}

    prompt is all input tokens (Anthropic: input + cache_creation + cache_read); total = prompt +
    completion; reasoning is informational (already part of completion).  source: "reported"
    (the backend sent usage on its own), "injected" (usage exists only because the proxy asked
    for it), "missing" (a usage kind that ended without usage: stream without include_usage,
    interrupted stream, unparseable body, or a reader failure -- then ``failed`` is True and
    ``usage_reader_failures`` counts it) or "none" (not a usage kind: count_tokens, None).
    error: a short text when the body carried an error (Anthropic ``event: error`` in a 200,
    Ollama ``{"error": ...}``, Responses ``response.failed`` / ``error``, OpenAI-style
    ``data: {"error": ...}``), else None.

    Interrupted streams: only usage objects the backend actually sent are counted, never an
    estimate, so a cut OpenAI/Ollama/llama.cpp/Responses stream is "missing" unless its final
    usage event had already arrived.  Anthropic reports usage in message_start (input and cache
    tokens) and message_delta (cumulative output): a cut Anthropic stream counts what those
    events reported -- the input tokens were really consumed -- with source "reported".
    """

    # One per answer that reports usage, made while its first byte waits: slots make it cheap
    # to build (10.6 -> 5.1 us, issue 16) and small.
    __slots__ = ("kind", "complete", "_api", "_request_model", "_found", "_final", "_probes",
                 "_markers", "_empty", "_empty_key", "_empty_tail", "_max_body", "_max_line",
                 "_reader", "_format", "_sniffed", "_inflater", "_inflate_deflate",
                 "_inflate_pending", "_decoded", "_want_injected", "_injected", "_parsing",
                 "_wire", "_work", "_lines_charged", "gave_up", "failed")

    def __init__(self, kind: Optional[str], info: Optional[RequestInfo] = None,
                 content_type: Optional[str] = None, content_encoding: Optional[str] = None,
                 injected: bool = False, max_body: int = USAGE_MAX_JSON_BODY,
                 max_line: int = USAGE_MAX_LINE) -> None:
        self.kind = kind
        self.complete: Optional[bool] = None  # set by finish()
        self._api = api = api_format(kind)
        self._request_model = getattr(info, "model", None)
        self._found = UsageFindings(api.counts if api else _counts_compatible)
        self._final: Optional[Dict[str, Any]] = None
        self._probes = _USAGE_MODEL_PROBES
        # The row's byte pre-filter (see _tap_filter), copied here: it runs on every event.
        self._markers, self._empty, self._empty_key, self._empty_tail = _tap_filter(api)
        self._max_body = max_body
        self._max_line = max_line
        self._reader: Any = None
        self._format: Optional[str] = None
        self._sniffed = b""
        self._inflater: Any = None
        self._inflate_deflate = False  # deflate: zlib or raw is decided on the first two bytes
        self._inflate_pending = b""
        self._decoded = 0
        self._want_injected = bool(injected)
        self._injected = False
        self._parsing = self._api is not None and self._api.usage
        self._wire = 0                # body bytes received from the backend
        self._work = 0                # units spent (see USAGE_WORK_BASE)
        self._lines_charged = 0       # SSE lines already counted in _work
        self.gave_up = False          # the work bound was reached: usage is "missing"
        self.failed = False           # the reader broke (a bug or a shape it cannot read)
        if not self._parsing:
            return
        codings = [c.strip().lower() for c in content_encoding.split(",")] \
            if content_encoding else ()
        codings = [c for c in codings if c and c != "identity"]
        if codings:
            if codings in (["gzip"], ["x-gzip"]):
                self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            elif codings == ["deflate"]:
                self._inflate_deflate = True
            else:
                log.debug("usage: not parsing a %s-encoded body", ",".join(codings))
                self._parsing = False
                return
        ctype = (content_type or "").split(";", 1)[0].strip().lower()
        if "event-stream" in ctype:
            self._start("sse")
        elif "ndjson" in ctype or "jsonl" in ctype or "json-seq" in ctype:
            self._start("ndjson")
        elif "json" in ctype:
            self._start("json")
        elif self._api.default_wire and getattr(info, "stream", None) is not False:
            self._start(self._api.default_wire)
        # else: decided from the first bytes of the body (_route)

    # -- public ------------------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """Take one piece of the upstream body; return it (same object, no copy)."""
        self._wire += len(data)
        if self._parsing and data:
            try:
                reader = self._reader
                if self._inflater is not None or self._inflate_deflate:
                    self._inflate(data)
                elif reader is not None:
                    # _route's first step, inlined: this runs for every piece of every stream.
                    reader.feed(data if isinstance(data, bytes) else bytes(data))
                    if reader.lines - self._lines_charged > 32:
                        self._charge_lines()  # in batches: finish() charges the rest
                else:
                    self._route(data if isinstance(data, bytes) else bytes(data))
            except _UsageOverBudget:
                self._give_up()
            except Exception as exc:   # a parser bug must never break the proxied stream
                self._fail(exc)
        return data

    def finish(self, complete: bool = True) -> Tuple[bytes, Dict[str, Any]]:
        """End of body.  Returns ``(b"", usage)``.

        ``complete`` says whether the upstream body ended normally; it is recorded as
        ``self.complete``.  A truncated JSON body is never guessed at (its tail is not searched),
        and a cut stream counts only what it reported (see the class docstring).  Calling finish
        again returns the same usage.
        """
        if self._final is not None:
            return b"", dict(self._final)
        self.complete = bool(complete)
        if self._parsing:
            try:
                if self._inflater is not None:
                    rest = self._inflater.flush()
                    if rest:
                        self._route(rest)
                if self._reader is None and self._sniffed:
                    self._start("json")
                    self._reader.feed(self._sniffed)
                if self._reader is not None:
                    self._reader.finish()
                    self._charge_lines()
            except _UsageOverBudget:
                self._give_up()
            except Exception as exc:
                self._fail(exc)
        self._parsing = False
        self._final = self._build_usage()
        return b"", dict(self._final)

    @property
    def usage(self) -> Dict[str, Any]:
        """The usage dict as known so far (final after ``finish``)."""
        if self._final is not None:
            return dict(self._final)
        return self._build_usage()

    @property
    def held_bytes(self) -> int:
        """Bytes currently buffered by the parser (diagnostics and tests)."""
        n = len(self._sniffed) + len(self._inflate_pending)
        return n + (self._reader.held_bytes() if self._reader is not None else 0)

    # -- format selection and decoding -------------------------------------------------------------

    def _start(self, fmt: str) -> None:
        self._format = fmt
        if fmt == "sse":
            self._reader = _UsageSseReader(self._on_sse_event, self._max_line)
            self._injected = self._want_injected
        elif fmt == "ndjson":
            self._reader = _UsageLineReader(self._on_ndjson_line, self._max_line)
        else:
            self._reader = _UsageJsonBuffer(self._on_json_end, self._max_body)

    def _route(self, data: bytes) -> None:
        if self._reader is not None:
            self._reader.feed(data)
            self._charge_lines()
            return
        # Unknown content type: look at the first non-blank bytes.
        pending = self._sniffed + data if self._sniffed else data
        head = pending.lstrip()
        if head.startswith(_USAGE_BOM):
            head = head[3:].lstrip()
        elif _USAGE_BOM.startswith(head):
            head = b""   # maybe the start of a BOM: wait for more bytes
        if not head:
            self._sniffed = pending[-self._max_line:]
            return
        self._sniffed = b""
        if head[:1] in (b"{", b"["):
            self._start("json")
        elif head[:1] in (b"d", b"e", b":", b"i", b"r"):   # data:, event:, comment, id:, retry:
            self._start("sse")
        else:
            self._start("json")
        self._reader.feed(pending)
        self._charge_lines()

    # -- the work bound ----------------------------------------------------------------------------

    def _charge(self, units: int) -> None:
        """Count work; raise _UsageOverBudget once this response has used its share."""
        self._work += units
        if self._work > USAGE_WORK_BASE + self._wire // USAGE_WORK_BYTES:
            raise _UsageOverBudget()

    def _charge_lines(self) -> None:
        lines = self._reader.lines
        if lines != self._lines_charged:
            units, self._lines_charged = lines - self._lines_charged, lines
            self._charge(units)

    def _loads(self, payload: Any) -> Any:
        """json.loads, paid for from the work bound."""
        self._charge(4 + len(payload) // 32)
        return json.loads(payload)

    def _give_up(self) -> None:
        log.debug("usage: %d units of parsing for %d bytes, giving up on this response",
                  self._work, self._wire)
        self.gave_up = True
        self._parsing = False

    def _inflate(self, data: bytes) -> None:
        d = self._inflater
        if d is None:
            # HTTP "deflate" should be zlib-wrapped (RFC 9110 8.4.1.2) but some servers send raw
            # deflate: a zlib header has compression method 8 and (CMF*256 + FLG) % 31 == 0.
            data = self._inflate_pending + bytes(data)
            if len(data) < 2:
                self._inflate_pending = data
                return
            self._inflate_pending = b""
            zlib_header = data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0
            d = self._inflater = zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)
        try:
            while True:
                # max_length bounds each piece; the rest of the input waits in unconsumed_tail,
                # and a full piece with no input left may mean more output is pending.
                out = d.decompress(data, _USAGE_INFLATE_CHUNK)
                data = d.unconsumed_tail
                if out:
                    self._decoded += len(out)
                    if self._decoded > USAGE_MAX_DECODED:
                        log.debug("usage: inflated body too large, not parsed further")
                        self._parsing = False
                        return
                    self._route(out)
                if d.eof or (not data and len(out) < _USAGE_INFLATE_CHUNK):
                    return
        except zlib.error:
            log.debug("usage: cannot inflate body, not parsed")
            self._parsing = False


    def _fail(self, exc: BaseException) -> None:
        """The reader broke: warn once per format (a bug to report), count it, read no further.

        The message names the exception type only: its text may quote the body.
        """
        self.failed = True
        self._parsing = False
        kind = self.kind or "?"
        with _usage_failures_lock:
            usage_reader_failures[kind] = usage_reader_failures.get(kind, 0) + 1
            first = usage_reader_failures[kind] == 1
        if first:
            log.warning("usage: the %s reader failed (%s); usage of this response is lost "
                        "(said once per format; please report it)", kind, type(exc).__name__)
        log.debug("usage: reader failure", exc_info=True)

    # -- parsers' callbacks ------------------------------------------------------------------------

    def _on_sse_event(self, name: Optional[bytes], payload: bytes,
                      raw_lines: Optional[List[bytes]]) -> None:
        if name is None and self._probes <= 0:
            # Most events of a stream: unnamed, after the model is known. include_usage's
            # "usage":null at the end of a chunk is tested here first (_worth_parsing's rule,
            # without its call); then one byte test each.
            empty_tail = self._empty_tail
            if empty_tail and payload.endswith(empty_tail) \
                    and payload.find(self._empty_key) == len(payload) - len(empty_tail) + 1:
                return
            if not self._worth_parsing(payload) or payload[:1] == b"[" \
                    and payload.strip() == b"[DONE]":
                return
        elif payload[:1] == b"[" and payload.strip() == b"[DONE]":
            return
        elif name is not None and name != b"message":
            api = self._api
            if name in api.skip_events:
                return
            if api.event_prefix and name.startswith(api.event_prefix) and name not in api.events:
                return
        elif self._probes > 0:   # the first few events: parsed whatever they hold
            self._probes -= 1
        elif not self._worth_parsing(payload):
            return
        try:
            obj = self._loads(payload.decode("utf-8"))   # SSE is always UTF-8 (WHATWG)
        except (ValueError, RecursionError):
            if name == b"error":
                self._found.note_error(payload)
            return
        if isinstance(obj, dict):
            self._take(obj, name.decode("latin-1") if name is not None else None)

    def _worth_parsing(self, payload: bytes) -> bool:
        """Cheap byte test from the format's row: can this payload hold usage or an error?

        Plain content chunks are skipped without a JSON parse.  False positives (a marker in
        generated text) only cost a parse.
        """
        for marker in self._markers:
            at = payload.find(marker)          # not `in`: see "byte tests"
            if at >= 0:
                # include_usage puts "usage":null in every chunk: that alone is nothing.
                return not (marker == self._empty_key and at
                            and payload.startswith(self._empty, at - 1)
                            and payload.find(marker, at + 1) < 0)
        return False

    def _on_ndjson_line(self, line: bytes) -> None:
        self._charge(1)
        line = line.strip()
        if not line:
            return
        if self._probes > 0:
            self._probes -= 1
        elif not self._worth_parsing(line):
            return
        try:
            obj = self._loads(line.decode("utf-8"))
        except (ValueError, RecursionError):
            return
        if isinstance(obj, dict):
            self._take(obj, None)

    def _on_json_end(self, body: Optional[bytes], head: Optional[bytes],
                     tail: Optional[bytes]) -> None:
        if body is not None:
            if not body.strip():
                return
            try:
                obj = json.loads(body)      # one parse, bounded by max_body: not charged
            except (ValueError, RecursionError):
                obj = None
                # Several JSON documents, one per line: read them as NDJSON (lazily: the work
                # bound may end it long before the last of a million lines).
                for line in io.BytesIO(body):
                    self._on_ndjson_line(line)
            if isinstance(obj, dict):
                self._take(obj, None)
            return
        if self.complete:
            self._scan_tail(head or b"", tail or b"")

    def _scan_tail(self, head: bytes, tail: bytes) -> None:
        """Best effort for a body above the buffer bound (e.g. a large embeddings batch).

        Every API puts usage last: parse the complete lines of the tail (NDJSON), else find the
        last value of each of the format's ``tail_keys`` in the tail and its model (first
        string value of ``model_key``) in head or tail (see _usage_member_value), and read them
        as one object.
        """
        found = False
        for line in tail.split(b"\n")[1:]:   # the first piece is probably a cut line
            line = line.strip()
            if line[:1] != b"{":
                continue
            try:
                obj = self._loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(obj, dict):
                found = True
                self._take(obj, None)
        if found:
            return
        text = tail.decode("utf-8", "replace")
        fragment: Dict[str, Any] = {}
        api = self._api
        for key in api.tail_keys:
            value = _usage_member_value(text, key, last=True)
            if value is not None:
                fragment[key] = value
        for source in (head.decode("utf-8", "replace"), text):
            model = _usage_member_value(source, api.model_key, last=False)
            if isinstance(model, str):
                fragment[api.model_key] = model
                break
        if fragment:
            self._take(fragment, None)

    # -- interpretation ----------------------------------------------------------------------------

    def _take(self, obj: Dict[str, Any], event: Optional[str]) -> None:
        """Learn model, usage and errors from one parsed JSON object (body, event or line)."""
        found = self._found
        if obj.get("error"):
            found.note_error(obj)
        elif obj.get("type", event) == "error":
            found.note_error(obj)   # Responses: {"type":"error","code":...,"message":...}
        self._api.extract(found, obj, event)
        if found.model is not None:
            self._probes = 0   # the model is known: no more parsing just to look for it

    def _build_usage(self) -> Dict[str, Any]:
        found = self._found
        model = found.model or self._request_model
        counts = None
        if self.kind not in USAGE_KINDS:
            source = "none"
        else:
            if not self.gave_up:    # else what was seen may not be the whole answer's usage
                counts = found.counts
            if counts is None:
                source = "missing"
            else:
                source = "injected" if self._injected else "reported"
        prompt, completion, cache_read, cache_write, reasoning = counts or (0, 0, 0, 0, 0)
        return {
            "model": model,
            "prompt": prompt,
            "completion": completion,
            "total": prompt + completion,
            "cacheRead": cache_read,
            "cacheWrite": cache_write,
            "reasoning": reasoning,
            "source": source,
            "error": found.error,
        }


@functools.lru_cache(maxsize=None)
def _tap_filter(api: Optional[ApiFormat]
                ) -> Tuple[Tuple[bytes, ...], bytes, Optional[bytes], bytes]:
    """A row's byte pre-filter for UsageTap: (markers, empty member, its key, empty tail).

    The empty tail is the empty member and the closing brace, when its key is the row's first
    marker (then a chunk ending in it holds nothing: UsageTap._on_sse_event). Worked out once
    per row, not per answer.
    """
    if api is None:
        return (), b"", None, b""
    empty = api.empty_member
    key = empty.split(b'"')[1] if empty else None
    tail = empty + b"}" if empty and api.markers[:1] == (key,) else b""
    return api.markers, empty, key, tail


# Reader failures per kind since start (a failure is a bug, not "the backend reported nothing").
usage_reader_failures: Dict[str, int] = {}
_usage_failures_lock = threading.Lock()


class InjectedUsageStripper:
    """Gives the client the SSE stream it asked for when the proxy added include_usage to it.

    For an OpenAI stream whose request ``inject_stream_usage`` changed: the usage-only chunk
    (``"choices": []`` with a usage object) is removed with its whole event, and the
    ``"usage":null`` member is cut out of every other chunk by a byte edit that leaves
    everything else identical.  An incomplete event is held back until its blank line arrives
    (comments between events are not held).  If one event grows beyond ``max_line``, or
    anything goes wrong, the held bytes are released unchanged and the rest passes through.
    Reading the usage is the UsageTap's job, on the backend's bytes.
    """

    __slots__ = ("reader", "active", "max_line")

    def __init__(self, max_line: int = USAGE_MAX_LINE) -> None:
        self.max_line = max_line
        self.reader = _UsageSseReader(self._on_event, max_line, raw=True)
        self.active = True

    @staticmethod
    def wanted(injected: bool, content_type: Optional[str],
               content_encoding: Optional[str]) -> bool:
        """Whether a 2xx answer needs stripping: the proxy injected, and the body is plain SSE."""
        coding = (content_encoding or "").strip().lower()
        return bool(injected) and "event-stream" in (content_type or "").lower() \
            and coding in ("", "identity")

    def feed(self, data: bytes) -> bytes:
        """Take one piece of the backend's body; return the bytes for the client (maybe b"")."""
        if not self.active:
            return data
        reader = self.reader
        if reader.at_boundary and data[-2:] == b"\n\n" and data[:5] == b"data:" \
                and data.find(b"\n") == len(data) - 2 and data.find(b"\r") < 0 \
                and _usage_null_is_last_member(data[6 if data[5:6] == b" " else 5:-2]):
            # Nearly every piece of an injected stream: one whole event of one data line (the
            # reader's short path), whose one "usage" is its last member and null. The edit
            # _on_event would make, without the reader's steps; the reader stays between events.
            return data[:-len(_NULL_USAGE_TAIL) - 2] + b"}\n\n"
        try:
            reader.feed(data if isinstance(data, bytes) else bytes(data))
            if len(reader.held) > self.max_line:
                log.debug("usage: SSE event too long, injected usage no longer stripped")
                return self._give_up()
            return reader.take_output()
        except Exception:
            log.debug("usage: strip error, passing the stream on unchanged", exc_info=True)
            return self._give_up()

    def finish(self) -> bytes:
        """End of body: the bytes still held back (an unterminated last event)."""
        if not self.active:
            return b""
        self.active = False
        try:
            return self.reader.finish()
        except Exception:
            log.debug("usage: strip error at end of stream", exc_info=True)
            return self.reader.take_everything_raw()

    @property
    def held_bytes(self) -> int:
        """Bytes held back from the client (tests)."""
        return self.reader.held_bytes() if self.active else 0

    def _give_up(self) -> bytes:
        self.active = False
        return self.reader.take_everything_raw()

    def _on_event(self, name: Optional[bytes], payload: bytes,
                  raw_lines: List[bytes]) -> Optional[bytes]:
        if _usage_null_is_last_member(payload):
            # The hot path: a chunk that carries no usage needs no JSON parse, only the edit.
            line = raw_lines[0]
            cut = len(_NULL_USAGE_TAIL) + 1
            if len(raw_lines) == 2 and line[-cut:] == _NULL_USAGE_TAIL + b"\n":
                # One data line and the blank line (the reader's short path): the member and
                # the comma before it are the line's last bytes but the brace.
                return line[:-cut] + b"}\n" + raw_lines[1]
            return _strip_null_usage(raw_lines)
        if payload.find(b'"usage"') < 0:
            return None
        try:
            obj = json.loads(payload)
        except (ValueError, RecursionError):
            return None
        if not isinstance(obj, dict) or "usage" not in obj:
            return None
        usage = obj["usage"]
        if isinstance(usage, dict):
            choices = obj.get("choices")
            if isinstance(choices, list) and not choices:
                return b""   # the usage-only chunk before [DONE]: drop the whole event
            return None
        if usage is not None:
            return None
        return _strip_null_usage(raw_lines)


def _strip_null_usage(raw_lines: List[bytes]) -> Optional[bytes]:
    """The event's lines without its top-level ``"usage":null`` member, or None to keep them.

    Exactly one `"usage":null` in the event's one data line: the top-level member (quotes
    inside JSON strings are escaped, so a match in valid JSON is a real key; one match and a
    top-level usage of null means it is that one).  Removing it with one adjacent comma leaves
    valid JSON.
    """
    hit = None
    data_lines = 0
    for index, raw_line in enumerate(raw_lines):
        bom = len(_USAGE_BOM) if index == 0 and raw_line.startswith(_USAGE_BOM) else 0
        if raw_line[bom:bom + 1] != b"d":
            continue
        data_lines += 1
        if data_lines > 1:
            return None   # JSON split over data lines: the comma may sit on another line
        body = raw_line.rstrip(b"\r\n")
        pos = body.find(b'"usage"')
        while pos >= 0:
            match = _USAGE_NULL_MEMBER.match(body, pos)
            if match is not None:
                if hit is not None:
                    return None
                hit = (index, body, pos, match.end())
            pos = body.find(b'"usage"', pos + 7)
    if hit is None:
        return None
    index, body, start, end = hit
    before = body[:start].rstrip(b" \t")
    if before[-1:] == b",":        # `,"usage":null` -- drop the comma before it
        edited = before[:-1] + body[end:]
    else:                          # `"usage":null,` or the only member
        after = _USAGE_COMMA_AFTER.match(body, end)
        edited = body[:start] + body[after.end() if after else end:]
    raw_line = raw_lines[index]
    lines = list(raw_lines)
    lines[index] = edited + raw_line[len(body):]
    return b"".join(lines)


# ==================================================================================================
# Stats store
# ==================================================================================================

#: Bump when the layout of stats.json changes incompatibly.  A file with an
#: unknown (newer) version is moved aside, never overwritten.
STATS_FILE_FORMAT = "llm-proxy-stats"
STATS_FILE_VERSION = 1

#: Upper bounds (seconds) of the latency histograms; "+Inf" is implicit.
#: Chosen for LLM traffic: sub-second model listings up to 5-minute generations.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Key that absorbs new breakdown keys once a map is full, and the model key
#: for records that carry usage but no model name.
STATS_OTHER_KEY = "(other)"
STATS_UNKNOWN_MODEL = "(unknown)"

STATS_TOKEN_FIELDS = ("prompt", "completion", "total", "cacheRead", "cacheWrite", "reasoning")
STATS_USAGE_SOURCES = ("reported", "injected", "missing")

# Chart windows: 48 hourly buckets, 90 daily buckets (UTC), current one included.
_STATS_HOUR = 3600
_STATS_DAY = 86400
_STATS_HOURLY_KEEP = 48
_STATS_DAILY_KEEP = 90

# A hostile client controls paths and model names; bound each key's length so
# a 64 KiB path cannot bloat memory, stats.json or /metrics.
_STATS_KEY_MAX_LEN = 200
# stats.json holds a few hundred KB at most (3 x max_keys breakdown entries,
# 100 recent requests, 138 buckets); anything far larger is not ours.
_STATS_FILE_MAX_BYTES = 64 * 1024 * 1024

# Internal per-key sums; the snapshot derives averages from them.
_STATS_BREAKDOWN_SUM_FIELDS = ("requests", "errors", "prompt", "completion", "total",
                         "cacheRead", "cacheWrite", "reasoning", "ttfbCount", "genTokens")
_STATS_BREAKDOWN_FLOAT_FIELDS = ("ttfbSumMs", "genSeconds")
_STATS_BUCKET_FIELDS = ("requests", "errors", "prompt", "completion", "total")
_STATS_RECENT_TOKEN_FIELDS = ("prompt", "completion", "total", "cacheRead", "cacheWrite")
# byKey entries: a breakdown entry plus refusals (401/429, never forwarded) and the last use.
# Refusals without a valid key are counted under this name (key names cannot contain spaces).
STATS_NO_KEY = "(no valid key)"
_STATS_DAY_FORMAT = re.compile(r"\d{4}-\d{2}-\d{2}\Z")


def format_tokens(n: float) -> str:
    """Return a short human form of a token count: 999 -> "999",
    20800 -> "20.8k", 1500000 -> "1.5M", 2100000000 -> "2.1B".

    Rounds half up on exact integers (no float surprises such as 20.85 ->
    "20.8k"), and rolls over to the next unit (999950 -> "1.0M").
    """
    n = int(n)
    if n < 0:
        return "-" + format_tokens(-n)
    if n < 1000:
        return str(n)
    for unit, suffix in ((10 ** 3, "k"), (10 ** 6, "M"), (10 ** 9, "B"), (10 ** 12, "T")):
        tenths = (n * 10 + unit // 2) // unit
        if tenths < 10000 or suffix == "T":
            return "%d.%d%s" % (tenths // 10, tenths % 10, suffix)
    raise AssertionError("unreachable")


def format_uptime(seconds: float) -> str:
    """Return a short human duration: "45s", "12m", "2h 15m", "3d 4h" (floored)."""
    s = max(0, int(seconds))
    if s < 60:
        return "%ds" % s
    if s < _STATS_HOUR:
        return "%dm" % (s // 60)
    if s < _STATS_DAY:
        return "%dh %dm" % (s // _STATS_HOUR, (s % _STATS_HOUR) // 60)
    return "%dd %dh" % (s // _STATS_DAY, (s % _STATS_DAY) // _STATS_HOUR)


def iso_utc(ts: Optional[float]) -> Optional[str]:
    """Return epoch seconds as ISO-8601 UTC ("2026-11-26T20:01:02Z"), None for None."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _stats_clean_key(value: Any, max_len: int = _STATS_KEY_MAX_LEN) -> str:
    """Make an untrusted string safe to store, persist and export: bounded
    length, and no lone surrogates (a JSON "\\ud800" escape in a model name
    would otherwise make the UTF-8 encode of /metrics or stats.json fail)."""
    s = value if isinstance(value, str) else str(value)
    if len(s) > max_len:
        s = s[:max_len - 3] + "..."
    if s.isascii():
        return s                # nearly always (paths, addresses, methods): nothing to replace
    return s.encode("utf-8", "replace").decode("utf-8")


def _stats_count(value: Any) -> int:
    """A token count from the tap: a non-negative int below USAGE_MAX_COUNT, anything else is 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    if not 0 < value < USAGE_MAX_COUNT:     # also NaN; a huge int would overflow float()
        return 0
    return int(value)


def _stats_ms(value: Any) -> Optional[float]:
    """A duration in ms: a finite non-negative float, or None if unknown."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    if not math.isfinite(value) or value < 0:
        return None
    return value


def _stats_new_breakdown() -> Dict[str, Any]:
    """An empty byModel/byEndpoint/byClient entry (its shape: _STATS_BREAKDOWN_SHAPE)."""
    return _stats_empty(_STATS_BREAKDOWN_SHAPE)


def _stats_new_histogram(bounds: Tuple[float, ...]) -> Dict[str, Any]:
    # counts are per bucket (not cumulative); the last slot is +Inf.
    return {"buckets": list(bounds), "counts": [0] * (len(bounds) + 1), "sum": 0.0, "count": 0}


def _stats_copy_histogram(hist: Dict[str, Any]) -> Dict[str, Any]:
    return {"buckets": list(hist["buckets"]), "counts": list(hist["counts"]),
            "sum": hist["sum"], "count": hist["count"]}


def _stats_histogram_observe(hist: Dict[str, Any], value: float) -> None:
    # The first bucket whose bound is >= value (Prometheus' "le"); past the last: +Inf.
    hist["counts"][bisect.bisect_left(hist["buckets"], value)] += 1
    hist["sum"] += value
    hist["count"] += 1


def _stats_new_key_entry() -> Dict[str, Any]:
    """An empty byKey entry (its shape: _STATS_SHAPE["byKey"])."""
    return _stats_empty(_STATS_SHAPE["byKey"].shape.entry)


def _stats_local_day(ts: float) -> str:
    """The calendar day of epoch `ts` in the proxy's local time ("2026-11-27"): budgets renew
    at local midnight, when people expect a "daily" allowance to start over."""
    return time.strftime("%Y-%m-%d", time.localtime(ts))


def _stats_seconds_to_midnight(ts: float) -> float:
    """Seconds from epoch `ts` to the next local midnight (mktime normalises day 32 and DST)."""
    t = time.localtime(ts)
    return max(0.0, time.mktime((t.tm_year, t.tm_mon, t.tm_mday + 1, 0, 0, 0, 0, 0, -1)) - ts)


def _stats_breakdown_view(entry: Dict[str, Any]) -> Dict[str, Any]:
    """The public form of one breakdown entry (averages instead of sums)."""
    avg_ttfb = None
    if entry["ttfbCount"]:
        avg_ttfb = round(entry["ttfbSumMs"] / entry["ttfbCount"], 1)
    tps = None
    if entry["genSeconds"] > 0:
        tps = round(entry["genTokens"] / entry["genSeconds"], 1)
    return {"requests": entry["requests"], "errors": entry["errors"],
            "prompt": entry["prompt"], "completion": entry["completion"],
            "total": entry["total"], "cacheRead": entry["cacheRead"],
            "cacheWrite": entry["cacheWrite"],
            "avgTtfbMs": avg_ttfb, "tokensPerSecond": tps}


@dataclass
class RequestRecord:
    """One finished forwarded request (or WebSocket), as the HTTP layer hands it to
    StatsStore.record(): the whole contract between the two. The store trusts it, so the
    values are made safe here, once, when the record is built (__post_init__): strings
    bounded and free of lone surrogates, counts clamped to [0, USAGE_MAX_COUNT), odd numbers
    dropped to 0 or None. Never raises on odd values: the backend controls some of them."""

    # When the request started, epoch seconds (wall clock); None: when the store records it.
    time: Optional[float] = None
    # The request's method ("POST"), cut to 16 characters.
    method: str = ""
    # The request path without its query string (queries may carry secrets).
    path: str = ""
    # The client's IP address, as the request log shows it.
    client: str = ""
    # The status sent to the client (101 for a WebSocket); 0 if none was sent.
    status: int = 0
    # True for a completion endpoint (chat, messages, ...): counted once it answered 2xx.
    completion: bool = False
    # The model that answered (or the one asked for, once the backend accepted it); None: unknown.
    model: Optional[str] = None
    # Token counts by STATS_TOKEN_FIELDS (total filled in from prompt + completion when
    # missing); None when the response reported no usage.
    usage: Optional[Dict[str, int]] = None
    # Where the usage came from: "reported", "injected" (we asked for it), "missing"; or None.
    usage_source: Optional[str] = None
    # True for a failed request: 4xx/5xx, a proxy-made error, a backend error in the stream.
    error: bool = False
    # Milliseconds to the first response byte; None if none arrived.
    ttfb_ms: Optional[float] = None
    # Milliseconds from the request's start to the end of the response.
    duration_ms: Optional[float] = None
    # Body bytes sent to the client.
    bytes: int = 0
    # Whether the response was streamed; None: unknown (see StatsStore._generation_seconds()).
    streamed: Optional[bool] = None
    # The access key's name; None while the proxy is open (no keys configured).
    key: Optional[str] = None

    def __post_init__(self) -> None:
        when = self.time
        if isinstance(when, bool) or not isinstance(when, (int, float)) \
                or not math.isfinite(when):
            self.time = None
        status = self.status
        self.status = status if isinstance(status, int) and not isinstance(status, bool) else 0
        self.method = _stats_clean_key(self.method or "", 16)
        self.path = _stats_clean_key(self.path or "")
        self.client = _stats_clean_key(self.client or "")
        self.completion = bool(self.completion)
        model = self.model
        self.model = _stats_clean_key(model) if isinstance(model, str) and model else None
        if isinstance(self.usage, dict):
            usage = {f: _stats_count(self.usage.get(f)) for f in STATS_TOKEN_FIELDS}
            if not usage["total"]:
                usage["total"] = usage["prompt"] + usage["completion"]
            self.usage = usage
        else:
            self.usage = None
        if self.usage_source not in STATS_USAGE_SOURCES:
            self.usage_source = None
        self.error = bool(self.error)
        self.ttfb_ms = _stats_ms(self.ttfb_ms)
        self.duration_ms = _stats_ms(self.duration_ms)
        self.bytes = _stats_count(self.bytes)
        key = self.key
        self.key = _stats_clean_key(key) if isinstance(key, str) and key else None


# -- the stats document ----------------------------------------------------------------------------
# The store keeps its counters in one JSON-shaped document that save() writes as stats.json
# and load() reads back. _STATS_SHAPE is that document's shape: from it come the empty
# document (zero counters) and the check of a loaded file, in one walk. A persisted counter
# is one line in it (plus where it is counted and shown). A plain value in the shape stands
# for its type (0: a non-negative integer, 0.0: a non-negative number, "": a string, False:
# true/false, a dict: an object with those keys); the classes below stand for the rest.
# A file lacking a key that every version writes is damaged, or not ours: it is moved aside
# like a corrupt one, so the counts it has are not loaded as zeros and then saved over. Keys a
# later version added are wrapped in _StatsAdded: files written before them load with them
# empty (byKey, refused and keyDays came with access keys). A null-able key may be absent.


class _StatsOptional(NamedTuple):
    """null or a value of `types` (a number must be finite); `omit`: absent rather than null."""
    types: Tuple[type, ...]
    omit: bool = False


class _StatsMapOf(NamedTuple):
    """An object with any keys (bounded by _stats_clean_key()), each value of shape `entry`."""
    entry: Any


class _StatsListOf(NamedTuple):
    """A list whose items have shape `item`."""
    item: Any


class _StatsOneOf(NamedTuple):
    """null or one of `values`."""
    values: Tuple[str, ...]


class _StatsText(NamedTuple):
    """A string, cut to `max_len` (and matching `pattern` if given)."""
    max_len: int = _STATS_KEY_MAX_LEN
    pattern: Any = None


class _StatsConst(NamedTuple):
    """Exactly `value` (the format marker and its version)."""
    value: Any


class _StatsAdded(NamedTuple):
    """A key of `shape` that a later version added: a file written before it may lack it.
    `omit`: absent from the document (and the file) until it has something to say."""
    shape: Any
    omit: bool = False


class _StatsHistogram(NamedTuple):
    """A latency histogram with these bucket bounds (see _stats_new_histogram())."""
    bounds: Tuple[float, ...]


_STATS_BREAKDOWN_SHAPE = dict(dict.fromkeys(_STATS_BREAKDOWN_SUM_FIELDS, 0),
                              **dict.fromkeys(_STATS_BREAKDOWN_FLOAT_FIELDS, 0.0))
_STATS_NUMBER = (int, float)

_STATS_SHAPE: Dict[str, Any] = {
    "format": _StatsConst(STATS_FILE_FORMAT),
    "formatVersion": _StatsConst(STATS_FILE_VERSION),
    "version": _StatsOptional((str,)),
    "savedAt": _StatsOptional(_STATS_NUMBER),             # filled in by save()
    "since": 0.0,                                          # epoch s of the last reset
    "requests": 0,
    "completions": 0,
    "errors": 0,
    "bytes": 0,
    "tokens": dict.fromkeys(STATS_TOKEN_FIELDS, 0),
    "usageReports": dict.fromkeys(STATS_USAGE_SOURCES, 0),
    # Responses whose usage reader failed (a bug), per API format: UsageTap counts them in
    # usage_reader_failures, the store takes them in as it reports (_fold_reader_failures).
    # Written once there is one, so a file is what earlier versions wrote until then.
    "usageReaderFailures": _StatsAdded(_StatsMapOf(0), omit=True),
    # Per-key sums; snapshot() derives averages from them.
    "byModel": _StatsMapOf(_STATS_BREAKDOWN_SHAPE),
    "byEndpoint": _StatsMapOf(_STATS_BREAKDOWN_SHAPE),
    "byClient": _StatsMapOf(_STATS_BREAKDOWN_SHAPE),
    # A breakdown entry plus refusals (401/429, never forwarded) and the last use.
    "byKey": _StatsAdded(_StatsMapOf(dict(_STATS_BREAKDOWN_SHAPE, refused=0,
                                          lastUsed=_StatsOptional(_STATS_NUMBER)))),
    "refused": _StatsAdded(0),
    # Tokens per access key on its current local day: the daily budgets. A stats reset keeps
    # them, so it does not hand out a fresh budget; save() writes only today's.
    "keyDays": _StatsAdded(_StatsMapOf({"day": _StatsText(10, _STATS_DAY_FORMAT), "tokens": 0})),
    # The last history_size requests, oldest first.
    "recent": _StatsListOf({
        "time": _StatsText(), "method": _StatsText(16), "path": _StatsText(),
        "model": _StatsOptional((str,)), "status": 0, "client": _StatsText(),
        "tokens": dict.fromkeys(_STATS_RECENT_TOKEN_FIELDS, 0),
        "durationMs": _StatsOptional(_STATS_NUMBER), "ttfbMs": _StatsOptional(_STATS_NUMBER),
        "tokensPerSecond": _StatsOptional(_STATS_NUMBER),
        "usage": _StatsOneOf(STATS_USAGE_SOURCES), "error": False,
        "key": _StatsOptional((str,), omit=True),   # absent while the proxy is open
    }),
    # Chart buckets, oldest first; start: epoch s (UTC hour / day).
    "hourly": _StatsListOf(dict(dict.fromkeys(_STATS_BUCKET_FIELDS, 0), start=0)),
    "daily": _StatsListOf(dict(dict.fromkeys(_STATS_BUCKET_FIELDS, 0), start=0)),
    "histograms": {"duration": _StatsHistogram(DURATION_BUCKETS),
                   "ttfb": _StatsHistogram(TTFB_BUCKETS)},
}


def _stats_empty(shape: Any) -> Any:
    """The empty value of `shape`: zero counters, empty maps and lists."""
    if isinstance(shape, dict):
        return {k: _stats_empty(v) for k, v in shape.items()
                if not (isinstance(v, (_StatsOptional, _StatsAdded)) and v.omit)}
    if isinstance(shape, _StatsMapOf):
        return {}
    if isinstance(shape, _StatsListOf):
        return []
    if isinstance(shape, _StatsHistogram):
        return _stats_new_histogram(shape.bounds)
    if isinstance(shape, (_StatsOptional, _StatsOneOf)):
        return None
    if isinstance(shape, _StatsText):
        return ""
    if isinstance(shape, _StatsConst):
        return shape.value
    if isinstance(shape, _StatsAdded):
        return _stats_empty(shape.shape)
    return shape        # 0, 0.0, False


def _stats_copy(value: Any) -> Any:
    """A deep copy of a stats document or a part of it (dicts, lists, plain values)."""
    out = value.copy()          # C speed for the leaves; recurse only into containers
    for k, v in (value.items() if type(value) is dict else enumerate(value)):
        if type(v) is dict or type(v) is list:
            out[k] = _stats_copy(v)
    return out


def _stats_empty_document(since: float, version: str) -> Dict[str, Any]:
    """A fresh stats document (the store's state and stats.json's content) starting at `since`."""
    doc = _stats_empty(_STATS_SHAPE)
    doc.update(since=since, version=version)
    return doc


def _stats_conform(value: Any, shape: Any, where: str) -> Any:
    """Check a decoded stats.json value against `shape` and return a safe copy: strings and
    map keys bounded (_stats_clean_key()), unknown keys dropped, added or null-able keys empty
    when missing. Raises StatsFileError naming the first bad (or missing) field."""
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            raise StatsFileError("%s: expected an object" % where)
        out = {}
        for key, sub in shape.items():
            if key not in value and not isinstance(sub, (_StatsAdded, _StatsOptional, _StatsOneOf)):
                raise StatsFileError("%s.%s: missing" % (where, key))
            if key not in value or value[key] is None and isinstance(sub, _StatsOptional):
                if not (isinstance(sub, (_StatsOptional, _StatsAdded)) and sub.omit):
                    out[key] = _stats_empty(sub)
                continue
            out[key] = _stats_conform(value[key], sub, "%s.%s" % (where, key))
        return out
    if isinstance(shape, _StatsMapOf):
        if not isinstance(value, dict):
            raise StatsFileError("%s: expected an object" % where)
        return {_stats_clean_key(k): _stats_conform(v, shape.entry, "%s[%r]" % (where, k[:40]))
                for k, v in value.items()}
    if isinstance(shape, _StatsListOf):
        if not isinstance(value, list):
            raise StatsFileError("%s: expected a list" % where)
        return [_stats_conform(v, shape.item, "%s[%d]" % (where, i)) for i, v in enumerate(value)]
    if isinstance(shape, _StatsHistogram):
        return _stats_conform_histogram(value, shape.bounds, where)
    if isinstance(shape, _StatsAdded):
        return _stats_conform(value, shape.shape, where)
    if isinstance(shape, _StatsOptional):
        if isinstance(value, bool) or not isinstance(value, shape.types) or \
                isinstance(value, float) and not math.isfinite(value):
            raise StatsFileError("%s: wrong type" % where)
        return _stats_clean_key(value) if isinstance(value, str) else value
    if isinstance(shape, _StatsOneOf):
        if value is not None and value not in shape.values:
            raise StatsFileError("%s: expected one of %s" % (where, ", ".join(shape.values)))
        return value
    if isinstance(shape, _StatsText):
        if not isinstance(value, str) or shape.pattern and not shape.pattern.match(value):
            raise StatsFileError("%s: expected a string%s" % (
                where, " like %s" % shape.pattern.pattern if shape.pattern else ""))
        return _stats_clean_key(value, shape.max_len)
    if isinstance(shape, bool):
        if not isinstance(value, bool):
            raise StatsFileError("%s: expected true/false" % where)
        return value
    if isinstance(shape, _StatsConst):      # the format marker and its version
        if value != shape.value:
            raise StatsFileError("%s: expected %r" % (where, shape.value))
        return value
    if isinstance(shape, int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise StatsFileError("%s: expected a non-negative integer" % where)
        return value
    if isinstance(shape, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or value < 0:
            raise StatsFileError("%s: expected a non-negative number" % where)
        return float(value)
    raise AssertionError("unknown shape %r at %s" % (shape, where))


def _stats_conform_histogram(value: Any, bounds: Tuple[float, ...],
                             where: str) -> Dict[str, Any]:
    hist = _stats_conform(value, {"buckets": _StatsListOf(0.0), "counts": _StatsListOf(0),
                                  "sum": 0.0, "count": 0}, where)
    if len(hist["counts"]) != len(hist["buckets"]) + 1:
        raise StatsFileError("%s: counts do not match buckets" % where)
    if hist["buckets"] != [float(b) for b in bounds]:
        # Written with other bucket bounds (another version): the counts cannot
        # be re-binned, so restart this histogram rather than reject the file.
        log.info("stats file %s uses other buckets; restarting that histogram", where)
        return _stats_new_histogram(bounds)
    hist["buckets"] = list(bounds)
    return hist


def _stats_parse_document(doc: Any, history_size: int) -> Dict[str, Any]:
    """Check a decoded stats.json and return it as the store's document (one walk against
    _STATS_SHAPE). Raises StatsFileError naming the first bad field."""
    if not isinstance(doc, dict):
        raise StatsFileError("not a JSON object")
    if doc.get("format") != STATS_FILE_FORMAT:
        raise StatsFileError("has no \"format\": %r marker" % STATS_FILE_FORMAT)
    fv = doc.get("formatVersion")
    if fv != STATS_FILE_VERSION:
        raise StatsFileError("has formatVersion %r, this version reads %d"
                             % (fv, STATS_FILE_VERSION))
    state = _stats_conform(doc, _STATS_SHAPE, "file")
    state["recent"] = state["recent"][-history_size:] if history_size else []
    for name in ("hourly", "daily"):    # one bucket per start, oldest first
        state[name] = sorted({b["start"]: b for b in state[name]}.values(),
                             key=lambda b: b["start"])
    return state


def _stats_reader_failures(doc: Dict[str, Any]) -> Dict[str, int]:
    """usageReaderFailures as /_proxy/stats and /_proxy/metrics show it: every API format whose
    usage is read, at 0 until its reader fails (so a rate() over it starts from a sample)."""
    view = dict.fromkeys((f.kind for f in API_FORMATS if f.usage), 0)
    view.update(doc.get("usageReaderFailures", ()))
    return view


class StatsFileError(ValueError):
    """stats.json exists but is not a stats file this version can read."""


class StatsStore:
    """Thread-safe token and request statistics, with optional persistence.

    Methods for the HTTP layer:
      request_started() / request_finished() -- around every forwarded request
      record(rec)        -- once per forwarded request, with a RequestRecord
      snapshot()         -- the /_proxy/stats JSON (a fresh dict)
      reset()            -- zero everything (POST /_proxy/reset)
    Methods for start-up / shutdown:
      load()             -- read stats.json once at start
      save()             -- write stats.json atomically if anything changed
      start_autosave(interval) / stop_autosave() -- background saver thread

    One lock guards all state; it is never held during disk I/O.  No thread
    is started by the constructor.  With enabled=False (tracking disabled in
    config) counting still happens in memory, but load()/save() never touch
    the disk.
    """

    def __init__(self, history_size: int = 100, path: Optional[str] = None, enabled: bool = True,
                 clock: Any = time.time, max_keys: int = 200,
                 version: Optional[str] = None) -> None:
        self.history_size = max(0, int(history_size))
        self.path = path
        self.enabled = bool(enabled)
        self.max_keys = max(1, int(max_keys))
        self.version = version if version is not None else VERSION
        self._clock = clock
        self._lock = threading.Lock()
        # Serialises whole save() calls so an older copy of the state can never
        # replace a newer one on disk; record() never takes it.
        self._save_lock = threading.Lock()
        self._started_at = clock()
        self._in_flight = 0
        self._change_gen = 0      # bumped by every change
        self._saved_gen = 0       # change_gen that is on disk
        self._last_saved: Optional[float] = None
        self._last_error: Optional[str] = None
        self._logged_error: Optional[str] = None
        # Set when load() could neither read nor move aside the file: saving
        # would then overwrite data we could not read.
        self._save_blocked: Optional[str] = None
        self._autosave_thread: Optional[threading.Thread] = None
        self._autosave_stop: Optional[threading.Event] = None
        # Every persisted counter: the stats.json document (see _STATS_SHAPE).
        self._doc = _stats_empty_document(self._started_at, self.version)
        self._iso_last = (None, None)   # (epoch second, its iso_utc text), for record()
        # usage_reader_failures as last taken into the document (it counts for the process).
        with _usage_failures_lock:
            self._failures_seen = dict(usage_reader_failures)

    # -- state -------------------------------------------------------------------------------------

    def _fold_reader_failures(self) -> None:
        """Add the usage readers' failures since the last look to the document (caller holds
        the lock). UsageTap counts them for the whole process, off the store's lock; they are
        taken in here, where they are reported or saved, instead of on every record()."""
        with _usage_failures_lock:
            now = dict(usage_reader_failures)
        if now == self._failures_seen:
            return
        counts = self._doc.setdefault("usageReaderFailures", {})
        for kind, n in now.items():
            new = n - self._failures_seen.get(kind, 0)
            if new > 0:
                kind = _stats_clean_key(kind)
                counts[kind] = counts.get(kind, 0) + new
                self._change_gen += 1
        self._failures_seen = now

    def _zero(self, since: float) -> None:
        """Reset every persisted counter but today's key budgets (caller holds the lock)."""
        key_days = self._doc["keyDays"]
        self._doc = _stats_empty_document(since, self.version)
        self._doc["keyDays"] = key_days

    def _breakdown_entry(self, table: Dict[str, Dict[str, Any]], key: str) -> Dict[str, Any]:
        """Return the entry for key, folding new keys into "(other)" once the
        table is full, so the table (incl. "(other)") never exceeds max_keys."""
        entry = table.get(key)
        if entry is None:
            if len(table) >= self.max_keys - 1 and key != STATS_OTHER_KEY:
                key = STATS_OTHER_KEY
                entry = table.get(key)
            if entry is None:
                entry = table[key] = _stats_new_breakdown()
        return entry

    def _key_entry(self, name: str) -> Dict[str, Any]:
        """The byKey entry for name (caller holds the lock). Names come from the config, and
        are bounded like the other tables all the same."""
        by_key = self._doc["byKey"]
        entry = by_key.get(name)
        if entry is None:
            if len(by_key) >= self.max_keys - 1:
                name = STATS_OTHER_KEY
                entry = by_key.get(name)
            if entry is None:
                entry = by_key[name] = _stats_new_key_entry()
        return entry

    def _key_day(self, name: str, now: float) -> Dict[str, Any]:
        """Today's budget counter of key `name` (caller holds the lock); a new day starts at 0."""
        today = _stats_local_day(now)
        day = self._doc["keyDays"].get(name)
        if day is None or day["day"] != today:
            day = self._doc["keyDays"][name] = {"day": today, "tokens": 0}
        return day

    def key_tokens_today(self, name: str) -> Tuple[int, float]:
        """(tokens key `name` used today, seconds until its budget renews at local midnight)."""
        now = self._clock()
        with self._lock:
            day = self._doc["keyDays"].get(name)
            used = day["tokens"] if day is not None and day["day"] == _stats_local_day(now) else 0
        return used, _stats_seconds_to_midnight(now)

    def record_refusal(self, name: Optional[str]) -> None:
        """Count a request refused before forwarding: no valid key (name None), or a budget
        of key `name` used up. Never counted as a request: the backend never saw it."""
        with self._lock:
            self._change_gen += 1
            self._doc["refused"] += 1
            self._key_entry(_stats_clean_key(name) if name else STATS_NO_KEY)["refused"] += 1

    def _fold_table(self, table: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
        """Bring a loaded table back under max_keys: keep the busiest keys,
        add the rest into "(other)"."""
        if len(table) <= self.max_keys:
            return table
        other = table.pop(STATS_OTHER_KEY, None) or _stats_new_breakdown()
        ranked = sorted(table.items(), key=lambda kv: (-kv[1]["requests"], kv[0]))
        keep = dict(ranked[:self.max_keys - 1])
        for _key, entry in ranked[self.max_keys - 1:]:
            for f in _STATS_BREAKDOWN_SUM_FIELDS + _STATS_BREAKDOWN_FLOAT_FIELDS:
                other[f] += entry[f]
        keep[STATS_OTHER_KEY] = other
        return keep

    def _prune_buckets(self, now: float) -> None:
        hour_cut = int(now // _STATS_HOUR) * _STATS_HOUR - (_STATS_HOURLY_KEEP - 1) * _STATS_HOUR
        day_cut = int(now // _STATS_DAY) * _STATS_DAY - (_STATS_DAILY_KEEP - 1) * _STATS_DAY
        for name, cut in (("hourly", hour_cut), ("daily", day_cut)):
            buckets = self._doc[name]
            if buckets and buckets[0]["start"] < cut:
                buckets[:] = [b for b in buckets if b["start"] >= cut]

    def _bucket_add(self, buckets: List[Dict[str, int]], size: int, keep: int, when: float,
                    now: float, errors: int, usage: Dict[str, int]) -> None:
        start = int(when // size) * size
        if start < int(now // size) * size - (keep - 1) * size:
            return  # older than the chart window: nothing to show it in
        i = len(buckets)                    # oldest first: the bucket is nearly always the last
        while i > 0 and buckets[i - 1]["start"] > start:
            i -= 1
        if i > 0 and buckets[i - 1]["start"] == start:
            bucket = buckets[i - 1]
        else:
            bucket = dict.fromkeys(_STATS_BUCKET_FIELDS, 0)
            bucket["start"] = start
            buckets.insert(i, bucket)
            self._prune_buckets(now)  # a new hour/day began: drop the oldest
        bucket["requests"] += 1
        bucket["errors"] += errors
        bucket["prompt"] += usage["prompt"]
        bucket["completion"] += usage["completion"]
        bucket["total"] += usage["total"]

    @staticmethod
    def _generation_seconds(duration_ms: Optional[float], ttfb_ms: Optional[float],
                            streamed: Optional[bool]) -> Optional[float]:
        """Seconds the backend spent generating, for tokens/s.

        Streaming: duration - ttfb (the first byte arrives once the prompt is
        processed, so the rest is generation).  A non-streamed response only
        sends its first byte after generating everything, so duration - ttfb is
        just the transfer time and would give absurd rates; when the caller
        says streamed=False we use the whole duration instead.
        """
        if duration_ms is None:
            return None
        if streamed is False or ttfb_ms is None:
            gen_ms = duration_ms
        else:
            gen_ms = duration_ms - ttfb_ms
        if gen_ms < 1.0:  # below timer noise: no meaningful rate
            return None
        return gen_ms / 1000.0

    def request_started(self) -> None:
        """Count one request in flight (gauge for /metrics)."""
        with self._lock:
            self._in_flight += 1

    def request_finished(self) -> None:
        """Undo request_started(); never goes below zero."""
        with self._lock:
            if self._in_flight > 0:
                self._in_flight -= 1

    def record(self, rec: RequestRecord) -> None:
        """Add one finished forwarded request. The record's values are already safe (see
        RequestRecord); here they are only counted."""
        now = self._clock()
        when = rec.time if rec.time is not None else now
        status = rec.status
        is_error = rec.error
        is_completion = rec.completion and 200 <= status < 300
        usage = rec.usage
        u = usage or dict.fromkeys(STATS_TOKEN_FIELDS, 0)
        source = rec.usage_source
        model_key: Optional[str] = rec.model
        if model_key is None and usage is not None:
            model_key = STATS_UNKNOWN_MODEL
        path, client, method = rec.path, rec.client, rec.method
        ttfb_ms, duration_ms, nbytes = rec.ttfb_ms, rec.duration_ms, rec.bytes
        key_name = rec.key
        gen_s: Optional[float] = None
        if u["completion"] > 0:
            gen_s = self._generation_seconds(duration_ms, ttfb_ms, rec.streamed)
        tps = round(u["completion"] / gen_s, 1) if gen_s else None

        # Requests come many a second: the time text is made once per second, not per request.
        second, text = self._iso_last
        if when < 0 or second != int(when):
            text = iso_utc(when)
            if when >= 0:
                self._iso_last = (int(when), text)
        entry = {
            "time": text,
            "method": method,
            "path": path,
            "model": model_key if model_key != STATS_UNKNOWN_MODEL else None,
            "status": status,
            "client": client,
            "tokens": {f: u[f] for f in _STATS_RECENT_TOKEN_FIELDS},
            "durationMs": round(duration_ms, 1) if duration_ms is not None else None,
            "ttfbMs": round(ttfb_ms, 1) if ttfb_ms is not None else None,
            "tokensPerSecond": tps,
            "usage": source,
            "error": is_error,
        }
        if key_name is not None:
            entry["key"] = key_name     # the access key's name; absent while the proxy is open

        with self._lock:
            doc = self._doc
            self._change_gen += 1
            doc["requests"] += 1
            doc["completions"] += is_completion
            doc["errors"] += is_error
            doc["bytes"] += nbytes
            for f in STATS_TOKEN_FIELDS:
                doc["tokens"][f] += u[f]
            if source is not None:
                doc["usageReports"][source] += 1
            targets = [self._breakdown_entry(doc["byEndpoint"], path),
                       self._breakdown_entry(doc["byClient"], client)]
            if model_key is not None:
                targets.append(self._breakdown_entry(doc["byModel"], model_key))
            if key_name is not None:
                key_entry = self._key_entry(key_name)
                key_entry["lastUsed"] = now
                targets.append(key_entry)
                self._key_day(key_name, now)["tokens"] += u["total"]
            for b in targets:
                b["requests"] += 1
                b["errors"] += is_error
                for f in ("prompt", "completion", "total", "cacheRead", "cacheWrite", "reasoning"):
                    b[f] += u[f]
                if ttfb_ms is not None:
                    b["ttfbCount"] += 1
                    b["ttfbSumMs"] += ttfb_ms
                if gen_s:
                    b["genTokens"] += u["completion"]
                    b["genSeconds"] += gen_s
            recent = doc["recent"]
            recent.append(entry)
            if len(recent) > self.history_size:
                del recent[:len(recent) - self.history_size]
            self._bucket_add(doc["hourly"], _STATS_HOUR, _STATS_HOURLY_KEEP, when, now, is_error, u)
            self._bucket_add(doc["daily"], _STATS_DAY, _STATS_DAILY_KEEP, when, now, is_error, u)
            if duration_ms is not None:
                _stats_histogram_observe(doc["histograms"]["duration"], duration_ms / 1000.0)
            if ttfb_ms is not None:
                _stats_histogram_observe(doc["histograms"]["ttfb"], ttfb_ms / 1000.0)

    def reset(self) -> None:
        """Zero totals, breakdowns, recent, buckets and histograms; `since`
        becomes now.  In-flight and uptime are untouched.  Marks dirty so the
        reset reaches disk."""
        now = self._clock()
        with self._lock:
            self._fold_reader_failures()        # those before the reset are not counted after it
            self._zero(now)
            self._change_gen += 1

    # -- reading -----------------------------------------------------------------------------------

    def snapshot(self, keys: Iterable[AccessKey] = ()) -> Dict[str, Any]:
        """Return the /_proxy/stats document: a fresh, JSON-serialisable dict
        (keeps every field of the original proxy.js response).  `keys`: the
        access keys in force; each gets a byKey row with its budgets, used or not."""
        now = self._clock()
        today = _stats_local_day(now)
        with self._lock:
            self._fold_reader_failures()
            doc = self._doc
            by_key: Dict[str, Dict[str, Any]] = {}
            for name, entry in doc["byKey"].items():
                view = _stats_breakdown_view(entry)
                view.update(refused=entry["refused"], lastUsed=iso_utc(entry["lastUsed"]))
                by_key[name] = view
            for key in keys:
                if key.name not in by_key:
                    view = _stats_breakdown_view(_stats_new_key_entry())
                    view.update(refused=0, lastUsed=None)
                    by_key[key.name] = view
                by_key[key.name].update(dailyTokens=key.daily_tokens,
                                        requestsPerMinute=key.requests_per_minute)
            for name, view in by_key.items():
                day = doc["keyDays"].get(name)
                view["today"] = day["tokens"] if day is not None and day["day"] == today else 0
            self._prune_buckets(now)
            uptime = max(0, int(now - self._started_at))
            tokens: Dict[str, Any] = dict(doc["tokens"])
            tokens["formatted"] = format_tokens(tokens["total"])

            def chart(buckets):
                return [dict({f: b[f] for f in _STATS_BUCKET_FIELDS}, start=iso_utc(b["start"]))
                        for b in buckets]
            snap = {
                "version": self.version,
                "uptime": format_uptime(uptime),
                "uptimeSeconds": uptime,
                "startedAt": iso_utc(self._started_at),
                "since": iso_utc(doc["since"]),
                "requests": doc["requests"],
                "completions": doc["completions"],
                "errors": doc["errors"],
                "inFlight": self._in_flight,
                "bytes": doc["bytes"],
                "tokens": tokens,
                "usageReports": dict(doc["usageReports"]),
                "usageReaderFailures": _stats_reader_failures(doc),
                "byModel": {k: _stats_breakdown_view(v) for k, v in doc["byModel"].items()},
                "byEndpoint": {k: _stats_breakdown_view(v) for k, v in doc["byEndpoint"].items()},
                "byClient": {k: _stats_breakdown_view(v) for k, v in doc["byClient"].items()},
                "byKey": by_key,
                "refused": doc["refused"],
                "recent": [dict(e, tokens=dict(e["tokens"])) for e in reversed(doc["recent"])],
                "hourly": chart(doc["hourly"]),
                "daily": chart(doc["daily"]),
                "persistence": {
                    "enabled": self._persistence_enabled(),
                    # The name only: stats readers need not learn the server's directories.
                    "file": os.path.basename(self.path) if self.path else None,
                    "lastSaved": iso_utc(self._last_saved),
                    "lastError": self._last_error or self._save_blocked,
                },
            }
        return snap

    def _metrics_state(self) -> Dict[str, Any]:
        """What render_metrics() needs, taken under the lock: a copy of the document, plus
        the gauges that are not persisted."""
        now = self._clock()
        with self._lock:
            self._fold_reader_failures()
            # All but the recent requests, which no metric shows.
            state = _stats_copy({k: v for k, v in self._doc.items() if k != "recent"})
            state.update(
                usageReaderFailures=_stats_reader_failures(state),
                version=self.version,
                uptime=max(0.0, now - self._started_at),
                inFlight=self._in_flight,
                keyToday={k: d["tokens"] for k, d in state["keyDays"].items()
                          if d["day"] == _stats_local_day(now)},
                duration=state["histograms"]["duration"],
                ttfb=state["histograms"]["ttfb"])
            return state

    # -- persistence -------------------------------------------------------------------------------

    def _persistence_enabled(self) -> bool:
        return self.enabled and bool(self.path)

    def _to_file_state(self) -> Dict[str, Any]:
        """A copy of the document to write as stats.json (caller holds the lock).  Only
        counters, paths, model names and client IPs: never headers or bodies."""
        doc = _stats_copy(self._doc)                # save() encodes it unlocked
        # Only today's counters: yesterday's budget use no longer limits anything.
        today = _stats_local_day(self._clock())
        doc["keyDays"] = {k: d for k, d in doc["keyDays"].items() if d["day"] == today}
        return doc

    def load(self) -> bool:
        """Read stats.json into the store (call once at start-up).

        Returns True if state was loaded.  A missing file is a fresh start
        (False).  A file that cannot be read, is not JSON, or has the wrong
        shape is renamed to ``<path>.corrupt-<YYYYmmdd-HHMMSS>`` (a warning
        names both paths) and the store starts empty: it is never silently
        overwritten.  A no-op (False) when tracking is disabled or no path.
        """
        if not self._persistence_enabled():
            return False
        path = self.path
        remove_stale_temp_files(path)
        try:
            # Opened as the pidfile and the log are: a FIFO planted here must not hang the
            # start, and a symlink is not followed. Other hard links are harmless: save()
            # replaces the name, it never writes into the file.
            with os.fdopen(open_regular_file(path, os.O_RDONLY, one_link=False), "rb") as f:
                data = f.read(_STATS_FILE_MAX_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):
            # NotADirectoryError: a parent is a regular file; there is no
            # stats file to lose, and save() will report the bad path.
            log.info("no stats file at %s yet; starting with empty stats", path)
            return False
        except IsADirectoryError:
            # Not ours to rename; refuse to save rather than fight over it.
            msg = "stats file %s is a directory; not saving stats" % path
            log.warning("%s", msg)
            with self._lock:
                self._save_blocked = "the stats file is a directory; not saving stats"
            return False
        except OSError as exc:
            # Moved aside like a corrupt file: the link or the FIFO is kept, under another name.
            if exc.errno == errno.ELOOP:
                reason = ("is a symbolic link, which is not followed (to keep the stats where it "
                          "points, set tracking.statsFile to that path)")
            elif exc.errno in (errno.EINVAL, errno.ENXIO):
                reason = "is not a regular file (a FIFO, socket or device)"
            else:
                reason = "cannot be read (%s)" % exc
            self._set_aside(path, reason)
            return False
        try:
            if len(data) > _STATS_FILE_MAX_BYTES:
                raise StatsFileError("larger than %d bytes" % _STATS_FILE_MAX_BYTES)
            try:
                doc = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise StatsFileError("not valid JSON: %s" % exc)
            state = _stats_parse_document(doc, self.history_size)
        except StatsFileError as exc:
            self._set_aside(path, str(exc))
            return False
        # max_keys may have been lowered since the file was written.
        for name in ("byModel", "byEndpoint", "byClient"):
            state[name] = self._fold_table(state[name])
        saved_at = state["savedAt"]
        state.update(version=self.version, savedAt=None)
        with self._lock:
            self._doc = state
            self._last_saved = float(saved_at) if saved_at is not None else None
            self._prune_buckets(self._clock())
            self._saved_gen = self._change_gen  # memory == disk
        log.info("loaded stats from %s (%d requests since %s)",
                 path, state["requests"], iso_utc(state["since"]))
        return True

    def _set_aside(self, path: str, reason: str) -> None:
        """Rename an unusable stats file out of the way, keeping its bytes."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(self._clock()))
        target = "%s.corrupt-%s" % (path, stamp)
        n = 1
        while os.path.exists(target):  # two failures in one second: keep both
            target = "%s.corrupt-%s-%d" % (path, stamp, n)
            n += 1
        try:
            os.replace(path, target)
        except OSError as exc:
            msg = ("stats file %s %s, and moving it aside to %s failed (%s); "
                   "not saving stats so it is not overwritten" % (path, reason, target, exc))
            log.warning("%s", msg)
            with self._lock:
                # snapshot() shows this to stats readers: no server paths in it.
                self._save_blocked = ("the stats file is unreadable and could not be moved "
                                      "aside; not saving stats so it is not overwritten")
            return
        log.warning("stats file %s %s; moved it to %s and starting with empty stats",
                    path, reason, target)

    def save(self) -> bool:
        """Write stats.json atomically if anything changed since the last save.

        Returns True if this call wrote the file; False if nothing changed,
        persistence is off, or the write failed.  A failure is logged as a
        warning once until a save succeeds again (not every interval: the
        message of each failure may differ, e.g. by its temp file name), kept
        in snapshot()["persistence"]["lastError"] without paths, and never
        raised: the store stays dirty so the next save retries.
        """
        if not self._persistence_enabled():
            return False
        with self._save_lock:
            with self._lock:
                self._fold_reader_failures()
                if self._save_blocked or self._change_gen == self._saved_gen:
                    return False
                gen = self._change_gen
                doc = self._to_file_state()
            # Disk I/O below happens without the state lock: record() and
            # snapshot() carry on while we write.
            now = self._clock()
            doc["savedAt"] = now
            try:
                data = json.dumps(doc, ensure_ascii=True, allow_nan=False,
                                  separators=(",", ":")).encode("ascii")
                _write_file_atomic(self.path, data, private=False, make_dirs=False)
            except (OSError, ValueError, TypeError) as exc:
                err = "cannot save stats to %s: %s" % (self.path, exc)
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
                    ("%s" % exc if not isinstance(exc, OSError) else type(exc).__name__)
                with self._lock:
                    self._last_error = "cannot save stats: %s" % reason
                if self._logged_error is None:  # once until it recovers
                    self._logged_error = err
                    log.warning("%s (will retry)", err)
                return False
            with self._lock:
                self._saved_gen = max(self._saved_gen, gen)
                self._last_saved = now
                recovered = self._last_error is not None
                self._last_error = None
            if recovered:
                log.info("stats saved to %s again", self.path)
            self._logged_error = None
            return True

    def start_autosave(self, interval: float) -> None:
        """Start a daemon thread that calls save() every `interval` seconds.
        Does nothing if persistence is off or the thread already runs."""
        if not self._persistence_enabled() or interval <= 0:
            return
        if self._autosave_thread is not None and self._autosave_thread.is_alive():
            return
        stop = threading.Event()
        thread = threading.Thread(target=self._autosave_loop, args=(float(interval), stop),
                                  name="llm-proxy-stats-autosave", daemon=True)
        self._autosave_stop = stop
        self._autosave_thread = thread
        thread.start()

    def _autosave_loop(self, interval: float, stop: threading.Event) -> None:
        # Event.wait returns at once when stop_autosave() sets it.
        while not stop.wait(interval):
            try:
                self.save()
            except Exception:  # never let the saver die silently
                log.exception("stats autosave failed")

    def stop_autosave(self, timeout: float = 5.0) -> bool:
        """Stop the autosave thread (if any) and do one final save().
        Safe to call more than once; returns what the final save() returned."""
        stop, thread = self._autosave_stop, self._autosave_thread
        if stop is not None:
            stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._autosave_stop = self._autosave_thread = None
        return self.save()


# ==================================================================================================
# Metrics
# ==================================================================================================

#: Content-Type of GET /_proxy/metrics (Prometheus text format 0.0.4).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# stats token field -> Prometheus label value (snake_case by convention).
_METRIC_TOKEN_TYPES = (("prompt", "prompt"), ("completion", "completion"),
                       ("cacheRead", "cache_read"), ("cacheWrite", "cache_write"),
                       ("reasoning", "reasoning"))


def _prom_escape_label(value: str) -> str:
    # Text format 0.0.4: in label values \, " and newline are escaped.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _prom_escape_help(text: str) -> str:
    # In HELP text only \ and newline are escaped.
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _prom_number(value: float) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class _PromWriter:
    """Collects families; each family's HELP/TYPE is written once, samples follow."""

    def __init__(self) -> None:
        self.lines: List[str] = []

    def family(self, name: str, mtype: str, help_text: str) -> None:
        self.lines.append("# HELP %s %s" % (name, _prom_escape_help(help_text)))
        self.lines.append("# TYPE %s %s" % (name, mtype))

    def sample(self, name: str, value: float, labels: Any = ()) -> None:
        if labels:
            inner = ",".join('%s="%s"' % (k, _prom_escape_label(str(v))) for k, v in labels)
            self.lines.append("%s{%s} %s" % (name, inner, _prom_number(value)))
        else:
            self.lines.append("%s %s" % (name, _prom_number(value)))

    def breakdown(self, name: str, help_text: str, rows: Any, label: str, field: str) -> None:
        """A counter family with one sample per breakdown row: row[field], labelled by its key."""
        self.family(name, "counter", help_text)
        for key, entry in rows:
            self.sample(name, entry[field], ((label, key),))

    def token_breakdown(self, name: str, help_text: str, rows: Any, label: str) -> None:
        """A counter family with one sample per breakdown row and token type."""
        self.family(name, "counter", help_text)
        for key, entry in rows:
            for field, token_type in _METRIC_TOKEN_TYPES:
                self.sample(name, entry[field], ((label, key), ("type", token_type)))

    def histogram(self, name: str, hist: Dict[str, Any], labels: Any = ()) -> None:
        cumulative = 0
        for bound, count in zip(hist["buckets"], hist["counts"]):
            cumulative += count
            # le as a Python float repr ("0.05", "1.0"), as prometheus_client writes it.
            self.sample(name + "_bucket", cumulative, tuple(labels) + (("le", repr(float(bound))),))
        self.sample(name + "_bucket", hist["count"], tuple(labels) + (("le", "+Inf"),))
        self.sample(name + "_sum", hist["sum"], labels)
        self.sample(name + "_count", hist["count"], labels)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_metrics(store: StatsStore) -> str:
    """Return the store as Prometheus text exposition format 0.0.4
    (serve with METRICS_CONTENT_TYPE).  Label cardinality is bounded by the
    store's capped breakdown maps (max_keys each, overflow in "(other)").
    Counters restart from zero after POST /_proxy/reset, which Prometheus
    treats as an ordinary counter reset."""
    s = store._metrics_state()
    w = _PromWriter()
    w.family("llm_proxy_info", "gauge", "Proxy build information; always 1.")
    w.sample("llm_proxy_info", 1, (("version", s["version"]),))
    w.family("llm_proxy_uptime_seconds", "gauge", "Seconds since the proxy process started.")
    w.sample("llm_proxy_uptime_seconds", round(s["uptime"], 3))
    w.family("llm_proxy_in_flight_requests", "gauge", "Forwarded requests currently in progress.")
    w.sample("llm_proxy_in_flight_requests", s["inFlight"])

    w.family("llm_proxy_requests_total", "counter", "Forwarded requests.")
    w.sample("llm_proxy_requests_total", s["requests"])
    w.family("llm_proxy_completions_total", "counter",
             "Completion-endpoint requests answered with a 2xx status.")
    w.sample("llm_proxy_completions_total", s["completions"])
    w.family("llm_proxy_errors_total", "counter",
             "Requests that failed: status >= 400, proxy error, aborted stream, or error event.")
    w.sample("llm_proxy_errors_total", s["errors"])
    w.family("llm_proxy_response_bytes_total", "counter",
             "Response body bytes sent to clients for forwarded requests.")
    w.sample("llm_proxy_response_bytes_total", s["bytes"])
    w.family("llm_proxy_tokens_total", "counter",
             "Tokens by type, as reported by the backend (reasoning is part of completion).")
    for key, label in _METRIC_TOKEN_TYPES:
        w.sample("llm_proxy_tokens_total", s["tokens"][key], (("type", label),))
    w.family("llm_proxy_usage_reports_total", "counter",
             "Completion responses by where their usage came from (reported, injected, missing).")
    for source in STATS_USAGE_SOURCES:
        w.sample("llm_proxy_usage_reports_total", s["usageReports"][source], (("source", source),))
    w.family("llm_proxy_usage_reader_failures_total", "counter",
             "Responses whose usage the proxy failed to read, by API format (a bug: please "
             "report it); their usage counts as missing.")
    for kind, failures in sorted(s["usageReaderFailures"].items()):
        w.sample("llm_proxy_usage_reader_failures_total", failures, (("format", kind),))

    by_model = sorted(s["byModel"].items())
    w.breakdown("llm_proxy_model_requests_total", "Requests by model.", by_model, "model",
                "requests")
    w.breakdown("llm_proxy_model_errors_total", "Failed requests by model.", by_model, "model",
                "errors")
    w.token_breakdown("llm_proxy_model_tokens_total", "Tokens by model and type.", by_model,
                      "model")

    by_endpoint = sorted(s["byEndpoint"].items())
    w.breakdown("llm_proxy_endpoint_requests_total", "Requests by endpoint path.", by_endpoint,
                "endpoint", "requests")
    w.breakdown("llm_proxy_endpoint_errors_total", "Failed requests by endpoint path.",
                by_endpoint, "endpoint", "errors")

    w.breakdown("llm_proxy_client_requests_total", "Requests by client IP address.",
                sorted(s["byClient"].items()), "client", "requests")

    # Access keys: labelled by name only (the keys themselves are never in the store).
    w.family("llm_proxy_refused_total", "counter",
             "Requests refused before forwarding: no valid access key (401) or a budget used up (429).")
    w.sample("llm_proxy_refused_total", s["refused"])
    by_key = sorted(s["byKey"].items())
    w.breakdown("llm_proxy_key_requests_total", "Forwarded requests by access key.", by_key,
                "key", "requests")
    w.breakdown("llm_proxy_key_errors_total", "Failed forwarded requests by access key.", by_key,
                "key", "errors")
    w.breakdown("llm_proxy_key_refused_total",
                "Refused requests by access key (\"%s\": none or an unknown one)." % STATS_NO_KEY,
                by_key, "key", "refused")
    w.token_breakdown("llm_proxy_key_tokens_total", "Tokens by access key and type.", by_key,
                      "key")
    w.family("llm_proxy_key_tokens_today", "gauge",
             "Tokens used today (proxy's local time) by access key: what dailyTokens limits.")
    for name, tokens in sorted(s["keyToday"].items()):
        w.sample("llm_proxy_key_tokens_today", tokens, (("key", name),))

    w.family("llm_proxy_request_duration_seconds", "histogram",
             "Time from request start to the end of the response.")
    w.histogram("llm_proxy_request_duration_seconds", s["duration"])
    w.family("llm_proxy_time_to_first_byte_seconds", "histogram",
             "Time from request start to the first response byte from the backend.")
    w.histogram("llm_proxy_time_to_first_byte_seconds", s["ttfb"])
    return w.text()


# ==================================================================================================
# HTTP layer, part 1: reading a client's request strictly (no smuggling past us)
# ==================================================================================================

class RequestError(Exception):
    """A request we refuse before forwarding; carries the status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(Exception):
    """The client closed the connection or stopped sending in the middle of a request."""


class UploadTimeout(socket.timeout):
    """The request body stalled past clientTimeout or fell below BODY_MIN_RATE."""


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_FIELD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(;[^\r\n]*)?\Z")


class RequestHead:
    """A parsed request line and header list (names keep their case, order is kept)."""

    __slots__ = ("method", "target", "version", "headers", "_by_name")

    def __init__(self, method: str, target: str, version: str,
                 headers: List[Tuple[str, str]]) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self._by_name: Optional[Dict[str, List[str]]] = None

    def _index(self) -> Dict[str, List[str]]:
        # A forwarded request asks for a dozen headers; lower-case each name once, not each time.
        if self._by_name is None:
            index: Dict[str, List[str]] = {}
            for key, value in self.headers:
                index.setdefault(key.lower(), []).append(value)
            self._by_name = index
        return self._by_name

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The last value of header `name` (case-insensitive), or `default`."""
        values = self._index().get(name.lower())
        return values[-1] if values else default

    def get_all(self, name: str) -> List[str]:
        """Every value of header `name`, in order."""
        return list(self._index().get(name.lower(), ()))

    def connection_tokens(self) -> List[str]:
        """Lower-case tokens of every Connection header."""
        return _connection_tokens(self.get_all("connection"))


def _connection_tokens(values) -> List[str]:
    return [token.strip().lower() for value in values for token in value.split(",") if token.strip()]


def _client_read(read, size: int) -> bytes:
    """read(size) from the client; a reset or clientTimeout becomes ClientGone.

    Without this an OSError while a body streams upstream looks like the backend's (a 504 "the
    backend did not answer" for a client that stalled), and one while a small body is read
    records the request as status 0 and no error. Python 3.9/3.13 report a client that leaves
    mid-upload as ECONNRESET, 3.11 as end of stream.
    """
    try:
        return read(size)
    except UploadTimeout as exc:
        # The client is still there, only too slow: it gets an answer (RFC 9110 §15.5.9).
        raise RequestError(408, str(exc)) from None
    except OSError:
        raise ClientGone() from None


def _read_line(rfile, limit: int, too_long_status: int, what: str) -> bytes:
    """One CRLF-terminated line without its CRLF. b"" at a clean end of stream before any byte."""
    line = _client_read(rfile.readline, limit + 1)
    if line.endswith(b"\r\n"):
        return line[:-2]
    if not line:
        raise EOFError
    if len(line) > limit:
        raise RequestError(too_long_status, "%s too long" % what)
    if line.endswith(b"\n"):
        # A bare LF is accepted by some servers and not by others: exactly the disagreement that
        # request smuggling feeds on (RFC 9112 §2.2), so we refuse it.
        raise RequestError(400, "line ends in a bare LF; HTTP needs CRLF")
    raise ClientGone()


class _DeadlineReader(io.RawIOBase):
    """Reads a client socket; while `deadline` (a time.monotonic() value) is set, all reads
    together must finish by then, else socket.timeout. The request head gets a fixed deadline;
    after start_body() the body gets one that each byte received moves later."""

    def __init__(self, sock) -> None:
        self._sock = sock
        self._timeout = sock.gettimeout()
        self.deadline = None
        self._min_rate = None
        self._grace = 0.0

    def readable(self):
        return True

    def start_head(self, seconds: float) -> None:
        """The whole request head must arrive within `seconds`."""
        self._min_rate = None
        self.deadline = time.monotonic() + seconds

    def start_body(self, grace: float, min_rate: float) -> None:
        """From the first body read on, the body may take `grace` seconds plus 1/min_rate s
        per byte received; reads past that raise UploadTimeout."""
        self._min_rate = min_rate
        self._grace = grace
        self.deadline = None

    def stop_deadlines(self) -> None:
        """No deadline from now on: the connection has become a WebSocket tunnel."""
        self._min_rate = None
        self.deadline = None

    def readinto(self, buffer):
        if self._min_rate is not None:
            return self._read_body(buffer)
        if self.deadline is None:
            return self._sock.recv_into(buffer)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("no complete request head within clientTimeout")
        return self._recv_within(buffer, remaining)

    def _read_body(self, buffer):
        if self.deadline is None:       # the clock starts when we first wait for body bytes
            self.deadline = time.monotonic() + self._grace
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise UploadTimeout("the request body arrived slower than %d bytes/s" % self._min_rate)
        try:
            received = self._recv_within(buffer, remaining)
        except socket.timeout:
            raise UploadTimeout("the request body stalled (proxy.clientTimeout or %d bytes/s)"
                                % self._min_rate) from None
        self.deadline += received / self._min_rate
        return received

    def _recv_within(self, buffer, remaining: float):
        if remaining > self._timeout - 1.0:
            # The deadline is (nearly) the socket's own timeout: skip two syscalls per read
            # on the hot path; the head may overrun its deadline by at most a second.
            return self._sock.recv_into(buffer)
        self._sock.settimeout(remaining)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._timeout)


# A whole request head that read_request_head's line-by-line reading would accept as it is: an
# optional empty line, the request line, field lines whose names are tokens and whose values
# hold no control character but HTAB, every line ending in CRLF, then the empty line. A field
# may not start with a blank (obs-fold), since a token cannot.
_WHOLE_HEAD = re.compile(
    rb"(?:\r\n)?([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) (HTTP/1\.[01])\r\n"
    rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n)*\r\n")


def read_request_head(rfile) -> Optional[RequestHead]:
    """Read one request head. Returns None when the client closed the connection cleanly.

    Strict by design: CRLF only, no obsolete line folding, header names must be tokens, no control
    characters in values, limits on sizes. Raises RequestError (status + message) or ClientGone.
    """
    # Nearly always the whole head came in one read: checked by one regex and split once,
    # instead of 15 readline() calls and checks (read_request_head was 15% of a keep-alive
    # request's CPU under py-spy --gil). Anything else -- a head still arriving,
    # too long for every line to be within its limit, or one the regex does not accept as
    # it is -- goes to the line reader, which decides (and says what is wrong).
    buffered = _client_read(rfile.peek, 1)
    if not buffered:
        return None
    whole = _WHOLE_HEAD.match(buffered)
    if whole is not None and whole.end() <= MAX_REQUEST_LINE:
        # Each field line ends in CRLF (the empty line's is left out): the last piece is "".
        lines = buffered[whole.end(3) + 2:whole.end() - 2].decode("latin-1").split("\r\n")
        if len(lines) <= MAX_HEADER_COUNT + 1:
            rfile.read(whole.end())          # already buffered: no read from the socket
            headers = []
            for line in lines[:-1]:
                name, _, value = line.partition(":")
                headers.append((name, value.strip(" \t")))
            method, target, version = whole.group(1, 2, 3)
            return RequestHead(method.decode("ascii"), target.decode("ascii"),
                               version.decode("ascii"), headers)
    return _read_head_by_line(rfile)


def _read_head_by_line(rfile) -> Optional[RequestHead]:
    try:
        line = _read_line(rfile, MAX_REQUEST_LINE, 414, "request line")
        if not line:  # RFC 9112 §2.2: ignore at least one empty line before a request
            line = _read_line(rfile, MAX_REQUEST_LINE, 414, "request line")
    except EOFError:
        return None
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not _TARGET.match(parts[1]):
        raise RequestError(400, "malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/"):
            raise RequestError(505, "HTTP version not supported")
        raise RequestError(400, "malformed request line")
    headers = []
    total = len(line)
    while True:
        try:
            line = _read_line(rfile, MAX_HEADER_LINE, 431, "header line")
        except EOFError:
            raise ClientGone() from None
        if not line:
            break
        total += len(line) + 2
        if total > MAX_HEADER_BYTES or len(headers) >= MAX_HEADER_COUNT:
            raise RequestError(431, "request headers too large")
        if line[:1] in (b" ", b"\t"):
            raise RequestError(400, "obsolete header line folding is not accepted")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise RequestError(400, "malformed header line")
        value = value.strip(b" \t")
        if _BAD_FIELD_VALUE.search(value):
            raise RequestError(400, "control character in header %s" % name.decode("ascii"))
        headers.append((name.decode("ascii"), value.decode("latin-1")))
    return RequestHead(method.decode("ascii"), target.decode("ascii"),
                       version.decode("ascii"), headers)


def request_body_length(head: RequestHead) -> Optional[int]:
    """How the request body is framed (RFC 9112 §6.3): -1 chunked, N bytes, or None for no body.

    Raises RequestError for the ambiguous framings used to smuggle requests.
    """
    codings = head.get_all("transfer-encoding")
    lengths = head.get_all("content-length")
    if codings:
        if lengths:
            raise RequestError(400, "both Transfer-Encoding and Content-Length")
        if head.version == "HTTP/1.0":
            raise RequestError(400, "Transfer-Encoding in an HTTP/1.0 request")
        tokens = [t.strip().lower() for v in codings for t in v.split(",")]
        if tokens != ["chunked"]:
            raise RequestError(501 if "chunked" in tokens else 400,
                               "unsupported Transfer-Encoding: %s" % ", ".join(codings))
        return -1
    if lengths:
        values = {v.strip() for item in lengths for v in item.split(",")}
        if len(values) != 1:
            raise RequestError(400, "conflicting Content-Length values")
        value = values.pop()
        # isascii(): str.isdigit() is also true for "\u00b2" and other digits int() refuses.
        if not (value.isascii() and value.isdigit()) or len(value) > 18:
            raise RequestError(400, "invalid Content-Length")
        return int(value) or None
    return None


def iter_fixed_body(rfile, length: int, piece: int = READ_CHUNK):
    """Yield a Content-Length body in pieces. Raises ClientGone if it ends early."""
    remaining = length
    while remaining:
        data = _client_read(rfile.read1, min(piece, remaining))
        if not data:
            raise ClientGone()
        remaining -= len(data)
        yield data


def iter_chunked_body(rfile, piece: int = READ_CHUNK):
    """Yield the decoded data of a chunked body; reads and drops trailers. Strict framing."""
    while True:
        try:
            line = _read_line(rfile, MAX_CHUNK_LINE, 400, "chunk size line")
        except EOFError:
            raise ClientGone() from None
        match = _CHUNK_SIZE.match(line)
        if not match:
            raise RequestError(400, "invalid chunk size")
        size = int(match.group(1), 16)
        if size == 0:
            break
        yield from iter_fixed_body(rfile, size, piece)
        if _client_read(rfile.read, 2) != b"\r\n":
            raise RequestError(400, "chunk data not followed by CRLF")
    trailer_bytes = 0
    while True:
        try:
            line = _read_line(rfile, MAX_HEADER_LINE, 431, "trailer line")
        except EOFError:
            raise ClientGone() from None
        if not line:
            return
        trailer_bytes += len(line)
        if trailer_bytes > MAX_HEADER_BYTES:
            raise RequestError(431, "trailers too large")


# ==================================================================================================
# HTTP layer, part 2: the backend connection pool
# ==================================================================================================

class UpstreamError(Exception):
    """The backend could not be reached or answered badly; carries the status and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UpstreamPool:
    """Keep-alive connections to the one backend, reused last-in first-out.

    A pooled connection that has become readable while idle was closed by the backend (or sent
    something unasked); it is dropped before use rather than discovered broken mid-request.
    That check is made before every reuse, and it is also what finds bytes a backend sent past
    the end of a response when they were not already in the response's buffer (_bytes_waiting).
    """

    def __init__(self, host: str, port: int, connect_timeout: float, read_timeout: float,
                 max_idle: int = 64) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self._idle: List[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self.url = "http://" + authority(host, port)

    def acquire(self) -> Tuple[http.client.HTTPConnection, bool]:
        """A connected HTTPConnection and whether it was reused. Raises UpstreamError."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(), False
            if _socket_is_quiet(conn.sock):
                return conn, True
            if not _peer_closed(conn.sock):         # not the backend's close: bytes are there
                log.debug("backend connection closed instead of reused: the backend sent bytes "
                          "past the end of its response")
            conn.close()

    def release(self, conn: http.client.HTTPConnection, response: "UpstreamResponse") -> None:
        """Take a connection back after its response was read to the end.

        It is kept for reuse only when the exchange ended cleanly at a known boundary (see
        UpstreamResponse.reusable); otherwise it is closed, so that no byte of this exchange can
        ever be read as the answer to the next client's request.
        """
        response.close()            # ends the response; notes bytes already read past its end
        why_not = response.why_not_reusable()
        if why_not is None:
            with self._lock:
                if conn.sock is not None and len(self._idle) < self.max_idle:
                    self._idle.append(conn)
                    return
        elif not response.will_close:
            log.debug("backend connection closed instead of reused: %s", why_not)
        conn.close()

    def close_all(self) -> None:
        """Close every idle connection (shutdown, tests)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout)
        try:
            conn.connect()
        except socket.timeout:
            conn.close()
            raise UpstreamError(504, "Timed out connecting to %s after %gs"
                                % (self.url, self.connect_timeout)) from None
        except OSError as exc:
            conn.close()
            raise UpstreamError(502, "Cannot connect to %s: %s"
                                % (self.url, _describe_os_error(exc))) from None
        conn.sock.settimeout(self.read_timeout)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn


# A request body up to this size leaves in the same send() as its head (copying it costs less
# than a second poll() and send()).
SEND_JOINED_BELOW = 64 * 1024


def format_request_head(method: str, target: str, headers: List[Tuple[str, str]]) -> bytes:
    """A request line and header lines as bytes, for a backend (HTTP/1.1).

    Only for what read_request_head() checked (method, target, the client's fields) and values
    the proxy makes or validated at start-up: nothing here checks them again.
    """
    lines = ["%s %s HTTP/1.1\r\n" % (method, target)]
    lines.extend(["%s: %s\r\n" % pair for pair in headers])
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def send_to_backend(sock: socket.socket, data: bytes) -> None:
    """sock.sendall(data), without the poll() that a socket with a timeout makes first.

    A request starts on an idle backend connection, so the kernel nearly always takes its
    head at once: one plain write() tries that (the socket is non-blocking underneath its
    timeout), and only what it could not take waits, within the timeout, in sendall(). One
    syscall and one GIL hand-off less per request (strace -c: 6 poll() per keep-alive
    request before, 5 after).
    """
    sent = 0
    if os.name == "posix":                  # elsewhere a socket is no file descriptor
        try:
            sent = os.write(sock.fileno(), data)
        except BlockingIOError:
            sent = 0
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])


def read_response(conn: http.client.HTTPConnection, method: str) -> "UpstreamResponse":
    """The backend's answer on `conn` to a request sent on conn.sock: http.client's
    getresponse() for a request it did not send itself (see Exchange.round_trip).

    As there, a response that ends with the connection's close takes the socket over: `conn`
    is closed (conn.sock None), so the pool never takes it back.
    """
    response = UpstreamResponse(conn.sock, method=method)
    try:
        response.begin()
    except BaseException:
        response.close()
        raise
    if response.will_close:
        conn.close()
    return response


_OBS_FOLD = re.compile(r"[\r\n]+[ \t]*")

# A backend's response is read by http.client, which is lenient where a proxy cannot be: it reads a
# header line whose name holds a space as the end of the head, splits a value at a bare CR,
# accepts "+5" as a Content-Length and " 0x5" as a chunk size, and takes an interim 103 for the
# final answer. Each of those makes the proxy and the client (or the proxy and the backend) see
# different messages in the same bytes, and on a pooled connection one user's answer then reaches
# the next user. So every raw line of the head is checked here (RFC 9112 §4, §5; RFC 9110 §5.5),
# and chunk framing strictly (RFC 9112 §7.1).
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] [1-5][0-9][0-9](?: [^\x00-\x08\x0a-\x1f\x7f]*)?\r?\n\Z")
_BACKEND_CHUNK_SIZE = re.compile(
    rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?\r?\n\Z")
_LINE_LIMIT = 65536          # http.client's own limit on one line (_MAXLINE)
_MAX_FIELD_LINES = 100       # and on the header lines of one head (_MAXHEADERS)
# A chunk the relay may pass on exactly as the backend framed it (read_framed): a size line of
# hex digits only, no extension, no whitespace -- a form every client parses as we do.
_PLAIN_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,8})\r\n")
# Smaller chunks are decoded and joined instead (2 million 1-byte chunks must not reach the
# client as 2 million 6-byte chunks).
FRAMED_CHUNK_MIN = 16


class BadResponseHead(http.client.HTTPException):
    """The backend's response head breaks HTTP/1.1 message syntax; the message says how."""


class _HeadRecorder:
    """Stands in for a response's file while http.client reads the head: keeps every raw line.

    http.client reads a head with readline() only; the lines it parsed are then checked as
    received, before any of it is believed.
    """

    __slots__ = ("raw", "lines", "size")

    def __init__(self, raw) -> None:
        self.raw = raw
        self.lines: List[bytes] = []
        self.size = 0

    def readline(self, limit: int = -1) -> bytes:
        line = self.raw.readline(limit)
        self.size += len(line)
        if self.size > MAX_RESPONSE_HEAD_BYTES:
            raise BadResponseHead("a response head larger than %d bytes" % MAX_RESPONSE_HEAD_BYTES)
        self.lines.append(line)
        return line

    def close(self) -> None:
        self.raw.close()


def _read_field_lines(fp) -> List[bytes]:
    """The raw header lines after a status line, up to the empty line (or the end of the
    stream), with http.client's own limits on their length and number."""
    lines = []
    while True:
        line = fp.readline(_LINE_LIMIT + 1)
        if len(line) > _LINE_LIMIT:
            raise http.client.LineTooLong("header line")
        if len(lines) >= _MAX_FIELD_LINES:      # http.client counts the empty line too
            raise http.client.HTTPException("got more than %d headers" % _MAX_FIELD_LINES)
        if line in (b"\r\n", b"\n", b""):
            return lines
        lines.append(line)


def _header_message(lines: List[bytes]) -> http.client.HTTPMessage:
    """The HTTPMessage http.client's parse_headers() makes of header lines that passed
    response_head_problem(), made without the email parser: the same names and values (the
    value's leading blanks and line end dropped, a folded line kept with its line break)."""
    message = http.client.HTTPMessage()
    name = None
    value = ""
    for line in lines:
        text = line.decode("latin-1")
        if text[:1] in (" ", "\t"):
            value += text                       # obs-fold: response_headers() unfolds it
            continue
        if name is not None:
            message[name] = value.rstrip("\r\n")
        name, _, value = text.partition(":")
        value = value.lstrip(" \t")
    if name is not None:
        message[name] = value.rstrip("\r\n")
    return message


def response_head_problem(lines: List[bytes]) -> Optional[str]:
    """What is wrong with the raw lines of one or more response heads, or None when nothing is.

    Each head is a status line, header lines and an empty line. Names must be tokens, values
    may not hold NUL, CR, LF or other controls but HTAB (RFC 9110 §5.5), and a folded line
    (obs-fold) must continue a field; lines may end in CRLF or a bare LF (http.client splits on LF).
    """
    at_status = True
    first_field = False
    for line in lines:
        if at_status:
            if not _STATUS_LINE.match(line):
                return "a malformed status line"
            at_status, first_field = False, True
            continue
        if line in (b"\r\n", b"\n"):
            at_status = True
            continue
        if not line.endswith(b"\n"):
            return "a response head cut short"
        text = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if text[:1] in (b" ", b"\t"):
            if first_field or not text.strip(b" \t"):
                return "a malformed folded header line"
            value = text
        else:
            name, colon, value = text.partition(b":")
            if not colon or not _TOKEN.match(name):
                return "a malformed header line"
        if _BAD_FIELD_VALUE.search(value):
            return "a control character in a header value"
        first_field = False
    if not at_status:
        return "a response head cut short"
    return None


# os.readv() on a socket's file descriptor: POSIX (Windows sockets are no file descriptors).
_READ_FIRST = hasattr(os, "readv") and os.name == "posix"


class _ReadFirst(io.RawIOBase):
    """The raw stream under an UpstreamResponse's read buffer: it reads the socket at once when
    bytes are known or likely to be there, and waits (in the socket's own recv_into(), within
    its timeout) only when they are not.

    Why: a Python socket with a timeout polls before every recv() (CPython's sock_call), also
    right after wait_for_answer() saw the answer arrive; and the late-bytes check at the end of
    each response toggled the timeout off and on around one read (two ioctl calls). Here the
    first read of a response and any read after one that filled the buffer try the socket
    first (the file descriptor is non-blocking underneath the timeout); the late-bytes check
    reads nothing (``nowait``: only the buffer is looked at; see _bytes_waiting). strace -c
    per keep-alive request: 13 syscalls before, 8 after (the bare shape makes 10). A read that
    finds nothing falls back to the socket's own recv_into(), so timeouts and errors are what
    they were.
    """

    def __init__(self, socket_io, sock: socket.socket) -> None:
        super().__init__()
        self._io = socket_io                # kept for close(): it holds the socket open
        self._fd = sock.fileno()
        self._recv_into = sock.recv_into
        self.ready = True       # the response is read once wait_for_answer() saw bytes arrive
        self.nowait = False     # return None, read nothing (peek() then gives the buffer's)

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def readinto(self, buffer) -> Optional[int]:
        if self.nowait:
            return None
        if self.ready:
            try:
                count = os.readv(self._fd, (buffer,))
            except BlockingIOError:
                pass
            else:
                self.ready = count == len(buffer)       # a full read: more is likely waiting
                return count
        # SocketIO.readinto() without its frame and checks: polls, then reads, within the
        # socket's timeout (one Python call less per SSE event).
        try:
            count = self._recv_into(buffer)
        except BlockingIOError:
            return None                     # made non-blocking (a WebSocket's 101): not yet
        self.ready = count == len(buffer)
        return count

    def close(self) -> None:
        if not self.closed:
            self._io.close()    # SocketIO: releases its hold on the socket
        super().close()


def _bytes_waiting(fp, sock) -> bool:
    """True when a response's buffer (or, without _ReadFirst, its socket) holds bytes now,
    without waiting for any. An error means the connection cannot be trusted either: True.

    Without _ReadFirst (Windows, a test's stand-in socket) the socket is made non-blocking for
    one read, so peek() can only return what is there.

    Under _ReadFirst only the buffer is looked at, without a syscall: bytes in the socket
    stay there while the connection is idle, and UpstreamPool.acquire() polls every pooled
    connection before it is used again and drops it when anything is there. Reading the
    socket here too cost a syscall per request and caught nothing that check does not.
    """
    raw = getattr(fp, "raw", None)
    if type(raw) is _ReadFirst:
        raw.nowait = True                   # the buffer only: see above
        try:
            return bool(fp.peek(1))
        except (OSError, ValueError):
            return True
        finally:
            raw.nowait = False
    try:
        timeout = sock.gettimeout()
        sock.settimeout(0)
        try:
            return bool(fp.peek(1))
        finally:
            sock.settimeout(timeout)
    except (OSError, ValueError):
        return True


class UpstreamResponse(http.client.HTTPResponse):
    """http.client's response, made strict where leniency would let two exchanges mix.

    - Interim answers (1xx but 101) are read past and dropped, up to the final status. They
      are not forwarded: the clients of an LLM API have no use for them (browsers act on 103
      Early Hints only over HTTP/2), and Python's http.client -- under urllib and requests --
      would take a 103 for the final answer. A 101 is returned as it is: the caller decides.
    - Every raw line of the head is checked (response_head_problem): BadResponseHead if bad.
    - Chunk-size lines must be hex digits, and chunk data must end in CRLF.
    - Bytes found waiting when the response ends (`overran`) mean the backend and we disagree
      about where it ended: the connection is then not reused (see reusable()).
    """

    def __init__(self, sock, *args, **kwargs) -> None:
        super().__init__(sock, *args, **kwargs)
        if _READ_FIRST and isinstance(sock, socket.socket) \
                and not isinstance(sock, ssl.SSLSocket) and sock.gettimeout():
            # (A socket with a timeout: its file descriptor is non-blocking underneath, so a
            # read that finds nothing returns at once. readTimeout is always positive. Not a
            # TLS socket: os.readv() on its descriptor would read the records undecrypted.)
            self.fp = io.BufferedReader(_ReadFirst(self.fp.detach(), sock))
        self._upstream_sock = sock
        self._poller = None
        self.overran = False

    def begin(self) -> None:
        # http.client's begin(), except that the head is checked as received before any of it
        # is believed, and that its fields are taken from those checked lines directly instead
        # of through the email package's parser (parse_headers() was 7% of a keep-alive
        # request's CPU under py-spy --gil): response_head_problem() has already made sure
        # that every line is a "name: value" field or a fold of one.
        if self.headers is not None:
            return
        recorder = _HeadRecorder(self.fp)
        self.fp = recorder
        try:
            version, status, reason = self._read_status()
            fields = _read_field_lines(recorder)
        finally:
            if self.fp is recorder:         # else http.client closed it (a bad status line)
                self.fp = recorder.raw
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        problem = response_head_problem(recorder.lines)
        if problem:
            raise BadResponseHead(problem)
        self.headers = self.msg = _header_message(fields)
        # From here on as http.client decides framing and persistence (Python 3.9 to 3.13).
        coding = self.msg.get("transfer-encoding")
        if coding and coding.lower() == "chunked":
            self.chunked = True
            self.chunk_left = None
        else:
            self.chunked = False
        self.will_close = self._check_close()
        self.length = None
        length = self.msg.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length)
            except ValueError:
                self.length = None
            else:
                if self.length < 0:
                    self.length = None
        if status in (204, 304) or 100 <= status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True

    def _read_status(self):
        for _ in range(MAX_INTERIM_RESPONSES + 1):
            version, status, reason = super()._read_status()
            if not 100 <= status < 200 or status == 101:
                return version, status, reason
            self._skip_interim_fields()
            log.debug("dropped an interim %d answer from the backend", status)
        raise BadResponseHead("more than %d interim (1xx) answers" % MAX_INTERIM_RESPONSES)

    def _skip_interim_fields(self) -> None:
        while True:
            line = self.fp.readline(_LINE_LIMIT + 1)
            if line in (b"\r\n", b"\n"):
                return
            if not line.endswith(b"\n"):
                raise BadResponseHead("an interim (1xx) answer cut short")

    def _get_chunk_left(self):
        # http.client's own version, except that the CRLF after chunk data is checked instead of
        # skipped, and the size line is parsed strictly: int(line, 16) takes " +0x5_0".
        chunk_left = self.chunk_left
        if not chunk_left:
            if chunk_left is not None and self._safe_read(2) != b"\r\n":
                raise http.client.IncompleteRead(b"")
            line = self.fp.readline(_LINE_LIMIT + 1)
            match = _BACKEND_CHUNK_SIZE.match(line)
            if not match:
                self._close_conn()
                raise http.client.IncompleteRead(b"")
            chunk_left = int(match.group(1), 16)
            if chunk_left == 0:
                self._read_and_discard_trailer()
                self._close_conn()
                chunk_left = None
            self.chunk_left = chunk_left
        return chunk_left

    def _close_conn(self) -> None:
        fp = self.fp
        if fp is not None and not self.will_close and not self.overran:
            self.overran = _bytes_waiting(fp, self._upstream_sock)
        super()._close_conn()

    def read_ready(self, limit: int) -> bytes:
        """Up to `limit` bytes of the body that have already arrived; b"" if none. Never waits.

        http.client's read1() returns one chunk per call, and a stream of tiny chunks then costs a
        call (and a write) per byte. Here the chunks already in the read buffer are decoded in
        one go. The socket is polled first, so peek() reads only what is there; the buffer's
        content is decoded only as far as it holds whole size lines (the last chunk is left to
        read1(), which also reads the trailer).
        """
        fp = self.fp
        if fp is None or limit <= 0 or not self._socket_readable():
            return b""
        try:
            ahead = fp.peek(1)
        except (OSError, ValueError):
            return b""                       # the next read1() reports it
        if not ahead:
            return b""
        if not self.chunked:
            return self.read1(min(limit, len(ahead)))
        return self._dechunk_buffered(ahead, limit)

    def read_framed(self, limit: int) -> Optional[Tuple[bytes, bytes]]:
        """The whole chunks that have arrived, as the backend framed them, and their data.

        Returns (wire, data): ``wire`` is one or more complete chunks (size line, data, CRLF) to
        send to an HTTP/1.1 client unchanged, ``data`` what they carry (for the usage tap and
        the byte count). None when the next bytes are not such chunks -- not all here yet, a
        size line in another form, a small chunk, the last chunk -- and read1() must take
        them (with all its checks). Waits, like read1(), only for the first byte.

        Why: decoding every chunk in http.client and encoding it again cost more per SSE
        event than anything else the relay does (issue 16); passed on, an event costs one
        peek, one match and one buffered read.
        """
        fp = self.fp
        left = self.chunk_left
        if fp is None or left:
            return None
        ahead = fp.peek(1)           # what one recv brought; waits only when nothing is here
        pos = 0
        if left == 0:                # the CRLF that ends the chunk read1() returned last
            if ahead[:2] != b"\r\n":
                return None          # read1() reports it
            if len(ahead) > 2:
                pos = 2
            else:
                fp.read(2)
                self.chunk_left = None
                ahead = fp.peek(1)
        start = pos
        data = []
        size = 0
        while size < limit and pos < len(ahead):
            match = _PLAIN_CHUNK_SIZE.match(ahead, pos)
            if match is None:
                break
            length = int(match.group(1), 16)
            begin = match.end()
            end = begin + length
            if length < FRAMED_CHUNK_MIN or ahead[end:end + 2] != b"\r\n":
                break                # small, the last chunk, or its end not here yet
            data.append(ahead[begin:end])
            size += length
            pos = end + 2
        if not data:
            return None
        wire = fp.read(pos)          # all in the buffer: no wait
        if start:
            wire = wire[start:]
        self.chunk_left = None
        return wire, data[0] if len(data) == 1 else b"".join(data)

    def _socket_readable(self) -> bool:
        # One poll object per response: making one per check costs more than the check.
        poller = self._poller
        if poller is None:
            if not hasattr(select, "poll"):
                return bool(_ready([self._upstream_sock], 0))
            poller = self._poller = select.poll()
            poller.register(self._upstream_sock, select.POLLIN)
        return bool(poller.poll(0))

    def _dechunk_buffered(self, ahead: bytes, limit: int) -> bytes:
        out = []
        size = pos = 0
        left = self.chunk_left               # None: a size line is next; 0: CRLF, then one
        while size < limit:
            if left:
                take = min(left, len(ahead) - pos, limit - size)
                if take <= 0:
                    break
                out.append(ahead[pos:pos + take])
                pos, left, size = pos + take, left - take, size + take
                continue
            line = pos + 2 if left == 0 else pos
            if left == 0 and ahead[pos:line] != b"\r\n":
                break
            end = ahead.find(b"\n", line) + 1
            if not end or end >= len(ahead):
                break                        # the size line or the data is not all here yet
            match = _BACKEND_CHUNK_SIZE.match(ahead, line, end)
            following = int(match.group(1), 16) if match else 0
            if not following:
                break                        # malformed, or the last chunk: read1() reports it
            left, pos = following, end
        if pos:
            self.fp.read(pos)                # all in the buffer: no wait
            self.chunk_left = left
        return b"".join(out)

    def announced_body_unread(self) -> bool:
        """True for an answer without a body (HEAD, 204, 304) whose head announced one.

        A buggy backend may still send that body, perhaps only once the next request arrives:
        no check for waiting bytes can see it coming, so such a connection is not reused.
        """
        if not (self._method == "HEAD" or self.status in (204, 304)):
            return False
        return bool(self.chunked) or any(v.strip(" \t") not in ("", "0") for v in
                                         self.msg.get_all("content-length") or ())

    def why_not_reusable(self) -> Optional[str]:
        """Why the connection of this (ended) response must not carry another exchange, or None."""
        if self.will_close:
            return "the backend closes it"
        if self.overran:
            return "the backend sent bytes past the end of its response"
        if self.announced_body_unread():
            return "a body the head announced may still follow"
        if self.chunked and self.msg.get("content-length") is not None:
            return "Content-Length beside Transfer-Encoding (RFC 9112 §6.1)"
        return None

    def reusable(self) -> bool:
        """Whether the exchange ended cleanly at a known boundary, so the connection may be reused."""
        return self.why_not_reusable() is None


def framing_problem(response) -> Optional[str]:
    """What makes the end of a response's body unknowable, or None (RFC 9112 §6.3).

    Content-Length must be digits (int() also takes "+5", "0_5" and Unicode digits), every
    value the same (RFC 9110 §8.6); Transfer-Encoding must be exactly chunked, as http.client
    read it. On any of these a proxy MUST answer 502 and close the connection to the server.
    """
    values = {v.strip(" \t") for item in response.msg.get_all("content-length") or ()
              for v in item.split(",")}
    if any(not (v.isascii() and v.isdigit()) or len(v) > 18 for v in values):
        return "sent a Content-Length that is not a number"
    if len(values) > 1:
        return "sent conflicting Content-Length headers"
    codings = response.msg.get_all("transfer-encoding")
    if codings:
        tokens = [t.strip(" \t").lower() for v in codings for t in v.split(",")]
        if tokens != ["chunked"] or not response.chunked:
            return "sent a Transfer-Encoding other than chunked"
    return None


def _ready(socks, timeout: Optional[float], writing: bool = False) -> list:
    """The sockets among `socks` that are readable (or closed) -- or, ``writing``, writable --
    within `timeout` seconds (None: as long as it takes).

    poll() where the platform has it: select() raises ValueError for a file descriptor past
    FD_SETSIZE (1024), which a proxy with a few hundred connections and their backend
    connections reaches.
    """
    if hasattr(select, "poll"):
        poller = select.poll()
        event = select.POLLOUT if writing else select.POLLIN
        for sock in socks:
            poller.register(sock, event)
        # POLLHUP/POLLERR count too.
        ready = {fd for fd, _ in poller.poll(None if timeout is None else timeout * 1000.0)}
        return [sock for sock in socks if sock.fileno() in ready]
    if writing:
        return select.select([], socks, [], timeout)[1]
    return select.select(socks, [], [], timeout)[0]


def _socket_is_quiet(sock) -> bool:
    if sock is None:
        return False
    try:
        return not _ready([sock], 0)
    except (OSError, ValueError):
        return False


def _peer_closed(sock) -> bool:
    """True when a readable client socket holds no data but the end of the stream.

    Peeks at the raw TCP bytes (socket.socket.recv bypasses the TLS layer, which refuses
    MSG_PEEK), so nothing is consumed.
    """
    try:
        return socket.socket.recv(sock, 1, socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _describe_os_error(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return "host name not found"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the backend"
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "no route to host"
    return exc.strerror or str(exc) or type(exc).__name__


# ==================================================================================================
# Access keys: who may have requests forwarded, and within which budget
# ==================================================================================================

# Request headers that carry a client's key; never forwarded while keys are checked or a
# target.apiKey replaces them.
CREDENTIAL_HEADERS = ("authorization", "x-api-key")
# Browsers cannot set headers on a WebSocket, so the OpenAI Realtime API's browser form carries
# the key as a Sec-WebSocket-Protocol token: "openai-insecure-api-key.<key>".
WEBSOCKET_KEY_PROTOCOL = "openai-insecure-api-key."
RATE_WINDOW_SECONDS = 60.0


class KeyRing:
    """The access keys in force and the backend's key: immutable, so SIGHUP swaps the whole
    object in one assignment and a request in progress keeps the table it started with.

    Keys are compared as SHA-256 digests with hmac.compare_digest against every known key, so
    the time taken says nothing about how much of a guess was right, nor which key matched.
    """

    def __init__(self, keys: Sequence[AccessKey] = (), backend_key: str = "") -> None:
        self.keys = tuple(keys)
        self.backend_key = backend_key
        self._digests = tuple((hashlib.sha256(k.key.encode("latin-1")).digest(), k)
                              for k in self.keys)

    @property
    def required(self) -> bool:
        """True when requests must carry one of the keys (access.keys is not empty)."""
        return bool(self.keys)

    @property
    def replaces_credentials(self) -> bool:
        """True when the client's Authorization / x-api-key must not reach the backend."""
        return bool(self.keys) or bool(self.backend_key)

    def identify(self, credential: str) -> Optional[AccessKey]:
        """The AccessKey whose secret is `credential`, or None. Constant time per key."""
        digest = hashlib.sha256(credential.encode("latin-1", "replace")).digest()
        found = None
        for known, key in self._digests:
            if hmac.compare_digest(digest, known) and found is None:
                found = key
        return found


def request_credentials(head: "RequestHead") -> List[str]:
    """The keys a request presents: "Authorization: Bearer <key>" (any case of the scheme;
    OpenAI SDKs and most apps) and "x-api-key: <key>" (Anthropic SDKs), in that order.

    The one place that knows where clients put keys; a WebSocket handshake from a browser may
    also carry one as a subprotocol, "Sec-WebSocket-Protocol: openai-insecure-api-key.<key>".
    """
    found = []
    for value in head.get_all("authorization"):
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            found.append(token.strip())
    found.extend(v.strip() for v in head.get_all("x-api-key") if v.strip())
    found.extend(token[len(WEBSOCKET_KEY_PROTOCOL):] for token in websocket_protocols(head)
                 if token.startswith(WEBSOCKET_KEY_PROTOCOL) and token != WEBSOCKET_KEY_PROTOCOL)
    return found


def websocket_protocols(head: "RequestHead") -> List[str]:
    """The subprotocols a WebSocket handshake offers (Sec-WebSocket-Protocol), in order."""
    return [token.strip() for value in head.get_all("sec-websocket-protocol")
            for token in value.split(",") if token.strip()]


def authenticate(keyring: KeyRing, head: "RequestHead") -> Optional[AccessKey]:
    """The credential check: the AccessKey a request proves it holds, or None.

    Looks at a few credentials at most, so a request with a hundred key headers is not a
    hundred guesses.
    """
    for credential in request_credentials(head)[:4]:
        key = keyring.identify(credential)
        if key is not None:
            return key
    return None


class RateLimiter:
    """requestsPerMinute: at most N requests of a key start in any 60 seconds (a sliding log
    of start times per key name, so it survives a SIGHUP; it is not persisted)."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._starts: Dict[str, collections.deque] = {}

    def admit(self, name: str, limit: int) -> float:
        """0.0 and the request counts, or the seconds until a slot frees up (nothing counted)."""
        now = self._clock()
        with self._lock:
            starts = self._starts.setdefault(name, collections.deque())
            while starts and starts[0] <= now - RATE_WINDOW_SECONDS:
                starts.popleft()
            if len(starts) >= limit:
                return max(0.001, starts[0] + RATE_WINDOW_SECONDS - now)
            starts.append(now)
            return 0.0


class Refusal(NamedTuple):
    """Why a request is not forwarded: status, message, error type and extra headers."""

    status: int
    message: str
    error_type: str
    headers: Tuple[Tuple[str, str], ...] = ()


def access_refusal(key: Optional[AccessKey], stats, limiter: RateLimiter) -> Optional[Refusal]:
    """None when a request with `key` may be forwarded now (a rate slot is then taken), else
    the 401 (no valid key) or 429 (a budget is used up) to answer with.

    The daily budget is checked before a request starts: one already running when it runs out
    finishes, so a key can overshoot by the requests it had in flight at that moment.
    """
    if key is None:
        return Refusal(401, "this proxy needs an access key: send 'Authorization: Bearer <key>' "
                            "or 'x-api-key: <key>' (a missing or unknown key)",
                       "authentication_error", (("WWW-Authenticate", 'Bearer realm="llm-proxy"'),))
    if key.daily_tokens:
        used, seconds_left = stats.key_tokens_today(key.name)
        if used >= key.daily_tokens:
            # Hours away: tell the SDKs not to retry (they honour x-should-retry).
            return Refusal(429, "access key '%s' has used its daily budget of %d tokens (%d "
                                "today); it renews at midnight, proxy time"
                           % (key.name, key.daily_tokens, used), "rate_limit_error",
                           (("Retry-After", str(max(1, int(math.ceil(seconds_left))))),
                            ("x-should-retry", "false")))
    if key.requests_per_minute:
        wait = limiter.admit(key.name, key.requests_per_minute)
        if wait:
            return Refusal(429, "access key '%s' is limited to %d requests per minute"
                           % (key.name, key.requests_per_minute), "rate_limit_error",
                           (("Retry-After", str(max(1, int(math.ceil(wait))))),))
    return None


# ==================================================================================================
# HTTP layer, part 3: the request handler (internal routes, CORS, the forwarding pipeline)
# ==================================================================================================

class ProxyHandler(BaseHTTPRequestHandler):
    """One client connection: reads requests, answers /_proxy/* and preflights, forwards the rest.

    The stock request parsing of BaseHTTPRequestHandler is replaced by read_request_head() (lean and
    strict); responses are written as one buffer per head and straight through for bodies.
    """

    protocol_version = "HTTP/1.1"
    server_version = "llm-proxy/" + VERSION
    disable_nagle_algorithm = True   # every SSE event must leave at once
    wbufsize = 0                     # writes go straight to the socket
    rbufsize = 65536

    # -- the per-connection loop -------------------------------------------------------------------

    def __init__(self, request, client_address, server,
                 slot: Optional["ClientSlot"] = None) -> None:
        # The connection slot this client holds (see ClientSlots); a reserve slot serves one
        # health check under a short deadline.
        self.slot = slot
        self.admin_route = False
        self.linger = False          # half-close and drain before closing (see _lingering_close)
        super().__init__(request, client_address, server)

    @property
    def on_reserve(self) -> bool:
        """True when this connection holds one of the slots kept back for /_proxy/health."""
        return self.slot is not None and self.slot.reserve

    @property
    def client_timeout(self) -> float:
        """clientTimeout, shortened for a connection on a reserve slot."""
        timeout = self.server.config.client_timeout
        return min(timeout, RESERVE_CLIENT_TIMEOUT) if self.on_reserve else timeout

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.client_timeout)
        # clientTimeout must bound the whole wait for a request head, not each recv(): a client
        # trickling one byte per (clientTimeout - 1) s would otherwise hold a thread for hours.
        self.rfile.close()
        self.head_reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.head_reader, self.rbufsize)

    def handle_one_request(self) -> None:
        self.close_connection = True
        self.head = None
        self.admin_route = False
        # Set once a forwarded request's Exchange owns the log line (finish() writes it), so a
        # proxy-made error on that request is not logged a second time by send_local.
        self.exchange_logs = False
        self.head_reader.start_head(self.client_timeout)
        try:
            head = read_request_head(self.rfile)
        except RequestError as exc:
            self.send_proxy_error(exc.status, exc.message, "invalid_request", close=True)
            return
        except (ClientGone, OSError):
            return
        finally:
            # A body, if any, must keep coming: clientTimeout per read is not enough on its own.
            self.head_reader.start_body(self.client_timeout, BODY_MIN_RATE)
        if head is None:
            return
        self.head = head
        self.close_connection = not self._client_keeps_alive(head)
        try:
            if self.on_reserve and not self._answer_on_reserve(head):
                return
            self.route(head)
        except RequestError as exc:
            self.send_proxy_error(exc.status, exc.message, "invalid_request", close=True)
            # The client may still be sending its body (a 408, 413 or a bad chunk): close
            # gently, or the reset of an abrupt close can destroy this answer on its way.
            self.linger = True
        except (ClientGone, OSError):
            self.close_connection = True

    def _answer_on_reserve(self, head: RequestHead) -> bool:
        """On a reserve slot only /_proxy/health is served, once; anything else gets 503.

        The path is only known once the head is read, so the reserve is handed out first and
        kept short: RESERVE_CLIENT_TIMEOUT for handshake and head, one request, then close.
        """
        self.close_connection = True
        # No body either: a trickled one would hold the reserve slot for minutes.
        if (head.target.split("?", 1)[0].rstrip("/") == "/_proxy/health"
                and request_body_length(head) is None):
            return True
        self.send_json(503, {"type": "error", "error": {
            "type": "overloaded", "message": "the proxy is serving proxy.maxConnections "
                                             "connections; try again shortly"}},
                       [("Retry-After", "5")])
        self.linger = True            # a body may follow the head: let the 503 arrive
        return False

    def _client_keeps_alive(self, head: RequestHead) -> bool:
        tokens = head.connection_tokens()
        if head.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    def route(self, head: RequestHead) -> None:
        """Decide where one request goes: refused, internal, preflight, or forwarded."""
        hosts = head.get_all("host")
        if len(hosts) > 1 or (not hosts and head.version == "HTTP/1.1"):
            # RFC 9112 §3.2: MUST answer 400. Two Hosts would also leave the admin endpoints'
            # same-origin check and X-Forwarded-Host to pick one of two client-chosen values.
            raise RequestError(400, "an HTTP/1.1 request needs exactly one Host header")
        if head.method == "CONNECT":
            raise RequestError(405, "CONNECT is not supported: this proxy forwards to one backend only")
        if not head.target.startswith("/"):
            if head.target == "*" and head.method == "OPTIONS":
                self.send_local(204, b"", extra=[("Allow", CORS_ALLOW_METHODS)])
                return
            raise RequestError(400, "only origin-form request targets (/path) are accepted; "
                                    "this proxy is not an open relay")
        body_length = request_body_length(head)
        path = head.target.split("?", 1)[0]
        if path == "/_proxy" or path.startswith("/_proxy/"):
            self.discard_body(head, body_length)
            self.handle_internal(head, path)
        elif (head.method == "OPTIONS" and head.get("origin")
              and head.get("access-control-request-method")):
            self.discard_body(head, body_length)
            self.answer_preflight(head)
        else:
            self.forward(head, path, body_length)

    # -- writing responses -------------------------------------------------------------------------

    def write_head(self, status: int, reason: str, headers: List[Tuple[str, str]]) -> None:
        """Send a status line and headers in one write."""
        self.wfile.write(self.format_head(status, reason, headers))

    def format_head(self, status: int, reason: str, headers: List[Tuple[str, str]]) -> bytes:
        """The status line and headers as bytes (with Connection: close when closing)."""
        lines = ["HTTP/1.1 %d %s\r\n" % (status, reason)]
        lines.extend("%s: %s\r\n" % pair for pair in headers)
        if self.close_connection:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def send_local(self, status: int, body: bytes, content_type: str = "",
                   extra: List[Tuple[str, str]] = (), close: bool = False,
                   expose: Sequence[str] = ()) -> None:
        """Answer a request ourselves with a complete body (`expose`: header names a page
        from another origin may read, e.g. Retry-After)."""
        if close:
            self.close_connection = True
        headers = []
        if content_type:
            headers.append(("Content-Type", content_type))
        headers.append(("Content-Length", str(len(body))))
        headers.extend(extra)
        if not any(name.lower() == "x-content-type-options" for name, _ in extra):
            # Stats, errors and metrics echo client-chosen paths and model names: a browser
            # must never sniff them into HTML.
            headers.append(("X-Content-Type-Options", "nosniff"))
        headers.extend(self.cors_response_headers(expose))
        self.write_head(status, http.client.responses.get(status, "Unknown"), headers)
        if body and not (self.head is not None and self.head.method == "HEAD"):
            self.wfile.write(body)
        self._log_local(status, len(body))

    def send_json(self, status: int, payload, extra: List[Tuple[str, str]] = ()) -> None:
        """Answer with a JSON document (never cached: stats change every request)."""
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        self.send_local(status, body, "application/json",
                        [("Cache-Control", "no-store")] + list(extra),
                        expose=[name for name, _ in extra])

    def send_proxy_error(self, status: int, message: str, error_type: str = "proxy_error",
                         close: bool = False, extra: Sequence[Tuple[str, str]] = ()) -> None:
        """The one error path for proxy-made errors: a JSON body both official SDKs parse.

        OpenAI's SDK reads error.message, Anthropic's reads type/error.type/error.message.
        """
        payload = {"type": "error", "error": {"type": error_type, "message": message}}
        if close:
            self.close_connection = True
        try:
            self.send_json(status, payload, list(extra))
        except OSError:
            self.close_connection = True

    def send_error(self, code: int, message: Optional[str] = None,
                   explain: Optional[str] = None) -> None:
        """BaseHTTPRequestHandler's error call, answered the proxy's way (send_proxy_error).

        CPython's version writes an HTML page through send_response()/end_headers(), which need
        the requestline/command/headers that read_request_head() (replacing the stock parsing)
        never sets, so it raised AttributeError. Here, as in CPython, `message` defaults to the
        reason phrase, `explain` is added to it, the connection closes (the request's body may
        be unread) and 1xx/204/205/304 carry no body; the body is the JSON both SDKs parse.
        """
        text = message or http.client.responses.get(code, "Error")
        if explain:
            text = "%s: %s" % (text, explain)
        if code < 200 or code in (204, 205, 304):
            self.send_local(code, b"", close=True)
            return
        self.send_proxy_error(code, text, "invalid_request" if code < 500 else "proxy_error",
                              close=True)

    def _log_local(self, status: int, size: int) -> None:
        head = self.head
        if head is None or getattr(self, "exchange_logs", False):
            return
        path = head.target.split("?", 1)[0]
        # The dashboard polls its JSON every few seconds per open tab (~720 lines an hour onto a
        # Raspberry Pi's SD card): successful reads of the proxy's own endpoints are DEBUG.
        level = logging.DEBUG if (status < 400 and head.method in ("GET", "HEAD")
                                  and path.startswith("/_proxy/")) else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "%s %s %s %d %dB", self.client_ip, head.method, path, status, size)

    def log_message(self, format, *args) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        log.debug("%s %s", self.client_ip, format % args)

    @property
    def client_ip(self) -> str:
        """The client's address, with IPv4-mapped IPv6 addresses shown as plain IPv4."""
        return client_ip(self.client_address[0])

    def discard_body(self, head: RequestHead, body_length: Optional[int]) -> None:
        """Read and drop a body we do not forward, so the connection can carry the next request."""
        if body_length is None:
            return
        if body_length > INTERNAL_BODY_LIMIT:
            raise RequestError(413, "request body too large for this endpoint")
        self.expect_continue(head)
        pieces = iter_chunked_body(self.rfile) if body_length < 0 else \
            iter_fixed_body(self.rfile, body_length)
        seen = 0
        for data in pieces:
            seen += len(data)
            if seen > INTERNAL_BODY_LIMIT:
                raise RequestError(413, "request body too large for this endpoint")

    def expect_continue(self, head: RequestHead) -> None:
        """Answer "Expect: 100-continue" ourselves (curl sends it for bodies over 1 MiB)."""
        if head.version == "HTTP/1.1" and (head.get("expect") or "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- CORS --------------------------------------------------------------------------------------

    def allowed_origin(self) -> Optional[str]:
        """The request's Origin when it may read our responses, else None."""
        origin = self.head.get("origin") if self.head is not None else None
        if origin and self.server.config.origin_allowed(origin):
            return origin
        return None

    def cors_response_headers(self, response_header_names) -> List[Tuple[str, str]]:
        """CORS headers for an actual (non-preflight) response: the allow headers for an allowed
        origin (never on admin routes), and Vary: Origin always.

        Vary goes on every answer, with or without Origin: the answer differs by Origin, and a
        cache that stored the one without Origin must not serve it to a page (or vice versa).
        """
        origin = None if self.admin_route else self.allowed_origin()
        if origin is None:
            return [("Vary", "Origin")]
        headers = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        exposed = sorted({name for name in response_header_names
                          if name.lower() not in CORS_SAFELISTED_RESPONSE_HEADERS})
        if exposed:
            headers.append(("Access-Control-Expose-Headers", ", ".join(exposed)))
        return headers

    def answer_preflight(self, head: RequestHead) -> None:
        """Answer a CORS preflight ourselves; it is never forwarded.

        The requested headers are reflected because "Access-Control-Allow-Headers: *" does not
        cover Authorization (Fetch standard), which both SDKs send.
        """
        origin = head.get("origin")
        if not self.server.config.origin_allowed(origin):
            # Answered like an allowed preflight on purpose: a failed preflight gives the web app
            # only an opaque "Failed to fetch", while the actual request then gets a 403 that it
            # can read (see forward()). Nothing from this origin is ever forwarded.
            self.server.note_refused_origin(origin)
        headers = [
            ("Access-Control-Allow-Origin", origin),
            ("Access-Control-Allow-Methods", CORS_ALLOW_METHODS),
            ("Access-Control-Max-Age", CORS_MAX_AGE),
            ("Vary", "Origin, Access-Control-Request-Method, Access-Control-Request-Headers, "
                     "Access-Control-Request-Private-Network"),
            ("Content-Length", "0"),
        ]
        requested = head.get("access-control-request-headers", "")
        names = [n.strip() for n in requested.split(",") if n.strip()]
        if names and all(_TOKEN.match(n.encode("latin-1")) for n in names):
            headers.append(("Access-Control-Allow-Headers", ", ".join(names)))
        # Chrome's Private Network Access: a public HTTPS page calling a LAN address asks first.
        if (head.get("access-control-request-private-network") or "").lower() == "true":
            headers.append(("Access-Control-Allow-Private-Network", "true"))
        self.write_head(204, "No Content", headers)
        self._log_local(204, 0)

    # -- internal routes: /_proxy/* ----------------------------------------------------------------

    # Method sets and handler names of the internal routes (paths without a trailing slash).
    INTERNAL_ROUTES = {
        "/_proxy": (("GET", "HEAD"), "serve_setup_page"),
        "/_proxy/dashboard": (("GET", "HEAD"), "serve_dashboard"),
        "/_proxy/stats": (("GET", "HEAD"), "serve_stats"),
        "/_proxy/reset": (("POST",), "serve_reset"),
        "/_proxy/health": (("GET", "HEAD"), "serve_health"),
        "/_proxy/metrics": (("GET", "HEAD"), "serve_metrics"),
        "/_proxy/ca.pem": (("GET", "HEAD"), "serve_ca_pem"),
        "/_proxy/ca.crt": (("GET", "HEAD"), "serve_ca_der"),
    }
    # Routes for the proxy's owner: never CORS-readable by other sites, and behind proxy.adminToken
    # when set (the dashboard page itself holds no data; it asks for the token to read stats).
    ADMIN_HANDLERS = ("serve_stats", "serve_metrics", "serve_reset", "serve_dashboard")

    def handle_internal(self, head: RequestHead, path: str) -> None:
        """Serve the proxy's own endpoints; never forwarded."""
        route = self.INTERNAL_ROUTES.get(path.rstrip("/") or "/_proxy")
        if route is None:
            self.send_proxy_error(404, "no such proxy endpoint: %s" % path, "not_found")
            return
        methods, handler_name = route
        # Stats, metrics and reset are for the proxy's owner: no CORS for any other site's page.
        self.admin_route = handler_name in self.ADMIN_HANDLERS
        if head.method not in methods:
            self.send_proxy_error(405, "%s allows %s" % (path, ", ".join(methods)),
                                  "method_not_allowed")
            return
        getattr(self, handler_name)()

    def serve_stats(self) -> None:
        if not self.refused_as_admin():
            self.send_json(200, self.server.stats.snapshot(keys=self.server.keys.keys))

    def refused_as_admin(self) -> bool:
        """Answer 401/403 and return True when admin_refusal() refuses this request."""
        refusal = self.admin_refusal()
        if refusal:
            self.send_proxy_error(refusal[0], refusal[1],
                                  "authentication_error" if refusal[0] == 401 else "forbidden")
            return True
        return False

    def serve_reset(self) -> None:
        if self.refused_as_admin():
            return
        self.server.stats.reset()
        log.info("stats reset by %s", self.client_ip)
        self.send_json(200, {"ok": True})

    def admin_refusal(self) -> Optional[Tuple[int, str]]:
        """Why an admin request (stats, metrics, reset) is refused, or None when allowed.

        Another website open in the user's browser must neither drive nor read them: a browser
        sends Origin on every cross-site POST and CORS read, so any Origin but our own is
        refused. With proxy.adminToken set, "Authorization: Bearer <token>" is required too.
        """
        origin = self.head.get("origin")
        if origin is not None and origin.lower() != "https://" + (self.head.get("host") or "").lower():
            return 403, "admin endpoints refuse cross-origin requests (Origin %s)" % origin
        token = self.server.config.admin_token
        if token and not bearer_token_matches(self.head.get("authorization") or "", token):
            return 401, "this endpoint needs 'Authorization: Bearer <proxy.adminToken>'"
        return None

    def serve_health(self) -> None:
        self.send_json(200, self.server.health())

    def serve_metrics(self) -> None:
        if self.refused_as_admin():
            return
        body = render_metrics(self.server.stats).encode("utf-8")
        self.send_local(200, body, METRICS_CONTENT_TYPE, [("Cache-Control", "no-store")])

    def serve_dashboard(self) -> None:
        self.send_page(DASHBOARD_HTML)

    def serve_setup_page(self) -> None:
        self.send_page(SETUP_HTML)

    def send_page(self, html: str) -> None:
        """Serve an embedded page with its Content-Security-Policy (see page_headers)."""
        self.send_local(200, html.encode("utf-8"), extra=list(page_headers(html)))

    def serve_ca_pem(self) -> None:
        self.send_ca(der=False)

    def serve_ca_der(self) -> None:
        self.send_ca(der=True)

    def send_ca(self, der: bool) -> None:
        """Serve the CA certificate (never its key) for devices to install."""
        ca_file = os.path.join(os.path.dirname(self.server.config.cert_file), "ca.pem")
        try:
            # Devices install what this hands out: never a CA another local user could plant.
            check_trusted_file(ca_file, "CA certificate")
        except CertificateError as exc:
            log.error("not serving the CA: %s", exc)
            self.send_proxy_error(503, "the CA file failed a safety check; see the proxy's log",
                                  "unavailable")
            return
        try:
            with open(ca_file, "rb") as handle:
                pem = handle.read()
        except OSError:
            # No path in the answer: anyone may ask, and the server's directories are not theirs.
            self.send_proxy_error(404, "no local CA here: the proxy uses a certificate it did "
                                       "not issue", "not_found")
            return
        if der:
            self.send_local(200, ca_pem_to_der(pem), "application/x-x509-ca-cert",
                            [("Content-Disposition", 'attachment; filename="llm-proxy-ca.crt"')])
        else:
            self.send_local(200, pem, "application/x-pem-file",
                            [("Content-Disposition", 'attachment; filename="llm-proxy-ca.pem"')])

    # -- forwarding --------------------------------------------------------------------------------

    def forward(self, head: RequestHead, path: str, body_length: Optional[int]) -> None:
        """The forwarding pipeline: refuse foreign origins, send upstream, stream the answer back."""
        origin = head.get("origin")
        if origin and not self.server.config.origin_allowed(origin):
            # Refused here, never forwarded: the backend is spared the work. The refusal itself
            # carries Access-Control-Allow-Origin so the web app can show the user this message
            # instead of an opaque CORS error; it reveals nothing but the setting to change.
            self.server.note_refused_origin(origin)
            self.send_proxy_error(
                403, "origin %s is not allowed by this proxy: add it to proxy.allowedOrigins in "
                     "the config (or ALLOWED_ORIGINS)" % origin, "origin_not_allowed",
                extra=[("Access-Control-Allow-Origin", origin), ("Vary", "Origin")])
            return
        keyring = self.server.keys      # read once: a SIGHUP swap cannot mix two tables
        key = None
        if keyring.required:
            key = authenticate(keyring, head)
            refusal = access_refusal(key, self.server.stats, self.server.rate_limiter)
            if refusal is not None:
                self.server.stats.record_refusal(key.name if key is not None else None)
                self.refuse(head, body_length, refusal)
                return
        exchange = Exchange(self, head, path, body_length, key, keyring)
        self.exchange_logs = True
        self.server.request_started()
        try:
            exchange.run()
        finally:
            try:
                exchange.finish()
            finally:
                # Only now: shutdown saves the stats once nothing is in flight, so the record
                # must be in the store before this request stops counting as in flight.
                self.server.request_finished()


    def refuse(self, head: RequestHead, body_length: Optional[int], refusal: Refusal) -> None:
        """Answer a request that is not forwarded (no key, budget used up).

        The answer goes out first, then the body is read and dropped (as nginx discards it):
        http.client and httpx send the whole body before reading, and closing on them would
        turn our clear 401/429 into a connection reset. Past REFUSED_BODY_DRAIN_LIMIT, or for
        a body the client waits to send (Expect: 100-continue), the connection closes instead.
        """
        expects = (head.get("expect") or "").lower() == "100-continue"
        close = body_length is not None and (
            expects or not 0 < body_length <= REFUSED_BODY_DRAIN_LIMIT)
        self.send_proxy_error(refusal.status, refusal.message, refusal.error_type, close=close,
                              extra=refusal.headers)
        if body_length is None or expects:
            return
        pieces = iter_chunked_body(self.rfile) if body_length < 0 else \
            iter_fixed_body(self.rfile, body_length)
        seen = 0
        try:
            for data in pieces:
                seen += len(data)
                if seen > REFUSED_BODY_DRAIN_LIMIT:
                    break
        except (RequestError, ClientGone, OSError):
            self.close_connection = True


def response_has_body(method: str, status: int) -> bool:
    """Whether an answer to ``method`` with ``status`` has a body (RFC 9110 §6.4.1)."""
    return not (method == "HEAD" or status in (204, 304) or 100 <= status < 200)


class Framing(NamedTuple):
    """How one answer's body travels to the client, decided once from the backend's head."""

    has_body: bool
    """False for HEAD, 204, 304 and 1xx: the head is all there is."""
    streamed: bool
    """An SSE or NDJSON stream (its pieces may be minutes apart)."""
    reframed: bool
    """The backend's Content-Length is not passed on: it is unknown, chunked, or the body may
    be edited on the way (injected usage)."""
    chunked: bool
    """We send the body chunked (a re-framed body to an HTTP/1.1 client); a re-framed body to
    an HTTP/1.0 client ends with the connection's close instead."""
    hold_head: bool
    """The head waits for the first piece so both leave in one write (see plan_framing)."""


def plan_framing(response, request_method: str, client_version: str,
                 body_edited: bool = False) -> Framing:
    """Decide, from the backend's head alone, how the body is framed and when the head goes.

    A Content-Length body was complete when the backend sent its head, and its first piece
    comes in the same read or right after: the head waits for it and both leave in one write,
    one TLS record and one syscall less per answer. Streams and chunked bodies, whose next
    bytes may be minutes away, get their head at once.
    """
    content_type = response.getheader("content-type", "")
    streamed = "event-stream" in content_type or "ndjson" in content_type
    has_body = response_has_body(request_method, response.status)
    reframed = has_body and (response.chunked or response.length is None or body_edited)
    chunked = reframed and client_version == "HTTP/1.1"
    hold_head = has_body and bool(response.length) and not chunked and not streamed
    return Framing(has_body, streamed, reframed, chunked, hold_head)


def send_all(sock, data: bytes) -> None:
    """Write all of ``data`` to a blocking (TLS) socket: the relay loop's one write per piece.

    What ``wfile.write`` does, minus its layers: socketserver's writer and SSLSocket.sendall
    wrap every piece in memoryviews and slices before the one send() that takes it all (a TLS
    write is whole unless the socket fails). Per SSE event under 200 streams that was ~3 us of
    a ~40 us write (issue 16).
    """
    sent = sock.send(data)
    while sent < len(data):
        sent += sock.send(data[sent:])


# What a socket in non-blocking mode raises for "not now": TLS says it with its own errors.
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError)

# relay_response()'s note that the client socket still has its timeout (is not switched).
_BLOCKING = object()


def send_all_nonblocking(sock, data: bytes, sent: int, timeout: Optional[float]) -> None:
    """Write ``data[sent:]`` to a socket in non-blocking mode (settimeout(0)), waiting for room
    only when it has none, and then for at most ``timeout`` seconds (None: for ever) each time,
    as the socket's own timeout did: socket.timeout if none comes.

    A TLS socket that would block has taken nothing of this send (OpenSSL keeps the record it
    made and wants the same bytes offered again), so they are offered again.

    The ``timeout`` runs from the last send that took bytes, not from each wait: a TLS send
    takes all or nothing, so a piece must leave within ``timeout`` as a TLS socket's own
    timeout had it (one deadline per write), and a socket that says "ready" at once every
    time while TLS still wants to read (unread client bytes waiting) cannot spin for ever.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while sent < len(data):
        try:
            taken = sock.send(data[sent:] if sent else data)
        except ssl.SSLWantReadError:
            _wait_until_ready(sock, False, _time_left(deadline))
            continue
        except (BlockingIOError, ssl.SSLWantWriteError):
            _wait_until_ready(sock, True, _time_left(deadline))
            continue
        sent += taken
        if deadline is not None and taken:
            deadline = time.monotonic() + timeout


def _time_left(deadline: Optional[float]) -> Optional[float]:
    """Seconds until ``deadline`` (None: no deadline); socket.timeout once it has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("timed out")
    return left


def _wait_until_ready(sock, writing: bool, timeout: Optional[float]) -> None:
    """Wait until ``sock`` can be written (or read); socket.timeout after ``timeout`` s."""
    if not _ready([sock], timeout, writing):
        raise socket.timeout("timed out")


class BodyPipe:
    """The backend's body on its way to the client, as the relay loop sees it.

    ``read()`` gives the next bytes for the client (b"" at the end of the body): every piece
    from ``read_piece`` is first read by the usage ``tap`` as it came from the backend, then
    edited by the ``stripper`` (which may hold part of it back).  ``finish(complete)`` ends
    both and returns what the stripper still held.  Neither of them ever raises.
    """

    __slots__ = ("read_piece", "tap", "stripper", "read_framed", "keep_framing", "framed")

    def __init__(self, read_piece, tap: Optional["UsageTap"],
                 stripper: Optional["InjectedUsageStripper"], read_framed=None,
                 keep_framing: bool = False) -> None:
        self.read_piece = read_piece
        self.tap = tap
        self.stripper = stripper
        # Whole chunks as the backend framed them (UpstreamResponse.read_framed), tried before
        # read_piece; their framing is passed on when the client is sent chunks too
        # (keep_framing) and nothing edits the body.
        self.read_framed = read_framed
        self.keep_framing = keep_framing and stripper is None
        self.framed: Optional[bytes] = None
        """The chunks, framed, that carry what read() returned last; None: frame it yourself."""

    def read(self) -> bytes:
        """The next bytes for the client; b"" only at the end of the backend's body."""
        while True:
            framed = self.read_framed() if self.read_framed is not None else None
            if framed is not None:
                wire, data = framed
            else:
                wire, data = None, self.read_piece()
                if not data:
                    self.framed = None
                    return data
            if self.tap is not None:
                self.tap.feed(data)
            if self.stripper is None:
                self.framed = wire if self.keep_framing else None
                return data
            data = self.stripper.feed(data)
            if data:
                self.framed = None
                return data

    def finish(self, complete: bool) -> bytes:
        """End of the body (``complete``: it ended normally): the bytes still to send."""
        tail = self.stripper.finish() if self.stripper is not None else b""
        if self.tap is not None:
            self.tap.finish(complete)
        return tail


class Exchange:
    """One forwarded request: its body, the backend round trip, the streamed answer, the record."""

    def __init__(self, handler: ProxyHandler, head: RequestHead, path: str,
                 body_length: Optional[int], key: Optional[AccessKey] = None,
                 keyring: Optional[KeyRing] = None) -> None:
        self.handler = handler
        self.key_name = key.name if key is not None else None
        self.keyring = keyring if keyring is not None else handler.server.keys
        self.server = handler.server
        self.config = handler.server.config
        self.head = head
        self.path = path
        self.body_length = body_length
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.status = 0
        self.sent = 0
        self.ttfb = None
        self.error = False
        self.tap = None
        # Only POSTs generate: a GET on /v1/responses/{id} or /api/chat is no new usage.
        self.kind = classify_endpoint(path) \
            if self.config.tracking_enabled and head.method == "POST" else None
        self.request_info = None
        self.injected = False
        self.streamed = None
        self.body_streamed = False
        self.failure = None              # why the proxy answered with an error itself
        # A WebSocket handshake is forwarded with its upgrade headers; any other upgrade is not.
        self.upgrade = websocket_requested(head, body_length)
        self.tunnel = None

    # The steps, in order --------------------------------------------------------------------

    def run(self) -> None:
        try:
            body, body_stream = self.read_request_body()
            conn, response = self.round_trip(body, body_stream)
        except UpstreamError as exc:
            self.fail(exc.status, exc.message)
            return
        except RequestError as exc:
            self.status, self.error = exc.status, True     # 400 malformed, 408 too slow
            raise
        except ClientGone:
            self.status, self.error = 499, True     # nginx's "client closed request"
            raise
        if self.upgrade and response.status == 101:
            self.open_tunnel(conn, response)
            return
        self.relay_response(conn, response)

    def read_request_body(self):
        """(whole body or None, iterator of pieces or None). Small bodies are read whole."""
        length = self.body_length
        if length is None:
            self.request_info = inspect_request(self.kind, b"", True) if self.kind else None
            return b"", None
        self.handler.expect_continue(self.head)
        rfile = self.handler.rfile
        if 0 < length <= BODY_BUFFER_LIMIT:
            body = b"".join(iter_fixed_body(rfile, length))
            if self.kind:
                self.request_info = inspect_request(self.kind, body, True)
                if self.config.inject_stream_usage:
                    rewritten = inject_stream_usage(self.kind, body, self.request_info)
                    if rewritten is not None:
                        body, self.injected = rewritten, True
            return body, None
        pieces = iter_chunked_body(rfile) if length < 0 else iter_fixed_body(rfile, length)
        self.body_streamed = True
        if self.kind:
            return None, self._peek_request(pieces)
        return None, pieces

    def _peek_request(self, pieces):
        """Pass pieces through, and let the usage tap see the body's first BODY_PEEK_LIMIT bytes."""
        prefix = bytearray()
        for data in pieces:
            if prefix is not None:
                prefix += data[:BODY_PEEK_LIMIT - len(prefix)]
                if len(prefix) >= BODY_PEEK_LIMIT:
                    self.request_info = inspect_request(self.kind, bytes(prefix), False)
                    prefix = None
            yield data
        if prefix is not None:
            self.request_info = inspect_request(self.kind, bytes(prefix), True)

    def upstream_headers(self, body: Optional[bytes]) -> List[Tuple[str, str]]:
        """The client's headers minus hop-by-hop ones, plus Host, framing and X-Forwarded-*."""
        head = self.head
        dropped = set(HOP_BY_HOP_HEADERS)
        dropped.update(head.connection_tokens())
        dropped.update(("host", "content-length", "expect", "x-forwarded-proto", "x-forwarded-host"))
        if not self.config.forward_origin:
            dropped.add("origin")
        if self.injected:
            dropped.add("accept-encoding")     # the stream is edited: it must arrive uncompressed
        if self.keyring.replaces_credentials:
            dropped.update(CREDENTIAL_HEADERS)  # the client's key stays here
            dropped.add("sec-websocket-protocol")   # offered again below, without a key
        headers = [("Host", self.server.upstream_host_header)]
        forwarded_for = []
        for name, value in head.headers:
            lower = name.lower()
            if lower == "x-forwarded-for":
                forwarded_for.append(value)
            elif lower not in dropped and "_" not in name:
                # Names with "_" are dropped, as nginx does by default: WSGI/CGI backends read
                # X_Forwarded_For or Content_Length as the dashed header, which we checked or set.
                headers.append((name, value))
        forwarded_for.append(self.handler.client_ip)
        headers.append(("X-Forwarded-For", ", ".join(forwarded_for)))
        headers.append(("X-Forwarded-Proto", "https"))
        if head.get("host"):
            headers.append(("X-Forwarded-Host", head.get("host")))
        if self.injected:
            headers.append(("Accept-Encoding", "identity"))
        if self.upgrade:
            # The one exception to hop-by-hop stripping (RFC 9110 §7.8): asked for explicitly.
            headers.extend((("Connection", "Upgrade"), ("Upgrade", "websocket")))
        if self.keyring.replaces_credentials:
            offered = [p for p in websocket_protocols(head)
                       if not p.startswith(WEBSOCKET_KEY_PROTOCOL)]
            if offered:
                headers.append(("Sec-WebSocket-Protocol", ", ".join(offered)))
        if self.keyring.backend_key:
            headers.append(("Authorization", "Bearer " + self.keyring.backend_key))
        if body is not None:
            if body or self.body_length is not None or self.head.method in ("POST", "PUT", "PATCH"):
                headers.append(("Content-Length", str(len(body))))
        else:
            headers.append(("Transfer-Encoding", "chunked"))
        return headers

    def round_trip(self, body: Optional[bytes], body_stream):
        """Send the request and read the response head. Retries once on a stale pooled connection.

        Only a connection reused from the pool is retried, only when the backend closed it without
        answering, and only when the body is still in hand: then the backend cannot have started
        on this request (it had closed an idle connection), so sending again is safe.
        """
        request = format_request_head(self.head.method, self.head.target,
                                      self.upstream_headers(body))
        if body and len(body) <= SEND_JOINED_BELOW:
            request, body = request + body, b""
        pool = self.server.upstream
        for attempt in (1, 2):
            conn, reused = pool.acquire()
            sent = False
            try:
                # One write for head and (small) body: http.client's putheader()/endheaders()
                # checked again every name and value read_request_head() already checked, and
                # sent head and body apart, a poll() and a send() more (13% of a keep-alive
                # request's CPU under py-spy --gil, with getresponse()).
                send_to_backend(conn.sock, request)
                if body:
                    conn.sock.sendall(body)
                elif body is None:
                    self.stream_request_body(conn, body_stream)
                sent = True
                self.wait_for_answer(conn)
                response = read_response(conn, self.head.method)
                problem = framing_problem(response) or self.unasked_switch(response)
                if problem:
                    # RFC 9112 §6.3: the end of this response is unknowable; a proxy MUST
                    # answer 502 and close the connection to the server.
                    conn.close()
                    response.close()
                    raise UpstreamError(502, "The backend at %s %s" % (pool.url, problem))
                return conn, response
            except (ClientGone, RequestError):
                conn.close()
                raise
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                conn.close()
                # Safe to send again: the send itself failed, or the method is idempotent. A POST
                # the backend may have read is never replayed: it could generate twice.
                replayable = not sent or self.head.method in IDEMPOTENT_METHODS
                if reused and attempt == 1 and body is not None and replayable:
                    log.debug("pooled backend connection was stale (%s); retrying once", exc)
                    continue
                raise UpstreamError(502, "The backend at %s closed the connection without "
                                         "answering" % pool.url) from None
            except socket.timeout:
                conn.close()
                raise UpstreamError(504, "The backend at %s did not answer within %gs"
                                    % (pool.url, self.config.read_timeout)) from None
            except http.client.HTTPException as exc:
                conn.close()
                raise UpstreamError(502, "The backend at %s sent an invalid HTTP response (%s)"
                                    % (pool.url, exc if isinstance(exc, BadResponseHead)
                                       else type(exc).__name__)) from None
            except OSError as exc:
                conn.close()
                raise UpstreamError(502, "Error talking to the backend at %s: %s"
                                    % (pool.url, _describe_os_error(exc))) from None
        raise AssertionError("unreachable")

    def unasked_switch(self, response) -> Optional[str]:
        """Why a 101 Switching Protocols answer is refused; None for any other status.

        The one place that decides. Only a WebSocket handshake asks for an upgrade (the one
        Upgrade we forward; open_tunnel() then checks the backend switched to WebSocket). Any
        other 101 means the backend stopped speaking HTTP on a connection we would otherwise
        pool.
        """
        if response.status != 101 or self.upgrade:
            return None
        return "switched protocols (101) although the request asked for no upgrade"

    def wait_for_answer(self, conn) -> None:
        """Wait for the backend's first byte, and give up at once if the client leaves meanwhile.

        A model may think for minutes before its first byte. A client that closes its
        connection then (the user pressed stop) should free the backend right away: closing our
        connection makes Ollama and llama.cpp cancel the generation.
        """
        backend, client = conn.sock, self.handler.connection
        # No separate "already here?" check: this select() returns at once when it is, and the
        # check cost one more syscall (and GIL hand-off) for nearly every request.
        watched = [backend, client]
        deadline = time.monotonic() + self.config.read_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return                              # read_response() raises the timeout
            readable = _ready(watched, remaining)
            if backend in readable or not readable:
                return
            if _peer_closed(client):
                self.status, self.error = 499, True
                raise ClientGone()
            watched = [backend]                     # pipelined bytes: stop watching the client

    def stream_request_body(self, conn, pieces) -> None:
        """Forward a large or chunked body as it arrives, re-framed as chunked.

        If the client stops halfway, the terminating chunk is never sent: the backend sees a
        broken request, never a complete one.
        """
        send = conn.sock.sendall
        for data in pieces:
            send(b"%x\r\n%s\r\n" % (len(data), data))
        send(b"0\r\n\r\n")

    def response_headers(self, response, framing: "Framing") -> List[Tuple[str, str]]:
        """The backend's headers to pass on, with our framing headers and the CORS ones."""
        raw = response.getheaders()
        dropped = set(HOP_BY_HOP_HEADERS)
        dropped.update(_connection_tokens(v for k, v in raw if k.lower() == "connection"))
        if framing.reframed or response.chunked:
            # RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and a proxy MUST remove
            # Content-Length before forwarding; a body we re-frame carries our framing only
            # (http.client also gives length None for an unparsable Content-Length).
            dropped.add("content-length")
        headers = []
        for k, v in raw:
            lower = k.lower()
            if lower in dropped or lower.startswith("access-control-"):
                continue
            if lower == "content-length":
                dropped.add(lower)          # identical repeats (checked already): send one
            # RFC 9112 §5.2: replace obs-fold (CRLF + whitespace) by SP before forwarding.
            headers.append((k, _OBS_FOLD.sub(" ", v)))
        if framing.chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        elif framing.reframed:
            self.handler.close_connection = True   # HTTP/1.0: the close ends the body
        headers.extend(self.handler.cors_response_headers([k for k, _ in headers]))
        return headers

    def has_body(self, response) -> bool:
        return response_has_body(self.head.method, response.status)

    def relay_response(self, conn, response) -> None:
        """Copy status, headers and body to the client, each piece as soon as it arrives.

        Framing is planned once (plan_framing); the body reaches the copy loop through a
        BodyPipe, where the usage tap reads it and the stripper takes out injected usage.
        """
        self.status = response.status
        content_type = response.getheader("content-type", "")
        encoding = response.getheader("content-encoding", "")
        stripper = None
        if self.kind and 200 <= response.status < 300:
            self.tap = UsageTap(self.kind, self.request_info, content_type, encoding,
                                injected=self.injected)
            if InjectedUsageStripper.wanted(self.injected, content_type, encoding):
                stripper = InjectedUsageStripper()
        # An injected request's body may be edited, so its length is not passed on.
        framing = plan_framing(response, self.head.method, self.head.version,
                               body_edited=self.tap is not None and self.injected)
        self.streamed = framing.streamed
        headers = self.response_headers(response, framing)
        client = self.handler.connection
        send = client.send
        write = functools.partial(send_all, client)
        reason = "".join(c for c in (response.reason or "") if " " <= c <= "~") or "-"
        head = self.handler.format_head(response.status, reason, headers)
        if not framing.hold_head:
            try:
                write(head)
            except OSError:
                conn.close()
                raise ClientGone() from None
            head = b""
        if not framing.has_body:
            self.ttfb = time.monotonic() - self.started
            self.server.upstream.release(conn, response)
            return

        chunked = framing.chunked
        body = BodyPipe(functools.partial(self.read_available, response), self.tap, stripper,
                        functools.partial(response.read_framed, READ_CHUNK)
                        if response.chunked else None, keep_framing=chunked)
        complete = False
        client_wait: Any = _BLOCKING    # see the second piece below
        try:
            while True:
                try:
                    data = body.read()
                    if self.ttfb is None:
                        self.ttfb = time.monotonic() - self.started
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    if head:                  # nothing reached the client yet: a proper error
                        conn.close()
                        self.fail(504 if isinstance(exc, socket.timeout) else 502,
                                  "The backend at %s broke off its response (%s)" % (
                                      self.server.upstream.url, _describe_os_error(exc)
                                      if isinstance(exc, OSError) else type(exc).__name__))
                        return
                    self.upstream_broke(conn, exc)
                    return
                if not data:
                    if response.length:
                        # HTTPResponse.read1() reports a Content-Length body cut short by a clean
                        # close as b"", not as IncompleteRead: the client must not wait for bytes
                        # that will never come (and the request is an error, not a success).
                        self.upstream_broke(conn, http.client.IncompleteRead(b"", response.length))
                        return
                    complete = True
                    break
                self.sent += len(data)
                if head:
                    out = head + data     # not chunked: only Content-Length bodies hold the head
                    head = b""
                elif chunked:
                    out = body.framed
                    if out is None:
                        out = b"%x\r\n%s\r\n" % (len(data), data)
                else:
                    out = data
                try:
                    if client_wait is _BLOCKING:
                        if self.sent == len(data):          # the first piece
                            # send_all() without its call: a TLS send takes the whole piece
                            # unless it fails.
                            sent = send(out)
                            if sent < len(out):
                                send_all(client, out[sent:])
                            continue
                        # A second piece: the body is a stream. A socket with a timeout polls
                        # before every TLS write, a syscall and a GIL hand-off per SSE event that
                        # the bare shape does not make (strace -c per event: 2.15 polls vs 1.07).
                        # Non-blocking, the socket waits (up to its timeout) only when it is full;
                        # the timeout is back before the last writes and the next request.
                        client_wait = client.gettimeout()
                        client.settimeout(0.0)
                    try:
                        sent = send(out)
                    except _WOULD_BLOCK:
                        sent = 0
                    if sent < len(out):
                        send_all_nonblocking(client, out, sent, client_wait)
                except OSError:
                    self.client_broke(conn)
                    return
        finally:
            if client_wait is not _BLOCKING:
                try:
                    client.settimeout(client_wait)
                except OSError:
                    pass                      # closed meanwhile
        tail = body.finish(complete)
        try:
            if head:                      # the body ended before its first byte
                write(head)
            if tail:
                self.sent += len(tail)
                write(b"%x\r\n%s\r\n" % (len(tail), tail) if chunked else tail)
            if chunked:
                write(b"0\r\n\r\n")
        except OSError:
            self.client_broke(conn)
            return
        self.server.upstream.release(conn, response)

    def read_available(self, response) -> bytes:
        """The next piece of the body, joined with every piece already received behind it.

        Waits only for the first piece, so no SSE event is held back; a burst of tiny chunks
        (2 million 1-byte chunks took 41 s, one TLS write each) leaves in few writes.
        """
        data = response.read1(READ_CHUNK)
        if not data or len(data) >= COALESCE_BELOW or response.length == 0 \
                or data[-1:] == b"\n" and not response.chunked:
            # A Content-Length body read to its end (length 0) has nothing behind it to join:
            # the poll would only find that out (one syscall per plain JSON answer).
            # A piece of a body that is not chunked, ending a line, is an SSE event or NDJSON
            # line as the backend wrote it, and read1() gave all that was here: what follows is
            # the next token, not yet generated, and the poll would cost a syscall and a GIL
            # hand-off per event (issue 16). A chunked body's whole events take read_framed;
            # what reaches read1() there is odd or tiny chunks, which a burst may bring by the
            # million (issue 11): those are joined.
            return data
        pieces = [data]
        size = len(data)
        while size < READ_CHUNK:
            more = response.read_ready(READ_CHUNK - size)
            if not more:
                break
            pieces.append(more)
            size += len(more)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def open_tunnel(self, conn, response) -> None:
        """Relay the backend's 101 to a WebSocket handshake, then copy bytes both ways until done.

        The backend's socket leaves the pool for good: after a 101 it speaks WebSocket, not HTTP.
        """
        self.status = 101
        self.ttfb = time.monotonic() - self.started
        raw = response.getheaders()
        agreed = [p.strip().lower() for k, v in raw if k.lower() == "upgrade" for p in v.split(",")]
        backend = conn.sock
        if backend is None or agreed != ["websocket"]:
            conn.close()
            self.fail(502, "The backend at %s answered the WebSocket handshake with 101 but did "
                           "not switch to WebSocket" % self.server.upstream.url)
            return
        dropped = set(HOP_BY_HOP_HEADERS)
        dropped.update(_connection_tokens(v for k, v in raw if k.lower() == "connection"))
        headers = [(k, _OBS_FOLD.sub(" ", v)) for k, v in raw if k.lower() not in dropped]
        headers.extend((("Connection", "Upgrade"), ("Upgrade", "websocket")))
        head = "HTTP/1.1 101 Switching Protocols\r\n%s\r\n" % "".join(
            "%s: %s\r\n" % pair for pair in headers)
        # Frames the backend sent right behind its 101 may already sit in http.client's buffer.
        backend.setblocking(False)
        try:
            from_backend = response.fp.read1(READ_CHUNK) or b""
        except OSError:
            from_backend = b""
        conn.sock = None
        response.close()
        self.handler.close_connection = True
        client = self.handler.connection
        try:
            self.handler.wfile.write(head.encode("latin-1"))
            # And frames a client sent without waiting for the 101 sit in our request reader
            # (read without a body deadline, which would put a timeout back on the socket).
            self.handler.head_reader.stop_deadlines()
            client.setblocking(False)
            try:
                from_client = self.handler.rfile.read1(READ_CHUNK) or b""
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                from_client = b""
        except OSError:
            backend.close()
            raise ClientGone() from None
        tap = None
        if self.config.tracking_enabled and self.path.rstrip("/").endswith("/realtime"):
            # The Realtime API names the model in the URL (?model=...); response.done may not.
            query = urllib.parse.parse_qs(self.head.target.partition("?")[2])
            tap = RealtimeUsage(model=(query.get("model") or [None])[0], deflate=permessage_deflate(
                ", ".join(v for k, v in raw if k.lower() == "sec-websocket-extensions")))
        self.tunnel = Tunnel(client, backend, self.config.websocket_idle_timeout,
                             self.config.client_timeout, from_client, from_backend, tap)
        self.server.track_tunnel(self.tunnel, True)
        try:
            self.tunnel.run()
        finally:
            self.server.track_tunnel(self.tunnel, False)
            backend.close()
        self.sent = self.tunnel.down

    def upstream_broke(self, conn, exc) -> None:
        """The backend failed mid-body: all we can do is abort the client connection too.

        A clean chunked end would look like success to the client, so we close without it.
        """
        # Said on the request's one log line (finish()), not on a second one.
        self.failure = "backend %s broke off the response: %s" % (
            self.server.upstream.url,
            _describe_os_error(exc) if isinstance(exc, OSError) else type(exc).__name__)
        conn.close()
        self.error = True
        self.handler.close_connection = True
        _abort_connection(self.handler.connection)

    def client_broke(self, conn) -> None:
        """The client went away mid-stream: close the backend connection at once.

        Ollama and llama.cpp stop generating when their client disconnects, which frees the GPU.
        """
        conn.close()
        self.error = True
        self.handler.close_connection = True

    def fail(self, status: int, message: str) -> None:
        """Answer with a proxy-made error (502/504); keep the client connection when possible."""
        self.status, self.error = status, True
        self.failure = message           # finish() logs it, on the request's one line
        # A streamed body may be half read: then the connection is out of step and must close.
        self.handler.send_proxy_error(status, message, "proxy_error", close=self.body_streamed)

    def finish(self) -> None:
        """Log one line and hand one record to the stats store."""
        duration = time.monotonic() - self.started
        usage = None
        source = None
        model = None                  # the name the backend answered with, if it named one
        if self.tap is not None:
            usage = self.tap.usage
            source = usage["source"] if usage["source"] != "none" else None
            model = usage["model"]
            if usage.get("error"):
                self.error = True
        elif self.kind and is_usage_kind(self.kind) and 200 <= self.status < 300:
            source = "missing"
        if self.status >= 400:
            self.error = True
        if not model and not self.error and 200 <= self.status < 300 \
                and self.request_info is not None:
            # The request's own name counts only once the backend accepted it: a client
            # asking for 260 made-up models (404 each) must not push real ones into "(other)".
            model = self.request_info.model
        tunnel = self.tunnel
        if tunnel is not None and tunnel.tap is not None and tunnel.tap.responses:
            usage, source, model = tunnel.tap.usage, "reported", tunnel.tap.model or model
        tokens = usage.get("total", 0) if usage else 0
        if tunnel is not None:
            # One line per WebSocket, at its end: how long, how much each way, who ended it.
            log.info("%s %s %s 101 websocket %.1fs up %dB down %dB closed by %s%s%s",
                     self.handler.client_ip, self.head.method, self.path, duration,
                     tunnel.up, tunnel.down, tunnel.closed_by,
                     " %d tokens" % tokens if tokens else "",
                     " key=%s" % self.key_name if self.key_name else "")
        else:
            # One line per request; a proxy-made error (502/504) is that same line at WARNING, with
            # the reason, instead of a second line.
            level = logging.WARNING if self.failure else logging.INFO
            if log.isEnabledFor(level):
                log.log(level, "%s %s %s %d %dB %dms%s%s%s", self.handler.client_ip,
                        self.head.method, self.path, self.status, self.sent, duration * 1000,
                        " %d tokens" % tokens if tokens else "",
                        " key=%s" % self.key_name if self.key_name else "",
                        ": " + self.failure if self.failure else "")
        self.server.stats.record(RequestRecord(
            time=self.started_wall, method=self.head.method, path=self.path,
            client=self.handler.client_ip, status=self.status,
            completion=bool(self.kind) and is_completion_kind(self.kind),
            model=model, usage=usage, usage_source=source, error=self.error,
            ttfb_ms=None if self.ttfb is None else self.ttfb * 1000,
            duration_ms=duration * 1000, bytes=self.sent, streamed=self.streamed,
            key=self.key_name,
        ))


LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 1024 * 1024


def _lingering_close(sock) -> None:
    """Half-close, then read and drop what the client still sends, briefly, before the close.

    Closing a socket with unread input sends a TCP reset, and a reset can make the client's
    stack discard our last answer before it is read (RFC 9112 §9.6; Apache and nginx linger
    the same way). Bounded by LINGER_SECONDS and LINGER_MAX_BYTES; TLS records are dropped
    unread, below the TLS layer.
    """
    try:
        socket.socket.shutdown(sock, socket.SHUT_WR)
    except OSError:
        return
    deadline = time.monotonic() + LINGER_SECONDS
    drained = 0
    try:
        while drained < LINGER_MAX_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not _ready([sock], remaining):
                return
            data = socket.socket.recv(sock, 65536)
            if not data:
                return
            drained += len(data)
    except (OSError, ValueError):
        return


def _abort_connection(sock) -> None:
    """Close a client connection with a TCP reset, so no client mistakes it for a clean end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def bearer_token_matches(authorization: str, token: str) -> bool:
    """Whether an Authorization header value is "Bearer <token>".

    The scheme is case-insensitive (RFC 9110 §11.1); the token is compared in constant time
    (both sides hashed first, so not even its length leaks).
    """
    scheme, _, supplied = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(hashlib.sha256(supplied.strip(" \t").encode("utf-8")).digest(),
                               hashlib.sha256(token.encode("utf-8")).digest())


# ==================================================================================================
# HTTP layer, part 3b: WebSocket tunnels (the one upgrade we forward)
# ==================================================================================================

# Bytes held per direction while the receiving side is slow: past this we stop reading from the
# sender, so TCP pushes back on it instead of our memory filling up.
TUNNEL_BUFFER_LIMIT = 1024 * 1024
TLS_READ_CHUNK = 65536
# TCP keepalive on both legs of a tunnel: a tunnel may be silent for an hour legitimately, and a
# peer that vanished (laptop lid closed, Wi-Fi gone) is found in about idle + interval * count.
TUNNEL_KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4))
# Realtime usage: a server->client text message is parsed only when it is at most this big (a
# response.done event is a few KiB; audio deltas are skipped unparsed).
REALTIME_MESSAGE_LIMIT = 1024 * 1024


def websocket_requested(head: RequestHead, body_length: Optional[int]) -> bool:
    """True for a WebSocket opening handshake (RFC 6455 §4.1) we forward as an upgrade.

    GET, HTTP/1.1, "upgrade" among the Connection tokens and "websocket" among the Upgrade
    protocols, and no body. Any other upgrade (h2c, TLS/1.0) is not forwarded: its headers are
    hop-by-hop, dropped as usual, and the request proceeds as a plain one.
    """
    if head.method != "GET" or head.version != "HTTP/1.1" or body_length is not None:
        return False
    if "upgrade" not in head.connection_tokens():
        return False
    return "websocket" in [p.strip().lower() for value in head.get_all("upgrade")
                           for p in value.split(",")]


def _keepalive(sock) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in TUNNEL_KEEPALIVE:
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:
        pass


class _Wait:
    """Wait for readiness of two sockets: poll() where it exists, else select()."""

    def __init__(self, sockets) -> None:
        self.sockets = sockets
        self.poller = select.poll() if hasattr(select, "poll") else None

    def wait(self, wants, timeout: float):
        """wants: per socket (read?, write?). Returns per socket (readable, writable)."""
        if self.poller is not None:
            poller = self.poller
            for sock, (r, w) in zip(self.sockets, wants):
                mask = (select.POLLIN if r else 0) | (select.POLLOUT if w else 0)
                if mask:
                    poller.register(sock, mask)
                else:
                    # Registered with no events, a hung-up socket would still report POLLHUP
                    # at once, every time: a busy loop while the other direction drains.
                    try:
                        poller.unregister(sock)
                    except KeyError:
                        pass
            events = dict(poller.poll(max(0.0, timeout) * 1000.0))
            result = []
            for sock, (r, w) in zip(self.sockets, wants):
                ev = events.get(sock.fileno(), 0)
                broken = ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL)
                result.append((bool(ev & select.POLLIN) or bool(broken and r),
                               bool(ev & select.POLLOUT) or bool(broken and w)))
            return result
        rlist = [s for s, (r, _) in zip(self.sockets, wants) if r]
        wlist = [s for s, (_, w) in zip(self.sockets, wants) if w]
        readable, writable, _ = select.select(rlist, wlist, [], max(0.0, timeout))
        return [(s in readable, s in writable) for s in self.sockets]


def permessage_deflate(extensions: str) -> Optional[bool]:
    """Whether a 101 agreed on permessage-deflate (RFC 7692) from its Sec-WebSocket-Extensions:
    None when not; else whether the server resets its window each message
    (server_no_context_takeover)."""
    for offer in extensions.split(","):
        params = [p.strip().lower() for p in offer.split(";")]
        if params[0] == "permessage-deflate":
            return "server_no_context_takeover" in [p.partition("=")[0].strip() for p in params]
    return None


class RealtimeUsage:
    """Reads the backend->client frames of an OpenAI Realtime tunnel for response.done usage.

    Fed a copy of the bytes (never changes them). Server frames are unmasked (RFC 6455 §5.1);
    messages may be fragmented, with control frames between the fragments. With permessage-
    deflate agreed (browsers offer it), every compressed message is inflated, binary ones too:
    the compression window spans messages. Oversized text messages are skipped.
    """

    def __init__(self, model: Optional[str] = None, deflate: Optional[bool] = None) -> None:
        self._buf = bytearray()
        self._payload_left = 0     # bytes of the current frame still to come
        self._fin = False          # the current frame ends its message
        self._frame_is_data = False
        self._msg_opcode = None    # 1 text, 2 binary: the message in progress, else None
        self._msg_deflated = False
        self._message = bytearray()
        self._skip_message = False
        # The largest window inflates what any smaller server_max_window_bits compressed.
        self._reset_window = deflate
        self._inflater = zlib.decompressobj(-15) if deflate is not None else None
        self.responses = 0
        self.usage = dict.fromkeys(STATS_TOKEN_FIELDS, 0)
        self.model = model

    def feed(self, data) -> None:
        """Take the next bytes the backend sent (a copy: nothing is changed or held back)."""
        buf = self._buf
        buf += data
        pos = 0
        while True:                               # iterative: a hostile run of tiny frames
            if self._payload_left:                # must not be able to recurse us to death
                take = min(self._payload_left, len(buf) - pos)
                if not take:
                    break
                if self._frame_is_data:
                    self._payload(bytes(buf[pos:pos + take]))
                pos += take
                self._payload_left -= take
                if not self._payload_left:
                    self._end_frame()
                continue
            after = self._parse_header(buf, pos)
            if after is None:
                break
            pos = after
        del buf[:pos]

    def _parse_header(self, buf, pos):
        """Read one frame header at buf[pos:]; returns the position after it, or None if cut."""
        if len(buf) - pos < 2:
            return None
        b0, b1 = buf[pos], buf[pos + 1]
        length, offset = b1 & 0x7F, pos + 2
        if length == 126:
            if len(buf) < offset + 2:
                return None
            length, offset = struct.unpack_from("!H", buf, offset)[0], offset + 2
        elif length == 127:
            if len(buf) < offset + 8:
                return None
            length, offset = struct.unpack_from("!Q", buf, offset)[0], offset + 8
        masked = bool(b1 & 0x80)
        if masked:
            offset += 4                       # a masked server frame is a protocol error
            if len(buf) < offset:
                return None
        opcode, self._fin = b0 & 0x0F, bool(b0 & 0x80)
        self._frame_is_data = opcode in (0x1, 0x2) or (opcode == 0x0 and
                                                        self._msg_opcode is not None)
        if opcode in (0x1, 0x2):              # a message starts
            compressed = bool(b0 & 0x40)
            self._msg_opcode, self._message = opcode, bytearray()
            self._msg_deflated = compressed and self._inflater is not None
            # Compressed without an agreed inflater, or masked (not a server frame): unreadable.
            self._skip_message = masked or (compressed and not self._msg_deflated)
        self._payload_left = length
        if not length:
            self._end_frame()
        return offset

    def _payload(self, data: bytes) -> None:
        if self._msg_deflated:
            self._inflate(data)
        elif self._msg_opcode == 0x1:
            self._keep(data)

    def _keep(self, data: bytes) -> None:
        if self._skip_message or not data:
            return
        if len(self._message) + len(data) > REALTIME_MESSAGE_LIMIT:
            self._skip_message, self._message = True, bytearray()
        else:
            self._message += data

    def _inflate(self, data: bytes, drain: bool = False) -> None:
        inflater = self._inflater
        try:
            while data or drain:
                # Bounded output per step: a small compressed message may inflate to gigabytes.
                out = inflater.decompress(data, 65536)
                if self._msg_opcode == 0x1:
                    self._keep(out)
                data = inflater.unconsumed_tail
                if not data and not out:
                    break           # at a message's end: nothing of it is left inside zlib
        except zlib.error:
            # The window is lost: no later compressed message can be read either.
            self._inflater, self._msg_deflated, self._skip_message = None, False, True

    def _end_frame(self) -> None:
        if not (self._frame_is_data and self._fin):
            return
        if self._msg_deflated and self._inflater is not None:
            # RFC 7692 §7.2.2: the tail each message lost; then all of the message's output.
            self._inflate(b"\x00\x00\xff\xff", drain=True)
            if self._inflater is not None and self._reset_window:
                self._inflater = zlib.decompressobj(-15)
        if self._msg_opcode == 0x1 and not self._skip_message \
                and b"response.done" in self._message:
            self._take(bytes(self._message))
        self._msg_opcode, self._message, self._skip_message = None, bytearray(), False

    def _take(self, text: bytes) -> None:
        try:
            event = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return
        if not isinstance(event, dict) or event.get("type") != "response.done":
            return
        response = event.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
        if not isinstance(usage, dict):
            return
        prompt = _usage_int(usage.get("input_tokens"))
        completion = _usage_int(usage.get("output_tokens"))
        total = _usage_int(usage.get("total_tokens")) or prompt + completion
        self.responses += 1
        self.usage["prompt"] += prompt
        self.usage["completion"] += completion
        self.usage["total"] += total
        self.usage["cacheRead"] += _usage_int(_usage_dig(usage, "input_token_details",
                                                         "cached_tokens"))
        self.usage["reasoning"] += _usage_int(_usage_dig(usage, "output_token_details",
                                                         "reasoning_tokens"))
        if isinstance(response.get("model"), str):
            self.model = response["model"]


class _Outbox:
    """Bytes waiting to be written to one side, kept as the pieces they were read in (no copy).

    A TLS write that could not finish must be repeated with the same piece (OpenSSL's SSL_write
    retry rule); the head piece stays in place until written, so it is.
    """

    def __init__(self, first: bytes = b"") -> None:
        self.pieces = collections.deque()
        self.size = 0
        if first:
            self.put(first)

    def __len__(self) -> int:
        return self.size

    def put(self, data) -> None:
        """Queue one piece."""
        self.pieces.append(data)
        self.size += len(data)

    def head(self):
        """The piece to write next."""
        return self.pieces[0]

    def consumed(self, n: int) -> None:
        """Drop the first n bytes of the head piece (all of it when n is its length)."""
        head = self.pieces[0]
        if n >= len(head):
            self.pieces.popleft()
        else:
            self.pieces[0] = memoryview(head)[n:]
        self.size -= n


class Tunnel:
    """Copies bytes both ways between a client (TLS) and the backend (TCP) after a 101.

    One poll loop in the handler's own thread, no extra thread: an SSLSocket must not be read
    and written from two threads at once (OpenSSL objects are not thread-safe). Both sockets are
    non-blocking; each direction holds at most TUNNEL_BUFFER_LIMIT bytes, so a slow reader
    slows its sender instead of growing memory, and one stalled direction never blocks the other.
    An end of stream on one side is passed on as a half-close (close_notify + FIN to the client,
    FIN to the backend); once both directions have ended, both sockets close.

    For the caller: run() -> who closed ("client", "backend", "idle", "shutdown", "error");
    stop() from another thread; up/down hold the bytes copied each way.
    """

    def __init__(self, client, backend, idle_timeout: float, end_timeout: float,
                 from_client: bytes = b"", from_backend: bytes = b"", tap=None) -> None:
        self.client = client
        self.backend = backend
        self.idle_timeout = idle_timeout
        self.end_timeout = end_timeout   # how long the other side may linger after a half-close
        self.to_backend = _Outbox(from_client)
        self.to_client = _Outbox(from_backend)
        self.tap = tap
        self.up = len(from_client)        # bytes client -> backend
        self.down = len(from_backend)     # bytes backend -> client
        if tap is not None and from_backend:
            self._feed_tap(from_backend)
        self.closed_by = None
        self._stopped = False
        self._client_read_wants_write = False
        self._client_unwrapped = False    # both close_notify exchanged: no TLS layer left to read

    def _feed_tap(self, data) -> None:
        # The tap only reads a copy; a bug in it must cost the usage count, never the tunnel.
        try:
            self.tap.feed(data)
        except Exception:                 # noqa: BLE001 - see above
            log.exception("websocket usage reader failed; usage of this tunnel not counted")
            self.tap = None

    def stop(self) -> None:
        """End the tunnel from another thread (shutdown): wakes the loop by shutting both sockets."""
        self._stopped = True
        for sock in (self.client, self.backend):
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def run(self) -> str:
        """Copy until both directions have ended (or idle/stop/error). Returns who closed."""
        client, backend = self.client, self.backend
        to_backend, to_client = self.to_backend, self.to_client
        _keepalive(client)
        _keepalive(backend)
        client.setblocking(False)
        backend.setblocking(False)
        waiter = _Wait([client, backend])
        client_eof = backend_eof = False      # read side ended
        client_shut = backend_shut = False    # our half-close sent to that side
        last_activity = time.monotonic()
        while True:
            if backend_eof and not to_client.size and not client_shut:
                client_shut = self._half_close_client()
                # Where unwrap() completes at once (Python 3.9), no TLS layer is left to read.
                client_eof = client_eof or self._client_unwrapped
            if client_eof and not to_backend.size and not backend_shut:
                backend_shut = True
                try:
                    backend.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            if client_shut and backend_shut or self._stopped:
                break
            read_client = not client_eof and to_backend.size < TUNNEL_BUFFER_LIMIT
            read_backend = not backend_eof and to_client.size < TUNNEL_BUFFER_LIMIT
            # Decrypted bytes OpenSSL holds already are invisible to poll(): read them first.
            pending = read_client and client.pending()
            timeout = self.end_timeout if (client_eof or backend_eof) else self.idle_timeout
            remaining = last_activity + timeout - time.monotonic()
            if remaining <= 0:
                self.closed_by = self.closed_by or "idle"
                break
            wants = [
                (read_client, bool(to_client.size) or self._client_read_wants_write
                 or (backend_eof and not client_shut)),
                (read_backend, bool(to_backend.size)),
            ]
            ((c_read, c_write), (b_read, _)) = waiter.wait(wants, 0 if pending else remaining)
            if self._stopped:
                break
            c_read = c_read or pending or (self._client_read_wants_write and c_write)
            moved = False
            side = "client"
            try:
                if c_read and read_client:
                    got = self._read_client()
                    if got is None:
                        client_eof = True
                        self.closed_by = self.closed_by or "client"
                    moved = bool(got)
                side = "backend"
                if b_read and read_backend:
                    data = backend.recv(READ_CHUNK)
                    if data:
                        to_client.put(data)
                        self.down += len(data)
                        if self.tap is not None:
                            self._feed_tap(data)
                        moved = True
                    else:
                        backend_eof = True
                        self.closed_by = self.closed_by or "backend"
                # Write at once what was just read, without waiting for poll() to call the
                # socket writable (it nearly always is): one poll() per message, not two.
                while to_backend.size:
                    try:
                        sent = backend.send(to_backend.head())
                    except (BlockingIOError, InterruptedError):
                        break
                    to_backend.consumed(sent)
                    moved = True
                side = "client"
                while to_client.size:
                    try:
                        # All or nothing: Python's SSLSocket never enables partial writes.
                        sent = client.send(to_client.head())
                    except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                        break                 # retried later with the same piece
                    to_client.consumed(sent)
                    moved = True
            except OSError as exc:
                # A reset, a TLS error, or a write to a side that is gone: nothing more can be
                # delivered either way.
                log.debug("websocket tunnel: %s side: %s", side, exc)
                self.closed_by = self.closed_by or side
                break
            if moved:
                last_activity = time.monotonic()
        if self._stopped:
            self.closed_by = "shutdown"
        return self.closed_by or "error"

    def _read_client(self):
        """Read what the client's TLS layer has: number of bytes, 0 for none yet, None at its end."""
        client = self.client
        self._client_read_wants_write = False
        total = 0
        while self.to_backend.size < TUNNEL_BUFFER_LIMIT:
            try:
                # A TLS record carries at most 16 KiB: a bigger buffer would only be allocated
                # and shrunk again on every read.
                data = client.recv(TLS_READ_CHUNK)
            except ssl.SSLWantReadError:
                return total
            except ssl.SSLWantWriteError:
                self._client_read_wants_write = True
                return total
            if not data:
                return None if not total else total   # the end is seen again on the next read
            self.to_backend.put(data)
            self.up += len(data)
            total += len(data)
        return total

    def _half_close_client(self) -> bool:
        """Tell the client the backend has finished: TLS close_notify, then a TCP FIN."""
        try:
            # Non-blocking, unwrap() sends close_notify and then reports that the client's own
            # close_notify has not come yet (SSLWantReadError); the client may still send.
            self.client.unwrap()
            self._client_unwrapped = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLWantWriteError:
            return False                  # the socket buffer is full: try again when writable
        except (OSError, ValueError):
            pass
        try:
            socket.socket.shutdown(self.client, socket.SHUT_WR)
        except OSError:
            pass
        return True


# ==================================================================================================
# HTTP layer, part 4: the TLS server
# ==================================================================================================

def client_ip(host: str) -> str:
    """A client's address as logged and counted: IPv4-mapped IPv6 (dual-stack listener) as IPv4."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


class ClientSlot:
    """One open client connection counted by ClientSlots; release() it once (repeats are no-ops)."""

    __slots__ = ("owner", "address", "reserve", "_released")

    def __init__(self, owner: "ClientSlots", address: str, reserve: bool) -> None:
        self.owner = owner
        self.address = address
        self.reserve = reserve       # one of the slots kept back for /_proxy/health
        self._released = False

    def release(self) -> None:
        """Give the slot back."""
        self.owner._release(self)


class ClientSlots:
    """Counts open client connections, in total and per client address.

    take(address) -> ClientSlot or None (turn the connection away); release the slot when the
    connection ends. The server's instance is ProxyServer.slots, used through
    ProxyServer.claim_slot().

    Policy: `total - reserve` general slots, of which one address may hold `per_client` (so
    one host cannot take every slot; loopback counts like any address). When the general slots
    are all taken, an address holding less than an equal share of them may take one reserve
    slot (one at a time): a health check gets through a full server, a greedy host does not.
    """

    def __init__(self, total: int, per_client: int = 0, reserve: Optional[int] = None) -> None:
        self.total = max(1, total)
        self.reserve = min(CONNECTION_RESERVE, self.total // 16) if reserve is None else reserve
        self.general = self.total - self.reserve
        # Half by default: one address may hold many streams (an agent swarm, a benchmark, a
        # Docker port mapping that shows every client as the gateway), yet never all of them.
        self.per_client = min(per_client or max(1, self.total // 2), self.general)
        self._lock = threading.Lock()
        self._held: Dict[str, List[int]] = {}     # address -> [general, reserve] slots held
        self._general_used = 0
        self._reserve_used = 0

    @property
    def open(self) -> int:
        """Slots held right now (general and reserve)."""
        with self._lock:
            return self._general_used + self._reserve_used

    def held_by(self, address: str) -> int:
        """Slots `address` holds right now."""
        with self._lock:
            return sum(self._held.get(address, (0, 0)))

    def take(self, address: str) -> Optional[ClientSlot]:
        """A slot for a new connection from `address`, or None when it must be turned away."""
        with self._lock:
            held = self._held.get(address, [0, 0])
            if held[0] < self.per_client and self._general_used < self.general:
                reserve = False
                self._general_used += 1
            elif (self._general_used >= self.general and self._reserve_used < self.reserve
                  and held[1] == 0
                  and held[0] < self.general // (len(self._held) + (address not in self._held))):
                reserve = True
                self._reserve_used += 1
            else:
                return None
            held[reserve] += 1
            self._held[address] = held
        return ClientSlot(self, address, reserve)

    def _release(self, slot: ClientSlot) -> None:
        with self._lock:
            if slot._released:
                return
            slot._released = True
            held = self._held[slot.address]
            held[slot.reserve] -= 1
            if slot.reserve:
                self._reserve_used -= 1
            else:
                self._general_used -= 1
            if not any(held):
                del self._held[slot.address]


class ProxyServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that accepts plain TCP and does the TLS handshake in the worker thread.

    Wrapping the listening socket would handshake inside accept(): one client that never sends a
    ClientHello would stall every other client. Here the accept loop only accepts.

    For the caller: serve_forever(), shutdown() (from another thread), server_close(),
    reload_tls(), reload_keys(), health(), wait_for_requests(), claim_slot(). Attributes:
    config, stats, upstream, ssl_context, slots (ClientSlots: the connection count per client
    address), keys (the KeyRing in force), rate_limiter.
    """

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, config: Config, stats, ssl_context: ssl.SSLContext) -> None:
        self.config = config
        self.stats = stats
        self.ssl_context = ssl_context
        self.keys = KeyRing(config.access_keys, config.target_api_key)   # swapped by reload_keys()
        self.rate_limiter = RateLimiter()
        self.upstream = UpstreamPool(config.target_host, config.target_port,
                                     config.connect_timeout, config.read_timeout)
        host_port = authority(config.target_host, config.target_port)
        self.upstream_host_header = host_port[:-3] if host_port.endswith(":80") else host_port
        self._health_lock = threading.Lock()
        self._health_cache = (0.0, None)
        self._active = 0
        self._active_changed = threading.Condition()
        self.slots = ClientSlots(config.max_connections, config.max_connections_per_client)
        self._tunnels = set()                 # open WebSocket tunnels, closed at shutdown
        self._tunnels_lock = threading.Lock()
        self._last_refusal_log = -1e9
        self._accept_delay = 0.0
        self._last_accept_error_log = -1e9
        # Per-client-address or per-origin "say it once" memory for explanatory log lines.
        self._said = {}                  # (topic, key) -> monotonic time it was last logged
        self._said_lock = threading.Lock()
        family, address = _listen_address(config.bind, config.port)
        self.address_family = family
        super().__init__(address, ProxyHandler, bind_and_activate=False)
        try:
            if family == socket.AF_INET6 and not config.bind:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.server_bind()
            self.server_activate()
        except OSError:
            self.server_close()
            raise

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a DNS lookup that can hang for seconds at start.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "llm-proxy"
        self.server_port = self.server_address[1]

    def get_request(self):
        # accept() failing for want of descriptors or memory leaves the connection in the
        # backlog and the listener readable: retrying at once spins a core at 100%. Back off
        # like Go's net/http Server.Serve (5 ms doubling to 1 s) and say so once a minute.
        try:
            accepted = self.socket.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._accept_delay = min(1.0, self._accept_delay * 2 or 0.005)
                now = time.monotonic()
                if now - self._last_accept_error_log > 60:
                    self._last_accept_error_log = now
                    log.warning("cannot accept connections: %s (%s); new clients wait. Raise the "
                                "open-file limit (LimitNOFILE, ulimit -n) or lower "
                                "proxy.maxConnections", exc.strerror or exc,
                                errno.errorcode.get(exc.errno, exc.errno))
                time.sleep(self._accept_delay)
            raise
        self._accept_delay = 0.0
        return accepted

    def claim_slot(self, client_address) -> Optional[ClientSlot]:
        """A connection slot for `client_address` ((host, port, ...) as accept() gives it), or
        None when that address (or the server) is at its limit. Release it when done.

        Each accepted connection holds one (ProxyHandler.slot) until it closes; a connection
        upgraded to a tunnel keeps it, so tunnels count against proxy.maxConnections and
        proxy.maxConnectionsPerClient as they are (never upgrade one on a reserve slot:
        ProxyHandler.on_reserve). Claim another only for something a client holds open
        without a connection of its own.
        """
        return self.slots.take(client_ip(client_address[0]))

    def process_request(self, request, client_address) -> None:
        # One thread per connection, up to proxy.maxConnections and proxy.maxConnectionsPerClient:
        # past that a flood of connections is turned away here instead of exhausting memory.
        address = client_ip(client_address[0])
        slot = self.claim_slot(client_address)
        if slot is None:
            self.shutdown_request(request)
            now = time.monotonic()
            if now - self._last_refusal_log > 10:
                self._last_refusal_log = now
                if self.slots.held_by(address) >= self.slots.per_client:
                    log.warning("refusing connections from %s: it holds %d "
                                "(proxy.maxConnectionsPerClient)", address, self.slots.per_client)
                else:
                    log.warning("refusing connections: %d open (proxy.maxConnections)",
                                self.config.max_connections)
            return
        try:
            threading.Thread(target=self.process_request_thread,
                             args=(request, client_address, slot), daemon=True).start()
        except RuntimeError:          # "can't start new thread": turn this one away
            slot.release()
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address, slot=None) -> None:
        """Serve one connection in its own thread; the slot is released when it ends."""
        try:
            self.finish_request(request, client_address, slot)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            if slot is not None:
                slot.release()

    def finish_request(self, request, client_address, slot=None) -> None:
        """Handshake in this worker thread (bounded by clientTimeout), then serve the connection.

        The first byte is peeked at first, as nginx does: a plain-HTTP request on this HTTPS
        port gets a short 400 naming the https:// URL instead of a TLS error or a reset."""
        reserve = slot is not None and slot.reserve
        timeout = min(self.config.client_timeout, RESERVE_CLIENT_TIMEOUT) if reserve \
            else self.config.client_timeout
        deadline = time.monotonic() + timeout
        request.settimeout(timeout)
        try:
            first = request.recv(1, socket.MSG_PEEK)
            local = request.getsockname()
        except OSError:
            return
        if not first:
            return
        if b"A" <= first <= b"Z":        # a TLS record starts with 0x16; an HTTP method with A-Z
            answer_plain_http(self, request, client_address, local, deadline)
            return
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True,
                                               do_handshake_on_connect=False)
        except OSError:
            return
        try:
            tls.do_handshake()
        except (OSError, ValueError) as exc:
            log.debug("TLS handshake with %s failed: %s", client_address[0], exc)
            if _is_untrusted_certificate_alert(exc):
                ip = _plain_ip(client_address[0])
                if self.say_once("untrusted", ip, EXPLAIN_AGAIN_SECONDS):
                    log.info("%s does not trust this proxy's certificate (%s): open %s on that "
                             "device to install the CA (logged once per %d min per address)",
                             ip, getattr(exc, "reason", None) or "rejected",
                             _url_of(local, "/_proxy/"), EXPLAIN_AGAIN_SECONDS // 60)
            tls.close()
            return
        try:
            handler = self.RequestHandlerClass(tls, client_address, self, slot)
            if handler.linger:
                _lingering_close(tls)
        finally:
            try:
                tls.close()
            except OSError:
                pass

    def say_once(self, topic: str, key: str, interval: Optional[float] = None) -> bool:
        """True when a log line about (topic, key) is due: the first time, or again after
        `interval` seconds (None: only once per run). The memory is bounded, so a flood of
        distinct keys cannot grow it without limit (it then simply starts over)."""
        now = time.monotonic()
        with self._said_lock:
            last = self._said.get((topic, key))
            if last is not None and (interval is None or now - last < interval):
                return False
            if len(self._said) >= SAY_ONCE_MEMORY:
                self._said.clear()
            self._said[(topic, key)] = now
            return True

    def note_refused_origin(self, origin: str) -> None:
        """Log, once per origin, that a web page's origin was refused and which setting allows it."""
        origin = origin[:200]
        if self.say_once("origin", origin.lower()):
            log.warning("refused requests from origin %s: it is not in proxy.allowedOrigins "
                        "(config file) or ALLOWED_ORIGINS; add it there to allow that web app "
                        "(logged once per origin)", origin)

    def request_started(self) -> None:
        """Count a forwarded request as in flight (shutdown waits for these, not idle clients)."""
        with self._active_changed:
            self._active += 1
        self.stats.request_started()

    def request_finished(self) -> None:
        self.stats.request_finished()
        with self._active_changed:
            self._active -= 1
            self._active_changed.notify_all()

    def track_tunnel(self, tunnel, is_open: bool) -> None:
        """Note a WebSocket tunnel opening (True) or ending (False), for close_tunnels()."""
        with self._tunnels_lock:
            if is_open:
                self._tunnels.add(tunnel)
            else:
                self._tunnels.discard(tunnel)

    def close_tunnels(self) -> int:
        """End every open WebSocket tunnel (shutdown, after the grace period); returns how many."""
        with self._tunnels_lock:
            tunnels = list(self._tunnels)
        for tunnel in tunnels:
            tunnel.stop()
        return len(tunnels)

    def handle_error(self, request, client_address) -> None:
        log.exception("unexpected error while serving %s", client_address[0])

    def wait_for_requests(self, timeout: float) -> bool:
        """Wait until no forwarded request is in flight; True if all finished in time."""
        deadline = time.monotonic() + timeout
        with self._active_changed:
            while self._active:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._active_changed.wait(remaining)
        return True

    def reload_tls(self) -> None:
        """Load the certificate and key again; new connections use them (SIGHUP)."""
        self.ssl_context = make_server_ssl_context(self.config.cert_file, self.config.key_file)

    def reload_keys(self) -> KeyRing:
        """Read the config file again and swap in its access keys and target.apiKey (SIGHUP).

        Only these are reloaded; other settings need a restart. Raises ConfigError and keeps
        the keys in force when the file is invalid. Open connections are not touched.
        """
        fresh = load_config(self.config.source, search_cwd=self.config.source is None)
        self.keys = KeyRing(fresh.access_keys, fresh.target_api_key)
        return self.keys

    def health(self) -> dict:
        """Proxy status and whether the backend accepts a TCP connection (cached a few seconds).

        "status" is "ok", or "degraded" with a "reason" when the backend does not accept
        connections. The HTTP status stays 200 either way: the proxy itself is alive, and a
        liveness check (Docker's HEALTHCHECK, --healthcheck) must not restart it for a backend
        that is down; monitoring that cares about the backend reads "status"."""
        with self._health_lock:
            checked, backend = self._health_cache
            if backend is None or time.monotonic() - checked > HEALTH_CACHE_SECONDS:
                backend = self._probe_backend()
                self._health_cache = (time.monotonic(), backend)
        snapshot_uptime = time.monotonic() - START_MONOTONIC
        result = {"status": "ok" if backend["reachable"] else "degraded", "version": VERSION,
                  "uptime": format_uptime(snapshot_uptime),
                  "uptimeSeconds": int(snapshot_uptime), "backend": backend,
                  "accessKeys": self.keys.required}
        if not backend["reachable"]:
            result["reason"] = "backend %s is not reachable: %s" % (backend["url"],
                                                                   backend["error"])
        return result

    def _probe_backend(self) -> dict:
        started = time.monotonic()
        result = {"url": self.upstream.url, "reachable": False, "latencyMs": None, "error": None,
                  "checkedAt": iso_utc(time.time())}
        try:
            probe = socket.create_connection((self.config.target_host, self.config.target_port),
                                             timeout=min(2.0, self.config.connect_timeout))
            probe.close()
            result["reachable"] = True
            result["latencyMs"] = round((time.monotonic() - started) * 1000, 2)
        except OSError as exc:
            result["error"] = _describe_os_error(exc)
        return result


START_MONOTONIC = time.monotonic()

# TLS alerts a client sends when it does not trust our certificate (RFC 8446 §6.2: unknown_ca
# from OpenSSL/curl/Python, bad_certificate and certificate_unknown from browsers and others).
UNTRUSTED_CERT_ALERTS = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN")
# Explanations of a client's mistake are repeated at most this often per client address.
EXPLAIN_AGAIN_SECONDS = 600
PLAIN_HTTP_HEAD_LIMIT = 16384


def _is_untrusted_certificate_alert(exc: BaseException) -> bool:
    reason = (getattr(exc, "reason", None) or str(exc)).upper()
    return isinstance(exc, ssl.SSLError) and any(a in reason for a in UNTRUSTED_CERT_ALERTS)


def _plain_ip(host: str) -> str:
    """An address as people write it (IPv4-mapped IPv6 shown as plain IPv4)."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def _url_of(local_address, path: str, host: Optional[str] = None) -> str:
    """https:// URL of this proxy as a client reached it (the socket's local address)."""
    if host is None:
        ip = _plain_ip(local_address[0])
        host = authority(ip, local_address[1])
    return "https://%s%s" % (host, path)


_PLAIN_HOST = re.compile(rb"(?im)^host:[ \t]*([A-Za-z0-9.\-]{1,253}(?::[0-9]{1,5})?|"
                         rb"\[[0-9A-Fa-f:.]{2,45}\](?::[0-9]{1,5})?)[ \t]*\r?$")


def answer_plain_http(server, sock, client_address, local, deadline: float) -> None:
    """Answer a plain-HTTP request sent to the HTTPS port with a 400 that names the https://
    URL (as nginx does), and log it in words, rate-limited per client address.

    The request head is read first (bounded in size and by clientTimeout) and the connection
    is shut down gently, so the client gets the answer instead of a reset."""
    head = b""
    try:
        while b"\r\n\r\n" not in head and b"\n\n" not in head \
                and len(head) < PLAIN_HTTP_HEAD_LIMIT:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(PLAIN_HTTP_HEAD_LIMIT - len(head))
            if not data:
                break
            head += data
    except OSError:
        pass
    match = _PLAIN_HOST.search(head)
    host = match.group(1).decode("ascii") if match else None
    if host is not None and (host.endswith("]") or ":" not in host):
        # No port: the client wrote http://name/ and something forwarded port 80 here. With a
        # port, http://name:port/ reached this very port: https://name:port/ is the answer, also
        # behind a port mapping (Docker 9443:8443) that our own socket knows nothing about.
        host = "%s:%d" % (host, local[1]) if local[1] != 443 else host
    url = _url_of(local, "/", host)
    ip = _plain_ip(client_address[0])
    if server.say_once("plain-http", ip, EXPLAIN_AGAIN_SECONDS):
        log.info("%s sent plain HTTP to this HTTPS port; told it to use %s (logged once per "
                 "%d min per address)", ip, url, EXPLAIN_AGAIN_SECONDS // 60)
    body = ("400 Bad Request: this port speaks HTTPS only. Use %s\n" % url).encode("ascii")
    response = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Length: %d\r\nX-Content-Type-Options: nosniff\r\n"
                b"Connection: close\r\n\r\n" % len(body)) + body
    try:
        sock.settimeout(max(0.01, min(2.0, deadline - time.monotonic())))
        sock.sendall(response)
        sock.shutdown(socket.SHUT_WR)
        # Read what else the client sent (a body) before closing: closing with unread data
        # makes the kernel send a reset, which can destroy our answer in flight.
        drained, until = 0, time.monotonic() + 1.0
        while drained < 1 << 20 and time.monotonic() < until:
            sock.settimeout(max(0.01, until - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass



def _listen_address(bind: str, port: int):
    """(family, address) to listen on: dual-stack '::' by default where IPv6 exists."""
    if not bind:
        if socket.has_ipv6:
            try:
                probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                probe.close()
                return socket.AF_INET6, ("::", port)
            except OSError:
                pass
        return socket.AF_INET, ("0.0.0.0", port)
    try:
        return (socket.AF_INET6 if ipaddress.ip_address(bind.strip("[]")).version == 6
                else socket.AF_INET), (bind.strip("[]"), port)
    except ValueError:
        return socket.AF_INET, (bind, port)


def build_server(config: Config, stats=None, ssl_context: Optional[ssl.SSLContext] = None):
    """Create a bound, listening ProxyServer (not yet serving). Raises CertificateError or OSError."""
    if ssl_context is None:
        ssl_context = make_server_ssl_context(config.cert_file, config.key_file)
    if stats is None:
        stats = StatsStore(history_size=config.history_size,
                           path=config.stats_file if config.tracking_enabled else None,
                           enabled=config.tracking_enabled)
    return ProxyServer(config, stats, ssl_context)


def raise_fd_limit(wanted: int) -> Optional[Tuple[int, int]]:
    """Raise the soft RLIMIT_NOFILE towards `wanted`, never past the hard limit.

    Returns (soft limit before, soft limit now), or None where the platform has no such limit
    (Windows has no resource module). The common soft limit of 1024 would otherwise end the
    proxy at about 460 streams with EMFILE while the hard limit allows far more.
    """
    try:
        import resource
    except ImportError:
        return None
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize, sys.maxsize
    if soft >= wanted:
        return soft, soft
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft, soft             # macOS refuses more than kern.maxfilesperproc
    return soft, target


def fit_connections_to_fd_limit(config: Config) -> Config:
    """Raise the open-file limit for proxy.maxConnections, or lower maxConnections to fit it.

    Each connection needs two descriptors (client and backend socket) plus FD_RESERVE for the
    rest of the process. Logs what it changed; returns the config to serve with.
    """
    limits = raise_fd_limit(2 * config.max_connections + FD_RESERVE)
    if limits is None:
        return config
    before, soft = limits
    if soft > before:
        log.info("raised the open-file limit (RLIMIT_NOFILE) from %d to %d", before, soft)
    affordable = max(1, (soft - FD_RESERVE) // 2)
    if affordable >= config.max_connections:
        return config
    log.warning("proxy.maxConnections lowered from %d to %d: the open-file limit is %d and each "
                "connection needs 2 (raise it with LimitNOFILE= or ulimit -n)",
                config.max_connections, affordable, soft)
    return dataclasses.replace(config, max_connections=affordable)


# ==================================================================================================
# Service: pidfile, daemon mode, signals, the serve loop
# ==================================================================================================

def open_regular_file(path: str, flags: int, mode: int = 0o644, one_link: bool = True) -> int:
    """os.open() for the files the proxy keeps beside its config (pidfile, log file, stats.json),
    which a local user may be able to prepare: never through a symlink (O_NOFOLLOW), only a
    regular file, with no other hard link (``one_link``: a file only read, or replaced by rename,
    may have them), and never writable by others even under umask 000. Returns the descriptor;
    raises OSError whose strerror says what is wrong and how to fix it (IsADirectoryError for a
    folder)."""
    nonblock = getattr(os, "O_NONBLOCK", 0)  # a planted FIFO must not hang open()
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | nonblock
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(exc.errno, "it is a symbolic link, which is not followed; remove it "
                          "(rm %s) or choose another path" % path, path) from None
        if exc.errno == errno.ENXIO:  # a FIFO with no reader
            raise OSError(exc.errno, "it is not a regular file; remove it or choose another "
                          "path", path) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EISDIR if stat.S_ISDIR(info.st_mode) else errno.EINVAL,
                          "it is not a regular file; remove it or choose another path", path)
        if one_link and info.st_nlink != 1:
            raise OSError(errno.EMLINK, "it has %d hard links (another name for the same file); "
                          "remove it (rm %s) or choose another path" % (info.st_nlink, path), path)
        if nonblock:
            os.set_blocking(fd, True)
        if os.name == "posix" and info.st_mode & 0o022 and info.st_uid == os.geteuid() \
                and flags & (os.O_WRONLY | os.O_RDWR):    # a file only read is not changed
            os.fchmod(fd, stat.S_IMODE(info.st_mode) & ~0o022)  # left by an umask of 000
    except BaseException:
        os.close(fd)
        raise
    return fd


class PidFile:
    """A pidfile guarded by an exclusive flock: the lock, not the number, says who is alive.

    A stale file (its process died) holds no lock and is simply taken over.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = None

    def acquire(self) -> Optional[int]:
        """Take the lock. Returns None on success, or the pid of the instance holding it."""
        import fcntl
        fd = open_regular_file(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                owner = int(os.read(fd, 32).decode("ascii", "replace").strip() or 0)
            except ValueError:
                owner = 0
            os.close(fd)
            return owner or -1
        self.fd = fd
        # Our pid at once (a stale number would otherwise show until the daemon writes its own):
        # the first start makes certificates for seconds, and meanwhile a second --daemon or a
        # --stop must see who holds the lock.
        self.write(os.getpid())
        return None

    def write(self, pid: int) -> None:
        """Record `pid` in the locked file."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, b"%d\n" % pid, 0)

    def release(self) -> None:
        """Remove the file and drop the lock (at exit)."""
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def stop_daemon(pidfile_path: str, timeout: float = 15.0) -> int:
    """--stop: SIGTERM the instance holding the pidfile and wait until it has exited."""
    probe = PidFile(pidfile_path)
    if not os.path.lexists(pidfile_path):
        print("not running (no pidfile %s)" % pidfile_path)
        return 0
    try:
        owner = probe.acquire()
    except OSError as exc:
        print("error: cannot use pidfile %s: %s" % (pidfile_path, exc.strerror or exc),
              file=sys.stderr)
        return 1
    if owner is None:
        probe.release()
        print("not running (removed stale pidfile %s)" % pidfile_path)
        return 0
    if owner <= 0:
        print("error: pidfile %s is locked but holds no pid" % pidfile_path, file=sys.stderr)
        return 1
    os.kill(owner, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if probe.acquire() is None:
            probe.release()
            print("stopped (pid %d)" % owner)
            return 0
    print("error: pid %d did not stop within %ds" % (owner, timeout), file=sys.stderr)
    return 1


def daemonize() -> int:
    """Detach from the terminal (double fork). Returns, in the daemon, a pipe fd to report on.

    The original process waits on that pipe and exits only when the daemon says it is serving,
    so a script (or cron line) that runs --daemon twice in a row sees the first one's pidfile.
    """
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        pieces = []
        while True:                 # until the daemon closes its end (or dies)
            piece = os.read(read_end, 65536)
            if not piece:
                break
            pieces.append(piece)
        message = b"".join(pieces).decode("utf-8", "replace")
        # flush: os._exit() skips it, and stdout to a pipe or file (cron) is block-buffered.
        print(message or "error: the daemon exited during start-up (see the log file)",
              flush=True)
        os._exit(0 if message.startswith("started") else 1)
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return write_end


class Maintenance(threading.Thread):
    """Background upkeep: notice a certificate replaced on disk and load it for new connections."""

    def __init__(self, server: "ProxyServer", interval: float = 5.0) -> None:
        super().__init__(name="maintenance", daemon=True)
        self.server = server
        self.interval = interval
        self.stopped = threading.Event()
        self._stamp = self._cert_stamp()

    def _cert_stamp(self):
        stamps = []
        for path in (self.server.config.cert_file, self.server.config.key_file):
            try:
                info = os.stat(path)
                stamps.append((info.st_mtime_ns, info.st_size, info.st_ino))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            stamp = self._cert_stamp()
            if stamp != self._stamp and None not in stamp:
                self._stamp = stamp
                reload_certificate(self.server, "certificate files changed on disk")


def reload_certificate(server: "ProxyServer", why: str) -> None:
    """Swap in the certificate on disk for new connections; keep the old one if it fails."""
    try:
        server.reload_tls()
        log.info("reloaded TLS certificate (%s)", why)
    except CertificateError as exc:
        log.error("kept the previous certificate: %s", exc)


def reload_access_keys(server: "ProxyServer", why: str) -> None:
    """Swap in the access keys of the config file; keep the ones in force if it is invalid."""
    try:
        keyring = server.reload_keys()
        log.info("reloaded access keys (%s): %s", why,
                 ", ".join(k.name for k in keyring.keys) or "none, the proxy is open")
    except ConfigError as exc:
        log.error("kept the previous access keys: %s", exc)


def reload_on_sighup(server: "ProxyServer") -> None:
    """SIGHUP: the certificate and the access keys, for new requests; no connection drops."""
    reload_certificate(server, "SIGHUP")
    reload_access_keys(server, "SIGHUP")


def serve(server: "ProxyServer", ready=None) -> int:
    """Serve until SIGTERM/SIGINT, then drain in-flight requests and save the stats. Returns 0."""
    def request_stop(signum, frame) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(
            target=reload_on_sighup, args=(server,), daemon=True).start())
    maintenance = Maintenance(server)
    maintenance.start()
    if server.config.tracking_enabled:
        server.stats.start_autosave(server.config.persist_interval)
    if ready is not None:
        ready()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        maintenance.stopped.set()
        server.server_close()
        drained = server.wait_for_requests(SHUTDOWN_GRACE_SECONDS)
        if not drained and server.close_tunnels():
            # WebSockets do not end by themselves: past the grace period they are closed (and
            # recorded) like any request still running.
            drained = server.wait_for_requests(1.0)
        if not drained:
            log.warning("stopping with requests still in flight after %gs", SHUTDOWN_GRACE_SECONDS)
        server.stats.stop_autosave()
        server.upstream.close_all()
        log.info("stopped")
    return 0


# ==================================================================================================
# Command line
# ==================================================================================================

# -- what clients paste ----------------------------------------------------------------------------

class ClientFamily(NamedTuple):
    """One kind of client and the base URL it needs. The banner, the set-up page, --help and
    README (checked by a test) all read CLIENT_FAMILIES, so the URLs are stated once."""
    key: str            # id on the set-up page
    label: str          # who uses it
    suffix: str         # appended to https://<proxy>:<port>
    why: str            # why this URL and not another
    python: str         # copy-paste snippet: {base} is the base URL, {ca} the CA file
    javascript: str     # the same for Node.js


CLIENT_FAMILIES = (
    ClientFamily(
        "openai", "OpenAI SDKs and OpenAI-compatible apps", "/v1",
        "the SDK appends /chat/completions, /models, ... to it",
        'import ssl, openai\n'
        '\n'
        '# or leave http_client out and run with SSL_CERT_FILE={ca}\n'
        'client = openai.OpenAI(\n'
        '    base_url="{base}",\n'
        '    api_key="unused",  # or your access key, if the proxy has them\n'
        '    http_client=openai.DefaultHttpxClient(\n'
        '        verify=ssl.create_default_context(cafile="{ca}")))\n',
        '// run with: NODE_EXTRA_CA_CERTS={ca} node app.mjs\n'
        'import OpenAI from "openai";\n'
        '\n'
        'const client = new OpenAI({\n'
        '  baseURL: "{base}",\n'
        '  apiKey: "unused", // or your access key, if the proxy has them\n'
        '});\n'),
    ClientFamily(
        "anthropic", "Anthropic SDKs", "",
        "the SDK appends /v1/messages itself",
        'import ssl, anthropic\n'
        '\n'
        '# or leave http_client out and run with SSL_CERT_FILE={ca}\n'
        'client = anthropic.Anthropic(\n'
        '    base_url="{base}",\n'
        '    api_key="unused",  # or your access key, if the proxy has them\n'
        '    http_client=anthropic.DefaultHttpxClient(\n'
        '        verify=ssl.create_default_context(cafile="{ca}")))\n',
        '// run with: NODE_EXTRA_CA_CERTS={ca} node app.mjs\n'
        'import Anthropic from "@anthropic-ai/sdk";\n'
        '\n'
        'const client = new Anthropic({\n'
        '  baseURL: "{base}",\n'
        '  apiKey: "unused", // or your access key, if the proxy has them\n'
        '});\n'),
    ClientFamily(
        "ollama", "Ollama clients (native /api)", "",
        "the client appends /api/chat, /api/tags, ... itself",
        'import ssl, ollama\n'
        '\n'
        'client = ollama.Client(\n'
        '    host="{base}",\n'
        '    verify=ssl.create_default_context(cafile="{ca}"))\n',
        '// run with: NODE_EXTRA_CA_CERTS={ca} node app.mjs\n'
        'import { Ollama } from "ollama";\n'
        '\n'
        'const client = new Ollama({ host: "{base}" });\n'),
)

# The file name the set-up page saves the CA under; snippets meant for another machine use it.
CA_DOWNLOAD_NAME = "llm-proxy-ca.pem"

# The proxy's own endpoints, for --help (a test checks this covers ProxyHandler.INTERNAL_ROUTES).
PROXY_ENDPOINTS = (
    ("/_proxy/", "set-up page for a new device: base URLs, CA download, trust steps"),
    ("/_proxy/dashboard", "usage dashboard"),
    ("/_proxy/stats", "usage as JSON"),
    ("/_proxy/reset", "POST: zero the usage figures"),
    ("/_proxy/metrics", "Prometheus metrics"),
    ("/_proxy/health", "proxy and backend status as JSON"),
    ("/_proxy/ca.pem", "the local CA certificate (/_proxy/ca.crt: DER, for phones)"),
)


def client_snippet(family: ClientFamily, language: str, origin: str,
                   ca_file: str = CA_DOWNLOAD_NAME) -> str:
    """The family's Python or JavaScript snippet for a proxy at `origin` (https://host:port)."""
    template = family.python if language == "python" else family.javascript
    return template.replace("{base}", origin + family.suffix).replace("{ca}", ca_file)


def _help_epilog() -> str:
    width = max(len(name) for name, _ in ENV_OVERRIDES + ((ACCESS_KEY_ENV, ""),))
    lines = ["environment variables (override the config file):"]
    lines += ["  %-*s  %s%s" % (width, name, dotted, " (comma-separated)"
                                if isinstance(SETTINGS_BY_KEY[dotted].default, list) else "")
              for name, dotted in ENV_OVERRIDES]
    lines.append("  %-*s  adds one access key named '%s'" % (width, ACCESS_KEY_ENV,
                                                            ACCESS_KEY_ENV_NAME))
    lines += ["", "base URLs to give clients:"]
    width = max(len(f.label) for f in CLIENT_FAMILIES)
    lines += ["  %-*s  https://<this-machine>:8443%s" % (width, f.label, f.suffix)
              for f in CLIENT_FAMILIES]
    lines += ["", "endpoints of the proxy itself (every other path goes to the backend):"]
    width = max(len(path) for path, _ in PROXY_ENDPOINTS)
    lines += ["  %-*s  %s" % (width, path, what) for path, what in PROXY_ENDPOINTS]
    lines += [
        "",
        "examples:",
        "  python3 proxy.py",
        "      HTTPS on port 8443 for http://127.0.0.1:11434 (Ollama); certificates are made",
        "      at first start in ./certs",
        "  TARGET_HOST=192.168.1.42 TARGET_PORT=8080 python3 proxy.py",
        "      another backend",
        "  python3 /opt/llm-proxy/proxy.py --dir /opt/llm-proxy --daemon",
        "      cron: start in the background unless running; state files in /opt/llm-proxy",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of proxy.py."""
    parser = argparse.ArgumentParser(
        prog="proxy.py",
        description="HTTPS proxy in front of a plain-HTTP LLM backend, with token tracking.",
        epilog=_help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="PATH",
                        help="config file (default: ./config.json if present, else built-in defaults)")
    parser.add_argument("--dir", metavar="DIR",
                        help="folder for config.json (optional), certs/, stats.json and, with "
                             "--daemon, llm-proxy.pid and llm-proxy.log (default: the current "
                             "folder); for cron, which starts in $HOME")
    parser.add_argument("--port", type=int, metavar="N",
                        help="HTTPS port to listen on (overrides proxy.port and PROXY_PORT)")
    parser.add_argument("--target", metavar="URL",
                        help="backend as http://HOST:PORT, HOST:PORT or HOST (overrides "
                             "target.host/target.port and TARGET_HOST/TARGET_PORT)")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"),
                        help="how much to log (default: info, one line per request)")
    parser.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    parser.add_argument("--log-file", metavar="PATH",
                        help="log to this file (rotated at 5 MiB) instead of stderr")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and certificates, then exit (0 good, 2 bad)")
    parser.add_argument("--daemon", action="store_true",
                        help="detach and run in the background (POSIX); safe to repeat from cron")
    parser.add_argument("--stop", action="store_true",
                        help="stop the daemon started with the same --dir, --config or "
                             "--pidfile, and wait for it to exit")
    parser.add_argument("--pidfile", metavar="PATH",
                        help="pidfile for --daemon/--stop (default: llm-proxy.pid beside the "
                             "config, else in --dir or the current folder)")
    parser.add_argument("--healthcheck", action="store_true",
                        help="ask a running proxy's /_proxy/health: exit 0 while it answers, "
                             "also when it reports the backend down (\"degraded\"), 1 when it "
                             "does not answer; used by the Docker HEALTHCHECK")
    keys = parser.add_argument_group("access keys (see README, Access keys)")
    keys.add_argument("--add-key", metavar="NAME",
                      help="make a random access key NAME, add it to the config file (created "
                           "if missing) and print it once with client snippets")
    keys.add_argument("--daily-tokens", metavar="N", type=int,
                      help="with --add-key: tokens the key may use per day (local time)")
    keys.add_argument("--requests-per-minute", metavar="N", type=int,
                      help="with --add-key: requests the key may start per minute")
    keys.add_argument("--list-keys", action="store_true",
                      help="list the access keys (names, budgets, today's use; never the keys)")
    keys.add_argument("--remove-key", metavar="NAME", help="remove access key NAME from the config file")
    parser.add_argument("--version", action="version", version="%(prog)s " + VERSION)
    return parser


def _key_config_path(args) -> str:
    """The config file --add-key/--remove-key edit: --config, else ./config.json."""
    return os.path.abspath(args.config or "config.json")


def _read_config_document(path: str) -> dict:
    """The config file as a JSON object (key order kept), after checking it is a valid config:
    a file we could not start with is never edited. {} when the file does not exist."""
    if not os.path.exists(path):
        return {}
    load_config(path, environ={})           # every error the proxy would report at start
    with open(path, "r", encoding="utf-8-sig") as handle:
        return json.load(handle)


def _write_config_document(path: str, document: dict) -> None:
    """Replace the config file atomically with mode 0600 (it holds keys), keeping its owner."""
    try:
        owner = os.stat(path)
    except OSError:
        owner = None
    data = (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    _write_file_atomic(path, data, private=True)
    if owner is not None and hasattr(os, "chown") and hasattr(os, "geteuid") and os.geteuid() == 0:
        # root editing a service's file: the service must still be able to read it.
        try:
            os.chown(path, owner.st_uid, owner.st_gid)
        except OSError:
            pass


def _config_edit_failed(path: str, exc: Exception) -> int:
    """Say why --add-key/--remove-key could not edit the config file; the exit status: 2 for a
    config problem, 1 when the file could not be written."""
    if isinstance(exc, ConfigError):
        print("error: %s" % exc, file=sys.stderr)
        return 2
    print("error: cannot write %s: %s" % (path, getattr(exc, "strerror", None) or exc),
          file=sys.stderr)
    return 1


def _key_table(document: dict, path: str) -> dict:
    access = document.setdefault("access", {})
    if not isinstance(access, dict):
        raise ConfigError("%s: access must be a JSON object" % path)
    return access.setdefault("keys", {})


def add_key(args) -> int:
    """--add-key NAME: make a key, add it to the config file, print it once. Returns 0 or 2."""
    path = _key_config_path(args)
    name = args.add_key
    problem = check_access_key_name(name)
    if problem:
        print("error: --add-key: the name %s" % problem, file=sys.stderr)
        return 2
    for flag, value, upper in (("--daily-tokens", args.daily_tokens, ACCESS_LIMIT_MAX),
                               ("--requests-per-minute", args.requests_per_minute, ACCESS_RATE_MAX)):
        if value is not None and not 1 <= value <= upper:
            print("error: %s must be from 1 to %d" % (flag, upper), file=sys.stderr)
            return 2
    try:
        document = _read_config_document(path)
        table = _key_table(document, path)
        if not isinstance(table, dict):
            raise ConfigError("%s: access.keys must be a JSON object" % path)
        if name in table:
            print("error: %s already has an access key named '%s' (--remove-key %s first to "
                  "replace it)" % (path, name, name), file=sys.stderr)
            return 2
        secret = "sk-llmproxy-" + secrets.token_urlsafe(32)     # 256 random bits
        entry: Any = secret
        if args.daily_tokens is not None or args.requests_per_minute is not None:
            entry = {"key": secret}
            if args.daily_tokens is not None:
                entry["dailyTokens"] = args.daily_tokens
            if args.requests_per_minute is not None:
                entry["requestsPerMinute"] = args.requests_per_minute
        table[name] = entry
        parse_access_keys(table, path)
        _write_config_document(path, document)
        config = load_config(path, environ={})
    except (ConfigError, OSError) as exc:
        return _config_edit_failed(path, exc)
    limits = []
    if args.daily_tokens is not None:
        limits.append("%s tokens a day" % format(args.daily_tokens, ","))
    if args.requests_per_minute is not None:
        limits.append("%d requests a minute" % args.requests_per_minute)
    # The address and base URLs the banner shows (no certificate read here: its addresses are
    # only the last fallback of public_host()).
    origin = "https://%s:%d" % (public_host(config), config.port or 8443)
    url = {family.key: origin + family.suffix for family in CLIENT_FAMILIES}
    print("Added access key '%s' to %s%s." % (name, path,
                                              " (" + ", ".join(limits) + ")" if limits else ""))
    print("The key (it is in the config file too; --list-keys shows names only):\n")
    print("    %s\n" % secret)
    print("Give it to the client as its API key, with the base URL for its kind:")
    print("\n".join(client_urls(origin)) + "\n")
    print("OpenAI SDK (Python; JavaScript takes the same baseURL and apiKey):")
    print("    from openai import OpenAI")
    print('    client = OpenAI(base_url="%s", api_key="%s")\n' % (url["openai"], secret))
    print("Anthropic SDK (Python):")
    print("    from anthropic import Anthropic")
    print('    client = Anthropic(base_url="%s", api_key="%s")\n' % (url["anthropic"], secret))
    print("curl:")
    print('    curl --cacert certs/ca.pem -H "Authorization: Bearer %s" %s/models\n'
          % (secret, url["openai"]))
    print("A running proxy picks it up on SIGHUP: systemctl reload llm-proxy, or\n"
          "kill -HUP $(cat %s)" % (os.path.abspath(args.pidfile) if args.pidfile
                                   else _default_pidfile(args)))
    return 0


def remove_key(args) -> int:
    """--remove-key NAME: delete the key from the config file. Returns 0 or 2."""
    path = _key_config_path(args)
    name = args.remove_key
    try:
        if not os.path.exists(path):
            raise ConfigError("config file %s does not exist" % path)
        document = _read_config_document(path)
        table = _key_table(document, path)
        if name not in table:
            known = ", ".join(str(n) for n in table) or "none"
            raise ConfigError("%s has no access key named '%s' (keys: %s)" % (path, name, known))
        del table[name]
        _write_config_document(path, document)
    except (ConfigError, OSError) as exc:
        return _config_edit_failed(path, exc)
    print("Removed access key '%s' from %s. A running proxy refuses it after SIGHUP." % (name, path))
    return 0


def list_keys(config: Config) -> int:
    """--list-keys: names, budgets and today's use (from stats.json); never a key. Returns 0."""
    if not config.access_keys:
        print("No access keys: the proxy is open to anyone who can reach it "
              "(python3 proxy.py --add-key NAME makes one).")
        return 0
    by_key, days = {}, {}
    try:
        # As load() opens it: a FIFO or symlink planted there must not hang or be followed.
        fd = open_regular_file(config.stats_file, os.O_RDONLY, one_link=False)
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(_STATS_FILE_MAX_BYTES + 1)
        state = _stats_parse_document(json.loads(data.decode("utf-8")), 0)
        by_key, days = state["byKey"], state["keyDays"]
    except (OSError, ValueError):
        pass                                 # no stats yet (or unreadable): show the budgets
    today = _stats_local_day(time.time())
    rows = [("NAME", "TODAY", "DAILY BUDGET", "PER MINUTE", "REQUESTS", "REFUSED", "LAST USED")]
    for key in config.access_keys:
        entry = by_key.get(key.name) or {}
        day = days.get(key.name) or {}
        used = day.get("tokens", 0) if day.get("day") == today else 0
        last = entry.get("lastUsed")
        rows.append((key.name, format(used, ","),
                     format(key.daily_tokens, ",") if key.daily_tokens else "-",
                     str(key.requests_per_minute or "-"), format(entry.get("requests", 0), ","),
                     format(entry.get("refused", 0), ","),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(last)) if last else "never"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _log_file_handler(log_file: str) -> logging.Handler:
    """A RotatingFileHandler (5 MiB, 3 old files) whose file, also after each rotation, is opened
    by open_regular_file(): a symlink planted at the log's path is refused, not written through.

    logging.handlers (which brings pickle and queue) is imported here, not at the top: only a
    start with a log file needs it, and every other start saved 12M instructions (~1% of a
    start) and 0.6 MiB of idle RSS without it (issue 16)."""
    import logging.handlers

    class LogFileHandler(logging.handlers.RotatingFileHandler):
        def _open(self):
            fd = open_regular_file(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            return os.fdopen(fd, "a", encoding=self.encoding,
                             errors=getattr(self, "errors", None))

    return LogFileHandler(log_file, maxBytes=5 * 1024 * 1024, backupCount=3, encoding="utf-8")


def setup_logging(level: str, log_file: Optional[str] = None) -> None:
    """One handler on the "llm-proxy" logger: stderr, or a size-rotated file."""
    if log_file:
        handler = _log_file_handler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    # systemd's journal stamps every line itself; don't print the time twice.
    journal = bool(os.environ.get("JOURNAL_STREAM")) and not log_file
    handler.setFormatter(logging.Formatter(
        "%(levelname)s %(message)s" if journal else "%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(getattr(logging, level.upper()))
    log.propagate = False


def check_setup(config: Config) -> int:
    """--check: report on the config and certificates without serving. Returns 0 or 2."""
    print("config: %s" % (config.source or "built-in defaults (no config file)"))
    for warning in config.warnings:
        print("warning: %s" % warning)
    print("backend: %s%s" % (config.target_url,
                              " (with target.apiKey)" if config.target_api_key else ""))
    print("access: %s" % ("%d key(s): %s" % (len(config.access_keys),
                                              ", ".join(k.name for k in config.access_keys))
                          if config.access_keys else "open (no access.keys)"))
    try:
        probe = socket.create_connection((config.target_host, config.target_port),
                                         timeout=min(3.0, config.connect_timeout))
        probe.close()
        print("backend: accepts connections")
    except OSError as exc:
        # Not an error: the backend may simply start later. But say it, and how to look.
        print("warning: backend %s does not accept connections (%s); requests will get 502 "
              "until it does. Test it from this machine: curl %s/" % (
                  config.target_url, _describe_os_error(exc), config.target_url))
    try:
        check_configured_certificate(config)
        have_cert, have_key = os.path.exists(config.cert_file), os.path.exists(config.key_file)
        if have_cert or have_key:
            make_server_ssl_context(config.cert_file, config.key_file)
        # What the next start would do, without doing it: a certificate it re-issues is not ok.
        status = ensure_certificates(config.cert_file, config.key_file,
                                     extra_hosts=config.tls_hosts, dry_run=True)
    except CertificateError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    if status.action == "created":
        print("certificate: %s will be created at first start%s" % (
            config.cert_file, " (with a new local CA)" if status.ca_created else ""))
    elif status.action == "renewed":
        print("certificate: %s will be re-issued at the next start: %s" % (
            config.cert_file, "; ".join(status.reasons)))
    else:
        print("certificate: %s (ok%s)" % (config.cert_file, ", not issued by this proxy's CA"
                                         if status.action == "external" else ""))
    for warning in status.warnings:
        print("warning: certificate %s" % warning)
    return 0


def healthcheck(config: Config, timeout: float = 4.0) -> int:
    """--healthcheck: GET /_proxy/health from the running proxy over TLS. Returns 0 or 1."""
    ca_file = os.path.join(os.path.dirname(config.cert_file), "ca.pem")
    context = ssl.create_default_context(cafile=ca_file if os.path.exists(ca_file) else None)
    if not os.path.exists(ca_file):      # a user-supplied certificate: liveness is what counts
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    host = config.bind if config.bind and config.bind not in ("0.0.0.0", "::") else "127.0.0.1"
    conn = http.client.HTTPSConnection(host, config.port, timeout=timeout, context=context)
    try:
        conn.sock = context.wrap_socket(socket.create_connection((host, config.port), timeout),
                                        server_hostname="localhost")
        conn.request("GET", "/_proxy/health")
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        print("unhealthy: %s" % exc)
        return 1
    finally:
        conn.close()
    print(body.decode("utf-8", "replace"))
    # 0 for a proxy that answers, also when it reports "degraded" (backend down): restarting the
    # proxy would not bring the backend back. The reason is in the JSON printed above.
    return 0 if response.status == 200 else 1


def public_host(config: Config, cert_status: Optional["CertStatus"] = None) -> str:
    """The address other devices should use for this proxy, as written in a URL.

    The bound address when the proxy listens on one; else the first tls.hosts entry (in Docker
    the container's own addresses are useless to other devices: TLS_HOSTS names the host's);
    else the first LAN address of this machine (IPv4 first), else one in the certificate;
    "localhost" when there is none. Of these, one the certificate carries comes first (without
    cert_status, as for --add-key, the first).
    """
    bound = config.bind.strip("[]") if config.bind not in ("", "0.0.0.0", "::") else ""
    # A wildcard name is no address to open ("*.lan" covers hosts, it is not one).
    candidates = [bound] if bound else [h.strip("[]") for h in config.tls_hosts if "*" not in h]
    if not candidates:
        current = discover_hosts()
        lan = [host for host in current if _is_lan_address(host)]
        lan.sort(key=lambda host: ":" in host)          # IPv4 before IPv6, otherwise in order
        in_cert = cert_status.ip_addresses if cert_status else ()
        candidates = lan or [ip for ip in in_cert if _is_lan_address(ip)]
    # A URL whose name the certificate does not carry fails on every device: prefer one it does.
    carried = (cert_status.ip_addresses + cert_status.dns_names) if cert_status else ()
    covered = [h for h in candidates if h in carried]
    host = (covered or candidates or ["localhost"])[0]
    return "[%s]" % host if ":" in host else host


def _is_lan_address(host: str) -> bool:
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_urls(origin: str) -> List[str]:
    """One indented line per CLIENT_FAMILIES row: who, then the base URL to paste."""
    width = max(len(family.label) for family in CLIENT_FAMILIES)
    return ["  %-*s  %s%s" % (width, family.label, origin, family.suffix)
            for family in CLIENT_FAMILIES]


def banner_text(config: Config, cert_status: "CertStatus", port: int) -> str:
    """The start-up banner: what to paste into each kind of client and where a new device
    gets the CA. Plain text meant for a person (no log prefix); no I/O here."""
    origin = "https://%s:%d" % (public_host(config, cert_status), port)
    lines = ["llm-proxy %s: %s -> %s" % (VERSION, origin, config.target_url), "",
             "Base URL to paste into your client:"]
    lines += client_urls(origin)
    lines += ["",
              "Each new device: open %s/_proxy/ on it (CA download, trust steps, code)." % origin]
    if cert_status.ca_file:
        lines.append("CA certificate: %s/_proxy/ca.pem%s" % (
            origin, "  (%s)" % CA_NEW_NOTE if cert_status.ca_created else ""))
        lines.append("  on this machine: %s" % cert_status.ca_file)
    lines.append("Dashboard: %s/_proxy/dashboard" % origin)
    if config.access_keys:
        lines.append("Access keys required (%s): a client sends its key as the SDK's API key."
                     % ", ".join(key.name for key in config.access_keys))
    return "\n".join(lines)


def print_banner(config: Config, cert_status: "CertStatus", port: int) -> None:
    """Log one line for the record, then print the banner as plain text on stdout."""
    log.info("llm-proxy %s listening on https://%s:%d, forwarding to %s", VERSION,
             config.bind or "*", port, config.target_url)
    print("\n" + banner_text(config, cert_status, port) + "\n", flush=True)


def _state_dir(args) -> str:
    """The folder that stands in for the current one: --dir, else the current folder."""
    return os.path.abspath(args.dir) if args.dir else os.getcwd()


def _default_pidfile(args) -> str:
    """Where --daemon and --stop put and look for the pidfile when --pidfile is not given:
    beside the config file (--config, or config.json in the state folder), else in it."""
    if args.config:
        return os.path.join(os.path.dirname(os.path.abspath(args.config)), "llm-proxy.pid")
    return os.path.join(_state_dir(args), "llm-proxy.pid")


def _daemon_log_file(args) -> str:
    if args.log_file:
        return os.path.abspath(args.log_file)
    return os.path.join(os.path.dirname(_default_pidfile(args)), "llm-proxy.log")


def _stop_candidates(args) -> List[str]:
    """Pidfiles --stop tries. With --pidfile, --config or --dir: exactly that one. Without:
    the current folder's, then the one beside proxy.py (the one-file install in /opt/llm-proxy
    started by cron with --dir there), so --stop run from $HOME still finds the daemon."""
    if args.pidfile:
        return [os.path.abspath(args.pidfile)]
    first = _default_pidfile(args)
    if args.config or args.dir or os.path.isfile("config.json"):
        return [first]
    beside_script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llm-proxy.pid")
    return [first] if beside_script == first else [first, beside_script]


def _report_start_error(message: str, log_file: Optional[str] = None) -> None:
    """Print a start-up error on stderr. A --daemon start also appends it to its log file:
    under cron stderr goes to a mail agent that a Raspberry Pi does not have."""
    print("error: %s" % message, file=sys.stderr)
    if log_file:
        try:
            with open(log_file, "a", encoding="utf-8") as handle:
                now = datetime.datetime.now()       # the log's own format: asctime, level
                handle.write("%s,%03d ERROR %s\n" % (now.strftime("%Y-%m-%d %H:%M:%S"),
                                                     now.microsecond // 1000, message))
        except OSError:
            pass        # the error is on stderr; an unwritable log is its own start-up error


def command_line_overrides(args) -> Dict[str, Tuple[str, object]]:
    """The config keys set by --port and --target, for load_config(overrides=...).

    Precedence: command line > environment > config file > defaults. --target without a port
    keeps target.port. Raises ConfigError for a --target that is not an http:// backend."""
    overrides: Dict[str, Tuple[str, object]] = {}
    if args.port is not None:
        overrides["proxy.port"] = ("command line --port", args.port)
    if args.target is not None:
        try:
            host, port = parse_target(args.target, 0, "--target")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        overrides["target.host"] = ("command line --target", host)
        if port:
            overrides["target.port"] = ("command line --target", port)
    return overrides


def main(argv=None) -> int:
    """Run the proxy (or --check / --daemon / --stop). Returns the process exit code."""
    args = build_parser().parse_args(argv)
    setup_logging("warning" if args.quiet else args.log_level)
    error_log = _daemon_log_file(args) if args.daemon else None
    if args.dir:
        if not os.path.isdir(args.dir):
            _report_start_error("--dir %s: no such folder" % args.dir)
            return 2
        # Paths given on the command line keep meaning what they meant where we were started.
        for name in ("dir", "config", "pidfile", "log_file"):
            if getattr(args, name):
                setattr(args, name, os.path.abspath(getattr(args, name)))
        error_log = _daemon_log_file(args) if args.daemon else None
        os.chdir(args.dir)
    if args.add_key is not None:
        return add_key(args)
    if args.daily_tokens is not None or args.requests_per_minute is not None:
        print("error: --daily-tokens and --requests-per-minute go with --add-key NAME",
              file=sys.stderr)
        return 2
    if args.remove_key is not None:
        return remove_key(args)
    if args.stop:
        return _stop(args)
    try:
        config = load_config(args.config, overrides=command_line_overrides(args))
    except ConfigError as exc:
        _report_start_error(str(exc), error_log)
        return 2
    pidfile_path = os.path.abspath(args.pidfile) if args.pidfile else _default_pidfile(args)
    if args.check:
        return check_setup(config)
    if args.list_keys:
        return list_keys(config)
    if args.healthcheck:
        return healthcheck(config)
    pidfile = None
    if args.daemon:
        if not hasattr(os, "fork"):
            print("error: --daemon needs a POSIX system; use a service manager instead",
                  file=sys.stderr)
            return 2
        pidfile = PidFile(pidfile_path)
        try:
            owner = pidfile.acquire()
        except OSError as exc:
            _report_start_error("cannot create pidfile %s: %s" % (
                pidfile_path, exc.strerror or exc), error_log)
            return 1
        if owner is not None:
            # cron repeats this every few minutes: one line, and no warnings already given
            # by the start that is running.
            print("already running (pid %d)" % owner)
            return 0
    try:
        return _start(args, config, pidfile)
    finally:
        # Reached after a start-up error or when serving ends (never in the parents that
        # daemonize() ends with os._exit): a failed start leaves no pidfile behind.
        if pidfile is not None:
            pidfile.release()


def _stop(args) -> int:
    """--stop: find the pidfile the start used; say where we looked when there is none."""
    candidates = _stop_candidates(args)
    found = [path for path in candidates if os.path.exists(path)]
    if found or len(candidates) == 1:
        return stop_daemon(found[0] if found else candidates[0])
    print("not running? no pidfile at %s; give --stop the --dir, --config or --pidfile "
          "the start used" % " or ".join(candidates), file=sys.stderr)
    return 1


def _start(args, config: Config, pidfile: Optional[PidFile]) -> int:
    """Open the log file, listen, make sure of the certificates, detach if asked, serve."""
    if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
        # Until serve() installs the reload handler there is nothing to reload (this start reads
        # everything afresh), but SIGHUP's default action would end the process: a `systemctl
        # reload` during the first start's CA creation killed it.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log_file = None
    error_log = _daemon_log_file(args) if args.daemon else None
    if args.daemon or args.log_file:
        log_file = _daemon_log_file(args)
        try:
            # Opened before detaching: a path we cannot write is reported here, on stderr,
            # instead of killing the daemon after stderr went to /dev/null.
            setup_logging("warning" if args.quiet else args.log_level, log_file)
        except OSError as exc:
            print("error: cannot write log file %s: %s" % (log_file, exc.strerror or exc),
                  file=sys.stderr)
            return 1
    # Only for a real start (a cron no-op every five minutes says "already running", nothing
    # else), and after the log file is open, so a daemon's log has them too.
    for warning in config.warnings:
        log.warning(warning)
    if config.source is None:
        log.info("no config file given and no %s: running on built-in defaults",
                 os.path.abspath("config.json"))
    try:
        # Listen first, with a context that has no certificate yet (nothing is served before
        # serve()): a port in use must not leave a freshly made CA behind that nobody uses.
        config = fit_connections_to_fd_limit(config)
        server = build_server(config, ssl_context=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            _report_start_error("port %d is already in use by another program (set proxy.port "
                                "or PROXY_PORT)" % config.port, error_log)
        else:
            _report_start_error("cannot listen on port %d: %s" % (
                config.port, exc.strerror or exc), error_log)
        return 1
    quiet = args.quiet or args.log_level in ("warning", "error")
    try:
        check_configured_certificate(config)
        cert_status = ensure_certificates(
            config.cert_file, config.key_file, extra_hosts=config.tls_hosts,
            progress=None if quiet else lambda text: print(text, file=sys.stderr, flush=True))
        server.reload_tls()
    except ProxyError as exc:
        server.server_close()
        _report_start_error(str(exc), error_log)
        return 2
    if cert_status.action in ("kept", "external"):     # the others were logged as they happened
        log.info(cert_status.describe().splitlines()[0])
    for warning in cert_status.warnings:
        log.warning(warning)
    server.stats.load()
    ready = None
    if args.daemon:
        report = daemonize()
        pidfile.write(os.getpid())
        banner = banner_text(config, cert_status, server.server_address[1])

        def ready() -> None:
            # The banner goes to whoever started us (the first --daemon is usually run by hand:
            # it says where the CA is and which URL to open) and into the log file.
            message = "started (pid %d), logging to %s\n\n%s\n" % (os.getpid(), log_file, banner)
            os.write(report, message.encode("utf-8"))
            os.close(report)
        log.info("llm-proxy %s listening on https://%s:%d, forwarding to %s", VERSION,
                 config.bind or "*", server.server_address[1], config.target_url)
        for line in banner.splitlines():
            if line:
                log.info("  %s", line)
    elif not args.quiet:
        print_banner(config, cert_status, server.server_address[1])
    else:
        log.info("llm-proxy %s listening on https://%s:%d, forwarding to %s", VERSION,
                 config.bind or "*", server.server_address[1], config.target_url)
    return serve(server, ready)


# ==================================================================================================
# Web pages: the dashboard and the device set-up page, served from this file
# ==================================================================================================

def _page_inline_hashes(html: str, tag: str) -> List[str]:
    """CSP source expressions ('sha256-...') for each inline <tag>...</tag> block of html."""
    out = []
    for m in re.finditer(r"<%s>(.*?)</%s>" % (tag, tag), html, re.S):
        digest = hashlib.sha256(m.group(1).encode("utf-8")).digest()
        out.append("'sha256-%s'" % base64.b64encode(digest).decode("ascii"))
    return out


@functools.lru_cache(maxsize=4)
def page_headers(html: str) -> Tuple[Tuple[str, str], ...]:
    """Headers for serving DASHBOARD_HTML or SETUP_HTML (add Content-Length yourself).

    The Content-Security-Policy allows exactly the page's own inline <script> and <style>
    (by SHA-256 hash, CSP Level 2), same-origin fetch() and the data: favicon. The pages
    never parse data as HTML; the policy makes sure a future slip could not run script
    either (an injected onerror= or <script> is blocked). no-store: the page is tiny and
    must never be stale after an upgrade.
    """
    csp = "; ".join([
        "default-src 'none'",
        "script-src " + " ".join(_page_inline_hashes(html, "script")),
        "style-src " + " ".join(_page_inline_hashes(html, "style")),
        "img-src data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])
    return (
        ("Content-Type", "text/html; charset=utf-8"),
        ("Cache-Control", "no-store"),
        ("Content-Security-Policy", csp),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("X-Frame-Options", "DENY"),
    )


# -- what both pages share -------------------------------------------------------------------------

# The pieces both pages are made of, put in by _page() where the template has a marker: the head,
# the top bar up to the brand (the page adds its buttons and closes it), the CSS a page starts
# from and the helpers its script starts with.
# They end up inside the page's one <style> and one <script>, so page_headers() hashes them with it.
# A page's own CSS comes after PAGE_CSS: it may add to a rule here but must not set a property that
# PAGE_CSS's phone layout (max-width: 560px) changes, or the phone layout would lose.
PAGE_HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta name="referrer" content="no-referrer">"""

PAGE_TOP = """<header class="top">
  <div class="top-inner">
    <div class="brand">
      <svg width="26" height="26" viewBox="0 0 26 26" aria-hidden="true"><rect width="26" height="26" rx="6" fill="#2563eb"/><path d="M6 17 L10 11 L14 14 L20 7" fill="none" stroke="#fff" stroke-width="2.2" stroke-linecap="round" stroke-linejoin="round"/><circle cx="20" cy="7" r="1.8" fill="#fff"/></svg>
      <h1>LLM Proxy</h1><span class="sub">{subtitle}</span>
    </div>"""

PAGE_CSS = """:root {
  --bg: #f5f6f8; --card: #ffffff; --fg: #17202b; --muted: #5f6b7a; --faint: #8a94a3;
  --border: #e2e6eb; --grid: #eceff3; --hover: #f1f4f8; --accent: #2563eb; --accent-fg: #ffffff; --accent-bg: #eaf1ff;
  --code-bg: #f2f4f7; --prompt: #3b82f6; --completion: #f59e0b; --other: #a3acb9;
  --ok: #15803d; --ok-bg: #e8f6ec; --err: #c81e1e; --err-bg: #fdecec; --warn: #a15c07; --warn-bg: #fdf3e2;
  --shadow: 0 1px 2px rgba(16, 24, 40, 0.05);
  color-scheme: light dark;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #0e1116; --card: #161b22; --fg: #e6e9ef; --muted: #9aa5b4; --faint: #6e7886;
    --border: #272e38; --grid: #222933; --hover: #1c232c; --accent: #5b9cff; --accent-fg: #0b1220; --accent-bg: #15233a;
    --code-bg: #0f141a; --prompt: #5b9cff; --completion: #fbbf24; --other: #6e7886;
    --ok: #4ade80; --ok-bg: #12301f; --err: #f87171; --err-bg: #3a1717; --warn: #fbbf24; --warn-bg: #3a2a0c;
    --shadow: none;
  }
}
* { box-sizing: border-box; }
[hidden] { display: none !important; }
html { -webkit-text-size-adjust: 100%; text-size-adjust: 100%; }
body {
  margin: 0; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
}
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
header.top { background: var(--card); border-bottom: 1px solid var(--border); }
.top-inner { margin: 0 auto; padding: 10px 20px; display: flex; align-items: center; gap: 14px; }
.brand { display: flex; align-items: center; gap: 10px; margin-right: auto; min-width: 0; }
.brand svg { flex: none; }
.brand h1 { font-size: 16px; margin: 0; font-weight: 650; letter-spacing: -0.01em; white-space: nowrap; }
.brand .sub { color: var(--muted); font-size: 13px; white-space: nowrap; }
.btn {
  font: inherit; font-size: 13px; font-weight: 550; padding: 6px 12px; border-radius: 7px; cursor: pointer;
  border: 1px solid var(--border); background: var(--card); color: var(--fg); line-height: 1.3; white-space: nowrap;
}
.btn:hover { background: var(--hover); text-decoration: none; }
main { margin: 0 auto; padding: 18px 20px 40px; }
.panel { background: var(--card); border: 1px solid var(--border); border-radius: 10px; margin-bottom: 14px; box-shadow: var(--shadow); }
.panel-head { display: flex; align-items: center; gap: 10px; padding: 12px 16px; border-bottom: 1px solid var(--border); }
.panel-head h2 { margin: 0; font-weight: 650; margin-right: auto; }
footer.foot { color: var(--muted); font-size: 12.5px; display: flex; flex-wrap: wrap; gap: 6px 18px; padding: 4px 2px; }
@media (max-width: 560px) {
  .top-inner { padding: 8px 12px; }
  .brand .sub { display: none; }
  main { padding: 12px 12px 32px; }
  .panel-head { padding: 10px 12px; }
}"""

PAGE_JS = """  // Shared helpers (PAGE_JS in proxy.py). Text from the server goes in with textContent only.
  var DOT = " " + String.fromCharCode(183) + " ";
  var ELLIPSIS = String.fromCharCode(8230);

  function byId(id) { return document.getElementById(id); }
  function isNum(v) { return typeof v === "number" && isFinite(v); }
  function obj(v) { return v && typeof v === "object" && !Array.isArray(v) ? v : {}; }
  function str(v) { return v === null || v === undefined ? "" : String(v); }
  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  // "2d 3h", "4m 5s"; "" for anything that is not a duration.
  function fmtDuration(seconds) {
    if (!isNum(seconds) || seconds < 0) { return ""; }
    var s = Math.floor(seconds);
    var d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d > 0) { return d + "d " + h + "h"; }
    if (h > 0) { return h + "h " + m + "m"; }
    if (m > 0) { return m + "m " + (s % 60) + "s"; }
    return s + "s";
  }"""


def _page(subtitle: str, template: str) -> str:
    """An embedded page: `template` with the shared pieces put in at its markers (each once)."""
    pieces = (("<!--PAGE_HEAD-->", PAGE_HEAD), ("/*PAGE_CSS*/", PAGE_CSS),
              ("<!--PAGE_TOP-->", PAGE_TOP.replace("{subtitle}", subtitle)),
              ("/*PAGE_JS*/", PAGE_JS))
    for marker, piece in pieces:
        if template.count(marker) != 1:
            raise ValueError("page template for %r needs %s exactly once" % (subtitle, marker))
        template = template.replace(marker, piece)
    return template


DASHBOARD_HTML = _page("Token usage", """<!--PAGE_HEAD-->
<title>LLM Proxy &middot; Usage</title>
<link rel="icon" href="data:,">
<style>
/*PAGE_CSS*/
.num, td.n, th.n { font-variant-numeric: tabular-nums; }
header.top { position: sticky; top: 0; z-index: 5; }
.top-inner, main { max-width: 1240px; }
.top-inner { flex-wrap: wrap; }
.conn { display: inline-flex; align-items: center; gap: 7px; font-size: 13px; color: var(--muted); white-space: nowrap; }
.conn .dot { width: 8px; height: 8px; border-radius: 50%; background: var(--faint); flex: none; }
.conn.live .dot { background: var(--ok); box-shadow: 0 0 0 3px var(--ok-bg); }
.conn.lost { color: var(--err); font-weight: 600; }
.conn.lost .dot { background: var(--err); box-shadow: 0 0 0 3px var(--err-bg); }
.conn.paused .dot { background: var(--warn); }
.actions { display: flex; gap: 8px; align-items: center; }
.btn:disabled { opacity: 0.6; cursor: default; }
.btn.danger { color: var(--err); border-color: var(--err); background: transparent; }
.btn.danger:hover { background: var(--err-bg); }
a.btn { display: inline-block; color: var(--fg); }
.notice { margin: 0 0 14px; padding: 9px 12px; border-radius: 8px; font-size: 13px; border: 1px solid var(--border); background: var(--card); }
.notice.ok { border-color: var(--ok); background: var(--ok-bg); color: var(--ok); }
.notice.err { border-color: var(--err); background: var(--err-bg); color: var(--err); }
.notice[hidden] { display: none; }
.meta-line { color: var(--muted); font-size: 13px; margin: 0 0 14px; }
.cards { display: grid; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: 12px; margin-bottom: 14px; }
.card { background: var(--card); border: 1px solid var(--border); border-radius: 10px; padding: 14px 16px; box-shadow: var(--shadow); min-width: 0; }
.card.wide { grid-column: span 2; }
.card .label { font-size: 12px; text-transform: uppercase; letter-spacing: 0.05em; color: var(--muted); font-weight: 600; }
.card .value { font-size: 28px; font-weight: 650; letter-spacing: -0.02em; margin-top: 4px; line-height: 1.15; font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
.card .hint { font-size: 12.5px; color: var(--muted); margin-top: 4px; }
.card .value.bad { color: var(--err); }
.total-row { display: flex; align-items: baseline; gap: 10px; flex-wrap: wrap; }
.total-row .exact { color: var(--muted); font-size: 13px; font-variant-numeric: tabular-nums; }
.parts { display: grid; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: 8px; margin-top: 12px; }
.part .k { font-size: 12px; color: var(--muted); display: flex; align-items: center; gap: 6px; white-space: nowrap; }
.part .v { font-size: 15px; font-weight: 600; font-variant-numeric: tabular-nums; }
.sw { width: 9px; height: 9px; border-radius: 2px; display: inline-block; flex: none; }
.sw.prompt { background: var(--prompt); }
.sw.completion { background: var(--completion); }
.sw.other { background: var(--other); }
.sw.none { background: transparent; border: 1px solid var(--faint); }
.kv { display: flex; justify-content: space-between; gap: 8px; font-size: 13px; margin-top: 3px; }
.kv .k { color: var(--muted); }
.kv .v { font-weight: 600; font-variant-numeric: tabular-nums; }
.kv .v.bad { color: var(--err); }
.panel { min-width: 0; }
.panel-head { flex-wrap: wrap; }
.panel-head h2 { font-size: 14px; }
.panel-head .count { color: var(--muted); font-weight: 500; margin-left: 6px; }
.panel-body { padding: 12px 16px 14px; }
.seg { display: inline-flex; border: 1px solid var(--border); border-radius: 7px; overflow: hidden; }
.seg button { font: inherit; font-size: 12.5px; padding: 4px 10px; border: 0; background: transparent; color: var(--muted); cursor: pointer; }
.seg button + button { border-left: 1px solid var(--border); }
.seg button[aria-pressed="true"] { background: var(--accent); color: var(--accent-fg); font-weight: 600; }
.legend { display: flex; gap: 14px; font-size: 12.5px; color: var(--muted); align-items: center; flex-wrap: wrap; }
.legend span { display: inline-flex; align-items: center; gap: 6px; }
.readout { font-size: 13px; color: var(--muted); min-height: 19px; margin-bottom: 6px; font-variant-numeric: tabular-nums; }
.readout strong { color: var(--fg); font-weight: 600; }
#chart { width: 100%; min-height: 180px; }
#chart svg { display: block; width: 100%; }
#chart text { fill: var(--muted); font-size: 11px; font-family: inherit; }
#chart .gridline { stroke: var(--grid); stroke-width: 1; }
#chart .axis { stroke: var(--border); stroke-width: 1; }
#chart .b-prompt { fill: var(--prompt); }
#chart .b-completion { fill: var(--completion); }
#chart .b-other { fill: var(--other); }
#chart .hit { fill: transparent; }
#chart .slot:hover .hit, #chart .slot.sel .hit { fill: var(--hover); }
#chart .empty-msg { fill: var(--faint); font-size: 13px; }
.table-wrap { overflow-x: auto; -webkit-overflow-scrolling: touch; }
table { width: 100%; border-collapse: collapse; font-size: 13px; }
th, td { padding: 7px 12px; text-align: left; border-bottom: 1px solid var(--border); white-space: nowrap; vertical-align: middle; }
th { font-size: 11.5px; text-transform: uppercase; letter-spacing: 0.04em; color: var(--muted); font-weight: 600; background: var(--card); }
th.n, td.n { text-align: right; }
tbody tr:hover td { background: var(--hover); }
tbody tr:last-child td { border-bottom: 0; }
td.name { min-width: 180px; max-width: 360px; white-space: normal; }
/* A model name is never broken mid-word: one line, an ellipsis, the full name in its title. */
td.name .txt { font-weight: 550; display: block; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
td.muted, .muted { color: var(--faint); }
.share { height: 3px; background: var(--grid); border-radius: 2px; margin-top: 4px; overflow: hidden; }
.share i { display: block; height: 100%; background: var(--accent); border-radius: 2px; opacity: 0.7; }
.share.over i { background: var(--err); opacity: 1; }
td.path { max-width: 420px; overflow: hidden; text-overflow: ellipsis; }
.method { font-weight: 650; font-size: 11.5px; color: var(--muted); margin-right: 6px; letter-spacing: 0.02em; }
.badge { display: inline-block; min-width: 38px; text-align: center; padding: 1px 7px; border-radius: 999px; font-size: 12px; font-weight: 650; background: var(--grid); color: var(--fg); font-variant-numeric: tabular-nums; }
.badge.ok { background: var(--ok-bg); color: var(--ok); }
.badge.err { background: var(--err-bg); color: var(--err); }
.tag { font-size: 11.5px; color: var(--muted); }
.tag.warn { color: var(--warn); }
td.empty { text-align: center; color: var(--faint); padding: 22px 12px; white-space: normal; }
footer.foot .err { color: var(--err); }
@media (max-width: 900px) {
  .cards { grid-template-columns: repeat(2, minmax(0, 1fr)); }
  .parts { grid-template-columns: repeat(2, minmax(0, 1fr)); }
}
@media (max-width: 560px) {
  .top-inner { gap: 8px; }
  .conn { order: 3; width: 100%; white-space: normal; }
  .card { padding: 12px; }
  .card .value { font-size: 23px; }
  .cards { gap: 10px; }
  /* Room for the usage card's explanation; uptime beside it would leave a hole. */
  .card.usage, .card.uptime { grid-column: 1 / -1; }
  .panel-body { padding: 10px 12px 12px; }
  /* Phones: every table row becomes a small card of "label  value" lines (labels from the
     column headings, see labelCells), so Total, Status and Tokens are never off to the side. */
  .table-wrap { overflow-x: visible; }
  .table-wrap table, .table-wrap tbody, .table-wrap tr, .table-wrap td { display: block; width: 100%; }
  .table-wrap thead { display: none; }
  .table-wrap tr { padding: 8px 12px; border-bottom: 1px solid var(--border); }
  .table-wrap tbody tr:last-child { border-bottom: 0; }
  .table-wrap td { padding: 2px 0; border: 0; text-align: right; white-space: normal; overflow-wrap: break-word; max-width: none; min-width: 0; }
  .table-wrap td::before { content: attr(data-label); float: left; margin-right: 12px; color: var(--muted); font-size: 12px; text-align: left; }
  .table-wrap td.name { text-align: left; padding-bottom: 4px; }
  .table-wrap td.name::before, .table-wrap td.empty::before { content: none; }
  .table-wrap td.empty { text-align: center; padding: 18px 0; }
  .table-wrap td.opt { display: none; }
  tbody tr:hover td { background: transparent; }
}
</style>
</head>
<body>
<!--PAGE_TOP-->
    <span id="conn" class="conn" role="status" aria-live="polite"><span class="dot"></span><span id="conn-text">Connecting&hellip;</span></span>
    <div class="actions">
      <a class="btn" href="/_proxy/">Setup</a>
      <button type="button" class="btn danger" id="reset-btn">Reset stats</button>
    </div>
  </div>
</header>
<main>
  <div id="notice" class="notice" role="status" aria-live="polite" hidden></div>
  <p class="meta-line" id="meta-line">Loading statistics&hellip;</p>

  <section class="cards" aria-label="Totals">
    <div class="card wide">
      <div class="label">Total tokens</div>
      <div class="total-row"><div class="value" id="c-total">&ndash;</div></div>
      <div class="parts">
        <div class="part"><div class="k"><span class="sw prompt"></span>Prompt</div><div class="v" id="c-prompt">&ndash;</div></div>
        <div class="part"><div class="k"><span class="sw completion"></span>Completion</div><div class="v" id="c-completion">&ndash;</div></div>
        <div class="part"><div class="k"><span class="sw none"></span>Cache read</div><div class="v" id="c-cache-read">&ndash;</div></div>
        <div class="part"><div class="k"><span class="sw none"></span>Cache write</div><div class="v" id="c-cache-write">&ndash;</div></div>
      </div>
    </div>
    <div class="card"><div class="label">Requests</div><div class="value" id="c-requests">&ndash;</div><div class="hint" id="c-requests-hint">&nbsp;</div></div>
    <div class="card"><div class="label">Completions</div><div class="value" id="c-completions">&ndash;</div><div class="hint" id="c-completions-hint">&nbsp;</div></div>
    <div class="card"><div class="label">Errors</div><div class="value" id="c-errors">&ndash;</div><div class="hint" id="c-errors-hint">&nbsp;</div></div>
    <div class="card"><div class="label">In flight</div><div class="value" id="c-inflight">&ndash;</div><div class="hint">requests in progress</div></div>
    <div class="card uptime"><div class="label">Uptime</div><div class="value" id="c-uptime">&ndash;</div><div class="hint" id="c-uptime-hint">&nbsp;</div></div>
    <div class="card usage">
      <div class="label">Usage reporting</div>
      <div class="hint">Where the token counts of completions came from:</div>
      <div class="kv"><span class="k">Sent by the backend</span><span class="v" id="c-u-reported">&ndash;</span></div>
      <div class="kv"><span class="k">Asked for by the proxy</span><span class="v" id="c-u-injected">&ndash;</span></div>
      <div class="kv"><span class="k">Missing (not counted)</span><span class="v" id="c-u-missing">&ndash;</span></div>
    </div>
  </section>

  <section class="panel" aria-labelledby="chart-title">
    <div class="panel-head">
      <h2 id="chart-title">Tokens over time</h2>
      <div class="legend"><span><i class="sw prompt"></i>Prompt</span><span><i class="sw completion"></i>Completion</span><span id="legend-other" hidden><i class="sw other"></i>Other</span></div>
      <div class="seg" role="group" aria-label="Time range">
        <button type="button" id="range-hourly" aria-pressed="true">48 hours</button>
        <button type="button" id="range-daily" aria-pressed="false">90 days</button>
      </div>
    </div>
    <div class="panel-body">
      <div class="readout" id="readout">&nbsp;</div>
      <div id="chart"></div>
    </div>
  </section>

  <section class="panel" id="keys-panel" aria-labelledby="t-key-title" hidden>
    <div class="panel-head"><h2 id="t-key-title">By access key<span class="count" id="t-key-count"></span></h2></div>
    <div class="table-wrap"><table>
      <thead><tr><th>Key</th><th class="n">Today</th><th class="n">Daily budget</th><th class="n">Per minute</th><th class="n">Requests</th><th class="n">Prompt</th><th class="n">Completion</th><th class="n">Total</th><th class="n">Refused</th><th class="n">Errors</th><th>Last used</th></tr></thead>
      <tbody id="t-key"></tbody>
    </table></div>
  </section>

  <div id="breakdowns"></div>
  <template id="breakdown-template">
    <section class="panel">
      <div class="panel-head"><h2><span class="title"></span><span class="count"></span></h2></div>
      <div class="table-wrap"><table class="breakdown">
        <thead><tr><th class="key"></th><th class="n">Requests</th><th class="n">Prompt</th><th class="n">Completion</th><th class="n">Total</th><th class="n">Cache read / write</th><th class="n">Avg TTFB</th><th class="n">Tokens/s</th><th class="n">Errors</th></tr></thead>
        <tbody></tbody>
      </table></div>
    </section>
  </template>

  <section class="panel" aria-labelledby="t-recent-title">
    <div class="panel-head"><h2 id="t-recent-title">Recent requests<span class="count" id="t-recent-count"></span></h2></div>
    <div class="table-wrap"><table>
      <thead><tr><th>Time</th><th>Model</th><th>Request</th><th class="n">Status</th><th class="n">Tokens</th><th class="n">Duration</th><th class="n opt">TTFB</th><th class="n opt">Tokens/s</th><th class="opt">Client</th><th>Usage</th></tr></thead>
      <tbody id="t-recent"></tbody>
    </table></div>
  </section>

  <footer class="foot">
    <span id="f-version"></span>
    <span id="f-persist"></span>
    <span><a href="/_proxy/stats">Stats JSON</a> &middot; <a href="/_proxy/metrics">Prometheus metrics</a> &middot; <a href="/_proxy/">Set up a device</a></span>
  </footer>
</main>
<script>
(function () {
  "use strict";
/*PAGE_JS*/

  // Everything shown here comes from /_proxy/stats, whose strings (model names, paths,
  // client addresses) originate from untrusted clients and backends. They are only ever
  // inserted with textContent / createTextNode / setAttribute, never parsed as HTML.
  var STATS_URL = "/_proxy/stats";
  var RESET_URL = "/_proxy/reset";
  var POLL_MS = 5000;
  var FETCH_TIMEOUT_MS = 8000;
  var TOKEN_KEY = "llm-proxy-admin-token";
  var SVG_NS = "http://www.w3.org/2000/svg";
  var DASH = String.fromCharCode(8211);

  var state = {
    data: null, lastOk: 0, lastAttemptFailed: false, error: "", timer: null, busy: false,
    range: "hourly", selected: -1, series: null, polls: 0, tokenDeclined: false
  };

  // The three breakdown tables share one <template>; each copy gets its ids and headings here.
  [["t-model", "By model", "Model"], ["t-endpoint", "By endpoint", "Endpoint"],
   ["t-client", "By client", "Client"]].forEach(function (spec) {
    var copy = byId("breakdown-template").content.cloneNode(true);
    copy.querySelector("section").setAttribute("aria-labelledby", spec[0] + "-title");
    copy.querySelector("h2").id = spec[0] + "-title";
    copy.querySelector(".title").textContent = spec[1];
    copy.querySelector(".count").id = spec[0] + "-count";
    copy.querySelector("th.key").textContent = spec[2];
    copy.querySelector("tbody").id = spec[0];
    byId("breakdowns").appendChild(copy);
  });

  function num(v) { return isNum(v) ? v : 0; }
  function setText(id, text) { var e = byId(id); if (e) { e.textContent = text; } return e; }
  function svg(tag, attrs) {
    var e = document.createElementNS(SVG_NS, tag);
    for (var k in attrs) {
      if (Object.prototype.hasOwnProperty.call(attrs, k)) { e.setAttribute(k, String(attrs[k])); }
    }
    return e;
  }

  // ---- formatting -------------------------------------------------------
  function fmtInt(v) { return isNum(v) ? Math.round(v).toLocaleString() : DASH; }
  function fmtDec(v, digits) {
    return isNum(v) ? v.toLocaleString(undefined, { maximumFractionDigits: digits }) : DASH;
  }
  function fmtCompact(v) {
    if (!isNum(v)) { return DASH; }
    var a = Math.abs(v);
    var units = [[1e12, "T"], [1e9, "B"], [1e6, "M"], [1e3, "k"]];
    for (var i = 0; i < units.length; i++) {
      if (a >= units[i][0]) {
        var x = v / units[i][0];
        return x.toLocaleString(undefined, { maximumFractionDigits: Math.abs(x) < 100 ? 1 : 0 }) + units[i][1];
      }
    }
    return Math.round(v).toLocaleString();
  }
  function fmtMs(v) {
    if (!isNum(v)) { return DASH; }
    if (v < 1000) { return Math.round(v).toLocaleString() + " ms"; }
    if (v < 60000) { return (v / 1000).toLocaleString(undefined, { maximumFractionDigits: 1 }) + " s"; }
    var s = Math.round(v / 1000);
    return Math.floor(s / 60) + "m " + (s % 60) + "s";
  }
  function parseTime(v) {
    if (typeof v !== "string" || !v) { return null; }
    var t = Date.parse(v);
    return isFinite(t) ? t : null;
  }
  function sameDay(a, b) {
    return a.getFullYear() === b.getFullYear() && a.getMonth() === b.getMonth() && a.getDate() === b.getDate();
  }
  function fmtWhen(t) {
    // Local time of the browser; the date only when it is not today.
    if (t === null) { return DASH; }
    var d = new Date(t);
    var time = d.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
    if (sameDay(d, new Date())) { return time; }
    return d.toLocaleDateString(undefined, { month: "short", day: "numeric" }) + " " + time;
  }
  function fmtFull(t) { return t === null ? "" : new Date(t).toLocaleString(); }
  function pct(part, whole) {
    if (!isNum(part) || !isNum(whole) || whole <= 0) { return null; }
    return (part / whole) * 100;
  }

  // ---- connection indicator -------------------------------------------------
  function renderConn() {
    var box = byId("conn");
    var text;
    box.classList.remove("live", "lost", "paused");
    if (document.hidden) {
      box.classList.add("paused");
      text = "Paused while hidden";
    } else if (state.lastAttemptFailed) {
      box.classList.add("lost");
      text = "Connection lost" + (state.error ? " (" + state.error + ")" : "");
      text += state.lastOk ? DOT + "last update " + fmtWhen(state.lastOk) : "";
      text += DOT + "retrying";
    } else if (state.lastOk) {
      box.classList.add("live");
      var age = Math.max(0, Math.round((Date.now() - state.lastOk) / 1000));
      text = "Live" + DOT + "updated " + (age < 2 ? "just now" : age + " s ago");
    } else {
      text = "Connecting" + ELLIPSIS;
    }
    byId("conn-text").textContent = text;
    box.setAttribute("title", state.lastOk ? "Last successful update: " + fmtFull(state.lastOk) : "");
  }

  // ---- headline cards -------------------------------------------------------
  function renderCards(d) {
    var t = obj(d.tokens);
    var total = isNum(t.total) ? t.total : num(t.prompt) + num(t.completion);
    // One figure, exact (the compact form is in the title): the same number twice read as two.
    setText("c-total", fmtInt(total)).setAttribute("title", fmtCompact(total) + " tokens");
    setText("c-prompt", fmtInt(num(t.prompt)));
    setText("c-completion", fmtInt(num(t.completion)));
    setText("c-cache-read", fmtInt(num(t.cacheRead)));
    setText("c-cache-write", fmtInt(num(t.cacheWrite)));

    var requests = num(d.requests), completions = num(d.completions), errors = num(d.errors);
    setText("c-requests", fmtInt(requests));
    setText("c-requests-hint", isNum(t.reasoning) && t.reasoning > 0
      ? fmtInt(t.reasoning) + " reasoning tokens" : "since stats began");
    setText("c-completions", fmtInt(completions));
    var perCompletion = completions > 0 ? total / completions : null;
    setText("c-completions-hint", perCompletion === null ? "with token usage" : fmtInt(perCompletion) + " tokens each on average");
    var ev = setText("c-errors", fmtInt(errors));
    ev.classList.toggle("bad", errors > 0);
    var rate = pct(errors, requests);
    setText("c-errors-hint", rate === null ? "no requests yet" : fmtDec(rate, 1) + "% of requests");
    setText("c-inflight", fmtInt(num(d.inFlight)));

    var up = typeof d.uptime === "string" && d.uptime ? d.uptime : (fmtDuration(d.uptimeSeconds) || DASH);
    setText("c-uptime", up);
    var started = parseTime(d.startedAt);
    setText("c-uptime-hint", started === null ? "proxy process" : "started " + fmtWhen(started));

    var u = obj(d.usageReports);
    setText("c-u-reported", fmtInt(num(u.reported)));
    setText("c-u-injected", fmtInt(num(u.injected)));
    setText("c-u-missing", fmtInt(num(u.missing))).classList.toggle("bad", num(u.missing) > 0);

    var since = parseTime(d.since);
    var line = since !== null ? "Counting since " + fmtFull(since) : "Statistics of this proxy";
    if (started !== null) { line += DOT + "proxy started " + fmtFull(started); }
    setText("meta-line", line);
  }

  // ---- chart ----------------------------------------------------------------
  function buildSeries(d, range) {
    var hourly = range === "hourly";
    var step = hourly ? 3600000 : 86400000;
    var n = hourly ? 48 : 90;
    var src = Array.isArray(d[range]) ? d[range] : [];
    var pts = [];
    for (var i = 0; i < src.length; i++) {
      var b = obj(src[i]);
      var t = parseTime(b.start);
      if (t === null) { continue; }
      var prompt = num(b.prompt), completion = num(b.completion);
      var total = isNum(b.total) ? b.total : prompt + completion;
      pts.push({ t: t, prompt: prompt, completion: completion, other: Math.max(0, total - prompt - completion),
                 total: total, requests: num(b.requests), errors: num(b.errors) });
    }
    // The newest bucket anchors the grid (the server decides where buckets start);
    // then it is moved forward to "now" so that idle hours/days show as zero buckets.
    var now = Date.now();
    var anchor = null;
    for (i = 0; i < pts.length; i++) { if (anchor === null || pts[i].t > anchor) { anchor = pts[i].t; } }
    if (anchor === null) { anchor = Math.floor(now / step) * step; }
    var ahead = Math.floor((now - anchor) / step);
    if (ahead > 0 && ahead < 100000) { anchor += ahead * step; }
    var slots = [];
    for (i = 0; i < n; i++) {
      slots.push({ t: anchor - (n - 1 - i) * step, prompt: 0, completion: 0, other: 0, total: 0, requests: 0, errors: 0 });
    }
    for (i = 0; i < pts.length; i++) {
      // Math.round tolerates buckets that drift by an hour across DST changes.
      var idx = n - 1 + Math.round((pts[i].t - anchor) / step);
      if (idx < 0 || idx >= n) { continue; }
      var s = slots[idx];
      s.prompt += pts[i].prompt; s.completion += pts[i].completion; s.other += pts[i].other;
      s.total += pts[i].total; s.requests += pts[i].requests; s.errors += pts[i].errors;
    }
    var utcDays = !hourly && anchor % 86400000 === 0;
    return { slots: slots, hourly: hourly, step: step, utcDays: utcDays };
  }

  function niceStep(x) {
    if (!(x > 0)) { return 1; }
    var p = Math.pow(10, Math.floor(Math.log(x) / Math.LN10));
    var f = x / p;
    var nf = f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10;
    return Math.max(1, nf * p);
  }

  function slotLabel(series, s, long) {
    var d = new Date(s.t);
    if (series.hourly) {
      var hm = d.toLocaleTimeString(undefined, { hour: "numeric", minute: "2-digit" });
      if (!long) { return hm; }
      var end = new Date(s.t + series.step).toLocaleTimeString(undefined, { hour: "numeric", minute: "2-digit" });
      return d.toLocaleDateString(undefined, { weekday: "short", month: "short", day: "numeric" }) + " " + hm + DASH + end;
    }
    var opts = long ? { weekday: "short", month: "short", day: "numeric", year: "numeric" } : { month: "short", day: "numeric" };
    if (series.utcDays) { opts.timeZone = "UTC"; }
    return d.toLocaleDateString(undefined, opts) + (long && series.utcDays ? " (UTC day)" : "");
  }

  function describeSlot(series, s) {
    return [slotLabel(series, s, true), fmtInt(s.prompt) + " prompt", fmtInt(s.completion) + " completion",
            fmtInt(s.requests) + (s.requests === 1 ? " request" : " requests") +
            (s.errors ? " (" + fmtInt(s.errors) + " failed)" : "")].join(DOT);
  }

  function renderReadout() {
    var box = byId("readout");
    clear(box);
    var series = state.series;
    if (!series) { box.textContent = String.fromCharCode(160); return; }
    if (state.selected >= 0 && state.selected < series.slots.length) {
      box.textContent = describeSlot(series, series.slots[state.selected]);
      return;
    }
    var tot = 0, req = 0, pr = 0, co = 0;
    for (var i = 0; i < series.slots.length; i++) {
      tot += series.slots[i].total; req += series.slots[i].requests;
      pr += series.slots[i].prompt; co += series.slots[i].completion;
    }
    box.appendChild(document.createTextNode((series.hourly ? "Last 48 hours: " : "Last 90 days: ")));
    box.appendChild(el("strong", null, fmtInt(tot) + " tokens"));
    box.appendChild(document.createTextNode(" (" + fmtInt(pr) + " prompt, " + fmtInt(co) + " completion)" + DOT +
      fmtInt(req) + (req === 1 ? " request" : " requests")));
  }

  function renderChart() {
    var box = byId("chart");
    var d = state.data;
    if (!d) { return; }
    var series = buildSeries(d, state.range);
    state.series = series;
    var slots = series.slots, n = slots.length;
    var W = Math.max(280, Math.floor(box.clientWidth || 600));
    var H = W < 560 ? 190 : 240;
    var ml = 46, mr = 6, mt = 8, mb = 24;
    var pw = W - ml - mr, ph = H - mt - mb;
    var max = 0, anyOther = false;
    for (var i = 0; i < n; i++) {
      var sum = slots[i].prompt + slots[i].completion + slots[i].other;
      if (sum > max) { max = sum; }
      if (slots[i].other > 0) { anyOther = true; }
    }
    byId("legend-other").hidden = !anyOther;
    var step = niceStep(max / 4);
    var top = Math.max(step, Math.ceil(max / step) * step);
    function y(v) { return mt + ph - (v / top) * ph; }

    var root = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "Tokens per " + (series.hourly ? "hour, last 48 hours" : "day, last 90 days") });
    for (var v = 0; v <= top + step / 2; v += step) {
      var yy = Math.round(y(v)) + 0.5;
      root.appendChild(svg("line", { "class": v === 0 ? "axis" : "gridline", x1: ml, x2: W - mr, y1: yy, y2: yy }));
      var lab = svg("text", { x: ml - 6, y: yy + 3.5, "text-anchor": "end" });
      lab.textContent = fmtCompact(v);
      root.appendChild(lab);
    }

    var bw = pw / n;
    var gap = bw >= 6 ? Math.min(4, bw * 0.22) : 0.6;
    // Label spacing: at least ~64 px between labels, aligned to round hours/days.
    var need = Math.ceil(64 / bw);
    var strides = series.hourly ? [1, 2, 3, 4, 6, 8, 12, 24] : [1, 2, 3, 5, 7, 14, 30, 45];
    var stride = strides[strides.length - 1];
    for (i = 0; i < strides.length; i++) { if (strides[i] >= need) { stride = strides[i]; break; } }

    for (i = 0; i < n; i++) {
      var s = slots[i];
      var x0 = ml + i * bw;
      var g = svg("g", { "class": "slot" + (i === state.selected ? " sel" : "") });
      g.setAttribute("data-i", String(i));
      var title = svg("title", {});
      title.textContent = describeSlot(series, s);
      g.appendChild(title);
      g.appendChild(svg("rect", { "class": "hit", x: x0, y: mt, width: bw, height: ph }));
      var base = 0;
      var parts = [["prompt", s.prompt], ["completion", s.completion], ["other", s.other]];
      for (var p = 0; p < parts.length; p++) {
        var val = parts[p][1];
        if (val <= 0) { continue; }
        var y1 = y(base + val), y0 = y(base);
        var h = Math.max(1, y0 - y1);
        g.appendChild(svg("rect", { "class": "b-" + parts[p][0], x: x0 + gap / 2, y: y0 - h,
          width: Math.max(0.8, bw - gap), height: h, rx: bw > 8 ? 1.5 : 0 }));
        base += val;
      }
      root.appendChild(g);

      var dt = new Date(s.t);
      var labelHere;
      if (series.hourly) {
        labelHere = dt.getHours() % stride === 0 && (dt.getMinutes() === 0 || stride === 1);
      } else {
        labelHere = (n - 1 - i) % stride === 0;
      }
      var cx = x0 + bw / 2;
      // Skip labels that would be cut off at either end of the axis.
      if (labelHere && cx > ml + 24 && cx < W - mr - 24) {
        var txt;
        if (series.hourly && dt.getHours() === 0) {
          txt = dt.toLocaleDateString(undefined, { month: "short", day: "numeric" });
        } else {
          txt = slotLabel(series, s, false);
        }
        var xl = svg("text", { x: cx, y: H - 7, "text-anchor": "middle" });
        xl.textContent = txt;
        root.appendChild(xl);
        root.appendChild(svg("line", { "class": "axis", x1: cx, x2: cx, y1: mt + ph, y2: mt + ph + 4 }));
      }
    }
    if (max === 0) {
      var msg = svg("text", { "class": "empty-msg", x: ml + pw / 2, y: mt + ph / 2, "text-anchor": "middle" });
      msg.textContent = !Array.isArray(d[state.range]) ? "This proxy reports no token history" :
        series.hourly ? "No tokens in the last 48 hours" : "No tokens in the last 90 days";
      root.appendChild(msg);
    }
    clear(box);
    box.appendChild(root);
    renderReadout();
  }

  function chartSlotFromEvent(ev) {
    var t = ev.target;
    while (t && t !== ev.currentTarget) {
      if (t.getAttribute && t.getAttribute("data-i") !== null) { return parseInt(t.getAttribute("data-i"), 10); }
      t = t.parentNode;
    }
    return -1;
  }

  function selectSlot(i) {
    if (i === state.selected) { return; }
    state.selected = i;
    var gs = byId("chart").querySelectorAll("g.slot");
    for (var k = 0; k < gs.length; k++) { gs[k].classList.toggle("sel", k === i); }
    renderReadout();
  }

  function setRange(range) {
    state.range = range;
    state.selected = -1;
    byId("range-hourly").setAttribute("aria-pressed", range === "hourly" ? "true" : "false");
    byId("range-daily").setAttribute("aria-pressed", range === "daily" ? "true" : "false");
    renderChart();
  }

  // ---- tables ---------------------------------------------------------------
  function numCell(text, title) {
    var td = el("td", "n", text);
    if (title) { td.setAttribute("title", title); }
    return td;
  }

  // Phones show each row as "label  value" lines: every cell carries its column heading.
  function labelCells(tbody) {
    var heads = tbody.parentNode.querySelectorAll("thead th");
    for (var i = 0; i < tbody.rows.length; i++) {
      var cells = tbody.rows[i].cells;
      for (var j = 0; j < cells.length && j < heads.length; j++) {
        cells[j].setAttribute("data-label", heads[j].textContent);
        if (heads[j].className.indexOf("opt") >= 0) { cells[j].className += " opt"; }
      }
    }
  }

  // The thin bar under a name: `share` percent filled (at least a sliver), the figure in its title.
  function shareBar(share, cls, what) {
    var bar = el("div", cls);
    var fill = el("i");
    fill.style.width = Math.max(1, Math.min(100, share)).toFixed(1) + "%";
    bar.appendChild(fill);
    bar.setAttribute("title", fmtDec(share, 1) + what);
    return bar;
  }
  function emptyRow(tbody, cols, text) {
    var tr = el("tr");
    var td = el("td", "empty", text);
    td.setAttribute("colspan", String(cols));
    tr.appendChild(td);
    tbody.appendChild(tr);
  }

  function renderBreakdown(tbodyId, countId, map, emptyText) {
    var tbody = byId(tbodyId);
    var rows = [];
    var m = obj(map);
    for (var k in m) {
      if (Object.prototype.hasOwnProperty.call(m, k)) { rows.push({ name: k, v: obj(m[k]) }); }
    }
    rows.sort(function (a, b) {
      return num(b.v.total) - num(a.v.total) || num(b.v.requests) - num(a.v.requests) || (a.name < b.name ? -1 : 1);
    });
    var grand = 0;
    for (var i = 0; i < rows.length; i++) { grand += num(rows[i].v.total); }
    setText(countId, rows.length ? String(rows.length) : "");
    clear(tbody);
    if (!rows.length) { emptyRow(tbody, 9, emptyText); return; }
    for (i = 0; i < rows.length; i++) {
      var r = rows[i].v;
      var tr = el("tr");
      var name = el("td", "name");
      var label = rows[i].name;
      // "(unknown)" / "(other)" are the store's own placeholder keys: shown muted.
      var shown = label === "" || label === "null" ? "(unknown)" : label;
      var placeholder = shown === "(unknown)" || shown === "(other)";
      var txt = el("span", "txt" + (placeholder ? " muted" : ""), shown);
      txt.setAttribute("title", shown);
      name.appendChild(txt);
      var share = pct(num(r.total), grand);
      if (share !== null) { name.appendChild(shareBar(share, "share", "% of all tokens")); }
      tr.appendChild(name);
      tr.appendChild(numCell(fmtInt(num(r.requests))));
      tr.appendChild(numCell(fmtInt(num(r.prompt))));
      tr.appendChild(numCell(fmtInt(num(r.completion))));
      tr.appendChild(numCell(fmtInt(num(r.total)), fmtCompact(num(r.total))));
      var cache = el("td", "n" + (num(r.cacheRead) || num(r.cacheWrite) ? "" : " muted"),
        fmtInt(num(r.cacheRead)) + " / " + fmtInt(num(r.cacheWrite)));
      tr.appendChild(cache);
      tr.appendChild(numCell(fmtMs(r.avgTtfbMs)));
      tr.appendChild(numCell(fmtDec(r.tokensPerSecond, 1)));
      var errs = el("td", "n", fmtInt(num(r.errors)));
      if (num(r.errors) > 0) {
        var eb = el("span", "badge err", fmtInt(num(r.errors)));
        errs.textContent = "";
        errs.appendChild(eb);
      }
      tr.appendChild(errs);
      tbody.appendChild(tr);
    }
    labelCells(tbody);
  }

  // Access keys: names only (the stats never hold a key), today's tokens against the budget.
  function renderKeys(map) {
    var m = obj(map);
    var names = Object.keys(m).sort();
    byId("keys-panel").hidden = names.length === 0;
    setText("t-key-count", names.length ? String(names.length) : "");
    var tbody = byId("t-key");
    clear(tbody);
    for (var i = 0; i < names.length; i++) {
      var r = obj(m[names[i]]);
      var tr = el("tr");
      var name = el("td", "name");
      name.appendChild(el("span", "txt" + (names[i].charAt(0) === "(" ? " muted" : ""), names[i]));
      var budget = isNum(r.dailyTokens) ? r.dailyTokens : null;
      var share = budget ? pct(num(r.today), budget) : null;
      if (share !== null) {
        name.appendChild(shareBar(share, "share" + (share >= 100 ? " over" : ""), "% of today's budget"));
      }
      tr.appendChild(name);
      tr.appendChild(numCell(fmtInt(num(r.today)), share !== null ? fmtDec(share, 1) + "% of the daily budget" : ""));
      tr.appendChild(numCell(budget ? fmtInt(budget) : DASH));
      tr.appendChild(numCell(isNum(r.requestsPerMinute) ? fmtInt(r.requestsPerMinute) : DASH));
      tr.appendChild(numCell(fmtInt(num(r.requests))));
      tr.appendChild(numCell(fmtInt(num(r.prompt))));
      tr.appendChild(numCell(fmtInt(num(r.completion))));
      tr.appendChild(numCell(fmtInt(num(r.total)), fmtCompact(num(r.total))));
      var refused = el("td", "n", fmtInt(num(r.refused)));
      if (num(r.refused) > 0) { refused.textContent = ""; refused.appendChild(el("span", "badge err", fmtInt(num(r.refused)))); }
      tr.appendChild(refused);
      tr.appendChild(numCell(fmtInt(num(r.errors))));
      var last = parseTime(r.lastUsed);
      var tdLast = el("td", "num" + (last === null ? " muted" : ""), last === null ? "never" : fmtWhen(last));
      if (last !== null) { tdLast.setAttribute("title", fmtFull(last)); }
      tr.appendChild(tdLast);
      tbody.appendChild(tr);
    }
  }

  function renderRecent(list) {
    var tbody = byId("t-recent");
    var rows = [];
    if (Array.isArray(list)) {
      for (var i = 0; i < list.length; i++) { rows.push({ r: obj(list[i]), i: i }); }
    }
    // Newest first, whatever order the server keeps its ring buffer in.
    rows.sort(function (a, b) {
      var ta = parseTime(a.r.time), tb = parseTime(b.r.time);
      if (ta !== tb) { return (tb === null ? -Infinity : tb) - (ta === null ? -Infinity : ta); }
      return b.i - a.i;
    });
    setText("t-recent-count", rows.length ? String(rows.length) : "");
    clear(tbody);
    if (!rows.length) { emptyRow(tbody, 10, "No requests yet. Point a client at this proxy and they will show up here."); return; }
    for (i = 0; i < rows.length; i++) {
      var r = rows[i].r;
      var tr = el("tr");
      var t = parseTime(r.time);
      var tdTime = el("td", "num", fmtWhen(t));
      if (t !== null) { tdTime.setAttribute("title", fmtFull(t)); }
      tr.appendChild(tdTime);

      var model = str(r.model);
      tr.appendChild(el("td", model ? "" : "muted", model || DASH));

      var req = el("td", "path");
      req.appendChild(el("span", "method", str(r.method) || "?"));
      req.appendChild(document.createTextNode(str(r.path)));
      req.setAttribute("title", (str(r.method) + " " + str(r.path)).trim());
      tr.appendChild(req);

      var status = typeof r.status === "string" && r.status.trim() !== "" && isFinite(+r.status) ? +r.status : r.status;
      var failed = r.error === true || (isNum(status) && status >= 400);
      var tdStatus = el("td", "n");
      var badge = el("span", "badge" + (failed ? " err" : isNum(status) && status < 300 ? " ok" : ""),
        isNum(status) ? String(status) : (failed ? "error" : DASH));
      tdStatus.appendChild(badge);
      tr.appendChild(tdStatus);

      var tk = obj(r.tokens);
      var tkTotal = isNum(tk.total) ? tk.total : (isNum(tk.prompt) || isNum(tk.completion) ? num(tk.prompt) + num(tk.completion) : null);
      var tkTitle = fmtInt(num(tk.prompt)) + " prompt / " + fmtInt(num(tk.completion)) + " completion";
      if (num(tk.cacheRead) || num(tk.cacheWrite)) {
        tkTitle += " / cache " + fmtInt(num(tk.cacheRead)) + " read, " + fmtInt(num(tk.cacheWrite)) + " write";
      }
      tr.appendChild(numCell(fmtInt(tkTotal), tkTotal === null ? "" : tkTitle));
      tr.appendChild(numCell(fmtMs(r.durationMs)));
      tr.appendChild(numCell(fmtMs(r.ttfbMs)));
      tr.appendChild(numCell(fmtDec(r.tokensPerSecond, 1)));
      var who = el("td", "num", str(r.client) || DASH);
      if (str(r.key)) { who.appendChild(el("span", "muted", DOT + str(r.key))); }
      tr.appendChild(who);
      var usage = str(r.usage);
      tr.appendChild(el("td", "tag" + (usage === "missing" ? " warn" : ""), usage || DASH));
      tbody.appendChild(tr);
    }
    labelCells(tbody);
  }

  function renderFooter(d) {
    setText("f-version", "local-llm-proxy" + (d.version ? " v" + str(d.version) : ""));
    var box = byId("f-persist");
    clear(box);
    var p = obj(d.persistence);
    if (p.enabled === false) {
      box.textContent = "Persistence off (stats are lost on restart)";
    } else if (p.enabled === true) {
      var saved = parseTime(p.lastSaved);
      // Never the server's file path: it means nothing on the phone reading this.
      box.appendChild(document.createTextNode(saved !== null ? "Stats saved at " + fmtWhen(saved)
        : "Stats not saved yet"));
      if (p.lastError) { box.appendChild(el("span", "err", DOT + "save failed: " + str(p.lastError))); }
    }
  }

  function render(d) {
    renderCards(d);
    renderChart();
    renderBreakdown("t-model", "t-model-count", d.byModel, "No model usage yet.");
    renderBreakdown("t-endpoint", "t-endpoint-count", d.byEndpoint, "No endpoint usage yet.");
    renderBreakdown("t-client", "t-client-count", d.byClient, "No clients yet.");
    renderKeys(d.byKey);
    renderRecent(d.recent);
    renderFooter(d);
  }

  // ---- polling --------------------------------------------------------------
  function schedule() {
    clearTimeout(state.timer);
    state.timer = null;
    if (document.hidden) { document.documentElement.setAttribute("data-polling", "paused"); return; }
    document.documentElement.setAttribute("data-polling", "on");
    state.timer = setTimeout(poll, POLL_MS);
  }

  // With proxy.adminToken set, reading the stats needs the token too: it is asked for once,
  // kept in sessionStorage (this tab only, gone when it closes) and sent as a header, never
  // put in a URL.
  function fetchStats(opts, asked) {
    var token = readToken();
    opts.headers = { "Accept": "application/json" };
    if (token) { opts.headers["Authorization"] = "Bearer " + token; }
    return fetch(STATS_URL, opts).then(function (res) {
      if (res.status !== 401) { return res; }
      if (asked || state.tokenDeclined) { storeToken(""); return res; }
      var entered = window.prompt(token ? "The saved admin token was refused. Admin token:" :
        "This proxy needs its admin token to show statistics. Admin token:", "");
      if (entered === null || !entered.trim()) {
        state.tokenDeclined = true;
        showNotice("Statistics need the proxy's admin token (proxy.adminToken). Reload the page to enter it.", "err");
        return res;
      }
      storeToken(entered.trim());
      delete opts.signal;         // the prompt may have outlasted the time-out of the first try
      return fetchStats(opts, true);
    });
  }

  function poll() {
    if (state.busy) { return Promise.resolve(); }
    state.busy = true;
    clearTimeout(state.timer);
    var ctrl = typeof AbortController === "function" ? new AbortController() : null;
    var killer = setTimeout(function () { if (ctrl) { ctrl.abort(); } }, FETCH_TIMEOUT_MS);
    var opts = { cache: "no-store", credentials: "same-origin" };
    if (ctrl) { opts.signal = ctrl.signal; }
    return fetchStats(opts, false).then(function (res) {
      if (!res.ok) { throw new Error("HTTP " + res.status); }
      return res.json();
    }).then(function (d) {
      if (!d || typeof d !== "object" || Array.isArray(d)) { throw new Error("bad response"); }
      state.data = d;
      state.lastOk = Date.now();
      state.lastAttemptFailed = false;
      state.error = "";
      state.polls += 1;
      render(d);
      document.documentElement.setAttribute("data-state", "live");
      document.documentElement.setAttribute("data-polls", String(state.polls));
    }, function (err) {
      state.lastAttemptFailed = true;
      state.error = err && err.name === "AbortError" ? "timeout" :
        (err && /^HTTP /.test(err.message) ? err.message : "unreachable");
      if (!state.data) { document.documentElement.setAttribute("data-state", "error"); }
    }).then(function () {
      clearTimeout(killer);
      state.busy = false;
      renderConn();
      if (!state.tokenDeclined) { schedule(); }
    });
  }

  document.addEventListener("visibilitychange", function () {
    if (document.hidden) {
      clearTimeout(state.timer);
      state.timer = null;
      document.documentElement.setAttribute("data-polling", "paused");
      renderConn();
    } else {
      poll();
    }
  });

  // ---- reset ----------------------------------------------------------------
  function readToken() {
    try { return window.sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { return ""; }
  }
  function storeToken(t) {
    try {
      if (t) { window.sessionStorage.setItem(TOKEN_KEY, t); } else { window.sessionStorage.removeItem(TOKEN_KEY); }
    } catch (e) { /* storage disabled: the token is simply not remembered */ }
  }
  function showNotice(text, kind) {
    var n = byId("notice");
    n.className = "notice" + (kind ? " " + kind : "");
    n.textContent = text;
    n.hidden = !text;
  }
  function postReset(token) {
    var headers = {};
    if (token) { headers["Authorization"] = "Bearer " + token; }
    return fetch(RESET_URL, { method: "POST", headers: headers, cache: "no-store", credentials: "same-origin" });
  }
  function errorText(res) {
    return res.text().then(function (body) {
      try {
        var j = JSON.parse(body);
        var msg = j && j.error && typeof j.error.message === "string" ? j.error.message : "";
        if (msg) { return msg; }
      } catch (e) { /* not JSON: fall back to the status */ }
      return "HTTP " + res.status;
    }, function () { return "HTTP " + res.status; });
  }
  function isAuthFailure(res) { return res.status === 401 || res.status === 403; }

  function onReset() {
    if (!window.confirm("Reset all token statistics on this proxy? This cannot be undone.")) { return; }
    var btn = byId("reset-btn");
    btn.disabled = true;
    showNotice("Resetting" + ELLIPSIS, "");
    var stored = readToken();
    postReset(stored).then(function (res) {
      if (!isAuthFailure(res)) { return res; }
      // The proxy has an admin token configured: ask for it once and retry.
      var entered = window.prompt(stored ? "The saved admin token was refused. Admin token:" :
        "This proxy needs its admin token to reset statistics. Admin token:", "");
      if (entered === null || !entered.trim()) { return null; }
      entered = entered.trim();
      return postReset(entered).then(function (res2) {
        storeToken(res2.ok ? entered : (isAuthFailure(res2) ? "" : stored));
        return res2;
      });
    }).then(function (res) {
      if (res === null) { showNotice("Reset cancelled: no admin token given.", ""); return; }
      if (res.ok) {
        showNotice("Statistics were reset at " + fmtWhen(Date.now()) + ".", "ok");
        return poll();
      }
      return errorText(res).then(function (msg) { showNotice("Reset failed: " + msg, "err"); });
    }).catch(function () {
      showNotice("Reset failed: the proxy could not be reached.", "err");
    }).then(function () { btn.disabled = false; });
  }

  // ---- wiring ---------------------------------------------------------------
  byId("reset-btn").addEventListener("click", onReset);
  byId("range-hourly").addEventListener("click", function () { setRange("hourly"); });
  byId("range-daily").addEventListener("click", function () { setRange("daily"); });
  var chartBox = byId("chart");
  chartBox.addEventListener("mouseover", function (ev) { var i = chartSlotFromEvent(ev); if (i >= 0) { selectSlot(i); } });
  chartBox.addEventListener("click", function (ev) { selectSlot(chartSlotFromEvent(ev)); });
  chartBox.addEventListener("mouseleave", function () { selectSlot(-1); });
  var resizeTimer = null, lastWidth = 0;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () {
      var w = chartBox.clientWidth;
      if (w !== lastWidth) { lastWidth = w; renderChart(); }
    }, 120);
  });
  setInterval(renderConn, 1000);
  renderConn();
  poll();
})();
</script>
</body>
</html>
""")

SETUP_HTML = _page("Set up a device", """<!--PAGE_HEAD-->
<title>LLM Proxy &middot; Set up a device</title>
<link rel="icon" href="data:,">
<style>
/*PAGE_CSS*/
body { line-height: 1.5; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; font-size: 12.5px; }
.top-inner, main { max-width: 920px; }
.btn { display: inline-flex; align-items: center; gap: 6px; }
.btn.primary { background: var(--accent); border-color: var(--accent); color: var(--accent-fg); }
.btn.primary:hover { filter: brightness(1.07); background: var(--accent); }
.btn.small { padding: 4px 10px; font-size: 12.5px; }
.btn.copied { color: var(--ok); border-color: var(--ok); }
.banner { display: flex; gap: 12px; align-items: flex-start; border-radius: 10px; padding: 12px 14px; margin-bottom: 14px; border: 1px solid var(--border); background: var(--card); }
.banner .icon { flex: none; width: 22px; height: 22px; border-radius: 50%; display: inline-flex; align-items: center; justify-content: center; font-weight: 700; font-size: 13px; background: var(--grid); color: var(--muted); }
.banner h2 { font-size: 14.5px; margin: 0 0 2px; }
.banner p { margin: 0; color: var(--muted); font-size: 13px; }
.banner.ok { border-color: var(--ok); background: var(--ok-bg); }
.banner.ok .icon { background: var(--ok); color: var(--card); }
.banner.ok h2 { color: var(--ok); }
.banner.warn { border-color: var(--warn); background: var(--warn-bg); }
.banner.warn .icon { background: var(--warn); color: var(--card); }
.banner.warn h2 { color: var(--warn); }
.banner.err { border-color: var(--err); background: var(--err-bg); }
.banner.err .icon { background: var(--err); color: var(--card); }
.banner.err h2 { color: var(--err); }
.panel-head h2 { font-size: 14.5px; }
.step { display: inline-flex; width: 22px; height: 22px; border-radius: 50%; background: var(--accent-bg); color: var(--accent); font-size: 12px; font-weight: 700; align-items: center; justify-content: center; margin-right: 8px; vertical-align: 1px; }
.panel-body { padding: 14px 16px; }
.panel-body > p { margin: 0 0 10px; color: var(--muted); }
.panel-body > p:last-child { margin-bottom: 0; }
.field { margin-bottom: 12px; }
.field .lbl { font-size: 12px; font-weight: 600; color: var(--muted); text-transform: uppercase; letter-spacing: 0.04em; margin-bottom: 4px; }
.copyrow { display: flex; gap: 8px; align-items: stretch; }
.copyrow .val { flex: 1; min-width: 0; padding: 7px 10px; border: 1px solid var(--border); border-radius: 7px; background: var(--code-bg); overflow-x: auto; white-space: nowrap; font-size: 14px; }
.copyrow .val.big { font-size: 16px; font-weight: 600; }
.checks { display: grid; grid-template-columns: max-content 1fr; gap: 8px 16px; align-items: baseline; margin: 0; }
.checks dt { font-weight: 600; color: var(--muted); font-size: 13px; }
.checks dd { margin: 0; min-width: 0; overflow-wrap: anywhere; }
.pill { display: inline-block; padding: 1px 8px; border-radius: 999px; font-size: 12px; font-weight: 650; margin-right: 6px; background: var(--grid); color: var(--muted); }
.pill.ok { background: var(--ok-bg); color: var(--ok); }
.pill.err { background: var(--err-bg); color: var(--err); }
.pill.warn { background: var(--warn-bg); color: var(--warn); }
.detail { color: var(--muted); }
.downloads { display: flex; gap: 10px; flex-wrap: wrap; margin-bottom: 12px; }
.fp { font-size: 12.5px; color: var(--muted); overflow-wrap: anywhere; }
.fp code { color: var(--fg); }
details.os { border: 1px solid var(--border); border-radius: 9px; margin-bottom: 8px; background: var(--card); }
details.os[open] { border-color: var(--faint); }
details.os.mine { border-color: var(--accent); box-shadow: 0 0 0 1px var(--accent); }
details.os summary { cursor: pointer; padding: 10px 14px; font-weight: 600; list-style: none; display: flex; align-items: center; gap: 8px; }
details.os summary::-webkit-details-marker { display: none; }
details.os summary::before { content: ""; width: 7px; height: 7px; border-right: 2px solid var(--muted); border-bottom: 2px solid var(--muted); transform: rotate(-45deg); transition: transform 0.15s; margin-right: 4px; flex: none; }
details.os[open] summary::before { transform: rotate(45deg); }
details.os summary .you { font-size: 11.5px; font-weight: 650; color: var(--accent); background: var(--accent-bg); border-radius: 999px; padding: 1px 8px; }
details.os .body { padding: 0 16px 12px 36px; }
details.os ol { margin: 0; padding-left: 18px; }
details.os li { margin-bottom: 6px; }
details.os .note { color: var(--muted); font-size: 13px; margin: 6px 0 0; }
pre { margin: 6px 0; padding: 8px 10px; background: var(--code-bg); border: 1px solid var(--border); border-radius: 7px; overflow-x: auto; }
pre code { font-size: 12.5px; }
.field .why { color: var(--muted); font-size: 12.5px; margin: 3px 0 0; }
details.code { margin-top: 4px; font-size: 13px; }
details.code summary { cursor: pointer; color: var(--accent); }
.path { font-weight: 600; }
@media (max-width: 560px) {
  .panel-body { padding: 12px; }
  .checks { grid-template-columns: 1fr; gap: 2px; }
  .checks dd { margin-bottom: 8px; }
  details.os .body { padding: 0 12px 12px 18px; }
  .copyrow .val.big { font-size: 14.5px; }
}
</style>
</head>
<body>
<!--PAGE_TOP-->
    <a class="btn" href="/_proxy/dashboard">Dashboard</a>
  </div>
</header>
<main>
  <div id="trust" class="banner" role="status" aria-live="polite">
    <span class="icon" id="trust-icon">?</span>
    <div><h2 id="trust-title">Checking the connection&hellip;</h2><p id="trust-text">Asking the proxy for its status.</p></div>
  </div>

  <section class="panel" aria-labelledby="h-status">
    <div class="panel-head"><h2 id="h-status">Live check</h2><button type="button" class="btn small" id="recheck">Check again</button></div>
    <div class="panel-body">
      <dl class="checks">
        <dt>Proxy</dt><dd id="s-proxy"><span class="pill">checking</span></dd>
        <dt>Backend</dt><dd id="s-backend"><span class="pill">checking</span></dd>
        <dt>This page</dt><dd id="s-secure"><span class="pill">checking</span></dd>
      </dl>
    </div>
  </section>

  <section class="panel" aria-labelledby="h-endpoint">
    <div class="panel-head"><h2 id="h-endpoint"><span class="step">1</span>Point your LLM client here</h2></div>
    <div class="panel-body">
<!--CLIENT_FAMILIES-->
      <p>In your app's LLM settings, pick its custom or self-hosted provider (often called &ldquo;OpenAI-compatible&rdquo;) and paste the endpoint ending in <code>/v1</code> as its base URL. The proxy forwards every path unchanged to the backend.</p>
      <div class="field">
        <div class="lbl">Test from a terminal (after downloading the CA below)</div>
        <div class="copyrow"><code class="val" id="ep-curl"></code><button type="button" class="btn" data-copy="ep-curl">Copy</button></div>
      </div>
    </div>
  </section>

  <section class="panel" aria-labelledby="h-ca">
    <div class="panel-head"><h2 id="h-ca"><span class="step">2</span>Trust the proxy's certificate authority</h2></div>
    <div class="panel-body">
      <p>Browsers only let web apps call the proxy with <code>fetch()</code> when its certificate is trusted by the device; clicking through a warning is not enough. Install this CA once per device. The commands below expect the downloaded file in the current folder.</p>
      <div class="downloads" id="downloads">
        <a class="btn primary" id="dl-pem" href="/_proxy/ca.pem" download="llm-proxy-ca.pem">Download CA (.pem)</a>
        <a class="btn" id="dl-crt" href="/_proxy/ca.crt">Download CA for phones (.crt)</a>
      </div>
      <p class="fp" id="fp" hidden>SHA-256 fingerprint: <code id="fp-value"></code></p>
      <div id="platforms">
<!--TRUST_PLATFORMS-->
      </div>
    </div>
  </section>

  <footer class="foot">
    <span id="f-version">local-llm-proxy</span>
    <span><a href="/_proxy/dashboard">Usage dashboard</a> &middot; <a href="/_proxy/health">Health JSON</a> &middot; <a href="/_proxy/stats">Stats JSON</a></span>
  </footer>
</main>
<script>
(function () {
  "use strict";
/*PAGE_JS*/

  // Values from /_proxy/health (versions, backend URL, error text) are shown with
  // textContent only: they are never parsed as HTML.
  var HEALTH_URL = "/_proxy/health";
  var CA_DER_URL = "/_proxy/ca.crt";
  var CHECK = String.fromCharCode(10003);

  function fmtMs(v) {
    if (!isNum(v)) { return ""; }
    return v < 10 ? v.toLocaleString(undefined, { maximumFractionDigits: 1 }) + " ms" : Math.round(v).toLocaleString() + " ms";
  }

  // ---- endpoint (computed from where this page was loaded) ---------------------
  var host = location.host;
  var base = "https://" + host;
  // Base URLs and code snippets come from CLIENT_FAMILIES in proxy.py, with {origin} for us.
  var templated = document.querySelectorAll("[data-template]");
  for (var t = 0; t < templated.length; t++) {
    templated[t].textContent = templated[t].getAttribute("data-template").split("{origin}").join(base);
  }
  byId("ep-curl").textContent = "curl --cacert llm-proxy-ca.pem " + base + "/v1/models";

  function fallbackCopy(text) {
    var ta = document.createElement("textarea");
    ta.value = text;
    ta.setAttribute("readonly", "");
    ta.style.position = "fixed";
    ta.style.top = "-1000px";
    document.body.appendChild(ta);
    ta.select();
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    document.body.removeChild(ta);
    return ok;
  }
  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text).then(function () { return true; },
        function () { return fallbackCopy(text); });
    }
    return Promise.resolve(fallbackCopy(text));
  }
  var copyButtons = document.querySelectorAll("button[data-copy]");
  for (var i = 0; i < copyButtons.length; i++) {
    copyButtons[i].addEventListener("click", function (ev) {
      var btn = ev.currentTarget;
      var src = byId(btn.getAttribute("data-copy"));
      copyText(src.textContent).then(function (ok) {
        btn.textContent = ok ? "Copied" : "Select and copy";
        btn.classList.toggle("copied", !!ok);
        if (!ok) {
          var r = document.createRange();
          r.selectNodeContents(src);
          var sel = window.getSelection();
          sel.removeAllRanges();
          sel.addRange(r);
        }
        setTimeout(function () { btn.textContent = "Copy"; btn.classList.remove("copied"); }, 1600);
      });
    });
  }

  // ---- platform: open and highlight the visitor's steps first -------------------
  function detectPlatforms() {
    var ua = navigator.userAgent || "";
    var touchMac = /Macintosh/.test(ua) && navigator.maxTouchPoints > 1;
    var out = [];
    if (/iPhone|iPad|iPod/.test(ua) || touchMac) { out.push("ios"); }
    else if (/Android/.test(ua)) { out.push("android"); }
    else if (/Macintosh|Mac OS X/.test(ua)) { out.push("macos"); }
    else if (/Windows/.test(ua)) { out.push("windows"); }
    else if (/Linux|X11/.test(ua) && !/CrOS/.test(ua)) { out.push("linux"); }
    // Desktop Firefox has its own store; Firefox on iOS uses the system one.
    if (/Firefox/.test(ua) && out[0] !== "ios" && out[0] !== "android") { out.push("firefox"); }
    return out;
  }
  var mine = detectPlatforms();
  var box = byId("platforms");
  for (i = mine.length - 1; i >= 0; i--) {
    var d = byId("os-" + mine[i]);
    if (!d) { continue; }
    d.open = true;
    d.classList.add("mine");
    var badge = el("span", "you", i === 0 ? "This device" : "This browser");
    d.querySelector("summary").appendChild(badge);
    box.insertBefore(d, box.firstChild);
  }
  document.documentElement.setAttribute("data-platform", mine.join(" "));
  if (mine[0] === "ios" || mine[0] === "android") {
    // Phones install the DER file as a profile/credential: make it the obvious button.
    var dlCrt = byId("dl-crt"), dlPem = byId("dl-pem");
    dlCrt.classList.add("primary");
    dlPem.classList.remove("primary");
    dlCrt.parentNode.insertBefore(dlCrt, dlPem);
  }

  // ---- live check ------------------------------------------------------------
  function pill(kind, text) { return el("span", "pill " + kind, text); }
  function setRow(id, kind, label, detail) {
    var dd = byId(id);
    clear(dd);
    dd.appendChild(pill(kind, label));
    if (detail) { dd.appendChild(el("span", "detail", detail)); }
  }
  function setBanner(kind, icon, title, text) {
    byId("trust").className = "banner " + kind;
    byId("trust-icon").textContent = icon;
    byId("trust-title").textContent = title;
    byId("trust-text").textContent = text;
  }

  function check() {
    var secure = location.protocol === "https:" && window.isSecureContext === true;
    setRow("s-proxy", "", "checking", "");
    setRow("s-backend", "", "checking", "");
    var ctrl = typeof AbortController === "function" ? new AbortController() : null;
    var killer = setTimeout(function () { if (ctrl) { ctrl.abort(); } }, 8000);
    var opts = { cache: "no-store", credentials: "same-origin", headers: { "Accept": "application/json" } };
    if (ctrl) { opts.signal = ctrl.signal; }
    return fetch(HEALTH_URL, opts).then(function (res) {
      if (!res.ok) { throw new Error("HTTP " + res.status); }
      return res.json();
    }).then(function (h) {
      h = obj(h);
      var version = str(h.version);
      var uptime = str(h.uptime) || fmtDuration(h.uptimeSeconds);
      var parts = [];
      if (version) { parts.push("version " + version); }
      if (uptime) { parts.push("up " + uptime); }
      // "degraded" means the backend is down, which the Backend row shows: the proxy runs.
      var running = h.status === "ok" || h.status === "degraded" || !h.status;
      setRow("s-proxy", running ? "ok" : "warn", running ? "running" : str(h.status), parts.join(DOT));
      byId("f-version").textContent = "local-llm-proxy" + (version ? " v" + version : "");
      if (h.accessKeys === true) {
        // The proxy wants an access key: the snippet must send one (--add-key makes it).
        byId("ep-curl").textContent = 'curl --cacert llm-proxy-ca.pem -H "Authorization: Bearer <your access key>" ' + base + "/v1/models";
      }

      var b = obj(h.backend);
      var where = str(b.url);
      if (b.reachable === true) {
        setRow("s-backend", "ok", "reachable", [where, fmtMs(b.latencyMs)].filter(Boolean).join(DOT));
      } else if (b.reachable === false) {
        setRow("s-backend", "err", "not reachable",
          [where, str(b.error)].filter(Boolean).join(DOT) + DOT + "is the LLM server running?");
      } else {
        setRow("s-backend", "", "unknown", where);
      }

      if (secure) {
        setRow("s-secure", "ok", "secure", "HTTPS" + DOT + "certificate accepted by this browser");
        setBanner("ok", CHECK, "This browser accepts the proxy's certificate",
          "If no certificate warning appeared on the way here, this device already trusts the proxy: copy the endpoint below. " +
          "If you had to click through a warning, install the CA (step 2) first; web apps cannot use the proxy until you do.");
      } else {
        setRow("s-secure", "warn", "not secure", "opened over " + location.protocol.replace(":", "").toUpperCase());
        setBanner("warn", "!", "This page was not opened over HTTPS",
          "Open it as " + base + "/_proxy/ to check whether this device trusts the proxy.");
      }
    }).catch(function (err) {
      var why = err && err.name === "AbortError" ? "timed out" : (err && err.message ? err.message : "failed");
      setRow("s-proxy", "err", "no answer", "the health check " + why);
      setRow("s-backend", "", "unknown", "");
      setRow("s-secure", secure ? "ok" : "warn", secure ? "secure" : "not secure", secure ? "HTTPS" : "");
      setBanner("err", "!", "The proxy did not answer the live check",
        "The page loaded, but " + HEALTH_URL + " " + why + ". Is the proxy still running?");
    }).then(function () {
      clearTimeout(killer);
      document.documentElement.setAttribute("data-state", "checked");
    });
  }

  // ---- CA fingerprint, so a user can compare it with the proxy's start-up output ----
  function showFingerprint() {
    if (!window.crypto || !window.crypto.subtle || !window.isSecureContext) { return; }
    fetch(CA_DER_URL, { cache: "no-store", credentials: "same-origin" }).then(function (res) {
      if (!res.ok) { throw new Error("HTTP " + res.status); }
      return res.arrayBuffer();
    }).then(function (buf) {
      return window.crypto.subtle.digest("SHA-256", buf);
    }).then(function (digest) {
      var bytes = new Uint8Array(digest);
      var hex = [];
      for (var k = 0; k < bytes.length; k++) { hex.push((bytes[k] < 16 ? "0" : "") + bytes[k].toString(16).toUpperCase()); }
      byId("fp-value").textContent = hex.join(":");
      byId("fp").hidden = false;
    }).catch(function () { /* optional detail: leave it hidden */ });
  }

  byId("recheck").addEventListener("click", function () {
    setBanner("", "?", "Checking the connection" + ELLIPSIS, "Asking the proxy for its status.");
    check();
  });
  check();
  showFingerprint();
})();
</script>
</body>
</html>
""")



def _setup_page_clients() -> str:
    """The set-up page's base URL fields and snippets, one per CLIENT_FAMILIES row. The page's
    script puts its own origin where {origin} stands (the host the device reached us by)."""
    out = []
    for number, family in enumerate(CLIENT_FAMILIES):
        big, primary = (" big", " primary") if number == 0 else ("", "")
        field_id = "ep-" + family.key
        out.append(
            '      <div class="field">\n'
            '        <div class="lbl">%s</div>\n'
            '        <div class="copyrow"><code class="val%s" id="%s" data-template="%s">%s</code>'
            '<button type="button" class="btn%s" data-copy="%s">Copy</button></div>\n'
            '        <p class="why">%s</p>\n'
            '        <details class="code"><summary>Python and JavaScript</summary>\n'
            % (_html_escape(family.label), big, field_id,
               _html_escape("{origin}" + family.suffix),
               _html_escape("https://<this-proxy>" + family.suffix), primary, field_id,
               _html_escape("Use this base URL: " + family.why + ".")))
        for language in ("python", "javascript"):
            snippet = client_snippet(family, language, "{origin}")
            out.append('          <pre><code id="%s-%s" data-template="%s">%s</code></pre>\n' % (
                language, family.key, _html_escape(snippet),
                _html_escape(snippet.replace("{origin}", "https://<this-proxy>"))))
        out.append('        </details>\n      </div>\n')
    return "".join(out).rstrip("\n")


def _setup_page_trust() -> str:
    """The set-up page's trust steps, one <details> per TRUST_PLATFORMS row (its script opens
    the visitor's own first, by the row's key)."""
    slots = {"ca": "<code>%s</code>" % CA_DOWNLOAD_NAME,
             "ca_url": '<a href="/_proxy/ca.crt">ca.crt</a>'}
    style = {"escape": _html_escape, "bold": "<b>{}</b>".format, "code": "<code>{}</code>".format,
             "menu": '<span class="path">{}</span>'.format}
    out = []
    for platform in TRUST_PLATFORMS:
        out.append('        <details class="os" id="os-%s">\n'
                   '          <summary>%s</summary>\n'
                   '          <div class="body"><ol>\n' % (platform.key, _html_escape(platform.name)))
        for step in platform.steps:
            commands = "\n".join(_html_escape(c.replace("{ca}", CA_DOWNLOAD_NAME))
                                 for c in step.commands)
            out.append("            <li>%s%s</li>\n" % (
                render_trust_text(step.text, slots, **style),
                "\n              <pre><code>%s</code></pre>" % commands if commands else ""))
        out.append("          </ol>")
        if platform.note:
            out.append('\n          <p class="note">%s</p>' % render_trust_text(
                platform.note, slots, **style))
        out.append("</div>\n        </details>\n")
    return "".join(out).rstrip("\n")


def _html_escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#x27;"))


SETUP_HTML = SETUP_HTML.replace("<!--CLIENT_FAMILIES-->", _setup_page_clients(), 1).replace(
    "<!--TRUST_PLATFORMS-->", _setup_page_trust(), 1)


if __name__ == "__main__":
    sys.exit(main())
