"""Where a stack's CPU goes during a burst: `py-spy record --subprocesses` (sampling, not
pausing the target) around a burst, summarised by process and by leaf function."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

_PROCESS = re.compile(r'^process (\d+):"([^"]*)"')


def summarise(raw: str, top: int = 15) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks -> sample share per process command and per leaf frame."""
    procs: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        # with --subprocesses a child's frames sit under its parents' process frames
        owners = [m for f in frames if (m := _PROCESS.match(f))]
        procs[owners[-1][2][:80] if owners else "?"] += n
        leaves[frames[-1][:120]] += n

    def share(c: Counter[str]) -> list[tuple[str, float]]:
        return [(k, v / total) for k, v in c.most_common(top)]

    return {"samples": total, "by_process": share(procs), "by_leaf": share(leaves)}


def profile_during(pid: int, out: Path, seconds: float, work: Callable[[], Any]) -> dict[str, Any]:
    """Sample `pid` and its children while `work()` runs (py-spy must be installed)."""
    beside = Path(sys.executable).parent / "py-spy"
    exe = str(beside) if beside.exists() else shutil.which("py-spy")
    if exe is None:
        return {"error": "py-spy not installed"}
    cmd = [exe, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--format",
           "raw", "--rate", "50", "--duration", str(int(seconds)), "-o", str(out)]  # fmt: skip
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as spy:
        work()
        _, err = spy.communicate(timeout=seconds + 60)
    if not out.exists():
        return {"error": err.decode(errors="replace")[-500:]}
    return {"file": str(out), **summarise(out.read_text())}
