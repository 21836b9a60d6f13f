"""The rings of STYLE.md, kept honest by reading every import with ``ast``.

Core (no I/O): exceptions, frames, codec, channels, session, wsframe, metrics,
settings. Orchestration (asyncio, no network libraries): hub, node, the
backplane interface and the memory backplane. Imports point inward only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BROKER = Path(__file__).resolve().parent.parent / "broker"

CORE = ["exceptions", "frames", "codec", "channels", "session", "wsframe", "metrics", "settings"]
ORCHESTRATION = ["hub", "node", "backplane/__init__", "backplane/memory"]

NETWORK = {"websockets", "redis", "aiohttp", "socket", "ssl", "http", "urllib"}
# What the core must not reach: I/O runtimes, and every module outside the core.
CORE_FORBIDDEN = (
    NETWORK
    | {"asyncio", "uvloop", "selectors", "subprocess", "threading"}
    | {
        f"broker.{name}"
        for name in ("hub", "node", "backplane", "server", "http", "app", "cli", "workers", "logs")
    }
)
ORCHESTRATION_FORBIDDEN = NETWORK | {
    f"broker.{name}"
    for name in (
        "server",
        "http",
        "app",
        "cli",
        "workers",
        "backplane.redis",
        "backplane.redis_wire",
        "backplane.redis_publisher",
    )
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(BROKER.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


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


def violations(imported: set[str], forbidden: set[str]) -> list[str]:
    return sorted(
        name
        for name in imported
        if any(name == bad or name.startswith(bad + ".") for bad in forbidden)
    )


def _source(name: str) -> tuple[str, str, bool]:
    path = BROKER / f"{name}.py"
    assert path.is_file(), f"{path} is missing"
    return path.read_text(encoding="utf-8"), module_name(path), path.stem == "__init__"


@pytest.mark.parametrize("name", CORE)
def test_core_modules_do_no_io_and_import_nothing_outside_the_core(name: str) -> None:
    source, module, is_package = _source(name)
    assert violations(imports_of(source, module, is_package), CORE_FORBIDDEN) == []


@pytest.mark.parametrize("name", ORCHESTRATION)
def test_orchestration_imports_no_network_library_and_no_adapter(name: str) -> None:
    source, module, is_package = _source(name)
    assert violations(imports_of(source, module, is_package), ORCHESTRATION_FORBIDDEN) == []


def test_every_top_level_broker_module_is_in_a_ring_or_is_an_adapter() -> None:
    # Backplane implementations other than memory are adapters by definition.
    adapters = {"server", "http", "app", "cli", "workers", "logs", "__main__", "__init__"}
    known = set(CORE) | set(ORCHESTRATION) | adapters
    modules = {p.stem for p in BROKER.glob("*.py")}
    assert sorted(modules - known) == [], "new module: put it in a ring in this test"


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
    assert violations(found, CORE_FORBIDDEN) == [
        "aiohttp.web",
        "asyncio",
        "broker.backplane",
        "broker.backplane.memory",
        "broker.node",
        "redis",
        "redis.asyncio",
        "websockets.asyncio.client",
    ]
    assert violations({"asyncio_extras", "broker.hubris"}, CORE_FORBIDDEN) == []
    # Relative imports inside a package's __init__ resolve against the package itself.
    assert "broker.backplane.memory" in imports_of(
        "from .memory import MemoryBackplane", "broker.backplane", is_package=True
    )
