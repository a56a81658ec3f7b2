"""The optional liboqs backend: safe detection (never importing ``oqs`` blind) and interoperability.

Detection tests run everywhere, in subprocesses with a *poisoned* ``oqs`` package first on the path
(importing it writes a marker and hard-exits), so they prove the import never happens when no liboqs
library can be loaded. Interop tests need a real liboqs and skip with the reason otherwise; point
``OQS_INSTALL_PATH`` at a liboqs install (and install liboqs-python) to run them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kms.crypto.pqc import (
    BackendUnavailableError,
    KemAlgorithm,
    SignatureAlgorithm,
    available_backends,
    liboqs_backend,
)
from kms.crypto.pqc.liboqs_backend import LiboqsLocation, find_liboqs

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import json, sys
from kms.crypto.pqc import available_backends, get_kem_provider
from kms.crypto.pqc.liboqs_backend import find_liboqs
reports = {r.name: r for r in available_backends()}
get_kem_provider()  # the default backend still works
print(json.dumps({
    "liboqs_available": reports["liboqs"].available,
    "reason": reports["liboqs"].reason,
    "oqs_imported": "oqs" in sys.modules,
    "found": find_liboqs()[0] is not None,
}))
"""


def _run_probe(tmp_path: Path, install_dir: Path) -> tuple[dict[str, object], Path]:
    poison = tmp_path / "poison" / "oqs"
    poison.mkdir(parents=True)
    marker = tmp_path / "oqs-was-imported"
    (poison / "__init__.py").write_text(
        f"import os\nopen({str(marker)!r}, 'w').write('imported')\nos._exit(97)\n"
    )
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(poison.parent), str(ROOT)]),
        OQS_INSTALL_PATH=str(install_dir),
        HOME=str(home),
    )
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"probe exited {proc.returncode}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), marker


def _system_liboqs() -> bool:
    import ctypes.util

    return bool(ctypes.util.find_library("oqs") or ctypes.util.find_library("liboqs"))


@pytest.mark.skipif(
    _system_liboqs(), reason="a system-wide liboqs is installed, so absence cannot be simulated"
)
def test_absent_library_means_oqs_is_never_imported(tmp_path: Path) -> None:
    empty = tmp_path / "empty-oqs-install"
    empty.mkdir()
    result, marker = _run_probe(tmp_path, empty)
    assert not marker.exists(), "the poisoned oqs module was imported"
    assert result["oqs_imported"] is False
    assert result["found"] is False
    assert result["liboqs_available"] is False
    assert "not found" in str(result["reason"])


@pytest.mark.skipif(
    _system_liboqs(), reason="a system-wide liboqs is installed, so absence cannot be simulated"
)
def test_unloadable_library_file_is_rejected_before_import(tmp_path: Path) -> None:
    install = tmp_path / "broken-install"
    (install / "lib").mkdir(parents=True)
    (install / "lib" / "liboqs.so").write_bytes(b"this is not an ELF file")
    result, marker = _run_probe(tmp_path, install)
    assert not marker.exists(), "the poisoned oqs module was imported"
    assert result["oqs_imported"] is False
    assert result["liboqs_available"] is False
    assert "cannot load" in str(result["reason"])


def test_importing_the_package_does_not_import_oqs() -> None:
    code = "import sys, kms.crypto.pqc, kms.cli.doctor; print('oqs' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stdout.strip() == "False"


# ---- with a real liboqs -------------------------------------------------------------------------

_location, _reason = find_liboqs()
needs_liboqs = pytest.mark.skipif(
    _location is None,
    reason=f"liboqs backend not testable: {_reason} (set OQS_INSTALL_PATH to a liboqs install)",
)


@needs_liboqs
def test_liboqs_is_usable_only_after_full_interop() -> None:
    report = {r.name: r for r in available_backends()}["liboqs"]
    assert report.available, report.reason
    assert report.self_test_passed and report.interop_passed
    checks = {(r.algorithm, r.check) for r in report.interop}
    for kem_alg in KemAlgorithm:
        assert (kem_alg, "same_public_key_from_seed") in checks
        assert (kem_alg, "encapsulate pyca -> decapsulate liboqs") in checks
        assert (kem_alg, "encapsulate liboqs -> decapsulate pyca") in checks
    for sig_alg in SignatureAlgorithm:
        assert (sig_alg, "same_public_key_from_seed") in checks
        assert (sig_alg, "sign pyca -> verify liboqs") in checks
        assert (sig_alg, "sign liboqs -> verify pyca") in checks


@needs_liboqs
@pytest.mark.parametrize("alg", list(SignatureAlgorithm))
def test_liboqs_seeded_ml_dsa_keygen_matches_pyca(alg: SignatureAlgorithm) -> None:
    from kms.crypto.pqc import get_signature_provider

    pyca, liboqs = get_signature_provider("pyca"), get_signature_provider("liboqs")
    for _ in range(5):
        seed = os.urandom(32)
        assert liboqs.public_key_from_seed(alg, seed) == pyca.public_key_from_seed(alg, seed)


@needs_liboqs
def test_liboqs_restores_system_rng_after_seeded_keygen() -> None:
    """After a seeded key generation liboqs must draw real randomness again, not the seed."""
    from kms.crypto.pqc import get_kem_provider, get_signature_provider

    seed = b"\x07" * 32
    get_signature_provider("liboqs").public_key_from_seed(SignatureAlgorithm.ML_DSA_65, seed)
    kem = get_kem_provider("liboqs")
    pair = kem.generate(KemAlgorithm.ML_KEM_768)
    (ct1, ss1), (ct2, ss2) = (
        kem.encapsulate(pair.algorithm, pair.public_key),
        kem.encapsulate(pair.algorithm, pair.public_key),
    )
    assert ct1 != ct2 and ss1 != ss2


def _pretend_found(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = LiboqsLocation(path="/nonexistent/liboqs.so", found_by="test", version="0.0.0")
    monkeypatch.setattr(liboqs_backend, "find_liboqs", lambda: (fake, ""))
    monkeypatch.delitem(sys.modules, "oqs", raising=False)
    monkeypatch.delitem(sys.modules, "oqs.oqs", raising=False)


def test_systemexit_from_oqs_import_is_contained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """liboqs-python ends with ``raise SystemExit`` when it cannot load or build liboqs."""
    pkg = tmp_path / "oqs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise SystemExit('Could not load liboqs shared library')\n")
    _pretend_found(monkeypatch)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendUnavailableError, match="exited the interpreter"):
        liboqs_backend.load_liboqs_providers()
    assert "oqs" not in sys.modules


def test_missing_liboqs_python_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend_found(monkeypatch)
    monkeypatch.setitem(sys.modules, "oqs", None)  # makes ``import oqs`` raise ImportError
    with pytest.raises(BackendUnavailableError, match="liboqs-python is not installed"):
        liboqs_backend.load_liboqs_providers()


def test_import_output_is_kept_off_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """liboqs-python prints at import; a ``doctor --json`` report must stay valid JSON."""
    pkg = tmp_path / "oqs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import logging, sys\n"
        "log = logging.getLogger('oqs.oqs')\n"
        "log.addHandler(logging.StreamHandler(sys.stdout))\n"
        "log.warning('liboqs-python faulthandler is disabled')\n"
        "print('chatter')\n"
        "def oqs_version(): return '0.0.0'\n"
        "def oqs_python_version(): return '0.0.0'\n"
        "def get_enabled_kem_mechanisms(): return ()\n"
        "def get_enabled_sig_mechanisms(): return ()\n"
        "class Signature:\n"
        "    def sign_with_ctx_str(self): ...\n"
        "    def verify_with_ctx_str(self): ...\n"
    )
    _pretend_found(monkeypatch)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendUnavailableError, match="lacks ML-KEM-768"):
        liboqs_backend.load_liboqs_providers()
    assert capsys.readouterr().out == ""
    assert not logging.getLogger("oqs.oqs").handlers
