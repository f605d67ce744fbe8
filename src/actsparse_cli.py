"""The `actsparse` console script. Importing the package registers its transformers quantizer
(torch and transformers load), so Ctrl-C is handled here, before that import, as one line."""
import signal
import sys


def main() -> int:
    # A KeyboardInterrupt raised inside library code that runs `exec` on a string (dataclasses,
    # namedtuple) marks the interpreter to die by SIGINT at exit even once caught, so during the
    # imports Ctrl-C is only recorded and answered when they are done (a second or two).
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        from actsparse.cli import main as run
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        print("actsparse: interrupted", file=sys.stderr)
        return 130
    try:
        return run()
    finally:
        # The outcome is reported: a Ctrl-C during the interpreter's teardown would only turn the
        # exit status into a death by signal.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # A Ctrl-C that `run` caught may still have left the interpreter's mark to die by SIGINT
        # (it passed through library code run by `exec` on a string, e.g. while a command imported
        # torch); the interpreter clears that mark whenever it starts to run a string.
        exec("pass")


if __name__ == "__main__":
    sys.exit(main())
