"""Errors meant for a person: one line that names the problem and the fix, never a traceback."""


class UserError(Exception):
    """Bad input (file, option, config). ``exit_code`` 2 for usage, 1 for the rest."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
