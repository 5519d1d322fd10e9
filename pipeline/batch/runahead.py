"""How far decoding may run ahead of the inference actors (docs/architecture.md#run-ahead): decoded
blocks would otherwise pile up until Ray Data's own backpressure (GiBs), so memory grew with the data
set. ``RunAheadCap`` bounds the live blocks per actor: memory then depends on the actors, not the files.
"""

from __future__ import annotations

from ray.data import DataContext
from ray.data._internal.execution.backpressure_policy import (
    ENABLED_BACKPRESSURE_POLICIES,
    ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
    BackpressurePolicy,
)
from ray.data._internal.execution.interfaces.physical_operator import PhysicalOperator
from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

# Blocks Ray Data hands each actor at once: one in its call and one waiting in its mailbox,
# so an actor starts its next call the moment the last one returns.
ACTOR_TASKS_IN_FLIGHT = 2
# Per actor, the two it holds plus one decoded and ready, so refilling its mailbox never waits for
# a decode task. A GPU actor that outruns decoding finds this queue empty: the cap never slows it.
RUN_AHEAD_BLOCKS_PER_ACTOR = ACTOR_TASKS_IN_FLIGHT + 1
RUN_AHEAD_CONFIG_KEY = "pipeline.run_ahead_blocks"


def cap_run_ahead(context: DataContext, actors: int, blocks_per_batch: int = 1) -> None:
    """Install ``RunAheadCap`` in ``context`` (a dataset's own context: other datasets keep theirs) with the
    budget of a pool of ``actors`` actors, in whole batches of ``blocks_per_batch`` blocks (a call waits for
    its whole batch, so a smaller budget would let no call start); Ray Data's own policies stay."""
    context.set_config(RUN_AHEAD_CONFIG_KEY, RUN_AHEAD_BLOCKS_PER_ACTOR * max(blocks_per_batch, 1) * max(actors, 1))
    context.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, [*ENABLED_BACKPRESSURE_POLICIES, RunAheadCap])


class RunAheadCap(BackpressurePolicy):
    """Hold back an operator feeding an actor pool while its live output blocks (Ray Data counts them
    until the call that took them ends) reach ``cap_run_ahead``'s budget. Running tasks are not
    counted: the CPUs bound them, and counting them would throttle decoding where it is the bottleneck."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.blocks = self._data_context.get_config(RUN_AHEAD_CONFIG_KEY)

    def can_add_input(self, op: PhysicalOperator) -> bool:
        if self.blocks is None or not any(isinstance(d, ActorPoolMapOperator) for d in op.output_dependencies):
            return True
        block_bytes = op.metrics.average_bytes_per_output
        if not block_bytes:
            return True
        return self._resource_manager.get_mem_op_outputs(op) < self.blocks * block_bytes
