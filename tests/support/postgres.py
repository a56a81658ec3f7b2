"""A real, throwaway PostgreSQL server for tests.

Storage code is tested against the real engine rather than SQLite so that locking, isolation and
SQL dialect match production. Each ``PostgresServer`` runs ``initdb`` into a fresh temporary
directory, listens on 127.0.0.1 only (trust auth, so no passwords in tests) on a free port, and
is removed completely on ``stop()``.

PostgreSQL refuses to run as root, so when the test process is root the server binaries run as
the ``postgres`` OS user through ``runuser``; the temporary directory is then chowned to that user
and every ancestor directory must be traversable by it (``/tmp`` is, ``/root`` is not).

Typical use from ``tests/conftest.py``::

    from tests.support.postgres import postgres_server

    pg_server = pytest.fixture(scope="session")(postgres_server)

Environment:
  QKMS_PG_BINDIR          directory holding initdb/pg_ctl/postgres (overrides discovery)
  QKMS_PG_TMPDIR          parent directory for the server's temporary directory
  QKMS_REQUIRE_POSTGRES   if "1", a missing server is an error instead of a skip (for CI)
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

__all__ = [
    "PostgresServer",
    "PostgresStartError",
    "find_pg_bindir",
    "postgres_available",
    "postgres_server",
]

_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_SERVER_OS_USER = "postgres"  # used only when we are root
_DB_SUPERUSER = "postgres"  # same role name everywhere, so DSNs look alike in CI and locally
_IDENT_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; leave room for "/.s.PGSQL.NNNNN"


class PostgresStartError(RuntimeError):
    """The server could not be initialised or started; the message carries the server log tail."""


# --------------------------------------------------------------------------- discovery


def _has_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.name  # /usr/lib/postgresql/<version>/bin
    return tuple(int(p) for p in re.findall(r"\d+", version)) or (0,)


def find_pg_bindir() -> Path | None:
    """Locate the PostgreSQL server binaries: $QKMS_PG_BINDIR, pg_config, then the newest Debian dir."""
    override = os.environ.get("QKMS_PG_BINDIR")
    if override:
        return Path(override) if _has_binaries(Path(override)) else None
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            if out and _has_binaries(Path(out)):
                return Path(out)
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if _has_binaries(Path(candidate)):
            return Path(candidate)
    initdb = shutil.which("initdb")
    if initdb and _has_binaries(Path(initdb).parent):
        return Path(initdb).parent
    return None


def postgres_available() -> tuple[bool, str]:
    """Say whether a server can be started here and, if not, why (for ``pytest.skip`` reasons)."""
    bindir = find_pg_bindir()
    if bindir is None:
        where = os.environ.get("QKMS_PG_BINDIR") or "pg_config --bindir, /usr/lib/postgresql/*/bin, PATH"
        return False, f"PostgreSQL server binaries ({', '.join(_REQUIRED_BINARIES)}) not found in {where}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(_SERVER_OS_USER)
        except KeyError:
            return False, f"running as root but there is no {_SERVER_OS_USER!r} OS user to run PostgreSQL"
        if shutil.which("runuser") is None:
            return False, "running as root but runuser(1) is not available to drop privileges"
    return True, f"PostgreSQL binaries in {bindir}"


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _can_traverse(path: Path, user: pwd.struct_passwd) -> bool:
    """True if ``user`` can search every directory from / down to ``path`` (mode bits only)."""
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for directory in [path, *path.parents]:
        st = directory.stat()
        if user.pw_uid == 0:
            continue
        if st.st_uid == user.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            return False
    return True


def _clean_env() -> dict[str, str]:
    """Environment for server binaries: no inherited PG* settings, a predictable C locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"
    return "\n".join(text.splitlines()[-lines:]) or "<empty log>"


# --------------------------------------------------------------------------- server


class PostgresServer:
    """One PostgreSQL instance in a private temporary directory; see the module docstring."""

    def __init__(
        self,
        *,
        bindir: Path | None = None,
        max_connections: int = 200,
        extra_settings: dict[str, str] | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self._bindir = bindir
        self.max_connections = max_connections
        self.extra_settings = dict(extra_settings or {})
        self.startup_timeout = startup_timeout
        self.user = _DB_SUPERUSER
        self.host = "127.0.0.1"
        self._port: int | None = None
        self._tmp: Path | None = None
        self._running = False
        self._as_root = os.geteuid() == 0

    # ---- paths / properties

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def base_dir(self) -> Path:
        """The temporary directory holding data, socket and log (removed by ``stop()``)."""
        if self._tmp is None:
            raise RuntimeError("server not started")
        return self._tmp

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "sock"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "postgres.log"

    @property
    def running(self) -> bool:
        return self._running

    def dsn(self, dbname: str = "qkms") -> str:
        """SQLAlchemy URL (psycopg 3 driver) for ``dbname`` over TCP on 127.0.0.1, trust auth."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{dbname}"

    def libpq_dsn(self, dbname: str = "qkms") -> str:
        """Plain libpq URI for ``psycopg.connect`` and command-line tools."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    # ---- lifecycle

    def start(self) -> PostgresServer:
        if self._running:
            return self
        bindir = self._bindir or find_pg_bindir()
        if bindir is None:
            raise PostgresStartError(postgres_available()[1])
        self._bindir = bindir
        ok, reason = postgres_available()
        if not ok:
            raise PostgresStartError(reason)
        self._make_tmp()
        try:
            self._initdb()
            self._start_with_port_retries()
            self._wait_ready()
            self.create_database("qkms")
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Fast shutdown (disconnects clients, no checkpoint wait) and remove the temp directory."""
        if self._tmp is None:
            return
        try:
            if self._running or (self.data_dir / "postmaster.pid").exists():
                self._pg_ctl_stop()
        finally:
            self._running = False
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            atexit.unregister(self.stop)

    def halt(self, mode: str = "fast") -> None:
        """Stop the server (``pg_ctl stop -m fast|immediate``) but keep its data and port, so an
        outage test can bring the same cluster back with ``resume()``; ``immediate`` is a crash
        (no shutdown checkpoint: the next start runs WAL recovery)."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown pg_ctl stop mode {mode!r}")
        if not self._running:
            return
        proc = self._run(
            self._cmd("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "30", "stop"), timeout=60
        )
        if proc.returncode != 0:
            raise PostgresStartError(f"pg_ctl stop -m {mode} failed:\n{proc.stdout[-2000:]}")
        self._running = False

    def resume(self) -> None:
        """Start a halted server again on the same port (clients reconnect to the same address)."""
        if self._running:
            return
        proc = self._run(
            self._cmd(
                "pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-w", "-t", "60", "start"
            ),
            timeout=90,
        )
        if proc.returncode != 0:
            raise PostgresStartError(f"pg_ctl start failed:\n{proc.stdout[-2000:]}\n{_tail(self.log_file)}")
        self._running = True
        self._wait_ready()

    def restart(self, mode: str = "fast") -> None:
        """``halt(mode)`` then ``resume()``: the same cluster back on the same port."""
        self.halt(mode)
        self.resume()

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---- databases

    def create_database(self, name: str) -> str:
        """Create database ``name`` (lower-case identifier) and return its SQLAlchemy DSN."""
        if not _IDENT_RE.match(name):
            raise ValueError(f"database name must match {_IDENT_RE.pattern}: {name!r}")
        import psycopg  # local import: discovery helpers must work without the driver installed

        with psycopg.connect(self.libpq_dsn("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if exists is None:
                conn.execute(f'CREATE DATABASE "{name}"')  # name validated above
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        if not _IDENT_RE.match(name):
            raise ValueError(f"database name must match {_IDENT_RE.pattern}: {name!r}")
        import psycopg

        with psycopg.connect(self.libpq_dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # ---- internals

    def _cmd(self, binary: str, *args: str) -> list[str]:
        assert self._bindir is not None
        cmd = [str(self._bindir / binary), *args]
        if self._as_root:
            return ["runuser", "-u", _SERVER_OS_USER, "--", *cmd]
        return cmd

    def _run(self, cmd: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        # Output goes to a file, not a pipe: the forked postmaster may inherit the descriptors and
        # a pipe would then never reach EOF.
        out_path = self.base_dir / "commands.out"
        with open(out_path, "a+") as out:
            start = out.tell()
            proc = subprocess.run(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,  # the server user must be able to chdir here
                env=_clean_env(),
                timeout=timeout,
                check=False,
            )
            out.seek(start)
            output = out.read()
        return subprocess.CompletedProcess(proc.args, proc.returncode, output, "")

    def _make_tmp(self) -> None:
        parent = os.environ.get("QKMS_PG_TMPDIR") or tempfile.gettempdir()
        if self._as_root:
            user = pwd.getpwnam(_SERVER_OS_USER)
            if not _can_traverse(Path(parent), user):
                # e.g. TMPDIR under /root (0700): the postgres user could not reach its data dir.
                parent = "/tmp"
        tmp = Path(tempfile.mkdtemp(prefix="qkms-pg-", dir=parent))
        if len(str(tmp / "sock")) > _SOCKET_PATH_MAX:
            shutil.rmtree(tmp)
            tmp = Path(tempfile.mkdtemp(prefix="qkms-pg-", dir="/tmp"))
        self._tmp = tmp
        self.socket_dir.mkdir(mode=0o700)
        self.log_file.touch(mode=0o600)
        if self._as_root:
            user = pwd.getpwnam(_SERVER_OS_USER)
            for p in (tmp, self.socket_dir, self.log_file):
                os.chown(p, user.pw_uid, user.pw_gid)

    def _initdb(self) -> None:
        proc = self._run(
            self._cmd(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ),
            timeout=120,
        )
        if proc.returncode != 0:
            raise PostgresStartError(f"initdb failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
        # Only loopback TCP and our private socket; nothing else is accepted.
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n", encoding="ascii"
        )

    def _write_settings(self, port: int) -> None:
        # This throwaway cluster runs without durability (below), which a KME refuses by default
        # (kms.storage.durability): KMEs started from this process (tests, benchmarks) are told to
        # accept it. tests/api/test_durability.py turns it back on to test the refusal.
        os.environ["QKMS_DATABASE__REQUIRE_DURABLE_COMMITS"] = "false"
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": str(self.max_connections),
            # Durability is irrelevant for a throwaway test cluster; speed is not.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "logging_collector": "off",
            "log_min_messages": "warning",
            "timezone": "'UTC'",
        }
        settings.update(self.extra_settings)
        body = "".join(f"{k} = {v}\n" for k, v in settings.items())
        # postgresql.auto.conf is read last, so these win over anything initdb wrote.
        (self.data_dir / "postgresql.auto.conf").write_text(body, encoding="utf-8")

    def _start_with_port_retries(self, attempts: int = 5) -> None:
        last = ""
        for _ in range(attempts):
            port = _free_port()
            self._write_settings(port)
            self.log_file.write_text("")
            proc = self._run(
                self._cmd(
                    "pg_ctl",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_file),
                    "-w",
                    "-t",
                    str(int(self.startup_timeout)),
                    "start",
                ),
                timeout=self.startup_timeout + 30,
            )
            if proc.returncode == 0:
                self._port = port
                self._running = True
                return
            log = _tail(self.log_file)
            last = f"pg_ctl start failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n--- log ---\n{log}"
            if "could not bind" not in log and "Address already in use" not in log:
                break  # not a port race: retrying would just repeat the failure
            self._kill_leftover()
        raise PostgresStartError(last)

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + self.startup_timeout
        last_exc: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.libpq_dsn("postgres"), connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                last_exc = exc
                time.sleep(0.1)
        raise PostgresStartError(
            f"PostgreSQL on 127.0.0.1:{self._port} not ready after {self.startup_timeout:.0f}s: "
            f"{last_exc}\n--- log ---\n{_tail(self.log_file)}"
        )

    def _pg_ctl_stop(self) -> None:
        try:
            proc = self._run(
                self._cmd("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30", "stop"),
                timeout=60,
            )
            if proc.returncode == 0:
                return
        except subprocess.TimeoutExpired:
            pass
        self._kill_leftover()

    def _kill_leftover(self) -> None:
        """Last resort when pg_ctl could not stop the server: SIGKILL the postmaster we started."""
        pidfile = self.data_dir / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().splitlines()[0])
            if Path(f"/proc/{pid}/cmdline").read_bytes().find(str(self.data_dir).encode()) >= 0:
                os.kill(pid, signal.SIGKILL)


def postgres_server() -> Iterator[PostgresServer]:
    """Generator for a pytest fixture: yields a started server and stops it afterwards.

    Skips (``pytest.skip``) only when no PostgreSQL binaries are installed, unless
    QKMS_REQUIRE_POSTGRES=1, in which case that is a hard failure. Any start-up error is raised.
    """
    import pytest

    ok, reason = postgres_available()
    if not ok:
        if os.environ.get("QKMS_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"QKMS_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)
    with PostgresServer() as server:
        yield server
