"""Run every benchmark, each in its own process, and print their tables.

python benchmarks/run_all.py            # full sizes (minutes)
python benchmarks/run_all.py --quick    # small sizes (about a minute)
python benchmarks/run_all.py --only read patches
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    benches = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="+", choices=benches, default=benches)
    args = ap.parse_args(argv)
    failed = []
    for name in args.only:
        print(f"\n=== {name} ===", flush=True)
        t = time.perf_counter()
        cmd = [sys.executable, str(HERE / f"bench_{name}.py")] + (["--quick"] if args.quick else [])
        if subprocess.call(cmd) != 0:
            failed.append(name)
        print(f"({name}: {time.perf_counter() - t:.0f} s)", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
