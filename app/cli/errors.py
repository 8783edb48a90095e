"""The one error path of the command line: every user error ends in one line on stderr and a non-zero status."""

from __future__ import annotations


class CliError(Exception):
    """Bad input or a refused operation: ``error: <message>`` on stderr, exit status 2."""

    exit_code = 2
    prefix = "error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Interrupted(CliError):
    """Ctrl-C: one line saying what was kept, exit status 130."""

    exit_code = 130
    prefix = "interrupted"


def library_errors() -> tuple[type[Exception], ...]:
    """The exceptions the packages below raise for bad input; each is shown as a :class:`CliError`."""
    from steptune.dc_studies import DcStudyError
    from steptune.evaluators.neural_reference import ReferenceNotConverged
    from steptune.exports import ExportError
    from steptune.jobs import JobError
    from steptune.space import ScheduleError
    from steptune.storage import StorageError

    return ScheduleError, ReferenceNotConverged, StorageError, JobError, DcStudyError, ExportError
