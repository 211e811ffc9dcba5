"""The command lines: ``kvpilot`` and its ``simulate`` and ``bench`` commands."""
