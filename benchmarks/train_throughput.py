"""Training throughput of DSAE: sequences/s and peak memory of one training step, per profile and mode.

    python benchmarks/train_throughput.py [--profiles smoke cpu paper] [--q-z factorised full] [--steps 3]
                                          [--repeats 1] [--out benchmarks/results.json]

Every (profile, mode) runs in a fresh process so its peak memory is its own. With --repeats R, each profile's modes
run R times, interleaved (mode 1, 2, ..., then 1, 2, ... again), and each reports the median step time with its
spread (min-max), so a slow spell of a shared machine falls on every mode alike rather than on one; the share of CPU
time the hypervisor gave to other machines during the timed steps (steal, /proc/stat) is reported beside it. Modes:
fp32 eager (PyTorch's defaults, multi-tensor Adam), bf16 autocast, bf16 + channels_last, bf16 + channels_last +
torch.compile (training's default on a CPU, for runs long enough), and that with Adam's update fused into one kernel
(`fused_adam`, off by default: it measured no faster), each with its speed-up
over fp32 eager (bf16 only where the device supports it: CUDA, or a CPU with AVX-512 bf16 / AMX). The compile row
also reports the time of its first two (compiling) steps, compiled from scratch (torch's compile caches are off),
and how many steps it takes for compilation to pay for itself against the same mode uncompiled (the choice
`dsvae_lib.compile_pays` makes). With --q-z, each profile is measured with each q(z) variant (the full q's RNNs
break the compiled graph); by default, with the profile's own. The data path (gather a batch from the resident uint8
tensor, convert to float) is timed on its own and reported as a fraction of the step time.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {"fp32 eager": dict(bf16=False, channels_last=False, compile=False, fused_adam=False),
         "bf16": dict(bf16=True, channels_last=False, compile=False, fused_adam=False),
         "bf16 + channels_last": dict(bf16=True, channels_last=True, compile=False, fused_adam=False),
         "bf16 + channels_last + compile": dict(bf16=True, channels_last=True, compile=True, fused_adam=False),
         "bf16 + channels_last + compile + fused Adam": dict(bf16=True, channels_last=True, compile=True,
                                                             fused_adam=True)}  # each mode adds one thing


def machine():
    """The processor this ran on: its model name, logical cores, torch version and whether bf16 runs natively
    (the speed-ups of the bf16 modes depend on all of them; without native bf16 they run in fp32)."""
    import torch
    import dsvae_lib as dsae
    return {"cpu": dsae.processor_name("cpu"), "logical cores": os.cpu_count(), "torch": torch.__version__,
            "cpu bf16 native": dsae.bf16_supported("cpu"),
            "cuda": dsae.processor_name("cuda") if torch.cuda.is_available() else None}


def cpu_ticks():
    """The machine's CPU time counters (/proc/stat: user, nice, system, idle, iowait, irq, softirq, steal, ...);
    empty where /proc/stat is missing."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return []


def median_row(runs):
    """One row from the repeats of a (profile, mode): the run of median step time, with every repeat's step time."""
    runs = sorted(runs, key=lambda r: r["step_s"])
    return {**runs[(len(runs) - 1) // 2], "repeats_step_s": [r["step_s"] for r in runs]}


def measure(profile, q_z, mode, steps):
    """Run in a child process: time `steps` training steps after warm-up, and the data path alone."""
    import torch
    import dsvae_lib as dsae
    config = dsae.make_config(profile, device="auto", q_z=q_z, **MODES[mode])
    device = dsae.pick_device(config.device)
    dsae.seed_everything(0)
    data = dsae.load_sprites("train")
    batches = dsae.Batches(data, config.batch_size, device, seed=0, limit=config.batch_size * (steps + 2))
    model = dsae.build_model(config, device)
    step_model = torch.compile(model) if config.compile else model
    optimizer = dsae.adam(model, config)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    it = iter(batches)
    t0 = time.perf_counter()
    dsae.train_step(step_model, optimizer, next(it)[1], config)  # warm-up (and compilation)
    dsae.train_step(step_model, optimizer, next(it)[1], config)
    sync()
    warmup_s = time.perf_counter() - t0
    xs = [x for _, x in it]
    ticks = cpu_ticks()
    t0 = time.perf_counter()
    for x in xs:
        terms = dsae.train_step(step_model, optimizer, x, config)
    sync()
    step_s = (time.perf_counter() - t0) / len(xs)
    ticks = [b - a for a, b in zip(ticks, cpu_ticks())]
    t0 = time.perf_counter()
    for _ in range(3):
        for _ in batches:
            pass
    sync()
    data_s = (time.perf_counter() - t0) / (3 * len(batches))
    params = sum(p.numel() for p in model.parameters())
    return {"profile": profile, "q_z": q_z, "mode": mode,
            "device": torch.cuda.get_device_name() if device.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)", "parameters": params, "batch": config.batch_size,
            "step_s": step_s, "seq_per_s": config.batch_size / step_s, "data_s": data_s, "warmup_s": warmup_s,
            "bf16_native": dsae.bf16_supported(device.type),
            "data_fraction": data_s / step_s,
            "cpu_steal_pct": 100 * ticks[7] / max(sum(ticks), 1) if len(ticks) > 7 else float("nan"), "loss": float(terms["loss"]),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mib": base_rss,
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="*", default=["smoke", "cpu", "paper"])
    parser.add_argument("--q-z", nargs="*", choices=["factorised", "full"],
                        help="q(z) variants to measure each profile with (default: the profile's own)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after two warm-up steps")
    parser.add_argument("--modes", nargs="*", choices=list(MODES), help="default: all")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of every mode; the median is kept")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "train_throughput.json"))
    parser.add_argument("--child", nargs=3, metavar=("PROFILE", "Q_Z", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # compiled modes compile from scratch: torch's on-disk caches would hide the first run's cost
        os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
        print(json.dumps(measure(*args.child, args.steps)))
        return
    import dsvae_lib as dsae
    parser_modes = args.modes or list(MODES)
    rows = []
    for profile, q_z in [(p, q) for p in args.profiles for q in (args.q_z or [dsae.make_config(p).q_z])]:
        runs = {mode: [] for mode in parser_modes}
        for _ in range(args.repeats):
            for mode in parser_modes:
                out = subprocess.run([sys.executable, __file__, "--child", profile, q_z, mode,
                                      "--steps", str(args.steps)], capture_output=True, text=True, check=True)
                runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = runs[mode][-1]
                print(f"{r['profile']:6} {r['q_z']:10} {r['mode']:44} {r['parameters'] / 1e6:8.2f}M "
                      f"{r['step_s']:9.3f} s/step {r['seq_per_s']:8.1f} seq/s  data {100 * r['data_fraction']:5.2f} %  "
                      f"peak RSS {r['peak_rss_mib']:7.0f} MiB  steal {r['cpu_steal_pct']:4.1f} %"
                      + (f"  peak CUDA {r['peak_cuda_mib']:.0f} MiB" if r['peak_cuda_mib'] else ""), flush=True)
        rows += [median_row(runs[mode]) for mode in parser_modes]
    by_mode = {(r["profile"], r["q_z"], r["mode"]): r for r in rows}
    for r in rows:
        base = by_mode.get((r["profile"], r["q_z"], "fp32 eager"))
        r["speedup_vs_fp32_eager"] = r["seq_per_s"] / base["seq_per_s"] if base else float("nan")
        # compiling pays against the same mode uncompiled: what the first two steps cost beyond two ordinary steps
        # of that mode, over what each later step saves (uncompiled modes never pay anything off)
        uncompiled = by_mode.get((r["profile"], r["q_z"], r["mode"].removesuffix(" + compile")))
        saved = uncompiled["step_s"] - r["step_s"] if r["mode"].endswith(" + compile") and uncompiled else 0.0
        extra = r["warmup_s"] - 2 * uncompiled["step_s"] if saved > 0 else 0.0
        r["steps_to_pay_off"] = max(extra, 0.0) / saved if saved > 0 else float("inf")
    host = machine()
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": host, "steps": args.steps,
                                          "repeats": args.repeats, "rows": rows}, indent=1))
    print(f"\n{host['cpu']}, {host['logical cores']} logical cores, torch {host['torch']}, "
          f"bf16 {'native' if host['cpu bf16 native'] else 'not native: the bf16 modes ran in fp32'}"
          + (f"; {host['cuda']}" if host["cuda"] else ""))
    print(f"{'profile':8}{'q(z)':11}{'mode':46}{'params':>10}{'s/step':>10}{'min-max':>14}{'seq/s':>9}{'data %':>8}"
          f"{'speed-up':>10}{'warm-up s':>11}{'pays after':>11}{'peak MiB':>10}{'steal %':>9}")
    for r in rows:
        peak = r["peak_cuda_mib"] or r["peak_rss_mib"]
        spread = f"{min(r['repeats_step_s']):.3f}-{max(r['repeats_step_s']):.3f}"
        pays = f"{r['steps_to_pay_off']:.0f}" if r["mode"].endswith("compile") else ""
        print(f"{r['profile']:8}{r['q_z']:11}{r['mode']:46}{r['parameters'] / 1e6:9.2f}M{r['step_s']:10.3f}"
              f"{spread:>14}{r['seq_per_s']:9.1f}{100 * r['data_fraction']:8.2f}{r['speedup_vs_fp32_eager']:10.2f}"
              f"{r['warmup_s']:11.1f}{pays:>11}{peak:10.0f}{r['cpu_steal_pct']:9.1f}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
