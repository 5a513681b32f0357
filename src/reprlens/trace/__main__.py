"""``python -m reprlens.trace info DIR``: print a trace store's summary and completeness report."""

from __future__ import annotations

import argparse
import sys

from reprlens.trace.reader import TraceReader


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reprlens.trace", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="summary of a trace store")
    info.add_argument("dirpath")
    info.add_argument("--check", action="store_true", help="also compute the weight completeness report")
    args = parser.parse_args(argv)
    reader = TraceReader(args.dirpath)
    print(reader.summary())
    if args.check:
        print(reader.completeness())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
