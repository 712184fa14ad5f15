"""A lock for torch's JIT extension builds that a killed build cannot leave behind."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def build_lock(build_dir: Path, stale_after: float = 900.0):
    """Hold an exclusive ``flock`` on ``build_dir`` while torch builds there.

    torch's own guard is a ``lock`` file that a killed build leaves behind, after which every later
    build waits for it forever. Builds that take this flock never meet each other's ``lock`` file (the
    kernel drops a flock with its holder); one found here belongs to a builder that does not take it
    (another quantkern version, a plain ``cpp_extension.load``) or to a dead one. So wait while it is
    younger than ``stale_after`` seconds (a live build finishes and removes it) and remove it after
    that, with a warning, instead of waiting forever."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's file lock alone
        yield
        return
    with open(build_dir / "quantkern.flock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            _clear_stale(build_dir / "lock", stale_after)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _clear_stale(lock: Path, stale_after: float) -> None:
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= stale_after:
            logger.warning("quantkern: removing %s, left %.0f s ago by a build that did not finish", lock, age)
            lock.unlink(missing_ok=True)
            return
        time.sleep(min(1.0, stale_after - age))
