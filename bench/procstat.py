"""Read CPU and memory figures from /proc, so the report can say who was busy.

A throughput figure means little unless we know which side ran out of CPU:
``Probe`` samples the server processes' own CPU time (utime + stime from
``/proc/PID/stat``), the load generator's, and each core's busy share from
``/proc/stat`` (which also catches softirq time that loopback networking
charges to the sending core) between ``start()`` and ``stop()``.
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """Return the (user, system) CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name may hold spaces; fields after the closing ')' are fixed.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_cpu_seconds(pid: int) -> float:
    """Return the CPU seconds (user + system) a process has used so far."""
    return sum(proc_cpu_split(pid))


def proc_rss_kib(pid: int) -> int:
    """Return a process's resident set size in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def core_times() -> dict[int, list[int]]:
    """Return ``{core: [user, nice, system, idle, iowait, irq, softirq, steal]}`` ticks."""
    out: dict[int, list[int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                out[int(name[3:])] = [int(v) for v in vals[:8]]  # guest is inside user
    return out


@dataclass
class Probe:
    """Measure server and load-generator CPU over one measurement window."""

    server_pids: list[int]
    aux_pids: dict[str, int] = field(default_factory=dict)  # e.g. redis-server, for the record
    server_core: int = 0
    loadgen_core: int = 1
    _t0: float = 0.0
    _srv0: float = 0.0
    _srv_user0: float = 0.0
    _lg0: float = 0.0
    _aux0: dict[str, float] = field(default_factory=dict)
    _cores0: dict[int, list[int]] = field(default_factory=dict)
    result: dict[str, float] = field(default_factory=dict)

    def rss_kib(self) -> int:
        """Return the summed RSS of the server processes, in KiB."""
        return sum(proc_rss_kib(pid) for pid in self.server_pids)

    def start(self) -> None:
        """Open the measurement window."""
        self._t0 = time.perf_counter()
        splits = [proc_cpu_split(p) for p in self.server_pids]
        self._srv0 = sum(u + s for u, s in splits)
        self._srv_user0 = sum(u for u, _ in splits)
        self._lg0 = time.process_time()
        self._aux0 = {k: proc_cpu_seconds(p) for k, p in self.aux_pids.items()}
        self._cores0 = core_times()

    def stop(self) -> dict[str, float]:
        """Close the window; return CPU percentages (100 = one core) over it."""
        wall = time.perf_counter() - self._t0
        splits = [proc_cpu_split(p) for p in self.server_pids]
        srv = sum(u + s for u, s in splits) - self._srv0
        srv_user = sum(u for u, _ in splits) - self._srv_user0
        lg = time.process_time() - self._lg0
        cores1 = core_times()

        def share(core: int, cols: tuple[int, ...]) -> float:
            d = [
                b - a
                for a, b in zip(
                    self._cores0.get(core, [0] * 8), cores1.get(core, [0] * 8), strict=True
                )
            ]
            total = sum(d)
            return round(100.0 * sum(d[c] for c in cols) / total, 1) if total else 0.0

        def busy(core: int) -> float:
            return share(core, (0, 1, 2, 5, 6, 7))  # all but idle and iowait

        self.result = {
            "wall_s": round(wall, 3),
            "server_cpu_pct": round(100.0 * srv / wall, 1),
            # CPU seconds, not shares: divided by work done they give a cost per
            # message that does not depend on how busy the machine was.
            "server_cpu_s": round(srv, 3),
            "server_user_s": round(srv_user, 3),
            "loadgen_cpu_pct": round(100.0 * lg / wall, 1),
            "server_core_busy_pct": round(busy(self.server_core), 1),
            "loadgen_core_busy_pct": round(busy(self.loadgen_core), 1),
            # Loopback receive processing runs as softirq on the *sending* core and
            # is not charged to any process; steal is time the hypervisor took.
            "server_core_softirq_pct": share(self.server_core, (5, 6)),
            "server_core_steal_pct": share(self.server_core, (7,)),
            "loadgen_core_softirq_pct": share(self.loadgen_core, (5, 6)),
        }
        ours = srv + lg
        for name, pid in self.aux_pids.items():
            cpu = proc_cpu_seconds(pid) - self._aux0[name]
            ours += cpu
            self.result[f"{name}_cpu_pct"] = round(100.0 * cpu / wall, 1)
        # Busy time of all cores not charged to our processes: other tenants of the
        # machine (a test suite, a build) competing with the run. Softirq run in a
        # process's context is charged to it, so this stays near 0 on a quiet machine.
        all_busy = sum(busy(c) for c in cores1) / 100.0
        self.result["other_cpu_pct"] = round(max(0.0, 100.0 * (all_busy - ours / wall)), 1)
        return self.result


async def wait_quiet(max_wait_s: float, threshold_pct: float) -> float:
    """Wait (bounded) until the machine's cores are nearly idle; return their busy %.

    Other tenants (a test suite, a browser) slow whichever server happens to run
    beside them, which skews a ratio far more than the 5-10 % run-to-run noise.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        c0 = core_times()
        await asyncio.sleep(0.5)
        c1 = core_times()
        busy = total = 0
        for core, t1 in c1.items():
            d = [b - a for a, b in zip(c0.get(core, [0] * 8), t1, strict=True)]
            busy += sum(d) - d[3] - d[4]
            total += sum(d)
        pct = 100.0 * len(c1) * busy / total if total else 0.0  # 100 = one core
        if pct <= threshold_pct or time.monotonic() >= deadline:
            return round(pct, 1)


async def quietest(
    run: Callable[[], Awaitable[dict[str, Any]]],
    *,
    retries: int,
    quiet_wait: float,
    noise_threshold: float,
) -> dict[str, Any]:
    """Run a measurement, again while other processes took over ``noise_threshold`` %.

    Up to ``retries`` repeats; returns the quietest attempt, with ``attempts``
    and ``noisy`` set. Shared by the runners so they judge noise alike.
    """
    attempts: list[dict[str, Any]] = []
    for _ in range(1 + retries):
        idle = await wait_quiet(quiet_wait, noise_threshold)
        r = await run()
        r["machine_busy_before_pct"] = idle
        attempts.append(r)
        if r.get("other_cpu_pct", 0.0) <= noise_threshold:
            break
        if retries:
            print(f" [noisy: other={r['other_cpu_pct']}%]", end="", flush=True)
    r = min(attempts, key=lambda x: x.get("other_cpu_pct", 0.0))
    r["attempts"] = len(attempts)
    r["noisy"] = r.get("other_cpu_pct", 0.0) > noise_threshold
    return r


async def measured(
    key: str,
    run: Callable[[], Awaitable[dict[str, Any]]],
    args: Any,
    failures: list[str],
) -> dict[str, Any]:
    """``quietest(run)`` with the runners' progress line and failure handling.

    Prints ``  key ...`` (the caller ends the line). A failure is recorded in
    ``failures``, printed (with its traceback under ``args.verbose``) and
    returned as ``{"error": message}``: one failed measurement must not hide
    the others.
    """
    print(f"  {key} ...", end="", flush=True)
    try:
        return await quietest(
            run,
            retries=args.retries,
            quiet_wait=args.quiet_wait,
            noise_threshold=args.noise_threshold,
        )
    except Exception as exc:
        cause: BaseException = exc
        while isinstance(cause, BaseExceptionGroup):
            cause = cause.exceptions[0]
        msg = f"{key}: {type(cause).__name__}: {cause}"
        failures.append(msg)
        print(f" FAILED ({msg.splitlines()[0]})")
        if args.verbose:
            traceback.print_exc()
        return {"error": msg}
