import signal
import sys


def run() -> None:
    # Ctrl-C while the command's modules load is held (blocked) until they have loaded: an interrupt inside
    # an import can leave a library half-initialised, failing with an unrelated error instead.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        try:
            from steptune.cli import main
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a held Ctrl-C is raised here
        code = main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    run()
