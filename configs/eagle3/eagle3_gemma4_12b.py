"""Eagle3 draft (1 layer, training-time test unrolled 7 steps) for google/gemma-4-12B-it:
the reference hyper-parameters.

Reference: deepseek-ai/DeepSpec ``config/eagle3/eagle3_gemma4_12b.py``; each value is quoted next to
its field.

Gemma-4 targets are not supported by deepspec_jax's model code yet: this config loads and
validates, but the trainer refuses the target family (ConfigError from
deepspec_jax.models.registry) until Gemma support lands.

Run (override the placeholder paths)::

    python -m deepspec_jax.train --config=configs/eagle3/eagle3_gemma4_12b.py \
        --config.target.path=/models/Gemma-4-12B-it \
        --config.data.train="('data/gemma4_12b/tokens',)"
"""

import importlib.util
import pathlib

from deepspec_jax.train.config import base_config

# configs/ is not a package: load the shared target facts (configs/_targets.py) by path.
_spec = importlib.util.spec_from_file_location(
    "_deepspec_config_targets", pathlib.Path(__file__).resolve().parents[1] / "_targets.py")
_targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_targets)

REF = "config/eagle3/eagle3_gemma4_12b.py"  # in deepseek-ai/DeepSpec


def get_config():
    c = base_config("eagle3")
    c.name = "eagle3_gemma4_12b"
    # configs/_targets.py sets target.path (placeholder HF dir of google/gemma-4-12B-it),
    # draft.target_layer_ids and data.train (placeholder token store).
    _targets.apply_target(c, "gemma4_12b")

    # Draft.  ref: config/eagle3/eagle3_gemma4_12b.py
    c.draft.num_hidden_layers = 1                # ref: draft_num_hidden_layers=1
    c.draft.ttt_length = 7                       # ref: ttt_length=7
    c.draft.step_loss_decay = 0.8                # ref: step_loss_decay=0.8
    c.loss.eagle3_corrected = False              # the reference's own targets (SPEC section 7)

    # Optimisation.  ref: config/eagle3/eagle3_gemma4_12b.py unless noted.
    c.train.lr = 6.0e-4                          # ref: lr=6.0e-4
    c.train.warmup_ratio = 0.04                  # ref: warmup_ratio=0.04 (linear, then cosine)
    c.train.min_lr_ratio = 0.0                   # ref: eta_min=0.0 (deepspec/utils/optim.py)
    c.train.weight_decay = 0.0                   # ref: weight_decay=0.0
    c.train.adam_b1 = 0.9                        # ref: deepspec/utils/optim.py builds
    c.train.adam_b2 = 0.999                      #   torch.optim.AdamW without betas/eps,
    c.train.adam_eps = 1e-8                      #   i.e. torch's defaults
    c.train.max_grad_norm = 1.0                  # ref: max_grad_norm=1.0
    c.train.global_batch_size = 512              # ref: global_batch_size=512
    c.train.micro_batch_size = 8                 # ref: local_batch_size=1 per GPU on one 8-GPU node
    #                                              (README); ours is per host: set it to
    #                                              devices_per_host x sequences per device.
    c.train.num_epochs = 10                      # ref: num_train_epochs=10
    c.train.max_steps = 0                        # ref: max_train_steps=None
    c.train.compute_dtype = "bfloat16"           # ref: precision="bf16" (fp32 master weights:
    c.target.dtype = "bfloat16"                  #   BF16Optimizer in deepspec/utils/optim.py)
    c.train.seed = 0                             # ref: seed=0
    c.train.log_every = 10                       # ref: logging_steps=10
    c.train.checkpoint_every = 3000              # ref: checkpointing_steps=3000
    c.data.max_length = 4096                     # ref: max_length=4096 (data=dict)
    # Mesh: the reference trains plain data-parallel (sharding_strategy="no_shard"), which is
    # the default mesh (data=-1, fsdp=1, tensor=1); pass --config.mesh.fsdp=N to shard.
    c.lock()
    return c
