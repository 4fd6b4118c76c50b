"""How long ``load_config`` takes on a shipped YAML, in a fresh interpreter each time, and what it imports.

    python benchmarks/load_config_time.py [CONFIG] [--repeat N]

Each repeat starts a new Python process (so nothing is cached in ``sys.modules``) that times the
import of ``semidiff.config`` plus one ``load_config`` call, and says whether torch or the methods
were imported on the way. Prints one line per repeat and the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import json, sys, time
t0 = time.perf_counter()
from semidiff.config import load_config
load_config(sys.argv[1])
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "torch": "torch" in sys.modules,
                  "methods": "semidiff.methods" in sys.modules}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(REPO / "configs/acdc/mean_teacher_reduced.yaml"))
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    times = []
    for i in range(args.repeat):
        out = subprocess.run([sys.executable, "-c", _PROBE, args.config], capture_output=True, text=True, check=False)
        if out.returncode:
            raise SystemExit(f"load_config({args.config}) failed:\n{out.stderr}")
        probe = json.loads(out.stdout.strip().splitlines()[-1])
        times.append(probe["seconds"])
        print(f"run {i + 1}: {probe['seconds']:.3f} s (torch imported: {probe['torch']}, "
              f"methods imported: {probe['methods']})")
    print(f"load_config({Path(args.config).name}): median {statistics.median(times):.3f} s over {len(times)} fresh "
          f"interpreters, python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
