"""Training checkpoints: what a worker writes after each epoch and reads back on a restart, and what
the driver reads from the best one (history, weights for the export): the model's weights, the optimizer's
state by variable name, ``state.json`` (epoch count, history) and, with a moving average, the trained weights.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

import numpy as np

STATE_FILE = "state.json"
WEIGHTS_FILE = "model.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"
# With a moving average, a checkpoint's model weights are the average (what was evaluated and
# is exported); the weights training goes on from are kept beside them, for a resumed run.
TRAINED_FILE = "trained_weights.npz"


@contextlib.contextmanager
def averaged_weights(model, optimizer) -> Iterator[list[np.ndarray] | None]:
    """With a moving average (``optimizer.use_ema``): the average in ``model`` for the block
    (evaluation, checkpoint), the trained weights back after it, which it yields (else None)."""
    if not optimizer.use_ema:
        yield None
        return
    variables = model.trainable_variables
    trained = [np.array(v) for v in variables]
    optimizer.finalize_variable_values(variables)
    try:
        yield trained
    finally:
        for variable, value in zip(variables, trained):
            variable.assign(value)


def _slot_name(variable) -> str:
    # The path less the optimizer's own name ("rm_sprop/conv1_kernel_velocity" → "conv1_kernel_velocity"),
    # which Keras may number differently in another process.
    return variable.path.split("/", 1)[-1]


def save_checkpoint(directory: str, model, optimizer, state: dict[str, Any], trained: list[np.ndarray] | None) -> None:
    """Write ``model``'s weights, ``optimizer``'s state, ``state`` and the ``trained`` weights (or None)."""
    model.save_weights(os.path.join(directory, WEIGHTS_FILE))
    if trained is not None:
        np.savez(os.path.join(directory, TRAINED_FILE),
                 **{v.path: value for v, value in zip(model.trainable_variables, trained)})
    # Keyed by name, so a restore into a model built differently fails loudly instead of
    # pouring one layer's momentum into another.
    slots = {_slot_name(v): np.asarray(v) for v in optimizer.variables}
    if len(slots) != len(optimizer.variables):
        raise RuntimeError("optimizer variables with the same name: their state cannot be saved by name")
    np.savez(os.path.join(directory, OPTIMIZER_FILE), **slots)
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f)


def restore_checkpoint(directory: str, model, optimizer) -> dict[str, Any]:
    """Load the checkpoint in the folder ``directory`` into ``model`` and ``optimizer`` (built like
    the saved ones; the trained weights, when kept, over the average); returns its state."""
    model.load_weights(os.path.join(directory, WEIGHTS_FILE))
    with np.load(os.path.join(directory, OPTIMIZER_FILE)) as saved:
        missing = sorted({_slot_name(v) for v in optimizer.variables} - set(saved.files))
        if missing:
            raise RuntimeError(f"the checkpoint has no optimizer state for {missing[:3]} "
                               f"({len(missing)} in all); it was written for another model")
        for var in optimizer.variables:
            var.assign(saved[_slot_name(var)])
    if os.path.exists(os.path.join(directory, TRAINED_FILE)):
        with np.load(os.path.join(directory, TRAINED_FILE)) as saved:
            for var in model.trainable_variables:
                var.assign(saved[var.path])
    with open(os.path.join(directory, STATE_FILE)) as f:
        return json.load(f)


def read_checkpoint_state(checkpoint) -> dict[str, Any]:
    """The epoch count and per-epoch history stored in a training checkpoint."""
    with checkpoint.as_directory() as d, open(os.path.join(d, STATE_FILE)) as f:
        return json.load(f)


def load_checkpoint_weights(checkpoint, model) -> None:
    """Load a training checkpoint's model weights into ``model`` (built like the trained one)."""
    with checkpoint.as_directory() as d:
        model.load_weights(os.path.join(d, WEIGHTS_FILE))
