"""Fixtures for the cutover end-to-end tests.

Session-scoped:
  env      -> harness.Env: temp dir (env.root), fresh certs (env.certs, env.ca),
              env.ssl_context() trusting only the test CA
  servers  -> harness.Servers: servers.new / .green / .mauve, each a harness.Host
              with .imap .pop3 .smtp .sink (ManagedProcess: start/stop/stopped)
  cutover  -> harness.Proxy: the proxy process (session-wide)

Function-scoped:
  proxy    -> the same harness.Proxy, (re)started if a previous test killed it
  (autouse) every server a test stopped is started again after the test

Environment:
  CUTOVER_BIN        proxy binary (default target/debug/cutover, relative to the repo)
  CUTOVER_E2E_KEEP=1 keep the temp dir (it is also kept when a test failed)
"""

import os
import shutil
import tempfile
import time

import pytest

import clients
import harness

_state = {"servers": None, "proxy": None}


def pytest_configure(config):
    config.addinivalue_line("markers", "proxy: needs the cutover binary")


@pytest.fixture(scope="session")
def env(request):
    if os.geteuid() != 0:
        pytest.fail("the e2e tests start Dovecot on privileged ports and need root")
    root = tempfile.mkdtemp(prefix="cutover-e2e-", dir=os.environ.get("CUTOVER_E2E_TMP"))
    os.chmod(root, 0o755)
    e = harness.Env(root)
    yield e
    failed = request.session.testsfailed
    if os.environ.get("CUTOVER_E2E_KEEP") == "1" or failed:
        print(f"\n[e2e] kept {root} (logs of every server are there)")
    else:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def servers(env):
    s = harness.Servers(env)
    _state["servers"] = s
    try:
        s.start()
        yield s
    finally:
        _state["servers"] = None
        s.stop()


@pytest.fixture(autouse=True)
def _restore_servers(request):
    """After each test, restart any server the test stopped (even if it failed)."""
    yield
    s = _state["servers"]
    if s is not None:
        s.ensure_running()


@pytest.fixture(scope="session")
def cutover(env, servers):
    binary = harness.resolve_cutover_bin()
    if not binary.exists():
        pytest.fail(
            f"cutover binary missing: {binary} does not exist. Build it with "
            "`cargo build --bins` or point CUTOVER_BIN at it (scripts/test.sh does this).",
            pytrace=False)
    p = harness.Proxy(env, binary)
    _state["proxy"] = p
    try:
        try:
            p.start()
        except Exception as e:
            pytest.fail(f"cutover did not start: {e}", pytrace=False)
        yield p
    finally:
        _state["proxy"] = None
        p.stop()


#: seconds a proxy test waits at its start for the proxy to see every backend up again
HEALTH_SETTLE_TIMEOUT = 20.0


def _settle_health(p):
    """Tests assume the proxy sees every (running) backend as up, but a server that an
    earlier test stopped while the proxy ran is back in rotation only after `rise` good
    probes (~10 s with the defaults). Poll /metrics (bounded) until no
    cutover_backend_up sample is 0; give up quietly at the deadline."""
    if p.config is not p.default_config or p.dirty or not p.running:
        return
    deadline = time.monotonic() + HEALTH_SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        try:
            text = clients.scrape_metrics(harness.PROXY_IP, harness.METRICS_PORT)
        except OSError:
            return
        if not any(l.startswith("cutover_backend_up{") and l.split()[-1] in ("0", "0.0")
                   for l in text.splitlines()):
            return
        time.sleep(0.2)


@pytest.fixture
def proxy(cutover):
    """The running proxy; restarted (with a note in its log) if it died earlier.
    A proxy that exits during a test makes that test error in teardown; a config
    changed with proxy.reconfigure() or proxy.write_config() is put back after the test."""
    if not cutover.running:
        with open(cutover.log_path, "ab") as f:
            f.write(b"--- proxy was not running at the start of a test; restarting\n")
        try:
            cutover.start()
        except Exception as e:
            pytest.fail(f"cutover did not restart: {e}", pytrace=False)
    _settle_health(cutover)
    yield cutover
    crashed = cutover.proc is not None and cutover.proc.poll() is not None
    if cutover.config is not cutover.default_config or cutover.dirty:
        cutover.reconfigure(cutover.default_config)  # a test changed it: restore
    if crashed:
        pytest.fail(f"cutover exited during this test with status {cutover.proc.returncode}; "
                    f"log tail:\n{harness.tail(cutover.log_path, 40)}", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the tail of the proxy log (and dead servers' logs) to failures."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when not in ("setup", "call") or not rep.failed:
        return
    p = _state["proxy"]
    if p is not None and ("proxy" in item.fixturenames or "cutover" in item.fixturenames):
        rep.sections.append(("cutover log (tail)", harness.tail(p.log_path, 80)))
        if not p.running:
            rep.sections.append(("cutover state", "the proxy process is NOT running"))
    s = _state["servers"]
    if s is not None:
        dead = [x for x in s.all_processes() if x.proc is not None and not x.running]
        for x in dead:
            rep.sections.append((f"{x.name} died", x.diagnostics(30)))
