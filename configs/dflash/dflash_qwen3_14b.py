"""DFlash draft (parallel block drafter, CE only) for Qwen/Qwen3-14B:
the reference hyper-parameters.

Reference: deepseek-ai/DeepSpec ``config/dflash/dflash_qwen3_14b.py``; each value is quoted next to
its field.

Run (override the placeholder paths)::

    python -m deepspec_jax.train --config=configs/dflash/dflash_qwen3_14b.py \
        --config.target.path=/models/Qwen3-14B \
        --config.data.train="('data/qwen3_14b/tokens',)"
"""

import importlib.util
import pathlib

from deepspec_jax.train.config import base_config

# configs/ is not a package: load the shared target facts (configs/_targets.py) by path.
_spec = importlib.util.spec_from_file_location(
    "_deepspec_config_targets", pathlib.Path(__file__).resolve().parents[1] / "_targets.py")
_targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_targets)

REF = "config/dflash/dflash_qwen3_14b.py"  # in deepseek-ai/DeepSpec


def get_config():
    c = base_config("dflash")
    c.name = "dflash_qwen3_14b"
    # configs/_targets.py sets target.path (placeholder HF dir of Qwen/Qwen3-14B),
    # draft.target_layer_ids, draft.mask_token_id and data.train (placeholder token store).
    _targets.apply_target(c, "qwen3_14b")

    # Draft: DSpark minus Markov and confidence heads.  ref: config/dflash/dflash_qwen3_14b.py
    c.draft.num_hidden_layers = 5                # ref: num_draft_layers=5
    c.draft.block_size = 7                       # ref: block_size=7
    c.draft.num_anchors = 512                    # ref: num_anchors=512
    c.draft.markov_rank = 0                      # ref: markov_rank=0 ("Disable markov head")
    c.draft.markov_head_type = ""
    c.draft.enable_confidence_head = False       # ref: confidence_head_alpha=0.0
    c.draft.confidence_head_with_markov = False
    # The reference file also sets enable_d2_feature=True, d2_prefix_weight_base=0.9;
    # the schema has no such fields (and the reference's draft config builder,
    # deepspec/modeling/dspark/qwen3/config.py, does not read them).

    # Loss: CE only.  ref: config/dflash/dflash_qwen3_14b.py
    c.loss.ce_alpha = 1.0                        # ref: ce_loss_alpha=1.0
    c.loss.l1_alpha = 0.0                        # ref: l1_loss_alpha=0.0
    c.loss.confidence_alpha = 0.0                # ref: confidence_head_alpha=0.0
    c.loss.loss_decay_gamma = 4.0                # ref: loss_decay_gamma=4.0

    # Optimisation.  ref: config/dflash/dflash_qwen3_14b.py unless noted.
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
    c.train.seed = 42                            # ref: seed=42
    c.train.log_every = 10                       # ref: logging_steps=10
    c.train.checkpoint_every = 3000              # ref: checkpointing_steps=3000
    c.data.max_length = 4096                     # ref: max_length=4096 (data=dict)
    # Mesh: the reference trains plain data-parallel (sharding_strategy="no_shard"), which is
    # the default mesh (data=-1, fsdp=1, tensor=1); pass --config.mesh.fsdp=N to shard.
    c.lock()
    return c
