"""make install's pip filter: fast-reid's expected pin complaints become one line, anything
else pip reports is printed and fails the step."""
import io
import os
import sys

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
import pip_filter  # noqa: E402

REPORT = """Successfully installed adaptive_l2-0.1.0
ERROR: pip's dependency resolver does not currently take into account all the packages that are installed. This behaviour is the source of the following dependency conflicts.
fastreid 1.4.0 requires torch==1.13.1, but you have torch 2.13.0 which is incompatible.
fastreid 1.4.0 requires yacs==0.1.8, which is not installed.
"""


def test_fastreid_pins_become_one_explained_line(capsys):
    assert pip_filter.main(io.StringIO(REPORT)) == 0
    printed = capsys.readouterr().out
    assert "Successfully installed adaptive_l2-0.1.0" in printed
    assert "ERROR" not in printed and "2 pins of fastreid 1.4.0 not met, as expected" in printed


def test_another_conflict_is_printed_and_fails(capsys):
    other = REPORT + "scipy 1.14.0 requires numpy<2.3, but you have numpy 2.3.1 which is incompatible.\n"
    assert pip_filter.main(io.StringIO(other)) == 1
    printed = capsys.readouterr().out
    assert "scipy 1.14.0 requires numpy<2.3" in printed and "fastreid 1.4.0 requires" not in printed


def test_output_without_a_report_passes_through(capsys):
    assert pip_filter.main(io.StringIO("Looking in indexes\nERROR: No matching distribution\n")) == 0
    assert capsys.readouterr().out == "Looking in indexes\nERROR: No matching distribution\n"
