"""The one-line descriptions of exceptions that error messages quote."""

from __future__ import annotations

from pipeline.errors import first_line, last_line


def test_first_line_is_stripped_and_has_a_default():
    assert first_line(ValueError("  bad value \n  details\n")) == "bad value"
    assert first_line(ValueError()) == ""
    assert first_line(ValueError(), "ValueError") == "ValueError"


def test_last_line_is_what_itk_says_went_wrong():
    assert last_line(RuntimeError("Exception thrown in ITK\nfile.cxx:12\n  Could not open file  \n")) == (
        "Could not open file"
    )
    assert last_line(RuntimeError()) == "unknown error"
