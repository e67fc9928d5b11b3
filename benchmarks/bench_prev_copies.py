"""What the previous good copy costs a save (issue #21): atomic writes of a label-chunk-sized file with and without
``keep_previous`` (a hard link and a rename more per save), interleaved so both see the same machine load.

    python benchmarks/bench_prev_copies.py [--n 400] [--size 65536]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    from napari_wsimil.io.atomic import write_bytes

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--size", type=int, default=65536)
    args = ap.parse_args()
    data = os.urandom(args.size)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        plain, prev = Path(d) / "plain", Path(d) / "prev"
        times = {False: 0.0, True: 0.0}
        for i in range(args.n):
            for keep, path in ((False, plain), (True, prev)) if i % 2 else ((True, prev), (False, plain)):
                t = time.perf_counter()
                write_bytes(path, data, keep_previous=keep)
                times[keep] += time.perf_counter() - t
    per = {k: v / args.n * 1000 for k, v in times.items()}
    print(f"{args.n} saves of {args.size // 1024} KB (fsync'ed): plain {per[False]:.2f} ms, with previous copy "
          f"{per[True]:.2f} ms per save; ratio {per[True] / per[False]:.2f}")


if __name__ == "__main__":
    main()
