"""POP3 (127.0.0.1:11110 STLS, 11995 TLS) and SMTP submission (11587 STARTTLS,
11465 TLS) through the proxy.

POP3: the seeded message 1 ("hello from <host>") proves the backend.
SMTP: each test mails a unique token and looks for it in the sinks: new's
submission relays to new's sink; legacy users (pop-before-smtp) are relayed
to the 2525 server of the legacy host that accepted their POP login."""

import pytest

import clients as c
from harness import PROXY_IP, PROXY_PORTS, USERS

POP3 = PROXY_PORTS["pop3"]
POP3S = PROXY_PORTS["pop3s"]
SUBMISSION = PROXY_PORTS["submission"]
SUBMISSIONS = PROXY_PORTS["submissions"]

pytestmark = pytest.mark.proxy


def pop_which(env, user, port=POP3S, tls="implicit"):
    return c.pop3_which_host(PROXY_IP, port, user, USERS[user], tls, env.ssl_context())


def submit(env, user, password=None, port=SUBMISSION, tls="starttls", **kw):
    return c.swaks(PROXY_IP, port, user=user, password=USERS[user] if password is None else password,
                   tls=tls, ca=env.ca, **kw)


# ---------------------------------------------------------------- POP3


def test_pop3s_joeuser_lands_on_new(env, proxy):
    assert pop_which(env, "joeuser") == "hello from new"


def test_pop3_stls_joeuser_lands_on_new(env, proxy):
    assert pop_which(env, "joeuser", POP3, "starttls") == "hello from new"


def test_proxy_uses_stls_to_new_backend(env, proxy, servers):
    n = len(servers.new.pop3.logins("joeuser"))
    assert pop_which(env, "joeuser") == "hello from new"
    login = servers.new.pop3.wait_login("joeuser", n)
    assert login["tls"], login["line"]


def test_pop3_stls_bob_lands_on_green(env, proxy):
    assert pop_which(env, "bob", POP3, "starttls") == "hello from green"
    assert pop_which(env, "carol", POP3S, "implicit") == "hello from green"


def test_pop3_weird_password(env, proxy):
    assert pop_which(env, "weird") == "hello from new"
    assert pop_which(env, "weird", POP3, "starttls") == "hello from new"


def test_curl_pop3s_retrieves_message_1(env, proxy):
    cp = c.curl("--cacert", env.ca, "-u", f"joeuser:{USERS['joeuser']}", f"pop3s://{PROXY_IP}:{POP3S}/1")
    assert cp.returncode == 0, cp.text
    assert "Subject: hello from new" in cp.text
    assert "backend=new" in cp.text


def test_curl_pop3_stls_list(env, proxy):
    cp = c.curl("--ssl-reqd", "--cacert", env.ca, "-u", f"bob:{USERS['bob']}", f"pop3://{PROXY_IP}:{POP3}/")
    assert cp.returncode == 0, cp.text
    assert cp.text.splitlines()[0].startswith("1 "), cp.text


@pytest.mark.parametrize("user,host", [("joeuser", "new"), ("bob", "green")])
def test_pop3_wrong_password_then_retry(env, proxy, user, host):
    conn = c.pop3_connect(PROXY_IP, POP3S, "implicit", env.ssl_context())
    try:
        with pytest.raises(c.poplib.error_proto, match="-ERR"):
            conn.user(user)
            conn.pass_(USERS[user] + "-wrong")
        conn.user(user)
        conn.pass_(USERS[user])
        assert c.pop3_subject(conn) == f"hello from {host}"
    finally:
        conn.quit()


def test_pop3_no_plaintext_login_before_stls(env, proxy):
    conn = c.pop3_connect(PROXY_IP, POP3)
    try:
        caps = {k.upper() for k in conn.capa()}
        assert "STLS" in caps, caps
        with pytest.raises(c.poplib.error_proto, match="-ERR"):
            conn.user("joeuser")
            conn.pass_(USERS["joeuser"])
    finally:
        conn.close()


# ---------------------------------------------------------------- SMTP: new pool


def test_swaks_submission_starttls_joeuser_to_new(env, proxy, servers):
    tok = c.token()
    cp = submit(env, "joeuser", subject=tok)
    assert cp.returncode == 0, cp.text
    msg = servers.new.sink.wait_for(tok)
    assert msg.mail_from == "joeuser@example.net"
    assert msg.rcpt_tos == ["x@example.net"]
    assert servers.sink_for(tok) == ["new"]


def test_proxy_uses_starttls_to_new_submission(env, proxy, servers):
    n = len(servers.new.smtp.logins("joeuser"))
    tok = c.token()
    cp = submit(env, "joeuser", subject=tok)
    assert cp.returncode == 0, cp.text
    servers.new.sink.wait_for(tok)
    login = servers.new.smtp.wait_login("joeuser", n)
    assert login["tls"], login["line"]


def test_swaks_submissions_implicit_tls_joeuser_to_new(env, proxy, servers):
    tok = c.token()
    cp = submit(env, "joeuser", port=SUBMISSIONS, tls="implicit", subject=tok)
    assert cp.returncode == 0, cp.text
    servers.new.sink.wait_for(tok)
    assert servers.sink_for(tok) == ["new"]


def test_curl_smtp_starttls_joeuser_to_new(env, proxy, servers, tmp_path):
    tok = c.token()
    f = tmp_path / "mail.eml"
    f.write_bytes(f"From: joeuser@example.net\r\nTo: y@example.net\r\nSubject: {tok}\r\n\r\nvia curl\r\n".encode())
    cp = c.curl("--ssl-reqd", "--cacert", env.ca, f"smtp://{PROXY_IP}:{SUBMISSION}",
                "--mail-from", "joeuser@example.net", "--mail-rcpt", "y@example.net",
                "-u", f"joeuser:{USERS['joeuser']}", "-T", f)
    assert cp.returncode == 0, cp.text
    msg = servers.new.sink.wait_for(tok)
    assert msg.rcpt_tos == ["y@example.net"]
    assert servers.sink_for(tok) == ["new"]


def test_swaks_weird_password_to_new(env, proxy, servers):
    tok = c.token()
    cp = submit(env, "weird", subject=tok)
    assert cp.returncode == 0, cp.text
    servers.new.sink.wait_for(tok)


def test_joeuser_wrong_password_535(env, proxy, servers):
    tok = c.token()
    cp = submit(env, "joeuser", password="wrong", subject=tok)
    assert cp.returncode != 0 and "535" in cp.text, cp.text
    assert servers.sink_for(tok) == []


# ---------------------------------------------------------------- SMTP: legacy pool


def test_swaks_bob_to_green_sink(env, proxy, servers):
    tok = c.token()
    cp = submit(env, "bob", subject=tok)
    assert cp.returncode == 0, cp.text
    msg = servers.green.sink.wait_for(tok)
    assert msg.mail_from == "bob@example.net"
    assert msg.rcpt_tos == ["x@example.net"]
    assert servers.sink_for(tok) == ["green"]


def test_swaks_submissions_bob_to_green_sink(env, proxy, servers):
    tok = c.token()
    cp = submit(env, "bob", port=SUBMISSIONS, tls="implicit", subject=tok)
    assert cp.returncode == 0, cp.text
    servers.green.sink.wait_for(tok)
    assert servers.sink_for(tok) == ["green"]


def test_bob_wrong_password_535_and_nothing_delivered(env, proxy, servers):
    tok = c.token()
    cp = submit(env, "bob", password="wrong", subject=tok)
    assert cp.returncode != 0 and "535" in cp.text, cp.text
    assert servers.sink_for(tok) == []
    assert servers.green.sink.find(tok) == []


def test_green_pop3_down_bob_goes_to_mauve(env, proxy, servers):
    with servers.green.pop3.stopped():
        assert pop_which(env, "bob", POP3, "starttls") == "hello from mauve"
        tok = c.token()
        cp = submit(env, "bob", subject=tok)
        assert cp.returncode == 0, cp.text
        servers.mauve.sink.wait_for(tok)
        assert servers.sink_for(tok) == ["mauve"]


# ---------------------------------------------------------------- SMTP: no open relay


def test_no_auth_before_starttls(env, proxy, servers):
    tok = c.token()
    cp = c.swaks(PROXY_IP, SUBMISSION, user="joeuser", password=USERS["joeuser"], subject=tok)
    assert cp.returncode != 0, cp.text
    assert servers.sink_for(tok) == []


@pytest.mark.parametrize("mail_from", ["joeuser@example.net", "bob@example.net"])
def test_unauthenticated_submission_is_not_relayed(env, proxy, servers, mail_from):
    tok = c.token()
    cp = c.swaks(PROXY_IP, SUBMISSION, mail_from=mail_from, tls="starttls", ca=env.ca, subject=tok)
    assert cp.returncode != 0, cp.text
    assert servers.sink_for(tok) == []
