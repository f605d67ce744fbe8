"""The `actsparse` console script. Importing the package registers its transformers quantizer
(torch and transformers load), so Ctrl-C is handled here, before that import, as one line."""
import sys


def main() -> int:
    try:
        from actsparse.cli import main as run
    except KeyboardInterrupt:
        print("actsparse: interrupted", file=sys.stderr)
        return 130
    return run()


if __name__ == "__main__":
    sys.exit(main())
