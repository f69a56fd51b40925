"""One-line error text: what every tool prints for an exception it turns into a user message, and
the exceptions that carry their own exit status."""


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (surrounding blank lines and spaces dropped), or its type
    name when the message is empty."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class TrainingStopped(Exception):
    """A run stopped on request (a signal) at a step boundary after writing its checkpoint.

    Not an error: the command-line tools print the message as it is (when ``announce``; under DDP
    rank 0 alone says it) and exit with ``exit_code`` = 128 + the signal number, the status a shell
    gives a process killed by that signal (SIGTERM 143, SIGINT 130, SIGUSR1 138).
    """

    def __init__(self, message: str, signum: int, step: int, announce: bool = True):
        super().__init__(message)
        self.signum, self.step, self.announce = signum, step, announce
        self.exit_code = 128 + signum
