"""Shared by the table tool's tests: start a stand-in script instead of the train tool."""
import subprocess
import sys


def fake_launcher(script):
    """subprocess.Popen for `run_suite` that runs `script` with the train command's arguments."""
    def start(command, **kwargs):
        assert command[1:3] == ["-m", "adaptive_l2.cli.train"]
        return subprocess.Popen([sys.executable, script, *command[3:]], **kwargs)
    return start
