"""``python -m deepspec_jax.train --config=configs/dspark/dspark_smollm2_135m.py [--config.x.y=...]``

Trains a draft against a frozen target from one config file (every field can be
overridden on the command line; typos are errors). Resumes automatically from the
latest checkpoint in ``<output_dir>/checkpoints``. Multi-host (TPU pods): pass
``--multihost`` (or set the coordinator flags) on every host; see scripts/launch_tpu_pod.sh.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from deepspec_jax.errors import ConfigError
from deepspec_jax.train.trainer import NonFiniteLoss, export, exports_hf, setup, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/<arch>/<name>.py).",
                                          lock_config=True)
flags.DEFINE_boolean("multihost", False, "Call jax.distributed.initialize() (TPU pods / GPU clusters: "
                     "the coordinator is discovered from the environment).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process set-up).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's id (with --coordinator_address).")
flags.DEFINE_integer("stop_after", None, "Run at most this many steps now, then checkpoint and exit "
                     "(long runs in resumable pieces).")
flags.DEFINE_boolean("export", True, "Export the draft (JAX dir + HF) when the run reaches its last step.")
flags.DEFINE_boolean("export_only", False, "Restore the latest checkpoint and export it (JAX dir + HF), "
                     "without training (e.g. to evaluate a run midway).")
FLAGS = flags.FLAGS


def init_distributed() -> None:
    """Join the multi-process run (before anything asks jax for its devices)."""
    if FLAGS.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.multihost:
        jax.distributed.initialize()


def main(argv) -> int:
    if len(argv) > 1:
        sys.exit(f"train: unexpected arguments {argv[1:]}; all settings are --config.<field>=... flags.")
    if _CONFIG.value is None:
        sys.exit("train: pass --config=configs/<arch>/<name>.py (e.g. configs/dspark/dspark_smollm2_135m.py).")
    init_distributed()
    if not FLAGS["verbosity"].present:  # keep orbax/jax INFO lines off the console
        logging.set_verbosity(logging.WARNING)
    c = _CONFIG.value
    try:
        run = setup(c)
    except ConfigError as e:
        sys.exit(f"train: {e}")
    start = int(jax.device_get(run.state.step))
    if jax.process_index() == 0:
        print(f"train: {c.name}: step {start}/{run.total_steps}, mesh {dict(run.mesh.shape)}, "
              f"{'online target features' if run.step_config.online else 'cached features'}, "
              f"{run.step_config.num_micro} micro-batch(es) per step -> {run.out_dir}", flush=True)
    if FLAGS.export_only:
        dst = export(run)
        print(f"train: exported step {start} to {dst}", flush=True)
        run.checkpoints.close()
        return 0
    try:
        train(run, stop_after=FLAGS.stop_after)
    except NonFiniteLoss as e:
        run.checkpoints.close()
        sys.exit(f"train: {e}")
    step = int(jax.device_get(run.state.step))
    if step >= run.total_steps and FLAGS.export:
        dst = export(run)
        if jax.process_index() == 0:
            print(f"train: exported the draft to {dst}" + (f" and {run.out_dir}/hf" if exports_hf(run) else ""))
    run.checkpoints.close()
    return 0


if __name__ == "__main__":
    app.run(main)
