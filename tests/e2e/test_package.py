"""The Debian package (issue 16, item 3): built by ``scripts/package.sh --profile dev``
(cargo-deb, the debug binary), installed on this machine with ``dpkg -i``, checked, then
removed and purged again.

What is checked: ``/usr/bin/cutover --version``; the shipped ``/etc/cutover/routes.yaml``
passes ``cutover check``, listens on loopback only and is a conffile (kept across a
reinstall when edited); man pages (``man -w``); bash completion (sourced, completes
``cutover up`` to ``upgrade``), zsh and fish files; the unit (listed by ``dpkg -L``,
``systemd-analyze verify`` without syntax errors, the hardening it promises) and the
socket example; the ``cutover`` system user; the ExecReload helper: a configuration
reload (SIGHUP) while the binary is unchanged, and after the binary was replaced a
zero-downtime upgrade that names the new process to a fake ``NOTIFY_SOCKET`` as the
control process would (MAINPID= + READY=1), with the watchdog passed on and connections
answered throughout; finally ``dpkg -r`` (binary gone, conffile kept) and ``dpkg -P``
(nothing left: files, unit symlinks, deb-systemd-helper state).

The machine is restored whatever happens: the package is purged at the end (also when
a test failed), the ``cutover`` user removed if this test created it, a policy-rc.d added
by the test removed. The service is never started: installs run under a policy-rc.d that
forbids it (systemd may not even run here). Skipped, with the reason, when not root, not
on Debian, when cargo-deb is missing (scripts/test.sh installs it), or when a cutover
package or a /usr/bin/cutover not from this test is already on the machine.

Addresses: the helper test runs cutover on 127.0.0.95 (10143, 10110, 10587, metrics 9898)
against the dead pool 127.0.0.13, as the ``cutover`` user, for a few seconds.
"""

import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import harness

REPO = harness.REPO
PKG = "cutover"
BIN = Path("/usr/bin/cutover")
CONF = Path("/etc/cutover/routes.yaml")
UNIT = Path("/lib/systemd/system/cutover.service")
RELOAD = Path("/usr/libexec/cutover/reload")
SOCKET_EXAMPLE = Path("/usr/share/doc/cutover/examples/cutover.socket")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
SIM_IP = "127.0.0.95"
DEAD_IP = "127.0.0.13"

# An install, upgrade or removal must never start or stop a service here.
OUR_POLICY = "#!/bin/sh\n# added by tests/e2e/test_package.py: no service starts\nexit 101\n"


def run(argv, timeout=120, check=True, **kw):
    """Run argv; CompletedProcess with text output. check=True fails the test with
    the command's output when it exits non-zero."""
    try:
        cp = subprocess.run([str(a) for a in argv], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{argv} did not finish within {timeout}s: {e.stdout}{e.stderr}")
    if check and cp.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {cp.returncode}:\n{cp.stdout}\n{cp.stderr}")
    return cp


def dpkg(*args, check=True, timeout=120):
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return run(["dpkg", "--force-confdef", "--force-confold", *args], check=check,
               timeout=timeout, env=env)


def installed():
    cp = run(["dpkg-query", "-W", "-f=${Status}", PKG], check=False)
    return cp.returncode == 0 and "installed" in cp.stdout and "not-installed" not in cp.stdout


def user_exists(name):
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def leftovers():
    """What a purge must not leave behind."""
    paths = [BIN, CONF, CONF.parent, UNIT, RELOAD, RELOAD.parent,
             Path("/usr/share/man/man1/cutover.1.gz"),
             Path("/usr/share/bash-completion/completions/cutover"),
             Path("/usr/share/doc/cutover"),
             Path("/etc/systemd/system/cutover.service"),
             Path("/etc/systemd/system/multi-user.target.wants/cutover.service"),
             Path("/var/lib/systemd/deb-systemd-helper-enabled/cutover.service.dsh-also"),
             Path("/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/cutover.service"),
             Path("/var/lib/systemd/deb-systemd-helper-masked/cutover.service")]
    return [str(p) for p in paths if os.path.lexists(p)]


@pytest.fixture(scope="module")
def package():
    """Builds the .deb, installs it, yields its path; purges it afterwards whatever
    happened, and puts the machine back as it was."""
    if os.geteuid() != 0:
        pytest.skip("the package test installs a .deb with dpkg -i and needs root")
    if not Path("/etc/debian_version").exists() or not shutil.which("dpkg"):
        pytest.skip("the package test needs a Debian machine (dpkg)")
    if run(["cargo", "deb", "--version"], check=False).returncode != 0:
        pytest.skip("cargo-deb is not installed: scripts/test.sh installs it "
                    "(cargo install cargo-deb --locked --version 3.8.0)")
    if installed():
        pytest.skip("a cutover package is already installed on this machine: not touching it")
    if BIN.exists():
        pytest.skip(f"{BIN} exists and belongs to no cutover package: not overwriting it")
    policy_added = False
    if POLICY_RC_D.exists():
        rc = run([POLICY_RC_D, "cutover.service", "start"], check=False).returncode
        if rc != 101:
            pytest.skip(f"{POLICY_RC_D} allows services to start (exit {rc}): installing "
                        "would start cutover.service")
    user_before = user_exists("cutover")

    build = run([REPO / "scripts" / "package.sh", "--profile", "dev"], timeout=900)
    deb = Path(build.stdout.strip().splitlines()[-1])
    if not deb.is_absolute():
        deb = REPO / deb
    assert deb.is_file(), f"package.sh printed {build.stdout!r}\n{build.stderr}"

    try:
        if not POLICY_RC_D.exists():
            POLICY_RC_D.write_text(OUR_POLICY)
            POLICY_RC_D.chmod(0o755)
            policy_added = True
        dpkg("-i", deb)
        yield deb
    finally:
        try:
            if installed() or run(["dpkg-query", "-W", PKG], check=False).returncode == 0:
                dpkg("-P", PKG, check=False)
            if not user_before and user_exists("cutover"):
                run(["deluser", "--system", "--quiet", "cutover"], check=False)
                if user_exists("cutover"):
                    run(["userdel", "cutover"], check=False)
                run(["groupdel", "cutover"], check=False)
        finally:
            if policy_added and POLICY_RC_D.read_text() == OUR_POLICY:
                POLICY_RC_D.unlink()


def test_package_metadata(package):
    info = run(["dpkg-deb", "-f", package, "Package", "Version", "Section", "Priority",
                "Maintainer", "Depends"]).stdout
    assert "Package: cutover" in info
    assert re.search(r"^Version: \d+\.\d+\.\d+-\d+$", info, re.M), info
    assert "Section: mail" in info and "Priority: optional" in info
    depends = re.search(r"^Depends: (.*)$", info, re.M).group(1)
    assert "libc6" in depends and "adduser" in depends, depends
    listing = run(["dpkg-deb", "-c", package]).stdout
    for path in ("./usr/bin/cutover", "./etc/cutover/routes.yaml", "./lib/systemd/system/cutover.service",
                 "./usr/share/man/man1/cutover.1.gz", "./usr/share/man/man1/cutover-upgrade.1.gz",
                 "./usr/share/doc/cutover/changelog.Debian.gz", "./usr/share/doc/cutover/copyright",
                 "./usr/share/doc/cutover/examples/cutover.socket"):
        assert path in listing, f"{path} missing from the package:\n{listing}"
    # the example socket unit is documentation, never an installed unit
    assert "./lib/systemd/system/cutover.socket" not in listing


def test_installed_binary_and_version(package):
    cp = run([BIN, "--version"])
    assert re.match(r"cutover \d+\.\d+\.\d+ \(commit \S+; TLS: rustls", cp.stdout), cp.stdout
    files = run(["dpkg", "-L", PKG]).stdout.splitlines()
    assert str(BIN) in files
    assert run(["dpkg-query", "-S", BIN]).stdout.startswith("cutover:")


def test_shipped_config_passes_check_and_is_a_conffile(package):
    cp = run([BIN, "check", "--config", CONF])
    assert cp.stdout.startswith(f"{CONF}: OK"), cp.stdout
    # as shipped it listens on loopback only
    listens = re.findall(r"^\s+listener\s+\S+\s+\S+ on (\S+)", cp.stdout, re.M)
    assert listens and all(a.startswith("127.0.0.1:") for a in listens), cp.stdout
    dump = run([BIN, "config", "dump", "--config", CONF]).stdout
    assert "/run/cutover/upgrade.sock" in dump, "the sample config must enable upgrades"
    assert re.search(r"^\s*drain_timeout: 30s", dump, re.M), dump
    conffiles = run(["dpkg-query", "-W", "-f=${Conffiles}", PKG]).stdout
    assert str(CONF) in conffiles, conffiles

    # an operator's edit survives a reinstall (dpkg keeps a changed conffile)
    original = CONF.read_text()
    CONF.write_text(original + "# edited by the operator\n")
    try:
        dpkg("-i", package)
        assert CONF.read_text().endswith("# edited by the operator\n")
    finally:
        CONF.write_text(original)


def test_man_pages(package):
    man1 = Path("/usr/share/man/man1")
    for page in ("cutover", "cutover-run", "cutover-check", "cutover-upgrade",
                 "cutover-healthcheck", "cutover-config-dump"):
        assert (man1 / f"{page}.1.gz").is_file(), f"{page}.1.gz not installed"
    assert not (man1 / "cutover-generate.1.gz").exists(), "the hidden command has no page"
    text = run(["zcat", man1 / "cutover.1.gz"]).stdout
    assert text.startswith(".ie") or ".TH cutover 1" in text, text[:200]
    assert "upgrade" in text and "healthcheck" in text
    if shutil.which("man"):
        where = run(["man", "-w", "cutover"], check=False)
        assert where.returncode == 0 and where.stdout.strip() == str(man1 / "cutover.1.gz"), \
            f"man -w cutover: {where.stdout}{where.stderr}"


def test_shell_completions(package):
    bash = "/usr/share/bash-completion/completions/cutover"
    cp = run(["bash", "-c", f"source {bash}; complete -p cutover"])
    assert "cutover" in cp.stdout and cp.stdout.startswith("complete "), cp.stdout
    # the completion function itself works without the bash-completion package
    cp = run(["bash", "-c", f"source {bash}; COMP_WORDS=(cutover up); COMP_CWORD=1; "
              "COMP_LINE='cutover up'; COMP_POINT=10; _cutover cutover up cutover; "
              "printf '%s\\n' \"${COMPREPLY[@]}\""])
    assert "upgrade" in cp.stdout.split(), cp.stdout
    zsh = Path("/usr/share/zsh/vendor-completions/_cutover")
    fish = Path("/usr/share/fish/vendor_completions.d/cutover.fish")
    assert zsh.read_text().startswith("#compdef cutover")
    assert "complete -c cutover" in fish.read_text()


def test_unit_and_user(package):
    files = run(["dpkg", "-L", PKG]).stdout.splitlines()
    assert str(UNIT) in files and str(RELOAD) in files
    unit = UNIT.read_text()
    settings = {}
    for line in unit.splitlines():
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            settings.setdefault(k.strip(), []).append(v.strip())
    expect = {
        "Type": "notify", "NotifyAccess": "exec", "WatchdogSec": "30s",
        "ExecStart": f"{BIN} run --config {CONF}", "ExecReload": f"{RELOAD} {CONF}",
        "User": "cutover", "RuntimeDirectory": "cutover", "KillMode": "control-group",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE", "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "RestrictNamespaces": "yes",
        "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native", "SystemCallFilter": "@system-service",
        "LimitNOFILE": "65536",
    }
    for key, value in expect.items():
        assert settings.get(key) == [value], f"{key}={settings.get(key)} in {UNIT}"
    # stop must outlast the drain (30 s) plus the 5 s to close what is left
    assert int(settings["TimeoutStopSec"][0].rstrip("s")) > 35

    # systemd-analyze verify: environment complaints are tolerated, syntax errors are
    # not (systemd prints those as "<file>:<line>: ...")
    if shutil.which("systemd-analyze"):
        for path in (UNIT, SOCKET_EXAMPLE):
            target = path
            if path == SOCKET_EXAMPLE:
                # verified under the name an operator would install it as
                d = Path(run(["mktemp", "-d"]).stdout.strip())
                target = d / "cutover-imaps.socket"
                shutil.copy(path, target)
            cp = run(["systemd-analyze", "verify", target], check=False, timeout=60)
            out = cp.stdout + cp.stderr
            syntax = [l for l in out.splitlines() if re.match(rf"^{re.escape(str(target))}:\d+:", l)]
            assert not syntax, f"systemd-analyze verify {target}:\n{out}"
            assert "Unknown" not in out and "Failed to parse" not in out, out
            if path == SOCKET_EXAMPLE:
                shutil.rmtree(target.parent)

    # the system user, without a login
    user = pwd.getpwnam("cutover")
    assert user.pw_uid < 1000 and user.pw_shell in ("/usr/sbin/nologin", "/bin/false")
    # the helper is a valid shell script
    run(["sh", "-n", RELOAD])
    # the package enabled the unit (symlink created by deb-systemd-helper)
    assert os.path.islink("/etc/systemd/system/multi-user.target.wants/cutover.service")


class FakeNotify:
    """A datagram socket standing in for systemd's: records (sender pid, fields)."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o666)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.messages = []
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        space = socket.CMSG_SPACE(12) + socket.CMSG_SPACE(4 * 16)
        while not self._stop:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, space)
            except socket.timeout:
                continue
            except OSError:
                return
            pid = None
            for level, kind, payload in anc:
                if kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iii", payload[:12])[0]
                elif kind == socket.SCM_RIGHTS:  # systemd-notify's barrier fd: "processed"
                    for i in range(len(payload) // 4):
                        os.close(struct.unpack("i", payload[4 * i:4 * i + 4])[0])
            fields = dict(l.split("=", 1) for l in data.decode().splitlines() if "=" in l)
            self.messages.append((time.monotonic(), pid, fields))

    def wait(self, pred, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in list(self.messages):
                if pred(m):
                    return m
            time.sleep(0.05)
        return None

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def greeting(port, timeout=5):
    with socket.create_connection((SIM_IP, port), timeout=timeout) as s:
        return s.recv(200)


@pytest.fixture
def shared_tmp():
    """A temp dir the cutover user can reach (pytest's tmp_path is under a 0700 dir)."""
    d = Path(tempfile.mkdtemp(prefix="cutover-package-", dir=os.environ.get("CUTOVER_E2E_TMP")))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_reload_helper_reloads_and_upgrades(package, shared_tmp):
    """/usr/libexec/cutover/reload as systemd runs it (user cutover, no capability,
    $MAINPID, $NOTIFY_SOCKET): SIGHUP while the binary is unchanged; once /usr/bin/cutover
    was replaced, a hand-over to a new process that the helper itself (the control
    process) names with MAINPID= and READY=1, the watchdog settings passed on."""
    tmp_path = shared_tmp
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.chown(run_dir, "cutover", "cutover")
    config = tmp_path / "routes.yaml"
    text = CONF.read_text()
    text = text.replace("127.0.0.1:", f"{SIM_IP}:")
    text = re.sub(r"127\.0\.0\.1[0-2]:", f"{DEAD_IP}:", text)
    text = text.replace("/run/cutover/upgrade.sock", str(run_dir / "upgrade.sock"))
    text = text.replace("drain_timeout: 30s", "drain_timeout: 2s")
    config.write_text(text)
    config.chmod(0o644)
    run([BIN, "check", "--config", config])

    notify = FakeNotify(tmp_path / "notify.sock")
    as_service = ["setpriv", "--reuid=cutover", "--regid=cutover", "--init-groups",
                  "--inh-caps=-all", "--bounding-set=-all"]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NOTIFY_SOCKET": notify.path,
           "RUNTIME_DIRECTORY": str(run_dir)}
    log = open(tmp_path / "cutover.log", "w")
    main = subprocess.Popen(
        [*as_service, "sh", "-c", f"export WATCHDOG_PID=$$; exec {BIN} run --config {config}"],
        env=dict(env, WATCHDOG_USEC="3000000"), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    new_pid = None
    try:
        assert notify.wait(lambda m: m[1] == main.pid and m[2].get("READY") == "1"), \
            (tmp_path / "cutover.log").read_text()
        assert greeting(10143).startswith(b"* OK")

        def helper():
            out = tmp_path / "helper.log"
            with open(out, "w") as f:
                # stdout to a file, as the journal would be: the new process keeps it
                h = subprocess.Popen([*as_service, RELOAD, config], env=dict(env, MAINPID=str(main.pid)),
                                     stdin=subprocess.DEVNULL, stdout=f, stderr=f)
                rc = h.wait(timeout=90)
            return h.pid, rc, out.read_text()

        # 1. the binary is the one running: a configuration reload
        mark = time.monotonic()
        pid, rc, out = helper()
        assert rc == 0, out
        assert notify.wait(lambda m: m[0] > mark and m[1] == main.pid and "RELOADING" in m[2]
                           and "MONOTONIC_USEC" in m[2]), notify.messages
        assert notify.wait(lambda m: m[0] > mark and m[1] == main.pid and m[2].get("READY") == "1")
        assert main.poll() is None

        # 2. the package manager replaced the binary: a zero-downtime upgrade
        shutil.copy2(BIN, f"{BIN}.dpkg-new")
        os.replace(f"{BIN}.dpkg-new", BIN)
        assert os.readlink(f"/proc/{main.pid}/exe").endswith(" (deleted)")
        stop = threading.Event()
        failures = []

        def connect_loop():
            while not stop.is_set():
                try:
                    if not greeting(10143, timeout=3).startswith(b"* OK"):
                        failures.append("bad greeting")
                except OSError as e:
                    failures.append(repr(e))
                time.sleep(0.01)

        t = threading.Thread(target=connect_loop, daemon=True)
        t.start()
        mark = time.monotonic()
        pid, rc, out = helper()
        time.sleep(0.5)
        stop.set()
        t.join(5)
        assert rc == 0, out
        m = re.search(r"upgraded: pid (\d+) serves, pid (\d+) drains", out)
        assert m and int(m.group(2)) == main.pid, out
        new_pid = int(m.group(1))
        assert not failures, f"connections failed during the upgrade: {failures[:5]}"
        # The helper names the new process, from its own PID: under NotifyAccess=exec
        # systemd accepts this only from the control process (the new process's own
        # MAINPID= message, and the old one's STOPPING=1 once it is no longer the main
        # process, are refused).
        named = notify.wait(lambda m: m[0] > mark and m[1] == pid and "MAINPID" in m[2])
        assert named, notify.messages[-8:]
        assert named[2].get("MAINPID") == str(new_pid) and named[2].get("READY") == "1", named
        # the new process pings the watchdog (WATCHDOG_USEC passed on, 3 s -> every 1 s)
        assert notify.wait(lambda m: m[1] == new_pid and m[2].get("WATCHDOG") == "1", timeout=5), \
            notify.messages[-8:]
        # it runs as the service user, the old process drains and exits
        assert os.stat(f"/proc/{new_pid}").st_uid == pwd.getpwnam("cutover").pw_uid
        assert main.wait(timeout=15) == 0
        assert greeting(10143).startswith(b"* OK")
    finally:
        for p in (new_pid, main.pid if main.poll() is None else None):
            if p:
                try:
                    os.kill(p, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        if new_pid:
            deadline = time.monotonic() + 10
            while not gone(new_pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        try:
            main.wait(timeout=10)
        except subprocess.TimeoutExpired:
            main.kill()
        log.close()
        notify.close()


def test_remove_then_purge(package):
    dpkg("-r", PKG)
    assert not BIN.exists(), "dpkg -r left the binary"
    assert CONF.exists(), "dpkg -r must keep the conffile"
    assert run(["dpkg-query", "-W", "-f=${Status}", PKG]).stdout == "deinstall ok config-files"
    dpkg("-P", PKG)
    assert run(["dpkg-query", "-W", PKG], check=False).returncode != 0
    assert leftovers() == []
