"""The steptune command line: one typer app, every command registered the same way, one error path."""

from __future__ import annotations

import errno
import inspect
import sys

import typer

from steptune import __version__
from steptune.cli import dashboard, db, dc, digits, refine, results, run, schedules, search, sor
from steptune.cli.errors import CliError, library_errors
from steptune.cli.progress import log_interval


def _version(value: bool) -> None:
    if value:
        print(f"steptune {__version__}")
        raise typer.Exit()


class _Commands(typer.core.TyperGroup):
    """The command group: a Ctrl-C (or SIGTERM) that no command caught ends as an Abort, which :func:`main` says in a
    line (typer 0.29 returns its exit status 130 without a word)."""

    def invoke(self, ctx):
        given = {*getattr(ctx, "_protected_args", ()), *ctx.args}  # the command and its arguments, not parsed yet
        if not {"--help", "-h"} & given:
            log_interval()  # a bad value is refused before a command writes anything (its help is still shown)
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise typer.Abort() from None


app = typer.Typer(help="Search and tune diffusion solver schedules.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, cls=_Commands)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Search and tune diffusion solver schedules."""


for module in (schedules, results, search, run, refine, dc, digits, dashboard, sor, db):
    module.register(app)


def _one_line_summaries(t: typer.Typer) -> None:
    """A command's line in its group's list is the first paragraph of its docstring reflowed: typer's rich help
    keeps the docstring's line breaks there, which wrapped the list mid-sentence."""
    for cmd in t.registered_commands:
        doc = cmd.help or (cmd.callback.__doc__ if cmd.callback else None)
        if cmd.short_help is None and doc:
            cmd.short_help = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    for group in t.registered_groups:
        _one_line_summaries(group.typer_instance)


_one_line_summaries(app)


def _flags_untyped() -> None:
    """A flag's row in the help shows no type: typer 0.29 writes ``<bool>`` beside every flag, ``--help`` included,
    where a flag takes no value."""
    typed = typer.core.TyperOption.display_type_rich

    def display_type_rich(self, ctx):
        return None if self.is_flag and self.metavar is None else typed(self, ctx)

    typer.core.TyperOption.display_type_rich = display_type_rich


_flags_untyped()


def _click_class(name: str) -> type[Exception]:
    """The click exception class of that name in the click typer runs on (its own copy in recent typers)."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)


ClickException = _click_class("ClickException")


OUT_OF_MEMORY = ("can't allocate memory", "out of memory", "Cannot allocate memory")  # torch's CPU and CUDA words


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: sys.argv); return the exit status."""
    try:
        code = app(args=argv, prog_name="steptune", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:  # click's form of a Ctrl-C that reached it; printed plainly, whatever state rich is in
        print("interrupted", file=sys.stderr)
        return 130
    except ClickException as e:  # usage errors: an unknown option or command, a missing or bad value
        e.message = e.message.replace("Value error, ", "", 1)  # typer's wording of a choice's refusal
        e.show()
        return e.exit_code
    except CliError as e:
        print(f"{e.prefix}: {e.message}", file=sys.stderr)
        return e.exit_code
    except library_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        said = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        if not isinstance(e, MemoryError) and not any(m in said for m in OUT_OF_MEMORY):
            raise
        print(f"error: out of memory ({said}); use fewer samples, a smaller --shape or batch, or a device with more "
              "memory", file=sys.stderr)
        return 1
    except OSError as e:  # a path that passed the checks but could not be written or read after all
        if e.filename is None:
            raise
        fix = "free space on its disk" if e.errno == errno.ENOSPC else "choose another path"
        print(f"error: {e.filename}: {e.strerror or e}; {fix}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
