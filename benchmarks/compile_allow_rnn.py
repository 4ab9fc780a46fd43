"""Does tracing through the RNNs pay? The compiled `cpu` training step with torch._dynamo's `allow_rnn` against
the compiled step that breaks its graph at every nn.LSTM / nn.RNN (training's default) and the eager step.

    python benchmarks/compile_allow_rnn.py [--steps 8] [--repeats 2] [--out benchmarks/compile_allow_rnn.json]

Each measurement is a fresh process (`train_throughput.measure`, compiled from scratch), the repeats interleaved;
the table gives the median step time, the first two (compiling) steps and the steps it takes `allow_rnn` to repay
its longer compile against the default compiled step.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
CASES = [("bf16 + channels_last", False), ("bf16 + channels_last + compile", False),
         ("bf16 + channels_last + compile", True)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "compile_allow_rnn.json"))
    parser.add_argument("--child", nargs=3, metavar=("Q_Z", "MODE", "ALLOW_RNN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
        import torch
        import train_throughput
        q_z, mode, allow_rnn = args.child
        torch._dynamo.config.allow_rnn = allow_rnn == "1"  # this child process only
        print(json.dumps(train_throughput.measure("cpu", q_z, mode, args.steps)))
        return
    import train_throughput
    rows = []
    for _ in range(args.repeats):
        for q_z in ("full", "factorised"):
            for mode, allow_rnn in CASES:
                out = subprocess.run([sys.executable, __file__, "--child", q_z, mode, str(int(allow_rnn)),
                                      "--steps", str(args.steps)], capture_output=True, text=True, check=True)
                rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "allow_rnn": allow_rnn})
                r = rows[-1]
                print(f"{q_z:10} {mode:32} allow_rnn={allow_rnn!s:5} {r['step_s']:.3f} s/step, first two steps "
                      f"{r['warmup_s']:.1f} s", flush=True)
    summary = []
    for q_z in ("full", "factorised"):
        for mode, allow_rnn in CASES:
            runs = [r for r in rows if (r["q_z"], r["mode"], r["allow_rnn"]) == (q_z, mode, allow_rnn)]
            summary.append({"q_z": q_z, "mode": mode + (" + allow_rnn" if allow_rnn else ""),
                            "step_s": statistics.median(r["step_s"] for r in runs),
                            "repeats_step_s": [r["step_s"] for r in runs],
                            "warmup_s": statistics.median(r["warmup_s"] for r in runs)})
        default, traced = summary[-2], summary[-1]
        saved = default["step_s"] - traced["step_s"]
        traced["steps_to_pay_off_vs_compile"] = (traced["warmup_s"] - default["warmup_s"]) / saved \
            if saved > 0 else float("inf")
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": train_throughput.machine(),
                                          "steps": args.steps, "repeats": args.repeats, "summary": summary,
                                          "rows": rows}, indent=1))
    print(f"\n{'q(z)':11}{'mode':46}{'s/step':>8}{'repeats':>16}{'warm-up s':>11}{'pays after':>12}")
    for s in summary:
        pays = s.get("steps_to_pay_off_vs_compile")
        print(f"{s['q_z']:11}{s['mode']:46}{s['step_s']:8.3f}{'/'.join(f'{v:.3f}' for v in s['repeats_step_s']):>16}"
              f"{s['warmup_s']:11.1f}{'' if pays is None else f'{pays:.0f}':>12}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
