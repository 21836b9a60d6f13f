"""The Python client is a distribution of its own, installable without the server.

Builds both wheels offline (``pip wheel --no-deps --no-build-isolation``, with
the ``hatchling`` of the test extras), checks what each holds and requires,
then installs the client's wheel into a throw-away virtualenv that has no
server dependency at all (its two dependencies are linked in from this
environment, so no index is needed) and uses it against a real broker.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest

from tests.brokerproc import REPO, BrokerProcess

pytestmark = pytest.mark.slow

CLIENT_DIR = REPO / "clients" / "python"


def _need_hatchling() -> None:
    if importlib.util.find_spec("hatchling") is None:
        message = "hatchling is not installed (it is in the test extras)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def build_wheel(source: Path, out: Path) -> Path:
    """Build the wheel of ``source`` into ``out`` without any network; return its path."""
    _need_hatchling()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", str(source), "-w", str(out)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    [wheel] = out.glob("*.whl")
    return wheel


def metadata(wheel: Path) -> tuple[list[str], dict[str, list[str]]]:
    """The wheel's file names and its METADATA fields (each a list of values)."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [meta] = [n for n in names if n.endswith(".dist-info/METADATA")]
        parsed = Parser().parsestr(archive.read(meta).decode())
    fields: dict[str, list[str]] = {}
    for key, value in parsed.items():
        fields.setdefault(key, []).append(value)
    return names, fields


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(CLIENT_DIR, tmp_path_factory.mktemp("client-wheel"))


def test_the_client_wheel_holds_the_client_and_needs_two_libraries(client_wheel: Path) -> None:
    names, fields = metadata(client_wheel)
    assert fields["Name"] == ["wsbroker-client"]
    assert sorted(fields["Requires-Dist"]) == ["orjson>=3.10", "websockets<18,>=17.4"]
    packages = {name.split("/")[0] for name in names if not name.startswith("wsbroker_client-")}
    assert packages == {"broker_client", "broker_protocol"}
    assert {"broker_client/py.typed", "broker_protocol/py.typed"} <= set(names)
    shipped = {name for name in names if name.startswith("broker_client/")}
    source = {f"broker_client/{p.name}" for p in (CLIENT_DIR / "broker_client").iterdir()}
    assert shipped == {s for s in source if not s.endswith("__pycache__")}


def test_the_server_wheel_depends_on_the_client_by_name(tmp_path: Path) -> None:
    names, fields = metadata(build_wheel(REPO, tmp_path))
    assert fields["Name"] == ["wsbroker"]
    assert "wsbroker-client" in fields["Requires-Dist"]
    assert not any(n.startswith(("broker_client/", "broker_protocol/")) for n in names)
    assert "broker/static/js/broker.js" in names  # the browser client, force-included


@pytest.fixture(scope="module")
def lone_venv(client_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A virtualenv with the client's wheel, websockets and orjson, and nothing else."""
    venv = tmp_path_factory.mktemp("lone") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         "--no-index", str(client_wheel)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    for name in ("websockets", "orjson"):
        dist = importlib.metadata.distribution(name)
        [meta] = [f for f in dist.files or [] if f.name == "METADATA"]
        info = Path(str(meta.locate())).parent
        package = info.parent / name
        for path in (info, package):
            (site / path.name).symlink_to(path, target_is_directory=True)
    yield python


SCRIPT = """
import asyncio, importlib.util, sys
for server_only in ("broker", "pydantic", "redis", "aiohttp", "prometheus_client"):
    assert importlib.util.find_spec(server_only) is None, server_only
import broker_client
from broker_client import AsyncHttpPublisher, connect

async def main(ws_url, http_url):
    async with connect(ws_url) as client, AsyncHttpPublisher(http_url) as publisher:
        sub = await client.subscribe("lone.*")
        await client.publish("lone.ws", 1)
        await publisher.publish("lone.http", 2)
        print([(await anext(sub)).data for _ in range(2)])

asyncio.run(asyncio.wait_for(main(*sys.argv[1:]), 20))
print(broker_client.__file__)
"""


def test_the_client_works_installed_on_its_own(lone_venv: Path) -> None:
    with BrokerProcess(log_level="warning") as broker:
        result = subprocess.run(
            [str(lone_venv), "-I", "-c", SCRIPT, broker.ws_url, broker.http_url],
            capture_output=True, text=True, timeout=60, cwd="/",
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed, where = result.stdout.splitlines()
    assert printed == "[1, 2]"
    assert where.startswith(str(lone_venv.parent.parent))  # the wheel's copy, not the checkout's
    check = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(lone_venv), "check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
