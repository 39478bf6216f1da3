"""Is SLURM there? A check that runs before a sweep submits anything to it.

Without it, a sweep on ``hydra/launcher=slurm`` whose controller does not answer fails one trial after
another (each ``sbatch`` retries for ~10 s) or, for a grid multirun, ends in a submitit traceback; with
no readable ``slurm.conf``, ``sbatch`` even hangs for a minute before it gives up.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hydra.errors import CompactHydraException

# `scontrol ping` answers in milliseconds when the controller is up and in about as long when its
# port is closed; without a readable slurm.conf it retries for ~60 s
PING_TIMEOUT_S = 20.0


class SlurmUnreachableError(CompactHydraException, RuntimeError):
    """SLURM cannot take jobs from this machine (not installed, controller down or unreachable).

    Hydra prints a ``CompactHydraException`` as its message alone, without a traceback.
    """


def check_slurm(timeout_s: float = PING_TIMEOUT_S) -> None:
    """Raises ``SlurmUnreachableError`` unless ``sbatch`` exists and ``scontrol ping`` finds a
    controller that is UP."""
    hint = (
        "Start the sweep where SLURM answers (a login node; `bash launchers/slurm_local_cluster.sh start` "
        "on a workstation), or pick another launcher (hydra/launcher=submitit_local)."
    )
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        raise SlurmUnreachableError(
            f"the SLURM launcher needs sbatch and scontrol, not on PATH here: nothing was submitted. {hint}"
        )
    try:
        proc = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SlurmUnreachableError(
            f"the SLURM controller did not answer `scontrol ping` within {timeout_s:.0f} s: nothing was "
            f"submitted. {hint}"
        ) from None
    # a healthy cluster with a backup controller down still says "... is UP" for the primary
    if "is UP" not in proc.stdout:
        lines = [line.strip(" *") for line in (proc.stdout + proc.stderr).splitlines()]
        said = "; ".join(line for line in lines if line)[:500] or f"exit status {proc.returncode}"
        raise SlurmUnreachableError(
            f"the SLURM controller is not reachable (`scontrol ping`: {said}): nothing was submitted. {hint}"
        )


def check_launcher(launcher: Any) -> None:
    """Before a sweep submits anything through ``launcher``: when it submits to SLURM
    (hydra-submitit-launcher's SLURM launcher or a subclass), SLURM must answer and the partition must
    have what the launcher asks for; nothing for any other launcher.

    picomaml's launcher (``hydra/launcher=slurm``, ``slurm_local``) does this itself, once per process,
    and fills its ``auto`` resources from the cluster (``PicomamlSlurmLauncher.prepare``); hydra's own
    ``submitit_slurm`` launcher gets the same checks here.
    """
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    if not isinstance(launcher, SlurmLauncher):
        return
    prepare = getattr(launcher, "prepare", None)
    if callable(prepare):
        prepare()
    else:
        prepare_slurm_params(launcher.params)


# --------------------------------------------------------------------------------------------------
# Does the cluster have what the launcher asks for? Checked before the first sbatch.
#
# sbatch refuses a request that no node of the partition can hold (`Requested node configuration is
# not available`, `Invalid generic resource (gres) specification`), but under submitit that refusal
# surfaces as one traceback per trial, or per grid batch, and says neither which launcher key asked
# for too much nor what the cluster has. The check below reads the partition's nodes from `sinfo` and
# names both. It compares hardware only (CPUs, memory, GPUs and other GRES of each node, the number
# of nodes): a request that fits the nodes but not their current load is queued by SLURM, as it
# should be. Options passed through `additional_parameters` are not checked.

SINFO_TIMEOUT_S = 20.0
AUTO = "auto"
# hydra.launcher keys that `auto` may fill from the cluster
AUTO_KEYS = ("cpus_per_task", "mem_gb")


class ClusterResourceError(CompactHydraException, ValueError):
    """The launcher asks for resources that no node of the target partition has: nothing was submitted."""


@dataclass(frozen=True)
class NodeOffer:
    """One node as a partition offers it: CPUs, memory (MB, SLURM's RealMemory) and generic resources.

    ``gres`` counts each resource under its name and under ``name:type`` (``{"gpu": 4, "gpu:a100": 4}``).
    """

    name: str
    cpus: int
    mem_mb: int
    gres: dict[str, int] = field(default_factory=dict)

    @property
    def gpus(self) -> int:
        return self.gres.get("gpu", 0)

    def shape(self) -> str:
        """``2 CPUs, 22.5 GB, no GPUs``; ``64 CPUs, 500.0 GB, 4 gpu:a100``."""
        typed = [f"{n} {k}" for k, n in sorted(self.gres.items()) if k.startswith("gpu:")]
        gpus = ", ".join(typed) or (
            f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}" if self.gpus else "no GPUs"
        )
        other = [f"{n} {k}" for k, n in sorted(self.gres.items()) if ":" not in k and k != "gpu"]
        return ", ".join([f"{self.cpus} CPUs", _gb(self.mem_mb), gpus, *other])


@dataclass(frozen=True)
class PartitionOffer:
    """A partition's nodes, as ``sinfo`` lists them; ``default`` marks the cluster's default partition."""

    name: str
    nodes: tuple[NodeOffer, ...]
    default: bool = False

    def describe(self) -> str:
        """``partition debug: 1 node, 2 CPUs, 22.5 GB, no GPUs`` (nodes of one shape grouped)."""
        shapes: dict[str, int] = {}
        for node in self.nodes:
            shapes[node.shape()] = shapes.get(node.shape(), 0) + 1
        n = len(self.nodes)
        head = f"partition {self.name}: {n} node{'s' if n != 1 else ''}"
        if len(shapes) == 1:
            return f"{head}, {next(iter(shapes))}"
        return f"{head} (" + "; ".join(f"{c} x {s}" for s, c in shapes.items()) + ")"


def _gb(mem_mb: float) -> str:
    return f"{mem_mb / 1024:.1f} GB"


def parse_gres(text: str | None) -> dict[str, int]:
    """``gpu:a100:4(S:0-1),gpu:v100:2,mps:100`` -> ``{"gpu": 6, "gpu:a100": 4, "gpu:v100": 2, "mps": 100}``.

    The same grammar serves requests (``hydra.launcher.gres``): ``gpu:2``, ``gpu:a100:2``, ``gpu``
    (one). Socket bindings in parentheses and ``(null)`` are dropped.
    """
    counts: dict[str, int] = {}
    if not text or text.strip() in ("(null)", "N/A", ""):
        return counts
    for item in re.sub(r"\([^)]*\)", "", text).split(","):
        parts = [p for p in item.strip().split(":") if p]
        if not parts:
            continue
        count = 1
        if len(parts) > 1 and parts[-1].isdigit():
            count = int(parts.pop())
        name = parts[0]
        counts[name] = counts.get(name, 0) + count
        if len(parts) > 1:
            key = f"{name}:{parts[1]}"
            counts[key] = counts.get(key, 0) + count
    return counts


def parse_sinfo(text: str) -> dict[str, PartitionOffer]:
    """Partitions from ``sinfo -h -N -o '%P|%N|%c|%m|%G'`` (one line per node and partition; the
    default partition's name carries a ``*``)."""
    nodes: dict[str, dict[str, NodeOffer]] = {}
    default: str | None = None
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        part, node, cpus, mem, gres = (f.strip() for f in fields)
        if part.endswith("*"):
            part = part[:-1]
            default = part
        nodes.setdefault(part, {})[node] = NodeOffer(node, int(cpus), int(mem.rstrip("+")), parse_gres(gres))
    return {
        p: PartitionOffer(p, tuple(by_name[n] for n in sorted(by_name)), p == default)
        for p, by_name in nodes.items()
    }


def query_partitions(timeout_s: float = SINFO_TIMEOUT_S) -> dict[str, PartitionOffer]:
    """Every partition of the cluster with its nodes' hardware, from one ``sinfo`` call."""
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%P|%N|%c|%m|%G"], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        raise SlurmUnreachableError(
            f"`sinfo` did not answer within {timeout_s:.0f} s: nothing was submitted"
        ) from None
    if proc.returncode != 0:
        raise SlurmUnreachableError(f"`sinfo` failed ({proc.stderr.strip()[:300]}): nothing was submitted")
    return parse_sinfo(proc.stdout)


def target_partition(params: dict[str, Any], partitions: dict[str, PartitionOffer]) -> PartitionOffer:
    """The partition the launcher submits to: ``hydra.launcher.partition``, else the cluster's default."""
    listing = ", ".join(f"{p}{' (default)' if o.default else ''}" for p, o in sorted(partitions.items()))
    name = params.get("partition")
    if name is None:
        default = [o for o in partitions.values() if o.default]
        if not default:
            raise ClusterResourceError(
                "hydra.launcher.partition=null, but the cluster has no default partition: set it to one "
                f"of: {listing or 'none listed by sinfo'}. Nothing was submitted."
            )
        return default[0]
    if name not in partitions:
        raise ClusterResourceError(
            f"hydra.launcher.partition={name}: the cluster has no such partition (sinfo lists: "
            f"{listing or 'none'}). Nothing was submitted."
        )
    return partitions[name]


def _count(params: dict[str, Any], key: str, default: int | None = None) -> int | None:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ClusterResourceError(
            f"hydra.launcher.{key} must be a non-negative integer or null, got {value!r}"
        )
    return value


def _mem_mb(params: dict[str, Any], key: str) -> float | None:
    """``mem_per_cpu`` / ``mem_per_gpu`` as sbatch reads them (``4G``, ``4000M``, ``4000``: MB) in MB."""
    value = params.get(key)
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(value), flags=re.IGNORECASE)
    if not m:
        raise ClusterResourceError(f"hydra.launcher.{key} must be a size such as 4G or 4000M, got {value!r}")
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2}[m.group(2).upper()]
    return float(m.group(1)) * scale


def fill_auto(params: dict[str, Any], partition: PartitionOffer) -> dict[str, Any]:
    """``params`` with ``auto`` values sized from the partition's smallest node (so a job fits on any):

    * ``cpus_per_task: auto``: all of the node's CPUs, split between ``tasks_per_node`` tasks;
    * ``mem_gb: auto``: the node's memory in proportion to the CPUs the job takes on it
      (``cpus_per_task x tasks_per_node / node CPUs``), so that as many such jobs fit in memory as
      fit in CPUs, rounded down to a whole MB.
    """
    out = dict(params)
    tasks = _count(out, "tasks_per_node", 1) or 1
    smallest = min(partition.nodes, key=lambda n: (n.cpus, n.mem_mb))
    if out.get("cpus_per_task") == AUTO:
        out["cpus_per_task"] = max(1, smallest.cpus // tasks)
    if out.get("mem_gb") == AUTO:
        cpus = (_count(out, "cpus_per_task", 1) or 1) * tasks
        share_mb = min(n.mem_mb * min(1.0, cpus / n.cpus) for n in partition.nodes)
        # submitit passes a whole number of GB as --mem=<n>GB and anything else as --mem=<MB>MB
        out["mem_gb"] = int(share_mb) / 1024
    for key in AUTO_KEYS:
        value = out.get(key)
        if isinstance(value, str):
            raise ClusterResourceError(
                f"hydra.launcher.{key}={value}: allowed values are a number, null or {AUTO} (from sinfo)"
            )
    return out


def check_resources(params: dict[str, Any], partition: PartitionOffer) -> None:
    """Raises ``ClusterResourceError`` naming each ``hydra.launcher`` key that asks for more than any node
    of ``partition`` has (or more nodes than it has), with what the partition offers."""
    tasks = _count(params, "tasks_per_node", 1) or 1
    nodes = _count(params, "nodes", 1) or 1
    cpus_per_task = _count(params, "cpus_per_task", 1) or 1
    gres = parse_gres(params.get("gres"))
    gpus = max(
        _count(params, "gpus_per_node", 0) or 0,
        (_count(params, "gpus_per_task", 0) or 0) * tasks,
        gres.get("gpu", 0),
    )
    cpus = max(cpus_per_task * tasks, (_count(params, "cpus_per_gpu", 0) or 0) * gpus)
    mem_gb = params.get("mem_gb")
    if mem_gb is not None and (
        isinstance(mem_gb, bool) or not isinstance(mem_gb, (int, float)) or mem_gb < 0
    ):
        raise ClusterResourceError(
            f"hydra.launcher.mem_gb must be a non-negative number, null or {AUTO}, got {mem_gb!r}"
        )
    mem_mb = max(
        float(mem_gb or 0) * 1024,
        (_mem_mb(params, "mem_per_cpu") or 0.0) * cpus,
        (_mem_mb(params, "mem_per_gpu") or 0.0) * gpus,
    )
    # (the keys as the user set them, what they amount to per node, does a node have it)
    asks: list[tuple[list[str], str, Callable[[NodeOffer], bool]]] = []
    if gpus:
        keys = [k for k in ("gpus_per_node", "gpus_per_task", "gres") if params.get(k)]
        asks.append((keys, f"{gpus} GPU{'s' if gpus != 1 else ''} per node", lambda n: n.gpus >= gpus))
    for name, count in gres.items():
        if name != "gpu":
            asks.append(
                (["gres"], f"{count} {name} per node", lambda n, k=name, c=count: n.gres.get(k, 0) >= c)
            )
    cpu_keys = ["cpus_per_task"] + (["tasks_per_node"] if tasks > 1 else [])
    cpu_keys += ["cpus_per_gpu"] if params.get("cpus_per_gpu") else []
    asks.append((cpu_keys, f"{cpus} CPU{'s' if cpus != 1 else ''} per node", lambda n: n.cpus >= cpus))
    mem_keys = [k for k in ("mem_gb", "mem_per_cpu", "mem_per_gpu") if params.get(k) is not None]
    if mem_keys:
        asks.append((mem_keys, f"{_gb(mem_mb)} per node", lambda n: n.mem_mb >= mem_mb))

    def named(keys: list[str]) -> str:
        return ", ".join(f"hydra.launcher.{k}={params.get(k)}" for k in keys)

    problems = [f"{named(keys)} ({what})" for keys, what, fits in asks if not any(map(fits, partition.nodes))]
    fitting = [n for n in partition.nodes if all(fits(n) for _, _, fits in asks)]
    if not problems and not fitting:
        problems.append(
            f"{named([k for keys, _, _ in asks for k in keys])} together (no single node has all of it)"
        )
    elif not problems and len(fitting) < nodes:
        problems.append(f"hydra.launcher.nodes={nodes} ({len(fitting)} node(s) can hold one job's share)")
    if problems:
        raise ClusterResourceError(
            "the launcher asks for more than the cluster has: " + "; ".join(problems) + ". "
            f"The cluster offers {partition.describe()}. Nothing was submitted. Lower these keys, pick a "
            "partition that has them (hydra.launcher.partition), or use hydra/launcher=slurm_local, which "
            "sizes jobs from the cluster."
        )


def prepare_slurm_params(params: dict[str, Any]) -> dict[str, Any]:
    """What a SLURM launcher runs once before its first sbatch: ``check_slurm()``, the target
    partition from ``sinfo``, ``auto`` values filled (``fill_auto``) and the request checked against
    the partition's nodes (``check_resources``). Returns the params with ``auto`` filled."""
    check_slurm()
    partition = target_partition(params, query_partitions())
    filled = fill_auto(params, partition)
    check_resources(filled, partition)
    return filled
