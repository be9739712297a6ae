"""Multi-process test runs that cannot flake CI: the ranks meet through a fresh file store (no port
another process could take between choosing and binding it), and a rank killed by SIGABRT while
gloo shuts down ("terminate called without an active exception", seen on loaded CI machines) gets
one more full run; a real failure repeats, and an assertion or exception in a rank is never retried."""
import os
import signal
import tempfile

import torch.multiprocessing as mp


def spawn_ranks(target, ranks, *args):
    """mp.spawn(target, args=(store, *args), nprocs=ranks); target(rank, store, *args) joins the
    process group with init_method=store."""
    for attempt in range(2):
        with tempfile.TemporaryDirectory() as folder:
            store = "file://" + os.path.join(folder, "store")
            try:
                mp.spawn(target, args=(store, *args), nprocs=ranks, join=True)
                return
            except mp.ProcessExitedException as error:
                if attempt == 1 or error.signal_name != signal.Signals.SIGABRT.name:
                    raise
