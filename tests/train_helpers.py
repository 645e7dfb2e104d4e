"""Tiny training runs on the fixture target (vocab 512, 6 layers) for trainer tests."""

from __future__ import annotations

import os

import numpy as np

from conftest import FIXTURES_ROOT
from deepspec_jax.data.token_store import write_token_store
from deepspec_jax.train.config import base_config

TINY_TARGET = os.path.join(FIXTURES_ROOT, "deepspec_v1", "target_qwen3_tiny")


def make_store(path: str, n: int = 40, seed: int = 0, max_length: int = 64) -> str:
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        length = int(rng.integers(20, max_length))
        ids = rng.integers(0, 500, length).astype(np.int32)
        mask = np.zeros(length, np.uint8)
        mask[length // 3:] = 1
        samples.append((ids, mask))
    write_token_store(path, samples, max_length=max_length, target="target_qwen3_tiny")
    return path


def tiny_config(arch: str, store: str, out: str, **train):
    c = base_config(arch)
    c.name = f"tiny_{arch}"
    c.output_dir = out
    c.target.path = TINY_TARGET
    c.target.dtype = "float32"
    c.draft.target_layer_ids = (0, 1, 2, 3, 4) if arch == "eagle3" else (0, 2, 4)
    c.draft.block_size = 4
    c.draft.num_anchors = 6
    c.draft.mask_token_id = 511
    c.draft.ttt_length = 3
    if arch == "dspark":
        c.draft.markov_rank = 8
        c.draft.markov_head_type = "gated"
        c.draft.enable_confidence_head = True
        c.draft.confidence_head_with_markov = True
    c.data.train = (store,)
    c.data.max_length = 64
    c.train.global_batch_size = 8
    c.train.micro_batch_size = 4
    c.train.compute_dtype = "float32"
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.async_checkpoint = False
    c.train.tensorboard = False
    c.train.export_hf = False
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


CONFIG_FILE = '''
import sys
sys.path.insert(0, {tests!r})
from train_helpers import tiny_config

def get_config():
    return tiny_config({arch!r}, {store!r}, {out!r})
'''


def write_config_file(path: str, arch: str, store: str, out: str) -> str:
    with open(path, "w") as f:
        f.write(CONFIG_FILE.format(tests=os.path.dirname(os.path.abspath(__file__)), arch=arch,
                                   store=store, out=out))
    return path
