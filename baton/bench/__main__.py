"""``python -m baton.bench``: the ``baton bench`` command without the rest of the CLI."""

import argparse
import sys

from baton.bench.cli import add_arguments, run


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m baton.bench",
        description="Load generator for any OpenAI-compatible endpoint; results use vLLM bench's field names.",
    )
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
