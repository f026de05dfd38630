"""Layer-pipelined offloading across processes or machines on ``mx.distributed`` (issue 13).

Each rank of a group holds a contiguous block of decoder layers: their dense weights, and a
store reader, slot pools and budget plan over their experts only. Ranks follow mlx-lm's order
(rank 0 holds the *last* layers, the last rank the first), so after the last layer rank 0's
hidden state is the output and one ``all_gather`` gives it to every rank.

* Models with mlx-lm's own ``model.model.pipeline(group, split)`` (qwen3_moe, deepseek_v2/v3,
  glm4_moe, ...) use it.
* Every other architecture gets a generic split: the layers outside the block become
  pass-throughs, the first local layer receives the hidden state from the next rank up and the
  last one sends it on, then gathers the output (as exo does).

The split is made while the model is built (before any weight is read), so a rank never reads
another rank's dense weights or expert records. Load-time failures are agreed on: a rank whose
load fails tells the others, and every rank raises an error naming it.

The package's modules, one job each: ``split`` (the layers per rank), ``gather`` (host data
between the ranks), ``join`` (joining the group; its state: ``join.JOINED``,
``join.LOAD_TIMEOUT_S``, ...), ``rank`` (``Pipeline``, one rank's place), ``stages`` (the generic
split of the decoder), ``lockstep`` (generation, rank 0 leading) and ``errors``
(``PipelineError``). Here: the package's public names; the state of joining is read and
set in ``join`` only.
"""

from .errors import PipelineError
from .gather import gather_bytes, gather_json, settle, store_digest
from .join import fail_start, init_group, resolve_group, waiting_group
from .lockstep import SAMPLING_ARGS, Lockstep
from .rank import Pipeline, gather_stats, pipeline_of
from .split import check_split, layer_range, pipeline_budget, proportional_split

__all__ = ["PipelineError", "Pipeline", "pipeline_of", "gather_stats", "pipeline_budget",
           "proportional_split", "check_split", "layer_range", "gather_bytes", "gather_json",
           "settle", "store_digest", "init_group", "resolve_group", "waiting_group",
           "fail_start", "Lockstep", "SAMPLING_ARGS"]
