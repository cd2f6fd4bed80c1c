"""The evaluation harness as a script (issue 4): the same as `rltune evaluate`.

    python experiments/benchmark.py --scenarios wine-mlp breast-cancer-mlp --targets 8x 16x \
        --budget 256 --seeds 5 --out experiments/results/benchmark

Results resume: rerunning the same command skips the cells already in results.jsonl.
"""

import sys

from rltune.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
