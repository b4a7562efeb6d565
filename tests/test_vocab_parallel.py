"""The loss on a vocabulary split across 2 and 3 processes (gloo) equals the unsplit call.

Each process (tests/vocab_parallel_worker.py) checks, over a fuzz of the objective family's
options (clip, sequence-level ratios, token weights, IS, KL, entropy bonus, length norms,
temperature, ``inplace``, a zero-std group; the KL's bias correction and length norm, SAPO and
GSPO's length norm in cases of their own), the plain-shard and DTensor forms against the float64
reference on the full vocabulary; that the bytes sent do not grow with the vocabulary; the
errors; and a group of one process.
"""

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
import vocab_parallel_worker


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("world", [2, 3])
def test_split_vocabulary_matches_unsplit(world, tmp_path):
    mp.spawn(vocab_parallel_worker.run, args=(world, f"file://{tmp_path}/store"), nprocs=world)
