"""Decode speed, side by side in one run: transformers generate(), the engine's plain decode, and
self-speculative decode, on the same MT-Bench prompts (greedy). Same as `specgate bench`.

    python eval/bench_decode.py --prompts 8 --max-new-tokens 128 --out results/bench.json
"""

import sys

from specgate.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
