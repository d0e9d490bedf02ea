"""``lindiff render`` in a process that kills itself (SIGKILL) while writing image number K.

    python tests/render_worker.py K render --model ... --out DIR

Used by test_render.py to check that a batch killed mid-write resumes to the same result as
an uninterrupted run. The kill comes after part of the PNG reached its temporary file.
"""

import os
import signal
import sys

import torch
from PIL import Image

from lindiff.cli import main


def kill_while_writing(number: int) -> None:
    """Make the ``number``-th ``Image.save`` write a few bytes, then kill the process."""
    original = Image.Image.save
    calls = 0

    def save(image, fp, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == number:
            fp.write(b"\x89PNG\r\n\x1a\npartial")
            fp.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(image, fp, *args, **kwargs)

    Image.Image.save = save


if __name__ == "__main__":
    torch.set_num_threads(1)
    kill_while_writing(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
