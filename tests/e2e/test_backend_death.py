"""A backend that dies mid-session (issue 17 item 1), end to end: the real cutover binary
in front of real Dovecot.

* The Dovecot ``imap`` process serving a session is SIGKILLed (``kill -9`` of that one
  process: the master and every other session live on) while the client IDLEs through
  the proxy. The client must get ``* BYE [UNAVAILABLE]`` and then the close, promptly;
  the end is counted in ``cutover_backend_disconnects_total{reason="eof"}`` and the
  session's summary line says ``outcome=backend_died``. Twice: bob on the legacy host
  green (plaintext: Dovecot hands the connection itself to the ``imap`` process) and
  joeuser on the new host (STARTTLS: ``imap-login`` keeps the TLS and closes it when the
  ``imap`` process behind it dies).
* The same with the ``pop3`` process of a POP3 session between two commands: the client
  gets ``-ERR [SYS/TEMP]``.

The process is found by its title (``verbose_proctitle = yes``:
``dovecot-<instance>/imap [bob 127.0.0.1 IDLE]``) among the processes of the Dovecot instance the
harness started (its own process group).
"""

import os
import re
import signal
import time

import pytest

import clients as c
from harness import METRICS_PORT, PROXY_IP, PROXY_PORTS, USERS

pytestmark = pytest.mark.proxy

IMAP_BYE = b"* BYE [UNAVAILABLE] Lost the connection to the mail server, please reconnect"
POP3_ERR = b"-ERR [SYS/TEMP] Lost the connection to the mail server, please reconnect"
DISCONNECTS = "cutover_backend_disconnects_total"
#: the goodbye and the close come at once for one session (no crowd, no spread)
PROMPT = 5.0


def metric(name, **labels):
    return c.metric_sum(c.scrape_metrics(PROXY_IP, METRICS_PORT), name, **labels)


def mail_process(dovecot, service, user, timeout=10.0):
    """The pid of the ``service`` process (imap, pop3) of ``dovecot`` (a harness.Dovecot)
    that serves ``user``: a process of the instance's process group whose title reads
    ``dovecot-<instance>/<service> [<user> ...``."""
    # "dovecot-<instance_name>/imap [bob 127.0.0.1 IDLE]" (verbose_proctitle)
    title = re.compile(rb"dovecot[^/\0]*/" + service.encode() + rb" \[" + re.escape(user.encode()) + rb" ")

    def find():
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.getpgid(int(entry)) != dovecot.pid:
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except (OSError, ProcessLookupError):
                continue
            if title.match(cmdline):
                found.append(int(entry))
        return found[0] if len(found) == 1 else None
    return c.wait_for(find, timeout, interval=0.1,
                      what=f"the one {service} process of {user} in {dovecot.name}")


def read_to_close(sock, timeout):
    """Everything the proxy sends until it closes; (bytes, seconds it took)."""
    t = time.monotonic()
    data = bytearray()
    deadline = t + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"still open after {timeout}s; got {bytes(data)!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:  # TLS EOF without close_notify, a reset
            break
        if not chunk:
            break
        data += chunk
    return bytes(data), time.monotonic() - t


@pytest.mark.parametrize("user, host", [("bob", "green"), ("joeuser", "new")])
def test_imap_process_killed_under_idle_client_gets_bye(env, servers, proxy, user, host):
    dovecot = getattr(servers, host).imap
    pool = "new" if host == "new" else "legacy"
    before = metric(DISCONNECTS, pool=pool, protocol="imap", reason="eof")
    r = c.RawIMAP(PROXY_IP, PROXY_PORTS["imaps"], tls="implicit", ctx=env.ssl_context())
    try:
        tagged, _ = r.command("L1", f'LOGIN {user} "{USERS[user]}"')
        assert c.is_tagged_ok(tagged, "L1"), r.dump()
        tagged, _ = r.command("L2", "SELECT INBOX")
        assert c.is_tagged_ok(tagged, "L2"), r.dump()
        r.send("I1 IDLE\r\n")
        assert r.readline().startswith(b"+"), r.dump()
        pid = mail_process(dovecot, "imap", user)
        off = proxy.log_size()
        os.kill(pid, signal.SIGKILL)
        data, took = read_to_close(r.sock, 15)
        data = r.buf + data
    finally:
        r.close()
    lines = data.split(b"\r\n")
    assert IMAP_BYE in lines, f"no BYE after the imap process died: {data!r}"
    assert data.endswith(IMAP_BYE + b"\r\n"), f"the BYE is the last word: {data!r}"
    assert took < PROMPT, f"the BYE came {took:.1f}s after the kill"
    c.wait_for(lambda: metric(DISCONNECTS, pool=pool, protocol="imap", reason="eof") == before + 1,
               5, what=f"{DISCONNECTS}{{pool={pool},reason=eof}} to count the death")
    proxy.wait_log(r'outcome="?backend_died', off)
    assert dovecot.running, "only the one imap process was killed"
    # the user logs in again at once, on the same (living) server
    conn = c.imap_login(PROXY_IP, PROXY_PORTS["imaps"], user, USERS[user], "implicit",
                        env.ssl_context())
    try:
        assert c.imap_subject(conn) == f"hello from {host}"
    finally:
        c.imap_logout(conn)


def test_pop3_process_killed_between_commands_gets_err(env, servers, proxy):
    dovecot = servers.green.pop3
    before = metric(DISCONNECTS, pool="legacy", protocol="pop3", reason="eof")
    conn = c.pop3_connect(PROXY_IP, PROXY_PORTS["pop3s"], "implicit", env.ssl_context())
    try:
        conn.user("bob")
        conn.pass_(USERS["bob"])
        count, _size = conn.stat()
        assert count >= 1
        pid = mail_process(dovecot, "pop3", "bob")
        os.kill(pid, signal.SIGKILL)
        data, took = read_to_close(conn.sock, 15)
    finally:
        conn.close()
    assert data == POP3_ERR + b"\r\n", data
    assert took < PROMPT, f"the -ERR came {took:.1f}s after the kill"
    c.wait_for(lambda: metric(DISCONNECTS, pool="legacy", protocol="pop3", reason="eof") == before + 1,
               5, what=f"{DISCONNECTS}{{protocol=pop3,reason=eof}} to count the death")
