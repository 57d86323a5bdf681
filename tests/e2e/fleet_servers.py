"""Servers for ``test_fleet.py``: a fleet of three cutover proxies sharing state in a
real ``redis-server``, behind a real HAProxy in TCP mode, in front of a Dovecot that
takes PROXY headers. Every process is a :class:`harness.ManagedProcess` with its own
config file and log under the session's temp dir (``Env.root``)::

    fleet-redis/                 redis.log (harness.Redis: redis-server --save "" --appendonly no)
    fleet-haproxy/               haproxy.cfg, haproxy.log (one tcplog line per connection)
    fleet-proxy-a/ -b/ -c/ (-d/) routes.yaml and proxy.log of each cutover instance
    new-imap-pop3-submission/    the PROXY-protocol Dovecot (dovecot.conf, dovecot.log)
    fleet-prometheus/            harness.Prometheus: prometheus.yml, data/, prometheus.log
                                 (one test only; made by test_fleet.py)

Addresses (loopback only)::

    127.0.0.1:16379     redis-server
    127.0.0.20          HAProxy: imaps 11993, pop3 11110, smtp 11025 -> the three
                        proxies' same ports, balance roundrobin, send-proxy-v2, and
                        connections to the proxies made FROM 127.0.0.20 (`source`), so
                        that the balancer's own address is recognisable in any log;
                        Prometheus 19090 (one test only)
    127.0.0.21/22/23    cutover proxy-a/b/c: the same three listeners (proxy_protocol:
                        required, trusted 127.0.0.0/8), metrics 19898, admin 19899
    127.0.0.24          cutover proxy-d (one test only): trusts only 127.0.0.200/32
    127.0.0.30          Dovecot IMAP 143, POP3 110, submission 587 (STARTTLS, every
                        listener `haproxy = yes`; submission relays to new's sink on
                        127.0.0.10:2500): the fleet's "new" pool, which gets a PROXY v2
                        header from cutover (`pools.new.proxy_protocol: v2`)

The "new" Dovecot here is a fourth instance of the session's "new" host: it reads the
same passwd-file and maildirs (env.root/new), so every mailbox still says
"hello from new"; its own dovecot.log tells it apart. The legacy pool is the session's
green/mauve (harness.Servers), unchanged.
"""

import json
import socket
import struct

import clients
import harness
from harness import GREEN_IP, LEGACY_SMTP_PORT, MAUVE_IP, NEW_IP, NEW_SINK_PORT, NEW_USERS

HAPROXY = "/usr/sbin/haproxy"

#: the fleet's harness.Redis (test_observability.py's is on another address)
REDIS_IP = "127.0.0.1"
REDIS_PORT = 16379
KEY_PREFIX = "cutover:"

HAPROXY_IP = "127.0.0.20"
#: the harness.Prometheus of test g (scrapes the three proxies' metrics as this job)
PROM_IP = HAPROXY_IP
PROM_PORT = 19090
PROM_JOB = "cutover-fleet"

#: instance_name -> address of the three proxies behind HAProxy
FLEET = {"proxy-a": "127.0.0.21", "proxy-b": "127.0.0.22", "proxy-c": "127.0.0.23"}
#: a fourth proxy some test starts on its own (not behind HAProxy)
EXTRA = ("proxy-d", "127.0.0.24")

#: the same port numbers on HAProxy and on each proxy
PORTS = {"imaps": 11993, "pop3": 11110, "smtp": 11025}
METRICS_PORT = 19898
ADMIN_PORT = 19899

FLEET_DOVECOT_IP = "127.0.0.30"

#: the proxies' certificate (certs/make-demo-certs.sh: proxy.pem) names localhost and
#: 127.0.0.1/2, not the fleet's addresses: clients verify the name "localhost" (SNI)
TLS_NAME = "localhost"

#: the failed-login throttle of every proxy in the fleet (K = user_failures)
THROTTLE = {"user_failures": 3, "ip_failures": 0, "delay": "100ms", "max_delay": "200ms",
            "window": "60s", "block": "60s"}
BRIDGE_WINDOW = "60s"
HOLD_MAX_WAIT = "30s"


# --------------------------------------------------------------------------
# the PROXY protocol, client side
# --------------------------------------------------------------------------

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2_header(src, dst):
    """A PROXY protocol v2 header for a TCP/IPv4 connection from ``src`` to ``dst``
    ((ip, port) pairs): the 12-byte signature, version 2 + PROXY command (0x21),
    AF_INET + STREAM (0x11), the address block's length (12), then source address,
    destination address, source port, destination port."""
    return (PROXY_V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", 12)
            + socket.inet_aton(src[0]) + socket.inet_aton(dst[0])
            + struct.pack("!HH", src[1], dst[1]))


# --------------------------------------------------------------------------
# HAProxy
# --------------------------------------------------------------------------


class HAProxy(harness.ManagedProcess):
    """HAProxy in TCP mode in the foreground (``-db``): one frontend per entry of
    ``PORTS`` on HAPROXY_IP, each balancing round-robin over ``backends`` (ip list) on
    the same port with ``send-proxy-v2``, connecting from HAPROXY_IP. No health checks
    (the rotation stays strict), no stats socket; one log line per connection."""

    def __init__(self, env, backends, ip=HAPROXY_IP, ports=PORTS):
        self.ip = ip
        self.dir = env.root / "fleet-haproxy"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "haproxy.cfg"
        self.config_path.write_text(self.config_text(backends, ip, ports))
        super().__init__("haproxy", [HAPROXY, "-db", "-f", self.config_path],
                         [(ip, p) for p in ports.values()], self.dir / "haproxy.log",
                         cwd=str(self.dir))

    @staticmethod
    def config_text(backends, ip, ports):
        out = [
            "# generated by tests/e2e/fleet_servers.py",
            "global",
            "    nbthread 1",
            "    maxconn 1000",
            "    log stdout format raw local0 info",
            "",
            "defaults",
            "    mode tcp",
            "    log global",
            "    option tcplog",
            "    balance roundrobin",
            "    timeout connect 3s",
            "    timeout client 5m",
            "    timeout server 5m",
            "",
        ]
        for name, port in ports.items():
            out += [f"frontend fe-{name}", f"    bind {ip}:{port}", f"    default_backend be-{name}",
                    "", f"backend be-{name}"]
            for n, backend_ip in enumerate(backends):
                out.append(f"    server {name}-{n + 1} {backend_ip}:{port} send-proxy-v2 source {ip}")
            out.append("")
        return "\n".join(out)

    def log_lines(self, frontend=None):
        """tcplog lines: '<client ip:port> [date] fe-<name> be-<name>/<server> ...'."""
        lines = [l for l in harness.tail(self.log_path, 100000).splitlines() if " fe-" in l]
        if frontend:
            lines = [l for l in lines if f" fe-{frontend} " in l]
        return lines


# --------------------------------------------------------------------------
# Dovecot taking PROXY headers
# --------------------------------------------------------------------------


class ProxyProtocolDovecot(harness.Dovecot):
    """A harness.Dovecot (TLS style: STARTTLS on 143/110, implicit 993/995) whose every
    inet_listener has ``haproxy = yes`` (a PROXY header is required before the
    protocol) with ``haproxy_trusted_networks`` = 127.0.0.0/8, and whose login lines
    also carry the client's port (``rport=``)."""

    LOGIN_FORMAT = ("user=<%u> method=%m rip=%r rport=%{rport} lip=%l mpid=%e %c "
                    "session=<%{session}>")

    def config_text(self):
        text = super().config_text()
        for port in ("143", "110", "993", "995", "587"):
            text = text.replace(f"    port = {port}\n", f"    port = {port}\n    haproxy = yes\n")
        assert text.count("haproxy = yes") >= 2, text
        return text + (
            "\n# PROXY protocol from cutover (pools.new.proxy_protocol: v2)\n"
            "haproxy_trusted_networks = 127.0.0.0/8\n"
            "haproxy_timeout = 3s\n"
            f"login_log_format_elements = {self.LOGIN_FORMAT}\n")

    def logins(self, user=None):
        out = super().logins(user)
        for row in out:
            fields = dict(p.strip().split("=", 1) for p in row["line"].split(", ") if "=" in p)
            row["rport"] = fields.get("rport")
        return out


# --------------------------------------------------------------------------
# the cutover instances
# --------------------------------------------------------------------------


def fleet_config(env, name, ip, redis_url, trusted=("127.0.0.0/8",)):
    """harness.proxy_config(env), adjusted for one proxy of the fleet: its instance_name,
    its own address for the three PROXY-protocol listeners (IMAP implicit TLS, POP3
    STARTTLS, the pop-before-smtp SMTP bridge), metrics and admin; shared state in Redis;
    the "new" pool on the PROXY-protocol Dovecot with `proxy_protocol: v2`; the fleet's
    failed-login throttle."""
    cfg = harness.proxy_config(env)
    ca = str(env.certs / "ca.pem")
    cfg["instance_name"] = name
    cfg["listeners"] = [
        {"name": "imaps", "protocol": "imap", "listen": f"{ip}:{PORTS['imaps']}",
         "tls": "implicit", "proxy_protocol": "required"},
        {"name": "pop3", "protocol": "pop3", "listen": f"{ip}:{PORTS['pop3']}",
         "tls": "starttls", "proxy_protocol": "required"},
        {"name": "smtp-compat", "protocol": "smtp", "listen": f"{ip}:{PORTS['smtp']}",
         "tls": "starttls", "relay": "pop-before-smtp", "window": BRIDGE_WINDOW,
         "proxy_protocol": "required"},
    ]
    cfg["proxy_protocol"] = {"trusted": list(trusted), "timeout": "3s"}
    cfg["state"] = {"redis": {"url": redis_url, "key_prefix": KEY_PREFIX, "timeout": "50ms"}}
    backend = {"tls": "starttls", "ca": ca, "server_name": "localhost"}
    cfg["pools"]["new"] = {
        "proxy_protocol": "v2",
        "imap": {"servers": [f"{FLEET_DOVECOT_IP}:143"], **backend},
        "pop3": {"servers": [f"{FLEET_DOVECOT_IP}:110"], **backend},
        "smtp": {"servers": [f"{FLEET_DOVECOT_IP}:587"], **backend},
    }
    assert cfg["pools"]["legacy"]["smtp"]["servers"] == [
        f"{GREEN_IP}:{LEGACY_SMTP_PORT}", f"{MAUVE_IP}:{LEGACY_SMTP_PORT}"]
    assert cfg["routes"][0] == {"users": list(NEW_USERS), "pool": "new"}
    cfg["metrics"] = {"listen": f"{ip}:{METRICS_PORT}"}
    cfg["admin"] = {"listen": f"{ip}:{ADMIN_PORT}", "hold_max_wait": HOLD_MAX_WAIT}
    cfg["auth_throttle"] = dict(THROTTLE)
    cfg["shutdown"] = {"drain_timeout": "1s"}
    return cfg


class FleetProxy(harness.Proxy):
    """One cutover instance: harness.Proxy (same binary, argv, CUTOVER_LOG=debug) with
    its own directory env.root/fleet-<name>/ and the ports its config names."""

    def __init__(self, env, binary, name, ip, config):
        super().__init__(env, binary, config)
        self.instance = name
        self.ip = ip
        self.name = f"cutover-{name}"
        self.dir = env.root / f"fleet-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "routes.yaml"
        self.log_path = self.dir / "proxy.log"
        self.cwd = str(self.dir)
        self.argv = self._argv()
        self.ports = self._listener_ports()

    def _listener_ports(self):
        out = []
        for l in self.config["listeners"]:
            host, _, port = l["listen"].rpartition(":")
            out.append((host, int(port)))
        return out

    def _prepare(self):
        super()._prepare()  # checks the binary, writes routes.yaml
        self.ports = self._listener_ports() + self._endpoint_ports()

    # -- HTTP endpoints --------------------------------------------------------

    def metrics(self):
        """GET /metrics of this proxy, as text."""
        return clients.scrape_metrics(self.ip, METRICS_PORT)

    def admin(self, method, path):
        """An admin request; (status, decoded JSON or text)."""
        status, body = harness.http_request(f"http://{self.ip}:{ADMIN_PORT}{path}", method=method)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    def admin_ok(self, method, path):
        status, body = self.admin(method, path)
        assert status == 200, f"{self.instance}: {method} {path} -> {status} {body!r}"
        return body


# --------------------------------------------------------------------------
# the whole fleet
# --------------------------------------------------------------------------


class Fleet:
    """Redis, the PROXY-protocol Dovecot, proxy-a/b/c and HAProxy, started in that order
    and stopped in the reverse order (``stop()`` keeps going past errors).

    ``fleet.proxies`` maps instance_name -> FleetProxy; ``fleet.a``/``.b``/``.c``."""

    def __init__(self, env, binary):
        self.env = env
        self.binary = binary
        self.redis = harness.Redis(env, REDIS_IP, REDIS_PORT, "fleet-redis")
        self.dovecot = ProxyProtocolDovecot(env, "new", FLEET_DOVECOT_IP,
                                            ["imap", "pop3", "submission"], tls=True,
                                            relay=(NEW_IP, NEW_SINK_PORT))
        self.proxies = {name: FleetProxy(env, binary, name, ip,
                                         fleet_config(env, name, ip, self.redis.url))
                        for name, ip in FLEET.items()}
        self.a, self.b, self.c = self.proxies.values()
        self.haproxy = HAProxy(env, list(FLEET.values()))
        self.extra = []  # processes a test started (stopped by stop())

    def processes(self):
        return [self.redis, self.dovecot, *self.proxies.values(), self.haproxy, *self.extra]

    def start(self):
        for p in [self.redis, self.dovecot, *self.proxies.values(), self.haproxy]:
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

    def extra_proxy(self, trusted):
        """proxy-d on 127.0.0.24: the fleet's config (same Redis) but its own trusted
        networks; not behind HAProxy. Stopped by the caller (or by stop())."""
        name, ip = EXTRA
        p = FleetProxy(self.env, self.binary, name, ip,
                       fleet_config(self.env, name, ip, self.redis.url, trusted=trusted))
        self.extra.append(p)
        return p

    def diagnostics(self, lines=40):
        parts = []
        for p in self.processes():
            state = "running" if p.running else "NOT running"
            parts.append(f"=== {p.name} ({state})\n{p.diagnostics(lines)}")
        return "\n".join(parts)
