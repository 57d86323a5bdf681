#!/usr/bin/python3
"""Soak test of cutover (issue 17 item 3): ``scripts/soak.sh [DURATION]`` runs this.

For DURATION (default 30m), through the real binary ($CUTOVER_BIN, default
target/debug/cutover) in front of real Dovecot and aiosmtpd sinks (tests/e2e/harness.py,
on addresses of the soak's own, see below), it runs

* IMAP (LOGIN, SELECT, FETCH, LOGOUT), POP3 (USER/PASS, LIST, QUIT) and SMTP submission
  (AUTH PLAIN, one message with a unique token) at a steady rate per protocol, over
  implicit TLS and STARTTLS, with a few wrong passwords, plus long-lived IMAP IDLE
  sessions;
* a reload every few seconds, alternating two valid configurations that move one user
  (carol) between the legacy and the new pool (by rewriting routes.yaml, every other
  one also with SIGHUP), and admin kicks, holds and releases;
* a backend host stopped and started again every minute (alternately green, which the
  legacy pool fails over from, and new, whose users then get temporary failures);
* the shared-state Redis (``state.redis``) SIGKILLed and started again.

The first part of the run is a warm-up; then every client is stopped, the proxy's
sessions drain, and the baseline (``process_resident_memory_bytes``, ``process_open_fds``
from /metrics) is taken; the load resumes until the end, then stops and the same
figures are taken again. Checks (each a row of the summary; any FAIL makes the exit
status 1):

* memory and descriptors back to the baseline after the sessions closed (growth under
  RSS_BOUND / FDS_BOUND);
* every message a client was told was accepted (250 after DATA) is stored by a sink
  exactly once (its token found in exactly one .eml file of all sinks);
* every login that reached the login command got a protocol answer: no silent close,
  no hang (every client read has a timeout); a temporary failure is an answer;
* ``cutover_logins_total`` (every label summed) equals the login commands the clients
  sent; the relayed sessions and connections gauges back to 0;
* routing: the users with a fixed route were served by their pool's hosts;
* every reload succeeded; no panic and no ERROR line in cutover's log other than
  EXPECTED_ERRORS (the ones the test causes: none); cutover exits 0 on SIGTERM.

The summary table is printed and written to --out (default target/soak-summary.txt), the
metric samples to <out>-samples.csv. The temp dir (every server's config and log,
cutover's JSON log) is removed unless a check failed or --keep.

Addresses (loopback only, nothing else in tests/ uses them)::

    127.0.0.160  cutover: imap 11143 (STARTTLS), imaps 11993, pop3 11110 (STLS), pop3s
                 11995, submission 11587 (STARTTLS), submissions 11465, metrics 19898,
                 admin 19899
    127.0.0.161  "new":   Dovecot IMAP 143, POP3 110, submission 587 (STARTTLS, verified as
                 "localhost"), sink 2500
    127.0.0.162  "green": Dovecot IMAP 143, POP3 110 (plaintext), sink 2525
    127.0.0.163  "mauve": the same
    127.0.0.164  redis-server 16383 (no persistence)
    127.0.0.165  source address of every client connection
"""

import argparse
import collections
import csv
import datetime
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import clients  # noqa: E402
import harness  # noqa: E402
from harness import USERS  # noqa: E402

#: the first of the six addresses (CUTOVER_SOAK_BASE=170 runs a second soak beside the first)
_BASE = int(os.environ.get("CUTOVER_SOAK_BASE", "160"))
PROXY_IP = f"127.0.0.{_BASE}"
NEW_IP = f"127.0.0.{_BASE + 1}"
GREEN_IP = f"127.0.0.{_BASE + 2}"
MAUVE_IP = f"127.0.0.{_BASE + 3}"
REDIS_IP = f"127.0.0.{_BASE + 4}"
REDIS_PORT = 16383
CLIENT_IP = f"127.0.0.{_BASE + 5}"
PORTS = {"imap": 11143, "imaps": 11993, "pop3": 11110, "pop3s": 11995,
         "submission": 11587, "submissions": 11465}
METRICS_PORT = 19898
ADMIN_PORT = 19899
#: the proxy's certificate names localhost and 127.0.0.1/2: clients verify "localhost"
TLS_NAME = "localhost"

#: growth allowed over the baseline once every session has closed
RSS_BOUND = 16 * 1024 * 1024
FDS_BOUND = 20
#: ERROR lines the test itself causes: (regex on the message, why). None is expected:
#: every configuration written is valid, every user matches a route.
EXPECTED_ERRORS = []

IO_TIMEOUT = 20.0  # any single client read or write; longer than a hold (HOLD_FOR)
HOLD_MAX_WAIT = "10s"  # admin.hold_max_wait
HOLD_FOR = 2.5  # seconds between a hold and its release
RELOAD_EVERY = 4.0
KICK_EVERY = 9.0
HOLD_EVERY = 13.0
BACKEND_DOWN_FOR = 8.0
REDIS_DOWN_FOR = 5.0
MOVE_GRACE = "2s"  # on_move grace

#: user -> the hosts that may serve them (None: moves between pools during the run)
FIXED = {"joeuser": {"new"}, "alice": {"new"}, "weird": {"new"},
         "bob": {"green", "mauve"}, "carol": None}
MOVER = "carol"
LOAD_USERS = ("joeuser", "bob", "alice", "carol", "weird")
IDLE_USERS = ("alice", "bob", "carol", "joeuser")
KICK_USERS = ("alice", "bob", "joeuser")
HOLD_USERS = ("joeuser", "bob", "alice")
BAD_PASSWORD_SHARE = 0.05

TOKEN_RX = re.compile(rb"soak-[0-9a-f]{24}")


def parse_duration(text):
    """"60s", "10m", "1h", "1m30s", "90" (seconds) -> seconds (float)."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (e.g. 60s, 10m, 1h, 1m30s)")
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(a) * unit[b] for a, b in parts)


def fmt_duration(s):
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def mib(b):
    return f"{b / 1048576:.1f} MiB"


# --------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------


def soak_config(env, variant):
    """harness.proxy_config(env) moved to the soak's addresses, with admin, shared state
    in Redis, and routes: variant "a" has carol on legacy, "b" on new."""
    cfg = harness.proxy_config(env)
    ca = str(env.certs / "ca.pem")
    cfg["instance_name"] = "soak"
    cfg["listeners"] = [
        {"name": "imap", "protocol": "imap", "listen": f"{PROXY_IP}:{PORTS['imap']}", "tls": "starttls"},
        {"name": "imaps", "protocol": "imap", "listen": f"{PROXY_IP}:{PORTS['imaps']}", "tls": "implicit"},
        {"name": "pop3", "protocol": "pop3", "listen": f"{PROXY_IP}:{PORTS['pop3']}", "tls": "starttls"},
        {"name": "pop3s", "protocol": "pop3", "listen": f"{PROXY_IP}:{PORTS['pop3s']}", "tls": "implicit"},
        {"name": "submission", "protocol": "smtp", "listen": f"{PROXY_IP}:{PORTS['submission']}", "tls": "starttls"},
        {"name": "submissions", "protocol": "smtp", "listen": f"{PROXY_IP}:{PORTS['submissions']}", "tls": "implicit"},
    ]
    backend = {"tls": "starttls", "ca": ca, "server_name": "localhost"}
    cfg["pools"] = {
        "new": {
            "imap": {"servers": [f"{NEW_IP}:143"], **backend},
            "pop3": {"servers": [f"{NEW_IP}:110"], **backend},
            "smtp": {"servers": [f"{NEW_IP}:587"], **backend},
        },
        "legacy": {
            "balance": "first",
            "connect_timeout": "1s",
            "imap": {"servers": [f"{GREEN_IP}:143", f"{MAUVE_IP}:143"]},
            "pop3": {"servers": [f"{GREEN_IP}:110", f"{MAUVE_IP}:110"]},
            "smtp": {"servers": [f"{GREEN_IP}:{harness.LEGACY_SMTP_PORT}",
                                 f"{MAUVE_IP}:{harness.LEGACY_SMTP_PORT}"],
                     "auth": "pop-before-smtp"},
        },
    }
    new_users = list(harness.NEW_USERS) + ([MOVER] if variant == "b" else [])
    cfg["routes"] = [{"users": new_users, "pool": "new"}, {"pool": "legacy"}]
    cfg["on_move"] = {"action": "kick", "grace": MOVE_GRACE}
    cfg["metrics"] = {"listen": f"{PROXY_IP}:{METRICS_PORT}"}
    cfg["admin"] = {"listen": f"{PROXY_IP}:{ADMIN_PORT}", "hold_max_wait": HOLD_MAX_WAIT}
    cfg["state"] = {"redis": {"url": f"redis://{REDIS_IP}:{REDIS_PORT}/0", "timeout": "50ms"}}
    cfg["shutdown"] = {"drain_timeout": "5s"}
    return cfg


class SoakProxy(harness.Proxy):
    """harness.Proxy in env.root/proxy/ with the ports its config names, JSON logs."""

    def __init__(self, env, binary, config, log_level):
        super().__init__(env, binary, config)
        self.env["CUTOVER_LOG"] = log_level
        self.log_format = "json"
        self.argv = self._argv()
        self.ports = self._listener_ports()

    def _listener_ports(self):
        out = []
        for l in self.config["listeners"]:
            host, _, port = l["listen"].rpartition(":")
            out.append((host, int(port)))
        return out

    def _prepare(self):
        super()._prepare()
        self.ports = self._listener_ports() + self._endpoint_ports()


class Servers:
    """new, green, mauve (harness.Host on the soak's addresses) and Redis."""

    def __init__(self, env):
        self.new = harness.Host(env, "new", NEW_IP, tls=True)
        self.green = harness.Host(env, "green", GREEN_IP, tls=False)
        self.mauve = harness.Host(env, "mauve", MAUVE_IP, tls=False)
        self.hosts = {"new": self.new, "green": self.green, "mauve": self.mauve}
        self.redis = harness.Redis(env, REDIS_IP, REDIS_PORT, "soak-redis")

    def processes(self):
        return [self.redis] + [p for h in self.hosts.values() for p in h.processes()]

    def start(self):
        for p in self.processes():
            p.start()

    def ensure_running(self):
        for p in self.processes():
            if not p.running:
                p.start()

    def stop(self):
        procs = list(reversed(self.processes()))
        for p in procs:
            p.send_term()
        for p in procs:
            try:
                p.wait_stopped()
            except Exception as e:  # noqa: BLE001 - keep stopping the others
                print(f"[soak] stopping {p.name}: {e}", file=sys.stderr)


# --------------------------------------------------------------------------
# a line client with explicit outcomes
# --------------------------------------------------------------------------


class Closed(Exception):
    """The server closed the connection (EOF, reset, TLS EOF)."""


class Hang(Exception):
    """No answer within IO_TIMEOUT."""


class Conn:
    def __init__(self, port, implicit, ctx, timeout=IO_TIMEOUT):
        self.ctx = ctx
        self.transcript = collections.deque(maxlen=12)
        try:
            sock = socket.create_connection((PROXY_IP, port), timeout=timeout,
                                            source_address=(CLIENT_IP, 0))
        except (TimeoutError, socket.timeout) as e:
            raise Hang(f"connect: {e}") from e
        except OSError as e:
            raise Closed(f"connect: {e}") from e
        self.sock = sock
        self.buf = b""
        if implicit:
            self._wrap()

    def _wrap(self):
        try:
            self.sock = self.ctx.wrap_socket(self.sock, server_hostname=TLS_NAME)
        except (TimeoutError, socket.timeout) as e:
            raise Hang(f"TLS handshake: {e}") from e
        except (ssl.SSLError, OSError) as e:
            raise Closed(f"TLS handshake: {e!r}") from e

    def starttls(self):
        assert not self.buf, f"bytes after the STARTTLS answer: {self.buf!r}"
        self._wrap()

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.transcript.append(b"C: " + data[:200])
        try:
            self.sock.sendall(data)
        except (TimeoutError, socket.timeout) as e:
            raise Hang(f"send: {e}") from e
        except OSError as e:
            raise Closed(f"send: {e!r}") from e

    def readline(self, timeout=IO_TIMEOUT):
        deadline = time.monotonic() + timeout
        while b"\r\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Hang(f"no line within {timeout:g}s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, socket.timeout) as e:
                raise Hang(f"no line within {timeout:g}s") from e
            except (ssl.SSLError, OSError) as e:
                raise Closed(f"{e!r}") from e
            if not chunk:
                raise Closed("EOF")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        self.transcript.append(b"S: " + line[:200])
        return line

    def wait_eof(self, timeout=5.0):
        """After a goodbye: read until the close (True) or give up (False)."""
        try:
            while True:
                self.readline(timeout)
        except Closed:
            return True
        except Hang:
            return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def dump(self):
        return " | ".join(l.decode("utf-8", "replace") for l in self.transcript)


# --------------------------------------------------------------------------
# bookkeeping
# --------------------------------------------------------------------------


class Stats:
    """Client-side counts, shared by every thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.c = collections.Counter()  # (proto, key) -> n
        self.problems = []  # (kind, text): login problems (silent close, hang, ...)
        self.cuts = []  # (time, proto, user, phase, why) relayed sessions cut
        self.accepted = {}  # token -> (user, time)
        self.hosts = collections.Counter()  # (proto, user, host) -> n
        self.wrong_host = []
        self.events = []  # (time, kind, detail)
        self.active_stops = {}  # host -> (start, end or None)
        self.kicked = {}  # user -> last kick time
        self.cut_reasons = collections.Counter()  # "proto phase: why" -> n (cut by the test)

    def add(self, proto, key, n=1):
        with self.lock:
            self.c[(proto, key)] += n

    def problem(self, kind, text):
        with self.lock:
            self.c[("all", kind)] += 1
            if len(self.problems) < 200:
                self.problems.append((kind, text))

    def event(self, kind, detail=""):
        with self.lock:
            self.events.append((time.time(), kind, detail))

    def explain_cut(self, user, t):
        """Why a relayed session may have been cut at ``t`` by the test itself."""
        with self.lock:
            for host, (start, end) in self.active_stops.items():
                if start - 1 <= t and (end is None or t <= end + 3):
                    return f"backend {host} stopped"
            if user in self.kicked and t - self.kicked[user] <= 3:
                return "admin kick"
            if user == MOVER:
                return "moved by a reload (on_move kick)"
        return None

    def cut(self, proto, user, phase, detail, conn=None):
        t = time.time()
        why = self.explain_cut(user, t)
        with self.lock:
            key = "cut_explained" if why else "cut_unexplained"
            self.c[(proto, key)] += 1
            if why:
                self.cut_reasons[f"{proto} {phase}: {why}"] += 1
            if not why and len(self.cuts) < 200:
                self.cuts.append((t, proto, user, phase,
                                  f"{detail}; {conn.dump() if conn else ''}"))

    def served(self, proto, user, host):
        with self.lock:
            self.hosts[(proto, user, host)] += 1
            allowed = FIXED.get(user)
            if allowed is not None and host not in allowed and len(self.wrong_host) < 50:
                self.wrong_host.append((proto, user, host))


def new_token():
    return "soak-" + uuid.uuid4().hex[:24]


def pick_password(user, rnd):
    if rnd.random() < BAD_PASSWORD_SHARE:
        return USERS[user] + "-wrong", True
    return USERS[user], False


def imap_astring(s):
    """A quoted string when plain enough, else None (send a literal)."""
    if re.fullmatch(r'[\x20-\x7e]*', s) and '"' not in s and "\\" not in s:
        return f'"{s}"'
    return None


# --------------------------------------------------------------------------
# one session per protocol
# --------------------------------------------------------------------------


class LoginFailed(Exception):
    pass


def imap_read_tagged(conn, tag, seen_bye=None):
    """Lines up to the tagged answer of ``tag``: (tagged line, untagged lines). An
    untagged BYE followed by the close raises Closed with ``seen_bye`` set."""
    lines = []
    t = tag.encode() + b" "
    while True:
        try:
            line = conn.readline()
        except Closed:
            if seen_bye is not None and any(l.upper().startswith(b"* BYE") for l in lines):
                seen_bye.append(lines)
            raise
        if line.startswith(t):
            return line, lines
        lines.append(line)


def imap_login(conn, stats, user, password, proto="imap"):
    """Send LOGIN (quoted, or literals); classify and count the answer: "ok", "rejected",
    "tempfail", "bye" or "other". Raises Closed or Hang when there was none."""
    counted = False
    byes = []
    try:
        q_user, q_pass = imap_astring(user), imap_astring(password)
        if q_user and q_pass:
            conn.send(f"a1 LOGIN {q_user} {q_pass}\r\n")
            stats.add(proto, "login_attempts")
            counted = True
        else:
            u, p = user.encode(), password.encode()
            conn.send(f"a1 LOGIN {{{len(u)}}}\r\n")
            stats.add(proto, "login_attempts")
            counted = True
            line = conn.readline()
            if not line.startswith(b"+"):
                stats.add(proto, "login_answered_other")
                return "other"
            conn.send(u + f" {{{len(p)}}}\r\n".encode())
            line = conn.readline()
            if not line.startswith(b"+"):
                stats.add(proto, "login_answered_other")
                return "other"
            conn.send(p + b"\r\n")
        tagged, _ = imap_read_tagged(conn, "a1", byes)
    except Closed as e:
        if byes:
            stats.add(proto, "login_bye")
            return "bye"
        if counted:
            stats.add(proto, "login_silent_close")
            stats.problem("login silent close", f"{proto} {user}: {e}; {conn.dump()}")
        raise
    except Hang as e:
        if counted:
            stats.add(proto, "login_hang")
            stats.problem("login hang", f"{proto} {user}: {e}; {conn.dump()}")
        raise
    up = tagged.upper()
    if up.startswith(b"A1 OK"):
        outcome = "ok"
    elif b"[UNAVAILABLE]" in up:
        outcome = "tempfail"
    elif up.startswith(b"A1 NO"):
        outcome = "rejected"
    else:
        outcome = "answered_other"
    stats.add(proto, f"login_{outcome}")
    return outcome


def refused_good_password(stats, proto, user, outcome, answer):
    """A login with the right password that did not succeed: a temporary failure is
    expected while a backend is stopped or a hold times out; a rejection is not."""
    stats.add(proto, "login_failed_good_password")
    if outcome == "rejected":
        stats.add(proto, "login_rejected_good_password")
        stats.problem("right password rejected", f"{proto} {user}: {answer!r}")


def imap_greet(conn, starttls):
    g = conn.readline()
    if not g.startswith(b"* OK"):
        raise LoginFailed(f"greeting {g!r}")
    if starttls:
        conn.send("s1 STARTTLS\r\n")
        tagged, _ = imap_read_tagged(conn, "s1")
        if not tagged.upper().startswith(b"S1 OK"):
            raise LoginFailed(f"STARTTLS {tagged!r}")
        conn.starttls()


def prelogin_failure(stats, proto, user, e, conn=None):
    kind = {Closed: "closed", Hang: "hang"}.get(type(e), "refused")
    stats.add(proto, f"prelogin_{kind}")
    stats.problem(f"before login: {kind}", f"{proto} {user}: {e!r}; {conn.dump() if conn else ''}")


def imap_session(ctx, stats, user, rnd):
    implicit = rnd.random() < 0.5
    password, bad = pick_password(user, rnd)
    conn = None
    try:
        conn = Conn(PORTS["imaps" if implicit else "imap"], implicit, ctx)
        imap_greet(conn, not implicit)
    except (Closed, Hang, LoginFailed) as e:
        prelogin_failure(stats, "imap", user, e, conn)
        if conn:
            conn.close()
        return
    try:
        try:
            outcome = imap_login(conn, stats, user, password)
        except (Closed, Hang):
            return
        if outcome != "ok":
            if not bad:
                refused_good_password(stats, "imap", user, outcome, conn.dump())
            return
        if bad:
            stats.problem("wrong password accepted", f"imap {user}")
        phase = "select"
        byes = []
        try:
            tagged, _ = conn_cmd(conn, "a2", "SELECT INBOX", byes)
            if not tagged.upper().startswith(b"A2 OK"):
                stats.add("imap", "session_no")
                return
            phase = "fetch"
            tagged, lines = conn_cmd(conn, "a3", "FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])", byes)
            host = next((m[1].decode() for l in lines
                         if (m := re.match(rb"Subject: hello from (\w+)", l))), None)
            if host:
                stats.served("imap", user, host)
            phase = "logout"
            conn.send("a4 LOGOUT\r\n")
            tagged, _ = imap_read_tagged(conn, "a4")
            stats.add("imap", "session_done")
        except Closed as e:
            if byes:
                stats.add("imap", "session_goodbye")
            else:
                stats.cut("imap", user, phase, repr(e), conn)
        except Hang as e:
            stats.add("imap", "session_hang")
            stats.problem("relayed session hang", f"imap {user} {phase}: {e}; {conn.dump()}")
    finally:
        conn.close()


def conn_cmd(conn, tag, cmd, byes):
    conn.send(f"{tag} {cmd}\r\n")
    return imap_read_tagged(conn, tag, byes)


def pop3_session(ctx, stats, user, rnd):
    implicit = rnd.random() < 0.5
    password, bad = pick_password(user, rnd)
    conn = None
    try:
        conn = Conn(PORTS["pop3s" if implicit else "pop3"], implicit, ctx)
        g = conn.readline()
        if not g.startswith(b"+OK"):
            raise LoginFailed(f"greeting {g!r}")
        if not implicit:
            conn.send("STLS\r\n")
            a = conn.readline()
            if not a.startswith(b"+OK"):
                raise LoginFailed(f"STLS {a!r}")
            conn.starttls()
        conn.send(f"USER {user}\r\n")
        a = conn.readline()
        if not a.startswith(b"+OK"):
            raise LoginFailed(f"USER {a!r}")
    except (Closed, Hang, LoginFailed) as e:
        prelogin_failure(stats, "pop3", user, e, conn)
        if conn:
            conn.close()
        return
    try:
        try:
            conn.send(b"PASS " + password.encode() + b"\r\n")
            stats.add("pop3", "login_attempts")
            a = conn.readline()
        except Closed as e:
            stats.add("pop3", "login_silent_close")
            stats.problem("login silent close", f"pop3 {user}: {e}; {conn.dump()}")
            return
        except Hang as e:
            stats.add("pop3", "login_hang")
            stats.problem("login hang", f"pop3 {user}: {e}; {conn.dump()}")
            return
        if not a.startswith(b"+OK"):
            if b"[SYS/TEMP]" in a or b"[IN-USE]" in a:
                outcome = "tempfail"
            elif a.startswith(b"-ERR"):
                outcome = "rejected"
            else:
                outcome = "answered_other"
            stats.add("pop3", f"login_{outcome}")
            if not bad:
                refused_good_password(stats, "pop3", user, outcome, a)
            return
        stats.add("pop3", "login_ok")
        if bad:
            stats.problem("wrong password accepted", f"pop3 {user}")
        phase = "list"
        try:
            conn.send("LIST\r\n")
            a = conn.readline()
            if a.startswith(b"-ERR"):
                stats.add("pop3", "session_goodbye")
                conn.wait_eof()
                return
            while conn.readline() != b".":
                pass
            phase = "quit"
            conn.send("QUIT\r\n")
            a = conn.readline()
            stats.add("pop3", "session_done" if a.startswith(b"+OK") else "session_goodbye")
        except Closed as e:
            stats.cut("pop3", user, phase, repr(e), conn)
        except Hang as e:
            stats.add("pop3", "session_hang")
            stats.problem("relayed session hang", f"pop3 {user} {phase}: {e}; {conn.dump()}")
    finally:
        conn.close()


def smtp_reply(conn):
    """A whole (multi-line) reply: (code, last line)."""
    while True:
        line = conn.readline()
        if len(line) < 3 or not line[:3].isdigit():
            return 0, line
        if line[3:4] != b"-":
            return int(line[:3]), line


def smtp_session(ctx, stats, user, rnd):
    implicit = rnd.random() < 0.5
    password, bad = pick_password(user, rnd)
    conn = None
    try:
        conn = Conn(PORTS["submissions" if implicit else "submission"], implicit, ctx)
        code, line = smtp_reply(conn)
        if code != 220:
            raise LoginFailed(f"greeting {line!r}")
        conn.send("EHLO soak.client.test\r\n")
        code, line = smtp_reply(conn)
        if code != 250:
            raise LoginFailed(f"EHLO {line!r}")
        if not implicit:
            conn.send("STARTTLS\r\n")
            code, line = smtp_reply(conn)
            if code != 220:
                raise LoginFailed(f"STARTTLS {line!r}")
            conn.starttls()
            conn.send("EHLO soak.client.test\r\n")
            code, line = smtp_reply(conn)
            if code != 250:
                raise LoginFailed(f"EHLO {line!r}")
    except (Closed, Hang, LoginFailed) as e:
        prelogin_failure(stats, "smtp", user, e, conn)
        if conn:
            conn.close()
        return
    try:
        blob = clients.b64(b"\0" + user.encode() + b"\0" + password.encode())
        try:
            conn.send(f"AUTH PLAIN {blob}\r\n")
            stats.add("smtp", "login_attempts")
            code, line = smtp_reply(conn)
        except Closed as e:
            stats.add("smtp", "login_silent_close")
            stats.problem("login silent close", f"smtp {user}: {e}; {conn.dump()}")
            return
        except Hang as e:
            stats.add("smtp", "login_hang")
            stats.problem("login hang", f"smtp {user}: {e}; {conn.dump()}")
            return
        if code != 235:
            if 400 <= code < 500:
                outcome = "tempfail"
            elif 500 <= code < 600:
                outcome = "rejected"
            else:
                outcome = "answered_other"
            stats.add("smtp", f"login_{outcome}")
            if not bad:
                refused_good_password(stats, "smtp", user, outcome, line)
            return
        stats.add("smtp", "login_ok")
        if bad:
            stats.problem("wrong password accepted", f"smtp {user}")
        tok = new_token()
        phase = "mail"
        try:
            for cmd, want in ((f"MAIL FROM:<{user}@example.net>", 250),
                              ("RCPT TO:<x@example.net>", 250), ("DATA", 354)):
                phase = cmd.split()[0].split(":")[0].lower()
                conn.send(cmd + "\r\n")
                code, line = smtp_reply(conn)
                if code != want:
                    stats.add("smtp", "session_refused" if code != 421 else "session_goodbye")
                    return
            phase = "message"
            msg = (f"From: {user}@example.net\r\nTo: x@example.net\r\nSubject: soak {tok}\r\n"
                   f"Message-ID: <{tok}@soak.test>\r\n\r\nsoak message {tok}\r\n.\r\n")
            stats.add("smtp", "messages_sent")
            conn.send(msg)
            code, line = smtp_reply(conn)
            if code == 250:
                with stats.lock:
                    stats.accepted[tok] = (user, time.time())
                stats.add("smtp", "messages_accepted")
            else:
                stats.add("smtp", "messages_refused")
                return
            phase = "quit"
            conn.send("QUIT\r\n")
            smtp_reply(conn)
            stats.add("smtp", "session_done")
        except Closed as e:
            stats.cut("smtp", user, phase, repr(e), conn)
        except Hang as e:
            stats.add("smtp", "session_hang")
            stats.problem("relayed session hang", f"smtp {user} {phase}: {e}; {conn.dump()}")
    finally:
        conn.close()


SESSIONS = {"imap": imap_session, "pop3": pop3_session, "smtp": smtp_session}


# --------------------------------------------------------------------------
# load: paced workers and IDLE clients
# --------------------------------------------------------------------------


class Load:
    """Paced sessions per protocol (``rates``: sessions per second) on a few worker
    threads each, and ``idle`` long-lived IDLE clients. ``stop()`` ends every session
    (IDLE clients say DONE and LOGOUT) and joins the threads."""

    WORKERS = 4

    def __init__(self, ctx, stats, rates, idle, seed):
        self.ctx = ctx
        self.stats = stats
        self.rates = rates
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.next_at = {p: time.monotonic() for p in rates}
        self.seq = collections.Counter()
        self.threads = []
        for proto, rate in rates.items():
            if rate <= 0:
                continue
            for i in range(self.WORKERS):
                self.threads.append(threading.Thread(
                    target=self._worker, args=(proto, random.Random(f"{seed}-{proto}-{i}")),
                    name=f"{proto}-{i}", daemon=True))
        for i in range(idle):
            user = IDLE_USERS[i % len(IDLE_USERS)]
            self.threads.append(threading.Thread(target=self._idle, args=(user, i),
                                                 name=f"idle-{i}", daemon=True))

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(IO_TIMEOUT * 3)
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            self.stats.problem("client thread stuck", f"still running after stop: {alive}")

    def _ticket(self, proto):
        """The next start time of a ``proto`` session (steady rate, no catch-up burst)."""
        with self.lock:
            now = time.monotonic()
            at = max(self.next_at[proto], now - 0.5)
            self.next_at[proto] = at + 1.0 / self.rates[proto]
            user = LOAD_USERS[self.seq[proto] % len(LOAD_USERS)]
            self.seq[proto] += 1
            return at, user

    def _worker(self, proto, rnd):
        session = SESSIONS[proto]
        while not self.stop_ev.is_set():
            at, user = self._ticket(proto)
            if self.stop_ev.wait(max(0.0, at - time.monotonic())):
                return
            self.stats.add(proto, "sessions")
            try:
                session(self.ctx, self.stats, user, rnd)
            except Exception as e:  # noqa: BLE001 - a client bug must not end the soak
                self.stats.problem("client error", f"{proto} {user}: {e!r}")

    def _idle(self, user, idx):
        rnd = random.Random(f"idle-{idx}")
        while not self.stop_ev.is_set():
            self.stats.add("imap", "idle_sessions")
            try:
                self._idle_once(user, rnd)
            except Exception as e:  # noqa: BLE001
                self.stats.problem("client error", f"idle {user}: {e!r}")
            self.stop_ev.wait(0.5 + rnd.random())

    def _idle_once(self, user, rnd):
        stats = self.stats
        conn = None
        try:
            conn = Conn(PORTS["imaps"], True, self.ctx)
            imap_greet(conn, False)
        except (Closed, Hang, LoginFailed) as e:
            prelogin_failure(stats, "imap", user, e, conn)
            if conn:
                conn.close()
            return
        try:
            try:
                outcome = imap_login(conn, stats, user, USERS[user])
            except (Closed, Hang):
                return
            if outcome != "ok":
                refused_good_password(stats, "imap", user, outcome, conn.dump())
                return
            byes = []
            phase = "select"
            try:
                tagged, _ = conn_cmd(conn, "i1", "SELECT INBOX", byes)
                n = 2
                while not self.stop_ev.is_set():
                    tag = f"i{n}"
                    n += 1
                    phase = "idle"
                    conn.send(f"{tag} IDLE\r\n")
                    line = conn.readline()
                    if not line.startswith(b"+"):
                        if line.upper().startswith(b"* BYE"):
                            byes.append([line])
                            raise Closed("BYE")
                        stats.problem("idle refused", f"{user}: {line!r}")
                        return
                    until = time.monotonic() + 20 + 10 * rnd.random()
                    while time.monotonic() < until and not self.stop_ev.is_set():
                        try:
                            line = conn.readline(timeout=1.0)
                        except Hang:
                            continue
                        if line.upper().startswith(b"* BYE"):
                            byes.append([line])
                    phase = "done"
                    conn.send("DONE\r\n")
                    imap_read_tagged(conn, tag, byes)
                    stats.add("imap", "idle_rounds")
                phase = "logout"
                conn.send("z LOGOUT\r\n")
                imap_read_tagged(conn, "z")
                stats.add("imap", "session_done")
            except Closed as e:
                if byes:
                    stats.add("imap", "session_goodbye")
                else:
                    stats.cut("imap", user, f"idle:{phase}", repr(e), conn)
            except Hang as e:
                stats.add("imap", "session_hang")
                stats.problem("relayed session hang", f"idle {user} {phase}: {e}; {conn.dump()}")
        finally:
            conn.close()


# --------------------------------------------------------------------------
# the proxy's side: metrics, admin, log
# --------------------------------------------------------------------------


def scrape():
    return clients.scrape_metrics(PROXY_IP, METRICS_PORT)


def msum(text, name, **labels):
    return clients.metric_sum(text, name, **labels)


def admin(method, path):
    status, body = harness.http_request(f"http://{PROXY_IP}:{ADMIN_PORT}{path}", method=method,
                                        data=b"" if method == "POST" else None)
    return status, body


class Sampler(threading.Thread):
    """Scrapes /metrics every ``every`` seconds: (elapsed, rss, fds, sessions, connections)."""

    def __init__(self, t0, every=5.0):
        super().__init__(name="sampler", daemon=True)
        self.t0 = t0
        self.every = every
        self.samples = []
        self.failures = []
        self.stop_ev = threading.Event()

    def sample(self):
        try:
            text = scrape()
        except Exception as e:  # noqa: BLE001
            self.failures.append((time.monotonic() - self.t0, repr(e)))
            return None
        row = (round(time.monotonic() - self.t0, 1),
               int(msum(text, "process_resident_memory_bytes")),
               int(msum(text, "process_open_fds")),
               int(msum(text, "cutover_sessions_active")),
               int(msum(text, "cutover_connections_active")))
        self.samples.append(row)
        return row

    def run(self):
        while not self.stop_ev.wait(self.every):
            self.sample()


def quiesced_figures(stats, what, timeout=30.0):
    """Wait (bounded) for no relayed session and no client connection, then take 5
    samples 0.5 s apart: (min rss, min fds, seconds it took to drain, gauges at the end)."""
    t = time.monotonic()
    gauges = None
    while True:
        try:
            text = scrape()
            gauges = (msum(text, "cutover_sessions_active"), msum(text, "cutover_connections_active"))
            if gauges == (0, 0):
                break
        except Exception:  # noqa: BLE001
            pass
        if time.monotonic() - t > timeout:
            stats.problem("sessions not drained",
                          f"{what}: sessions_active, connections_active = {gauges} after {timeout:g}s")
            break
        time.sleep(0.2)
    drained = time.monotonic() - t
    time.sleep(1.0)
    rss, fds = [], []
    for _ in range(5):
        text = scrape()
        rss.append(msum(text, "process_resident_memory_bytes"))
        fds.append(msum(text, "process_open_fds"))
        time.sleep(0.5)
    return int(min(rss)), int(min(fds)), drained, gauges


def scan_log(path):
    """(panic lines, unexpected ERROR lines, expected ERROR lines, WARN message counts,
    level counts) from cutover's JSON log (and any plain text line, e.g. a panic)."""
    panics, errors, expected = [], [], []
    warns = collections.Counter()
    levels = collections.Counter()
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if "panicked at" in line or "RUST_BACKTRACE" in line:
                panics.append(line)
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            level = str(rec.get("level", "")).upper()
            levels[level] += 1
            msg = str(rec.get("message", ""))
            if level == "ERROR":
                why = next((w for rx, w in EXPECTED_ERRORS if re.search(rx, msg)), None)
                (expected if why else errors).append(line)
            elif level == "WARN":
                key = msg
                for k in ("server", "pool", "reason"):
                    if k in rec:
                        key += f" {k}={rec[k]}"
                warns[key] += 1
    return panics, errors, expected, warns, levels


# --------------------------------------------------------------------------
# the chaos: reloads, admin, backends, Redis
# --------------------------------------------------------------------------


class Chaos:
    """Everything the soak does to the proxy and its backends, on a schedule (seconds
    from the start of the phase). Reloads, kicks and holds run in the calling thread
    (``tick()``), backend and Redis restarts in a thread of their own."""

    def __init__(self, proxy, servers, stats, configs):
        self.proxy = proxy
        self.servers = servers
        self.stats = stats
        self.configs = configs  # {"a": dict, "b": dict}
        self.variant = "a"
        self.reloads = collections.Counter()
        self.kicks = 0
        self.kicked_sessions = 0
        self.holds = 0
        self.admin_errors = []
        self.releases = []  # (due time, user)
        self.backend_cycles = []  # (host, stop at, down at, up at) done
        self.slow_stops = []  # processes that took over 3 s to stop
        self.redis_restarts = []  # (killed at, back at, seconds up again)
        self.rnd = random.Random("chaos")

    def reload(self):
        self.variant = "b" if self.variant == "a" else "a"
        self.proxy.write_config(self.configs[self.variant])
        if self.reloads["total"] % 2 == 1:
            self.proxy.sighup()
            self.reloads["sighup"] += 1
        else:
            self.reloads["file"] += 1
        self.reloads["total"] += 1
        self.stats.event("reload", self.variant)

    def kick(self):
        user = KICK_USERS[self.kicks % len(KICK_USERS)]
        with self.stats.lock:
            self.stats.kicked[user] = time.time()
        status, body = admin("POST", f"/kick?user={user}")
        self.kicks += 1
        if status != 200:
            self.admin_errors.append(f"kick {user}: {status} {body!r}")
        else:
            try:
                self.kicked_sessions += int(json.loads(body).get("kicked", 0))
            except ValueError:
                pass
        self.stats.event("kick", user)

    def hold(self, now):
        user = HOLD_USERS[self.holds % len(HOLD_USERS)]
        status, body = admin("POST", f"/hold?user={user}")
        self.holds += 1
        if status != 200:
            self.admin_errors.append(f"hold {user}: {status} {body!r}")
        self.releases.append((now + HOLD_FOR, user))
        self.stats.event("hold", user)

    def release_due(self, now, force=False):
        keep = []
        for due, user in self.releases:
            if force or now >= due:
                status, body = admin("POST", f"/release?user={user}")
                if status != 200:
                    self.admin_errors.append(f"release {user}: {status} {body!r}")
                self.stats.event("release", user)
            else:
                keep.append((due, user))
        self.releases = keep

    def cycle_backend(self, name, down_for, stop_ev):
        host = self.servers.hosts[name]
        t0 = time.time()
        with self.stats.lock:
            self.stats.active_stops[name] = (t0, None)
        self.stats.event("backend stop", name)
        procs = list(reversed(host.processes()))
        for p in procs:  # the whole host at once (SIGTERM), then wait for each
            p.send_term()
        slow = []
        for p in procs:
            w = time.time()
            p.wait_stopped()
            if time.time() - w > 3:  # this one held the host up
                slow.append(f"{p.name} {time.time() - t0:.1f}s")
        stopped = time.time()
        if slow:  # past harness.STOP_TIMEOUT (10 s) a process group is SIGKILLed
            self.stats.event("slow stop", ", ".join(slow))
            self.slow_stops.append(", ".join(slow))
        stop_ev.wait(down_for)
        host.start()
        t1 = time.time()
        with self.stats.lock:
            self.stats.active_stops[name] = (t0, t1)
        self.stats.event("backend start", name)
        self.backend_cycles.append((name, t0, stopped, t1))

    def restart_redis(self, stop_ev):
        t0 = time.time()
        self.stats.event("redis", "SIGKILL")
        self.servers.redis.kill()
        noticed = None  # seconds until the proxy shows cutover_state_backend_up 0
        while time.time() - t0 < REDIS_DOWN_FOR and not stop_ev.is_set():
            try:
                if noticed is None and msum(scrape(), "cutover_state_backend_up") == 0:
                    noticed = time.time() - t0
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.2)
        self.servers.redis.start()
        t1 = time.time()
        # the proxy reconnects by itself: wait (bounded) for cutover_state_backend_up == 1
        back = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if msum(scrape(), "cutover_state_backend_up") >= 1:
                    back = time.time() - t1
                    break
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.2)
        self.stats.event("redis", "started")
        self.redis_restarts.append((t0, t1, back, noticed))

    def run_faults(self, plan, t0, stop_ev):
        """``plan``: [(seconds from t0, "backend", name) | (seconds, "redis", None)]."""
        for at, kind, name in plan:
            if stop_ev.wait(max(0.0, t0 + at - time.monotonic())):
                return
            try:
                if kind == "backend":
                    self.cycle_backend(name, BACKEND_DOWN_FOR, stop_ev)
                else:
                    self.restart_redis(stop_ev)
            except Exception as e:  # noqa: BLE001
                self.stats.problem("fault injection failed", f"{kind} {name}: {e!r}")

    def run(self, seconds, plan, admin_ops=True):
        """Reloads/kicks/holds for ``seconds`` (in this thread) with ``plan`` (backend
        and Redis restarts) in a thread of its own."""
        t0 = time.monotonic()
        stop_ev = threading.Event()
        faults = threading.Thread(target=self.run_faults, args=(plan, t0, stop_ev),
                                  name="faults", daemon=True)
        faults.start()
        due = {"reload": t0 + RELOAD_EVERY, "kick": t0 + KICK_EVERY / 2, "hold": t0 + HOLD_EVERY / 2}
        try:
            while True:
                now = time.monotonic()
                if now >= t0 + seconds:
                    break
                try:
                    if now >= due["reload"]:
                        self.reload()
                        due["reload"] += RELOAD_EVERY
                    if admin_ops and now >= due["kick"]:
                        self.kick()
                        due["kick"] += KICK_EVERY
                    if admin_ops and now >= due["hold"]:
                        self.hold(now)
                        due["hold"] += HOLD_EVERY
                    self.release_due(now)
                except Exception as e:  # noqa: BLE001
                    self.stats.problem("chaos step failed", repr(e))
                time.sleep(0.1)
        finally:
            self.release_due(0, force=True)
            stop_ev.set()
            faults.join(60)
            self.servers.ensure_running()


def fault_plan(seconds):
    """Backend stops alternately of green and new, one a minute (at least two in a short
    run); Redis restarts in between (one every 5 minutes, at least one)."""
    plan = []
    if seconds < 150:
        plan.append((seconds * 0.15, "backend", "green"))
        plan.append((seconds * 0.40, "redis", None))
        plan.append((seconds * 0.60, "backend", "new"))
    else:
        names = ("green", "new")
        k = 0
        at = 15.0
        while at + BACKEND_DOWN_FOR + 10 < seconds:
            plan.append((at, "backend", names[k % 2]))
            k += 1
            at += 60.0
        at = 45.0
        while at + 20 < seconds:
            plan.append((at, "redis", None))
            at += 300.0
    return sorted(plan)


# --------------------------------------------------------------------------
# checks and the summary
# --------------------------------------------------------------------------


def count_sink_tokens(servers):
    """token -> list of (host, file) storing it, over every sink."""
    found = collections.defaultdict(list)
    for name, host in servers.hosts.items():
        for p in sorted(host.sink.msg_dir.glob("*.eml")):
            for tok in set(TOKEN_RX.findall(p.read_bytes())):
                found[tok.decode()].append((name, p.name))
    return found


def table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)),
           "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return "\n".join(out)


def wrap_detail(rows, width=110):
    """Rows (check, result, detail) whose long detail is folded onto extra lines."""
    out = []
    for check, result, detail in rows:
        parts = []
        line = ""
        for word in str(detail).split(" "):
            if line and len(line) + 1 + len(word) > width:
                parts.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        parts.append(line)
        out.append((check, result, parts[0]))
        out.extend(("", "", p) for p in parts[1:])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=parse_duration, default=parse_duration("30m"))
    ap.add_argument("--out", default=str(harness.REPO / "target" / "soak-summary.txt"))
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    ap.add_argument("--imap-rate", type=float, default=3.0, help="IMAP sessions per second")
    ap.add_argument("--pop3-rate", type=float, default=3.0)
    ap.add_argument("--smtp-rate", type=float, default=2.0)
    ap.add_argument("--idle", type=int, default=4, help="long-lived IDLE clients")
    ap.add_argument("--log-level", default=os.environ.get("SOAK_CUTOVER_LOG", "info"),
                    help="cutover's CUTOVER_LOG (default info)")
    args = ap.parse_args()

    if os.geteuid() != 0:
        sys.exit("soak: needs root (Dovecot binds ports 110/143/587 and drops privileges)")
    binary = harness.resolve_cutover_bin()
    if not binary.exists():
        sys.exit(f"soak: cutover binary missing: {binary} (cargo build --bins)")

    # SIGTERM/SIGHUP to the driver: stop everything it started (finally blocks)
    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    duration = args.duration
    warmup = min(max(duration * 0.15, 8.0), 120.0)
    main_phase = max(duration - warmup, 10.0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = out.with_name(out.stem + "-samples.csv")
    rates = {"imap": args.imap_rate, "pop3": args.pop3_rate, "smtp": args.smtp_rate}

    root = tempfile.mkdtemp(prefix="cutover-soak-", dir=os.environ.get("CUTOVER_E2E_TMP"))
    os.chmod(root, 0o755)
    started = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    print(f"[soak] {fmt_duration(duration)} (warm-up {fmt_duration(warmup)}), binary {binary}, "
          f"temp dir {root}", flush=True)
    t_start = time.monotonic()
    env = harness.Env(root)
    servers = Servers(env)
    configs = {"a": soak_config(env, "a"), "b": soak_config(env, "b")}
    proxy = SoakProxy(env, binary, configs["a"], args.log_level)
    stats = Stats()
    checks = []  # (name, ok, detail)
    ok_all = False
    sampler = None
    rc_exit = None
    try:
        for v, cfg in configs.items():  # both configurations must be valid
            p = env.root / f"check-{v}.yaml"
            p.write_text(harness.to_yaml(cfg) + "\n")
            cp = clients.cutover_cli("check", "--config", p)
            if cp.returncode != 0:
                raise RuntimeError(f"cutover check of config {v}: {cp.out}{cp.err}")
        servers.start()
        proxy.start()
        clients.wait_for(lambda: msum(scrape(), "cutover_state_backend_up") >= 1, 20,
                         what="cutover_state_backend_up == 1")
        # rise: every backend seen up by the health checks
        clients.wait_for(lambda: all(v == 1 for v in clients.metric_values(scrape(), "cutover_backend_up")),
                         30, what="every backend up")
        setup_s = time.monotonic() - t_start
        print(f"[soak] servers and proxy up in {setup_s:.1f}s; warm-up", flush=True)
        ctx = env.ssl_context()
        chaos = Chaos(proxy, servers, stats, configs)
        sampler = Sampler(time.monotonic())
        sampler.start()

        # 1. warm-up: every path once (no faults), then drain and take the baseline
        load = Load(ctx, stats, rates, args.idle, seed="warm").start()
        chaos.run(warmup, [], admin_ops=True)
        load.stop()
        base_rss, base_fds, base_drain, base_gauges = quiesced_figures(stats, "baseline")
        sampler.samples.append(("baseline",) + (base_rss, base_fds) + tuple(int(g) for g in base_gauges or (0, 0)))
        print(f"[soak] baseline: RSS {mib(base_rss)}, fds {base_fds} "
              f"(drained in {base_drain:.1f}s); main phase {fmt_duration(main_phase)}", flush=True)

        # 2. the soak
        plan = fault_plan(main_phase)
        load = Load(ctx, stats, rates, args.idle, seed="main").start()
        t_main = time.monotonic()
        t_main_wall = time.time()
        chaos.run(main_phase, plan, admin_ops=True)
        load.stop()
        main_s = time.monotonic() - t_main

        # 3. the end: every client gone, backends and Redis up
        servers.ensure_running()
        crashed = not proxy.running
        sampler.stop_ev.set()
        if crashed:  # every check that needs /metrics fails, saying why
            rc_exit = proxy.proc.returncode
            stats.problem("cutover exited during the run", f"exit status {rc_exit}")
            end_rss, end_fds, end_drain, end_gauges = base_rss + RSS_BOUND, base_fds + FDS_BOUND, 0.0, None
            text = ""
        else:
            end_rss, end_fds, end_drain, end_gauges = quiesced_figures(stats, "end")
            sampler.samples.append(("end",) + (end_rss, end_fds) + tuple(int(g) for g in end_gauges or (0, 0)))
            # the last configuration written is applied (the file watcher looks every 2 s)
            try:
                clients.wait_for(lambda: msum(scrape(), "cutover_config_reloads_total") >= chaos.reloads["total"],
                                 10, what="every reload counted")
            except AssertionError:
                pass  # reported by the check below
            text = scrape()
        metric_logins = {p: msum(text, "cutover_logins_total", protocol=p) for p in ("imap", "pop3", "smtp")}
        metric_results = collections.Counter()
        for line in text.splitlines():
            m = re.match(r'cutover_logins_total\{([^}]*)\}\s+(\S+)', line)
            if m:
                r = re.search(r'result="([^"]*)"', m[1])
                metric_results[r[1] if r else "?"] += float(m[2])
        reloads_ok = msum(text, "cutover_config_reloads_total", result="ok")
        reloads_err = msum(text, "cutover_config_reloads_total", result="error")
        held = {r: msum(text, "cutover_held_logins_total", result=r) for r in ("released", "timed_out")}
        kicked_metric = msum(text, "cutover_sessions_kicked_total")
        disconnects = msum(text, "cutover_backend_disconnects_total")
        holds_left = "?"
        if not crashed:
            status, body = admin("GET", "/holds")
            try:
                holds_left = json.loads(body).get("held") if status == 200 else f"HTTP {status}"
            except ValueError:
                holds_left = body
            # cutover stops cleanly
            proxy.proc.send_signal(signal.SIGTERM)
            try:
                rc_exit = proxy.proc.wait(30)
            except Exception:  # noqa: BLE001
                rc_exit = None
        proxy.wait_stopped()

        # ---- checks ---------------------------------------------------------
        rss_growth = end_rss - base_rss
        fds_growth = end_fds - base_fds
        peak = max((s[1] for s in sampler.samples if isinstance(s[0], float)), default=end_rss)
        if crashed:
            checks.append(("cutover ran to the end", False,
                           f"cutover EXITED during the run with status {rc_exit}: no end figures "
                           f"(the checks that need them fail); see the log lines below"))
        checks.append(("memory: RSS back to baseline", rss_growth < RSS_BOUND,
                       f"baseline {mib(base_rss)} -> end {mib(end_rss)} ({rss_growth / 1048576:+.1f} MiB; "
                       f"bound +{RSS_BOUND // 1048576} MiB); peak under load {mib(peak)}"))
        checks.append(("descriptors back to baseline", fds_growth < FDS_BOUND,
                       f"baseline {base_fds} -> end {end_fds} ({fds_growth:+d}; bound +{FDS_BOUND})"))
        g = lambda x: "/".join(f"{v:g}" for v in x) if x else "?"  # noqa: E731
        checks.append(("sessions and connections drained", end_gauges == (0, 0) and base_gauges == (0, 0),
                       f"cutover_sessions_active/connections_active {g(end_gauges)} at the end "
                       f"(after {end_drain:.1f}s), {g(base_gauges)} at the baseline"))

        found = count_sink_tokens(servers)
        accepted = dict(stats.accepted)
        missing = [t for t in accepted if t not in found]
        dup = {t: v for t, v in found.items() if t in accepted and len(v) != 1}
        unacked = [t for t in found if t not in accepted]
        unacked_dup = {t: v for t, v in found.items() if t not in accepted and len(v) != 1}
        where = collections.Counter(v[0][0] for t, v in found.items() if t in accepted and v)
        checks.append(("accepted messages stored exactly once", not missing and not dup and not unacked_dup,
                       f"{len(accepted)} accepted (250 after DATA): {len(accepted) - len(missing) - len(dup)} "
                       f"stored once ({', '.join(f'{k} {v}' for k, v in sorted(where.items()))}), "
                       f"{len(missing)} missing, {len(dup)} stored more than once; {len(unacked)} stored "
                       f"without a 250 seen by the client (cut after the sink took it), "
                       f"{len(unacked_dup)} of them more than once"))

        c = stats.c
        attempts = {p: c[(p, "login_attempts")] for p in ("imap", "pop3", "smtp")}
        silent = sum(c[(p, "login_silent_close")] for p in attempts)
        hangs = sum(c[(p, "login_hang")] for p in attempts)
        pre = sum(c[(p, f"prelogin_{k}")] for p in attempts for k in ("closed", "hang", "refused"))
        answered = {p: sum(c[(p, k)] for k in ("login_ok", "login_rejected", "login_tempfail",
                                               "login_bye", "login_answered_other")) for p in attempts}
        answered_other = sum(c[(p, "login_answered_other")] for p in attempts)
        checks.append(("every login answered", silent == 0 and hangs == 0 and pre == 0
                       and sum(answered.values()) == sum(attempts.values()),
                       f"{sum(attempts.values())} login commands sent, {sum(answered.values())} answered "
                       f"({sum(c[(p, 'login_ok')] for p in attempts)} ok, "
                       f"{sum(c[(p, 'login_rejected')] for p in attempts)} rejected, "
                       f"{sum(c[(p, 'login_tempfail')] for p in attempts)} temporary failures, "
                       f"{sum(c[(p, 'login_bye')] for p in attempts)} BYE, {answered_other} other); {silent} silent closes, "
                       f"{hangs} hangs; {pre} connections failed before the login command"))
        total_metric = sum(metric_logins.values())
        checks.append(("cutover_logins_total == client logins", total_metric == sum(attempts.values()),
                       f"{total_metric:g} counted vs {sum(attempts.values())} sent ("
                       + ", ".join(f"{p} {metric_logins[p]:g}/{attempts[p]}" for p in attempts)
                       + "); by result: " + ", ".join(f"{k} {v:g}" for k, v in sorted(metric_results.items()))))
        bad_ok = sum(1 for k, _ in stats.problems if k == "wrong password accepted")
        good_failed = sum(c[(p, "login_failed_good_password")] for p in attempts)
        good_rejected = sum(c[(p, "login_rejected_good_password")] for p in attempts)
        checks.append(("routing and credentials", not stats.wrong_host and bad_ok == 0 and good_rejected == 0,
                       f"{sum(stats.hosts.values())} IMAP sessions read their host: fixed users on the "
                       f"wrong host: {stats.wrong_host[:5] or 'none'}; wrong passwords accepted: {bad_ok}; "
                       f"right passwords not logged in: {good_failed}, of which rejected as wrong: "
                       f"{good_rejected} (the rest: temporary failures during backend stops)"))
        unexplained = sum(c[(p, "cut_unexplained")] for p in attempts)
        session_hangs = sum(c[(p, "session_hang")] for p in attempts)
        checks.append(("relayed sessions: no unexplained cut or hang", unexplained == 0 and session_hangs == 0,
                       f"done {sum(c[(p, 'session_done')] for p in attempts)}, ended with a goodbye "
                       f"{sum(c[(p, 'session_goodbye')] for p in attempts)}, cut by the test (kick, move, "
                       f"backend stop) {sum(c[(p, 'cut_explained')] for p in attempts)}"
                       + (" (" + "; ".join(f"{n}x {k}" for k, n in stats.cut_reasons.most_common()) + ")"
                          if stats.cut_reasons else "")
                       + f", cut without "
                       f"reason {unexplained}, hung {session_hangs}"))
        checks.append(("reloads all applied", reloads_err == 0 and reloads_ok >= chaos.reloads["total"],
                       f"{chaos.reloads['total']} config changes ({chaos.reloads['file']} file only, "
                       f"{chaos.reloads['sighup']} file + SIGHUP): cutover_config_reloads_total ok "
                       f"{reloads_ok:g}, error {reloads_err:g}"))
        checks.append(("admin requests", not chaos.admin_errors and holds_left == [],
                       f"{chaos.kicks} kicks ({chaos.kicked_sessions} sessions; "
                       f"cutover_sessions_kicked_total {kicked_metric:g}), {chaos.holds} holds and "
                       f"releases (held logins released {held['released']:g}, timed out "
                       f"{held['timed_out']:g}); holds left at the end: {holds_left or 'none'}; "
                       f"errors: {chaos.admin_errors[:3] or 'none'}"))
        panics, errors, expected, warns, levels = scan_log(proxy.log_path)
        checks.append(("log: no panic, no unexpected ERROR", not panics and not errors,
                       f"{len(panics)} panic lines, {len(errors)} unexpected ERROR lines, "
                       f"{len(expected)} expected (the test causes none: EXPECTED_ERRORS is empty); "
                       f"{levels.get('WARN', 0)} WARN, {levels.get('INFO', 0)} INFO lines"))
        checks.append(("shared state back after each Redis restart",
                       bool(chaos.redis_restarts) and all(r[2] is not None for r in chaos.redis_restarts),
                       f"{len(chaos.redis_restarts)} restarts; cutover_state_backend_up 1 again after "
                       + (", ".join(f"{r[2]:.1f}s" if r[2] is not None else "NEVER" for r in chaos.redis_restarts)
                          or "-")))
        checks.append(("cutover exits 0 on SIGTERM", rc_exit == 0 and not crashed,
                       f"exit status {rc_exit}" + (" (it exited during the run)" if crashed else "")))
        other = [(k, t) for k, t in stats.problems
                 if k in ("client error", "client thread stuck", "fault injection failed",
                          "chaos step failed", "sessions not drained")]
        checks.append(("driver ran cleanly", not other and not sampler.failures,
                       f"{len(other)} driver problems, {len(sampler.failures)} failed scrapes of /metrics"))
        ok_all = all(ok for _, ok, _ in checks)

        # ---- summary ---------------------------------------------------------
        total_s = time.monotonic() - t_start
        lines = []
        lines.append(f"cutover soak test: {'PASS' if ok_all else 'FAIL'}")
        lines.append(f"started {started.isoformat()}  duration {fmt_duration(duration)} "
                     f"(warm-up {fmt_duration(warmup)}, soak {fmt_duration(main_s)})  wall time "
                     f"{fmt_duration(total_s)} (setup {setup_s:.0f}s)")
        lines.append(f"binary {binary} ({proxy_version()}), CUTOVER_LOG={args.log_level}, "
                     f"state.redis yes, rates/s imap {rates['imap']:g} pop3 {rates['pop3']:g} "
                     f"smtp {rates['smtp']:g}, {args.idle} IDLE clients, {BAD_PASSWORD_SHARE:.0%} wrong passwords")
        lines.append("")
        act = []
        for p in ("imap", "pop3", "smtp"):
            act.append((p, c[(p, "sessions")] + (c[(p, "idle_sessions")] if p == "imap" else 0),
                        attempts[p], c[(p, "login_ok")], c[(p, "login_rejected")],
                        c[(p, "login_tempfail")] + c[(p, "login_bye")],
                        c[(p, "login_silent_close")] + c[(p, "login_hang")],
                        f"{metric_logins[p]:g}",
                        c[(p, "session_done")], c[(p, "session_goodbye")],
                        c[(p, "cut_explained")], c[(p, "cut_unexplained")] + c[(p, "session_hang")]))
        lines.append(table(act, ("protocol", "sessions", "logins", "ok", "rejected", "tempfail",
                                 "unanswered", "metric", "done", "goodbye", "cut(test)", "cut(other)")))
        lines.append(f"(imap includes {c[('imap', 'idle_sessions')]} IDLE sessions, "
                     f"{c[('imap', 'idle_rounds')]} IDLE rounds; smtp: {c[('smtp', 'messages_sent')]} "
                     f"messages sent, {c[('smtp', 'messages_accepted')]} accepted)")
        lines.append("")
        ev = [f"reloads {chaos.reloads['total']} (every {RELOAD_EVERY:g}s, carol legacy<->new)",
              f"kicks {chaos.kicks}", f"holds+releases {chaos.holds}",
              "backend stops " + (", ".join(f"{h} at +{t0 - t_main_wall:.0f}s (down after {t2 - t0:.1f}s, "
                                            f"up again after {t1 - t0:.0f}s)"
                                            for h, t0, t2, t1 in chaos.backend_cycles) or "none"),
              "Redis restarts " + (", ".join(
                  f"SIGKILL at +{t0 - t_main_wall:.0f}s ("
                  + (f"cutover_state_backend_up 0 after {noticed:.1f}s" if noticed is not None
                     else "cutover_state_backend_up never 0")
                  + f"), started {t1 - t0:.0f}s later, "
                  + (f"gauge 1 again after {back:.1f}s" if back is not None else "gauge NOT back to 1 within 30s")
                  for t0, t1, back, noticed in chaos.redis_restarts) or "none"),
              f"backend disconnects counted by cutover {disconnects:g}"]
        if chaos.slow_stops:
            ev.append("slow to stop after SIGTERM (SIGKILL at 10 s): " + "; ".join(chaos.slow_stops))
        lines.append("events: " + "; ".join(ev))
        lines.append("")
        lines.append(table(wrap_detail([(n, "PASS" if ok else "FAIL", d) for n, ok, d in checks]),
                           ("check", "result", "detail")))
        lines.append("")
        mem = [s for s in sampler.samples if isinstance(s[0], float)]
        step = max(1, len(mem) // 12)
        shown = mem[::step]
        lines.append("RSS / fds under load (sampled every 5 s; all samples in "
                     f"{csv_path.name}): " + ", ".join(f"+{s[0]:.0f}s {s[1] / 1048576:.1f}M/{s[2]}" for s in shown))
        if warns:
            lines.append("WARN lines by message: " + "; ".join(f"{n}x {m}" for m, n in warns.most_common(8)))
        if crashed:
            lines.append("")
            lines.append("last lines of cutover's log:")
            lines.extend("  " + l[:400] for l in harness.tail(proxy.log_path, 15).splitlines())
        if panics or errors:
            lines.append("")
            lines.append("panic / unexpected ERROR lines (first 10):")
            lines.extend("  " + l[:400] for l in (panics + errors)[:10])
        problems = [(k, t) for k, t in stats.problems if k != "wrong password accepted"] + \
                   [("wrong password accepted", t) for k, t in stats.problems if k == "wrong password accepted"]
        if problems:
            lines.append("")
            lines.append(f"client-side problems ({len(stats.problems)} in all; first 15):")
            lines.extend(f"  [{k}] {t[:500]}" for k, t in problems[:15])
        if stats.cuts:
            lines.append("")
            lines.append(f"relayed sessions cut without a reason the test knows of (first 10 of {len(stats.cuts)}):")
            for t, p, u, ph, d in stats.cuts[:10]:
                when = datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
                lines.append(f"  {when} {p} {u} during {ph}: {d[:400]}")
        if missing or dup:
            lines.append("")
            lines.append(f"messages missing: {missing[:10]}; stored more than once: {list(dup.items())[:5]}")
        if not ok_all or args.keep:
            lines.append("")
            lines.append(f"logs kept in {root} (proxy/proxy.log is cutover's JSON log)")
        summary = "\n".join(lines) + "\n"
        out.write_text(summary)
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(("seconds", "rss_bytes", "open_fds", "sessions_active", "connections_active"))
            w.writerows(sampler.samples)
        print("\n" + summary, flush=True)
        print(f"[soak] summary written to {out}, samples to {csv_path}", flush=True)
    except BaseException as e:
        print(f"[soak] aborted: {e!r}; logs kept in {root}", file=sys.stderr, flush=True)
        if proxy.running:
            print(harness.tail(proxy.log_path, 30), file=sys.stderr)
        ok_all = False
        args.keep = True
        if not isinstance(e, Exception):
            raise
        import traceback
        traceback.print_exc()
    finally:
        if sampler:
            sampler.stop_ev.set()
        try:
            proxy.stop()
        except Exception as e:  # noqa: BLE001
            print(f"[soak] stopping cutover: {e}", file=sys.stderr)
        servers.stop()
        if ok_all and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if ok_all else 1


def proxy_version():
    cp = clients.cutover_cli("--version")
    return cp.out.strip() or "?"


if __name__ == "__main__":
    sys.exit(main())
