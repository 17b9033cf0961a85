"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class KeyspaceError(Exception):
    """A known, user-facing failure: a message plus a hint on how to fix it."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = f"Error: {self.message}"
        if self.hint:
            text += f" Hint: {self.hint}"
        return " ".join(text.split())
