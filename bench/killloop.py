"""The long kill -9 loop: 50 cycles over 2,000 jobs (defaults), against the emulator.

    python bench/killloop.py [--jobs 2000] [--cycles 50] [--seed 1]

Prints a JSON report and exits 1 if any job was lost, any output line duplicated or torn, or
any job was submitted twice without runner having reported that submit as ambiguous.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.killloop import kill_loop


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = kill_loop(Path(tmp), args.jobs, args.cycles, seed=args.seed, max_sleep=2.5)
    print(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
