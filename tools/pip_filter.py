#!/usr/bin/env python3
"""`make install`'s filter of pip's output: fast-reid's expected complaint explained, nothing hidden.

fast-reid 1.4.0 pins torch==1.13.1 and other versions that have no Python 3.11 build, so it is
installed with --no-deps and the project lists its real needs (setup.py). pip then ends each step
with a conflict report ("ERROR: pip's dependency resolver ... fastreid 1.4.0 requires torch==1.13.1,
but you have torch 2.x"), printed as an error although the install succeeded. This filter passes
pip's output through, replaces the lines about fastreid's own pins by one line saying why they are
expected, and prints every other conflict as pip wrote it, exiting 1 (a real problem).
Usage: pip install ... 2>&1 | python tools/pip_filter.py   (under `set -o pipefail`)
"""
import re
import sys
from typing import Iterable, List, TextIO, Tuple

HEADER = "ERROR: pip's dependency resolver does not currently take into account"
CONFLICT = re.compile(r"^(\S+) (\S+) requires .*(, but you have .*|, which is not installed\.)$")
EXPECTED = ("fastreid",)  # whose pins are ignored on purpose


def split_report(lines: Iterable[str]) -> Tuple[List[str], List[str], List[str]]:
    """pip's lines -> (lines to print, expected conflict lines, unexpected conflict lines)."""
    shown, expected, unexpected = [], [], []
    in_report = False
    for line in lines:
        text = line.rstrip("\n")
        if text.startswith(HEADER):
            in_report = True
            continue
        match = CONFLICT.match(text) if in_report else None
        if match is None:
            in_report = in_report and text.strip() == ""
            shown.append(text)
        elif match.group(1).lower() in EXPECTED:
            expected.append(text)
        else:
            unexpected.append(text)
    return shown, expected, unexpected


def main(stream: TextIO = sys.stdin) -> int:
    """Filter `stream`; the exit status is 1 when a conflict other than fast-reid's pins remains."""
    shown, expected, unexpected = split_report(stream)
    for text in shown:
        print(text)
    if expected:
        print(f"[install] {len(expected)} pins of fastreid 1.4.0 not met, as expected: it is "
              "installed with --no-deps on torch 2 (setup.py lists what it really needs)")
    if unexpected:
        print(HEADER + " ... (pip's conflict report, not about fast-reid's pins):")
        for text in unexpected:
            print(text)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
