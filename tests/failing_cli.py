"""``delrec`` under torchrun with every rank failing at once after K training steps: a deterministic
kill for the resume test (not a test module; tests/test_distributed.py launches it).

    python -m torch.distributed.run --nproc-per-node 2 tests/failing_cli.py K finetune --data ...

Each training step sums its gradients across the ranks exactly once (``sum_across_ranks``), so failing
that call's (K+1)-th time stops every rank inside step K+1, after the checkpoint of step K was written.
"""

from __future__ import annotations

import sys

from delrec import distributed
from delrec.cli import main

steps_done = int(sys.argv[1])
calls = 0
real_sum = distributed.sum_across_ranks


def failing_sum(tensors):
    global calls
    calls += 1
    real_sum(tensors)  # first the collective: rank 0 reaches it only after writing step K's checkpoint
    if calls > steps_done:
        raise RuntimeError(f"killed in step {calls}")


distributed.sum_across_ranks = failing_sum
sys.exit(main(sys.argv[2:]))
