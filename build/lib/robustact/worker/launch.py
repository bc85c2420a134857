"""``python -m robustact.worker.launch <celery worker arguments>``: a Celery worker that dies with the
process that started it.

``robustact serve`` (and the tests) start their workers through this module with
``ROBUSTACT_PARENT_PID`` set to their own pid: the worker asks the kernel for SIGKILL when
its parent dies (``prctl(PR_SET_PDEATHSIG)``; Linux), so killing ``serve`` - even with
SIGKILL - leaves no orphaned worker running against a data directory nobody serves. Its job,
if any, is then requeued by the reaper of whatever API or worker is alive, like any job
whose worker vanished. A cold kill, not a warm shutdown: a warm one would finish the
current job first, which can take hours.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # best effort
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(0)


def main() -> None:
    parent = os.environ.get("ROBUSTACT_PARENT_PID", "")
    if parent.isdigit():
        die_with_parent(int(parent))
    from celery.__main__ import main as celery_main

    sys.argv = ["celery", *sys.argv[1:]]
    celery_main()


if __name__ == "__main__":
    main()
