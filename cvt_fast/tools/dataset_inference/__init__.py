"""Dataset-scale classification: `cvt-fast classify --model CKPT --input FOLDER_OR_LIST --output results.jsonl`, in one
process or in one process per GPU under torchrun. run.classify_dataset takes a run through its steps, in order:

- images.list_images: the input's image files, sorted by path: the order of the output, and what the ranks split.
- run_record.prepare_run_folder (rank 0): OUTPUT.parts/ holds run.json, what produced the results, and one part file
  per rank. A rerun with other parameters is refused rather than mixing results; part files are repaired (a torn or
  damaged line dropped, its image redone).
- results.finished_results + images.shard: every rank reads what earlier attempts finished, and takes a contiguous,
  balanced, disjoint range of what is left.
- model_loop.classify_shard: loader workers decode and preprocess (loader.py); the model runs on whole batches; each
  batch's lines are appended to the rank's part file in one write. An unreadable image becomes a line with its
  reason, never a crash and never a gap.
- results.merge (rank 0): OUTPUT written beside its final name and renamed into place, every listed image exactly once,
  sorted by path; then the part files go. summary.py says what it holds and where the time went; progress.py shows
  the way there.

A problem the user can fix is a cvt_fast.errors.Refused, one line each. torch.distributed carries only
coordination here (ranks.py, gloo: agreement on refusals, barriers, timings). Each rank's model runs on its own, so
inference needs no nccl.
"""

from .images import UnreadableImage, folder_as_written, list_images, read_pixel_values, shard
from .progress import Progress
from .ranks import Coordinator, Ranks
from .results import repair, result_line
from .run import Options, classify_dataset

__all__ = [
    "Coordinator",
    "Options",
    "Progress",
    "Ranks",
    "UnreadableImage",
    "classify_dataset",
    "folder_as_written",
    "list_images",
    "read_pixel_values",
    "repair",
    "result_line",
    "shard",
]
