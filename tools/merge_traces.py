"""Merge the per-rank overlap traces of one run into a single Chrome/Perfetto file.

    CUPARING_TRACE=/tmp/ring.json python -m cuparing.launch --nproc-per-node 4 my_script.py
    python tools/merge_traces.py /tmp/ring.rank*.json -o /tmp/ring.json

Open the result in https://ui.perfetto.dev or chrome://tracing: one process per rank, one track
per stream (compute, comm). Also prints each rank's hidden-transfer fraction: the share of its
transfer time that overlapped compute.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuparing.comm.trace import (  # noqa: E402
    hidden_transfer_fraction,
    merge_traces,
    read_chrome_trace,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="+", help="per-rank trace files")
    parser.add_argument("-o", "--out", required=True, help="merged trace file to write")
    args = parser.parse_args(argv)
    for path in args.traces:
        hidden = hidden_transfer_fraction(read_chrome_trace(path))
        print(f"{path}: hidden transfer {hidden:.2f}")
    print(f"wrote {merge_traces(args.traces, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
