"""Cold build of the Sprites data (both splits) from the sheets: wall time and peak memory.

    python benchmarks/data_build.py [--repeats 2] [--out benchmarks/data_build.json]

Each build runs in a fresh process into an empty temporary cache, so nothing is reused and the peak resident
memory (the child's own ru_maxrss) is the build's alone. Goal: under 60 s and under 2 GiB on a 2-core machine.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import resource, sys, time, dsvae_lib as dsae
t = time.perf_counter()
train, test = dsae.load_sprites("train", cache=sys.argv[1]), dsae.load_sprites("test", cache=sys.argv[1])
print(time.perf_counter() - t, len(train), len(test), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "data_build.json"))
    args = parser.parse_args()
    rows = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, cache], capture_output=True, text=True, check=True,
                                 cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            wall = time.perf_counter() - t0
            build_s, n_train, n_test, peak_kib = out.stdout.split()
            rows.append({"run": i + 1, "build_s": float(build_s), "process_s": wall, "sequences": [int(n_train),
                         int(n_test)], "peak_rss_mib": int(peak_kib) / 1024, "cpus": os.cpu_count()})
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    print(f"{'run':>4}{'build s':>10}{'process s':>11}{'train':>7}{'test':>6}{'peak RSS MiB':>14}")
    for r in rows:
        print(f"{r['run']:>4}{r['build_s']:>10.1f}{r['process_s']:>11.1f}{r['sequences'][0]:>7}{r['sequences'][1]:>6}"
              f"{r['peak_rss_mib']:>14.0f}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
