"""All PAC-Net benchmarks: Friedman #1 regression, damped-oscillator ODE, MNIST -> digits images.

    python benchmarks/pac_net/run_all.py --seeds 3 [--out results.md]

Prints one Markdown table per setting (mean ± std over seeds); ``--out`` also writes them to a file
(atomically). Each script can be run on its own with more options (see their docstrings).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import friedman  # noqa: E402
import image  # noqa: E402
import ode  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the tables to this Markdown file")
    args = parser.parse_args()
    started = time.perf_counter()
    seeds = ["--seeds", str(args.seeds)]
    tables = [friedman.main(seeds), ode.main(seeds), image.main(seeds)]
    text = "\n".join(tables) + f"\n_{time.perf_counter() - started:.0f} s wall clock, `--seeds {args.seeds}`_\n"
    print(text.splitlines()[-1])
    if args.out:
        directory = os.path.dirname(os.path.abspath(args.out))
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
