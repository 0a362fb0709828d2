"""How a training process learns its place in the run, and how a run stops when asked to.

Rank discovery: torchrun and the deepspeed launcher set RANK/WORLD_SIZE/...; srun and mpirun set their
own variables, which are mapped here so that N processes form ONE N-rank group (never N one-rank runs
sharing an out_dir). A multi-process launch this module cannot map is refused in one line.

Stopping: SIGTERM (what a scheduler's preemption sends) and the death of the launcher that started
this rank (`kill <deepspeed runner pid>` leaves its children running) both ask the run to stop. All
ranks agree at the next optimizer step, save a checkpoint and exit; a rank that does not reach a step
boundary within the grace period exits without one (the last checkpoint stays the newest).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import threading
import zlib
from collections.abc import Mapping
from typing import Any

from mm.errors import UserError

# Exit status of a run stopped by a signal after it saved: 128 + SIGTERM, as a shell reports it.
PREEMPTED_EXIT = 143


class Preempted(UserError):
    """The run stopped on request (SIGTERM, launcher gone); its checkpoint is resumable."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'node[01-04,07],gpu3' -> 'node01'. Forms beyond one
    bracket group per host name are refused in one line (set MASTER_ADDR instead)."""
    text = nodelist.strip()
    depth, end = 0, len(text)
    for i, ch in enumerate(text):  # the first host ends at the first comma outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    host = text[:end]
    match = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\]([^\[\]]*)", host)
    if match:
        prefix, ranges, suffix = match.groups()
        first = ranges.split(",")[0].split("-")[0]
        if first.isdigit():
            return f"{prefix}{first}{suffix}"
    elif host and "[" not in host and "]" not in host:
        return host
    raise UserError(f"SLURM_JOB_NODELIST {nodelist!r}: cannot tell the first host; set MASTER_ADDR to it")


def discover_ranks(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) this process should use, from the launcher's environment; {} when they are set already.

    torchrun / deepspeed (RANK set) > srun (SLURM_PROCID) > mpirun of Open MPI (OMPI_COMM_WORLD_RANK) >
    a plain one-process run. Another multi-process launcher (MPICH/Intel MPI PMI_SIZE, MVAPICH) is
    refused rather than run as N separate one-rank jobs."""
    if "RANK" in env:
        return {}
    if "SLURM_PROCID" in env:
        world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
        if int(world) > 1:
            addr = env.get("MASTER_ADDR") or first_slurm_host(
                env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "")
            port = env.get("MASTER_PORT")
            if not port:
                # Every task of one job step derives the same port; another job (or step) on the same
                # node another one, so two runs on one host do not collide on a fixed default.
                key = f"{env.get('SLURM_JOB_ID', '')}.{env.get('SLURM_STEP_ID', '')}"
                port = str(15000 + zlib.crc32(key.encode()) % 20000)
            return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": world,
                    "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
                    "LOCAL_WORLD_SIZE": env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or "1",
                    "MASTER_ADDR": addr, "MASTER_PORT": port}
    if "OMPI_COMM_WORLD_RANK" in env:
        world = env.get("OMPI_COMM_WORLD_SIZE", "1")
        local_world = env.get("OMPI_COMM_WORLD_LOCAL_SIZE", world)
        if int(world) > 1:
            addr = env.get("MASTER_ADDR")
            if not addr:
                if local_world != world:
                    raise UserError(f"mpirun across nodes ({world} ranks, {local_world} on this node): pass the "
                                    f"first node's address with `mpirun -x MASTER_ADDR=<host>`")
                addr = "127.0.0.1"
            port = env.get("MASTER_PORT")
            job = env.get("OMPI_MCA_ess_base_jobid") or env.get("PMIX_NAMESPACE")
            if not port:
                if not job:
                    raise UserError("mpirun: no job id to derive a port from; pass one with "
                                    "`mpirun -x MASTER_PORT=<free port>`")
                port = str(15000 + zlib.crc32(job.encode()) % 20000)
            return {"RANK": env["OMPI_COMM_WORLD_RANK"], "WORLD_SIZE": world,
                    "LOCAL_RANK": env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"), "LOCAL_WORLD_SIZE": local_world,
                    "MASTER_ADDR": addr, "MASTER_PORT": port}
    for var in ("PMI_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_SIZE"):
        if env.get(var, "1").isdigit() and int(env.get(var, "1")) > 1:
            raise UserError(f"started by a launcher this program does not read ({var}={env[var]}): launch with "
                            f"`deepspeed`, `torchrun` or `srun`, or set RANK, WORLD_SIZE, LOCAL_RANK, "
                            f"MASTER_ADDR and MASTER_PORT")
    # A plain one-process run. Without these DeepSpeed looks for an MPI launcher (mpi4py).
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}


def init_distributed() -> None:
    """Join the process group the launcher describes, or make a one-rank group for a plain run.

    A rendezvous port that is taken (two launches on one host, both on deepspeed's default 29500) is
    one line naming the port, not an EADDRINUSE traceback."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.update(discover_ranks(os.environ))
    try:
        deepspeed.init_distributed(verbose=False)
    except (RuntimeError, OSError) as e:  # torch's DistNetworkError is a RuntimeError
        text = str(e)
        if "EADDRINUSE" in text or "address already in use" in text.lower():
            port = os.environ.get("MASTER_PORT")
            raise UserError(f"port {port} on {os.environ.get('MASTER_ADDR')} is in use (another run on this "
                            f"host?): launch with `deepspeed --master_port <free port>` "
                            f"(torchrun: --master_port), or set MASTER_PORT") from None
        raise
    _unlink_cpu_allreduce_buffer()


def _unlink_cpu_allreduce_buffer() -> None:
    """DeepSpeed's CPU all-reduce (its shm comm op, used when every rank is on one host) maps a 66 MB
    /dev/shm buffer per rank and never removes it, so each multi-rank CPU launch left 132 MB of RAM
    behind for good. Once every rank has mapped every buffer (init_distributed returned on all: the
    barrier), the names can go; the mappings themselves last until the ranks exit."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if dist.get_world_size() < 2 or get_accelerator().device_name() != "cpu":
        return
    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


_LAUNCHER_MARKS = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
                   "torchrun", "/deepspeed")


def launcher_ancestors() -> list:
    """The chain of launcher processes above this one (deepspeed's launch.py and runner, torchrun), as
    psutil processes. Killing the outer `deepspeed` runner does not stop launch.py or the ranks, so the
    ranks watch it themselves."""
    import psutil

    chain = []
    try:
        proc = psutil.Process(os.getppid())
        while proc is not None and proc.pid > 1:
            cmdline = " ".join(proc.cmdline())
            if not any(mark in cmdline for mark in _LAUNCHER_MARKS):
                break
            chain.append(proc)
            proc = proc.parent()
    except (psutil.Error, OSError):
        pass
    return chain


def _shown(cmdline: list[str]) -> list[str]:
    """A process's command line as the user typed it: the interpreter as `python`, a console script
    (deepspeed, torchrun, mm) run by it as its name; every argument kept."""
    if not cmdline:
        return []
    first = os.path.basename(cmdline[0])
    if re.fullmatch(r"python[\d.]*", first):
        rest = cmdline[1:]
        script = rest[0] if rest else ""
        # A console script sits in the interpreter's bin folder: `deepspeed ...`, not `python /venv/bin/deepspeed`.
        if script and os.path.isabs(script) and os.path.dirname(script) == os.path.dirname(cmdline[0]):
            return [os.path.basename(script), *rest[1:]]
        return ["python", *rest]
    if os.path.isabs(cmdline[0]) and os.path.dirname(cmdline[0]) == os.path.dirname(sys.executable):
        return [first, *cmdline[1:]]
    return list(cmdline)


def launch_command(world_size: int) -> dict[str, Any]:
    """How this run was started, for the run directory and the export's model card: the outermost
    launcher's command line (deepspeed, torchrun) or, without one (srun, mpirun, a single process),
    this process's; the working directory that relative paths in it are relative to; the world size."""
    import shlex

    import psutil

    chain = launcher_ancestors()
    try:
        cmdline = (chain[-1] if chain else psutil.Process()).cmdline()
    except (psutil.Error, OSError):
        cmdline = [sys.executable, *sys.argv]
    return {"command": shlex.join(_shown(cmdline)), "cwd": os.getcwd(), "world_size": world_size}


class GracefulStop:
    """SIGTERM handler and launcher watch for one train() call (a context manager).

    `requested` turns true on this rank at a signal or when a launcher above it is gone; `agreed()` is
    a collective every rank calls once per optimizer step, so all stop at the same step. From the first
    request a timer gives the run `grace_s` seconds to reach a step boundary and start its checkpoint
    (`saving()`); past that the process exits without one."""

    def __init__(self, grace_s: float, rank: int, poll_s: float = 1.0):
        self.grace_s, self.rank, self.poll_s = grace_s, rank, poll_s
        self.reason = ""
        self._pid = os.getpid()
        self._saving = threading.Event()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._previous = None
        self._mask: set = set()

    @property
    def requested(self) -> bool:
        return bool(self.reason)

    def request(self, reason: str) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker inherits the handler: the rank decides
            return
        with self._lock:  # the receiver thread and the handler both report one signal
            if self.reason:
                return
            self.reason = reason
        print(f"rank {self.rank}: {reason}; stopping at the end of the current step (a checkpoint is saved "
              f"if that takes under train.stop_grace_s={self.grace_s:g} s)", file=sys.stderr, flush=True)
        threading.Thread(target=self._deadline, daemon=True).start()

    def _deadline(self) -> None:
        if self._saving.wait(self.grace_s) or self._done.is_set():
            return
        print(f"rank {self.rank}: no step ended within train.stop_grace_s={self.grace_s:g} s; exiting without a "
              f"new checkpoint (the newest complete one is kept)", file=sys.stderr, flush=True)
        os._exit(PREEMPTED_EXIT)

    def _receive(self) -> None:
        while True:
            try:
                data = self._wake_r.recv(64)
            except OSError:
                return
            if not data or self._done.is_set():
                self._wake_r.close()
                return
            if signal.SIGTERM in data:
                self.request("SIGTERM received")

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.request(f"{signal.Signals(signum).name} received")

    def _watch(self, launchers: list) -> None:
        import psutil

        while not self._done.wait(self.poll_s):
            for proc in launchers:
                try:
                    gone = not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
                except psutil.Error:
                    gone = True
                if gone:
                    self.request(f"the launcher that started this rank (pid {proc.pid}) is gone")
                    return

    def agreed(self, device: Any) -> bool:
        """True on every rank when any rank was asked to stop (one small all-reduce)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.reason else 0.0], device=device)
        dist.all_reduce(flag)
        return flag.item() > 0

    def saving(self) -> None:
        self._saving.set()

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
            # DataLoader workers are forked from the main thread and torch gives them a SIGTERM handler
            # that exits: a scheduler signalling every process would kill them mid-step and the rank
            # with them. With SIGTERM blocked in the main thread the workers inherit the block; the
            # signal is taken by this idle thread (started before the block) and Python still runs
            # the handler above in the main thread.
            # The handler itself runs only when the main thread next executes Python, which a rank stuck
            # in a collective never does; the wakeup fd tells the receiver thread at once, so the grace
            # timer starts at the signal.
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_w.setblocking(False)
            self._old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
            threading.Thread(target=self._receive, daemon=True, name="sigterm-receiver").start()
            self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        launchers = launcher_ancestors()
        if launchers:
            threading.Thread(target=self._watch, args=(launchers,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            signal.set_wakeup_fd(self._old_wakeup)
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
            self._wake_w.close()  # ends the receiver thread

