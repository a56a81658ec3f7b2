"""Throwaway SoftHSM2 tokens for tests of the PKCS#11 KEK (docs/DECISIONS.md D-7).

A ``SoftHsm`` owns a fresh temporary directory holding its own ``softhsm2.conf`` and token
directory, and points ``SOFTHSM2_CONF`` at it for as long as it runs. ``init_token`` creates a token
there with ``softhsm2-util --init-token --free`` and random PINs, and returns a ``SoftHsmToken``
``(module, label, pin)``. ``stop()`` removes everything and restores the environment.

The PKCS#11 library is loaded in-process and python-pkcs11 keeps one initialised library per path
for the whole process; SoftHSM reads ``SOFTHSM2_CONF`` and scans its token directory only in
``C_Initialize``. So after creating a token, ``init_token`` re-initialises the in-process library
(``C_Finalize`` + ``C_Initialize``) so that it sees the current configuration and the new token, and
``stop()`` finalises it so the next ``SoftHsm`` starts clean. Several tokens in one ``SoftHsm`` (one
conf, one token directory) is the simple way to use more than one token in a test session; open
PKCS#11 sessions do not survive ``init_token``.

Typical use::

    from tests.support.softhsm import softhsm_token

    token = pytest.fixture(scope="module")(softhsm_token)

Environment:
  QKMS_SOFTHSM_MODULE     path of libsofthsm2.so (overrides discovery)
  QKMS_REQUIRE_SOFTHSM    if "1", tests must fail rather than skip when SoftHSM2 is missing
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

__all__ = [
    "SoftHsm",
    "SoftHsmError",
    "SoftHsmToken",
    "find_softhsm_module",
    "softhsm_available",
    "softhsm_required",
    "softhsm_token",
]

_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",  # Debian/Ubuntu (symlink into the multiarch dir)
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",  # Fedora
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)
_UTIL = "softhsm2-util"
_CONF_ENV = "SOFTHSM2_CONF"


class SoftHsmError(RuntimeError):
    """softhsm2-util failed; the message carries its output (never the PINs)."""


class SoftHsmToken(NamedTuple):
    module: Path
    label: str
    pin: str


def find_softhsm_module() -> Path | None:
    """libsofthsm2.so: $QKMS_SOFTHSM_MODULE, else the first known install location that exists."""
    override = os.environ.get("QKMS_SOFTHSM_MODULE")
    if override:
        return Path(override) if Path(override).is_file() else None
    for candidate in _MODULE_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    return None


def softhsm_available() -> tuple[bool, str]:
    """(True, "") when the SoftHSM2 library and softhsm2-util are installed, else (False, why)."""
    module = find_softhsm_module()
    if module is None:
        where = os.environ.get("QKMS_SOFTHSM_MODULE") or ", ".join(_MODULE_CANDIDATES)
        return False, f"libsofthsm2.so not found (looked at {where}); apt-get install softhsm2"
    if shutil.which(_UTIL) is None:
        return False, f"{_UTIL} not on PATH; apt-get install softhsm2"
    return True, ""


def softhsm_required() -> bool:
    """True when a missing SoftHSM2 must fail the tests instead of skipping them (CI)."""
    return os.environ.get("QKMS_REQUIRE_SOFTHSM") == "1"


class SoftHsm:
    """A SoftHSM2 configuration and token directory in a fresh temporary directory."""

    def __init__(self, tmp_parent: Path | None = None) -> None:
        module = find_softhsm_module()
        if module is None:
            raise SoftHsmError(softhsm_available()[1])
        self.module: Path = module
        self._tmp_parent = tmp_parent
        self.root: Path | None = None
        self.so_pins: dict[str, str] = {}
        self._saved_conf: str | None = None
        self._lib_touched = False

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> SoftHsm:
        if self.root is not None:
            raise SoftHsmError("SoftHsm already started")
        self.root = Path(tempfile.mkdtemp(prefix="qkms-softhsm-", dir=self._tmp_parent))
        tokendir = self.root / "tokens"
        tokendir.mkdir(mode=0o700)
        conf = self.root / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {tokendir}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
        )
        self._saved_conf = os.environ.get(_CONF_ENV)
        os.environ[_CONF_ENV] = str(conf)
        return self

    def stop(self) -> None:
        if self.root is None:
            return
        if self._lib_touched:
            self._finalize_library()
        if self._saved_conf is None:
            os.environ.pop(_CONF_ENV, None)
        else:
            os.environ[_CONF_ENV] = self._saved_conf
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None
        self.so_pins.clear()

    def __enter__(self) -> SoftHsm:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------- tokens

    @property
    def conf(self) -> Path:
        if self.root is None:
            raise SoftHsmError("SoftHsm not started")
        return self.root / "softhsm2.conf"

    def init_token(self, label: str, pin: str | None = None, so_pin: str | None = None) -> SoftHsmToken:
        """Initialise a token in the first free slot; random PINs unless given."""
        env = {**os.environ, _CONF_ENV: str(self.conf)}
        pin = pin if pin is not None else secrets.token_hex(8)
        so_pin = so_pin if so_pin is not None else secrets.token_hex(8)
        proc = subprocess.run(
            [_UTIL, "--init-token", "--free", "--label", label, "--so-pin", so_pin, "--pin", pin],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            output = (proc.stdout + proc.stderr).replace(pin, "***").replace(so_pin, "***")
            raise SoftHsmError(f"{_UTIL} --init-token failed ({proc.returncode}): {output.strip()}")
        self.so_pins[label] = so_pin
        self._reinitialize_library()
        return SoftHsmToken(self.module, label, pin)

    # ---------------------------------------------------------------- in-process library

    def _reinitialize_library(self) -> None:
        """Make the in-process library re-read SOFTHSM2_CONF and rescan the token directory."""
        import pkcs11

        lib = pkcs11.lib(str(self.module))  # loads (and initialises) it if this is the first use
        lib.reinitialize()
        self._lib_touched = True

    def _finalize_library(self) -> None:
        import pkcs11

        lib = pkcs11.lib(str(self.module))
        if lib.initialized:
            lib.finalize()


def softhsm_token(tmp_parent: Path | None = None, label: str = "qkms-test") -> Iterator[SoftHsmToken]:
    """Generator for a fixture: one token in a fresh SoftHSM2 directory, removed afterwards."""
    with SoftHsm(tmp_parent) as hsm:
        yield hsm.init_token(label)
