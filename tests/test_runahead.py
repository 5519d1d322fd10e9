"""The cap on how far decoding runs ahead of the inference actors (pipeline/batch/runahead.py), read
back from the real Ray Data objects that ``map_with_actors`` builds; no Ray cluster needed."""

from __future__ import annotations

import pytest
from ray.data import DataContext, Dataset
from ray.data._internal.execution.backpressure_policy import get_backpressure_policies
from ray.data._internal.logical.interfaces import LogicalPlan
from ray.data._internal.logical.operators import InputData
from ray.data._internal.stats import DatasetStats

from pipeline.batch.cluster import InferencePlan
from pipeline.batch.inference import map_with_actors
from pipeline.batch.runahead import RunAheadCap


class Identity:
    def __call__(self, batch):
        return batch


def empty_dataset() -> Dataset:
    """A real Ray dataset over no blocks, built without a cluster (``ray.data.range`` would start one)."""
    context = DataContext.get_current().copy()
    return Dataset(LogicalPlan(InputData(input_data=[]), context), context, DatasetStats(metadata={}, parent=None))


@pytest.mark.parametrize("actors", [1, 4])
def test_the_stage_feeding_the_actors_may_run_three_blocks_ahead_per_actor(actors):
    plan = InferencePlan(actors=actors, num_cpus=0.5, num_gpus=0.0, decode_cpus=0.5)
    mapped = map_with_actors(empty_dataset(), Identity, {}, plan, batch_size=8)
    # The policies Ray Data's executor builds for this dataset, by its own factory.
    policies = get_backpressure_policies(mapped.context, {}, None)
    caps = [p for p in policies if isinstance(p, RunAheadCap)]
    assert [c.blocks for c in caps] == [3 * actors]
    assert len(policies) > 1, "Ray Data's own policies must stay installed"
    assert mapped._logical_plan.dag.compute.max_tasks_in_flight_per_actor == 2


def test_a_batch_of_several_blocks_gets_room_for_whole_batches():
    """An actor's call waits for a whole batch: with 512-row batches of 64-row blocks, a cap of 3
    blocks would let no call start (Ray's liveness fallback would then trickle one block at a time)."""
    plan = InferencePlan(actors=2, num_cpus=0.5, num_gpus=0.0, decode_cpus=0.5)
    mapped = map_with_actors(empty_dataset(), Identity, {}, plan, batch_size=512, block_rows=64)
    caps = [p for p in get_backpressure_policies(mapped.context, {}, None) if isinstance(p, RunAheadCap)]
    assert [c.blocks for c in caps] == [3 * 8 * 2]


def test_the_cap_stays_with_its_dataset():
    map_with_actors(empty_dataset(), Identity, {}, InferencePlan(2, 0.5, 0.0, 0.5), batch_size=8)
    other = empty_dataset()
    assert not any(isinstance(p, RunAheadCap) for p in get_backpressure_policies(other.context, {}, None))
    assert not any(isinstance(p, RunAheadCap)
                   for p in get_backpressure_policies(DataContext.get_current(), {}, None))
