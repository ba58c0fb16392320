"""Data-parallel training over NCCL on two GPUs equals one process with the whole batch.

Runs where at least two CUDA devices are visible (``CURVKIT_CUDA_TESTS_ON_CPU=1``: two CPU
processes over gloo instead, to check the test itself). Two spawned processes, one per GPU,
train K-FAC (with and without DistributedDataParallel), EKFAC, SINGD, RS-KFAC and SKFAC for
a few float64 steps on a CNN; their parameters equal the one-process run on the whole batch
(rtol 1e-7: NCCL sums in another order; 1e-5 for RS-KFAC, whose rank-4 truncation of a
randomized SVD amplifies rounding to ~2e-8 here) and are bit-identical across the ranks.
"""

from __future__ import annotations

import tempfile

import _cuda_dist_worker as w
import pytest
import torch
import torch.multiprocessing as mp
from _cuda_common import CUDA, DEVICE, ON_CPU

pytestmark = [
    *CUDA,
    pytest.mark.skipif(
        not ON_CPU and torch.cuda.device_count() < 2,
        reason=f"needs two CUDA devices ({torch.cuda.device_count()} visible)",
    ),
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


RTOL = {"rs-kfac": 1e-5}


@pytest.fixture(scope="module")
def runs():
    backend = "gloo" if ON_CPU else "nccl"
    reference_device = DEVICE if ON_CPU else torch.device("cuda", 0)
    reference = w.run(0, 1, reference_device)
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(w.worker, args=(2, out, backend), nprocs=2, join=True)
        ranks = [torch.load(f"{out}/rank{r}.pt", weights_only=False) for r in range(2)]
    return reference, ranks


@pytest.mark.parametrize("label", [case[0] for case in w.CASES])
def test_two_devices_equal_one_process_with_the_whole_batch(runs, label):
    reference, ranks = runs
    rtol = RTOL.get(label, 1e-7)
    for rank, result in enumerate(ranks):
        expected_device = "cpu" if ON_CPU else f"cuda:{rank}"
        assert result[label]["devices"] == [expected_device]
        for i, (ours, ref) in enumerate(zip(result[label]["params"], reference[label]["params"], strict=True)):
            torch.testing.assert_close(ours, ref, rtol=rtol, atol=rtol * 1e-2, msg=f"{label}, rank {rank}, param {i}")
    for a, b in zip(ranks[0][label]["params"], ranks[1][label]["params"], strict=True):
        assert torch.equal(a, b), f"{label}: ranks differ"
