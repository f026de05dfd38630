"""The pipeline's error.

Its own module because every part of the pipeline raises it (the split, the gathers, joining the
group, the stages, lockstep) and the loader and the command-line tools catch it, apart from all
of them.
"""

from __future__ import annotations


class PipelineError(RuntimeError):
    """A pipeline rank failed, disagrees with the others or stopped answering; names the rank."""
