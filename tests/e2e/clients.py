"""Client helpers for the e2e tests: imaplib/poplib wrappers, a raw line-based
IMAP client (for literals, pipelining, IDLE), and runners for swaks, curl and
openssl s_client. Every network operation has a timeout."""

import base64
import email
import email.policy
import imaplib
import poplib
import re
import smtplib
import socket
import subprocess
import time
import uuid

IO_TIMEOUT = 10.0  # seconds for any single client network operation
TOOL_TIMEOUT = 20.0  # seconds for an external client tool (swaks, curl, openssl)


def token(prefix="e2e"):
    """A unique string to put in a message and look for in a sink."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


# --------------------------------------------------------------------------
# IMAP via imaplib
# --------------------------------------------------------------------------


class _SourceIMAP4(imaplib.IMAP4):
    """imaplib.IMAP4 connecting from a chosen local address."""

    def __init__(self, host, port, timeout, source):
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self._source, 0))


class _SourceIMAP4_SSL(imaplib.IMAP4_SSL):
    def __init__(self, host, port, ctx, timeout, source):
        self._source = source
        super().__init__(host, port, ssl_context=ctx, timeout=timeout)

    def _create_socket(self, timeout):
        sock = socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self._source, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


def imap_connect(host, port, tls=None, ctx=None, timeout=IO_TIMEOUT, source=None):
    """tls: None (plaintext), "starttls" or "implicit". source: local address to
    connect from (e.g. "127.0.0.2"), default the kernel's choice (127.0.0.1)."""
    if tls == "implicit":
        if source:
            conn = _SourceIMAP4_SSL(host, port, ctx, timeout, source)
        else:
            conn = imaplib.IMAP4_SSL(host, port, ssl_context=ctx, timeout=timeout)
    else:
        if source:
            conn = _SourceIMAP4(host, port, timeout, source)
        else:
            conn = imaplib.IMAP4(host, port, timeout=timeout)
        if tls == "starttls":
            conn.starttls(ssl_context=ctx)
    return conn


def imap_login(host, port, user, password, tls=None, ctx=None, utf8=False, source=None):
    conn = imap_connect(host, port, tls, ctx, source=source)
    if utf8:
        # imaplib encodes command arguments as ASCII; send raw UTF-8 instead
        conn._encoding = "utf-8"
    conn.login(user, password)
    return conn


def imap_first_message(conn):
    """SELECT INBOX read-only; return (exists, email.message of message 1 headers)."""
    typ, data = conn.select("INBOX", readonly=True)
    assert typ == "OK", (typ, data)
    exists = int(data[0])
    assert exists >= 1, f"INBOX is empty ({exists} messages)"
    typ, data = conn.fetch("1", "(BODY.PEEK[HEADER])")
    assert typ == "OK", (typ, data)
    raw = next(part[1] for part in data if isinstance(part, tuple))
    return exists, email.message_from_bytes(raw, policy=email.policy.default)


def imap_subject(conn):
    return str(imap_first_message(conn)[1]["Subject"])


def imap_logout(conn):
    try:
        conn.logout()
    except Exception:
        pass


def imap_which_host(host, port, user, password, tls=None, ctx=None, utf8=False):
    """Log in, read message 1's Subject ("hello from <host>"), log out."""
    conn = imap_login(host, port, user, password, tls, ctx, utf8)
    try:
        return imap_subject(conn)
    finally:
        imap_logout(conn)


def authenticate_plain(conn, user, password):
    pw = password.encode("utf-8") if isinstance(password, str) else password
    blob = b"\0" + user.encode("utf-8") + b"\0" + pw
    return conn.authenticate("PLAIN", lambda _challenge: blob)


# --------------------------------------------------------------------------
# POP3 via poplib
# --------------------------------------------------------------------------


class _SourcePOP3(poplib.POP3):
    """poplib.POP3 connecting from a chosen local address."""

    def __init__(self, host, port, timeout, source):
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self._source, 0))


def pop3_connect(host, port, tls=None, ctx=None, timeout=IO_TIMEOUT, source=None):
    """source: local address to connect from (plaintext and STLS only)."""
    if tls == "implicit":
        assert source is None, "source address: not implemented for implicit TLS"
        return poplib.POP3_SSL(host, port, context=ctx, timeout=timeout)
    if source:
        conn = _SourcePOP3(host, port, timeout, source)
    else:
        conn = poplib.POP3(host, port, timeout=timeout)
    if tls == "starttls":
        conn.stls(context=ctx)
    return conn


def pop3_login(host, port, user, password, tls=None, ctx=None, source=None):
    conn = pop3_connect(host, port, tls, ctx, source=source)
    conn.user(user)
    conn.pass_(password)
    return conn


def pop3_subject(conn, n=1):
    resp, lines, _ = conn.top(n, 0)
    msg = email.message_from_bytes(b"\r\n".join(lines), policy=email.policy.default)
    return str(msg["Subject"])


def pop3_which_host(host, port, user, password, tls=None, ctx=None):
    conn = pop3_login(host, port, user, password, tls, ctx)
    try:
        return pop3_subject(conn)
    finally:
        try:
            conn.quit()
        except Exception:
            pass


# --------------------------------------------------------------------------
# a raw IMAP client (bytes on the wire)
# --------------------------------------------------------------------------


class RawIMAP:
    """Minimal line-oriented IMAP client over a real socket (optionally TLS)."""

    def __init__(self, host, port, tls=None, ctx=None, timeout=IO_TIMEOUT, source=None):
        self.host = host
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        if tls == "implicit":
            self.sock = ctx.wrap_socket(self.sock, server_hostname=host)
        self.buf = b""
        self.transcript = []
        self.greeting = self.readline()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.transcript.append(b"C: " + data)
        self.sock.sendall(data)

    def readline(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; transcript: {self.dump()}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        self.transcript.append(b"S: " + line)
        return line

    def read_until_tagged(self, tag):
        """Read lines until the tagged response for ``tag``; returns (tagged, untagged list)."""
        lines = []
        t = tag.encode() + b" "
        while True:
            line = self.readline()
            if line.startswith(t):
                return line, lines
            lines.append(line)

    def command(self, tag, cmd):
        self.send(f"{tag} {cmd}\r\n")
        return self.read_until_tagged(tag)

    def capabilities(self):
        tagged, lines = self.command("cap", "CAPABILITY")
        assert tagged.startswith(b"cap OK"), tagged
        caps = [l for l in lines if l.upper().startswith(b"* CAPABILITY")]
        assert caps, lines
        return set(caps[0].decode().upper().split()[2:])

    def starttls(self, ctx):
        tagged, _ = self.command("tls", "STARTTLS")
        assert tagged.startswith(b"tls OK"), tagged
        assert self.buf == b"", f"data after STARTTLS OK: {self.buf!r}"
        self.sock = ctx.wrap_socket(self.sock, server_hostname=self.host)

    def dump(self):
        return "\n".join(l.decode("utf-8", "replace") for l in self.transcript[-40:])


def is_tagged_ok(line, tag):
    return line.upper().startswith(f"{tag} OK".encode().upper())


def is_tagged_no(line, tag):
    return line.upper().startswith(f"{tag} NO".encode().upper())


def is_tagged_no_or_bad(line, tag):
    return bool(re.match(rf"^{re.escape(tag)} (NO|BAD)\b".encode(), line, re.I))


def b64(data):
    return base64.b64encode(data).decode()


def read_until_eof(r, timeout):
    """Read lines of a RawIMAP ``r`` until the server closes (bounded). Returns
    [(time.time(), line)]. A reset or a timeout is a failure, not an EOF."""
    deadline = time.monotonic() + timeout
    lines = []
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no EOF within {timeout}s; got {lines!r}\n{r.dump()}"
        r.sock.settimeout(left)
        try:
            line = r.readline()
        except ConnectionResetError as e:
            raise AssertionError(f"connection reset instead of a clean close: {e}; {lines!r}") from e
        except ConnectionError:  # RawIMAP.readline: clean EOF
            return lines
        except (TimeoutError, OSError) as e:
            if isinstance(e, TimeoutError) or "timed out" in str(e):
                raise AssertionError(f"no EOF within {timeout}s; got {lines!r}\n{r.dump()}") from e
            raise
        lines.append((time.time(), line))


# --------------------------------------------------------------------------
# SMTP
# --------------------------------------------------------------------------


def smtp_mail_code(s, ctx, mail_from="bob@example.net"):
    """On a freshly connected smtplib.SMTP ``s``: EHLO, STARTTLS, EHLO and MAIL FROM
    without AUTH (a pop-before-smtp bridge listener decides by the client address);
    returns the MAIL reply (code, text). Nothing is sent: RSET, QUIT (closed anyway)."""
    try:
        s.ehlo()
        s.starttls(context=ctx)
        s.ehlo()
        code, msg = s.mail(mail_from)
        if code == 250:
            s.rset()
        return code, msg
    finally:
        try:
            s.quit()
        except smtplib.SMTPException:
            s.close()


# --------------------------------------------------------------------------
# external tools
# --------------------------------------------------------------------------


def run(argv, input=None, timeout=TOOL_TIMEOUT):
    """Run a client tool with a bound; returns CompletedProcess (merged output).

    On timeout the tool is killed and the result has returncode -1 and the
    output it produced so far, followed by a "[killed after ...]" line."""
    argv = [str(a) for a in argv]
    try:
        return subprocess.run(argv, input=input if input is not None else b"",
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.output or b"") + f"\n[killed after {timeout}s: {' '.join(argv)}]\n".encode()
        return subprocess.CompletedProcess(argv, -1, out)


def swaks(server, port, *, to="x@example.net", mail_from=None, user=None, password=None,
          tls=None, ca=None, subject="e2e", body="e2e test message", extra=(), source=None):
    """tls: None, "starttls" (-tls) or "implicit" (--tls-on-connect).
    source: local address to connect from (--local-interface)."""
    argv = ["swaks", "--server", f"{server}:{port}", "--to", to,
            "--from", mail_from or (f"{user}@example.net" if user else "nobody@example.net"),
            "--helo", "client.e2e.test", "--timeout", "10",
            "--header", f"Subject: {subject}", "--body", body]
    if tls == "starttls":
        argv.append("-tls")
    elif tls == "implicit":
        argv.append("--tls-on-connect")
    if tls and ca:
        argv += ["--tls-verify", "--tls-ca-path", ca]
    if user is not None:
        argv += ["--auth", "PLAIN", "--auth-user", user, "--auth-password", password]
    if source:
        argv += ["--local-interface", source]
    argv += list(extra)
    cp = run(argv)
    cp.text = cp.stdout.decode("utf-8", "replace")
    return cp


def curl(*args, timeout=TOOL_TIMEOUT):
    cp = run(["curl", "--silent", "--show-error", "--max-time", str(int(timeout - 5)), *args],
             timeout=timeout)
    cp.text = cp.stdout.decode("utf-8", "replace")
    return cp


def s_client_starttls(proto, host, port, ca, send=b"", timeout=15):
    """openssl s_client -starttls PROTO; feeds ``send`` then waits for the server to close."""
    argv = ["openssl", "s_client", "-starttls", proto, "-connect", f"{host}:{port}",
            "-CAfile", ca, "-verify_return_error", "-verify_ip", host, "-ign_eof"]
    cp = run(argv, input=send, timeout=timeout)
    cp.text = cp.stdout.decode("utf-8", "replace")
    return cp


def cutover_cli(*args, timeout=TOOL_TIMEOUT):
    """Run the cutover binary (CUTOVER_BIN) with ``args``; CompletedProcess with
    separate .stdout/.stderr text (JSON output stays parseable)."""
    import harness
    argv = [str(harness.resolve_cutover_bin()), *[str(a) for a in args]]
    try:
        cp = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        cp = subprocess.CompletedProcess(argv, -1, e.stdout or b"",
                                         (e.stderr or b"") + f"[killed after {timeout}s]".encode())
    cp.out = cp.stdout.decode("utf-8", "replace")
    cp.err = cp.stderr.decode("utf-8", "replace")
    return cp


# --------------------------------------------------------------------------
# Prometheus text
# --------------------------------------------------------------------------

_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(?P<k>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<v>(?:[^"\\]|\\.)*)"')


def scrape_metrics(host, port):
    """GET /metrics as text."""
    import urllib.request
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=IO_TIMEOUT) as r:
        return r.read().decode("utf-8", "replace")


def metric_values(text, name, **labels):
    """The values of every sample of ``name`` whose labels include ``labels``, in the
    order of the text ([] if none: the series does not exist)."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m["name"] != name:
            continue
        have = {x["k"]: x["v"] for x in _LABEL.finditer(m["labels"] or "")}
        if all(have.get(k) == str(v) for k, v in labels.items()):
            out.append(float(m["value"]))
    return out


def metric_sum(text, name, **labels):
    """Sum of every sample of ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(metric_values(text, name, **labels), 0.0)


def wait_for(predicate, timeout, interval=0.25, what="condition"):
    """Bounded retry of ``predicate`` (exceptions count as not-yet); returns its value."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last result: {last!r}")
        time.sleep(interval)


# --------------------------------------------------------------------------
# mailbox changes made directly on a backend (for IDLE tests)
# --------------------------------------------------------------------------


def append_message(conn, subject):
    msg = (f"From: e2e@example.net\r\nTo: x@example.net\r\nSubject: {subject}\r\n"
           f"\r\nappended by an e2e test\r\n").encode()
    typ, data = conn.append("INBOX", None, None, msg)
    assert typ == "OK", (typ, data)


def expunge_subject(conn, subject):
    """Delete every INBOX message whose Subject contains ``subject``."""
    typ, _ = conn.select("INBOX")
    assert typ == "OK"
    typ, data = conn.search(None, "HEADER", "Subject", f'"{subject}"')
    ids = data[0].split() if typ == "OK" and data and data[0] else []
    for i in ids:
        conn.store(i, "+FLAGS.SILENT", r"(\Deleted)")
    conn.expunge()
    return len(ids)


def idle_sees_append(r, tag, append, timeout=20.0):
    """On a logged-in RawIMAP ``r`` with INBOX selected: IDLE, call ``append()``,
    wait for an untagged EXISTS, then DONE. Returns the EXISTS line."""
    r.send(f"{tag} IDLE\r\n")
    cont = r.readline()
    assert cont.startswith(b"+"), f"no continuation for IDLE: {r.dump()}"
    append()
    old = r.sock.gettimeout()
    r.sock.settimeout(timeout)
    try:
        while True:
            line = r.readline()
            if line.startswith(b"* ") and line.upper().endswith(b" EXISTS"):
                break
    finally:
        r.sock.settimeout(old)
    r.send("DONE\r\n")
    tagged, _ = r.read_until_tagged(tag)
    assert is_tagged_ok(tagged, tag), r.dump()
    return line
