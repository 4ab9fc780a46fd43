"""The report's spot check (dsvae_lib.SPOT_CHECK) in bf16 and in fp32: its time and how far the two arithmetics
read the same weights apart, which sets the spot check's tolerance.

    python benchmarks/spot_check.py [--out benchmarks/spot_check.json]

For each weights file of record: the metrics of `evaluate` with sampling seed 0 on the first 270 test sequences,
in bf16 autocast (where the CPU has it natively) and in fp32, with the seconds each took, and the largest difference
between the two over the accuracies, in points.
"""
import argparse
import json
import time
from pathlib import Path

import dsvae_lib as dsae

ROOT = Path(__file__).resolve().parents[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "spot_check.json"))
    args = parser.parse_args()
    judge, _ = dsae.train_judge(dsae.judge_config("cpu"), progress=False)
    test = dsae.load_sprites("test")
    rows = {}
    print("| weights | arithmetic | seconds | largest bf16-fp32 gap, points |\n| --- | --- | --- | --- |")
    for name in ("cpu-full", "cpu-factorised", "cpu-mirror-full", "cpu-mirror-factorised"):
        model, _ = dsae.load_checkpoint(dsae.weights_path(*name.rsplit("-", 1)))
        read = {}
        for arith in ("bf16", "fp32") if dsae._bf16_on(model.device) else ("fp32",):
            t0 = time.perf_counter()
            read[arith] = dsae.spot_rows(model, judge, test, (arith,))[arith]
            read[arith + " seconds"] = time.perf_counter() - t0
        gaps = dsae.spot_gaps(read["bf16"], read["fp32"]) if "bf16" in read else {"": 0.0}
        worst = max(gaps, key=gaps.get)
        rows[name] = {**read, "largest gap points": gaps[worst], "largest gap metric": worst}
        for arith in ("bf16", "fp32"):
            if arith in read:
                print(f"| {name} | {arith} | {read[arith + ' seconds']:.1f} | {gaps[worst]:.2f} ({worst}) |")
    Path(args.out).write_text(json.dumps({"processor": dsae.processor_name(), "spot check": dsae.SPOT_CHECK,
                                          "weights": rows}, indent=1))


if __name__ == "__main__":
    main()
