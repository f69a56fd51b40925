"""One-line error text: what every tool prints for an exception it turns into a user message."""


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (surrounding blank lines and spaces dropped), or its type
    name when the message is empty."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
