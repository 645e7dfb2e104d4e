"""The reference runs fit their TPU slices (issue 12): the three Qwen3-4B configs at their
reference sizes (4096 tokens, global batch 512, 512 anchors x block 7 / TTT 7) compile
in cached mode for v5e-8 and in online mode for v5p-8, and the largest config
(DSpark on Qwen3-14B) compiles once, each within the chip's HBM.

Every case is one compile of the real train step for the slice (libtpu, compile only;
``python -m deepspec_jax.plan``), with the target's real depth and width: a compile
that runs out of HBM fails in seconds, one that fits takes longer (see the report of
``python -m deepspec_jax.plan`` for compile seconds).
"""

from __future__ import annotations

import json
import os

import pytest

from deepspec_jax.plan.__main__ import main as plan_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    ("dspark/dspark_qwen3_4b", "v5e-8", "cached"),
    ("dflash/dflash_qwen3_4b", "v5e-8", "cached"),
    ("eagle3/eagle3_qwen3_4b", "v5e-8", "cached"),
    ("dspark/dspark_qwen3_4b", "v5p-8", "online"),
    ("dflash/dflash_qwen3_4b", "v5p-8", "online"),
    ("eagle3/eagle3_qwen3_4b", "v5p-8", "online"),
    ("dspark/dspark_qwen3_14b", "v5p-8", "cached"),   # the largest draft and target
]


@pytest.mark.parametrize("config,topology,mode", CASES, ids=[f"{c.split('/')[1]}-{t}-{m}"
                                                            for c, t, m in CASES])
def test_reference_run_fits(config, topology, mode, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = plan_main([f"--config={os.path.join(REPO, 'configs', config + '.py')}",
                    f"--topology={topology}", f"--mode={mode}", "--nosearch", f"--json={out}"])
    (row,) = json.loads(out.read_text())["rows"]
    gib = lambda x: "-" if x is None else f"{x / 2 ** 30:.2f} GiB"
    assert rc == 0 and row["fits"], (
        f"{config} {mode} on {topology} does not fit: peak {gib(row['peak_bytes'])} "
        f"(arguments {gib(row['argument_bytes'])}, temporaries {gib(row['temp_bytes'])}) of "
        f"{gib(row['capacity_bytes'])}; {row['error']}\n{capsys.readouterr().err[-1500:]}")
    assert 0 < row["peak_bytes"] <= row["capacity_bytes"] and row["flops"] > 0
