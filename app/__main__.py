import signal
import sys


def run() -> None:
    # Ctrl-C while the command's modules load is held until they have loaded: an interrupt inside an
    # import can leave a library half-initialised, failing with an unrelated error instead.
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        from steptune.cli import main
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        if held:
            raise KeyboardInterrupt
        code = main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    run()
