"""Command line: ``python -m mhpo_kernels {check,demo} ...`` (also ``mhpo-kernels``)."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mhpo-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="every available backend against the reference: errors, time, memory",
                   add_help=False)
    sub.add_parser("demo", help="train a large-vocabulary policy with MHPO and GRPO-clip", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "check":
        from .tools.check import main as run
    else:
        from .tools.demo import main as run
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
