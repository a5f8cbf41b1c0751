"""What every dataset shares: the error it raises when it cannot be built or read (also from inside a DataLoader
worker), and the line that describes it in a run's log."""

from __future__ import annotations

from typing import Any

from sagan.utils.errors import UserError


class DatasetError(UserError, ValueError):
    """A dataset cannot be built or read; the message names the problem and the config key that fixes it."""


def reraise_worker_error(error: Exception) -> None:
    """Raise an error that a dataset raised inside a DataLoader worker as the dataset raised it; others unchanged.

    The DataLoader re-raises it in the main process as the same type, but with the worker's whole traceback as its
    message; the original message is the traceback's last line, after the type's name.
    """
    text = str(error)
    last = text.strip().splitlines()[-1] if "Original Traceback" in text else ""
    kind, _, message = last.partition(": ")
    if message and kind.rsplit(".", 1)[-1] == type(error).__name__:
        try:
            unwrapped = type(error)(message)
        except TypeError:  # an exception type that takes other arguments: keep the wrapped one
            raise error
        raise unwrapped from None
    raise error


def summary(dataset: Any, source: str) -> str:
    """What a run trains on, for its log: the source, the number of images and the classes."""
    classes = dataset.classes
    shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    return f"{source}, {len(dataset):,} images, " + (f"{len(classes)} classes ({shown})" if classes else "unlabeled")
