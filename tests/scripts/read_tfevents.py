"""Reads TensorBoard event files with TensorBoard's own reader and prints every scalar as JSON:
{"files": N, "scalars": {tag: [[step, value], ...]}}. Run by tests/test_tensorboard.cpp.

    python tests/scripts/read_tfevents.py RUN_DIR/runs
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing import event_file_loader
import glob
import os


def main(argv):
    d = argv[1]
    files = sorted(glob.glob(os.path.join(d, "events.out.tfevents.*")))
    # The raw loader checks every record's CRCs (it raises on a bad one).
    for f in files:
        for _ in event_file_loader.RawEventFileLoader(f, detect_file_replacement=False).Load():
            pass
    acc = EventAccumulator(d, size_guidance={"scalars": 0})
    acc.Reload()
    scalars = {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    print(json.dumps({"files": len(files), "scalars": scalars}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
