"""The table tool (being split into suite, runner, cost and report)."""
