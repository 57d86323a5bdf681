#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/ (run from anywhere; idempotent).

Input format (see src/fuzzing.rs): one settings byte, then the peer's bytes cut into
reads by 0xFF bytes (0xFF 0x00 is one 0xFF data byte). Each seed below is a realistic
transcript of what one side sends, as a list of reads; the settings byte is chosen by
predicate (TLS mode, plaintext auth, login outcomes, credentials) and is always a
printable character, so a seed file reads as "<settings><transcript>".

The config corpus is YAML text (no settings byte, no chunks).
"""

import hashlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SEP = 0xFF


def join(chunks):
    out = bytearray()
    for i, chunk in enumerate(chunks):
        if i:
            out.append(SEP)
        for b in chunk:
            out.append(b)
            if b == SEP:
                out.append(0)
    return bytes(out)


CANDIDATES = (
    [c for c in range(0x21, 0x7F) if chr(c).isalnum()]
    + [c for c in range(0x21, 0x7F) if not chr(c).isalnum()]
    + list(range(0x80, 0xFF))
    + list(range(0x00, 0x21))
)


def pick(pred):
    """The first settings byte matching pred: a letter or digit if one fits, then other
    printable characters, then the rest (0xFF is never a settings byte)."""
    for c in CANDIDATES:
        if pred(c):
            return c
    raise ValueError("no settings byte matches")


# --- settings predicates (they mirror src/fuzzing.rs) ---------------------------------
def tls(sel):
    return ["none", "starttls", "implicit"][sel % 3]


def server(t, plaintext_auth=False, first_outcome=None, default_limits=False, shutdown=False):
    """Client-facing targets: listener TLS, plaintext auth (bit 2), rotation start
    ((sel >> 3) % 5: 0 AuthFailed, 1 Unavailable, 2 AuthFailed+text, 3 Refused, 4 Ok),
    default limits (bit 6), shutting_down at the end (bit 7)."""

    def pred(sel):
        return (
            tls(sel) == t
            and bool(sel & 4) == plaintext_auth
            and (first_outcome is None or (sel >> 3) % 5 == first_outcome)
            and bool(sel & 0x40) == default_limits
            and bool(sel & 0x80) == shutdown
        )

    return pick(pred)


def backend(t, creds, plain=False, forward=False):
    """imap/pop3 backend targets: backend TLS, credentials ((sel >> 2) % 6: 0 probe,
    1 joe/s3cret, 2 user with space + CRLF password, 3 long password, 4 NUL + 8-bit,
    5 IMAP specials), PLAIN mechanism (bit 5), client address forwarding (bit 7)."""

    def pred(sel):
        return (
            tls(sel) == t
            and (sel >> 2) % 6 == creds
            and bool(sel & 0x20) == plain
            and bool(sel & 0x80) == forward
        )

    return pick(pred)


def imap_backend_settings(t, probe, id_forward=False, creds=1):
    """imap::fuzz_backend reads bit 2 as "probe" and bit 3 as ID forwarding; the generic
    driver the same, and 1 + (sel >> 4) % 5 as the credentials when not probing."""

    def pred(sel):
        return (
            tls(sel) == t
            and bool(sel & 4) == probe
            and bool(sel & 8) == id_forward
            and (probe or 1 + (sel >> 4) % 5 == creds)
        )

    return pick(pred)


def smtp_backend(t, mode, plain=False, xclient=False):
    """smtp backend: (sel >> 2) % 8: 0 probe, 1 no-auth, 2 joe/s3cret, 3 user with space
    + CRLF password, 4 long password, 5 NUL + 8-bit, 6 IMAP specials, 7 no-auth;
    PLAIN mechanism (bit 5), XCLIENT (bit 7)."""

    def pred(sel):
        return (
            tls(sel) == t
            and (sel >> 2) % 8 == mode
            and bool(sel & 0x20) == plain
            and bool(sel & 0x80) == xclient
        )

    return pick(pred)


# --- IMAP, client side ----------------------------------------------------------------
IMAP_SERVER = {
    "capability_login": (server("none", True), [b"a1 CAPABILITY\r\na2 LOGIN joe s3cret\r\n"]),
    "login_ok_pipelined": (
        server("none", True, first_outcome=4),
        [b"a1 LOGIN joe s3cret\r\na2 SELECT INBOX\r\n", b"a3 FETCH 1 BODY[]\r\n"],
    ),
    "login_literals": (
        server("implicit", first_outcome=4),
        [b"a1 LOGIN {3}\r\n", b"joe {6}\r\n", b"s3cret\r\n", b"a2 SELECT INBOX\r\n"],
    ),
    "login_literal_plus": (
        server("implicit"),
        [b"a1 LOGIN {3+}\r\njoe {6+}\r\ns3cret\r\na2 LOGIN {3}\r\n", b"joe \"pw\"\r\n"],
    ),
    "login_quoted_specials": (
        server("implicit"),
        [b'a1 LOGIN "jo\\"e" "p\\\\w \\"x"\r\n', b"a2 LOGIN \"\" \"\"\r\n"],
    ),
    "login_8bit_literal": (
        server("implicit", first_outcome=2),
        [b"a1 LOGIN {5}\r\n", "j\u00f6e@".encode()[:5] + b" {4}\r\n", b"\x00\xff\r\n\r\n"],
    ),
    "authenticate_plain": (
        server("implicit", first_outcome=4),
        [b"a1 AUTHENTICATE PLAIN\r\n", b"AGpvZQBzM2NyZXQ=\r\n", b"a2 NOOP\r\n"],
    ),
    "authenticate_plain_ir": (
        server("implicit"),
        [b"a1 AUTHENTICATE PLAIN AGpvZQBzM2NyZXQ=\r\na2 AUTHENTICATE PLAIN =\r\n"],
    ),
    "authenticate_plain_authzid": (
        server("implicit"),
        [b"a1 AUTHENTICATE PLAIN YWRtaW4Aam9lAHMzY3JldA==\r\n", b"a2 authenticate plain\r\n*\r\n"],
    ),
    "authenticate_login": (
        server("implicit", first_outcome=4),
        [b"a1 AUTHENTICATE LOGIN\r\n", b"am9l\r\n", b"czNjcmV0\r\n"],
    ),
    "starttls_trailing_one_write": (
        server("starttls"),
        [b"A STARTTLS\r\nXYZQW NOOP\r\n", b"a2 CAPABILITY\r\na3 LOGIN joe s3cret\r\n"],
    ),
    "starttls_trailing_two_writes": (
        server("starttls"),
        [b"A STARTTLS\r\n", b"XYZQW NOOP\r\n", b"a2 STARTTLS\r\na3 LOGIN joe s3cret\r\n"],
    ),
    "starttls_then_login": (
        server("starttls", first_outcome=4),
        [b"a0 CAPABILITY\r\na1 LOGIN joe s3cret\r\na2 STARTTLS\r\n", b"a3 CAPABILITY\r\n", b"a4 LOGIN joe s3cret\r\n"],
    ),
    "starttls_on_implicit": (server("implicit"), [b"a1 STARTTLS\r\na2 STARTTLS\r\n"]),
    "id_nil_logout": (
        server("none"),
        [b'a1 ID ("name" "Thunderbird" "version" "115.0" "os" NIL)\r\na2 ID NIL\r\n', b"a3 NOOP\r\na4 LOGOUT\r\n"],
    ),
    "id_literal": (server("implicit"), [b'a1 ID ("a" {2+}\r\nxy)\r\n', b'a2 ID ("b" {3}\r\n', b"xyz)\r\n"]),
    "huge_literal": (server("implicit"), [b"a1 LOGIN joe {4294967296}\r\n", b"a2 LOGIN {150+}\r\n"]),
    "not_permitted": (server("none"), [b"a1 SELECT INBOX\r\nb7 FOO {5+}\r\nc1 NOOP\r\n\r\n\n* x\r\n"]),
    "auth_failures": (
        server("implicit", first_outcome=0),
        [b"a1 LOGIN joe bad1\r\na2 LOGIN joe bad2\r\n", b"a3 LOGIN joe bad3\r\na4 LOGIN joe bad4\r\n"],
    ),
    "overlong_line": (server("implicit"), [b"a1 LOGIN " + b"x" * 300 + b"\r\n"]),
    "bare_lf": (server("none", True), [b"a1 CAPABILITY\na2 LOGIN joe s3cret\n"]),
    "shutdown": (server("starttls", shutdown=True), [b"a1 NOOP\r\na2 LOGIN {3}\r\n"]),
}

# --- IMAP, backend side ---------------------------------------------------------------
DOVECOT_CAPS = b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN"
IMAP_BACKEND = {
    "dovecot_starttls_login": (
        imap_backend_settings("starttls", False),
        [
            b"* OK [CAPABILITY " + DOVECOT_CAPS + b"] Dovecot ready.\r\n",
            b"C1 OK Begin TLS negotiation now.\r\n",
            b"* CAPABILITY IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ AUTH=PLAIN\r\nC2 OK Pre-login capabilities listed.\r\n",
            b"C3 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n* 3 EXISTS\r\n",
        ],
    ),
    "starttls_trailing_caps": (
        imap_backend_settings("starttls", False),
        [
            b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] hi\r\n",
            b"C1 OK begin\r\n* CAPABILITY IMAP4REV1 AUTH=PLAIN\r\n",
            b"* CAPABILITY IMAP4rev1 LITERAL+ ID\r\nC2 OK done\r\n",
            b"C3 OK done\r\n",
        ],
    ),
    "starttls_refused": (imap_backend_settings("starttls", False), [b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n", b"C1 BAD no\r\n"]),
    "starttls_hidden": (imap_backend_settings("starttls", False), [b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n"]),
    "preauth": (imap_backend_settings("none", False), [b"* PREAUTH [CAPABILITY IMAP4rev1] logged in already\r\n"]),
    "bye_greeting": (imap_backend_settings("none", False), [b"* BYE [UNAVAILABLE] go away\r\n"]),
    "plain_no_capability_in_greeting": (
        imap_backend_settings("none", False),
        [b"* OK hi\r\n", b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nC1 OK done\r\n", b"+ \r\n", b"C2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"],
    ),
    "login_literal_sync": (
        imap_backend_settings("none", False),
        [b"* OK [CAPABILITY IMAP4rev1] hi\r\n", b"+ Ready\r\n", b"+ Ready\r\n", b"C1 OK [CAPABILITY IMAP4rev1 IDLE] done\r\n"],
    ),
    "logindisabled_auth_login": (
        imap_backend_settings("none", False),
        [b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED AUTH=LOGIN] hi\r\n", b"+ VXNlcm5hbWU6\r\n", b"+ UGFzc3dvcmQ6\r\n", b"C1 OK done\r\n", b"C2 OK done\r\n"],
    ),
    "referral_alert": (
        imap_backend_settings("none", False),
        [
            b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n* OK [ALERT] maintenance {5}\r\n",
            b"C1 NO [REFERRAL imap://joe@other.example/] try elsewhere\r\n",
        ],
    ),
    "unavailable": (
        imap_backend_settings("none", False),
        [b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n", b"C1 NO [UNAVAILABLE] later\r\n"],
    ),
    "id_and_literal_skip": (
        imap_backend_settings("none", False, id_forward=True),
        [
            b"* OK [CAPABILITY IMAP4rev1 ID AUTH=PLAIN SASL-IR] hi\r\n",
            b'* ID ("name" {5}\r\nhello)\r\nC1 OK id\r\n',
            b"C2 OK done\r\n* CAPABILITY IMAP4rev1\r\nC3 OK caps\r\n",
        ],
    ),
    "probe": (
        imap_backend_settings("none", True),
        [b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=PLAIN] hi\r\n", b"* BYE logging out\r\nC1 OK bye\r\n"],
    ),
    "probe_starttls": (
        imap_backend_settings("starttls", True),
        [b"* OK hi\r\n", b"* CAPABILITY IMAP4rev1 STARTTLS\r\nC1 OK done\r\n", b"C2 OK go\r\n", b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nC3 OK done\r\n"],
    ),
}

# --- POP3 -----------------------------------------------------------------------------
POP3_SERVER = {
    "user_pass": (server("none", True), [b"CAPA\r\nUSER joe\r\n", b"PASS s3cret\r\n"]),
    "user_pass_ok_pipelined": (server("none", True, first_outcome=4), [b"USER joe\r\nPASS s3cret\r\nSTAT\r\n", b"RETR 1\r\n"]),
    "pass_spaces": (server("implicit"), [b"USER joe\r\nPASS two words \r\n"]),
    "stls_trailing": (server("starttls"), [b"STLS\r\nCAPA\r\n", b"USER joe\r\nPASS s3cret\r\n"]),
    "stls_two_writes": (server("starttls"), [b"STLS\r\n", b"CAPA\r\n", b"STLS\r\n"]),
    "stls_on_implicit": (server("implicit"), [b"STLS\r\nstls extra\r\n"]),
    "auth_plain": (server("implicit", first_outcome=4), [b"AUTH PLAIN\r\n", b"AGpvZQBzM2NyZXQ=\r\n"]),
    "auth_plain_ir": (server("implicit"), [b"AUTH PLAIN AGpvZQBzM2NyZXQ=\r\nAUTH PLAIN =\r\n"]),
    "auth_login": (server("implicit"), [b"auth login\r\n", b"am9l\r\n", b"czNjcmV0\r\n", b"AUTH LOGIN am9l\r\n*\r\n"]),
    "auth_list": (server("none"), [b"AUTH\r\nCAPA\r\nNOOP\r\nAPOP joe 0123456789abcdef\r\nAUTH XOAUTH2\r\n"]),
    "plaintext_refused": (server("starttls"), [b"USER joe\r\nPASS s3cret\r\nQUIT\r\n"]),
    "failures": (server("implicit", first_outcome=0), [b"USER a\r\nPASS b\r\nUSER a\r\nPASS c\r\nUSER a\r\nPASS d\r\nUSER a\r\nPASS e\r\n"]),
    "overlong": (server("implicit"), [b"USER " + b"A" * 120 + b"\r\n", b"\r\n\n\r"]),
}

POP3_BACKEND = {
    "dovecot_stls_plain": (
        backend("starttls", 1, plain=True),
        [
            b"+OK Dovecot ready.\r\n",
            b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nSTLS\r\nUSER\r\nSASL PLAIN\r\n.\r\n",
            b"+OK Begin TLS negotiation now.\r\n",
            b"+OK\r\nCAPA\r\nTOP\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n",
            b"+OK Logged in.\r\n+OK 2 messages\r\n",
        ],
    ),
    "stls_trailing": (
        backend("starttls", 1),
        [b"+OK hi\r\n", b"+OK\r\nSTLS\r\n.\r\n", b"+OK go\r\n+OK\r\nUSER\r\n.\r\n", b"+OK\r\nUSER\r\n.\r\n", b"+OK\r\n", b"+OK in\r\n"],
    ),
    "stls_refused": (backend("starttls", 1), [b"+OK hi\r\n+OK\r\nSTLS\r\n.\r\n-ERR no\r\n"]),
    "stls_not_offered": (backend("starttls", 1), [b"+OK hi\r\n", b"+OK\r\nUSER\r\n.\r\n"]),
    "user_pass": (backend("none", 1), [b"+OK POP3 ready\r\n", b"-ERR unknown command\r\n", b"+OK\r\n", b"+OK maildrop locked\r\n"]),
    "user_pass_rejected": (backend("none", 1), [b"+OK\r\n+OK\r\nUSER\r\n.\r\n+OK\r\n-ERR [AUTH] Authentication failed.\r\n"]),
    "sys_temp": (backend("none", 1, plain=True), [b"+OK\r\n+OK\r\nSASL PLAIN\r\n.\r\n", b"-ERR [SYS/TEMP] try later\r\n"]),
    "in_use": (backend("none", 1), [b"+OK\r\n+OK\r\nUSER\r\n.\r\n+OK\r\n-ERR [IN-USE] locked\r\n"]),
    "plain_continuation": (
        backend("none", 3, plain=True),
        [b"+OK\r\n+OK\r\nSASL PLAIN\r\n.\r\n", b"+ \r\n", b"+OK logged in\r\n"],
    ),
    "unsafe_credentials": (backend("none", 2), [b"+OK\r\n+OK\r\nUSER\r\n.\r\n", b"+OK\r\n"]),
    "nul_credentials": (backend("implicit", 4, plain=True), [b"+OK\r\n+OK\r\nSASL PLAIN\r\nUSER\r\n.\r\n"]),
    "no_mechanism": (backend("none", 1), [b"+OK\r\n+OK\r\nTOP\r\nSASL XOAUTH2\r\n.\r\n"]),
    "bad_greeting": (backend("none", 1), [b"-ERR [SYS/TEMP] overloaded\r\n"]),
    "dot_stuffed_capa": (backend("none", 0), [b"+OK\r\n+OK\r\n..hidden\r\nUSER\r\nIMPLEMENTATION x\r\n.\r\n"]),
    "probe_stls": (backend("starttls", 0), [b"+OK\r\n", b"+OK\r\nSTLS\r\n.\r\n+OK\r\n", b"+OK\r\nUSER\r\n.\r\n"]),
    "long_line": (backend("none", 1), [b"+OK " + b"x" * 3000 + b"\r\n"]),
}

# --- SMTP -----------------------------------------------------------------------------
SMTP_SERVER = {
    "ehlo_auth_plain_mail": (
        server("none", True, first_outcome=4),
        [b"EHLO client.example\r\n", b"AUTH PLAIN AGpvZQBzM2NyZXQ=\r\n", b"MAIL FROM:<joe@example.net>\r\nRCPT TO:<you@example.net>\r\nDATA\r\n"],
    ),
    "starttls_rset_trailing": (
        server("starttls"),
        [b"EHLO c\r\nSTARTTLS\r\nRSET\r\n", b"EHLO c\r\nAUTH PLAIN\r\n", b"AGpvZQBzM2NyZXQ=\r\n"],
    ),
    "starttls_two_writes": (server("starttls"), [b"EHLO c\r\n", b"STARTTLS\r\n", b"RSET\r\n", b"MAIL FROM:<a@b>\r\n"]),
    "starttls_twice_implicit": (server("implicit"), [b"EHLO c\r\nSTARTTLS\r\nSTARTTLS\r\n"]),
    "auth_login": (
        server("implicit", first_outcome=4),
        [b"EHLO c\r\nAUTH LOGIN\r\n", b"am9l\r\n", b"czNjcmV0\r\n", b"MAIL FROM:<joe@example.net>\r\n"],
    ),
    "auth_login_ir": (server("implicit"), [b"EHLO c\r\nAUTH LOGIN am9l\r\n", b"czNjcmV0\r\n", b"AUTH PLAIN\r\n*\r\n"]),
    "auth_before_ehlo": (server("implicit"), [b"AUTH PLAIN AGpvZQBzM2NyZXQ=\r\nHELO x\r\nAUTH PLAIN =\r\n"]),
    "mail_before_auth": (server("implicit"), [b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nBDAT 5 LAST\r\nhello", b"NOOP\r\nVRFY joe\r\nHELP\r\nQUIT\r\n"]),
    "bare_cr_lf": (server("none", True), [b"EHLO c\n", b"NOOP\rX\r\n", b"AUTH PLAIN AGpvZQBzM2NyZXQ=\n"]),
    "authzid_failures": (
        server("implicit", first_outcome=0),
        [b"EHLO c\r\nAUTH PLAIN YWRtaW4Aam9lAHB3\r\nAUTH PLAIN AGpvZQBh\r\n", b"AUTH PLAIN AGpvZQBi\r\nAUTH PLAIN AGpvZQBj\r\n"],
    ),
    "overlong": (server("implicit"), [b"EHLO " + b"a" * 300 + b"\r\n", b"NOOP\r\n"]),
}

SMTP_BACKEND = {
    "starttls_auth_plain": (
        smtp_backend("starttls", 2, plain=True),
        [
            b"220 mx.example ESMTP Postfix\r\n",
            b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n",
            b"220 2.0.0 Ready to start TLS\r\n",
            b"250-mx.example\r\n250-AUTH PLAIN LOGIN\r\n250-XCLIENT ADDR PORT NAME\r\n250 SMTPUTF8\r\n",
            b"235 2.7.0 Authentication successful\r\n",
        ],
    ),
    "starttls_trailing": (
        smtp_backend("starttls", 2),
        [b"220 mx\r\n250-mx\r\n250 STARTTLS\r\n", b"220 go\r\n250 AUTH LOGIN\r\n", b"250-mx\r\n250 AUTH LOGIN\r\n", b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n", b"235 ok\r\n"],
    ),
    "starttls_refused": (smtp_backend("starttls", 2), [b"220 mx\r\n250-mx\r\n250 STARTTLS\r\n454 4.7.0 TLS not available\r\n"]),
    "starttls_hidden": (smtp_backend("starttls", 2), [b"220 mx\r\n", b"250-mx\r\n250 AUTH PLAIN\r\n"]),
    "auth_rejected": (smtp_backend("none", 2, plain=True), [b"220 mx\r\n250-mx\r\n250 AUTH PLAIN\r\n", b"535 5.7.8 Authentication credentials invalid\r\n"]),
    "auth_temporary": (smtp_backend("none", 2), [b"220 mx\r\n250-mx\r\n250 AUTH=LOGIN\r\n", b"334 VXNlcm5hbWU6\r\n454 4.7.0 later\r\n"]),
    "xclient": (
        smtp_backend("none", 2, plain=True, xclient=True),
        [b"220 mx\r\n250-mx\r\n250-XCLIENT ADDR PORT\r\n250 AUTH PLAIN\r\n", b"220 mx again\r\n", b"250-mx\r\n250 AUTH PLAIN\r\n", b"235 ok\r\n"],
    ),
    "pop_before_smtp_noauth": (smtp_backend("none", 1), [b"220-mx\r\n220 legacy ESMTP\r\n", b"250 mx\r\n", b"250 ok\r\n"]),
    "helo_fallback": (smtp_backend("none", 1), [b"220 old\r\n", b"500 what\r\n", b"250 old\r\n"]),
    "probe": (smtp_backend("none", 0), [b"220 mx ESMTP\r\n250-mx\r\n250-SIZE 100\r\n250 CHUNKING\r\n221 bye\r\n"]),
    "bad_greeting": (smtp_backend("none", 2), [b"421 4.3.2 busy\r\n"]),
    "unsafe_credentials": (smtp_backend("none", 3), [b"220 mx\r\n250-mx\r\n250 AUTH LOGIN\r\n334 a\r\n334 b\r\n235 c\r\n"]),
    "long_password": (smtp_backend("none", 4, plain=True), [b"220 mx\r\n250-mx\r\n250 AUTH PLAIN\r\n334 \r\n235 ok\r\n"]),
}

# --- config ---------------------------------------------------------------------------
MINIMAL = b"""listeners:
  - { name: imap, protocol: imap, listen: "127.0.0.1:1143" }
pools:
  p:
    imap: { servers: ["127.0.0.1:143"] }
routes:
  - { pool: p }
"""

FULL = b"""hostname: mail.example.net
tls:
  certificates:
    - cert: certs/proxy.pem
      key: certs/proxy-key.pem
listeners:
  - name: imaps
    protocol: imap
    listen: "127.0.0.1:11993"
    tls: implicit
  - name: pop3
    protocol: pop3
    listen: "[::1]:11110"
    tls: starttls
    allow_plaintext_auth: false
  - name: submission
    protocol: smtp
    listen: "127.0.0.1:11587"
    tls: starttls
pools:
  new:
    balance: user-hash
    connect_timeout: 500ms
    login_timeout: 1m30s
    forward_client_address: true
    health: { interval: 5s, rise: 2, fall: 1, down_for: 30s }
    imap: { servers: ["imap.new.example:143"], tls: starttls, ca: certs/ca.pem, server_name: imap.new.example }
    pop3: { servers: ["127.0.0.10:995"], tls: implicit, ca: certs/ca.pem }
    smtp: { servers: ["127.0.0.10:587"], tls: starttls, ca: certs/ca.pem }
  legacy:
    balance: first
    imap: { servers: ["127.0.0.11:143", "127.0.0.12:143"] }
    pop3: { servers: ["127.0.0.11:110", "127.0.0.12:110"] }
    smtp: { servers: ["127.0.0.11:2525", "127.0.0.12:2525"], auth: pop-before-smtp }
routes:
  - { users: [joeuser, Alice], pool: new }
  - { domains: [NewDomain.test], pool: new }
  - { percent: 30, pool: new }
  - { pool: legacy }
users:
  local_domains: [example.net]
  case_insensitive: true
limits:
  max_line: 8192
  max_literal: 65536
  max_auth_failures: 3
  max_commands: 100
  preauth_timeout: 60s
shutdown:
  drain_timeout: 30s
metrics:
  listen: "127.0.0.1:19898"
"""

CONFIG = {
    "minimal.yaml": MINIMAL,
    "full.yaml": FULL,
    "bad_pool.yaml": MINIMAL.replace(b"{ pool: p }", b"{ pool: legcy }"),
    "bad_duration.yaml": MINIMAL + b"limits: { preauth_timeout: 99999999999999999999999h }\n",
    "bad_percent.yaml": MINIMAL.replace(b"- { pool: p }", b"- { percent: 300, pool: p }\n  - { pool: p }"),
    "pop_before_smtp_mismatch.yaml": b"""pools:
  legacy:
    pop3: { servers: ["a:110"] }
    smtp: { servers: ["a:2525", "b:2525"], auth: pop-before-smtp }
routes: [ { pool: legacy } ]
""",
    "missing_cert.yaml": b"tls: { certificates: [ { cert: nope.pem, key: /nonexistent/key.pem } ] }\n" + MINIMAL.replace(b'"127.0.0.1:1143" }', b'"127.0.0.1:1143", tls: implicit }'),
    "unknown_key.yaml": MINIMAL + b"colour: blue\n",
    "wrong_type.yaml": b"listeners: 5\npools: [1, 2]\nroutes: { a: b }\n",
    "anchors.yaml": b"""x: &a { servers: ["127.0.0.1:143"] }
pools:
  p: { imap: *a, pop3: *a }
routes: [ { pool: p } ]
""",
    "tabs_and_flow.yaml": b"{listeners: [{name: i, protocol: IMAP, listen: '0.0.0.0:0'}], pools: {}, routes: []}\n",
    "empty.yaml": b"",
    "comment_only.yaml": b"# nothing here\n---\n...\n",
    "multi_doc.yaml": MINIMAL + b"---\n" + MINIMAL,
    "bad_listen.yaml": MINIMAL.replace(b"127.0.0.1:1143", b"localhost:imap"),
    "demo_routes.yaml": None,  # filled from ../routes.yaml
}


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    for target, seeds in [
        ("imap_server", IMAP_SERVER),
        ("imap_backend", IMAP_BACKEND),
        ("pop3_server", POP3_SERVER),
        ("pop3_backend", POP3_BACKEND),
        ("smtp_server", SMTP_SERVER),
        ("smtp_backend", SMTP_BACKEND),
    ]:
        for name, (sel, chunks) in seeds.items():
            assert 0 <= sel < 0xFF, (target, name, sel)
            write(target, name, bytes([sel]) + join(chunks))
    # The alphabet target maps bytes: seed it with the same transcripts (mostly mapped to
    # other letters, but their shape and the word bytes >= 0x80 help) plus word strings.
    for name, (sel, chunks) in SMTP_SERVER.items():
        write("smtp_server_alphabet", name, bytes([sel]) + join(chunks))
    write("smtp_server_alphabet", "words_session", b"6" + bytes([0x80, 0x83, 0x89, 0x8A, 0x8E, 0x8F, 0x90, 0x95]))
    write("smtp_server_alphabet", "words_starttls", b"1" + bytes([0x80, 0x82, 0x94, 0x80, 0x84, 0xFF, 0x8E]))
    routes = open(os.path.join(HERE, "..", "routes.yaml"), "rb").read()
    for name, text in CONFIG.items():
        write("config", name, routes if text is None else text)
    n = sum(len(files) for _, _, files in os.walk(os.path.join(HERE, "corpus")))
    print(f"{n} seed files under {os.path.join(HERE, 'corpus')}")


if __name__ == "__main__":
    sys.exit(main())
