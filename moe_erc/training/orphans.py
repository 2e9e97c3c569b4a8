"""Helper processes that die with the rank that started them (Linux), so a crashed rank leaves nothing behind.

megatron-core's checkpoint writer keeps its results queue in a ``multiprocessing`` Manager process per rank
(``filesystem_async.get_write_results_queue``). When a rank dies by SIGKILL (out of memory, a node agent,
``torchrun`` tearing down a failed round) that process survives it: ~270 MB each, holding the launcher's
stdout open, for as long as the job lives, one more after every restart. :func:`install_checkpoint_queue`
starts the same Manager queue with an initializer that asks Linux to SIGKILL it when its parent dies. The
initializer is ``exec`` of :data:`DIE_WITH_PARENT` (a builtin, so the spawned process imports neither moe-erc
nor torch: it starts as fast as megatron's own).
"""

from __future__ import annotations

import signal
import sys

# In the child: receive SIGKILL when the parent thread that started it exits (prctl PR_SET_PDEATHSIG = 1).
DIE_WITH_PARENT = f"import ctypes; ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, {int(signal.SIGKILL)})"


def install_checkpoint_queue() -> None:
    """Give megatron's checkpoint writer a results queue whose Manager process dies with this rank."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None or not sys.platform.startswith("linux"):
        return
    import multiprocessing
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=exec, initargs=(DIE_WITH_PARENT,))
    filesystem_async._results_queue = manager.Queue()
    filesystem_async._results_queue_manager = manager  # keep the Manager alive with the queue
