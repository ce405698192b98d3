"""`cvt-fast classify`, slowed down so that a test can interrupt it midway, alone or under torchrun:

    python tests/support/slow_classify.py --batch-delay 0.3 --pid-dir DIR classify ...   (each batch waits)
    python tests/support/slow_classify.py --decode-delay 0.2 classify ...                (each image's decoding waits)

--pid-dir writes pid-<RANK> there, so that the test can kill one rank. Everything after the options is the command
line of `cvt-fast`, run by its own main (exit status included).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from cvt_fast import cli
from cvt_fast.tools.dataset_inference import loader, model_loop


def delayed(function, seconds: float):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return function(*args, **kwargs)

    return slow


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-delay", type=float, default=0.0)
    parser.add_argument("--decode-delay", type=float, default=0.0)
    parser.add_argument("--pid-dir", type=Path)
    options, command = parser.parse_known_args()
    if options.pid_dir is not None:
        (options.pid_dir / f"pid-{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
    # Patched where the run looks them up: classify_shard calls model_loop.classify_batch, the loader's dataset
    # calls loader.read_pixel_values.
    model_loop.classify_batch = delayed(model_loop.classify_batch, options.batch_delay)
    loader.read_pixel_values = delayed(loader.read_pixel_values, options.decode_delay)
    return cli.main(command)


if __name__ == "__main__":
    sys.exit(main())
