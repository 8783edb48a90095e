import os
import signal
import sys


def _as_ctrl_c(signum, frame):
    raise KeyboardInterrupt


def _streams() -> None:
    """A closed stdout or stderr (``>&-``) is read as an empty sink; a character the stream's encoding cannot write
    (PYTHONIOENCODING=ascii, LANG=C) is written as its escape, not as a crash."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, "w"))
        elif hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # already detached or closed: left as it is
                pass


def run() -> None:
    _streams()
    # Ctrl-C (or SIGTERM) while the command's modules load is held (blocked) until they have loaded: an interrupt
    # inside an import can leave a library half-initialised, failing with an unrelated error instead.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        try:
            from steptune.cli import main
        finally:
            # SIGTERM (what `kill` and batch schedulers send) stops a command as Ctrl-C does: what it holds is let
            # go and it says what was kept; a SIGINT the shell ignores for a background job of a script is heard
            # too. A run puts its own handling (finish the evaluations in flight) in place while it runs.
            signal.signal(signal.SIGTERM, _as_ctrl_c)
            if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # a held one is raised here
        code = main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    run()
