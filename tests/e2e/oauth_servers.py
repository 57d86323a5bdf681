"""Servers and tokens for ``test_oauth.py``: OAuth 2.0 logins (SASL OAUTHBEARER, RFC 7628,
and XOAUTH2) through cutover to real Dovecot instances that validate the bearer tokens
themselves (passdb oauth2, ``introspection_mode = local``).

Everything lives under the session's temp dir (``Env.root``)::

    oauth-issuer/private/        the test's signing keys (RSA 2048 and EC P-256, openssl
                                 genpkey; root only)
    oauth-issuer/keys/default/<alg>/<kid>
                                 public keys as PEM: Dovecot's local_validation_key_dict
                                 (fs:posix), looked up as <azp or "default">/<alg>/<kid>
    oauth-issuer/jwks.json       the same keys as a JWKS (cutover's oauth.jwks_file)
    north/, south/               passwd-file and maildirs of the two OAuth hosts
    north-imap-pop3-submission/  one Dovecot instance per host (dovecot.conf,
    south-imap-pop3-submission/  dovecot-oauth2.conf.ext, dovecot.log)
    north-sink/, south-sink/     the aiosmtpd sink each host's submission relays to
    north-relay-sink/ ...        the AUTH-less aiosmtpd on 2525 of each host
    oauth-proxy-off/             cutover without token verification (routes.yaml, proxy.log)
    oauth-proxy-on/              cutover with ``oauth:`` (jwks_file, issuer, audience, claim)

Addresses (loopback only)::

    127.0.0.60  "north": Dovecot IMAP 143, POP3 110, submission 587 (STARTTLS required,
                TLS cert backend.pem, verified by cutover as "localhost"),
                auth_mechanisms plain login oauthbearer xoauth2 (passwd-file for
                PLAIN/LOGIN, oauth2 for the OAuth mechanisms); sink on 2500
    127.0.0.61  "south": the same, but its IMAP does not offer SASL-IR (imap_capability)
    127.0.0.1   cutover "off": 12993 imaps, 12995 pop3s, 12465 submissions (implicit TLS),
                12143 imap and 12110 pop3 (STARTTLS), all with sasl [plain, login,
                oauthbearer, xoauth2]; 12144 imaps with the default sasl (plain, login);
                12994 imaps, 12996 pop3s, 12466 submissions with [plain, login, xoauth2];
                12025 smtp with relay: pop-before-smtp; metrics 12898
    127.0.0.1   cutover "on": the same on 13xxx, plus ``oauth:``; metrics 13898

Tokens are JWTs signed by the test (``TokenIssuer.mint``): ``openssl dgst -sha256 -sign``
over ``base64url(header).base64url(payload)`` (RS256; PS256 with ``-sigopt
rsa_padding_mode:pss``; ES256 with the DER signature turned into r || s); Python's stdlib
has no RSA.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
import time

import clients
import harness
from harness import LEGACY_SMTP_PORT, NEW_IP, USERS

OPENSSL = "openssl"

ISSUER = "https://issuer.example.net/realms/mail"
AUDIENCE = "mail"
KID = "e2e-rs256-1"

NORTH_IP = "127.0.0.60"
SOUTH_IP = "127.0.0.61"
SINK_PORT = 2500

#: users of the two OAuth hosts besides harness.USERS (password: "<name>-pw")
EXTRA_USERS = {"frank": "frank-pw", "grace": "grace-pw", "heidi": "heidi-pw",
               "we,ird": "we-ird-pw"}


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _openssl(*args, input=b""):
    cp = subprocess.run([OPENSSL, *map(str, args)], input=input, capture_output=True, timeout=60)
    if cp.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args))}: rc={cp.returncode} "
                           f"{cp.stderr.decode('utf-8', 'replace')}")
    return cp.stdout


# --------------------------------------------------------------------------
# tokens
# --------------------------------------------------------------------------


class TokenIssuer:
    """The identity provider's signing keys, generated at start, and ``mint()``, which
    signs JWTs with them:

    * ``good``: RSA 2048, trusted as kid ``e2e-rs256-1`` for RS256 and as
      ``e2e-ps256-1`` for PS256;
    * ``ec``: ECDSA P-256, trusted as ``e2e-es256-1`` (ES256);
    * ``rogue``: RSA 2048 that nobody trusts (mint(key="rogue") keeps the good kid);
    * ``add_key()`` makes and publishes another RSA key (a rotation).

    "Trusted" means in both key stores: Dovecot's key dictionary ``keys_dir``
    (``<azp or "default">/<alg>/<kid>``, one PEM public key a file, read by the auth
    process as user dovecot) and cutover's JWKS ``jwks_path`` (rewritten atomically).
    ``minted`` lists every token made (the log test looks for all of them)."""

    #: alg -> (key, kid) used when mint() is not told
    DEFAULTS = {"RS256": ("good", KID), "PS256": ("good", "e2e-ps256-1"),
                "ES256": ("ec", "e2e-es256-1")}

    def __init__(self, root, issuer=ISSUER, audience=AUDIENCE):
        self.root = root
        self.kid = KID
        self.issuer = issuer
        self.audience = audience
        self.private = root / "private"
        self.private.mkdir(parents=True, exist_ok=True)
        self.private.chmod(0o700)
        root.chmod(0o755)
        self.keys_dir = root / "keys"
        self.jwks_path = root / "jwks.json"
        self.jwks = {"keys": []}
        self.keys = {}
        for name in ("good", "rogue"):
            self._genkey(name, "RSA")
        self._genkey("ec", "EC")
        for alg, (key, kid) in self.DEFAULTS.items():
            self.trust(key, alg, kid)
        self.minted = []

    def _genkey(self, name, kind):
        path = self.private / f"{name}.pem"
        if kind == "RSA":
            _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", path)
        else:
            _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                     "-pkeyopt", "ec_param_enc:named_curve", "-out", path)
        path.chmod(0o600)
        self.keys[name] = path
        return path

    def trust(self, key, alg, kid):
        """Publish ``key``'s public half for ``alg``/``kid`` to Dovecot and in the JWKS."""
        pem = _openssl("pkey", "-in", self.keys[key], "-pubout")
        key_file = self.keys_dir / "default" / alg / kid
        key_file.parent.mkdir(parents=True, exist_ok=True)
        for d in (self.keys_dir, self.keys_dir / "default", key_file.parent):
            d.chmod(0o755)
        key_file.write_bytes(pem)
        key_file.chmod(0o644)
        if alg.startswith("ES"):
            der = _openssl("pkey", "-in", self.keys[key], "-pubout", "-outform", "DER")
            point = der[-65:]  # uncompressed point 04 || x || y
            assert point[0] == 4, der.hex()
            jwk = {"kty": "EC", "crv": "P-256", "x": b64url(point[1:33]), "y": b64url(point[33:])}
        else:
            modulus = _openssl("rsa", "-in", self.keys[key], "-noout", "-modulus").decode()
            n = bytes.fromhex(modulus.strip().split("=", 1)[1])
            jwk = {"kty": "RSA", "n": b64url(n), "e": b64url((65537).to_bytes(3, "big"))}
        jwk.update({"use": "sig", "alg": alg, "kid": kid})
        self.jwks["keys"].append(jwk)
        tmp = self.jwks_path.with_name(self.jwks_path.name + ".tmp")
        tmp.write_text(json.dumps(self.jwks, indent=2) + "\n")
        tmp.chmod(0o644)
        os.replace(tmp, self.jwks_path)

    def add_key(self, name, kid, publish=True):
        """A new RSA key ``name`` for RS256 as ``kid``; published at once unless told."""
        self._genkey(name, "RSA")
        if publish:
            self.trust(name, "RS256", kid)

    def _sign(self, alg, key, data):
        path = self.keys[key]
        if alg == "RS256":
            return _openssl("dgst", "-sha256", "-sign", path, input=data)
        if alg == "PS256":
            return _openssl("dgst", "-sha256", "-sign", path, "-sigopt", "rsa_padding_mode:pss",
                            "-sigopt", "rsa_pss_saltlen:32", input=data)
        if alg == "ES256":
            return ecdsa_der_to_raw(_openssl("dgst", "-sha256", "-sign", path, input=data), 32)
        raise ValueError(alg)

    def mint(self, email, *, alg="RS256", key=None, kid=None, exp_in=600, aud=None,
             scope=None, iss=None, extra=None, omit=()):
        """A signed JWT for ``email`` (the identity claim; ``sub`` is the same),
        valid ``exp_in`` seconds from now (negative: expired), for ``aud`` (default
        the audience) with ``scope`` (default "openid email <audience>") from ``iss``
        (default the issuer), signed with ``alg`` by ``key`` as ``kid`` (defaults:
        DEFAULTS). ``extra`` adds claims, ``omit`` drops claims."""
        dkey, dkid = self.DEFAULTS[alg]
        now = int(time.time())
        header = {"alg": alg, "typ": "JWT", "kid": kid or dkid}
        payload = {"iss": iss or self.issuer, "sub": email, "aud": aud or self.audience,
                   "scope": scope or f"openid email {self.audience}",
                   "email": email, "iat": now - 30, "nbf": now - 30, "exp": now + exp_in}
        if exp_in < 0:  # an expired token was issued before it expired
            payload["iat"] = payload["nbf"] = now + exp_in - 600
        payload.update(extra or {})
        for k in omit:
            payload.pop(k, None)
        signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                         b64url(json.dumps(payload, separators=(",", ":")).encode()))
        token = signing_input + "." + b64url(self._sign(alg, key or dkey, signing_input.encode()))
        self.minted.append(token)
        return token


def forged_tokens(issuer, email):
    """Tokens an attacker can make without the private key: ``alg: none`` (no
    signature), and HS256 whose HMAC key is the RSA public key (the PEM Dovecot has, and
    the JWK's raw modulus): the classic algorithm confusion. Not added to ``minted``."""
    now = int(time.time())
    payload = b64url(json.dumps({"iss": issuer.issuer, "sub": email, "aud": issuer.audience,
                                 "scope": f"openid email {issuer.audience}", "email": email,
                                 "iat": now - 30, "exp": now + 600}).encode())
    out = {"alg-none": b64url(b'{"alg":"none","typ":"JWT"}') + "." + payload + "."}
    pem = (issuer.keys_dir / "default" / "RS256" / issuer.kid).read_bytes()
    n = base64.urlsafe_b64decode(issuer.jwks["keys"][0]["n"] + "==")
    for name, secret in (("hs256-public-pem", pem), ("hs256-modulus", n)):
        header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": issuer.kid}).encode())
        sig = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        out[name] = f"{header}.{payload}.{b64url(sig)}"
    return out


def ecdsa_der_to_raw(der, size):
    """An ECDSA signature from openssl (DER SEQUENCE of two INTEGERs) as JWS wants it:
    r || s, each ``size`` bytes big-endian."""
    assert der[0] == 0x30, der.hex()
    i = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    out = b""
    for _ in range(2):
        assert der[i] == 0x02, der.hex()
        n = der[i + 1]
        value = der[i + 2:i + 2 + n].lstrip(b"\0")
        out += value.rjust(size, b"\0")
        i += 2 + n
    return out


def gs2_escape(user):
    return user.replace("=", "=3D").replace(",", "=2C")


def oauthbearer(user, token, host="127.0.0.1", port=993):
    """The OAUTHBEARER client response (RFC 7628 3.1) as bytes; ``user`` None: no
    authzid in the GS2 header."""
    authz = f"a={gs2_escape(user)}" if user is not None else ""
    kv = ""
    if host is not None:
        kv += f"host={host}\x01"
    if port is not None:
        kv += f"port={port}\x01"
    return f"n,{authz},\x01{kv}auth=Bearer {token}\x01\x01".encode()


def xoauth2(user, token):
    """The XOAUTH2 client response as bytes."""
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def sasl_message(mech, user, token):
    mech = mech.upper()
    if mech == "OAUTHBEARER":
        return oauthbearer(user, token)
    if mech == "XOAUTH2":
        return xoauth2(user, token)
    raise ValueError(mech)


#: the dummy client response after an RFC 7628 error challenge
DUMMY = {"OAUTHBEARER": b"\x01", "XOAUTH2": b""}


# --------------------------------------------------------------------------
# Dovecot with passdb oauth2 (local JWT validation)
# --------------------------------------------------------------------------


class OAuthDovecot(harness.Dovecot):
    """A harness.Dovecot (TLS style) that also offers OAUTHBEARER and XOAUTH2, checked
    by ``passdb oauth2`` with local JWT validation against the issuer's key directory:
    signature, ``exp``/``nbf``/``iat``, issuer, ``scope = mail`` and the ``email`` claim,
    which must equal the login name (the GS2 ``a=`` / XOAUTH2 ``user=``). PLAIN/LOGIN
    keep the passwd-file.

    Dovecot 2.3 does not look at ``aud``: Debian 12's 2.3.19.1 (with the backported
    scope fix) requires the configured scope in the token's ``scope`` claim, so a token
    for another audience (aud "other-app", scope "other-app") fails there as "configured
    scope 'mail' missing from token scope". Its auth process logs every failure
    (auth_verbose): ``oauth2(<user>,<ip>,<session>): oauth2 failed: Local validation
    failed: Bad signature`` / ``Token has expired`` / ``Username 'a' did not match 'b'``."""

    def __init__(self, env, host, ip, services, issuer, relay, sasl_ir=True):
        self.issuer = issuer
        self.sasl_ir = sasl_ir
        super().__init__(env, host, ip, services, tls=True, relay=relay)
        self.oauth2_conf = self.dir / "dovecot-oauth2.conf.ext"
        self.oauth2_conf.write_text(
            "# generated by tests/e2e/oauth_servers.py\n"
            "introspection_mode = local\n"
            f"local_validation_key_dict = fs:posix:prefix={issuer.keys_dir}/\n"
            "username_attribute = email\n"
            f"issuers = {issuer.issuer}\n"
            f"scope = {issuer.audience}\n")
        self.oauth2_conf.chmod(0o644)

    def config_text(self):
        text = super().config_text()
        old_mechs = "auth_mechanisms = plain login\n"
        old_passdb = "passdb {\n  driver = passwd-file\n"
        assert old_mechs in text and old_passdb in text, text
        text = text.replace(old_mechs, "auth_mechanisms = plain login oauthbearer xoauth2\n"
                            # any login name (the default refuses "," which a test uses)
                            "auth_username_chars =\n")
        text = text.replace(old_passdb, (
            "passdb {\n"
            "  driver = oauth2\n"
            "  mechanisms = oauthbearer xoauth2\n"
            f"  args = {self.dir / 'dovecot-oauth2.conf.ext'}\n"
            "}\n"
            "passdb {\n"
            "  driver = passwd-file\n"
            "  mechanisms = plain login\n"))
        if not self.sasl_ir:
            # Dovecot's default minus SASL-IR (imap-login still appends AUTH=...): a
            # backend where cutover must send AUTHENTICATE without an initial response
            text += ("imap_capability = IMAP4rev1 LOGIN-REFERRALS ID ENABLE IDLE LITERAL+\n")
        return text

    _AUTH_FAIL = re.compile(r"auth: .*oauth2\((?P<user>[^,)]*)")

    def oauth2_lines(self):
        """Lines of the auth process about the oauth2 passdb (auth_verbose): one or more
        per token it looked at."""
        return [l for l in self.log_text().splitlines() if self._AUTH_FAIL.search(l)]

    def failed_logins(self):
        """The login processes' lines about failed authentications (any user)."""
        return [l for l in self.log_text().splitlines()
                if "-login: " in l and "auth failed" in l]

    def logins_of(self, service, user=None):
        """Successful logins (harness.Dovecot.logins) of one service: imap, pop3 or
        submission."""
        return [x for x in self.logins(user) if f" {service}-login: " in x["line"]]


class OAuthHost(harness.Host):
    """One backend host whose IMAP, POP3 and submission are one OAuthDovecot instance
    (``imap``, ``pop3``, ``smtp`` are the same process), relaying to its own sink. Every
    mailbox holds "hello from <name>"."""

    def __init__(self, env, name, ip, issuer, sasl_ir=True):
        self.name = name
        self.ip = ip
        self.tls = True
        self.dir = env.root / name
        self._make_mailboxes()
        for user, password in EXTRA_USERS.items():
            self.add_user(user, password)
        self.sink = harness.SmtpSink(env, name, ip, SINK_PORT)
        self.dovecot = OAuthDovecot(env, name, ip, ["imap", "pop3", "submission"], issuer,
                                    relay=(ip, SINK_PORT), sasl_ir=sasl_ir)
        self.imap = self.pop3 = self.smtp = self.submission = self.dovecot
        #: an AUTH-less SMTP server on 2525 (what pop-before-smtp pools relay to; its
        #: messages in env.root/<name>-relay-sink/)
        self.relay = harness.SmtpSink(env, f"{name}-relay", ip, LEGACY_SMTP_PORT)

    def processes(self):
        return [self.sink, self.relay, self.dovecot]


def password(user):
    return USERS.get(user) or EXTRA_USERS[user]


# --------------------------------------------------------------------------
# cutover
# --------------------------------------------------------------------------


def proxy_ports(base):
    """The listener ports of one of the module's proxies (base 12 or 13)."""
    return {"imaps": base * 1000 + 993, "pop3s": base * 1000 + 995,
            "submissions": base * 1000 + 465, "imap": base * 1000 + 143,
            "pop3": base * 1000 + 110, "imaps-password": base * 1000 + 144,
            "imaps-xoauth2": base * 1000 + 994, "pop3s-xoauth2": base * 1000 + 996,
            "submissions-xoauth2": base * 1000 + 466,
            "smtp-compat": base * 1000 + 25, "metrics": base * 1000 + 898}


ALL_SASL = ["plain", "login", "oauthbearer", "xoauth2"]
XOAUTH2_ONLY = ["plain", "login", "xoauth2"]
BRIDGE_WINDOW = "30s"
MAX_SASL_TOKEN = 4096


def oauth_proxy_config(env, issuer, ports, verify, jwks_url=None):
    """harness.proxy_config(env) with this module's listeners, pools and routes:

    * ``north``/``south``: the OAuth hosts; ``new``: the session's password-only new host;
      ``legacy``: green/mauve (pop-before-smtp SMTP, no OAuth anywhere); ``hybrid``:
      IMAP/POP3 on north, SMTP ``auth: pop-before-smtp`` on north's AUTH-less relay (2525);
      ``mixed`` (balance first): new, then north, for every protocol;
    * routes: joeuser, alice, weird, "we,ird" -> north; bob -> south; carol -> new, fallback north;
      dave -> new (no fallback); frank -> hybrid; grace -> hybrid, fallback north;
      heidi -> mixed;
      everyone else -> legacy.

    ``verify``: add ``oauth:`` (jwks_file, issuer, audience, claim email); ``jwks_url``:
    the same with the keys from that URL (and the default claim)."""
    cfg = harness.proxy_config(env)
    ca = str(env.ca)
    ip = harness.PROXY_IP

    def listener(name, protocol, tls, sasl=ALL_SASL, **kw):
        d = {"name": name, "protocol": protocol, "listen": f"{ip}:{ports[name]}", "tls": tls}
        if sasl is not None:
            d["sasl"] = list(sasl)
        d.update(kw)
        return d

    cfg["listeners"] = [
        listener("imaps", "imap", "implicit"),
        listener("pop3s", "pop3", "implicit"),
        listener("submissions", "smtp", "implicit"),
        listener("imap", "imap", "starttls"),
        listener("pop3", "pop3", "starttls"),
        listener("imaps-password", "imap", "implicit", sasl=None),
        # curl 7.88 takes OAUTHBEARER whenever it is offered (--login-options AUTH=XOAUTH2
        # does not change that): these offer XOAUTH2 alone
        listener("imaps-xoauth2", "imap", "implicit", sasl=XOAUTH2_ONLY),
        listener("pop3s-xoauth2", "pop3", "implicit", sasl=XOAUTH2_ONLY),
        listener("submissions-xoauth2", "smtp", "implicit", sasl=XOAUTH2_ONLY),
        listener("smtp-compat", "smtp", "starttls", relay="pop-before-smtp",
                 window=BRIDGE_WINDOW),
    ]

    def oauth_pool(host_ip):
        backend = {"tls": "starttls", "ca": ca, "server_name": "localhost"}
        return {"imap": {"servers": [f"{host_ip}:143"], **backend},
                "pop3": {"servers": [f"{host_ip}:110"], **backend},
                "smtp": {"servers": [f"{host_ip}:587"], **backend}}

    cfg["pools"]["north"] = oauth_pool(NORTH_IP)
    cfg["pools"]["south"] = oauth_pool(SOUTH_IP)
    hybrid = oauth_pool(NORTH_IP)
    hybrid["smtp"] = {"servers": [f"{NORTH_IP}:{LEGACY_SMTP_PORT}"], "auth": "pop-before-smtp"}
    cfg["pools"]["hybrid"] = hybrid
    backend = {"tls": "starttls", "ca": ca, "server_name": "localhost"}
    cfg["pools"]["mixed"] = {
        "balance": "first",
        "imap": {"servers": [f"{NEW_IP}:143", f"{NORTH_IP}:143"], **backend},
        "pop3": {"servers": [f"{NEW_IP}:110", f"{NORTH_IP}:110"], **backend},
        "smtp": {"servers": [f"{NEW_IP}:587", f"{NORTH_IP}:587"], **backend},
    }
    assert cfg["pools"]["new"]["imap"]["servers"] == [f"{NEW_IP}:143"]
    cfg["routes"] = [
        {"users": ["joeuser", "alice", "weird", "we,ird"], "pool": "north"},
        {"users": ["bob"], "pool": "south"},
        {"users": ["carol"], "pool": "new", "fallback": "north"},
        {"users": ["dave"], "pool": "new"},
        {"users": ["frank"], "pool": "hybrid"},
        {"users": ["grace"], "pool": "hybrid", "fallback": "north"},
        {"users": ["heidi"], "pool": "mixed"},
        {"pool": "legacy"},
    ]
    cfg["metrics"] = {"listen": f"{ip}:{ports['metrics']}"}
    cfg["limits"] = dict(cfg.get("limits", {}), max_sasl_token=MAX_SASL_TOKEN)
    if verify:
        cfg["oauth"] = {"jwks_file": str(issuer.jwks_path), "issuer": issuer.issuer,
                        "audience": issuer.audience, "claim": "email"}
    if jwks_url:
        cfg["oauth"] = {"jwks_url": jwks_url, "issuer": issuer.issuer,
                        "audience": issuer.audience}
    return cfg


class OAuthProxy(harness.Proxy):
    """One cutover of this module: harness.Proxy (same binary, CUTOVER_LOG=debug) with
    its own directory env.root/oauth-proxy-<name>/ and the ports its config names."""

    def __init__(self, env, binary, name, config, ports):
        super().__init__(env, binary, config)
        self.name = f"cutover-oauth-{name}"
        self.dir = env.root / f"oauth-proxy-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "routes.yaml"
        self.log_path = self.dir / "proxy.log"
        self.cwd = str(self.dir)
        self.argv = self._argv()
        self.port = dict(ports)
        self.ports = self._listener_ports()
        self.ca = env.ca

    def client_context(self):
        """A client SSLContext trusting only the test CA (the proxy's cert: 127.0.0.1)."""
        return harness.client_ssl_context(self.ca)

    def _listener_ports(self):
        out = []
        for l in self.config["listeners"]:
            host, _, port = l["listen"].rpartition(":")
            out.append((host, int(port)))
        return out

    def _prepare(self):
        super()._prepare()  # checks the binary, writes routes.yaml
        self.ports = self._listener_ports() + self._endpoint_ports()

    def metrics(self):
        return clients.scrape_metrics(harness.PROXY_IP, self.port["metrics"])


class OAuthServers:
    """The issuer, north and south, and the two proxies; started in that order, stopped
    in reverse (``stop()`` keeps going past errors)."""

    def __init__(self, env, binary):
        self.env = env
        self.issuer = TokenIssuer(env.root / "oauth-issuer")
        self.north = OAuthHost(env, "north", NORTH_IP, self.issuer)
        self.south = OAuthHost(env, "south", SOUTH_IP, self.issuer, sasl_ir=False)
        self.hosts = [self.north, self.south]
        off_ports, on_ports = proxy_ports(12), proxy_ports(13)
        self.off = OAuthProxy(env, binary, "off",
                              oauth_proxy_config(env, self.issuer, off_ports, verify=False),
                              off_ports)
        self.on = OAuthProxy(env, binary, "on",
                             oauth_proxy_config(env, self.issuer, on_ports, verify=True),
                             on_ports)
        self.proxies = [self.off, self.on]

    def processes(self):
        return [p for h in self.hosts for p in h.processes()] + self.proxies

    def start(self):
        for p in self.processes():
            p.start()

    def stop(self):
        errors = []
        for p in reversed(self.processes()):
            try:
                p.stop()
            except Exception as e:  # keep stopping the others
                errors.append(f"{p.name}: {e}")
        if errors:
            raise RuntimeError("; ".join(errors))

    def ensure_running(self):
        for p in self.processes():
            if not p.running:
                p.start()

    def diagnostics(self, lines=40):
        parts = []
        for p in self.processes():
            state = "running" if p.running else "NOT running"
            parts.append(f"=== {p.name} ({state})\n{p.diagnostics(lines)}")
        return "\n".join(parts)
