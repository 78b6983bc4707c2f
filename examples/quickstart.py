"""Ring attention in a few lines: shard a sequence over 4 ranks, run the ring, compare with dense.

Runs on the CPU with simulated ranks; with a GPU it runs our kernels, and with several GPUs one
process per GPU over a real ring (the same as ``python -m cuparing demo``). ``--help`` lists
options.
"""

import sys

from cuparing.demo import main

if __name__ == "__main__":
    sys.exit(main())
