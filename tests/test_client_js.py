"""The browser client as an npm package: its contents, its Node tests, its types.

Runs ``npm pack --dry-run`` and ``node --test clients/js/test/`` (which start
real broker processes with this interpreter), and compiles
``clients/js/test/types.ts`` against ``broker.d.ts`` with ``tsc --strict``.
Without Node these tests skip on a developer's machine and fail in CI (``CI``
set). The type check fetches TypeScript 5 with ``npx`` (cached after the
first run); when it cannot be fetched it skips, except in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parent.parent / "clients" / "js"
NODE = shutil.which("node")
NPM = shutil.which("npm")
NPX = shutil.which("npx")


def _need(tool: str | None, name: str) -> str:
    if tool is None:
        reason = f"{name} not found: install Node.js 20 or later with npm"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return tool


def _run(argv: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=JS,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _node_flags(node: str) -> list[str]:
    """``--experimental-websocket`` where Node has no global WebSocket by default (20, 21)."""
    version = _run([node, "--version"], 30).stdout.strip()
    major = int(re.match(r"v(\d+)", version).group(1)) if re.match(r"v\d+", version) else 0
    if major < 20:
        pytest.fail(f"Node {version} is too old: the client needs Node 20 or later")
    return ["--experimental-websocket"] if major < 22 else []


def test_npm_pack_ships_the_module_and_its_types() -> None:
    npm = _need(NPM, "npm")
    result = _run([npm, "pack", "--dry-run", "--json"], 120)
    assert result.returncode == 0, result.stderr
    (packed,) = json.loads(result.stdout)
    files = {entry["path"] for entry in packed["files"]}
    assert files == {"broker.js", "broker.d.ts", "package.json", "README.md"}
    assert packed["name"] == "wsbroker-client"

    manifest = json.loads((JS / "package.json").read_text(encoding="utf-8"))
    assert manifest["type"] == "module"
    assert manifest["exports"]["."] == {"types": "./broker.d.ts", "default": "./broker.js"}
    assert manifest["types"] == "./broker.d.ts"
    assert not manifest.get("dependencies"), "the client has no dependencies"


def test_node_tests_pass() -> None:
    node = _need(NODE, "node")
    result = _run(
        [node, *_node_flags(node), "--test", "test/"],
        300,
        WSBROKER_PYTHON=sys.executable,
    )
    summary = "\n".join(result.stdout.splitlines()[-12:])
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-2000:]}"
    assert re.search(r"^# fail 0$", result.stdout, re.M), summary
    passed = re.search(r"^# pass (\d+)$", result.stdout, re.M)
    assert passed is not None and int(passed.group(1)) >= 20, summary


def test_declarations_compile_with_tsc_strict() -> None:
    npx = _need(NPX, "npx")
    result = _run([npx, "--yes", "-p", "typescript@5", "tsc", "-p", "test/tsconfig.json"], 300)
    if result.returncode != 0 and not re.search(r"error TS\d+", result.stdout):
        # npx could not fetch TypeScript (no registry): not a finding about the types.
        reason = f"could not run tsc: {result.stderr.strip()[-500:]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    assert result.returncode == 0, result.stdout
