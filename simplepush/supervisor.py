"""Several worker processes behind one public port, each replaced when it dies.

Why not tornado.process.fork_processes: it does not pass SIGTERM on to its
children, and a restarted child does not keep its index, while each index
owns a listening socket and a router port that Holder records name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence

from simplepush import logs
from simplepush.logs import event

# A worker that keeps dying is restarted at most this often.
RESTART_DELAY = 1.0


def supervise(
    count: int, work: Callable[[int], int], listeners: Sequence[socket.socket] = ()
) -> int:
    """Run work(index) in `count` forked children until SIGTERM/SIGINT, then wait for them.

    `listeners` are the sockets the children serve, kept open here so that a
    replacement finds its predecessor's queued connections. On SIGTERM they
    are closed here first: else they would keep listening after the workers
    stop, and every connection made during the shutdown would be reset
    unanswered when this process exits, instead of refused at once.
    """
    children: dict[int, int] = {}  # pid -> index
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            # the parent's forwarding handler is not ours; until serve() sets its own
            signal.signal(signal.SIGHUP, lambda signum, frame: logs.reopen())
            code = 1
            try:
                code = work(index)
            except BaseException:
                logs.exception("worker.crashed")
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = index
        event(logging.INFO, "worker.start", index=index, pid=pid)

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for sock in listeners:
            sock.close()
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def reopen(signum: int, frame: object) -> None:
        """logrotate's SIGHUP: reopen our log file and have every worker reopen its own."""
        logs.reopen()
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reopen)
    for index in range(count):
        spawn(index)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        if index is None or stopping:
            continue
        event(
            logging.ERROR,
            "worker.died",
            index=index,
            pid=pid,
            exit_code=os.waitstatus_to_exitcode(status),
        )
        time.sleep(RESTART_DELAY)
        if not stopping:
            spawn(index)
    return 0
