"""The harness itself, WITHOUT the proxy: every backend answers real clients
directly, serves its own seeded mailbox, and its SMTP side stores mail where
the tests look for it. If these fail, the proxy tests mean nothing."""

import socket
import time

import pytest

import clients as c
import harness as h
from harness import GREEN_IP, MAUVE_IP, NEW_IP, USERS


def test_certs_are_fresh_and_verify(env):
    import subprocess
    for leaf in ("proxy", "backend"):
        subprocess.run(["openssl", "verify", "-CAfile", env.ca, env.certs / f"{leaf}.pem"],
                       check=True, capture_output=True)
        assert (env.certs / f"{leaf}-key.pem").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    # not the committed demo CA
    assert env.ca.read_bytes() != (h.REPO / "certs" / "ca.pem").read_bytes()


# ---------------------------------------------------------------- IMAP


@pytest.mark.parametrize("user", ["joeuser", "alice", "bob", "carol"])
def test_imap_new_starttls(env, servers, user):
    subj = c.imap_which_host(NEW_IP, 143, user, USERS[user], tls="starttls", ctx=env.ssl_context())
    assert subj == "hello from new"


def test_imap_new_implicit_tls(env, servers):
    assert c.imap_which_host(NEW_IP, 993, "joeuser", USERS["joeuser"], tls="implicit",
                             ctx=env.ssl_context()) == "hello from new"


def test_imap_new_weird_password_quoted_literal_and_plain(env, servers):
    pw = USERS["weird"]
    # quoted string with raw UTF-8 (imaplib quotes " and \)
    assert c.imap_which_host(NEW_IP, 143, "weird", pw, tls="starttls", ctx=env.ssl_context(),
                             utf8=True) == "hello from new"
    # synchronizing literal on a raw socket
    raw = pw.encode()
    with c.RawIMAP(NEW_IP, 993, tls="implicit", ctx=env.ssl_context()) as r:
        r.send(f"a LOGIN weird {{{len(raw)}}}\r\n")
        assert r.readline().startswith(b"+"), r.dump()
        r.send(raw + b"\r\n")
        tagged, _ = r.read_until_tagged("a")
        assert c.is_tagged_ok(tagged, "a"), r.dump()
    # AUTHENTICATE PLAIN
    conn = c.imap_connect(NEW_IP, 143, "starttls", env.ssl_context())
    try:
        typ, _ = c.authenticate_plain(conn, "weird", pw)
        assert typ == "OK"
        assert c.imap_subject(conn) == "hello from new"
    finally:
        c.imap_logout(conn)


@pytest.mark.parametrize("host,ip", [("green", GREEN_IP), ("mauve", MAUVE_IP)])
@pytest.mark.parametrize("user", ["bob", "carol", "weird"])
def test_imap_legacy_plain(servers, host, ip, user):
    assert c.imap_which_host(ip, 143, user, USERS[user], utf8=True) == f"hello from {host}"


def test_imap_wrong_password_is_fast_and_retry_works(env, servers):
    """auth_failure_delay = 0 and no anvil penalty: failures don't slow the suite."""
    conn = c.imap_connect(NEW_IP, 143, "starttls", env.ssl_context())
    try:
        for _ in range(3):
            t = time.monotonic()
            with pytest.raises(c.imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                conn.login("joeuser", "wrong")
            assert time.monotonic() - t < 1.0
        conn.login("joeuser", USERS["joeuser"])
        assert c.imap_subject(conn) == "hello from new"
    finally:
        c.imap_logout(conn)
    conn = c.imap_connect(GREEN_IP, 143)
    try:
        t = time.monotonic()
        with pytest.raises(c.imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            conn.login("bob", "wrong")
        assert time.monotonic() - t < 1.0
    finally:
        c.imap_logout(conn)


def test_imap_new_offers_starttls_and_legacy_does_not(servers):
    with c.RawIMAP(NEW_IP, 143) as r:
        assert "STARTTLS" in r.capabilities()
    with c.RawIMAP(GREEN_IP, 143) as r:
        caps = r.capabilities()
        assert "STARTTLS" not in caps and "LOGINDISABLED" not in caps


def test_imap_idle_direct(env, servers):
    tok = c.token("idle")
    other = c.imap_login(NEW_IP, 993, "alice", USERS["alice"], "implicit", env.ssl_context())
    try:
        with c.RawIMAP(NEW_IP, 993, tls="implicit", ctx=env.ssl_context()) as r:
            assert c.is_tagged_ok(r.command("a", f'LOGIN alice "{USERS["alice"]}"')[0], "a")
            assert c.is_tagged_ok(r.command("b", "SELECT INBOX")[0], "b")
            line = c.idle_sees_append(r, "c", lambda: c.append_message(other, tok))
            assert line == b"* 2 EXISTS"
    finally:
        c.expunge_subject(other, tok)
        c.imap_logout(other)


# ---------------------------------------------------------------- POP3


def test_pop3_new_stls_and_implicit(env, servers):
    ctx = env.ssl_context()
    assert c.pop3_which_host(NEW_IP, 110, "joeuser", USERS["joeuser"], "starttls", ctx) == "hello from new"
    assert c.pop3_which_host(NEW_IP, 995, "alice", USERS["alice"], "implicit", ctx) == "hello from new"
    assert c.pop3_which_host(NEW_IP, 995, "weird", USERS["weird"], "implicit", ctx) == "hello from new"


@pytest.mark.parametrize("host,ip", [("green", GREEN_IP), ("mauve", MAUVE_IP)])
def test_pop3_legacy_plain(servers, host, ip):
    assert c.pop3_which_host(ip, 110, "bob", USERS["bob"]) == f"hello from {host}"
    assert c.pop3_which_host(ip, 110, "weird", USERS["weird"]) == f"hello from {host}"


def test_pop3_wrong_password(servers):
    conn = c.pop3_connect(GREEN_IP, 110)
    try:
        conn.user("bob")
        with pytest.raises(c.poplib.error_proto, match="-ERR"):
            conn.pass_("wrong")
    finally:
        conn.close()


# ---------------------------------------------------------------- SMTP


def test_submission_new_with_auth_over_starttls(env, servers):
    tok = c.token()
    cp = c.swaks(NEW_IP, 587, user="joeuser", password=USERS["joeuser"], tls="starttls",
                 ca=env.ca, subject=tok)
    assert cp.returncode == 0, cp.text
    msg = servers.new.sink.wait_for(tok)
    assert msg.mail_from == "joeuser@example.net"
    assert msg.rcpt_tos == ["x@example.net"]
    assert servers.sink_for(tok) == ["new"]


def test_submission_new_rejects_wrong_password(env, servers):
    tok = c.token()
    cp = c.swaks(NEW_IP, 587, user="joeuser", password="wrong", tls="starttls", ca=env.ca, subject=tok)
    assert cp.returncode != 0 and "535" in cp.text, cp.text
    assert servers.sink_for(tok) == []


def test_submission_new_weird_password(env, servers):
    tok = c.token()
    cp = c.swaks(NEW_IP, 587, user="weird", password=USERS["weird"], tls="starttls",
                 ca=env.ca, subject=tok)
    assert cp.returncode == 0, cp.text
    servers.new.sink.wait_for(tok)


@pytest.mark.parametrize("host,ip", [("green", GREEN_IP), ("mauve", MAUVE_IP)])
def test_legacy_smtp_without_auth(servers, host, ip):
    tok = c.token()
    cp = c.swaks(ip, 2525, mail_from="bob@example.net", subject=tok)
    assert cp.returncode == 0, cp.text
    assert "AUTH" not in cp.text.split("EHLO", 1)[1].split("MAIL FROM", 1)[0]
    msg = getattr(servers, host).sink.wait_for(tok)
    assert msg.mail_from == "bob@example.net"
    assert servers.sink_for(tok) == [host]


# ---------------------------------------------------------------- stop/start


def _refused(ip, port):
    try:
        with socket.create_connection((ip, port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def test_stop_and_start_green_parts_independently(servers):
    g = servers.green
    with g.imap.stopped():
        assert _refused(GREEN_IP, 143)
        # the other parts of green keep working
        assert c.pop3_which_host(GREEN_IP, 110, "bob", USERS["bob"]) == "hello from green"
        assert c.swaks(GREEN_IP, 2525, subject=c.token()).returncode == 0
    assert c.imap_which_host(GREEN_IP, 143, "bob", USERS["bob"]) == "hello from green"

    with g.pop3.stopped():
        assert _refused(GREEN_IP, 110)
        assert c.imap_which_host(GREEN_IP, 143, "bob", USERS["bob"]) == "hello from green"
    assert c.pop3_which_host(GREEN_IP, 110, "bob", USERS["bob"]) == "hello from green"

    with g.smtp.stopped():
        assert _refused(GREEN_IP, 2525)
    tok = c.token()
    assert c.swaks(GREEN_IP, 2525, subject=tok).returncode == 0
    g.sink.wait_for(tok)


def test_restore_fixture_restarts_what_a_test_left_stopped_part1(servers):
    servers.mauve.pop3.stop()
    assert not servers.mauve.pop3.running


def test_restore_fixture_restarts_what_a_test_left_stopped_part2(servers):
    assert servers.mauve.pop3.running
    assert c.pop3_which_host(MAUVE_IP, 110, "bob", USERS["bob"]) == "hello from mauve"


def test_dovecot_login_log_tells_tls(env, servers):
    """The proxy tests read new's login log to prove the proxy spoke TLS to it.
    Note: loopback is in login_trusted_networks, so new accepts a plaintext
    LOGIN from 127.0.0.1 (and advertises no LOGINDISABLED) — only the log tells."""
    imap = servers.new.imap
    n = len(imap.logins("carol"))
    conn = c.imap_login(NEW_IP, 143, "carol", USERS["carol"])  # no STARTTLS
    c.imap_logout(conn)
    assert imap.wait_login("carol", n)["tls"] is False
    conn = c.imap_login(NEW_IP, 143, "carol", USERS["carol"], "starttls", env.ssl_context())
    c.imap_logout(conn)
    assert imap.wait_login("carol", n + 1)["tls"] is True
