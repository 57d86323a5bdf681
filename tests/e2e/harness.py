"""Real servers for the cutover end-to-end tests: Dovecot instances, SMTP sinks
and the cutover proxy itself, each a child process that can be stopped and
started again from a test.

Layout of the session's temporary directory (``Env.root``)::

    certs/                       fresh CA + proxy/backend certs (certs/make-demo-certs.sh)
    <host>/passwd                passwd-file shared by that host's Dovecot instances
    <host>/mail/<user>/Maildir   the host's mailboxes (shared by its instances)
    <host>-<svc>/                one Dovecot instance: dovecot.conf, run/, state/, dovecot.log
    <host>-sink/                 one SMTP sink: msgs/ (one .eml per message), sink.log
    proxy/                       routes.yaml and proxy.log
    <name>/ (Redis)              redis.log of a redis-server (e.g. fleet-redis/, obs-redis/)
    <name>/ (Prometheus)         prometheus.yml, data/, prometheus.log of a Prometheus
    <name>/ (PostgreSQL)         data/ (initdb; removed by remove()) and postgres.log
                                 of a PostgreSQL server (e.g. lookups-postgres/)

Only loopback addresses are ever used.
"""

import contextlib
import email
import glob
import email.policy
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MAKE_CERTS = REPO / "certs" / "make-demo-certs.sh"
SINK_SCRIPT = HERE / "smtp_sink.py"

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
PROMETHEUS = "/usr/bin/prometheus"
PSQL = shutil.which("psql") or "/usr/bin/psql"
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"

# --------------------------------------------------------------------------
# users and hosts
# --------------------------------------------------------------------------

#: Same password on every host (the proxy logs into the backend with the
#: client's credentials, and legacy failover green<->mauve needs both to agree).
USERS = {
    "joeuser": "joe-secret-1",
    "alice": "alice-secret-2",
    "bob": "bob-secret-3",
    "carol": "carol-secret-4",
    # quote, backslash, space, an IMAP literal lookalike and 8-bit UTF-8
    "weird": 'p"a\\ss {5}wörd',
}

#: Which pool each user is routed to by the proxy config below.
NEW_USERS = ("joeuser", "alice", "weird")
LEGACY_USERS = ("bob", "carol")

NEW_IP = "127.0.0.10"
GREEN_IP = "127.0.0.11"
MAUVE_IP = "127.0.0.12"
PROXY_IP = "127.0.0.1"

NEW_SINK_PORT = 2500  # new's submission relays here
LEGACY_SMTP_PORT = 2525  # pop-before-smtp hosts, no AUTH

PROXY_PORTS = {
    "imap": 11143,
    "imaps": 11993,
    "pop3": 11110,
    "pop3s": 11995,
    "submission": 11587,
    "submissions": 11465,
}
METRICS_PORT = 19898
ADMIN_PORT = 19899  # admin endpoint, only in configs that add `admin:` (not the default)

START_TIMEOUT = 20.0  # seconds for a server to open its ports
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
PROM_BOUND = 45.0  # seconds for Prometheus to be ready / to have scraped something
HTTP_TIMEOUT = 10.0  # seconds for one HTTP request to a helper server (Prometheus)


def seed_subject(host):
    """Subject of the one message seeded into every mailbox on ``host``."""
    return f"hello from {host}"


# --------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------


def port_open(host, port, timeout=0.2):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(predicate, timeout, interval=0.05, what="condition"):
    """Bounded poll: call ``predicate`` until truthy; return its value or raise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def tail(path, lines=60):
    """Last ``lines`` lines of a log file, without terminal colour codes."""
    try:
        data = Path(path).read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(_ANSI.sub("", l) for l in data[-lines:])


def group_alive(pgid):
    """True if a live (non-zombie) process is in process group ``pgid``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces/parens
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def http_request(url, method=None, data=None, timeout=HTTP_TIMEOUT):
    """One HTTP request (GET, or POST with ``data``, or ``method``): (status, body text),
    also for 4xx/5xx answers, which raise nothing here."""
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def mail_ids():
    """uid/gid for mail_uid/mail_gid: Debian's system user 'mail' (8:8)."""
    pw = pwd.getpwnam("mail")
    return pw.pw_uid, pw.pw_gid


def make_certs(outdir):
    subprocess.run(["bash", str(MAKE_CERTS), str(outdir)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    return outdir


def client_ssl_context(cafile):
    """A verifying client context that trusts only the test CA."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# --------------------------------------------------------------------------
# child processes
# --------------------------------------------------------------------------


class ManagedProcess:
    """A child process that listens on some TCP ports.

    ``start()`` spawns it and waits (bounded) until every port accepts a
    connection; ``stop()`` sends SIGTERM, waits (bounded), then SIGKILLs the
    process group it leads, and waits until the ports are closed. Both are
    idempotent. ``stopped()`` is a context manager that stops the process and
    always starts it again on exit.
    """

    def __init__(self, name, argv, ports, log_path, env=None, cwd=None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.ports = list(ports)  # [(host, port)]
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.proc = None

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} pid={self.pid} running={self.running}>"

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def _prepare(self):
        """Hook run before each spawn."""

    def start(self, timeout=START_TIMEOUT):
        if self.running:
            return self
        self._prepare()
        busy = [p for p in self.ports if port_open(*p)]
        if busy:
            raise RuntimeError(
                f"{self.name}: port(s) {busy} already in use before start "
                "(a system service or a leftover process? scripts/test.sh stops the system dovecot)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.name}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd, start_new_session=True)
        deadline = time.monotonic() + timeout
        pending = list(self.ports)
        while pending:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # any children it left
                self.proc = None
                raise RuntimeError(
                    f"{self.name} exited with status {rc} before listening on {pending}\n"
                    f"{self.diagnostics()}")
            pending = [p for p in pending if not port_open(*p)]
            if pending and time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.name} did not listen on {pending} within {timeout}s\n{self.diagnostics()}")
            if pending:
                time.sleep(0.05)
        return self

    def stop(self, timeout=STOP_TIMEOUT):
        self.send_term()
        return self.wait_stopped(timeout)

    def send_term(self):
        """First half of stop(): SIGTERM (lets Servers.stop() stop all in parallel)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout=STOP_TIMEOUT):
        """Second half of stop(): bounded wait, then SIGKILL the process group."""
        proc = self.proc
        if proc is None:
            return self
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # we made it a session (and group) leader: kill it and its children
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
        # children of the master may outlive it briefly; make sure they are gone
        deadline = time.monotonic() + timeout
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if group_alive(proc.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.proc = None
        wait_until(lambda: not any(port_open(*p) for p in self.ports), timeout,
                   what=f"{self.name} to close {self.ports}")
        return self

    def restart(self):
        self.stop()
        return self.start()

    @contextlib.contextmanager
    def stopped(self):
        """``with server.stopped(): ...`` — down inside the block, up again after."""
        self.stop()
        try:
            yield self
        finally:
            self.start()

    def diagnostics(self, lines=40):
        return f"--- {self.log_path} (last {lines} lines) ---\n{tail(self.log_path, lines)}"


class Dovecot(ManagedProcess):
    """One Dovecot instance (own base_dir, state_dir, log) for some protocols.

    ``services`` is a subset of {"imap", "pop3", "submission"}; ``tls`` makes
    it a "new"-style server (STARTTLS required on 143/110/587, implicit TLS on
    993/995), otherwise a plaintext legacy server (143/110 only, no TLS).
    """

    def __init__(self, env, host, ip, services, tls, relay=None):
        self.host = host
        self.ip = ip
        self.services = tuple(services)
        self.tls = tls
        self.relay = relay  # (ip, port) for submission
        self.dir = env.root / f"{host}-{'-'.join(self.services)}"
        self.host_dir = env.root / host
        self.certs = env.certs
        self.conf_path = self.dir / "dovecot.conf"
        ports = []
        if "imap" in services:
            ports.append((ip, 143))
            if tls:
                ports.append((ip, 993))
        if "pop3" in services:
            ports.append((ip, 110))
            if tls:
                ports.append((ip, 995))
        if "submission" in services:
            ports.append((ip, 587))
        super().__init__(f"dovecot-{host}-{'+'.join(self.services)}",
                         [DOVECOT, "-F", "-c", self.conf_path], ports, self.dir / "stderr.log")
        self.dovecot_log = self.dir / "dovecot.log"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.config_text())

    def _prepare(self):
        # a SIGKILLed master leaves its pid file behind; dovecot refuses to start
        # only if that pid is alive, but be tidy anyway
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "run" / "master.pid").unlink()

    def config_text(self):
        uid, gid = mail_ids()
        d = self.dir
        ssl_block = (
            f"ssl = required\n"
            f"ssl_cert = <{self.certs / 'backend.pem'}\n"
            f"ssl_key = <{self.certs / 'backend-key.pem'}\n"
            f"ssl_dh = </usr/share/dovecot/dh.pem\n"
            f"disable_plaintext_auth = yes\n"
            if self.tls else
            "ssl = no\n"
            "disable_plaintext_auth = no\n"
        )
        imap_tls_port = 993 if self.tls else 0
        pop3_tls_port = 995 if self.tls else 0
        relay = ""
        if "submission" in self.services:
            rip, rport = self.relay
            relay = (
                f"submission_relay_host = {rip}\n"
                f"submission_relay_port = {rport}\n"
                "submission_relay_trusted = no\n"
                "submission_relay_ssl = no\n"
                "submission_relay_connect_timeout = 5s\n"
            )
        return f"""\
# generated by tests/e2e/harness.py — {self.name}
instance_name = cutover-e2e-{self.host}-{'-'.join(self.services)}
base_dir = {d}/run
state_dir = {d}/state
listen = {self.ip}
protocols = {' '.join(self.services)}
hostname = {self.host}.test
login_greeting = Dovecot {self.host} ready.
log_path = {self.dovecot_log}
auth_verbose = yes
verbose_proctitle = yes
shutdown_clients = yes

# tests: no artificial delays, no penalties, proxy may pass x-originating-ip
auth_failure_delay = 0
login_trusted_networks = 127.0.0.0/8
mail_max_userip_connections = 1000
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}

default_login_user = dovenull
default_internal_user = dovecot
first_valid_uid = 1
first_valid_gid = 1
mail_uid = {uid}
mail_gid = {gid}
mail_location = maildir:{self.host_dir}/mail/%u/Maildir

auth_mechanisms = plain login
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.host_dir}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={self.host_dir}/mail/%u
}}

{ssl_block}
service imap-login {{
  inet_listener imap {{
    port = 143
  }}
  inet_listener imaps {{
    port = {imap_tls_port}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 110
  }}
  inet_listener pop3s {{
    port = {pop3_tls_port}
    ssl = yes
  }}
}}
service submission-login {{
  inet_listener submission {{
    port = 587
  }}
}}
{relay}"""

    def log_text(self):
        try:
            return self.dovecot_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    _LOGIN = re.compile(r"-login: Info: Login: user=<(?P<user>[^>]*)>, (?P<fields>.*)$")

    def logins(self, user=None):
        """Successful logins from this instance's log, oldest first: dicts with
        user, method, rip, lip, tls (bool), line."""
        out = []
        for line in self.log_text().splitlines():
            m = self._LOGIN.search(line)
            if not m or (user is not None and m["user"] != user):
                continue
            parts = [p.strip() for p in m["fields"].split(",")]
            kv = dict(p.split("=", 1) for p in parts if "=" in p)
            out.append({"user": m["user"], "method": kv.get("method"), "rip": kv.get("rip"),
                        "lip": kv.get("lip"), "tls": "TLS" in parts, "line": line})
        return out

    def wait_login(self, user, after, timeout=5.0):
        """Bounded poll for the first login of ``user`` beyond the first ``after`` ones."""
        found = wait_until(lambda: self.logins(user)[after:], timeout,
                           what=f"a new login of {user} in {self.dovecot_log}")
        return found[0]

    def diagnostics(self, lines=40):
        return (super().diagnostics(lines) + "\n"
                f"--- {self.dovecot_log} (last {lines} lines) ---\n{tail(self.dovecot_log, lines)}")


class SinkMessage:
    def __init__(self, path):
        self.path = Path(path)
        self.raw = self.path.read_bytes()
        self.msg = email.message_from_bytes(self.raw, policy=email.policy.default)
        self.sink = self.msg.get("X-Sink-Name")
        self.mail_from = self.msg.get("X-Sink-Mail-From")
        self.rcpt_tos = self.msg.get_all("X-Sink-Rcpt-To") or []
        self.subject = str(self.msg.get("Subject", ""))

    def __repr__(self):
        return f"<SinkMessage {self.sink} from={self.mail_from} to={self.rcpt_tos} subject={self.subject!r}>"


class SmtpSink(ManagedProcess):
    """aiosmtpd in its own process, storing each message as a file in ``msg_dir``."""

    def __init__(self, env, host, ip, port):
        self.host = host
        self.ip = ip
        self.port = port
        self.dir = env.root / f"{host}-sink"
        self.msg_dir = self.dir / "msgs"
        self.msg_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(f"sink-{host}-{port}",
                         [sys.executable, SINK_SCRIPT, "--host", ip, "--port", port,
                          "--dir", self.msg_dir, "--name", host],
                         [(ip, port)], self.dir / "sink.log")

    def messages(self):
        return [SinkMessage(p) for p in sorted(self.msg_dir.glob("*.eml"))]

    def find(self, token):
        """Messages whose raw bytes contain ``token``."""
        tok = token.encode() if isinstance(token, str) else token
        return [m for m in self.messages() if tok in m.raw]

    def wait_for(self, token, timeout=10.0):
        """Bounded poll for a message containing ``token``; returns it."""
        found = wait_until(lambda: self.find(token), timeout,
                           what=f"a message containing {token!r} in sink {self.host}")
        return found[0]

    def clear(self):
        for p in self.msg_dir.glob("*.eml"):
            p.unlink()


class Host:
    """One backend host. Attributes (each a ManagedProcess with start/stop/stopped):

    * ``imap``  — Dovecot serving IMAP (new: 143 STARTTLS + 993; legacy: plain 143)
    * ``pop3``  — Dovecot serving POP3 (new: 110 STLS + 995; legacy: plain 110)
    * ``smtp``  — what the pool's smtp servers point at: new's Dovecot submission
                  on 587, or the legacy host's AUTH-less aiosmtpd on 2525
    * ``sink``  — where accepted mail ends up (new: aiosmtpd on 2500 that 587
                  relays to; legacy: the same object as ``smtp``)
    """

    def __init__(self, env, name, ip, tls):
        self.name = name
        self.ip = ip
        self.tls = tls
        self.dir = env.root / name
        self._make_mailboxes()
        self.imap = Dovecot(env, name, ip, ["imap"], tls)
        self.pop3 = Dovecot(env, name, ip, ["pop3"], tls)
        if tls:
            self.sink = SmtpSink(env, name, ip, NEW_SINK_PORT)
            self.smtp = Dovecot(env, name, ip, ["submission"], tls, relay=(ip, NEW_SINK_PORT))
            self.submission = self.smtp
        else:
            self.sink = SmtpSink(env, name, ip, LEGACY_SMTP_PORT)
            self.smtp = self.sink

    @property
    def subject(self):
        return seed_subject(self.name)

    def processes(self):
        # sink before submission (it relays to the sink)
        seen = []
        for p in (self.sink, self.smtp, self.imap, self.pop3):
            if p not in seen:
                seen.append(p)
        return seen

    def start(self):
        for p in self.processes():
            p.start()

    def stop(self):
        for p in reversed(self.processes()):
            p.stop()

    def add_user(self, user, password):
        """Provision ``user`` on this host only (passwd-file line + a seeded Maildir).
        Dovecot re-reads the passwd-file when it changes; no restart needed."""
        self.users[user] = password
        self._write_passwd()
        if not (self.dir / "mail" / user / "Maildir").exists():
            self._seed_mailbox(user)

    def remove_user(self, user):
        """Undo ``add_user`` (the Maildir stays; without a passwd line nobody logs in)."""
        if self.users.pop(user, None) is not None:
            self._write_passwd()

    def _write_passwd(self):
        passwd = self.dir / "passwd"
        tmp = self.dir / "passwd.tmp"
        tmp.write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in self.users.items()),
                       encoding="utf-8")
        tmp.chmod(0o644)
        os.replace(tmp, passwd)

    def _make_mailboxes(self):
        self.users = dict(USERS)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_passwd()
        for user in USERS:
            self._seed_mailbox(user)

    def _seed_mailbox(self, user):
        """A Maildir for ``user`` holding the one seeded message of this host."""
        uid, gid = mail_ids()
        md = self.dir / "mail" / user / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (md / sub).mkdir(parents=True, exist_ok=True)
        body = (
            f"From: Seeder <seed@{self.name}.test>\r\n"
            f"To: {user}@example.net\r\n"
            f"Subject: {seed_subject(self.name)}\r\n"
            f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
            f"Message-ID: <seed-{self.name}-{user}@cutover.test>\r\n"
            f"X-Backend-Host: {self.name}\r\n"
            f"\r\n"
            f"This message lives on the {self.name} backend ({self.ip}).\r\n"
            f"backend={self.name}\r\n"
        ).encode()
        (md / "cur" / f"1704067200.M1P1.{self.name}:2,").write_bytes(body)
        os.chown(self.dir / "mail", uid, gid)
        for dirpath, dirnames, filenames in os.walk(self.dir / "mail" / user):
            os.chown(dirpath, uid, gid)
            for f in filenames:
                os.chown(os.path.join(dirpath, f), uid, gid)


class Servers:
    """All backends: ``servers.new``, ``servers.green``, ``servers.mauve`` (Hosts)."""

    def __init__(self, env):
        self.env = env
        self.new = Host(env, "new", NEW_IP, tls=True)
        self.green = Host(env, "green", GREEN_IP, tls=False)
        self.mauve = Host(env, "mauve", MAUVE_IP, tls=False)
        self.hosts = [self.new, self.green, self.mauve]

    def all_processes(self):
        return [p for h in self.hosts for p in h.processes()]

    def start(self):
        for h in self.hosts:
            h.start()

    def stop(self):
        procs = list(reversed(self.all_processes()))
        for p in procs:
            p.send_term()
        errors = []
        for p in procs:
            try:
                p.wait_stopped()
            except Exception as e:  # keep stopping the others
                errors.append(f"{p.name}: {e}")
        if errors:
            raise RuntimeError("; ".join(errors))

    def ensure_running(self):
        """Start whatever a test left stopped (restores state between tests)."""
        restarted = []
        for p in self.all_processes():
            if not p.running:
                p.start()
                restarted.append(p.name)
        return restarted

    def sink_for(self, token):
        """Names of the hosts whose sink holds a message containing ``token``."""
        return [h.name for h in self.hosts if h.sink.find(token)]


# --------------------------------------------------------------------------
# shared state, databases and monitoring: Redis, PostgreSQL, Prometheus
# --------------------------------------------------------------------------


class Redis(ManagedProcess):
    """``redis-server`` on ``ip:port`` without persistence (an empty store at every
    start), its log in env.root/<dirname>/redis.log. ``kill()`` is a SIGKILL;
    ``start()`` again uses the same port. Give every user its own address (and
    dirname): test_fleet.py's is 127.0.0.1:16379, test_observability.py's 127.0.0.40."""

    def __init__(self, env, ip, port, dirname="redis"):
        self.ip = ip
        self.port = port
        self.dir = env.root / dirname
        self.dir.mkdir(parents=True, exist_ok=True)
        super().__init__(
            dirname, [REDIS_SERVER, "--bind", ip, "--port", port, "--save", "",
                      "--appendonly", "no", "--daemonize", "no", "--dir", self.dir,
                      "--logfile", ""],
            [(ip, port)], self.dir / "redis.log", cwd=str(self.dir))

    @property
    def url(self):
        return f"redis://{self.ip}:{self.port}/0"

    def kill(self):
        """SIGKILL: no shutdown, no goodbye to the clients; the port closes at once."""
        proc = self.proc
        assert proc is not None and proc.poll() is None, f"{self.name} is not running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(STOP_TIMEOUT)
        self.proc = None
        wait_until(lambda: not port_open(self.ip, self.port), STOP_TIMEOUT,
                   what=f"the killed {self.name} to close its port")
        with open(self.log_path, "ab") as log:
            log.write(b"--- SIGKILLed by the test\n")

    def cli(self, *args):
        """``redis-cli -h IP -p PORT ARGS...``: its output (stripped); raises on failure."""
        cp = subprocess.run([REDIS_CLI, "-h", self.ip, "-p", str(self.port), *map(str, args)],
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        if cp.returncode != 0:
            raise RuntimeError(f"redis-cli {args}: rc={cp.returncode} {cp.stderr!r}")
        return cp.stdout.decode("utf-8", "replace").strip()


def _ppid(pid):
    """The parent pid of ``pid`` from /proc (None if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def postgres_bindir():
    """The newest of Debian's /usr/lib/postgresql/<major>/bin (initdb, postgres, pg_ctl),
    or None when no PostgreSQL server package is installed (scripts/test.sh installs
    ``postgresql``)."""
    found = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        major = Path(d).parent.name
        if major.isdigit() and os.access(os.path.join(d, "postgres"), os.X_OK):
            found.append((int(major), Path(d)))
    return max(found)[1] if found else None


class Postgres(ManagedProcess):
    """A PostgreSQL server of its own on ``ip:port``: ``initdb`` into ``root``/data at
    the first start (trust authentication, superuser ``user``, no fsync), then
    ``postgres -D root/data -k root -h ip -p port -c fsync=off`` in the foreground,
    its log in root/postgres.log, and the database ``database`` created once.
    ``start()`` returns when a query succeeds (an open port is not enough: a server
    still recovering refuses connections).

    PostgreSQL refuses to run as root: when the tests run as root, ``root`` is chowned
    to the ``postgres`` system user (made by Debian's package) and initdb and postgres
    run through ``runuser -u postgres --`` (directly otherwise). runuser stays as the
    parent and turns any signal into a "smart" shutdown (which waits for every client
    to leave), so ``stop()`` signals the postmaster itself (its pid from
    postmaster.pid): an immediate shutdown (SIGQUIT: clients cut at once, no
    checkpoint; ``start()`` again recovers the data from the WAL, with the tables as
    they were), or ``stop(mode="fast")`` (SIGINT). ``remove()`` deletes ``root``
    (stopped first). ``freeze()``/``thaw()``: SIGSTOP/SIGCONT of every server process
    (a database that hangs). ``psql(sql)`` runs SQL (several statements, dollar-quoted
    function bodies) as ``user`` over TCP with ON_ERROR_STOP and returns psql's
    unaligned, tuples-only output. ``url`` is postgres://user@ip:port/database.

    Takes a directory rather than an :class:`Env`, so that a benchmark can run one too.
    Give every user its own address: test_lookups.py's is 127.0.0.50:15432."""

    SHUTDOWN = {"immediate": signal.SIGQUIT, "fast": signal.SIGINT, "smart": signal.SIGTERM}

    def __init__(self, root, ip, port, *, user="cutover", database="mail", name="postgres",
                 settings=()):
        bindir = postgres_bindir()
        if bindir is None:
            raise FileNotFoundError(
                "no PostgreSQL server in /usr/lib/postgresql/*/bin (apt-get install "
                "postgresql; scripts/test.sh does)")
        self.bindir = bindir
        self.root = Path(root)
        self.data = self.root / "data"
        self.ip = ip
        self.port = port
        self.user = user
        self.database = database
        self.as_postgres = os.geteuid() == 0
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [bindir / "postgres", "-D", self.data, "-k", self.root, "-h", ip, "-p", port,
                "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=100"]
        for s in settings:  # extra "name=value" settings
            argv += ["-c", s]
        super().__init__(name, self._as_owner(argv), [(ip, port)], self.root / "postgres.log",
                         cwd=str(self.root))
        self.stop_mode = "immediate"

    def _as_owner(self, argv):
        argv = [str(a) for a in argv]
        return [RUNUSER, "-u", "postgres", "--", *argv] if self.as_postgres else argv

    @property
    def url(self):
        return f"postgres://{self.user}@{self.ip}:{self.port}/{self.database}"

    def _prepare(self):
        if self.as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self.root.chmod(0o755)  # the log (written by us) and socket stay reachable
        if not (self.data / "PG_VERSION").exists():
            cp = subprocess.run(
                self._as_owner([self.bindir / "initdb", "-D", self.data, "--auth=trust",
                                "-U", self.user, "--no-locale", "-E", "UTF8", "--no-sync",
                                "--no-instructions"]),
                stdin=subprocess.DEVNULL, capture_output=True, timeout=120, cwd=str(self.root))
            with open(self.log_path, "ab") as log:
                log.write(b"--- initdb\n" + cp.stdout + cp.stderr)
            if cp.returncode != 0:
                raise RuntimeError(f"initdb failed (rc={cp.returncode}): {cp.stderr.decode()[-2000:]}")

    def start(self, timeout=START_TIMEOUT):
        if self.running:
            return self
        super().start(timeout)

        def accepts():
            return self._run_psql("SELECT 1", database="postgres", check=False).returncode == 0
        try:
            wait_until(accepts, timeout, interval=0.1, what=f"{self.name} to accept queries")
        except TimeoutError:
            self.stop()
            raise
        if not self._database_exists():
            self._run_psql(f'CREATE DATABASE "{self.database}"', database="postgres")
        return self

    def _database_exists(self):
        out = self._run_psql(f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'",
                             database="postgres").stdout
        return out.strip() == b"1"

    def postmaster_pid(self):
        """The pid of the postmaster we started (from data/postmaster.pid), or None: no
        pid file, or one left behind (not our child, or ``proc`` itself when run
        directly), so that nothing else is ever signalled."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            first = (self.data / "postmaster.pid").read_text().split("\n", 1)[0].strip()
        except OSError:
            return None
        if not first.isdigit():
            return None
        pid = int(first)
        if pid == self.proc.pid or _ppid(pid) == self.proc.pid:
            return pid
        return None

    def send_term(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        pid = self.postmaster_pid()
        sig = self.SHUTDOWN[self.stop_mode]
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        else:  # not up far enough to write its pid file: the parent (runuser or postgres)
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def stop(self, timeout=STOP_TIMEOUT, mode="immediate"):
        """Shut the server down: ``immediate`` (default) or ``fast``, then the usual
        bounded wait (SIGKILL of the process group past ``timeout``)."""
        self.stop_mode = mode
        self.thaw()  # a frozen server would not act on the signal
        try:
            return super().stop(timeout)
        finally:
            self.stop_mode = "immediate"

    def server_pids(self):
        """The postmaster and its children (backends, checkpointer...). They are not in
        the process group of the process we started: each child calls setsid()."""
        pm = self.postmaster_pid()
        if pm is None:
            return []
        return [pm] + [int(e) for e in os.listdir("/proc") if e.isdigit() and _ppid(int(e)) == pm]

    def freeze(self):
        """SIGSTOP the postmaster and every child: a database that hangs (connections
        are still accepted by the kernel, nothing answers). ``thaw()`` undoes it."""
        for pid in self.server_pids():  # the postmaster first: it forks no more
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def thaw(self):
        """SIGCONT what freeze() stopped (and runuser, which stops itself when its child
        stops)."""
        for pid in self.server_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)

    def remove(self):
        """Stop the server and delete its directory (data and log)."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _run_psql(self, sql, database=None, check=True):
        env = dict(os.environ, PGCONNECT_TIMEOUT="5", PGAPPNAME="cutover-e2e")
        cp = subprocess.run(
            [PSQL, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", self.ip,
             "-p", str(self.port), "-U", self.user, "-d", database or self.database, "-f", "-"],
            input=sql.encode("utf-8"), capture_output=True, timeout=30, env=env)
        if check and cp.returncode != 0:
            raise RuntimeError(f"psql: rc={cp.returncode} {cp.stderr.decode('utf-8', 'replace')}"
                               f"\n--- SQL ---\n{sql}")
        return cp

    def psql(self, sql):
        """Run ``sql`` in ``database``; psql's unaligned tuples-only output, stripped
        (columns separated by ``|``, one row a line). Raises on any SQL error."""
        return self._run_psql(sql).stdout.decode("utf-8", "replace").strip()


class Prometheus(ManagedProcess):
    """/usr/bin/prometheus on ``ip:port`` scraping ``targets`` ("ip:port" list) as job
    ``job`` every second and evaluating ``rule_files`` every second; a fresh TSDB and
    prometheus.yml / prometheus.log under ``root``.

    ``query(expr)`` is the whole /api/v1/query answer (also an error answer);
    ``series(expr)`` its result list (an error answer fails); ``value(expr)`` the value
    of a one-series (or scalar) answer, else None."""

    def __init__(self, root, targets, *, job, ip, port, rule_files=()):
        self.dir = Path(root)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ip = ip
        self.port = port
        self.job = job
        self.config_path = self.dir / "prometheus.yml"
        rules = "".join(f"  - {json.dumps(str(r))}\n" for r in rule_files)
        self.config_path.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            + (f"rule_files:\n{rules}" if rules else "")
            + "scrape_configs:\n"
            f"  - job_name: {json.dumps(job)}\n"
            "    static_configs:\n"
            f"      - targets: {json.dumps(list(targets))}\n",
            encoding="utf-8")
        super().__init__(
            "prometheus",
            [PROMETHEUS, f"--config.file={self.config_path}",
             f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address={ip}:{port}", "--log.level=info"],
            [(ip, port)], self.dir / "prometheus.log", cwd=str(self.dir))

    @property
    def url(self):
        return f"http://{self.ip}:{self.port}"

    def api(self, path, **params):
        """GET/POST an /api/v1 endpoint; returns the decoded JSON body, also for
        Prometheus' 4xx answers (bad_data etc.), which carry {"status": "error"}."""
        data = urllib.parse.urlencode(params).encode() if params else None
        status, body = http_request(f"{self.url}{path}", data=data)
        try:
            return json.loads(body)
        except ValueError:
            return {"status": "error", "error": f"HTTP {status}: {body[:300]!r}"}

    def query(self, expr):
        """/api/v1/query at now: the full answer ({"status", "data"|"error"})."""
        return self.api("/api/v1/query", query=expr)

    def series(self, expr):
        """The result list of an instant query at now; an error answer fails."""
        ans = self.query(expr)
        assert ans.get("status") == "success", f"{expr}: {ans}"
        return ans["data"]["result"]

    def wait_ready(self, timeout=PROM_BOUND):
        def ready():
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_until(ready, timeout, interval=0.2, what="Prometheus /-/ready")

    def value(self, expr):
        """The single value of a one-series query, or None."""
        ans = self.query(expr)
        if ans.get("status") != "success":
            return None
        res = ans["data"]["result"]
        if ans["data"]["resultType"] == "scalar":
            return float(res[1])
        return float(res[0]["value"][1]) if len(res) == 1 else None


# --------------------------------------------------------------------------
# the proxy
# --------------------------------------------------------------------------


def proxy_config(env):
    """The routes.yaml for the proxy as a Python structure (extend here)."""
    ca = str(env.certs / "ca.pem")
    return {
        "tls": {
            "certificates": [
                {"cert": str(env.certs / "proxy.pem"), "key": str(env.certs / "proxy-key.pem")},
            ],
        },
        "listeners": [
            {"name": "imap", "protocol": "imap", "listen": f"{PROXY_IP}:{PROXY_PORTS['imap']}", "tls": "starttls"},
            {"name": "imaps", "protocol": "imap", "listen": f"{PROXY_IP}:{PROXY_PORTS['imaps']}", "tls": "implicit"},
            {"name": "pop3", "protocol": "pop3", "listen": f"{PROXY_IP}:{PROXY_PORTS['pop3']}", "tls": "starttls"},
            {"name": "pop3s", "protocol": "pop3", "listen": f"{PROXY_IP}:{PROXY_PORTS['pop3s']}", "tls": "implicit"},
            {"name": "submission", "protocol": "smtp", "listen": f"{PROXY_IP}:{PROXY_PORTS['submission']}", "tls": "starttls"},
            {"name": "submissions", "protocol": "smtp", "listen": f"{PROXY_IP}:{PROXY_PORTS['submissions']}", "tls": "implicit"},
        ],
        "pools": {
            "new": {
                "imap": {"servers": [f"{NEW_IP}:143"], "tls": "starttls", "ca": ca},
                "pop3": {"servers": [f"{NEW_IP}:110"], "tls": "starttls", "ca": ca},
                "smtp": {"servers": [f"{NEW_IP}:587"], "tls": "starttls", "ca": ca},
            },
            "legacy": {
                "balance": "first",
                "connect_timeout": "1s",
                "imap": {"servers": [f"{GREEN_IP}:143", f"{MAUVE_IP}:143"]},
                "pop3": {"servers": [f"{GREEN_IP}:110", f"{MAUVE_IP}:110"]},
                "smtp": {"servers": [f"{GREEN_IP}:{LEGACY_SMTP_PORT}", f"{MAUVE_IP}:{LEGACY_SMTP_PORT}"],
                         "auth": "pop-before-smtp"},
            },
        },
        "routes": [
            {"users": list(NEW_USERS), "pool": "new"},
            {"pool": "legacy"},
        ],
        "metrics": {"listen": f"{PROXY_IP}:{METRICS_PORT}"},
        # Every test connects from 127.0.0.1 and many log in with wrong passwords on
        # purpose: keep the spraying protection out of their way (its own tests set it).
        "auth_throttle": {"ip_failures": 100000, "user_failures": 100000, "delay": "1ms", "max_delay": "1ms"},
        "limits": {"max_connections_per_ip": 100000},
    }


def _yaml_scalar(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    # JSON string syntax is valid YAML double-quoted scalar syntax
    return json.dumps(str(v), ensure_ascii=False)


def to_yaml(value, indent=0):
    """Minimal block-style YAML emitter for dicts/lists/scalars (no PyYAML needed)."""
    pad = "  " * indent
    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                out.append(f"{pad}{k}:")
                out.append(to_yaml(v, indent + 1))
            else:
                out.append(f"{pad}{k}: {_yaml_scalar(v) if not isinstance(v, (dict, list)) else ('{}' if isinstance(v, dict) else '[]')}")
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, (dict, list)) and v:
                inner = to_yaml(v, indent + 1).splitlines()
                first = inner[0].lstrip()
                out.append(f"{pad}- {first}")
                out.extend(inner[1:])
            else:
                out.append(f"{pad}- {_yaml_scalar(v)}")
    else:
        out.append(pad + _yaml_scalar(value))
    return "\n".join(out)


def resolve_cutover_bin():
    b = Path(os.environ.get("CUTOVER_BIN", "target/debug/cutover"))
    if not b.is_absolute():
        b = REPO / b
    return b


class Proxy(ManagedProcess):
    """``$CUTOVER_BIN run --config <tmp>/proxy/routes.yaml``; output in proxy.log."""

    def __init__(self, env, binary, config=None):
        self.env = env
        self.binary = Path(binary)
        self.dir = env.root / "proxy"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "routes.yaml"
        self.default_config = proxy_config(env)
        self.config = config if config is not None else self.default_config
        #: set by write_config(): the file differs from self.config (restore after the test)
        self.dirty = False
        penv = dict(os.environ)
        penv.setdefault("RUST_LOG", "debug")
        # cutover reads its log filter from CUTOVER_LOG (default "info"), not RUST_LOG
        penv.setdefault("CUTOVER_LOG", "debug")
        penv.setdefault("NO_COLOR", "1")
        penv.setdefault("RUST_BACKTRACE", "1")
        ports = [(PROXY_IP, p) for p in PROXY_PORTS.values()]
        #: ``--log-format`` of the current run ("text" or "json"); see reconfigure()
        self.log_format = "text"
        super().__init__("cutover", self._argv(), ports, self.dir / "proxy.log",
                         env=penv, cwd=str(self.dir))

    def _argv(self):
        argv = [self.binary]
        if self.log_format != "text":
            argv += ["--log-format", self.log_format]
        return [str(a) for a in argv + ["run", "--config", self.config_path]]

    def _prepare(self):
        if not self.binary.exists():
            raise FileNotFoundError(
                f"cutover binary not found at {self.binary} (set CUTOVER_BIN or run "
                "`cargo build --bins`; scripts/test.sh does both)")
        self.config_path.write_text(to_yaml(self.config) + "\n", encoding="utf-8")
        # start() also waits for the metrics and admin endpoints the config names: they
        # are bound just after the listeners, so a test scraping /metrics right after a
        # (re)start would otherwise race them
        self.ports = [(PROXY_IP, p) for p in PROXY_PORTS.values()] + self._endpoint_ports()

    def _endpoint_ports(self):
        out = []
        for key in ("metrics", "admin"):
            section = self.config.get(key) if isinstance(self.config, dict) else None
            listen = section.get("listen") if isinstance(section, dict) else None
            if listen:
                host, _, port = str(listen).rpartition(":")
                if int(port) > 0:
                    out.append((host.strip("[]"), int(port)))
        return out

    def reconfigure(self, config, log_format="text"):
        """Restart with another config (e.g. ``harness.proxy_config(env)`` edited).
        ``log_format="json"`` runs ``cutover --log-format json run ...`` (one JSON object
        a line); the default config restored after the test brings back text logs."""
        self.stop()
        self.log_format = log_format
        self.argv = self._argv()
        self.config = config
        self.dirty = False
        return self.start()

    def write_config(self, config):
        """Replace routes.yaml under the RUNNING proxy (no restart): ``config`` is a dict
        (emitted as YAML) or raw text (e.g. a broken file). The proxy picks it up by
        itself within ~2 s, or at once on ``sighup()``. Written atomically (rename),
        so the proxy never reads half a file. Marks the proxy dirty: the default
        config is restored (restart) after the test."""
        text = config if isinstance(config, str) else to_yaml(config) + "\n"
        tmp = self.config_path.with_name(self.config_path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.config_path)
        self.dirty = True

    def sighup(self):
        """Ask the running proxy to reload its configuration now."""
        assert self.running, "the proxy is not running"
        self.proc.send_signal(signal.SIGHUP)

    def log_size(self):
        """Current size of proxy.log: pass it to log_since()/wait_log() as ``offset``."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset):
        """The log text written after ``offset`` (from log_size())."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return _ANSI.sub("", f.read().decode("utf-8", "replace"))
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern, offset=0, timeout=10.0, count=1):
        """Bounded poll until ``pattern`` (regex) occurs ``count`` times in the log after
        ``offset``; returns the matching lines."""
        rx = re.compile(pattern)

        def found():
            lines = [l for l in self.log_since(offset).splitlines() if rx.search(l)]
            return lines if len(lines) >= count else None
        return wait_until(found, timeout, what=f"{count}x /{pattern}/ in {self.log_path}")

    def proc_status(self):
        """Memory figures of the proxy process from /proc/<pid>/status, in kB:
        {"VmRSS": ..., "VmHWM": ..., ...}."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.startswith("Vm") and value.strip().endswith("kB"):
                out[key] = int(value.split()[0])
        return out

    def log_text(self):
        try:
            return _ANSI.sub("", self.log_path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""


class Env:
    """Session temp dir + fresh certificates."""

    def __init__(self, root):
        self.root = Path(root)
        self.certs = self.root / "certs"
        make_certs(self.certs)
        # dovenull/dovecot/mail need to traverse and read (keys stay root-only:
        # Dovecot's config process reads them as root)
        for p in (self.root, self.certs):
            p.chmod(0o755)
        self.ca = self.certs / "ca.pem"

    def ssl_context(self):
        return client_ssl_context(self.ca)
