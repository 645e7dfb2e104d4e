"""Resumable training checkpoints with orbax (async, keep-N, atomic).

A checkpoint holds the TrainState (params, optimizer, step, PRNG) and, as JSON, the
data iterator state and the run description. Restores target the shardings of the
CURRENT mesh, so a run resumes on a different device count (orbax reshards on read).
A checkpoint is written under ``<step>.orbax-checkpoint-tmp-*`` and only becomes visible
after orbax's atomic rename, so a kill -9 mid-save (an asynchronous save runs in the
background while training goes on) leaves the previous one as the latest; the next run
deletes such leftovers when it opens the directory.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from deepspec_jax.train.step import TrainState


class Checkpoints:
    """Keep-``keep`` orbax checkpoints of a run under ``directory``."""

    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_state: dict, run_info: dict, force: bool = False) -> bool:
        step = int(jax.device_get(state.step))
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state._asdict()), data=ocp.args.JsonSave(data_state),
            run=ocp.args.JsonSave(run_info)), force=force)

    def restore(self, like: TrainState, step: int | None = None):
        """(TrainState placed like ``like``'s arrays, data state, run info) of ``step``
        (default: the latest)."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                like._asdict())
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
            run=ocp.args.JsonRestore()))
        return TrainState(**out["state"]), out["data"], out["run"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
