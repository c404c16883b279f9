"""The processes of a tensor-parallel replica and the group they form.

Rank 0 is the engine's own ModelRunner, in whatever process runs the engine. It opens a TCPStore on
a free loopback port, starts ranks 1..N-1 as child processes (``python -m
kvmesh.worker.distributed.rank_main``), and all of them build two process groups from the store:
gloo for host messages (the scheduled step, broadcast by rank 0) and, on CUDA, NCCL for the layers'
all-reduces and all-gathers (on the CPU the gloo group does both). Each child builds the same
ModelRunner with its shard and runs every step rank 0 broadcasts, until rank 0 broadcasts STOP.

Failures end the replica, never hang it: a watchdog thread per child waits on its process; a rank
that exits while the replica runs logs one error line in rank 0 and ends rank 0's process with exit
code 1 (a collective in flight would otherwise wait on the dead rank forever under NCCL). Each child
polls its parent and exits once rank 0 is gone. Children run in their own session, so a terminal's
Ctrl-C reaches rank 0 only, whose orderly shutdown stops them.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvmesh.worker.distributed import steps
from kvmesh.worker.model.parallel import ParallelGroup

if TYPE_CHECKING:
    from kvmesh.worker.engine.config import EngineConfig
    from kvmesh.worker.engine.model_runner import StepInputs

log = logging.getLogger(__name__)

START_TIMEOUT = datetime.timedelta(minutes=30)  # the other ranks load their shards meanwhile
# Host messages wait for the next step for as long as the replica idles; a dead peer is found by the
# watchdogs, not by this timeout.
IDLE_TIMEOUT = datetime.timedelta(days=365)
STOP_WAIT_S = 10.0
START_GRACE_S = 20.0  # a rank that dies while loading: how long rank 0 gets to fail by itself


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r of a CUDA replica uses the r-th GPU after the configured one (cuda:0, cuda:1, ...)."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def check_devices(device: torch.device, size: int) -> None:
    if device.type == "cuda":
        first = device.index or 0
        if first + size > torch.cuda.device_count():
            raise ValueError(
                f"tensor_parallel_size {size} from {device} needs GPUs {first}..{first + size - 1}, "
                f"but {torch.cuda.device_count()} are visible"
            )


def join_group(store, rank: int, size: int, device: torch.device) -> ParallelGroup:
    """This rank's ParallelGroup: gloo over loopback for host messages, NCCL for CUDA tensors."""
    import torch.distributed as dist

    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    opts._timeout = IDLE_TIMEOUT
    host = dist.ProcessGroupGloo(dist.PrefixStore("host/", store), rank, size, opts)
    if device.type != "cuda":
        return ParallelGroup(rank, size, device_pg=host, host_pg=host)
    torch.cuda.set_device(device)
    nccl = dist.ProcessGroupNCCL(dist.PrefixStore("nccl/", store), rank, size)
    return ParallelGroup(rank, size, device_pg=nccl, host_pg=host)


class RankSupervisor:
    """Rank 0's handle on ranks 1..N-1: starts them, broadcasts steps to them, watches and stops them."""

    def __init__(self, config: EngineConfig, model_dir: Path, device: torch.device) -> None:
        import torch.distributed as dist

        self.size = config.tensor_parallel_size
        check_devices(device, self.size)
        self._stopping = False
        self._stopped = threading.Event()  # stop() ran: child exits from here on are expected
        self.ready = False  # set by rank 0's ModelRunner once every rank waits for steps
        self._failed = threading.Event()
        self._lock = threading.Lock()  # one step or the stop message on the wire at a time
        self._store = dist.TCPStore(
            "127.0.0.1", 0, self.size, True, timeout=START_TIMEOUT, wait_for_workers=False
        )
        spec = {
            "config": asdict(config),
            "model_dir": str(model_dir),
            "port": self._store.port,
            "device": str(device),
            "threads": max(1, torch.get_num_threads() // self.size),
            "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()),
        }
        self.procs: list[subprocess.Popen] = []
        try:
            for rank in range(1, self.size):
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "kvmesh.worker.distributed.rank_main", str(rank)],
                        stdin=subprocess.PIPE,
                        start_new_session=True,  # a terminal's Ctrl-C is rank 0's to handle
                    )
                )
                self.procs[-1].stdin.write(json.dumps(spec).encode())
                self.procs[-1].stdin.close()
        except BaseException:
            self.stop()
            raise
        for rank, proc in enumerate(self.procs, start=1):
            threading.Thread(
                target=self._watch, args=(rank, proc), name=f"kvmesh-rank{rank}-watch", daemon=True
            ).start()
        log.info("Started tensor-parallel ranks 1..%d (pids %s)", self.size - 1, [p.pid for p in self.procs])
        self.group = join_group(self._store, 0, self.size, rank_device(device, 0))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _watch(self, rank: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if self._stopping:
            return
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        what = f"tensor-parallel rank {rank} (pid {proc.pid}) died ({how})"
        if not self.ready:
            # Start-up: a bad checkpoint or too little memory fails rank 0 too, which then raises
            # its own error and stops the ranks; only a rank 0 still waiting on the dead one is ended.
            log.error("%s while the model was loading", what)
            if self._stopped.wait(START_GRACE_S):
                return
        self.fail(f"{what}; the replica cannot run without it")

    def fail(self, message: str) -> None:
        """Logs ``message`` as the one error line and ends this process (exit code 1) and every rank."""
        if self._failed.is_set():
            return
        self._failed.set()
        self._stopping = True
        log.error("%s: exiting", message)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        logging.shutdown()
        os._exit(1)

    def after_step_error(self) -> None:
        """A collective raised: when a rank has died, its watchdog ends the process within moments;
        otherwise this returns and the caller re-raises the error."""
        self._failed.wait(5.0)

    def send_step(self, step: StepInputs) -> None:
        header, payload = steps.pack(step)
        host = self.group.host_pg
        host.broadcast(header, 0).wait()
        if payload.numel():
            host.broadcast(payload, 0).wait()

    def stop(self) -> None:
        """Ends every rank: STOP over the group when they wait for steps, then a signal to any rank
        still up (during start-up the ranks are inside collectives no STOP would match)."""
        if self._stopping:
            return
        self._stopping = True
        self._stopped.set()
        sent = self.ready and self._lock.acquire(timeout=2.0)  # not while a step is on the wire
        if sent:
            sender = threading.Thread(target=self._send_stop, name="kvmesh-rank-stop", daemon=True)
            sender.start()
            sender.join(STOP_WAIT_S / 2)  # a rank that does not take it is signalled below
            self._lock.release()
        deadline = time.monotonic() + (STOP_WAIT_S if sent else 0.0)
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.info("Stopped tensor-parallel ranks 1..%d", self.size - 1)

    def _send_stop(self) -> None:
        try:
            if all(p.poll() is None for p in self.procs):
                self.group.host_pg.broadcast(steps.stop_header(), 0).wait()
        except Exception as e:  # the ranks are signalled either way
            log.debug("STOP broadcast failed: %s", e)

    @property
    def lock(self) -> threading.Lock:
        return self._lock


def receive_step(group: ParallelGroup) -> StepInputs | None:
    """The next step rank 0 broadcasts; None once it broadcasts STOP."""
    header = torch.zeros(steps.HEADER, dtype=torch.int64)
    group.host_pg.broadcast(header, 0).wait()
    if int(header[0]) == steps.STOP:
        return None
    payload = torch.zeros(steps.payload_size(header), dtype=torch.int64)
    if payload.numel():
        group.host_pg.broadcast(payload, 0).wait()
    return steps.unpack(header, payload)


def watch_parent() -> None:
    """Ends this rank once its parent (rank 0) is gone, whatever it was doing."""
    parent = os.getppid()

    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=poll, name="kvmesh-parent-watch", daemon=True).start()
