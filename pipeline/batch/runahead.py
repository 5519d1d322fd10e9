"""How far decoding may run ahead of the inference actors.

Decoding runs about 50 times faster than VGG16 on a CPU. Left alone, decode tasks keep
going and their blocks wait in Ray's object store until Ray Data's own backpressure (a
share of the object store, GiBs) stops them, so the memory of the Ray processes grew with
the data set (docs/performance.md, "Memory"). ``RunAheadCap`` is a Ray Data backpressure policy that
holds back an operator feeding an actor pool while a fixed number of its blocks are alive
(queued, handed to an actor, or in an actor's call): memory then depends on the actor count,
not on the number of files.
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
# Per actor, the two it holds plus one decoded and ready, so the block that refills its
# mailbox never waits for a decode task. A decode task takes a block in about a tenth of a
# second on one core, a CPU actor several seconds; a GPU actor that outruns decoding finds
# this queue empty, so the cap never binds there and cannot slow it.
RUN_AHEAD_BLOCKS_PER_ACTOR = ACTOR_TASKS_IN_FLIGHT + 1
RUN_AHEAD_CONFIG_KEY = "pipeline.run_ahead_blocks"


def run_ahead_blocks(actors: int, blocks_per_batch: int = 1) -> int:
    """The live blocks an operator feeding a pool of ``actors`` actors may have (see module doc),
    counted in the actors' batches of ``blocks_per_batch`` blocks: an actor's call waits until a
    whole batch has arrived, so a budget of fewer blocks would let no call start."""
    return RUN_AHEAD_BLOCKS_PER_ACTOR * max(blocks_per_batch, 1) * max(actors, 1)


def cap_run_ahead(context: DataContext, actors: int, blocks_per_batch: int = 1) -> None:
    """Install ``RunAheadCap`` in ``context`` (a dataset's own context: other datasets keep
    theirs) with the budget of a pool of ``actors`` actors; Ray Data's own policies stay."""
    context.set_config(RUN_AHEAD_CONFIG_KEY, run_ahead_blocks(actors, blocks_per_batch))
    context.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, [*ENABLED_BACKPRESSURE_POLICIES, RunAheadCap])


class RunAheadCap(BackpressurePolicy):
    """Hold back an operator whose output feeds an actor pool while its live output blocks
    (counted by Ray Data's block ref counter until the actor's call that took them ends)
    reach the budget set by ``cap_run_ahead``. Running tasks are not counted: their number
    is bounded by the CPUs, and counting them would throttle decoding where it is the bottleneck."""

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
