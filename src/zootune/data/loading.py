"""DataLoader helpers shared by the engine and the CLI: the default number of workers, and worker
errors reported as the one line they were raised with.

Default workers (:func:`default_num_workers`): images of ``image_size`` >= 96 get
``min(8, usable CPUs - 1)`` workers (none on one CPU), smaller ones none. Measured with
``python benchmarks/folder_speed.py pipeline`` on 2 shared CPU cores (numbers in
docs/dev-notes/data-and-minizoo.md): at 32 px 0 workers was fastest in every setting, alone and
with a training step (a 32-px item costs tens of microseconds; a worker's start-up and the copies
between processes cost more); at 224 px on this CPU the ResNet-50 step dwarfs decoding and the
worker count made no difference. Workers are for machines whose step is fast (a GPU): one process
decodes and crops a few hundred 224-px images per second, less than a GPU trains on. The threshold
lies between the two measured sizes. ``TrainConfig.num_workers`` itself stays 0 by default: the
built-in tensor targets draw augmentation from the global RNG, whose stream would change with workers.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from zootune.data.decode import usable_cpus
from zootune.errors import ZootuneError

SMALL_IMAGE_SIZE = 96  # below this, decoding in the main process is cheaper than workers
MAX_DEFAULT_WORKERS = 8


def default_num_workers(image_size: int, cpus: int | None = None) -> int:
    """DataLoader workers for an image folder read at ``image_size`` (rule in the module docstring)."""
    cpus = usable_cpus() if cpus is None else cpus
    if image_size < SMALL_IMAGE_SIZE:
        return 0
    return max(0, min(MAX_DEFAULT_WORKERS, cpus - 1))


def _original_message(text: str) -> str:
    """The message a worker raised, from the ``Caught X in DataLoader worker process N. Original
    Traceback ...`` text that PyTorch re-raises in the main process (its last line is
    ``module.X: message``)."""
    if not text.startswith("Caught ") or "DataLoader worker" not in text.split("\n", 1)[0]:
        return text
    last = text.rstrip().rsplit("\n", 1)[-1]
    head, sep, message = last.partition(": ")
    return message if sep and " " not in head else last


def one_line_worker_errors(loader: Iterable) -> Iterator:
    """Iterate ``loader``; a :class:`ZootuneError` raised in a worker process is raised again with
    its own message (PyTorch's re-raise carries the worker's whole traceback in the message, which
    the CLI would print as one very long line)."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except ZootuneError as err:
            message = _original_message(str(err))
            if message == str(err):
                raise
            raise type(err)(message) from None
        yield batch
