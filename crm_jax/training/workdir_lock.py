"""One live run per workdir: an advisory lock on ``<workdir>/.lock`` held for the whole run.

The lock is an ``flock`` on an open file, so the operating system releases it when its process
ends in any way (exit, crash, SIGKILL): a lock left by a dead run is simply taken over. The file
records who holds it, for the message a second run gets. In a multi-process run only process 0
takes it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket

import jax

from crm_jax.errors import CrmError

LOCK_FILE = ".lock"


class WorkdirBusy(CrmError):
    """Another live run holds the workdir (exit code 1)."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Hold ``workdir``'s lock for the duration of the block; raise `WorkdirBusy` if a live run has it."""
    if jax.process_index() != 0:
        yield
        return
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}"
            raise WorkdirBusy(
                f"--workdir {workdir!r} is in use by a live run ({who}): wait for it to end or use another --workdir"
            ) from None
        me = dict(
            pid=os.getpid(), host=socket.gethostname(), started=datetime.datetime.now().isoformat(timespec="seconds")
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
