"""What a command prints when it fails: one line for the user's mistake (bad input, files, the machine), a traceback
and a request to report it for a bug, a library's ValueError included."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sagan.cli import BUG, OUT_OF_MEMORY, run_cli
from sagan.utils.errors import UserError


def raise_(error: Exception) -> None:
    raise error


def fail_with(body, capsys) -> str:
    """Run a command body that fails; returns its stderr after checking the exit status 1."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(body)
    assert exit_.value.code == 1
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "error, line",
    [
        (UserError("train.steps must be >= 0, got -1"), "error: train.steps must be >= 0, got -1\n"),
        (FileNotFoundError(2, "No such file or directory", "missing.pt"), "error: [Errno 2] No such file or directory: 'missing.pt'\n"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail"),
         f"error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB): {OUT_OF_MEMORY}\n"),
    ],
)  # fmt: skip
def test_the_users_mistakes_are_one_line(error, line, capsys):
    assert fail_with(lambda: raise_(error), capsys) == line


def test_a_librarys_value_error_is_a_bug_shown_with_its_traceback(capsys):
    # The one-GPU crash: torch's ValueError about a device sagan built, which was shown as if the user had typed it.
    err = fail_with(lambda: torch.cuda.set_device(torch.device("cuda")), capsys)
    assert err.startswith("Traceback (most recent call last):")
    assert "ValueError: Expected a torch.device with a specified index" in err
    assert err.endswith(f"error: {BUG}\n")


def test_a_bug_in_sagan_is_shown_with_its_traceback(capsys):
    err = fail_with(lambda: raise_(KeyError("G_ema")), capsys)
    assert "Traceback (most recent call last):" in err and "KeyError: 'G_ema'" in err and err.endswith(f"error: {BUG}\n")


def test_hydra_full_error_shows_the_traceback_of_a_users_mistake(monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(UserError, match="bad"):
        run_cli(lambda: raise_(UserError("bad")))


COMMANDS = ("train", "sample", "attention", "fid", "ablate", "import", "export", "prepare")


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMANDS)
def test_every_console_script_is_installed_and_explains_itself(name):
    """The process boundary, once per command: the installed console script starts and prints its help (every other
    command-line test calls the same main() in-process, tests/conftest.py run_command)."""
    script = Path(sys.executable).parent / f"sagan-{name}"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"sagan-{name}" in result.stdout or "Powered by Hydra" in result.stdout, result.stdout[:500]


def test_a_command_run_again_in_one_process_leaves_no_log_handler_behind():
    """A command's log handler writes to the stderr of its run: left behind, a later run in the same process (tests,
    a notebook) would log to a closed stream."""
    logger = logging.getLogger("sagan")
    before = list(logger.handlers)
    run_cli(lambda: logging.getLogger("sagan").info("progress"), log_to_stderr=True)
    assert logger.handlers == before
