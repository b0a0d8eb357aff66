"""``python -m verl_r3.diagnose ARGS``: the same as ``verl-r3 diagnose ARGS``."""

import argparse
import sys

from verl_r3.diagnose import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m verl_r3.diagnose", description=__doc__)
add_arguments(parser)
sys.exit(main(parser.parse_args()))
