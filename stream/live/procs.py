"""What every child process of ``run --workers N`` does the same way: die with the supervisor, log
with its name, and tell the supervisor it is alive.

A child whose supervisor was killed must not run on: a worker would keep publishing while a new
supervisor starts another for the same streams, and a detection stage would hold the GPU. Each
child watches its parent's pid and exits when it changes; the heartbeat's broken pipe ends it too.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
"""how often a child says it is alive; the supervisor counts one as hung after several missed"""


def die_with_parent(parent_pid: int) -> None:
    """Exit this process soon after the process that started it is gone (checked twice a second).

    Not ``PR_SET_PDEATHSIG``: Linux sends that signal when the parent *thread* that forked the
    child ends, and the supervisor restarts children from a thread of its own."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)  # a poll of the parent, not synchronisation: nothing else wakes it
        os._exit(1)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def child_logging(name: str, level: int) -> None:
    """Log lines of a child carry its name, so a supervisor's merged stderr says who spoke."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [{name}] %(name)s: %(message)s")
    logging.getLogger("stream").setLevel(level)


def start_heartbeat(conn: Connection, status: Callable[[], dict[str, Any]],
                    stop: threading.Event, lock: threading.Lock | None = None) -> threading.Thread:
    """Send ``("alive", status())`` to the supervisor every :data:`HEARTBEAT_S` until ``stop``.

    If the supervisor's end is gone the child exits: nobody would restart or watch it. ``lock``
    guards ``conn`` where other threads send on it too."""
    guard = lock or threading.Lock()

    def beat() -> None:
        while not stop.is_set():
            try:
                msg = ("alive", status())
                with guard:
                    conn.send(msg)
            except (OSError, EOFError, ValueError):
                log.error("supervisor gone; exiting")
                os._exit(1)
            except Exception:  # a status that failed to build must not stop the heartbeat
                log.exception("heartbeat status failed")
            stop.wait(HEARTBEAT_S)

    t = threading.Thread(target=beat, name="heartbeat", daemon=True)
    t.start()
    return t
