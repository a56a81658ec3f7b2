"""Every code name the docs cite exists (issue 14: docs/ARCHITECTURE.md named functions that no longer
existed, and DESIGN.md references pointed outside the repository).

Checked in docs/*.md and README.md, inside backticks: paths (``kms/service/get_keys.py``), dotted
names (``kms.service.expiry.close_redelivery_windows``, ``kms.api.routes.keys.KeyHandlers.enc_keys``),
file names (``anchors.py``), and ``module.name`` where ``module`` is the stem of exactly one module
(``pool_repository.cut_keys``) and not a config section or message prefix (``audit.checkpoint_seconds``
is a setting, ``blocks.announce`` a peer message). Names are resolved with ``ast``, nothing imported.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
CODE = ("kms", "qkd_adapters")
TOKEN = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(r"^(kms|qkd_adapters)(\.[A-Za-z_]\w*)+$")
SHORT = re.compile(r"^[a-z_]\w*(\.[A-Za-z_]\w*)+$")
FILE = re.compile(r"^[\w-]+\.py$")
PATH = re.compile(r"^((?:kms|qkd_adapters|tests|benchmarks|scripts|migrations|docker)/[\w./-]*)")
# First parts that name settings sections, peer messages or audit actions, not modules.
NOT_MODULES = {
    "audit", "blocks", "database", "kek", "keys", "kme", "links", "logging", "peering", "pieces",
    "policy", "pool", "server", "tls", "operator", "access", "link", "topology", "sae", "sae_registry", "quotas",
}  # fmt: skip


def _module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def _names(path: Path) -> dict[str, ast.AST]:
    return _scope(ast.parse(path.read_text(encoding="utf-8")).body)


def _scope(body: list[ast.stmt]) -> dict[str, ast.AST]:
    out: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out.update((t.id, node) for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            out.update(((a.asname or a.name).split(".")[0], node) for a in node.names)
    return out


def resolve(dotted: str) -> str | None:
    """None if ``dotted`` names a module or something defined in one; else what is missing."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        path = _module_file(parts[:i])
        if path is None:
            continue
        scope = _names(path)
        for j, name in enumerate(parts[i:]):
            node = scope.get(name)
            if node is None:
                return f"{name!r} is not defined in {'.'.join(parts[: i + j])}"
            scope = _scope(node.body) if isinstance(node, ast.ClassDef) else {}
        return None
    return "no such module"


@cache
def _stems() -> dict[str, list[Path]]:
    stems: dict[str, list[Path]] = defaultdict(list)
    for package in CODE:
        for path in (ROOT / package).rglob("*.py"):
            stems[path.stem].append(path)
    return stems


def _problem(token: str) -> str | None:
    token = token.strip().removesuffix("()")
    if "*" in token and PATH.match(token):
        return None if any(ROOT.glob(token)) else "no file matches"
    if m := PATH.match(token):
        path = m.group(1).rstrip("./").split("::")[0]
        if "<" in token:
            return None
        return None if (ROOT / path).exists() else "no such path"
    if DOTTED.match(token):
        return resolve(token)
    if FILE.match(token):
        return None if token[:-3] in _stems() or any(ROOT.rglob(token)) else "no such file"
    if SHORT.match(token):
        first = token.split(".")[0]
        found = _stems().get(first, [])
        if first in NOT_MODULES or len(found) != 1:
            return None
        module = ".".join(found[0].relative_to(ROOT).with_suffix("").parts)
        return resolve(module + token[len(first) :])
    return None


def test_every_code_name_in_the_docs_exists() -> None:
    problems = []
    for doc in DOCS:
        for lineno, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for token in TOKEN.findall(line):
                why = _problem(token)
                if why:
                    problems.append(f"{doc.relative_to(ROOT)}:{lineno}: `{token}`: {why}")
    assert not problems, "docs name code that does not exist:\n" + "\n".join(problems)


def test_the_checker_catches_what_it_should() -> None:
    assert _problem("kms.service.expiry.close_redelivery_windows") is None
    assert _problem("kms/service/get_keys.py") is None
    assert _problem("kms.storage.pool_repository.reserve_keys") is not None  # the name ARCHITECTURE had
    assert _problem("pool_repository.reserve_keys") is not None
    assert _problem("kms/simdevice/app.py") is not None
    assert _problem("kms.audit.service.AuditService") is not None  # moved to kms.service.audit_queries
    assert _problem("kms/service/peer_*.py") is None and _problem("kms/service/nope_*.py") is not None
    assert _problem("audit.checkpoint_seconds") is None  # a setting, not a module
