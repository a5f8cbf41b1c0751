"""The base of errors that mean "the input or the run is not what it should be", not "the program is wrong": every
command shows them as one line (sagan.cli), whichever layer raises them."""


class UserError(Exception):
    """An error the user can act on; its message names the problem and the fix."""
