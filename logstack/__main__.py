"""``python -m logstack``: how the supervisor starts its workers, and another way to run it."""

import signal
import sys

if sys.argv[1:2] == ["serve"]:
    # Before the imports (a second or more, with the WAL's recovery): until the signal
    # loop takes over, SIGHUP's default action would kill a starting worker (a SIGHUP to
    # the process group, say). A starting process reads its settings anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

from ._cli import main

raise SystemExit(main())
