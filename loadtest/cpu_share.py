"""CPU seconds a stack's process tree spends during a burst, by kind of process.

Read from the kernel's per-process counters (user + system time) before and after a burst, so
it is exact CPU, native code (HAProxy, Ray's C++ core) included, unlike a sampling profile.
"""

from __future__ import annotations

import contextlib
import os
import re

import psutil

Snapshot = dict[int, tuple[str, float]]
"""pid -> (label, CPU seconds so far)."""

_REPLICA = re.compile(r"^(ray::ServeReplica):")


def label(cmdline: list[str]) -> str:
    """A short, bounded name for a process: Ray and vLLM set their titles (`ray::ServeController`,
    `VLLM::EngineCore`); binaries go by file name; Python by its module or script."""
    if not cmdline:
        return "?"
    head = cmdline[0].split(" ")[0]
    if head.startswith(("ray::", "VLLM::")):
        m = _REPLICA.match(head)
        return m.group(1) if m else head.split(".")[0]
    name = os.path.basename(head)
    if not name.startswith("python"):
        return name
    args = cmdline[1:]
    if "-c" in args:
        return "python -c"
    if "-m" in args and args.index("-m") + 1 < len(args):
        return ("python -m " + args[args.index("-m") + 1])[:60]
    script = next((a for a in args if not a.startswith("-")), "")
    return ("python " + os.path.basename(script))[:60] if script else "python"


def snapshot(root: int) -> Snapshot:
    """CPU seconds so far of `root` and every descendant."""
    out: Snapshot = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        top = psutil.Process(root)
        for p in [top, *top.children(recursive=True)]:
            with contextlib.suppress(
                psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess
            ):
                t = p.cpu_times()
                out[p.pid] = (label(p.cmdline()), t.user + t.system)
    return out


def spent(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds between two snapshots, summed by label (a process born in between counts
    from zero; one that died in between is lost, which a burst rarely sees)."""
    by: dict[str, float] = {}
    for pid, (name, secs) in after.items():
        prev = before.get(pid)
        used = secs - (prev[1] if prev else 0.0)
        by[name] = by.get(name, 0.0) + max(used, 0.0)
    return by
