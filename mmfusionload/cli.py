"""The ``mmfusionload`` command line."""
import argparse
import sys
from typing import List, Optional


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    report = run_demo(args.work_dir)
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='mmfusionload', description='Per-modality, layout-aware checkpoint loading.')
    sub = parser.add_subparsers(dest='command', required=True)
    demo = sub.add_parser('demo', help='load mismatched LiDAR and camera checkpoints into a '
                          'BEVFusion-shaped model and print the report')
    demo.add_argument('--work-dir', default=None, help='where to write the checkpoints')
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
