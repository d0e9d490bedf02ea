"""Graceful stop: SIGINT/SIGTERM ask the training loop to stop at the next step boundary."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """A flag that SIGINT/SIGTERM set while :meth:`installed` is active; a second signal raises
    ``KeyboardInterrupt`` at once. Handlers can only be installed from the main thread; elsewhere
    the flag just stays unset."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(
            "%s received: saving a checkpoint after this step, then stopping", signal.Signals(signum).name
        )

    @contextmanager
    def installed(self) -> Iterator[GracefulStop]:
        """Install the handlers for the ``with`` block, then put the previous ones back."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
