"""The steptune command line (``steptune --help``). Commands live in one module per topic; shared options,
consoles, errors and output-path checks in their own modules."""

from steptune.cli.main import app, main

__all__ = ["app", "main"]
