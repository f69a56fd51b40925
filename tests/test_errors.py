"""first_line: the text every tool prints for an exception it reports in one line."""

from training.errors import first_line


def test_first_line_of_a_multiline_message_without_surrounding_blanks():
    assert first_line(RuntimeError("\n  size mismatch for x\n  more detail\n")) == "size mismatch for x"


def test_empty_message_gives_the_type_name():
    assert first_line(EOFError()) == "EOFError"
    assert first_line(ValueError("  \n ")) == "ValueError"
