import sys


def run() -> None:
    try:
        from steptune.cli import main

        code = main()
    except KeyboardInterrupt:  # before a command installs its own handler (e.g. while torch is imported)
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    run()
