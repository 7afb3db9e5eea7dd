"""Headless-Chromium checks for the proxy's dashboard and set-up pages (stdlib only).

Used by ``tests/test_browser.py``. It drives Debian's Chromium through the Chrome
DevTools Protocol over ``--remote-debugging-pipe`` (file descriptors 3 and 4, NUL-separated
JSON): no TCP debugging port, no websocket, no third-party package.

Trust is exercised for real: Chromium runs with ``HOME`` pointing at a temporary directory
whose NSS database (``$HOME/.pki/nssdb``, made with ``certutil``) trusts only the given CA,
and ``--ignore-certificate-errors`` is never used. ``check_untrusted()`` proves the negative:
with an empty NSS database the same URL fails with a certificate error.

Needs the Debian packages ``chromium`` and ``libnss3-tools`` (certutil).

Use from a test::

    home = make_trust_home(ca_pem, tmpdir)
    with Browser(home) as b:
        r = load_page(b, base + "/_proxy/dashboard", DASHBOARD_READY, screenshot="shot.png")
    assert not r.problems() and "20,800" in r.text
"""

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser",
                       "google-chrome", "google-chrome-stable")

# Flags: headless, root-safe, and silent on a machine without internet (no background
# networking, no component updates, no QUIC probing, no sync).
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-extensions", "--disable-default-apps", "--disable-dev-shm-usage",
    "--disable-features=Translate,MediaRouter,OptimizationHints,AutofillServerCommunication",
    "--password-store=basic", "--hide-scrollbars", "--mute-audio", "--lang=en-US",
    "--remote-debugging-pipe",
)

DASHBOARD_READY = "document.documentElement.getAttribute('data-state') === 'live'"
SETUP_READY = "document.documentElement.getAttribute('data-state') === 'checked'"

IPHONE_UA = ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_0 like Mac OS X) AppleWebKit/605.1.15 "
             "(KHTML, like Gecko) Version/18.0 Mobile/15E148 Safari/604.1")

# Probe run inside the page after rendering: counts elements that could only exist if a
# hostile string had been parsed as HTML. Our pages contain no <img> and one <script>.
_INJECTION_PROBE = """(() => {
  const bx = Array.from(document.querySelectorAll('b')).filter(b => b.textContent === 'x').length;
  return {
    img: document.querySelectorAll('img').length,
    scripts: document.scripts.length,
    onerror: document.querySelectorAll('[onerror]').length,
    bx: bx,
    title: document.title,
  };
})()"""


class BrowserError(Exception):
    """Chromium could not be started or did not answer a DevTools command in time."""


def find_chromium() -> Optional[str]:
    """Path of a Chromium binary ($CHROME_BIN first), or None."""
    env = os.environ.get("CHROME_BIN")
    if env:
        return env
    for c in CHROMIUM_CANDIDATES:
        p = c if os.path.isabs(c) else shutil.which(c)
        if p and os.path.exists(p) and os.access(p, os.X_OK):
            return p
    return None


def make_trust_home(ca_pem: Optional[str], parent: str) -> str:
    """Make a fresh HOME under parent whose NSS db trusts ca_pem for TLS servers ("C,,").

    ca_pem=None makes an empty NSS db (nothing extra trusted). Returns the HOME path.
    """
    home = tempfile.mkdtemp(prefix="home-", dir=parent)
    db = os.path.join(home, ".pki", "nssdb")
    os.makedirs(db)
    certutil = shutil.which("certutil")
    if not certutil:
        raise BrowserError("certutil not found: apt-get install libnss3-tools")
    subprocess.run([certutil, "-d", "sql:" + db, "-N", "--empty-password"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if ca_pem:
        subprocess.run([certutil, "-d", "sql:" + db, "-A", "-n", "test-ca", "-t", "C,,", "-i", ca_pem],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return home


class Browser:
    """One headless Chromium process driven over --remote-debugging-pipe.

    Methods for the caller: call(method, params, session) -> result dict; new_tab() -> Tab; close().
    Use as a context manager. home is the HOME directory (see make_trust_home).
    """

    def __init__(self, home: str, chromium: Optional[str] = None, timeout: float = 15.0):
        self.timeout = timeout
        exe = chromium or find_chromium()
        if not exe:
            raise BrowserError("chromium not found: apt-get install chromium (or set CHROME_BIN)")
        self.profile = tempfile.mkdtemp(prefix="profile-", dir=home)
        self.stderr_path = os.path.join(home, "chromium-stderr.log")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        env = dict(os.environ, HOME=home, LANG="en_US.UTF-8", LANGUAGE="en_US", TZ=os.environ.get("TZ", "UTC"))
        # Chromium reads commands from fd 3 and writes replies to fd 4. The child gets the two
        # pipe ends as stdin/stdout and a shell moves them to 3 and 4 (no preexec_fn, which is
        # unsafe in a process with threads, e.g. a test server).
        argv = [exe] + list(CHROMIUM_FLAGS) + ["--user-data-dir=" + self.profile, "about:blank"]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", 'exec "$@" 3<&0 4>&1 0</dev/null 1>/dev/null', "sh"] + argv,
                stdin=to_child_r, stdout=from_child_w, stderr=err, env=env, close_fds=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self._lock = threading.Condition()
        self._next_id = 0
        self._replies = {}  # type: Dict[int, dict]
        self._tabs = {}  # type: Dict[str, Tab]
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name="cdp-reader", daemon=True)
        self._reader.start()
        self.version = self.call("Browser.getVersion").get("product", "")

    # -- protocol plumbing ---------------------------------------------------------
    def _read_loop(self):
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_child, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                try:
                    msg = json.loads(raw.decode("utf-8"))
                except ValueError:
                    continue
                if "id" in msg:
                    with self._lock:
                        self._replies[msg["id"]] = msg
                        self._lock.notify_all()
                else:
                    tab = self._tabs.get(msg.get("sessionId", ""))
                    if tab is not None:
                        tab._on_event(msg.get("method", ""), msg.get("params", {}))
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def post(self, method: str, params: Optional[dict] = None, session: Optional[str] = None) -> int:
        """Send a command without waiting (safe from the reader thread). Returns its id."""
        with self._lock:
            self._next_id += 1
            mid = self._next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode("utf-8") + b"\0"
        try:
            while data:
                n = os.write(self._to_child, data)
                data = data[n:]
        except OSError as e:
            raise BrowserError("chromium pipe closed: %s%s" % (e, self._stderr_tail()))
        return mid

    def call(self, method: str, params: Optional[dict] = None, session: Optional[str] = None,
             timeout: Optional[float] = None) -> dict:
        """Send a command and wait for its result; raises BrowserError on error/timeout."""
        mid = self.post(method, params, session)
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._lock:
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise BrowserError("%s: %s%s" % (method, "browser exited" if self._closed else "timeout",
                                                     self._stderr_tail()))
                self._lock.wait(min(left, 0.5))
            msg = self._replies.pop(mid)
        if "error" in msg:
            raise BrowserError("%s: %s" % (method, msg["error"].get("message", msg["error"])))
        return msg.get("result", {})

    def _stderr_tail(self) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                tail = f.read()[-600:].decode("utf-8", "replace").strip()
            return ("; chromium stderr: " + tail) if tail else ""
        except OSError:
            return ""

    def new_tab(self, width: int = 1280, height: int = 900, mobile: bool = False, dark: bool = False,
                user_agent: Optional[str] = None, scale: float = 1.0) -> "Tab":
        """Open a blank tab with the given viewport and colour scheme, all domains enabled."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        tab = Tab(self, target, session)
        self._tabs[session] = tab
        for domain in ("Page", "Runtime", "Log"):
            self.call(domain + ".enable", session=session)
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                  "deviceScaleFactor": scale, "mobile": mobile}, session=session)
        if mobile:
            self.call("Emulation.setTouchEmulationEnabled", {"enabled": True, "maxTouchPoints": 5}, session=session)
        self.call("Emulation.setEmulatedMedia", {"features": [
            {"name": "prefers-color-scheme", "value": "dark" if dark else "light"}]}, session=session)
        if user_agent:
            self.call("Emulation.setUserAgentOverride", {"userAgent": user_agent}, session=session)
        return tab

    def close(self):
        """Ask Chromium to exit, then make sure it did."""
        if self.proc.poll() is None:
            try:
                self.post("Browser.close")
            except BrowserError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc):
        self.close()


class Tab:
    """One page target. Records console errors, uncaught exceptions and JS dialogs.

    dialog_answers: a list of (accept, prompt_text) used in order for confirm()/prompt();
    alert() and unexpected dialogs are dismissed. Each dialog is recorded in self.dialogs
    as (type, message).
    """

    def __init__(self, browser: Browser, target: str, session: str):
        self.browser, self.target, self.session = browser, target, session
        self.console_errors = []  # type: List[str]
        self.warnings = []  # type: List[str]
        self.dialogs = []  # type: List[Tuple[str, str]]
        self.dialog_answers = []  # type: List[Tuple[bool, str]]

    def _on_event(self, method: str, p: dict):
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            if p.get("type") in ("error", "assert"):
                self.console_errors.append("console.%s: %s" % (p.get("type"), text))
            elif p.get("type") == "warning":
                self.warnings.append(text)
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            desc = d.get("exception", {}).get("description") or d.get("text", "")
            self.console_errors.append("uncaught: %s (line %s)" % (desc, d.get("lineNumber")))
        elif method == "Log.entryAdded":
            e = p.get("entry", {})
            line = "%s: %s %s" % (e.get("source"), e.get("text"), e.get("url", ""))
            if e.get("level") == "error":
                self.console_errors.append(line.strip())
            elif e.get("level") == "warning":
                self.warnings.append(line.strip())
        elif method == "Page.javascriptDialogOpening":
            kind = p.get("type", "")
            self.dialogs.append((kind, p.get("message", "")))
            accept, text = False, ""
            if kind in ("confirm", "prompt") and self.dialog_answers:
                accept, text = self.dialog_answers.pop(0)
            # Answer without waiting: this runs on the reader thread.
            self.browser.post("Page.handleJavaScriptDialog", {"accept": accept, "promptText": text},
                              self.session)

    def call(self, method: str, params: Optional[dict] = None, timeout: Optional[float] = None) -> dict:
        return self.browser.call(method, params, self.session, timeout)

    def navigate(self, url: str) -> Optional[str]:
        """Navigate; returns Chromium's errorText (e.g. net::ERR_CERT_AUTHORITY_INVALID) or None."""
        r = self.call("Page.navigate", {"url": url})
        return r.get("errorText") or None

    def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        """Evaluate a JS expression in the page; returns its JSON value."""
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                           "awaitPromise": await_promise})
        if "exceptionDetails" in r:
            raise BrowserError("evaluate failed: %s" % r["exceptionDetails"].get("text"))
        return r.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 10.0, interval: float = 0.05) -> bool:
        """Poll a JS expression until it is truthy; returns False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.evaluate(expression):
                    return True
            except BrowserError:
                pass  # the document may be between navigations
            time.sleep(interval)
        return False

    def screenshot(self, path: str, full_page: bool = False):
        """Write a PNG of the viewport (or of the whole page when full_page)."""
        params = {"format": "png"}  # type: Dict[str, Any]
        if full_page:
            m = self.call("Page.getLayoutMetrics")
            size = m.get("cssContentSize") or m.get("contentSize")
            params.update({"captureBeyondViewport": True, "clip": {
                "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
        data = self.call("Page.captureScreenshot", params, timeout=20)["data"]
        d = os.path.dirname(path)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        try:
            self.call("Target.closeTarget", {"targetId": self.target})
        except BrowserError:
            pass


class PageResult:
    """What load_page observed. problems() lists everything a test should fail on."""

    def __init__(self):
        self.url = ""
        self.load_error = None  # type: Optional[str]
        self.ready = False
        self.text = ""
        self.console_errors = []  # type: List[str]
        self.warnings = []  # type: List[str]
        self.dialogs = []  # type: List[Tuple[str, str]]
        self.probe = {}  # type: Dict[str, Any]
        self.seconds = 0.0

    def alerts(self) -> List[str]:
        return [m for k, m in self.dialogs if k == "alert"]

    def problems(self, expect_scripts: int = 1) -> List[str]:
        """Every reason to fail: load error, not ready, console errors, alerts, injected markup."""
        out = []
        if self.load_error:
            out.append("load error: " + self.load_error)
        if not self.ready:
            out.append("page never became ready")
        out.extend(self.console_errors)
        out.extend("alert() fired: " + a for a in self.alerts())
        p = self.probe
        if p.get("img"):
            out.append("%d <img> element(s) in the DOM (injected?)" % p["img"])
        if p.get("onerror"):
            out.append("element(s) with an onerror attribute")
        if p.get("bx"):
            out.append("a <b>x</b> element was created from data")
        if p and p.get("scripts") != expect_scripts:
            out.append("%s <script> elements, expected %d" % (p.get("scripts"), expect_scripts))
        return out

    def __repr__(self):
        return "PageResult(url=%r, ready=%r, errors=%r, dialogs=%r, %.1fs)" % (
            self.url, self.ready, self.console_errors, self.dialogs, self.seconds)


def load_page(browser: Browser, url: str, ready: str, timeout: float = 10.0, width: int = 1280,
              height: int = 900, mobile: bool = False, dark: bool = False, user_agent: Optional[str] = None,
              screenshot: Optional[str] = None, full_page: bool = False, settle: float = 0.3,
              keep_tab: bool = False) -> Tuple[PageResult, Optional[Tab]]:
    """Open url in a new tab, wait until the JS expression `ready` is true, collect the result.

    Returns (PageResult, tab) - tab is None unless keep_tab (then the caller closes it).
    `settle` seconds are waited after ready so late errors (e.g. a failed fetch) are seen.
    """
    t0 = time.monotonic()
    res = PageResult()
    res.url = url
    tab = browser.new_tab(width, height, mobile, dark, user_agent, 2.0 if mobile else 1.0)
    try:
        res.load_error = tab.navigate(url)
        if not res.load_error:
            res.ready = tab.wait_for(ready, timeout)
            time.sleep(settle)
            res.text = tab.evaluate("document.body ? document.body.innerText : ''") or ""
            res.probe = tab.evaluate(_INJECTION_PROBE) or {}
            if screenshot:
                tab.screenshot(screenshot, full_page)
        res.console_errors = list(tab.console_errors)
        res.warnings = list(tab.warnings)
        res.dialogs = list(tab.dialogs)
    finally:
        if not keep_tab:
            tab.close()
            tab = None
    res.seconds = time.monotonic() - t0
    return res, tab


def check_untrusted(url: str, workdir: str, chromium: Optional[str] = None) -> Optional[str]:
    """Load url in a Chromium whose NSS db trusts nothing extra; return its errorText.

    A correct set-up returns a certificate error such as net::ERR_CERT_AUTHORITY_INVALID;
    None would mean the page loaded without the CA, i.e. the trust test proves nothing.
    """
    home = make_trust_home(None, workdir)
    with Browser(home, chromium) as b:
        tab = b.new_tab()
        err = tab.navigate(url)
        if err is None:
            # Some builds show an interstitial instead of failing the navigation.
            tab.wait_for("document.readyState === 'complete'", 5)
            title = tab.evaluate("document.title") or ""
            if "privacy" in title.lower() or "not private" in title.lower():
                err = "interstitial: " + title
        return err


def check_reset(browser: Browser, base_url: str, admin_token: Optional[str] = None,
                timeout: float = 10.0) -> Dict[str, Any]:
    """Click "Reset stats" on the dashboard, accept confirm(), answer prompt() with admin_token.

    Returns {"notice": text shown, "dialogs": [(type, message)], "errors": console errors,
    "total_after": text of the total-tokens card after the refresh}.
    """
    res, tab = load_page(browser, base_url + "/_proxy/dashboard", DASHBOARD_READY, keep_tab=True)
    try:
        if not res.ready:
            return {"notice": "", "dialogs": res.dialogs, "errors": res.problems(), "total_after": ""}
        tab.dialog_answers = [(True, "")]
        if admin_token is not None:
            tab.dialog_answers.append((True, admin_token))
        polls = tab.evaluate("document.documentElement.getAttribute('data-polls')")
        tab.evaluate("document.getElementById('reset-btn').click()")
        tab.wait_for("(document.getElementById('notice').className || '').match(/ (ok|err)$/) !== null"
                     " || /cancelled/.test(document.getElementById('notice').textContent)", timeout)
        notice = tab.evaluate("document.getElementById('notice').textContent")
        if "reset at" in (notice or ""):
            tab.wait_for("document.documentElement.getAttribute('data-polls') !== %s" % json.dumps(polls), timeout)
        # Chromium logs every 4xx response as "Failed to load resource"; the refused first
        # attempt of the token flow is expected, anything else is not.
        errors = [e for e in tab.console_errors
                  if not ("/_proxy/reset" in e and ("status of 401" in e or "status of 403" in e))]
        return {"notice": notice, "dialogs": list(tab.dialogs), "errors": errors,
                "total_after": tab.evaluate("document.getElementById('c-total').textContent")}
    finally:
        tab.close()


def check_visibility_pause(browser: Browser, base_url: str) -> Dict[str, Any]:
    """Fake a hidden tab, then a visible one; report the page's polling state and poll count.

    Returns {"paused": data-polling while hidden, "polls_before": n, "polls_after_visible": m,
    "seconds_to_refresh": s}. A correct page reports "paused" and refreshes at once (< 5 s poll).
    """
    res, tab = load_page(browser, base_url + "/_proxy/dashboard", DASHBOARD_READY, keep_tab=True, settle=0)
    try:
        hide = ("Object.defineProperty(document, 'hidden', {configurable: true, get: () => %s});"
                "Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => '%s'});"
                "document.dispatchEvent(new Event('visibilitychange'));")
        tab.evaluate(hide % ("true", "hidden"))
        paused = tab.evaluate("document.documentElement.getAttribute('data-polling')")
        before = int(tab.evaluate("document.documentElement.getAttribute('data-polls')") or 0)
        t0 = time.monotonic()
        tab.evaluate(hide % ("false", "visible"))
        tab.wait_for("+document.documentElement.getAttribute('data-polls') > %d" % before, 4)
        after = int(tab.evaluate("document.documentElement.getAttribute('data-polls')") or 0)
        return {"paused": paused, "polls_before": before, "polls_after_visible": after,
                "seconds_to_refresh": round(time.monotonic() - t0, 2), "errors": list(tab.console_errors)}
    finally:
        tab.close()


def run_all(base_url: str, ca_pem: str, shots_dir: Optional[str] = None, expect: Tuple[str, ...] = (),
            hostile: Tuple[str, ...] = (), full_page: bool = False) -> Dict[str, Any]:
    """Run every page check against a running proxy.

    expect: strings that must appear in the dashboard text (e.g. the total, a model name);
    hostile: strings that must appear as text. Screenshots go to shots_dir when given.
    Returns a report dict; report["failures"] lists every failed assertion (empty = pass).
    """
    t0 = time.monotonic()
    report = {"failures": [], "pages": {}}  # type: Dict[str, Any]
    fails = report["failures"]
    work = tempfile.mkdtemp(prefix="browser-check-")
    shot = (lambda name: os.path.join(shots_dir, name)) if shots_dir else (lambda name: None)
    try:
        home = make_trust_home(ca_pem, work)
        with Browser(home) as b:
            report["browser"] = b.version
            views = [("dashboard", "/_proxy/dashboard", DASHBOARD_READY), ("setup", "/_proxy/", SETUP_READY)]
            for name, path, ready in views:
                for label, kw in (("desktop-light", {}), ("desktop-dark", {"dark": True}),
                                  ("phone-light", {"width": 390, "height": 844, "mobile": True,
                                                   "user_agent": IPHONE_UA}),
                                  ("phone-dark", {"width": 390, "height": 844, "mobile": True, "dark": True,
                                                  "user_agent": IPHONE_UA})):
                    r, _ = load_page(b, base_url + path, ready, screenshot=shot("%s-%s.png" % (name, label)),
                                     full_page=full_page, **kw)
                    report["pages"]["%s-%s" % (name, label)] = r
                    fails.extend("%s %s: %s" % (name, label, p) for p in r.problems())
                    if name == "dashboard":
                        for s in tuple(expect) + tuple(hostile):
                            if s not in r.text:
                                fails.append("%s %s: %r not shown as text" % (name, label, s))
            report["visibility"] = v = check_visibility_pause(b, base_url)
            if v["paused"] != "paused":
                fails.append("polling not paused while hidden: %r" % v["paused"])
            if v["polls_after_visible"] <= v["polls_before"]:
                fails.append("no immediate refresh when visible again")
        report["untrusted_error"] = err = check_untrusted(base_url + "/_proxy/dashboard", work)
        if not err or "CERT" not in err.upper():
            fails.append("page loaded WITHOUT the CA being trusted (%r): trust is not exercised" % err)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report
