"""The rings of STYLE.md, kept honest by reading every import with ``ast``.

``RINGS`` places every module under ``broker/`` (recursively) in one ring;
``docs/architecture.md`` shows the same table, and a test checks they agree.

* **core**: pure decisions, no I/O: no asyncio, no sockets, no files or
  environment, no library that loads them; imports only the core.
* **orchestration**: asyncio, but no network library and no adapter.
* **adapter**: the edges (WebSocket, HTTP, Redis, files, processes, CLI).

Each I/O library may be imported only by the adapters named in ``ONLY_IN``.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BROKER = ROOT / "broker"

CORE = "core"
ORCHESTRATION = "orchestration"
ADAPTER = "adapter"

RINGS: dict[str, str] = {
    "broker": CORE,
    "broker.access": CORE,
    "broker.backoff": CORE,
    "broker.channels": CORE,
    "broker.codec": CORE,
    "broker.codes": CORE,
    "broker.exceptions": CORE,
    "broker.frames": CORE,
    "broker.history": CORE,
    "broker.http_gate": CORE,
    "broker.rules": CORE,
    "broker.index": CORE,
    "broker.metrics": CORE,
    "broker.position": CORE,
    "broker.publishing": CORE,
    "broker.session": CORE,
    "broker.settings": CORE,
    "broker.wsframe": CORE,
    "broker.backplane.redis_wire": CORE,
    "broker.backplane.cluster_map": CORE,
    "broker.backplane.dedupe": CORE,
    "broker.backplane.redis_scripts": CORE,
    "broker.backplane.memory_history": CORE,
    "broker.canary": ORCHESTRATION,
    "broker.delivery": ORCHESTRATION,
    "broker.hub": ORCHESTRATION,
    "broker.limits": ADAPTER,
    "broker.node": ORCHESTRATION,
    "broker.backplane": ORCHESTRATION,
    "broker.backplane.memory": ORCHESTRATION,
    "broker.__main__": ADAPTER,
    "broker.app": ADAPTER,
    "broker.cli": ADAPTER,
    "broker.config": ADAPTER,
    "broker.exposition": ADAPTER,
    "broker.http": ADAPTER,
    "broker.http_server": ADAPTER,
    "broker.logs": ADAPTER,
    "broker.outbox": ADAPTER,
    "broker.server": ADAPTER,
    "broker.snapshots": ADAPTER,
    "broker.tokens": ADAPTER,
    "broker.workers": ADAPTER,
    "broker.backplane.redis": ADAPTER,
    "broker.backplane.redis_link": ADAPTER,
    "broker.backplane.redis_publisher": ADAPTER,
    "broker.backplane.redis_cluster": ADAPTER,
}

#: Pure packages the core may use besides the standard library's pure parts.
CORE_LIBRARIES = {"pydantic", "orjson", "broker_protocol"}
#: Standard-library modules that do I/O or run event loops, threads or processes.
IO_STDLIB = {
    "asyncio", "selectors", "socket", "ssl", "select", "threading", "subprocess",
    "multiprocessing", "concurrent", "signal", "http", "urllib", "os", "io", "tomllib",
    "shutil", "tempfile", "pathlib", "logging",
}  # fmt: skip
#: Third-party libraries that do I/O, and the only modules allowed to import them.
ONLY_IN: dict[str, set[str]] = {
    "websockets": {"broker.outbox", "broker.server"},
    "h11": {"broker.http_server"},
    # The tests' HTTP client; the broker itself does not use it.
    "aiohttp": set(),
    "redis": {
        "broker.backplane.redis",
        "broker.backplane.redis_link",
        "broker.backplane.redis_publisher",
    },
    "prometheus_client": {"broker.exposition"},
    "jwt": {"broker.tokens"},
    "cryptography": {"broker.tokens"},
    "uvloop": {"broker.cli"},
    "broker_client": {"broker.cli"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(BROKER.rglob("*.py"))}


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` imports, anywhere in it (functions and TYPE_CHECKING too),
    with relative imports resolved and ``from a import b`` also counted as ``a.b``."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def runtime_imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Like ``imports_of``, but leaving out imports under ``if TYPE_CHECKING:``."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in {
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        }:
            node.body = [ast.Pass()]
    return imports_of(ast.unparse(tree), module, is_package)


def _under(name: str, roots: set[str]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def ring_violations(module: str, imported: set[str]) -> list[str]:
    """What ``module`` imports that its ring forbids (an empty list when all is well)."""
    ring = RINGS[module]
    bad: list[str] = []
    for name in sorted(imported):
        top = name.split(".")[0]
        if top == "broker":
            target = _broker_module(name)
            if target is None or target == module:
                continue
            allowed = {CORE: {CORE}, ORCHESTRATION: {CORE, ORCHESTRATION}}.get(ring)
            if allowed is not None and RINGS[target] not in allowed:
                bad.append(f"{name} ({RINGS[target]})")
        elif top in ONLY_IN:
            if module not in ONLY_IN[top]:
                where = ", ".join(sorted(ONLY_IN[top])) or "no module of the broker"
                bad.append(f"{name} (only in {where})")
        elif ring == CORE and (top in IO_STDLIB or _under(name, IO_STDLIB)):
            bad.append(name)
        elif ring == CORE and top not in sys.stdlib_module_names and top not in CORE_LIBRARIES:
            bad.append(f"{name} (a library the core does not use)")
        elif ring == ORCHESTRATION and top in {"socket", "ssl", "http", "urllib", "selectors"}:
            bad.append(name)
    return bad


def _broker_module(name: str) -> str | None:
    """The module of ``RINGS`` that ``name`` (maybe ``module.attribute``) refers to."""
    while name:
        if name in RINGS:
            return name
        name = name.rpartition(".")[0]
    return None


# --- the rings ----------------------------------------------------------------------


def test_every_module_under_broker_is_in_exactly_one_ring() -> None:
    modules = set(all_modules())
    assert sorted(modules - set(RINGS)) == [], "new module: place it in RINGS"
    assert sorted(set(RINGS) - modules) == [], "RINGS names a module that is gone"


@pytest.mark.parametrize("module", sorted(RINGS))
def test_imports_point_inward_and_io_libraries_stay_in_their_adapters(module: str) -> None:
    path = all_modules()[module]
    source = path.read_text(encoding="utf-8")
    is_package = path.name == "__init__.py"
    imported = (
        runtime_imports_of(source, module, is_package)
        if RINGS[module] != ADAPTER
        else imports_of(source, module, is_package)
    )
    assert ring_violations(module, imported) == []


def test_importing_the_whole_core_loads_no_event_loop_and_no_io_library() -> None:
    """The transitive check an ``ast`` scan cannot make: run the imports for real."""
    core = [name for name, ring in RINGS.items() if ring == CORE]
    watched = ["asyncio", *ONLY_IN, "hiredis"]
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in core)
        + f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(watched)!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_docs_architecture_lists_the_same_rings() -> None:
    """``docs/architecture.md`` has a table ``| `module` | ring | job |``; it must agree."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([\w/]+\.py)` \| (core|orchestration|adapter) \|", text, re.M)
    documented = {module_name(BROKER / path): ring for path, ring in rows}
    assert documented == RINGS


# --- the checker itself can fail ----------------------------------------------------


def test_checker_sees_every_form_of_import() -> None:
    source = """
import asyncio
import websockets.asyncio.client as wac
from redis import asyncio as aioredis
from . import node
from .backplane import memory
from ..elsewhere import thing

def later():
    import aiohttp.web
"""
    found = imports_of(source, "broker.codec")
    assert {"asyncio", "websockets.asyncio.client", "redis", "redis.asyncio"} <= found
    assert {"broker.node", "broker.backplane", "broker.backplane.memory", "aiohttp.web"} <= found
    assert "elsewhere.thing" in found  # two dots up from broker.codec
    assert ring_violations("broker.codec", found) == [
        "aiohttp.web (only in no module of the broker)",
        "asyncio",
        "broker.backplane (orchestration)",
        "broker.backplane.memory (orchestration)",
        "broker.node (orchestration)",
        "elsewhere (a library the core does not use)",
        "elsewhere.thing (a library the core does not use)",
        "redis (only in broker.backplane.redis, broker.backplane.redis_link, "
        "broker.backplane.redis_publisher)",
        "redis.asyncio (only in broker.backplane.redis, broker.backplane.redis_link, "
        "broker.backplane.redis_publisher)",
        "websockets.asyncio.client (only in broker.outbox, broker.server)",
    ]
    assert ring_violations("broker.codec", {"asyncio_extras", "broker.hubris"}) == [
        "asyncio_extras (a library the core does not use)"
    ]
    # Relative imports inside a package's __init__ resolve against the package itself.
    assert "broker.backplane.memory" in imports_of(
        "from .memory import MemoryBackplane", "broker.backplane", is_package=True
    )


def test_checker_catches_an_adapter_library_in_orchestration_and_type_checking_imports() -> None:
    assert ring_violations("broker.hub", {"prometheus_client"}) == [
        "prometheus_client (only in broker.exposition)"
    ]
    assert ring_violations("broker.hub", {"broker.server"}) == ["broker.server (adapter)"]
    assert ring_violations("broker.hub", {"asyncio", "broker.session"}) == []
    guarded = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import asyncio\n"
    assert "asyncio" not in runtime_imports_of(guarded, "broker.backplane", is_package=True)
    assert "asyncio" in imports_of(guarded, "broker.backplane", is_package=True)
