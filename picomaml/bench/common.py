"""What every benchmark shares: ``key=value`` arguments over typed defaults, device sync, the matmul peak."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def proc_status_mb(field: str) -> float:
    """A memory field of this process's ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field} line (memory is measured on Linux)")


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB: ``VmHWM``, the kernel's high-water mark of this
    process's own memory. Not ``ru_maxrss``: Linux starts a child's at its parent's resident size at fork
    and keeps it across exec, so a small benchmark child started by a big parent would report the parent."""
    return proc_status_mb("VmHWM")


def parse_args(argv: list[str], defaults: dict[str, object], prog: str, doc: str = "") -> dict[str, object]:
    """``key=value`` arguments over ``defaults``, each value converted to the default's type.

    ``--help`` prints ``doc`` and the keys with their defaults; an unknown key exits with the valid ones.
    """
    if any(a in ("-h", "--help") for a in argv):
        keys = " ".join(f"[{key}={value}]" for key, value in defaults.items())
        print(f"usage: python -m {prog} {keys}\n\n{doc}")
        raise SystemExit(0)
    args = dict(defaults)
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise SystemExit(f"bad argument {item!r}; expected key=value with key in {', '.join(defaults)}")
        kind = type(defaults[key])
        args[key] = value if defaults[key] is None else kind(value)
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(
    dtype: torch.dtype, device: torch.device, n: int = 2048, min_time: float = 1.0
) -> float:
    """Best observed FLOP/s of an [n, n] x [n, n] matmul in ``dtype`` (the denominator of MFU)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up: kernel selection, page faults
    best, spent = float("inf"), 0.0
    while spent < min_time:
        sync(device)
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        sync(device)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * n**3 / best


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_time(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    """Median seconds of ``step()`` over ``steps`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
