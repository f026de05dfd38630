"""Make ``import bench.<module>`` work when a script runs as ``python bench/<script>.py``.

Python puts the script's own directory first on ``sys.path``; that would let ``bench/trace.py``
shadow the standard library's ``trace`` module, so the repository root takes its place.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_BENCH = REPO / "bench"
if sys.path and Path(sys.path[0] or ".").resolve() == _BENCH:
    sys.path[0] = str(REPO)
elif str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
