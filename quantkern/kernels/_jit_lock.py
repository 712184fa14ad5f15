"""A lock for torch's JIT extension builds that a killed build cannot leave behind."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def build_lock(build_dir: Path):
    """Hold an exclusive ``flock`` on ``build_dir`` while torch builds there. torch's own guard is a
    ``lock`` file that a killed build leaves behind, after which every later build waits for it
    forever; the kernel drops a ``flock`` with its holder, so a ``lock`` file found while holding it
    was left by a dead build and is removed."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's file lock alone
        yield
        return
    with open(build_dir / "quantkern.flock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                logger.warning("quantkern: removing %s, left by a build that was killed", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
