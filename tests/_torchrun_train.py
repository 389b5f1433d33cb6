"""``relevance-finetune train`` for tests/test_train_stops.py under torchrun: each forward of rank 0
is counted in the file ``$TRAIN_COUNT_FILE`` and slowed down, so the test can stop it mid-epoch."""
import os
import sys
import time
from pathlib import Path

import torch

from relevance_finetune import cli
from relevance_finetune.train import loop

torch.set_num_threads(1)
count_file = Path(os.environ["TRAIN_COUNT_FILE"])
forward = loop._forward
calls = 0


def counted_forward(*args, **kwargs):
    global calls
    result = forward(*args, **kwargs)
    if os.environ["RANK"] == "0":
        calls += 1
        count_file.write_text(str(calls))
        time.sleep(0.3)
    return result


loop._forward = counted_forward
sys.exit(cli.main(sys.argv[1:]))
