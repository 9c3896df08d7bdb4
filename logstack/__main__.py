"""``python -m logstack``: how the supervisor starts its workers, and another way to run it.

A starting ``serve`` ignores SIGHUP from the package's first lines (``logstack/__init__.py``).
"""

from ._cli import main

raise SystemExit(main())
