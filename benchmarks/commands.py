"""The README's commands timed on a fresh clone: `make report` (first and second run), `make test`.

    python benchmarks/commands.py [--commands report report test] [--isa native|avx2] [--out FILE]

The committed HEAD is cloned into an empty temporary folder, `make venv` sets it up (timed, not counted in the
commands), and each command then runs there in turn, as a new user would run them: the first `make report` builds the
data and reuses the stored evaluations (spot-checking each), the second finds the data built. `--isa avx2` runs every
command with PyTorch's kernels and oneDNN limited to AVX2 (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2): no AMX,
no AVX-512, so no native bf16 and every evaluation in fp32, as on a CPU without native bf16 (at this CPU's clock).
The sheets are read from this checkout's ../shared/sprites-lpc (or $DSVAE_SHEETS).
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
sys.path.insert(0, str(ROOT))
import dsvae_lib as dsae  # noqa: E402

ISA = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def timed(command, cwd, env, log):
    """Seconds `command` took in `cwd`; its output goes to `log`; a failure stops the benchmark."""
    t0 = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        done = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", nargs="+", default=["report", "report", "test"], choices=("report", "test"))
    parser.add_argument("--isa", default="native", choices=sorted(ISA))
    parser.add_argument("--out", default=None, help="default: benchmarks/commands_<isa>.json")
    args = parser.parse_args()
    sheets = os.environ.get("DSVAE_SHEETS") or str(ROOT.parent / "shared" / "sprites-lpc")
    env = {**os.environ, "DSVAE_SHEETS": sheets, **ISA[args.isa]}
    env.pop("DSVAE_PROFILE", None)
    env.pop("DSVAE_CACHE", None)
    commit = dsae.git_commit()
    with tempfile.TemporaryDirectory() as tmp:
        clone, log = Path(tmp) / "clone", Path(tmp) / "log.txt"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        venv = timed(["make", "venv"], clone, env, log)
        probe = "import dsvae_lib as d, torch; print(d.arithmetic(torch.device('cpu'), True))"
        arithmetic = subprocess.run([str(clone / ".venv/bin/python"), "-c", probe], cwd=clone, env=env, check=True,
                                    capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows, seen = [], {}
        for name in args.commands:
            seen[name] = seen.get(name, 0) + 1
            seconds = timed(["make", name], clone, env, log)
            rows.append({"command": f"make {name}", "run": seen[name], "seconds": round(seconds, 1)})
            print(f"make {name} (run {seen[name]}): {seconds:.0f} s", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "processor": dsae.processor_name("cpu"),
              "isa": args.isa, "arithmetic": arithmetic, "cpus": os.cpu_count(), "make venv seconds": round(venv, 1),
              "rows": rows}
    out = Path(args.out or ROOT / "benchmarks" / f"commands_{args.isa}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['processor']}, {args.isa} kernels, {arithmetic}; make venv {venv:.0f} s")
    print(f"{'command':<14}{'run':>4}{'time':>10}")
    for r in rows:
        print(f"{r['command']:<14}{r['run']:>4}{int(r['seconds'] // 60):>6} min {r['seconds'] % 60:2.0f} s")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
