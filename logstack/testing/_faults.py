"""Storage faults made by the kernel itself, for tests: no root, no mocks."""

from __future__ import annotations

import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Within the block, writes of this process past ``limit`` bytes of any file are cut
    short by the kernel, as when the disk fills up mid-write (``RLIMIT_FSIZE``: a short
    count, then ``EFBIG``). Keep the block to the write under test: it applies to every
    file the process writes, logs and captured output included."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
