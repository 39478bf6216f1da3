"""A SLURM launcher's request is checked against the cluster before the first sbatch (issue 12, part 1).

The fast tests feed ``sinfo`` text to the parser and check the message: every key that asks for more
than the partition's nodes have is named with its value, and the partition's offer is spelled out. The
slow tests run on the local SLURM cluster (tests/conftest.py's ``slurm_cluster``): the README's former
command on the GPU profile (``hydra/launcher=slurm``) fails with that message and submits nothing, the
optuna sweeper fails the same way before its study starts, and ``hydra/launcher=slurm_local`` jobs get
the CPUs and the memory that ``sinfo`` sizes them to (read back from ``sacct``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from picomaml.sweep.cluster import (
    ClusterResourceError,
    check_resources,
    fill_auto,
    parse_gres,
    parse_sinfo,
    query_partitions,
    target_partition,
)
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "tests" / "sweep_app" / "app.py"

# `sinfo -h -N -o '%P|%N|%c|%m|%G'` of the local kit's node, and of a cluster with two partitions
LOCAL = "debug*|vm|2|23081|(null)\n"
MIXED = """cpu*|c1|32|128000|(null)
cpu*|c2|32|128000|(null)
gpu|g1|64|512000|gpu:a100:4(S:0-1)
gpu|g2|64|512000|gpu:a100:4(S:0-1)
gpu|g3|16|256000|gpu:v100:2,mps:200
"""
# the GPU profile's resources (conf/hydra/launcher/slurm.yaml) and the local one's (slurm_local.yaml)
GPU_PROFILE = {
    "partition": None,
    "nodes": 1,
    "tasks_per_node": 1,
    "gpus_per_node": 1,
    "cpus_per_task": 8,
    "mem_gb": 64,
}
LOCAL_PROFILE = {
    "partition": None,
    "nodes": 1,
    "tasks_per_node": 1,
    "gpus_per_node": None,
    "cpus_per_task": 1,
    "mem_gb": "auto",
}


def test_gres_strings_count_by_name_and_type() -> None:
    assert parse_gres("(null)") == {}
    assert parse_gres("gpu:a100:4(S:0-1),gpu:v100:2,mps:200") == {
        "gpu": 6,
        "gpu:a100": 4,
        "gpu:v100": 2,
        "mps": 200,
    }
    assert parse_gres("gpu:2") == {"gpu": 2}
    assert parse_gres("gpu") == {"gpu": 1}
    assert parse_gres("gpu:a100:1(S:0,2)") == {"gpu": 1, "gpu:a100": 1}


def test_sinfo_partitions_and_their_offer() -> None:
    parts = parse_sinfo(LOCAL)
    assert list(parts) == ["debug"] and parts["debug"].default
    assert parts["debug"].describe() == "partition debug: 1 node, 2 CPUs, 22.5 GB, no GPUs"
    parts = parse_sinfo(MIXED)
    assert parts["cpu"].default and not parts["gpu"].default
    assert parts["cpu"].describe() == "partition cpu: 2 nodes, 32 CPUs, 125.0 GB, no GPUs"
    assert parts["gpu"].describe() == (
        "partition gpu: 3 nodes (2 x 64 CPUs, 500.0 GB, 4 gpu:a100; "
        "1 x 16 CPUs, 250.0 GB, 2 gpu:v100, 200 mps)"
    )


def test_gpu_profile_on_the_local_node_names_every_key_and_the_offer() -> None:
    partition = target_partition(GPU_PROFILE, parse_sinfo(LOCAL))
    with pytest.raises(ClusterResourceError) as err:
        check_resources(fill_auto(GPU_PROFILE, partition), partition)
    msg = str(err.value)
    assert "hydra.launcher.gpus_per_node=1 (1 GPU per node)" in msg
    assert "hydra.launcher.cpus_per_task=8 (8 CPUs per node)" in msg
    assert "hydra.launcher.mem_gb=64 (64.0 GB per node)" in msg
    assert "partition debug: 1 node, 2 CPUs, 22.5 GB, no GPUs" in msg
    assert "Nothing was submitted" in msg and "hydra/launcher=slurm_local" in msg


def test_local_profile_is_sized_from_the_node() -> None:
    partition = target_partition(LOCAL_PROFILE, parse_sinfo(LOCAL))
    filled = fill_auto(LOCAL_PROFILE, partition)
    # half the node's memory for half its CPUs, to the MB
    assert filled["cpus_per_task"] == 1 and filled["mem_gb"] * 1024 == 23081 // 2
    check_resources(filled, partition)
    # auto CPUs: the whole (smallest) node split between the tasks, and memory in proportion
    filled = fill_auto({**LOCAL_PROFILE, "cpus_per_task": "auto", "tasks_per_node": 2}, partition)
    assert filled["cpus_per_task"] == 1 and filled["mem_gb"] * 1024 == 23081
    check_resources(filled, partition)
    filled = fill_auto({**LOCAL_PROFILE, "cpus_per_task": "auto"}, partition)
    assert filled["cpus_per_task"] == 2


def test_only_the_keys_that_ask_too_much_are_named() -> None:
    partition = target_partition(LOCAL_PROFILE, parse_sinfo(LOCAL))
    with pytest.raises(ClusterResourceError) as err:
        check_resources({**LOCAL_PROFILE, "mem_gb": 23}, partition)
    msg = str(err.value)
    assert "hydra.launcher.mem_gb=23 (23.0 GB per node)" in msg
    assert "cpus_per_task" not in msg and "gpus" not in msg
    with pytest.raises(
        ClusterResourceError,
        match=r"hydra\.launcher\.cpus_per_task=1, hydra\.launcher\."
        r"tasks_per_node=4 \(4 CPUs per node\)",
    ):
        check_resources({**LOCAL_PROFILE, "mem_gb": 1, "tasks_per_node": 4}, partition)
    with pytest.raises(ClusterResourceError, match=r"hydra\.launcher\.nodes=2 \(1 node\(s\)"):
        check_resources({**LOCAL_PROFILE, "mem_gb": 1, "nodes": 2}, partition)
    with pytest.raises(ClusterResourceError, match=r"hydra\.launcher\.mem_per_cpu=16G \(32\.0 GB per node\)"):
        check_resources(
            {**LOCAL_PROFILE, "mem_gb": None, "cpus_per_task": 2, "mem_per_cpu": "16G"}, partition
        )
    check_resources({**LOCAL_PROFILE, "mem_gb": None, "cpus_per_task": 2, "mem_per_cpu": "11000M"}, partition)
    with pytest.raises(ClusterResourceError, match="allowed values are a number, null or auto"):
        fill_auto({**LOCAL_PROFILE, "mem_gb": "lots"}, partition)


def test_partitions_gres_types_and_node_combinations() -> None:
    parts = parse_sinfo(MIXED)
    gpu = {**GPU_PROFILE, "partition": "gpu"}
    check_resources({**gpu, "gpus_per_node": 4, "cpus_per_task": 64, "mem_gb": 400, "nodes": 2}, parts["gpu"])
    # three nodes have GPUs, but only two have 4 of them
    with pytest.raises(ClusterResourceError, match=r"hydra\.launcher\.nodes=3 \(2 node\(s\)"):
        check_resources({**gpu, "gpus_per_node": 4, "nodes": 3}, parts["gpu"])
    # 2 v100s exist and 64 CPUs exist, never on the same node
    with pytest.raises(ClusterResourceError, match="together"):
        check_resources(
            {**gpu, "gres": "gpu:v100:2", "gpus_per_node": None, "cpus_per_task": 64}, parts["gpu"]
        )
    with pytest.raises(ClusterResourceError, match=r"hydra\.launcher\.gres=mps:500 \(500 mps per node\)"):
        check_resources({**gpu, "gres": "mps:500", "gpus_per_node": None}, parts["gpu"])
    # partition null is the default one (cpu), which has no GPUs
    with pytest.raises(ClusterResourceError, match="partition cpu: 2 nodes, 32 CPUs, 125.0 GB, no GPUs"):
        check_resources(GPU_PROFILE, target_partition(GPU_PROFILE, parts))
    with pytest.raises(
        ClusterResourceError, match=r"partition=h100: .*no such partition .*cpu \(default\), gpu"
    ):
        target_partition({**gpu, "partition": "h100"}, parts)
    with pytest.raises(ClusterResourceError, match="no default partition"):
        target_partition(GPU_PROFILE, parse_sinfo(MIXED.replace("cpu*", "cpu")))


# --------------------------------------------------------------------------------------------------
# on the local cluster


# pytest numbers its temporary dirs afresh once /tmp/pytest-of-<user> is gone, while the cluster's
# accounting database keeps every job: a tmp_path can be a dir that an earlier session's jobs ran in
SESSION_START = time.time()


def jobs_from(workdir: Path, since: float | None = None) -> set[str]:
    """Raw ids of the SLURM jobs (queued, running or finished; an array's tasks one by one) submitted
    from ``workdir`` since ``since`` (a ``time.time()``; default: when this test session started). Other
    sessions' jobs on the same cluster are told apart by their working dir and time."""
    queued = subprocess.run(
        ["squeue", "-h", "-o", "%i|%Z"], capture_output=True, text=True, check=True
    ).stdout
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(SESSION_START if since is None else since))
    done = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-S", start, "-o", "JobIDRaw,WorkDir"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ids = set()
    for line in (queued + done).splitlines():
        job, _, where = line.partition("|")
        if where.strip() and Path(where.strip()).resolve() == workdir.resolve():
            ids.add(job.strip())
    return ids


def _local_offer() -> str:
    return target_partition({"partition": None}, query_partitions()).describe()


@pytest.mark.slow
def test_gpu_profile_grid_fails_before_submission(slurm_cluster: None, tmp_path: Path) -> None:
    """The README's former grid command, verbatim: one message naming the GPU key and the offer, no job."""
    cmd = (
        "python -m picomaml.train -m hydra/launcher=slurm model=tiny,small meta=5way4shot "
        "meta.hybrid_ratio=0,0.5"
    )
    proc = subprocess.run(
        [sys.executable, *cmd.split()[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "hydra.launcher.gpus_per_node=1 (1 GPU per node)" in out, out[-3000:]
    assert _local_offer() in out and "Nothing was submitted" in out
    assert "Traceback" not in out
    assert jobs_from(tmp_path) == set()
    assert not list(tmp_path.rglob(".submitit")), "submitit prepared a submission"


@pytest.mark.slow
def test_gpu_profile_optuna_fails_before_the_study(slurm_cluster: None, tmp_path: Path) -> None:
    """The optuna sweeper checks the launcher once, before it opens the study or asks for a trial."""
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(APP),
        "-m",
        f"hydra.searchpath=[file://{REPO / 'conf'}]",
        "hydra/sweeper=picomaml_optuna",
        "hydra/launcher=slurm",
        "hydra.launcher.gpus_per_node=2",
        f"hydra.sweep.dir={sweep_dir}",
        "x=interval(0,1)",
        "hydra.sweeper.n_trials=2",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "hydra.launcher.gpus_per_node=2 (2 GPUs per node)" in out and _local_offer() in out, out[-3000:]
    assert jobs_from(tmp_path) == set()
    assert not (sweep_dir / "optuna.db").exists()


@pytest.mark.slow
def test_slurm_local_jobs_get_what_sinfo_sizes(slurm_cluster: None, tmp_path: Path) -> None:
    """Two jobs of a grid on ``slurm_local``: each asks SLURM for 1 CPU and the node's memory per CPU,
    and runs one OpenMP thread."""
    sweep_dir = tmp_path / "grid"
    cmd = [
        sys.executable,
        str(APP),
        "-m",
        f"hydra.searchpath=[file://{REPO / 'conf'}]",
        "hydra/launcher=slurm_local",
        f"hydra.sweep.dir={sweep_dir}",
        "x=0.1,0.2",
        "steps=2",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    partition = target_partition({"partition": None}, query_partitions())
    want_mem = min(int(n.mem_mb / n.cpus) for n in partition.nodes)
    jobs = [json.loads((sweep_dir / str(i) / "timing.json").read_text())["slurm_job_id"] for i in (0, 1)]
    # the driver returns once submitit has read both results, which can be before the second job's
    # end reaches the accounting database that jobs_from reads
    wait_for(lambda: set(jobs) <= jobs_from(tmp_path), 60, f"jobs {jobs} in sacct")
    assert all(jobs) and set(jobs) == jobs_from(tmp_path)
    for job in jobs:
        acct = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", job, "-o", "ReqCPUS,ReqMem"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[0]
        cpus, mem = acct.split("|")
        assert int(cpus) == 1 and mem == f"{want_mem}M", acct
    # the profile's setup line: one thread per CPU asked for (nothing else holds a job to its CPUs here)
    logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").rglob("*.sh") if p.is_file())
    assert "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK" in logs
