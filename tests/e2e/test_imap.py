"""IMAP through the proxy: 127.0.0.1:11143 (STARTTLS) and 127.0.0.1:11993 (TLS).

Which backend served a session is proven by the seeded message 1, whose
Subject is "hello from <host>" and differs on every host."""

import time

import pytest

import clients as c
from harness import NEW_IP, PROXY_IP, PROXY_PORTS, USERS

IMAP = PROXY_PORTS["imap"]
IMAPS = PROXY_PORTS["imaps"]

#: how long the proxy may take to route to green again once it is back
LEGACY_RECOVERY_TIMEOUT = 30.0

pytestmark = pytest.mark.proxy


def which(env, user, port=IMAP, tls="starttls", **kw):
    return c.imap_which_host(PROXY_IP, port, user, USERS[user], tls=tls, ctx=env.ssl_context(), **kw)


# ---------------------------------------------------------------- routing


@pytest.mark.parametrize("user", ["joeuser", "alice"])
def test_new_user_starttls_lands_on_new(env, proxy, user):
    assert which(env, user) == "hello from new"


def test_new_user_implicit_tls_lands_on_new(env, proxy):
    assert which(env, "joeuser", IMAPS, "implicit") == "hello from new"


@pytest.mark.parametrize("user", ["bob", "carol"])
def test_legacy_user_lands_on_green(env, proxy, user):
    assert which(env, user) == "hello from green"
    assert which(env, user, IMAPS, "implicit") == "hello from green"


def test_proxy_uses_starttls_to_new_backend(env, proxy, servers):
    """pools.new.imap has tls: starttls: the backend must see a TLS login.
    (Dovecot would accept plaintext from loopback: login_trusted_networks.)"""
    n = len(servers.new.imap.logins("joeuser"))
    assert which(env, "joeuser", IMAPS, "implicit") == "hello from new"
    login = servers.new.imap.wait_login("joeuser", n)
    assert login["tls"], login["line"]


def test_legacy_fails_over_to_mauve_and_back(env, proxy, servers):
    with servers.green.imap.stopped():
        assert which(env, "bob") == "hello from mauve"
        assert which(env, "bob", IMAPS, "implicit") == "hello from mauve"
    # green is back: the proxy must return to it (balance: first) within a bound
    c.wait_for(lambda: which(env, "bob") == "hello from green", LEGACY_RECOVERY_TIMEOUT,
               interval=0.5, what="bob to land on green again")


def test_legacy_all_down_fails_cleanly(env, proxy, servers):
    with servers.green.imap.stopped(), servers.mauve.imap.stopped():
        t = time.monotonic()
        with pytest.raises((c.imaplib.IMAP4.error, c.imaplib.IMAP4.abort, ConnectionError, OSError)):
            which(env, "bob")
        assert time.monotonic() - t < 10, "a login with no legacy backend up must fail, not hang"
    # the new pool is unaffected meanwhile and afterwards
    assert which(env, "joeuser") == "hello from new"


# ---------------------------------------------------------------- curl


def test_curl_imaps_fetch_uid1(env, proxy):
    cp = c.curl("--cacert", env.ca, "-u", f"joeuser:{USERS['joeuser']}",
                f"imaps://{PROXY_IP}:{IMAPS}/INBOX;UID=1")
    assert cp.returncode == 0, cp.text
    assert "Subject: hello from new" in cp.text
    assert "backend=new" in cp.text


def test_curl_imaps_list_and_search(env, proxy):
    cp = c.curl("--cacert", env.ca, "-u", f"joeuser:{USERS['joeuser']}", f"imaps://{PROXY_IP}:{IMAPS}/")
    assert cp.returncode == 0, cp.text
    assert "INBOX" in cp.text
    cp = c.curl("--cacert", env.ca, "-u", f"joeuser:{USERS['joeuser']}", f"imaps://{PROXY_IP}:{IMAPS}/INBOX?ALL")
    assert cp.returncode == 0, cp.text
    assert "* SEARCH 1" in cp.text


def test_curl_imap_starttls(env, proxy):
    cp = c.curl("--ssl-reqd", "--cacert", env.ca, "-u", f"bob:{USERS['bob']}",
                f"imap://{PROXY_IP}:{IMAP}/INBOX;UID=1")
    assert cp.returncode == 0, cp.text
    assert "Subject: hello from green" in cp.text


# ---------------------------------------------------------------- auth failures


@pytest.mark.parametrize("user,host", [("joeuser", "new"), ("bob", "green")])
def test_wrong_password_then_retry_on_same_connection(env, proxy, user, host):
    conn = c.imap_connect(PROXY_IP, IMAP, "starttls", env.ssl_context())
    try:
        with pytest.raises(c.imaplib.IMAP4.error, match=r"\[AUTHENTICATIONFAILED\]"):
            conn.login(user, USERS[user] + "-wrong")
        typ, _ = conn.login(user, USERS[user])
        assert typ == "OK"
        assert c.imap_subject(conn) == f"hello from {host}"
    finally:
        c.imap_logout(conn)


def test_wrong_password_raw_tagged_no(env, proxy):
    with c.RawIMAP(PROXY_IP, IMAPS, tls="implicit", ctx=env.ssl_context()) as r:
        tagged, _ = r.command("a1", 'LOGIN joeuser "not-the-password"')
        assert c.is_tagged_no(tagged, "a1") and b"[AUTHENTICATIONFAILED]" in tagged, r.dump()
        tagged, _ = r.command("a2", f'LOGIN joeuser "{USERS["joeuser"]}"')
        assert c.is_tagged_ok(tagged, "a2"), r.dump()
        tagged, _ = r.command("a3", "EXAMINE INBOX")
        assert c.is_tagged_ok(tagged, "a3"), r.dump()


def test_login_before_starttls_is_refused(env, proxy):
    with c.RawIMAP(PROXY_IP, IMAP) as r:
        assert r.greeting.startswith(b"* OK"), r.greeting
        caps = r.capabilities()
        assert "STARTTLS" in caps, caps
        assert "LOGINDISABLED" in caps, caps
        tagged, _ = r.command("a", f'LOGIN joeuser "{USERS["joeuser"]}"')
        assert c.is_tagged_no_or_bad(tagged, "a"), r.dump()
        tagged, _ = r.command("b", "AUTHENTICATE PLAIN " + c.b64(b"\0joeuser\0" + USERS["joeuser"].encode()))
        assert c.is_tagged_no_or_bad(tagged, "b"), r.dump()
        # after STARTTLS the same connection can log in
        r.starttls(env.ssl_context())
        caps = r.capabilities()
        assert "LOGINDISABLED" not in caps and "STARTTLS" not in caps, caps
        tagged, _ = r.command("c", f'LOGIN joeuser "{USERS["joeuser"]}"')
        assert c.is_tagged_ok(tagged, "c"), r.dump()
        assert c.is_tagged_ok(r.command("d", "EXAMINE INBOX")[0], "d"), r.dump()
        tagged, lines = r.command("e", "FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert c.is_tagged_ok(tagged, "e"), r.dump()
        assert any(b"hello from new" in l for l in lines), r.dump()


# ---------------------------------------------------------------- the weird password


def test_weird_password_login_quoted(env, proxy):
    """imaplib quotes (\\" and \\\\) and sends the 8-bit bytes raw."""
    assert which(env, "weird", utf8=True) == "hello from new"
    assert which(env, "weird", IMAPS, "implicit", utf8=True) == "hello from new"


def test_weird_password_login_literals(env, proxy):
    pw = USERS["weird"].encode("utf-8")
    with c.RawIMAP(PROXY_IP, IMAPS, tls="implicit", ctx=env.ssl_context()) as r:
        r.send("a LOGIN {5}\r\n")
        assert r.readline().startswith(b"+"), r.dump()
        r.send(f"weird {{{len(pw)}}}\r\n")
        assert r.readline().startswith(b"+"), r.dump()
        r.send(pw + b"\r\n")
        tagged, _ = r.read_until_tagged("a")
        assert c.is_tagged_ok(tagged, "a"), r.dump()
        tagged, lines = r.command("b", "EXAMINE INBOX")
        assert c.is_tagged_ok(tagged, "b"), r.dump()
        tagged, lines = r.command("f", "FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert c.is_tagged_ok(tagged, "f"), r.dump()
        assert any(b"hello from new" in l for l in lines), r.dump()


def test_weird_password_login_literal_after_starttls(env, proxy):
    pw = USERS["weird"].encode("utf-8")
    with c.RawIMAP(PROXY_IP, IMAP) as r:
        r.starttls(env.ssl_context())
        r.send(f"a LOGIN weird {{{len(pw)}}}\r\n")
        assert r.readline().startswith(b"+"), r.dump()
        r.send(pw + b"\r\n")
        tagged, _ = r.read_until_tagged("a")
        assert c.is_tagged_ok(tagged, "a"), r.dump()


def test_weird_password_authenticate_plain(env, proxy):
    conn = c.imap_connect(PROXY_IP, IMAP, "starttls", env.ssl_context())
    try:
        typ, _ = c.authenticate_plain(conn, "weird", USERS["weird"])
        assert typ == "OK"
        assert c.imap_subject(conn) == "hello from new"
    finally:
        c.imap_logout(conn)


def test_authenticate_plain_initial_response_if_sasl_ir(env, proxy):
    with c.RawIMAP(PROXY_IP, IMAPS, tls="implicit", ctx=env.ssl_context()) as r:
        caps = r.capabilities()
        if "SASL-IR" not in caps:
            pytest.skip(f"proxy does not advertise SASL-IR: {sorted(caps)}")
        ir = c.b64(b"\0weird\0" + USERS["weird"].encode())
        tagged, _ = r.command("a", f"AUTHENTICATE PLAIN {ir}")
        assert c.is_tagged_ok(tagged, "a"), r.dump()


def test_wrong_weird_password_fails(env, proxy):
    conn = c.imap_connect(PROXY_IP, IMAP, "starttls", env.ssl_context())
    try:
        conn._encoding = "utf-8"
        with pytest.raises(c.imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            conn.login("weird", USERS["weird"].replace("ö", "o"))
    finally:
        c.imap_logout(conn)


# ---------------------------------------------------------------- protocol behaviour


def test_pipelined_login_and_select(env, proxy):
    with c.RawIMAP(PROXY_IP, IMAPS, tls="implicit", ctx=env.ssl_context()) as r:
        r.send(f'a1 LOGIN joeuser "{USERS["joeuser"]}"\r\na2 SELECT INBOX\r\n')
        t1, _ = r.read_until_tagged("a1")
        assert c.is_tagged_ok(t1, "a1"), r.dump()
        t2, lines = r.read_until_tagged("a2")
        assert c.is_tagged_ok(t2, "a2"), r.dump()
        assert any(l.endswith(b" EXISTS") for l in lines), r.dump()


def test_pipelined_login_and_select_legacy(env, proxy):
    with c.RawIMAP(PROXY_IP, IMAP) as r:
        r.starttls(env.ssl_context())
        r.send(f'a1 LOGIN bob "{USERS["bob"]}"\r\na2 SELECT INBOX\r\na3 FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n')
        assert c.is_tagged_ok(r.read_until_tagged("a1")[0], "a1"), r.dump()
        assert c.is_tagged_ok(r.read_until_tagged("a2")[0], "a2"), r.dump()
        t3, lines = r.read_until_tagged("a3")
        assert c.is_tagged_ok(t3, "a3"), r.dump()
        assert any(b"hello from green" in l for l in lines), r.dump()


def test_idle(env, proxy):
    """IDLE through the proxy: continuation, an EXISTS pushed by the backend, DONE."""
    tok = c.token("idle")
    direct = c.imap_login(NEW_IP, 993, "joeuser", USERS["joeuser"], "implicit", env.ssl_context())
    try:
        with c.RawIMAP(PROXY_IP, IMAPS, tls="implicit", ctx=env.ssl_context()) as r:
            assert c.is_tagged_ok(r.command("a", f'LOGIN joeuser "{USERS["joeuser"]}"')[0], "a"), r.dump()
            assert c.is_tagged_ok(r.command("b", "SELECT INBOX")[0], "b"), r.dump()
            line = c.idle_sees_append(r, "c", lambda: c.append_message(direct, tok))
            assert line == b"* 2 EXISTS", r.dump()
            assert c.is_tagged_ok(r.command("d", "LOGOUT")[0], "d"), r.dump()
    finally:
        c.expunge_subject(direct, tok)
        c.imap_logout(direct)


def test_openssl_s_client_starttls(env, proxy):
    cp = c.s_client_starttls("imap", PROXY_IP, IMAP, env.ca, send=b"a LOGOUT\r\n")
    assert "Verify return code: 0 (ok)" in cp.text, cp.text
    assert "* BYE" in cp.text and "a OK" in cp.text, cp.text
