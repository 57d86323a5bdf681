"""The proxy's Prometheus endpoint (metrics.listen: 127.0.0.1:19898)."""

import subprocess
import urllib.request

import pytest

import clients as c
import harness
from harness import METRICS_PORT, PROXY_IP, PROXY_PORTS, USERS

pytestmark = pytest.mark.proxy


def scrape():
    with urllib.request.urlopen(f"http://{PROXY_IP}:{METRICS_PORT}/metrics", timeout=c.IO_TIMEOUT) as r:
        assert r.status == 200
        return r.headers.get("Content-Type", ""), r.read()


def test_metrics_endpoint_is_valid_prometheus_text(env, proxy):
    harness.wait_until(lambda: harness.port_open(PROXY_IP, METRICS_PORT), 10,
                       what=f"the metrics listener on {PROXY_IP}:{METRICS_PORT}")
    # some traffic first, so there is something to count
    assert c.imap_which_host(PROXY_IP, PROXY_PORTS["imaps"], "joeuser", USERS["joeuser"],
                             "implicit", env.ssl_context()) == "hello from new"
    ctype, body = scrape()
    assert ctype.startswith("text/plain"), ctype
    assert body.strip(), "empty /metrics"
    # promtool: exit 1 = the text does not parse; 3 = lint findings only (e.g. no HELP)
    cp = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=20)
    out = (cp.stdout + cp.stderr).decode("utf-8", "replace")
    assert cp.returncode in (0, 3) and "parsing error" not in out, out
