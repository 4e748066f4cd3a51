"""A real single-node SLURM cluster for the tests: ``munged``, ``slurmctld`` and ``slurmd``
(Debian's ``slurm-wlm`` and ``munge``) started as root on this machine, with their key, config,
state, spool, sockets and logs in a temporary folder, on ports nobody else uses.

Test modules register the session fixture with ``pytest_plugins = ["slurm_cluster"]`` and ask
for ``slurm_cluster``: a :class:`SlurmCluster` whose :attr:`~SlurmCluster.env` the ``sbatch``,
``squeue`` and ``scontrol`` calls need, and whose :meth:`~SlurmCluster.wait` returns the final
states of jobs. The tests are skipped, with the reason, where SLURM is not installed or cannot
start here; ``WMHQC_REQUIRE_SLURM=1`` (set by ``.ci/run``, which installs it) makes that a
failure. There is no accounting database, so ``sacct`` does not work: job states come from
``scontrol show job``, which keeps finished jobs for an hour (``MinJobAge``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sinfo", "scancel")
#: job states after which a job never changes again
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
START_TIMEOUT = 60  # seconds for the node to show idle
#: variables of an enclosing job (a test session run inside one) that would steer sbatch
UNSET = ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_JOB_ID", "SLURM_CLUSTERS",
         "SBATCH_PARTITION", "SBATCH_ACCOUNT", "SLURM_PARTITION")


class SlurmUnavailable(UserWarning):
    """Why the SLURM tests were skipped (shown in pytest's warnings summary too)."""


@dataclass
class SlurmCluster:
    """A running single-node cluster; ``env`` is the environment its clients need."""

    root: Path
    env: dict[str, str]
    node: str
    partition: str
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    started_in: float = 0.0  # seconds from the first daemon to the idle node

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        """Run a SLURM client (``sbatch``, ``squeue``...) against this cluster; its stdout."""
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}): "
                               f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def use(self, monkeypatch) -> None:
        """Point this process's SLURM clients (and the jobs they submit, which inherit the
        environment) at this cluster for one test."""
        for name, value in self.env.items():
            if name.startswith("SLURM"):
                monkeypatch.setenv(name, value)
        for name in UNSET:
            monkeypatch.delenv(name, raising=False)

    def jobs(self, job_id: str) -> dict[str, dict[str, str]]:
        """``scontrol show job`` of one job, one entry per array task (``<array id>_<task>``;
        a plain job under its id), each the job's ``Key=Value`` fields."""
        text = self.run("scontrol", "show", "job", "--oneliner", str(job_id))
        found = {}
        for line in text.splitlines():
            if not line.strip():
                continue
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            task = fields.get("ArrayTaskId")
            key = f"{fields['ArrayJobId']}_{task}" if task not in (None, "N/A") \
                else fields["JobId"]
            found[key] = fields
        return found

    def wait(self, *job_ids: str, timeout: float = 600, poll: float = 1.0) -> dict[str, str]:
        """Wait until every job (every task of an array) has ended; ``{job: state}``, with
        ``<array id>_<task>`` keys for array tasks. A job whose dependency can never be met
        ends as ``PENDING (DependencyNeverSatisfied)``. On timeout: an error with the queue
        and the daemons' logs."""
        deadline = time.monotonic() + timeout
        while True:
            states: dict[str, str] = {}
            for job_id in job_ids:
                for key, fields in self.jobs(job_id).items():
                    state = fields.get("JobState", "?")
                    if state == "PENDING" and fields.get("Reason") == "DependencyNeverSatisfied":
                        state = "PENDING (DependencyNeverSatisfied)"
                    states[key] = state
            pending = [k for k, s in states.items()
                       if s not in FINAL_STATES and "DependencyNeverSatisfied" not in s]
            if not pending:
                return states
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs {', '.join(pending)} still not ended after {timeout} "
                                   f"s: {states}\n{self.run('squeue', check=False)}\n"
                                   f"{self.logs()}")
            time.sleep(poll)

    def logs(self, lines: int = 30) -> str:
        """The last lines of each daemon's log, for error messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job of this cluster, then stop the daemons this fixture started."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            try:
                ids = self.run("squeue", "--noheader", "--format=%A", check=False).split()
                if ids:
                    self.run("scancel", *sorted(set(ids)), check=False)
                    end = time.monotonic() + 30
                    while (self.run("squeue", "--noheader", check=False).strip()
                           and time.monotonic() < end):
                        time.sleep(0.5)
            except (OSError, subprocess.SubprocessError):
                pass
        for name in reversed(DAEMONS):
            proc = self.processes.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _find(name: str) -> str | None:
    """A SLURM or munge program: on PATH, or in the sbin folders a user's PATH may lack."""
    return shutil.which(name, path=os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"]))


def _free_ports(n: int) -> list[int]:
    """``n`` TCP ports free right now (the kernel's choice, so they clash with nothing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_line(node: str) -> str:
    """This machine as a SLURM node, from ``slurmd -C`` (its CPUs and layout), with 90 % of
    its memory as ``RealMemory`` (a node that claims more than it has is drained)."""
    out = subprocess.run([_find("slurmd") or "slurmd", "-C"], capture_output=True, text=True,
                         timeout=30).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0] if out else ""))
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    layout = " ".join(f"{k}={fields[k]}" for k in keep if k in fields) \
        or f"CPUs={os.cpu_count() or 1}"
    memory = int(int(fields.get("RealMemory", "2048")) * 0.9)
    return f"NodeName={node} NodeAddr=127.0.0.1 {layout} RealMemory={memory} State=UNKNOWN"


def write_config(root: Path, node: str, partition: str, ports: list[int],
                 munge_socket: Path) -> Path:
    """``slurm.conf`` of a one-node cluster whose every file lies under ``root``."""
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=wmhqctest",
        f"SlurmctldHost={node}(127.0.0.1)",
        "SlurmUser=root",
        "AuthType=auth/munge", f"AuthInfo=socket={munge_socket}",
        "CredType=cred/munge",
        f"SlurmctldPort={ports[0]}", f"SlurmdPort={ports[1]}",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
        "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
        "ReturnToService=2", "MinJobAge=3600", "KillWait=5", "InactiveLimit=0",
        "SchedulerType=sched/backfill",
        _node_line(node),
        f"PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n")
    return conf


def _fail_or_skip(reason: str) -> None:
    if os.environ.get("WMHQC_REQUIRE_SLURM") == "1":
        pytest.fail(f"WMHQC_REQUIRE_SLURM=1 but {reason}")
    warnings.warn(SlurmUnavailable(f"SLURM tests skipped: {reason}"), stacklevel=2)
    pytest.skip(f"no SLURM cluster: {reason}")


def start_cluster(root: Path) -> SlurmCluster:
    """Start munged, slurmctld and slurmd under ``root``; wait until the node is idle."""
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o711)  # munged wants its socket folder searchable
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge_socket = root / "munge" / "munge.socket"
    node = socket.gethostname().split(".")[0]
    conf = write_config(root, node, "wmhqc", _free_ports(2), munge_socket)
    env = dict(os.environ, SLURM_CONF=str(conf))
    for name in UNSET:
        env.pop(name, None)
    cluster = SlurmCluster(root, env, node, "wmhqc")
    commands = {
        "munged": [_find("munged") or "munged", "--foreground", "--force", f"--key-file={key}",
                   f"--socket={munge_socket}", f"--pid-file={root / 'munge' / 'munged.pid'}",
                   f"--log-file={root / 'log' / 'munged.log'}",
                   f"--seed-file={root / 'munge' / 'munged.seed'}"],
        "slurmctld": [_find("slurmctld") or "slurmctld", "-D", "-i"],
        "slurmd": [_find("slurmd") or "slurmd", "-D"],
    }
    try:
        for name in DAEMONS:
            out = open(root / "log" / f"{name}.stdout.log", "w")  # noqa: SIM115 - the daemon's
            cluster.processes[name] = subprocess.Popen(commands[name], env=env, stdout=out,
                                                       stderr=subprocess.STDOUT,
                                                       start_new_session=True)
            out.close()
            if name == "munged":
                _wait_for(lambda: munge_socket.exists(), 10, cluster, "munged's socket")
        _wait_for(lambda: _node_state(cluster) == "idle", START_TIMEOUT, cluster,
                  f"node {node} idle in sinfo")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _node_state(cluster: SlurmCluster) -> str:
    for name, proc in cluster.processes.items():
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
    try:
        return cluster.run("sinfo", "--noheader", "--Node", "--format=%t", check=False,
                           timeout=10).strip()
    except subprocess.TimeoutExpired:
        return ""


def _wait_for(ready, timeout: float, cluster: SlurmCluster, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except RuntimeError as exc:
            raise RuntimeError(f"{exc} before {what}\n{cluster.logs()}") from None
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} after {timeout} s\n{cluster.logs()}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """A running single-node SLURM cluster for this session (stopped at its end)."""
    missing = [b for b in DAEMONS + CLIENTS if _find(b) is None]
    if missing:
        _fail_or_skip(f"{', '.join(missing)} not found on PATH (Debian: apt-get install "
                      "slurm-wlm munge, as root; .ci/run installs them)")
    if os.geteuid() != 0:
        _fail_or_skip("not root: this test cluster runs munged and slurmd as root")
    root = tmp_path_factory.mktemp("slurm")
    start = time.perf_counter()
    try:
        cluster = start_cluster(root)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _fail_or_skip(f"the cluster did not start: {exc}")
    cluster.started_in = time.perf_counter() - start
    try:
        yield cluster
    finally:
        cluster.stop()
