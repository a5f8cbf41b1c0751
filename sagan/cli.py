"""What every entry point shares: `key=value` arguments with `--help`, and errors that tell the user's mistake from a
bug: a problem with the input, the files or the machine is one line naming it and the fix; anything else is a bug,
shown with its traceback and a request to report it."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigAttributeError, OmegaConfBaseException

from sagan.utils.errors import UserError

# Errors that mean "the input, the files or the machine are not what they should be", not "the program is wrong",
# shown as one line (HYDRA_FULL_ERROR=1 shows the traceback): what sagan raises on purpose (UserError: bad values, a
# diverged run, a locked run directory, a full disk, ...), a command line or config that Hydra or OmegaConf cannot
# parse or merge, and what the operating system refused (OSError: a missing file, permissions, no network), which
# names its path. Anything else, a library's ValueError included, is a bug.
USER_ERRORS = (UserError, HydraException, OmegaConfBaseException, OSError)
OUT_OF_MEMORY = (
    "use a smaller batch: train.batch_size (or the same batch in train.grad_accum micro-batches), metrics.batch_size "
    "for FID, batch= for sagan-sample"
)
BUG = (
    "the error above is a bug in sagan or in a library it calls, not a problem with your input: please report it "
    "with this traceback, the command you ran and the output of `pip list`"
)


def one_line(error: BaseException) -> str:
    """The gist of an error message on one line, without Hydra's and OmegaConf's detail lines."""
    if isinstance(error.__cause__, ConfigAttributeError) and "Could not override" in str(error):
        key = str(error).split("'")[1]
        return f"unknown config key '{key}' (misspelt?): `sagan-train --cfg job` prints every key"
    message = str(error).split("Config search path")[0]
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    keep = [line for line in lines if not line.startswith(("full_key", "object_type", "reference_type", "To append"))]
    if isinstance(error, HydraException) and error.__cause__ is not None and str(error.__cause__).strip():
        keep.append("(" + str(error.__cause__).strip().splitlines()[0] + ")")  # e.g. why an override did not merge
    return " ".join(keep) or type(error).__name__


def parse_args(schema: type, argv: Sequence[str], doc: str = "") -> Any:
    """key=value arguments checked against a dataclass: unknown keys and wrong types fail with one line. `--help`
    (or `-h`) prints `doc` and every key with its default and meaning, and exits."""
    if any(a in ("--help", "-h") for a in argv):
        print(usage(schema, doc))
        sys.exit(0)
    return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(list(argv)))


def usage(schema: type, doc: str) -> str:
    """The command's docstring, then its keys (nested ones as group.key) with defaults and one-line meanings."""
    rows = []

    def collect(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            nested = f.default_factory if f.default is dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory) else None
            if nested is not None:
                collect(nested, f"{prefix}{f.name}.")
                continue
            default = "(required)" if f.default is MISSING else f.default
            if f.default is dataclasses.MISSING:
                default = f.default_factory()
            name = f"{prefix}{f.name}".replace("class_", "class")
            shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
            rows.append((name, shown, f.metadata.get("help", "")))

    collect(schema, "")
    width = max(len(name) for name, _, _ in rows)
    keys = "\n".join(f"  {name:<{width}}  {default:<12} {meaning}" for name, default, meaning in rows)
    return f"{doc.strip()}\n\nkeys (key=value, default, meaning):\n{keys}"


def check_composes(overrides: Sequence[str], config_name: str = "config") -> None:
    """Compose the config once with the user's overrides, so a misspelt key fails in one line before Hydra starts."""
    with initialize_config_module(config_module="sagan.conf", version_base="1.3"):
        compose(config_name=config_name, overrides=list(overrides))


def run_cli(fn: Callable[[], object], *, check_overrides: Sequence[str] | None = None, log_to_stderr: bool = False) -> None:
    """Run an entry point. An error about the input, the files or the machine prints `error: <one line>` to stderr;
    any other (a bug) prints its traceback and a request to report it; both exit with status 1.

    `log_to_stderr`: show the log (progress of long computations) on stderr, for commands Hydra does not configure.
    """
    logger = logging.getLogger("sagan")
    handler = logging.StreamHandler(sys.stderr) if log_to_stderr else None
    if handler is not None:
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        # With Hydra flags (--cfg, -m for sweeps, --help, ...) Hydra parses and checks the command line itself.
        if check_overrides is not None and not any(a.startswith("-") for a in check_overrides):
            check_composes([a for a in check_overrides if not a.split("=")[0].lstrip("+~").startswith("hydra")])
        fn()
    except Exception as e:
        message = user_message(e)
        if message is None:
            traceback.print_exc()
            print(f"error: {BUG}", file=sys.stderr)
        elif os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        else:
            print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    finally:
        if handler is not None:  # a command run again in this process (tests, notebooks) adds no second one
            logger.removeHandler(handler)


def user_message(error: Exception) -> str | None:
    """The one line shown for an error about the input, the files or the machine; None for a bug."""
    if isinstance(error, torch.OutOfMemoryError):  # a RuntimeError, but the batch is the user's to change
        return f"out of GPU memory ({str(error).splitlines()[0]}): {OUT_OF_MEMORY}"
    if isinstance(error, USER_ERRORS):
        return one_line(error)
    return None
