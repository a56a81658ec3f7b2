"""A real syslog receiver for the tests: Debian's ``rsyslogd``, unprivileged, in a temporary directory.

It listens on 127.0.0.1 with ``imtcp`` (octet-counted framing, RFC 6587) in plain TCP or TLS (the
``ossl`` network stream driver, with a certificate the test issues from the KME's site CA) and
writes each message's MSG part, one per line, to ``received.log``. The tests kill it with SIGKILL
mid-stream and start it again on the same port.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"


def rsyslog_available() -> tuple[bool, str]:
    if not Path(RSYSLOGD).exists():
        return False, "rsyslogd not installed (Debian package rsyslog)"
    if not list(Path("/usr/lib").glob("*/rsyslog/lmnsd_ossl.so")):
        return False, "rsyslog's OpenSSL driver not installed (Debian package rsyslog-openssl)"
    return True, ""


class Rsyslog:
    def __init__(self, directory: Path, port: int, tls: tuple[Path, Path, Path] | None = None) -> None:
        """``tls``: (CA, certificate, key) PEM files for a TLS listener."""
        self.directory = directory
        self.port = port
        self.tls = tls
        self.output = directory / "received.log"
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "rsyslog.conf").write_text(self._config())

    def _config(self) -> str:
        lines = [f'global(workDirectory="{self.directory}" maxMessageSize="256k" net.enableDNS="off"']
        if self.tls is not None:
            ca, cert, key = self.tls
            lines[0] += (
                f' defaultNetstreamDriver="ossl" defaultNetstreamDriverCAFile="{ca}"'
                f' defaultNetstreamDriverCertFile="{cert}" defaultNetstreamDriverKeyFile="{key}"'
            )
        lines[0] += ")"
        if self.tls is not None:
            lines.append(
                'module(load="imtcp" streamDriver.name="ossl" streamDriver.mode="1" streamDriver.authMode="anon")'
            )
        else:
            lines.append('module(load="imtcp")')
        lines += [
            'template(name="msgonly" type="string" string="%msg%\\n")',
            f'input(type="imtcp" address="127.0.0.1" port="{self.port}" ruleset="siem")',
            'ruleset(name="siem") {',
            f'  action(type="omfile" file="{self.output}" template="msgonly")',
            "}",
        ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15.0) -> None:
        pidfile = self.directory / "rsyslogd.pid"
        pidfile.unlink(missing_ok=True)
        log = (self.directory / "rsyslogd.stderr").open("ab")
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.directory / "rsyslog.conf"), "-i", str(pidfile)],
            stdout=log,
            stderr=log,
            cwd=self.directory,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rsyslogd exited: {self.stderr_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rsyslogd not listening: {self.stderr_tail()}") from None
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye, as a crashing receiver."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def stderr_tail(self) -> str:
        path = self.directory / "rsyslogd.stderr"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def lines(self) -> list[dict[str, Any]]:
        """Every audit line received so far (a partial last line is left for later)."""
        if not self.output.exists():
            return []
        text = self.output.read_text(encoding="ascii")
        return [json.loads(line) for line in text.split("\n")[:-1] if line]
