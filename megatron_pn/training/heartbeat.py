"""Heartbeats: a training job whose node dies, freezes or loses its network ends in bounded time.

A rank whose peer is gone waits in its next collective: gloo for its 30-minute timeout, NCCL for
as long as the watchdog allows, and a frozen peer (SIGSTOP, a hung driver) holds its sockets
open, so nothing fails at all. So every rank runs a thread that bumps its counter in the job's
store (torchrun's, at MASTER_ADDR:MASTER_PORT, over its own connection) every `interval`
seconds. Rank 0 watches every counter; every other rank watches rank 0's and its own link to
the store. When a counter has not moved, or the store has not answered, for `timeout` seconds,
the watching rank prints one line naming the silent node and its ranks and ends its process
(os._exit: its main thread may be stuck in a collective). torchrun then stops the node's other
workers, srun (--kill-on-bad-exit) the other nodes', and the batch script requeues the job
from its newest complete checkpoint (slurm/common.sh). A thread keeps beating while the main
thread computes, evaluates or saves: only a process that stopped running, or a lost link,
goes silent. Counters, not timestamps: the nodes' clocks need not agree.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

EXIT_PEER_LOST = 75  # EX_TEMPFAIL: the job may succeed when run again


class Heartbeat:
    def __init__(self, rank: int, world_size: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        self.interval = max(0.5, min(10.0, timeout / 6))
        self.store = dist.PrefixStore("pn/heartbeat", dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=timedelta(seconds=self.interval), wait_for_workers=False))
        self.where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        self.store.set(f"host/{rank}", socket.gethostname())
        self.watched = list(range(world_size)) if rank == 0 else [0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pn-heartbeat", daemon=True)

    @classmethod
    def start_if_distributed(cls, timeout: float) -> Heartbeat | None:
        """A heartbeat for a launched world of more than one process (timeout 0: none)."""
        if timeout <= 0 or not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        beat = cls(dist.get_rank(), dist.get_world_size(), timeout)
        beat._thread.start()
        return beat

    def stop(self) -> None:
        """Stop beating, and tell the watchers this rank ended on purpose."""
        self._stop.set()
        self._thread.join(timeout=2 * self.interval)
        try:
            self.store.set(f"done/{self.rank}", "1")
        except RuntimeError:
            pass  # the store's node ended first: nobody is left to watch

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        seen = {r: (None, time.monotonic()) for r in self.watched}  # rank: (counter, since)
        store_ok = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                self.store.add(f"beat/{self.rank}", 1)
                for r in self.watched:
                    value = self.store.add(f"beat/{r}", 0)  # read without waiting for the key
                    if value != seen[r][0]:
                        seen[r] = (value, now)
                silent = [r for r in self.watched if now - seen[r][1] > self.timeout
                          and not self.store.check([f"done/{r}"])]
            except RuntimeError as err:  # DistStoreError, DistNetworkError, or plain
                if now - store_ok > self.timeout:
                    self._give_up(f"the job's store at {self.where} has not answered for "
                                  f"{now - store_ok:.0f} s ({_first_line(err)}): this node "
                                  f"({socket.gethostname()}) lost its network, or the store's "
                                  "node is gone")
                continue
            store_ok = now
            if silent:
                self._give_up(self._describe(silent, now - min(seen[r][1] for r in silent)))

    def _describe(self, ranks: list[int], seconds: float) -> str:
        by_host: dict[str, list[int]] = {}
        for r in ranks:
            try:
                host = self.store.get(f"host/{r}").decode()
            except RuntimeError:
                host = "?"
            by_host.setdefault(host, []).append(r)
        nodes = "; ".join(f"node {h} (rank{'s' * (len(rs) > 1)} {', '.join(map(str, rs))})"
                          for h, rs in by_host.items())
        return (f"{nodes} sent no heartbeat for {seconds:.0f} s (train.heartbeat_timeout "
                f"{self.timeout:g} s): killed, frozen or cut off")

    def _give_up(self, why: str) -> None:
        print(f"pn: error: rank {self.rank} on {socket.gethostname()}: {why}; stopping this "
              "process (the job resumes from its newest complete checkpoint)",
              file=sys.stderr, flush=True)
        # os._exit skips the exit handlers that stop our children: a data worker blocked on a
        # full queue would outlive us, holding the job step's output open (srun waits for it).
        for child in multiprocessing.active_children():
            child.kill()
        os._exit(EXIT_PEER_LOST)


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
