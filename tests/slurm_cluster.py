"""A real two-node SLURM cluster on this machine, for the tests.

Each node's slurmd runs in its own network namespace (and UTS namespace: its own hostname),
with its own address on a veth pair plugged into a bridge; slurmctld and munged stay in the
root namespace on the bridge's address:

    root namespace: bridge pnbr0 10.231.7.1 (slurmctld, munged, the test)
    namespace pnhost1: veth pnhost1i 10.231.7.11, hostname pnhost1, its slurmd
    namespace pnhost2: veth pnhost2i 10.231.7.12, hostname pnhost2, its slurmd

A job's processes are children of their node's slurmd, so they inherit its namespaces: traffic
between the nodes crosses the veth link, and a fault can hit one node alone (kill or freeze its
processes, take its link down). Names resolve through /etc/netns/<namespace>/hosts, which
`ip netns exec` mounts over /etc/hosts for the processes of that namespace.

It runs as root and needs neither systemd nor cgroups (a container has neither): process
tracking by /proc (proctrack/linuxproc), no task plugin or accounting, CPUs as the only
resource (select/cons_tres, CR_CPU); ports picked free. Debian's SLURM is installed with apt-get
when missing; where namespaces or SLURM cannot be brought up, start() fails saying why.
Everything lives under one directory and `stop()` tears it all down, however the test ended
(and start() first removes what a killed earlier run left behind). `disk` is a tmpfs both nodes
see (mounted before the slurmd start: a namespace copies the mounts there are when it is made),
whose size a test can change with `resize_disk` to fill it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers import REPO, free_port, train_env

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "sinfo")


def ensure_slurm() -> None:
    """Install Debian's SLURM when missing; skip only where that is impossible."""
    if os.geteuid() != 0:
        pytest.skip("a local SLURM needs root (to install it and to run slurmd)")
    if all(shutil.which(c) for c in COMMANDS):
        return
    if not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and cannot be here (no apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr}"
    missing = [c for c in COMMANDS if not shutil.which(c)]
    assert not missing, f"installed {PACKAGES} but {missing} are missing"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def terminate(pids: list[int]) -> None:
    """SIGTERM to all, then SIGKILL to those alive after 15 s."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 15
    while any(map(pid_alive, pids)) and time.time() < deadline:
        time.sleep(0.2)
    for pid in filter(pid_alive, pids):
        os.kill(pid, signal.SIGKILL)


def ended(info: dict) -> bool:
    return info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                "OUT_OF_MEMORY")


class TwoHostSlurm:
    BRIDGE, NET = "pnbr0", "10.231.7"
    HOSTS = ("pnhost1", "pnhost2")

    def __init__(self, root: Path, cpus_per_node: int = 1):
        self.root = root
        self.cpus = cpus_per_node
        self.conf = root / "slurm.conf"
        self.socket = root / "munge" / "munge.socket"
        self.jobs: list[str] = []
        self.daemons: list[Path] = []  # pid files of munged and slurmctld
        self.slurmd: dict[str, subprocess.Popen] = {}
        # slurmctld runs in the root namespace, on this machine: it keeps this machine's name
        # (it checks), with the bridge's address
        self.controller = socket.gethostname().split(".")[0]
        self.disk = root / "disk"

    def address(self, host: str) -> str:
        return f"{self.NET}.{11 + self.HOSTS.index(host)}"

    @property
    def env(self) -> dict:
        env = {k: v for k, v in train_env().items() if not k.startswith(("SLURM_", "SBATCH_"))}
        return {**env, "SLURM_CONF": str(self.conf), "PN_REPO": str(REPO)}

    def run(self, *cmd: str, check=True, timeout=60) -> str:
        done = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode:
            raise AssertionError(f"{' '.join(cmd)}: {done.stderr}\n{self.logs()}")
        return done.stdout

    # -- start -----------------------------------------------------------------------------------

    def start(self) -> None:
        self.remove_network()  # what a killed earlier run left behind
        self._make_network()
        self.disk.mkdir()
        self._mount("-t", "tmpfs", "-o", "size=64m", "tmpfs", str(self.disk))
        self._start_munge()
        self._write_config()
        self.daemons.append(self.root / "slurmctld.pid")
        self.run("slurmctld")
        self._start_nodes()
        deadline = time.time() + 60
        while set(self.run("sinfo", "-h", "-N", "-o", "%T", check=False).split()) != {"idle"}:
            assert time.time() < deadline, f"the nodes never became idle\n{self.logs()}"
            time.sleep(0.5)

    def _make_network(self) -> None:
        ip = self._ip
        ip("link", "add", self.BRIDGE, "type", "bridge")
        ip("addr", "add", f"{self.NET}.1/24", "dev", self.BRIDGE)
        ip("link", "set", self.BRIDGE, "up")
        names = [(self.controller, f"{self.NET}.1")] + [(h, self.address(h)) for h in self.HOSTS]
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in names)
        for host in self.HOSTS:
            ip("netns", "add", host)
            inside, outside = f"{host}i", f"{host}o"
            ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            ip("link", "set", inside, "netns", host)
            ip("link", "set", outside, "master", self.BRIDGE)
            ip("link", "set", outside, "up")
            self.in_host(host, "ip", "addr", "add", f"{self.address(host)}/24", "dev", inside)
            self.in_host(host, "ip", "link", "set", inside, "up")
            self.in_host(host, "ip", "link", "set", "lo", "up")
            etc = Path("/etc/netns") / host
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts)

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.daemons.append(munge / "munged.pid")
        self.run("munged", "--force", f"--socket={self.socket}", f"--key-file={key}",
                 f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                 f"--seed-file={munge}/munged.seed")

    def _write_config(self) -> None:
        r = self.root
        for sub in ("state", "spool", *(f"spool/{h}" for h in self.HOSTS)):
            (r / sub).mkdir()
        nodes = "".join(f"NodeName={h} NodeAddr={self.address(h)} CPUs={self.cpus} "
                        "RealMemory=1000 State=UNKNOWN\n" for h in self.HOSTS)
        self.conf.write_text(f"""\
ClusterName=pntest
SlurmctldHost={self.controller}({self.NET}.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1
JobRequeue=1
ReturnToService=2
SlurmdTimeout=30
KillWait=10
MinJobAge=600
MpiDefault=none
{nodes}PartitionName=test Nodes={",".join(self.HOSTS)} Default=YES MaxTime=INFINITE State=UP
""")
        (r / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nIgnoreSystemd=yes\n")

    def _start_nodes(self) -> None:
        for host in self.HOSTS:
            log = open(self.root / f"slurmd-{host}.out", "w")
            # slurmd in the foreground (-D) as our child (ip, unshare and sh exec into it: the
            # Popen's pid is slurmd's), named by its namespace's hostname.
            self.slurmd[host] = subprocess.Popen(
                ["ip", "netns", "exec", host, "unshare", "--uts", "sh", "-c",
                 f"hostname {host} && exec slurmd -D -N {host}"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT)

    @staticmethod
    def _ip(*args: str, check=True) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if check and done.returncode:
            raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip()} (network "
                                 "namespaces need root and a kernel that allows them)")

    # -- jobs and nodes --------------------------------------------------------------------------

    def sbatch(self, *args: str) -> str:
        job = self.run("sbatch", "--parsable", *args).strip().split(";")[0]
        self.jobs.append(job)
        return job

    def job(self, job: str) -> dict:
        line = self.run("scontrol", "-o", "show", "job", job).splitlines()[0]
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait_for(self, job: str, condition, what: str, timeout=300) -> dict:
        deadline = time.time() + timeout
        while not condition(info := self.job(job)):
            assert time.time() < deadline, f"job {job}: no {what} after {timeout} s: {info}"
            time.sleep(0.5)
        return info

    def release_requeued(self, job: str) -> None:
        """SLURM holds a job the batch script requeued for 120 s (BeginTime); start it sooner,
        but not within the second of the requeue: slurmd takes a credential issued in that
        second as revoked ("Killing non-startable batch job: Job credential revoked")."""
        self.run("scontrol", "update", f"JobId={job}", "StartTime=now+3")

    def in_host(self, host: str, *cmd: str, check=True) -> str:
        """Run `cmd` inside `host`'s network namespace (with its /etc/hosts)."""
        done = subprocess.run(["ip", "netns", "exec", host, *cmd], capture_output=True,
                              text=True, env=self.env, timeout=60)
        if check and done.returncode:
            raise AssertionError(f"{host}: {' '.join(cmd)}: {done.stderr.strip()}")
        return done.stdout

    def pids(self, host: str) -> list[int]:
        """Every process in `host`'s network namespace."""
        out = subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def job_pids(self, host: str) -> list[int]:
        """The processes of `host` other than its slurmd."""
        return [p for p in self.pids(host) if p != self.slurmd[host].pid]

    def link(self, host: str, up: bool) -> None:
        """Take `host`'s only link (its veth) down or up."""
        self.in_host(host, "ip", "link", "set", f"{host}i", "up" if up else "down")

    def resize_disk(self, megabytes: int) -> None:
        self._mount("-o", f"remount,size={megabytes}m", str(self.disk))

    @staticmethod
    def _mount(*args: str) -> None:
        done = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"mount {' '.join(args)}: {done.stderr.strip()}"

    def logs(self) -> str:
        return "".join(f"--- {p.name}\n{p.read_text()[-2000:]}"
                       for p in sorted(self.root.glob("*.log")))

    # -- stop ------------------------------------------------------------------------------------

    def stop(self) -> None:
        try:
            if self.jobs and self.conf.exists():
                self.run("scancel", *self.jobs, check=False)
                deadline = time.time() + 60
                while self.run("squeue", "-h", check=False).strip() and time.time() < deadline:
                    time.sleep(0.5)
            terminate([proc.pid for proc in self.slurmd.values()])
            terminate([int(p.read_text()) for p in self.daemons if p.exists()])
        finally:
            for host in self.HOSTS:  # anything still in a namespace
                for pid in self.pids(host):
                    os.kill(pid, signal.SIGKILL)
            self.remove_network()
            subprocess.run(["umount", "-l", str(self.disk)], capture_output=True)

    def remove_network(self) -> None:
        for host in self.HOSTS:
            self._ip("netns", "del", host, check=False)
            self._ip("link", "del", f"{host}o", check=False)
            shutil.rmtree(Path("/etc/netns") / host, ignore_errors=True)
        self._ip("link", "del", self.BRIDGE, check=False)
