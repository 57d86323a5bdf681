"""OAuth 2.0 logins through cutover (SASL OAUTHBEARER, RFC 7628, and XOAUTH2) on IMAP,
POP3 and SMTP, end to end: real clients (curl --oauth2-bearer, imaplib, poplib, smtplib,
raw sockets), the real cutover binary, and real Dovecot instances that validate the JWTs
themselves (``passdb oauth2`` with ``introspection_mode = local``).

What runs (``oauth_servers.py``; started once for the module, stopped at its end):

* a token issuer: two RSA keys made with openssl at start ("good", whose public key is in
  Dovecot's key directory and in cutover's JWKS, and "rogue", same kid, trusted by
  nobody); JWTs are signed with ``openssl dgst -sha256 -sign``;
* "north" (127.0.0.60) and "south" (127.0.0.61): one Dovecot each (IMAP 143, POP3 110,
  submission 587, STARTTLS required) with ``auth_mechanisms = plain login oauthbearer
  xoauth2``, the oauth2 passdb for the OAuth mechanisms (signature, expiry, issuer,
  ``scope = mail``, ``email`` claim = login name) and the passwd-file for PLAIN/LOGIN;
  submission relays to the host's own sink (127.0.0.6x:2500);
* two cutover processes on 127.0.0.1 with the same listeners, pools and routes: "off"
  (12xxx, no token verification: Dovecot decides) and "on" (13xxx, ``oauth:`` with the
  JWKS file, issuer, audience "mail", claim ``email``: cutover refuses bad tokens
  itself). Implicit TLS listeners 12993/12995/12465 (imaps, pop3s, submissions) and
  STARTTLS 12143/12110 offer ``sasl: [plain, login, oauthbearer, xoauth2]``; 12144 (imaps)
  keeps the default (plain, login); 12025 is an SMTP ``relay: pop-before-smtp`` listener;
  ``limits.max_sasl_token: 4096``;
* the session's hosts: "new" (127.0.0.10, password-only Dovecot: no OAuth mechanism) and
  green/mauve (legacy, plaintext, pop-before-smtp SMTP).

Routes (both proxies): joeuser, alice, weird -> north; bob -> south; carol -> new with
fallback north; dave -> new (no fallback); frank -> "hybrid" (IMAP/POP3 on north, SMTP
``auth: pop-before-smtp`` on north's AUTH-less relay, 2525); grace -> hybrid with fallback north; everyone else ->
legacy. Which backend served a session is proven by the seeded "hello from <host>"
message, by which sink got a mail, and by the Dovecot login lines (``method=OAUTHBEARER``
/ ``XOAUTH2``: the same mechanism the client used reached the backend).

The bad tokens (``bad_tokens()``): signed by the rogue key, expired 5 minutes ago, and
one for another application (aud "other-app", scope "other-app": Dovecot 2.3 checks the
``scope`` claim, cutover the ``aud``).

Tests, one property each:

1. OAuth mechanisms are advertised only where enabled and only after TLS (IMAP, POP3
   CAPA, SMTP EHLO); a token before STARTTLS is refused and goes nowhere;
2. curl --oauth2-bearer logs in over imaps, pop3s and smtps: OAUTHBEARER (curl's choice
   when offered), XOAUTH2 on listeners offering only it; Dovecot sees the same mechanism;
3. imaplib (both mechanisms; and SASL-IR on the wire), poplib (initial response on the
   AUTH line, and after ``+``), smtplib (a >500-octet AUTH line, and without initial
   response); a GS2-escaped identity (``a=we=2Cird``) routes unescaped;
4. the token's identity routes: alice to north, bob to south (mailbox, sink,
   ``cutover_logins_total{pool}``); south offers no SASL-IR to cutover;
5. verification off: bad signature, expired, other audience, other issuer, not yet
   valid, and another user's token are refused by Dovecot, with the RFC 7628
   error-challenge round visible to the client (IMAP, POP3, SMTP), counted as
   ``result="auth_failed"``, never ``unavailable``; the client may answer the challenge
   with anything and retry on the same connection; a short opaque token travels as the
   backend's initial response;
6. verification on: the same tokens, plus not-a-JWT, an unknown kid, ``alg: none``,
   HS256 keyed with the public key and a JWK used for another alg, are refused by
   cutover with ``Invalid or expired token`` and never reach Dovecot; a good token
   passes; A's token with GS2 identity B is refused; ``aud`` lists; PS256 and ES256;
   a key added to the JWKS file is used without a reload; ``jwks_url``; a token without
   ``exp`` is refused; without a GS2 identity the claim routes;
7. a backend that does not offer the mechanism: the route's fallback serves (a password
   login still goes to its pool); without a fallback IMAP ``NO [UNAVAILABLE]``, POP3
   ``-ERR [SYS/TEMP]``, SMTP ``454 4.7.0``; within a pool, the next server serves and the
   one without the mechanism stays up (FAILS: cutover bug, see that test);
8. OAuth SMTP for a pop-before-smtp pool is refused (535 5.7.8) unless the fallback
   accepts it; a POP3 OAuth login opens the pop-before-smtp bridge window;
9. ``limits.max_sasl_token``: a longer response is refused by cutover (IMAP ``BAD
   [TOOBIG]``, POP3 ``-ERR``, SMTP ``500 5.5.6``), a shorter one passes;
10. no token (nor its base64) in either proxy's debug log, nor in /metrics.

About 30 s (Dovecot answers each refused login after up to 500 ms, so the failure matrix
runs in threads).
"""

import base64
import concurrent.futures
import functools
import http.server
import imaplib
import json
import smtplib
import threading
import time

import pytest

import clients as c
import harness
import oauth_servers as osv
from oauth_servers import DUMMY, sasl_message

pytestmark = pytest.mark.proxy

MECHS = ["OAUTHBEARER", "XOAUTH2"]
IP = harness.PROXY_IP
#: the bridge test's client address (nobody else logs in from it)
BRIDGE_SOURCE = "127.0.0.63"
#: the jwks_url test's HTTP server (ephemeral port) and its proxy: 14xxx on 127.0.0.1
JWKS_IP = "127.0.0.64"

#: every base64 SASL message a helper of this module sent (the log test looks for them)
SENT_B64 = []


class _Diagnostics:
    """Registered while the module's servers run: failures get the tails of their logs."""

    def __init__(self, servers):
        self.servers = servers

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        rep = outcome.get_result()
        if rep.when in ("setup", "call") and rep.failed and item.module.__name__ == __name__:
            rep.sections.append(("oauth servers (tails)", self.servers.diagnostics(40)))


@pytest.fixture(scope="module")
def oauth(env, servers, request):
    binary = harness.resolve_cutover_bin()
    if not binary.exists():
        pytest.fail(f"cutover binary missing: {binary} does not exist. Build it with "
                    "`cargo build --bins` or point CUTOVER_BIN at it.", pytrace=False)
    o = osv.OAuthServers(env, binary)
    plugin = _Diagnostics(o)
    request.config.pluginmanager.register(plugin, "oauth-diagnostics")
    try:
        o.start()
        yield o
    finally:
        request.config.pluginmanager.unregister(plugin)
        o.stop()


@pytest.fixture(autouse=True)
def _alive(request):
    """A proxy of this module that exits during a test fails it; it is restarted."""
    if "oauth" not in request.fixturenames:
        yield
        return
    o = request.getfixturevalue("oauth")
    o.ensure_running()
    yield
    dead = [p for p in o.proxies if p.proc is not None and p.proc.poll() is not None]
    rcs = {p.name: p.proc.returncode for p in dead}
    o.ensure_running()
    if dead:
        pytest.fail(f"{', '.join(rcs)} exited during this test: {rcs}", pytrace=False)


# --------------------------------------------------------------------------
# clients
# --------------------------------------------------------------------------


def b64(data):
    s = base64.b64encode(data).decode("ascii")
    SENT_B64.append(s)
    return s


class SaslAuth:
    """An imaplib/smtplib authobject: the first call answers with ``message``; a later
    call (an RFC 7628 error challenge) records the challenge and answers with the
    mechanism's dummy (OAUTHBEARER ``\\x01``, XOAUTH2 empty)."""

    def __init__(self, mech, message, text=False):
        self.mech = mech
        self.message = message
        self.text = text  # smtplib wants str
        self.challenges = []

    def __call__(self, challenge=None):
        if not self.challenges and challenge in (None, b""):
            self.challenges.append(None)
            b64(self.message)  # remembered for the log test
            out = self.message
        else:
            self.challenges.append(challenge)
            out = DUMMY[self.mech]
        return out.decode("ascii") if self.text else out

    @property
    def error_challenges(self):
        return [json.loads(ch) for ch in self.challenges[1:]]


def imap_oauth(proxy, mech, user, token, port="imaps"):
    """imaplib AUTHENTICATE (no SASL-IR: imaplib waits for ``+``). Returns (conn or
    None, the exception or None, the SaslAuth)."""
    conn = c.imap_connect(IP, proxy.port[port], "implicit", proxy.client_context())
    auth = SaslAuth(mech, sasl_message(mech, user, token))
    try:
        conn.authenticate(mech, auth)
    except imaplib.IMAP4.error as e:
        c.imap_logout(conn)
        return None, e, auth
    return conn, None, auth


def imap_oauth_which(proxy, mech, user, token):
    conn, err, _ = imap_oauth(proxy, mech, user, token)
    assert err is None, f"{mech} for {user}: {err}"
    try:
        return c.imap_subject(conn)
    finally:
        c.imap_logout(conn)


def raw_imap_oauth(proxy, mech, user, token, port="imaps", message=None, answer=None):
    """AUTHENTICATE with SASL-IR on a RawIMAP; answers an error challenge with
    ``answer`` (default the mechanism's dummy). Returns (tagged line, challenges, r)."""
    r = c.RawIMAP(IP, proxy.port[port], tls="implicit", ctx=proxy.client_context())
    msg = message if message is not None else sasl_message(mech, user, token)
    r.send(f"a1 AUTHENTICATE {mech} {b64(msg)}\r\n")
    challenges = []
    while True:
        line = r.readline()
        if line.startswith(b"+"):
            challenges.append(base64.b64decode(line[1:].strip()))
            r.send((answer if answer is not None else base64.b64encode(DUMMY[mech]).decode()) + "\r\n")
            continue
        if line.startswith(b"a1 "):
            return line, challenges, r


def pop3_auth(conn, mech, message, initial=True, answer=None):
    """AUTH on a poplib connection: the response on the AUTH line (``initial``) or after
    ``+``; an error challenge is answered with ``answer`` (default the dummy). Returns
    (final line, error challenges)."""
    data = b64(message)
    if initial:
        conn._putcmd(f"AUTH {mech} {data}")
    else:
        conn._putcmd(f"AUTH {mech}")
        line, _ = conn._getline()
        assert line.startswith(b"+") and not line.startswith(b"+OK"), line
        conn._putcmd(data)
    challenges = []
    while True:
        line, _ = conn._getline()
        if line.startswith(b"+") and not line.startswith(b"+OK"):
            challenges.append(base64.b64decode(line[1:].strip()))
            conn._putcmd(answer if answer is not None else base64.b64encode(DUMMY[mech]).decode())
            continue
        return line, challenges


def pop3_oauth(proxy, mech, user, token, initial=True, port="pop3s", source=None):
    if source:
        conn = c.pop3_connect(IP, proxy.port["pop3"], "starttls", proxy.client_context(), source=source)
    else:
        conn = c.pop3_connect(IP, proxy.port[port], "implicit", proxy.client_context())
    line, challenges = pop3_auth(conn, mech, sasl_message(mech, user, token), initial)
    return conn, line, challenges


def pop3_quit(conn):
    try:
        conn.quit()
    except Exception:
        conn.close()


def smtp_oauth(proxy, mech, user, token, send_token=None, rcpt="x@example.net", initial=True):
    """smtplib over implicit TLS: EHLO, AUTH (the initial response on the AUTH line, or
    after ``334`` unless ``initial``), and a message with ``send_token`` in its Subject if
    the login succeeded. Returns (code, text, SaslAuth) of AUTH (235 or the failure)."""
    s = smtplib.SMTP_SSL(IP, proxy.port["submissions"], context=proxy.client_context(),
                         timeout=c.IO_TIMEOUT, local_hostname="client.e2e.test")
    auth = SaslAuth(mech, sasl_message(mech, user, token), text=True)
    try:
        s.ehlo()
        try:
            code, text = s.auth(mech, auth, initial_response_ok=initial)
        except smtplib.SMTPResponseException as e:  # 535, 454, 500...
            return e.smtp_code, e.smtp_error.decode("utf-8", "replace"), auth
        if send_token:
            s.sendmail(f"{user}@example.net", [rcpt],
                       f"From: {user}@example.net\r\nTo: {rcpt}\r\nSubject: {send_token}\r\n"
                       f"\r\nsent with {mech}\r\n")
        return code, text.decode("utf-8", "replace"), auth
    finally:
        try:
            s.quit()
        except (smtplib.SMTPException, OSError):
            s.close()


def curl_oauth(proxy, url, user, token, *args):
    return c.curl("-v", "--cacert", proxy.ca, "-u", f"{user}:", "--oauth2-bearer", token, *args, url)


def metric(proxy, name, **labels):
    return c.metric_sum(proxy.metrics(), name, **labels)


def by_mech(proxy, protocol, mechanism, result):
    return metric(proxy, "cutover_logins_by_mechanism_total", protocol=protocol,
                  mechanism=mechanism, result=result)


# --------------------------------------------------------------------------
# 1. advertisement
# --------------------------------------------------------------------------


def test_oauth_advertised_only_where_enabled_and_after_tls(env, oauth):
    p = oauth.off
    with c.RawIMAP(IP, p.port["imap"]) as r:
        before = r.capabilities()
        r.starttls(env.ssl_context())
        after = r.capabilities()
    assert not {"AUTH=OAUTHBEARER", "AUTH=XOAUTH2"} & before, before
    assert {"AUTH=OAUTHBEARER", "AUTH=XOAUTH2", "AUTH=PLAIN"} <= after, after
    with c.RawIMAP(IP, p.port["imaps"], tls="implicit", ctx=env.ssl_context()) as r:
        assert {"AUTH=OAUTHBEARER", "AUTH=XOAUTH2"} <= r.capabilities()
    with c.RawIMAP(IP, p.port["imaps-xoauth2"], tls="implicit", ctx=env.ssl_context()) as r:
        caps = r.capabilities()
        assert "AUTH=XOAUTH2" in caps and "AUTH=OAUTHBEARER" not in caps, caps
    # the password-only listener offers neither, and refuses them
    with c.RawIMAP(IP, p.port["imaps-password"], tls="implicit", ctx=env.ssl_context()) as r:
        caps = r.capabilities()
        assert "AUTH=PLAIN" in caps and not {"AUTH=OAUTHBEARER", "AUTH=XOAUTH2"} & caps, caps
        tok = oauth.issuer.mint("alice")
        tagged, _ = r.command("a1", f"AUTHENTICATE XOAUTH2 {b64(osv.xoauth2('alice', tok))}")
        assert c.is_tagged_no_or_bad(tagged, "a1"), r.dump()

    # a token before STARTTLS is refused, and goes nowhere
    failed0 = len(oauth.north.dovecot.failed_logins())
    msg = osv.xoauth2("alice", oauth.issuer.mint("alice"))
    with c.RawIMAP(IP, p.port["imap"]) as r:
        tagged, _ = r.command("a1", f"AUTHENTICATE XOAUTH2 {b64(msg)}")
        assert tagged.startswith(b"a1 NO [PRIVACYREQUIRED]"), r.dump()
        tagged, _ = r.command("a2", "AUTHENTICATE OAUTHBEARER")
        assert tagged.startswith(b"a2 NO [PRIVACYREQUIRED]"), r.dump()
        r.starttls(env.ssl_context())  # and after it, the same login works
        tagged, _ = r.command("a3", f"AUTHENTICATE XOAUTH2 {b64(msg)}")
        assert c.is_tagged_ok(tagged, "a3"), r.dump()
    conn = c.pop3_connect(IP, p.port["pop3"])
    try:
        conn._putcmd(f"AUTH XOAUTH2 {b64(msg)}")
        line, _ = conn._getline()
        assert line.startswith(b"-ERR"), line
    finally:
        conn.close()
    assert oauth.north.dovecot.failed_logins()[failed0:] == []

    # POP3: CAPA after STLS / on pop3s
    conn = c.pop3_connect(IP, p.port["pop3"])
    try:
        sasl = [v for k, v in conn.capa().items() if k.upper() == "SASL"]
        assert not sasl or not {"OAUTHBEARER", "XOAUTH2"} & set(sasl[0]), sasl
        conn.stls(context=env.ssl_context())
        sasl = [v for k, v in conn.capa().items() if k.upper() == "SASL"]
        assert sasl and {"OAUTHBEARER", "XOAUTH2", "PLAIN"} <= set(sasl[0]), conn.capa()
    finally:
        pop3_quit(conn)

    # SMTP: EHLO on submissions
    s = smtplib.SMTP_SSL(IP, p.port["submissions"], context=env.ssl_context(), timeout=c.IO_TIMEOUT)
    try:
        s.ehlo()
        mechs = set(s.esmtp_features.get("auth", "").upper().split())
        assert {"OAUTHBEARER", "XOAUTH2", "PLAIN"} <= mechs, s.esmtp_features
    finally:
        s.quit()


# --------------------------------------------------------------------------
# 2. curl --oauth2-bearer
# --------------------------------------------------------------------------


@pytest.mark.parametrize("want,suffix", [("OAUTHBEARER", ""), ("XOAUTH2", "-xoauth2")])
def test_curl_imaps_pop3s_smtps(oauth, tmp_path, want, suffix):
    """curl picks OAUTHBEARER when offered (7.88 ignores --login-options AUTH=XOAUTH2 then),
    so XOAUTH2 is tested on the listeners that offer it alone."""
    p, north = oauth.off, oauth.north.dovecot
    tok = oauth.issuer.mint("alice")
    port = {k: p.port[k + suffix] for k in ("imaps", "pop3s", "submissions")}

    n = len(north.logins_of("imap", "alice"))
    cp = curl_oauth(p, f"imaps://{IP}:{port['imaps']}/INBOX/;MAILINDEX=1", "alice", tok)
    assert cp.returncode == 0, cp.text
    assert "Subject: hello from north" in cp.text, cp.text
    assert f"AUTHENTICATE {want}" in cp.text, cp.text
    login = c.wait_for(lambda: north.logins_of("imap", "alice")[n:], 5, what="north's imap login")
    assert login[0]["method"] == want, login

    n = len(north.logins_of("pop3", "alice"))
    cp = curl_oauth(p, f"pop3s://{IP}:{port['pop3s']}/1", "alice", tok)
    assert cp.returncode == 0, cp.text
    assert "Subject: hello from north" in cp.text and f"AUTH {want}" in cp.text, cp.text
    login = c.wait_for(lambda: north.logins_of("pop3", "alice")[n:], 5, what="north's pop3 login")
    assert login[0]["method"] == want, login

    n = len(north.logins_of("submission", "alice"))
    tok_mail = c.token("curl-smtps")
    f = tmp_path / "mail.eml"
    f.write_bytes(f"From: alice@example.net\r\nTo: y@example.net\r\nSubject: {tok_mail}\r\n"
                  f"\r\nvia curl --oauth2-bearer\r\n".encode())
    cp = curl_oauth(p, f"smtps://{IP}:{port['submissions']}", "alice", tok,
                    "--mail-from", "alice@example.net", "--mail-rcpt", "y@example.net", "-T", f)
    assert cp.returncode == 0, cp.text
    assert f"AUTH {want}" in cp.text, cp.text
    msg = oauth.north.sink.wait_for(tok_mail)
    assert msg.mail_from == "alice@example.net" and msg.rcpt_tos == ["y@example.net"], msg
    assert not oauth.south.sink.find(tok_mail)
    login = c.wait_for(lambda: north.logins_of("submission", "alice")[n:], 5,
                       what="north's submission login")
    assert login[0]["method"] == want, login


# --------------------------------------------------------------------------
# 3. Python's clients
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mech", MECHS)
def test_imaplib_authenticate(oauth, mech):
    p = oauth.off
    ok0 = by_mech(p, "imap", mech.lower(), "ok")
    tok = oauth.issuer.mint("joeuser")
    assert imap_oauth_which(p, mech, "joeuser", tok) == "hello from north"
    # the same with SASL-IR on the wire
    tagged, challenges, r = raw_imap_oauth(p, mech, "joeuser", tok)
    r.close()
    assert c.is_tagged_ok(tagged, "a1") and not challenges, (tagged, challenges)
    assert by_mech(p, "imap", mech.lower(), "ok") == ok0 + 2


@pytest.mark.parametrize("mech", MECHS)
def test_poplib_auth_initial_response_and_continuation(oauth, mech):
    p = oauth.off
    tok = oauth.issuer.mint("joeuser")
    for initial in (True, False):
        conn, line, challenges = pop3_oauth(p, mech, "joeuser", tok, initial=initial)
        try:
            assert line.startswith(b"+OK") and not challenges, (initial, line, challenges)
            assert c.pop3_subject(conn) == "hello from north"
        finally:
            pop3_quit(conn)


@pytest.mark.parametrize("mech", MECHS)
def test_smtplib_auth_long_initial_response(oauth, mech):
    p = oauth.off
    tok = oauth.issuer.mint("joeuser")
    line = f"AUTH {mech} " + base64.b64encode(sasl_message(mech, "joeuser", tok)).decode()
    assert len(line) > 500, "the test token should be longer than an SMTP command line"
    tok_mail = c.token("smtplib")
    code, text, auth = smtp_oauth(p, mech, "joeuser", tok, send_token=tok_mail)
    assert code == 235, (code, text)
    assert auth.challenges == [None], auth.challenges
    msg = oauth.north.sink.wait_for(tok_mail)
    assert msg.mail_from == "joeuser@example.net", msg
    # without an initial response: AUTH <mech>, 334, the response
    tok_mail = c.token("smtplib-no-ir")
    code, text, auth = smtp_oauth(p, mech, "joeuser", tok, send_token=tok_mail, initial=False)
    assert code == 235 and auth.challenges == [None], (code, text, auth.challenges)
    oauth.north.sink.wait_for(tok_mail)


@pytest.mark.parametrize("proxy_name", ["off", "on"])
def test_gs2_escaped_identity_routes_unescaped(oauth, proxy_name):
    """``a=we=2Cird`` (RFC 5801 escaping of "we,ird") routes as "we,ird" (-> north, not
    legacy), with and without verification (the claim is "we,ird"); XOAUTH2's
    ``user=we,ird`` needs no escaping."""
    p, north = getattr(oauth, proxy_name), oauth.north.dovecot
    tok = oauth.issuer.mint("we,ird")
    assert osv.oauthbearer("we,ird", tok).startswith(b"n,a=we=2Cird,")
    n = len(north.logins_of("imap", "we,ird"))
    assert imap_oauth_which(p, "OAUTHBEARER", "we,ird", tok) == "hello from north"
    assert imap_oauth_which(p, "XOAUTH2", "we,ird", tok) == "hello from north"
    logins = c.wait_for(lambda: north.logins_of("imap", "we,ird")[n:], 5, what="north's logins")
    assert {x["method"] for x in logins} <= {"OAUTHBEARER", "XOAUTH2"}, logins


# --------------------------------------------------------------------------
# 4. routed by the token's identity
# --------------------------------------------------------------------------


def test_routed_by_token_identity(oauth):
    p = oauth.off
    north0 = metric(p, "cutover_logins_total", pool="north", result="ok")
    south0 = metric(p, "cutover_logins_total", pool="south", result="ok")
    assert imap_oauth_which(p, "OAUTHBEARER", "alice", oauth.issuer.mint("alice")) == "hello from north"
    assert imap_oauth_which(p, "XOAUTH2", "bob", oauth.issuer.mint("bob")) == "hello from south"
    conn, line, _ = pop3_oauth(p, "XOAUTH2", "bob", oauth.issuer.mint("bob"))
    try:
        assert line.startswith(b"+OK"), line
        assert c.pop3_subject(conn) == "hello from south"
    finally:
        pop3_quit(conn)
    tok_mail = c.token("route-bob")
    code, text, _ = smtp_oauth(p, "OAUTHBEARER", "bob", oauth.issuer.mint("bob"), send_token=tok_mail)
    assert code == 235, (code, text)
    oauth.south.sink.wait_for(tok_mail)
    assert not oauth.north.sink.find(tok_mail)
    assert metric(p, "cutover_logins_total", pool="north", result="ok") == north0 + 1
    assert metric(p, "cutover_logins_total", pool="south", result="ok") == south0 + 3
    assert oauth.south.dovecot.logins("bob")[-1]["method"] in ("OAUTHBEARER", "XOAUTH2")


# --------------------------------------------------------------------------
# 5./6. bad tokens: refused by Dovecot (verification off) or by cutover (on)
# --------------------------------------------------------------------------


def bad_tokens(issuer, user="alice"):
    return {
        "bad-signature": issuer.mint(user, key="rogue"),
        "expired": issuer.mint(user, exp_in=-300),
        "wrong-audience": issuer.mint(user, aud="other-app", scope="other-app"),
        "wrong-issuer": issuer.mint(user, iss="https://evil.example.net/realms/mail"),
        "not-yet-valid": issuer.mint(user, extra={"nbf": int(time.time()) + 600}),
    }


#: what north's auth process logs for each bad token (auth_verbose)
DOVECOT_REASON = {
    "bad-signature": "Bad signature",
    "expired": "Token has expired",
    "wrong-audience": "configured scope 'mail' missing from token scope",
    "wrong-issuer": "Issuer 'https://evil.example.net/realms/mail' is not allowed",
    "not-yet-valid": "Token is not valid yet",
    "other-user": "did not match",
}

#: RFC 7628 error challenges as Dovecot sends them
CHALLENGE = {"OAUTHBEARER": {"status": "invalid_token"},
             "XOAUTH2": {"status": "401", "schemes": "bearer", "scope": "mail"}}


def refused_by_dovecot(p, proto, mech, token, user="alice"):
    """One login with a token Dovecot refuses: the client sees Dovecot's RFC 7628 error
    challenge, answers with the dummy, then gets the failure. ``proto``: "imaplib"
    (AUTHENTICATE, then the response after ``+``), "imap" (SASL-IR), "pop3", "smtp"."""
    want = [CHALLENGE[mech]]
    if proto == "imaplib":
        conn, err, auth = imap_oauth(p, mech, user, token)
        assert conn is None and "AUTHENTICATIONFAILED" in str(err), (proto, mech, err)
        assert auth.error_challenges == want, (proto, mech, auth.challenges)
    elif proto == "imap":
        tagged, challenges, r = raw_imap_oauth(p, mech, user, token)
        r.close()
        assert tagged.startswith(b"a1 NO [AUTHENTICATIONFAILED]"), (proto, mech, r.dump())
        assert [json.loads(ch) for ch in challenges] == want, (proto, mech, challenges)
    elif proto == "pop3":
        conn, line, challenges = pop3_oauth(p, mech, user, token, initial=(mech == "XOAUTH2"))
        pop3_quit(conn)
        assert line.startswith(b"-ERR"), (proto, mech, line)
        assert [json.loads(ch) for ch in challenges] == want, (proto, mech, challenges)
    else:  # smtp: 334 <challenge>, the dummy, 535
        code, text, auth = smtp_oauth(p, mech, user, token)
        assert code == 535 and text.startswith("5.7.8"), (proto, mech, code, text)
        assert [json.loads(ch) for ch in auth.challenges[1:]] == want, (proto, mech, auth.challenges)


def in_parallel(calls, workers=12):
    """Run ``calls`` (argument-less callables) in threads; the first failure is raised.
    (Dovecot's auth process answers every failure on a 500 ms timer, even with
    ``auth_failure_delay = 0``: one after the other, 50 refused logins take 25 s.)"""
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(fn) for fn in calls]:
            f.result()


def test_verification_off_dovecot_refuses_bad_tokens(oauth):
    p, north = oauth.off, oauth.north.dovecot
    tokens = bad_tokens(oauth.issuer)
    tokens["other-user"] = oauth.issuer.mint("joeuser")  # a valid token of someone else
    protos = ["imaplib", "imap", "pop3", "smtp"]
    before = {(proto, m.lower(), r): by_mech(p, proto, m.lower(), r)
              for proto in ("imap", "pop3", "smtp") for m in MECHS
              for r in ("auth_failed", "unavailable", "ok")}
    lines0 = len(north.oauth2_lines())
    in_parallel([functools.partial(refused_by_dovecot, p, proto, mech, tok)
                 for tok in tokens.values() for mech in MECHS for proto in protos])
    # every attempt reached north, which says why it refused
    lines = north.oauth2_lines()[lines0:]
    assert len(lines) == len(tokens) * len(MECHS) * len(protos), lines
    for name, reason in DOVECOT_REASON.items():
        n = sum(reason in l for l in lines)
        assert n == len(MECHS) * len(protos), (name, reason, n, lines)
    # counted as authentication failures (IMAP twice per token: imaplib and raw)
    after = {k: by_mech(p, *k) for k in before}
    n = len(tokens)
    for proto, per_mech in (("imap", 2 * n), ("pop3", n), ("smtp", n)):
        for m in MECHS:
            k = (proto, m.lower(), "auth_failed")
            assert after[k] - before[k] == per_mech, (k, after[k] - before[k])
            assert after[(proto, m.lower(), "unavailable")] == before[(proto, m.lower(), "unavailable")]
            assert after[(proto, m.lower(), "ok")] == before[(proto, m.lower(), "ok")]


def test_error_challenge_answered_with_anything(oauth):
    """The client's answer to the error challenge can be anything (RFC 7628 says the
    dummy; a client may also cancel with ``*``): the failure comes after it."""
    p = oauth.off
    tok = oauth.issuer.mint("alice", key="rogue")
    tagged, challenges, r = raw_imap_oauth(p, "OAUTHBEARER", "alice", tok, answer="*")
    try:
        assert challenges and c.is_tagged_no_or_bad(tagged, "a1"), r.dump()
        # the connection is still usable: a good token logs in
        good = osv.oauthbearer("alice", oauth.issuer.mint("alice"))
        tagged, _ = r.command("a2", f"AUTHENTICATE OAUTHBEARER {b64(good)}")
        assert c.is_tagged_ok(tagged, "a2"), r.dump()
    finally:
        r.close()
    conn = c.pop3_connect(IP, p.port["pop3s"], "implicit", p.client_context())
    try:
        line, challenges = pop3_auth(conn, "XOAUTH2", osv.xoauth2("alice", tok), answer="*")
        assert challenges and line.startswith(b"-ERR"), (line, challenges)
        # the connection is still usable: a good token logs in
        line, _ = pop3_auth(conn, "XOAUTH2", osv.xoauth2("alice", oauth.issuer.mint("alice")))
        assert line.startswith(b"+OK"), line
        assert c.pop3_subject(conn) == "hello from north"
    finally:
        pop3_quit(conn)


INVALID = "Invalid or expired token"


def test_verification_on_cutover_refuses_bad_tokens(oauth):
    p, north = oauth.on, oauth.north.dovecot
    lines0, failed_logins0 = len(north.oauth2_lines()), len(north.failed_logins())
    logins0 = len(north.logins())
    failed0 = {m: by_mech(p, "imap", m.lower(), "auth_failed") for m in MECHS}
    tokens = bad_tokens(oauth.issuer)
    tokens["not-a-jwt"] = "opaque-e2e-token-0123456789"
    tokens["unknown-kid"] = oauth.issuer.mint("alice", kid="e2e-rs256-unknown")
    tokens.update(osv.forged_tokens(oauth.issuer, "alice"))  # alg none, HS256 with the public key
    # the right key, but the JWK says RS256: never used for PS256
    tokens["jwk-alg-mismatch"] = oauth.issuer.mint("alice", alg="PS256", kid=osv.KID)

    def refused(name, tok, mech, proto):
        """cutover's own refusal: no error challenge, the failure at once."""
        if proto == "imap":
            tagged, challenges, r = raw_imap_oauth(p, mech, "alice", tok)
            r.close()
            assert tagged.startswith(b"a1 NO [AUTHENTICATIONFAILED]") and INVALID.encode() in tagged, (
                name, mech, r.dump())
            assert challenges == [], (name, mech, challenges)
        elif proto == "imaplib":
            conn, err, _ = imap_oauth(p, mech, "alice", tok)
            assert conn is None and INVALID in str(err), (name, mech, err)
        elif proto == "pop3":
            conn, line, _ = pop3_oauth(p, mech, "alice", tok)
            pop3_quit(conn)
            assert line.startswith(b"-ERR [AUTHENTICATIONFAILED]") and INVALID.encode() in line, (
                name, mech, line)
        else:
            code, text, _ = smtp_oauth(p, mech, "alice", tok)
            assert code == 535 and text.startswith("5.7.8"), (name, mech, code, text)
    in_parallel([functools.partial(refused, name, tok, mech, proto)
                 for name, tok in tokens.items() for mech in MECHS
                 for proto in ("imap", "imaplib", "pop3", "smtp")])
    # none of them reached Dovecot
    assert north.oauth2_lines()[lines0:] == []
    assert north.failed_logins()[failed_logins0:] == []
    for m in MECHS:
        assert by_mech(p, "imap", m.lower(), "auth_failed") == failed0[m] + 2 * len(tokens), m

    # a good token passes, on every protocol
    tok = oauth.issuer.mint("alice")
    assert imap_oauth_which(p, "OAUTHBEARER", "alice", tok) == "hello from north"
    conn, line, _ = pop3_oauth(p, "XOAUTH2", "alice", tok)
    try:
        assert line.startswith(b"+OK"), line
    finally:
        pop3_quit(conn)
    tok_mail = c.token("verified")
    code, text, _ = smtp_oauth(p, "XOAUTH2", "alice", tok, send_token=tok_mail)
    assert code == 235, (code, text)
    oauth.north.sink.wait_for(tok_mail)
    assert len(north.logins()) >= logins0 + 3


@pytest.mark.parametrize("mech", MECHS)
def test_verification_on_identity_must_match_claim(oauth, mech):
    """A valid token of alice presented as joeuser (GS2 a= / user=) is refused by
    cutover; with verification off Dovecot refuses it (test above)."""
    p, north = oauth.on, oauth.north.dovecot
    lines0, failed_logins0 = len(north.oauth2_lines()), len(north.failed_logins())
    tok = oauth.issuer.mint("alice")
    tagged, challenges, r = raw_imap_oauth(p, mech, "joeuser", tok)
    r.close()
    assert tagged.startswith(b"a1 NO [AUTHENTICATIONFAILED]"), r.dump()
    conn, line, _ = pop3_oauth(p, mech, "joeuser", tok)
    pop3_quit(conn)
    assert line.startswith(b"-ERR [AUTHENTICATIONFAILED]"), line
    code, text, _ = smtp_oauth(p, mech, "joeuser", tok)
    assert code == 535 and text.startswith("5.7.8"), (code, text)
    assert north.oauth2_lines()[lines0:] == [] and north.failed_logins()[failed_logins0:] == []
    # bob's token as bob routes to south; as alice it is refused (not sent to north)
    tagged, _, r = raw_imap_oauth(p, mech, "alice", oauth.issuer.mint("bob"))
    r.close()
    assert tagged.startswith(b"a1 NO [AUTHENTICATIONFAILED]"), r.dump()


def test_verification_on_without_gs2_identity_the_claim_routes(oauth):
    """OAUTHBEARER without ``a=`` (``n,,``): with verification on, the verified ``email``
    claim is the user, so bob's token routes to south. cutover replays the client's
    message unchanged, and Dovecot 2.3's OAUTHBEARER requires ``a=`` ("Missing username
    or token"): south refuses it, and the client gets an authentication failure (not an
    unavailability). Without verification there is no identity to route by: refused
    before any backend."""
    p, south = oauth.on, oauth.south.dovecot
    tok = oauth.issuer.mint("bob")
    failed0 = len(south.failed_logins())
    unavailable0 = by_mech(p, "imap", "oauthbearer", "unavailable")
    tagged, _, r = raw_imap_oauth(p, "OAUTHBEARER", None, tok, message=osv.oauthbearer(None, tok))
    r.close()
    print(f"\n[oauth] OAUTHBEARER without a= (verification on) via south: {tagged!r}")
    if not c.is_tagged_ok(tagged, "a1"):
        assert c.is_tagged_no(tagged, "a1"), r.dump()
        lines = c.wait_for(lambda: south.failed_logins()[failed0:], 5,
                           what="south to log the refused login")
        assert "method=OAUTHBEARER" in lines[0], lines
        assert by_mech(p, "imap", "oauthbearer", "unavailable") == unavailable0
    # XOAUTH2 always names the user; a token for bob as bob works on the verifying proxy
    assert imap_oauth_which(p, "XOAUTH2", "bob", tok) == "hello from south"

    off, north_failed0 = oauth.off, len(oauth.north.dovecot.failed_logins())
    south_failed0 = len(south.failed_logins())
    tagged, _, r = raw_imap_oauth(off, "OAUTHBEARER", None, tok, message=osv.oauthbearer(None, tok))
    r.close()
    assert c.is_tagged_no(tagged, "a1"), r.dump()
    time.sleep(0.3)
    assert south.failed_logins()[south_failed0:] == []
    assert oauth.north.dovecot.failed_logins()[north_failed0:] == []


def test_verification_on_audience_list(oauth):
    """``aud`` may be a list: one of them must be the audience."""
    p = oauth.on
    tok = oauth.issuer.mint("alice", aud=["account", "mail"])
    assert imap_oauth_which(p, "XOAUTH2", "alice", tok) == "hello from north"
    tok = oauth.issuer.mint("alice", aud=["account", "other-app"])
    tagged, _, r = raw_imap_oauth(p, "XOAUTH2", "alice", tok)
    r.close()
    assert tagged.startswith(b"a1 NO [AUTHENTICATIONFAILED]") and INVALID.encode() in tagged, r.dump()


def test_verification_on_token_without_exp_is_refused_by_cutover(oauth):
    """A token without ``exp`` never expires: cutover refuses it (``oauth.require_exp``,
    on by default; RFC 9068 requires ``exp`` of access tokens) before any backend sees it,
    as Dovecot itself would ("Missing 'exp' field")."""
    p, north = oauth.on, oauth.north.dovecot
    lines0 = len(north.oauth2_lines())
    tok = oauth.issuer.mint("alice", omit=("exp",))
    tagged, _, r = raw_imap_oauth(p, "XOAUTH2", "alice", tok)
    r.close()
    assert tagged.startswith(b"a1 NO [AUTHENTICATIONFAILED]") and INVALID.encode() in tagged, r.dump()
    assert north.oauth2_lines()[lines0:] == [], "the token reached Dovecot"


class _JwksHandler(http.server.BaseHTTPRequestHandler):
    body = b""
    hits = 0

    def do_GET(self):
        type(self).hits += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_verification_with_jwks_url(env, oauth):
    """``oauth.jwks_url`` (http:// on loopback): a third proxy fetches the provider's
    JWKS from a small HTTP server on 127.0.0.64 at the first login; a good token passes, a
    rogue one is refused by cutover; an unknown kid does not trigger another fetch within
    30 s."""
    handler = type("Handler", (_JwksHandler,), {"body": oauth.issuer.jwks_path.read_bytes(), "hits": 0})
    httpd = http.server.ThreadingHTTPServer((JWKS_IP, 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    ports = osv.proxy_ports(14)
    cfg = osv.oauth_proxy_config(env, oauth.issuer, ports, verify=False,
                                 jwks_url=f"http://{JWKS_IP}:{httpd.server_address[1]}/realms/mail/certs")
    proxy = osv.OAuthProxy(env, harness.resolve_cutover_bin(), "url", cfg, ports)
    issuer = oauth.issuer
    issuer.add_key("url-next", "e2e-rs256-url", publish=False)
    try:
        proxy.start()
        assert imap_oauth_which(proxy, "OAUTHBEARER", "alice", issuer.mint("alice")) == "hello from north"
        tagged, _, r = raw_imap_oauth(proxy, "XOAUTH2", "alice", issuer.mint("alice", key="rogue"))
        r.close()
        assert tagged.startswith(b"a1 NO [AUTHENTICATIONFAILED]") and INVALID.encode() in tagged, r.dump()
        assert handler.hits == 1, handler.hits
        # the provider publishes a new key: a token naming its kid does not make cutover
        # fetch again within 30 s of the last fetch (src/oauth.rs KID_REFRESH_MIN), so
        # right after the first fetch it is refused, and the URL is not hammered
        issuer.trust("url-next", "RS256", "e2e-rs256-url")
        handler.body = issuer.jwks_path.read_bytes()
        tok = issuer.mint("alice", key="url-next", kid="e2e-rs256-url")
        for _ in range(3):
            tagged, _, r = raw_imap_oauth(proxy, "XOAUTH2", "alice", tok)
            r.close()
            assert tagged.startswith(b"a1 NO [AUTHENTICATIONFAILED]") and INVALID.encode() in tagged, r.dump()
        assert handler.hits == 1, handler.hits
    finally:
        proxy.stop()
        httpd.shutdown()
        httpd.server_close()


# --------------------------------------------------------------------------
# 7. a backend without the mechanism
# --------------------------------------------------------------------------


def test_backend_without_mechanism_fallback_or_unavailable(env, oauth, servers):
    p = oauth.off
    # carol: pool new (password-only Dovecot), fallback north
    new_logins = len(servers.new.imap.logins("carol"))
    assert imap_oauth_which(p, "OAUTHBEARER", "carol", oauth.issuer.mint("carol")) == "hello from north"
    conn, line, _ = pop3_oauth(p, "XOAUTH2", "carol", oauth.issuer.mint("carol"))
    try:
        assert line.startswith(b"+OK"), line
        assert c.pop3_subject(conn) == "hello from north"
    finally:
        pop3_quit(conn)
    tok_mail = c.token("fallback-carol")
    code, text, _ = smtp_oauth(p, "XOAUTH2", "carol", oauth.issuer.mint("carol"), send_token=tok_mail)
    assert code == 235, (code, text)
    oauth.north.sink.wait_for(tok_mail)
    assert servers.new.imap.logins("carol")[new_logins:] == []
    # her password still logs in at her pool: the fallback is per mechanism
    assert c.imap_which_host(IP, p.port["imaps"], "carol", harness.USERS["carol"], "implicit",
                             env.ssl_context()) == "hello from new"
    assert metric(p, "cutover_backend_connect_failures_total", pool="new", reason="no_mechanism") >= 1

    # dave: pool new without a fallback: a temporary failure, not an auth failure
    unavailable0 = {proto: by_mech(p, proto, "oauthbearer", "unavailable") + by_mech(p, proto, "xoauth2", "unavailable")
                    for proto in ("imap", "pop3", "smtp")}
    tok = oauth.issuer.mint("dave")
    for mech in MECHS:
        tagged, challenges, r = raw_imap_oauth(p, mech, "dave", tok)
        r.close()
        assert tagged.startswith(b"a1 NO [UNAVAILABLE]") and not challenges, r.dump()
        conn, line, _ = pop3_oauth(p, mech, "dave", tok)
        pop3_quit(conn)
        assert line.startswith(b"-ERR [SYS/TEMP]"), line
        code, text, _ = smtp_oauth(p, mech, "dave", tok)
        assert code == 454 and text.startswith("4.7.0"), (code, text)
    for proto in ("imap", "pop3", "smtp"):
        now = by_mech(p, proto, "oauthbearer", "unavailable") + by_mech(p, proto, "xoauth2", "unavailable")
        assert now == unavailable0[proto] + 2, (proto, now, unavailable0[proto])


# --------------------------------------------------------------------------
# 8. pop-before-smtp pools
# --------------------------------------------------------------------------


def test_oauth_smtp_for_pop_before_smtp_pool(oauth, servers):
    p = oauth.off
    refused0 = by_mech(p, "smtp", "xoauth2", "refused")
    tok_mail = c.token("hybrid-frank")
    code, text, _ = smtp_oauth(p, "XOAUTH2", "frank", oauth.issuer.mint("frank"), send_token=tok_mail)
    assert code == 535, (code, text)
    assert "5.7.8 OAuth is not accepted for this account here: log in with a password" in text, text
    assert by_mech(p, "smtp", "xoauth2", "refused") == refused0 + 1
    # grace: the same pool, but her route's fallback (north) takes OAuth
    tok_mail2 = c.token("hybrid-grace")
    code, text, _ = smtp_oauth(p, "OAUTHBEARER", "grace", oauth.issuer.mint("grace"), send_token=tok_mail2)
    assert code == 235, (code, text)
    oauth.north.sink.wait_for(tok_mail2)
    time.sleep(0.3)
    assert servers.sink_for(tok_mail) == [] and not oauth.north.sink.find(tok_mail)
    assert not oauth.north.relay.find(tok_mail) and not oauth.north.relay.find(tok_mail2)


def test_pop3_oauth_login_opens_bridge_window(env, oauth, servers):
    p = oauth.off

    def mail_code():
        return c.smtp_mail_code(smtplib.SMTP(IP, p.port["smtp-compat"], local_hostname="bridge.e2e.test",
                                             timeout=c.IO_TIMEOUT, source_address=(BRIDGE_SOURCE, 0)),
                                env.ssl_context(), mail_from="frank@example.net")
    code, _ = mail_code()
    assert code == 530, code
    conn, line, _ = pop3_oauth(p, "XOAUTH2", "frank", oauth.issuer.mint("frank"), source=BRIDGE_SOURCE)
    try:
        assert line.startswith(b"+OK"), line
        assert c.pop3_subject(conn) == "hello from north"
    finally:
        pop3_quit(conn)
    tok = c.token("bridged-oauth")
    cp = c.swaks(IP, p.port["smtp-compat"], mail_from="frank@example.net", to="friend@example.org",
                 tls="starttls", ca=env.ca, subject=tok, source=BRIDGE_SOURCE)
    assert cp.returncode == 0, cp.text
    msg = oauth.north.relay.wait_for(tok)
    assert msg.mail_from == "frank@example.net" and msg.rcpt_tos == ["friend@example.org"], msg
    assert by_mech(p, "smtp", "bridged", "ok") >= 1


# --------------------------------------------------------------------------
# 9. limits.max_sasl_token
# --------------------------------------------------------------------------


def test_max_sasl_token(oauth):
    p, north = oauth.off, oauth.north.dovecot

    def token_with_b64_len(target):
        # pad a claim until the base64 of the XOAUTH2 message is about ``target`` long
        base = len(base64.b64encode(osv.xoauth2("alice", oauth.issuer.mint("alice", extra={"pad": ""}))))
        pad = max(0, (target - base) * 9 // 16)  # 1 claim byte = 4/3 token = 16/9 base64
        return oauth.issuer.mint("alice", extra={"pad": "x" * pad})

    small = token_with_b64_len(3000)
    small_len = len(base64.b64encode(osv.xoauth2("alice", small)))
    assert 2500 < small_len < osv.MAX_SASL_TOKEN, small_len
    conn, line, _ = pop3_oauth(p, "XOAUTH2", "alice", small, initial=False)
    try:
        assert line.startswith(b"+OK"), line
    finally:
        pop3_quit(conn)

    big = token_with_b64_len(5000)
    big_len = len(base64.b64encode(osv.xoauth2("alice", big)))
    assert big_len > osv.MAX_SASL_TOKEN, big_len
    lines0 = len(north.oauth2_lines())
    logins0 = len(north.logins())
    tagged, _, r = raw_imap_oauth(p, "XOAUTH2", "alice", big)
    r.close()
    assert c.is_tagged_no_or_bad(tagged, "a1"), r.dump()
    conn, line, _ = pop3_oauth(p, "XOAUTH2", "alice", big, initial=False)
    pop3_quit(conn)
    assert line.startswith(b"-ERR"), line
    code, text, _ = smtp_oauth(p, "XOAUTH2", "alice", big)
    assert 500 <= code < 600, (code, text)
    print(f"\n[oauth] {big_len} base64 bytes > max_sasl_token: IMAP {tagged!r}, POP3 {line!r}, "
          f"SMTP {code} {text!r}")
    time.sleep(0.3)
    assert north.oauth2_lines()[lines0:] == [] and len(north.logins()) == logins0


def test_short_opaque_token_goes_in_the_initial_response(oauth):
    """A short bearer token (not a JWT) keeps the backend's AUTH line short: cutover sends
    it as the initial response (POP3 <= 255, SMTP <= 500 octets) instead of after ``+``
    / ``334``; Dovecot refuses it ("Not a JWT token") with the error challenge round."""
    p, north = oauth.off, oauth.north.dovecot
    tok = "opaque-e2e-token-0123456789"
    assert len(f"AUTH OAUTHBEARER {base64.b64encode(osv.oauthbearer('alice', tok)).decode()}") < 255
    lines0 = len(north.oauth2_lines())
    in_parallel([functools.partial(refused_by_dovecot, p, proto, mech, tok)
                 for mech in MECHS for proto in ("imap", "pop3", "smtp")])
    lines = north.oauth2_lines()[lines0:]
    assert len(lines) == 3 * len(MECHS) and all("Not a JWT token" in l for l in lines), lines


@pytest.mark.parametrize("alg", ["PS256", "ES256"])
def test_other_signature_algorithms(oauth, alg):
    """PS256 and ES256 tokens pass cutover's verification and Dovecot's; the same token
    signed by the wrong key fails in cutover."""
    p = oauth.on
    tok = oauth.issuer.mint("alice", alg=alg)
    assert imap_oauth_which(p, "OAUTHBEARER", "alice", tok) == "hello from north"
    assert imap_oauth_which(oauth.off, "XOAUTH2", "alice", tok) == "hello from north"
    header, payload, sig = tok.split(".")
    forged = f"{header}.{payload}.{sig[:-8]}{'A' * 8 if not sig.endswith('A' * 8) else 'B' * 8}"
    tagged, _, r = raw_imap_oauth(p, "XOAUTH2", "alice", forged)
    r.close()
    assert tagged.startswith(b"a1 NO [AUTHENTICATIONFAILED]") and INVALID.encode() in tagged, r.dump()


def test_jwks_file_key_rotation(oauth):
    """A token signed by a key the JWKS does not have yet is refused by cutover; once the
    provider publishes the key (jwks.json replaced, and Dovecot's key file added), the
    same token passes without a restart or reload."""
    p, issuer = oauth.on, oauth.issuer
    issuer.add_key("next", "e2e-rs256-2", publish=False)
    tok = issuer.mint("alice", key="next", kid="e2e-rs256-2")
    tagged, _, r = raw_imap_oauth(p, "OAUTHBEARER", "alice", tok)
    r.close()
    assert tagged.startswith(b"a1 NO [AUTHENTICATIONFAILED]") and INVALID.encode() in tagged, r.dump()
    t0 = time.monotonic()
    issuer.trust("next", "RS256", "e2e-rs256-2")

    def passes():
        tagged, _, r = raw_imap_oauth(p, "OAUTHBEARER", "alice", tok)
        r.close()
        return c.is_tagged_ok(tagged, "a1")
    c.wait_for(passes, 15, interval=0.5, what="cutover to take the new key from jwks.json")
    print(f"\n[oauth] new JWKS key used {time.monotonic() - t0:.1f}s after the file changed")


# --------------------------------------------------------------------------
# 10. no token in the logs or metrics
# --------------------------------------------------------------------------


def fingerprints(secret):
    """Strings that any log line holding ``secret`` (a token) shows: its signature and
    payload segments, and 32 characters of its base64 at each of the 3 alignments."""
    sec = secret.encode() if isinstance(secret, str) else secret
    out = []
    if isinstance(secret, str) and secret.count(".") == 2:
        header, payload, sig = secret.split(".")
        out += [sig[:40], payload[:40]]
    for j in range(3):
        out.append(base64.b64encode(sec[j:j + 24]).decode())
    return out


def test_tokens_never_logged(oauth):
    # a few more logins of every kind on both proxies, at debug level
    for p in oauth.proxies:
        tok = oauth.issuer.mint("alice")
        for mech in MECHS:
            tagged, _, r = raw_imap_oauth(p, mech, "alice", tok)
            r.close()
            assert c.is_tagged_ok(tagged, "a1"), r.dump()
            bad = oauth.issuer.mint("alice", key="rogue")
            tagged, _, r = raw_imap_oauth(p, mech, "alice", bad)
            r.close()
            conn, line, _ = pop3_oauth(p, mech, "alice", tok, initial=False)
            pop3_quit(conn)
            smtp_oauth(p, mech, "alice", tok)
            smtp_oauth(p, mech, "alice", bad)
        cp = curl_oauth(p, f"imaps://{IP}:{p.port['imaps']}/", "alice", tok)
        assert cp.returncode == 0, cp.text
    assert "DEBUG" in oauth.off.log_text() or "debug" in oauth.off.log_text().lower()
    leaks = []
    for p in oauth.proxies:
        text = p.log_text() + "\n" + p.metrics()
        for tok in oauth.issuer.minted:
            leaks += [(p.name, "token", f) for f in fingerprints(tok) if f in text]
        for sent in SENT_B64:
            chunk = sent[len(sent) // 2: len(sent) // 2 + 32]
            if chunk in text:
                leaks.append((p.name, "sasl base64", chunk))
    assert len(oauth.issuer.minted) > 20
    # the fingerprints do find a token in the base64 of a SASL message
    some = oauth.issuer.minted[-1]
    for msg in (osv.oauthbearer("alice", some), osv.xoauth2("alice", some), osv.xoauth2("al", some)):
        assert any(f in base64.b64encode(msg).decode() for f in fingerprints(some))
    assert leaks == [], leaks[:10]


# --------------------------------------------------------------------------
# 7b. a server without the mechanism inside a pool (last: it fails, see its note)
# --------------------------------------------------------------------------


def test_server_without_mechanism_fails_over_within_the_pool(env, oauth, servers):
    """Pool ``mixed`` (balance first) lists new (no OAuth) before north: heidi's OAuth
    logins fail over to north, and new stays up for password logins: it lacked a
    mechanism for those logins only, it is not broken.

    CUTOVER BUG (fails with target/debug/cutover of 2026-12-06): the no-mechanism result
    is fed to passive health ("backend unavailable ... reason=\"no_mechanism\"" is
    followed by "backend::health: backend down pool=mixed protocol=imap
    server=127.0.0.10:143"): ``cutover_backend_up`` drops to 0 for a healthy server, and
    password logins of the pool skip it (heidi's password login lands on north instead of
    new) until it is seen up again. In a one-server pool (``new``) the gauge also drops to
    0 after every OAuth login (the next password login there brings it back). Expected:
    NoMechanism makes the server unavailable for that login only (a failover), never a
    health failure."""
    p = oauth.off
    servers.new.add_user("heidi", "heidi-pw")
    try:
        c.wait_for(lambda: c.imap_which_host(harness.NEW_IP, 993, "heidi", "heidi-pw", "implicit",
                                             env.ssl_context()) == "hello from new",
                   5, what="new to know heidi")
        off = p.log_size()
        failovers0 = metric(p, "cutover_failovers_total", pool="mixed", protocol="imap")
        tok = oauth.issuer.mint("heidi")
        assert imap_oauth_which(p, "OAUTHBEARER", "heidi", tok) == "hello from north"
        conn, line, _ = pop3_oauth(p, "XOAUTH2", "heidi", tok)
        try:
            assert line.startswith(b"+OK") and c.pop3_subject(conn) == "hello from north", line
        finally:
            pop3_quit(conn)
        tok_mail = c.token("mixed-heidi")
        code, text, _ = smtp_oauth(p, "OAUTHBEARER", "heidi", tok, send_token=tok_mail)
        assert code == 235, (code, text)
        oauth.north.sink.wait_for(tok_mail)
        assert metric(p, "cutover_failovers_total", pool="mixed", protocol="imap") == failovers0 + 1
        # new did nothing wrong: still up, still the first choice for a password
        up = {proto: metric(p, "cutover_backend_up", pool="mixed", protocol=proto,
                            server=f"{harness.NEW_IP}:{port}")
              for proto, port in (("imap", 143), ("pop3", 110), ("smtp", 587))}
        pw_imap = c.imap_which_host(IP, p.port["imaps"], "heidi", "heidi-pw", "implicit",
                                    env.ssl_context())
        pw_pop3 = c.pop3_which_host(IP, p.port["pop3s"], "heidi", "heidi-pw", "implicit",
                                    env.ssl_context())
        marked_down = [l for l in p.log_since(off).splitlines() if "backend down" in l]
        assert (up, pw_imap, pw_pop3) == ({"imap": 1, "pop3": 1, "smtp": 1}, "hello from new",
                                          "hello from new"), (
            "a server without the OAuth mechanism was taken out of rotation for everyone: "
            f"cutover_backend_up {up}; heidi's password logins: IMAP {pw_imap!r}, POP3 "
            f"{pw_pop3!r}; log: {marked_down}")
    finally:
        servers.new.remove_user("heidi")
