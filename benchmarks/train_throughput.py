"""Training throughput of DSAE: sequences/s and peak memory of one training step, per profile and mode.

    python benchmarks/train_throughput.py [--profiles smoke cpu paper] [--steps 3] [--out benchmarks/results.json]

Every (profile, mode) runs in a fresh process so its peak memory is its own. Modes: fp32 eager, bf16 autocast,
bf16 + channels_last, and bf16 + channels_last + torch.compile, each with its speed-up over fp32 eager (bf16 only
where the device supports it: CUDA, or a CPU with AVX-512 bf16 / AMX). The compile row also reports the time of
its first two (compiling) steps, and how many steps it takes for compilation to pay for itself. The data path (gather a batch from the resident uint8 tensor, convert to float) is timed
on its own and reported as a fraction of the step time.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {"fp32 eager": dict(bf16=False, channels_last=False, compile=False),
         "bf16": dict(bf16=True, channels_last=False, compile=False),
         "bf16 + channels_last": dict(bf16=True, channels_last=True, compile=False),
         "bf16 + channels_last + compile": dict(bf16=True, channels_last=True, compile=True)}


def machine():
    """The processor this ran on: its model name, logical cores, torch version and whether bf16 runs natively
    (the speed-ups of the bf16 modes depend on all of them; without native bf16 they run in fp32)."""
    import torch
    import dsvae_lib as dsae
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": name, "logical cores": os.cpu_count(), "torch": torch.__version__,
            "cpu bf16 native": dsae.bf16_supported("cpu"),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def measure(profile, mode, steps):
    """Run in a child process: time `steps` training steps after warm-up, and the data path alone."""
    import torch
    import dsvae_lib as dsae
    config = dsae.make_config(profile, device="auto", **MODES[mode])
    device = dsae.pick_device(config.device)
    dsae.seed_everything(0)
    data = dsae.load_sprites("train")
    batches = dsae.Batches(data, config.batch_size, device, seed=0, limit=config.batch_size * (steps + 2))
    model = dsae.build_model(config, device)
    step_model = torch.compile(model) if config.compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas)
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
    t0 = time.perf_counter()
    for x in xs:
        terms = dsae.train_step(step_model, optimizer, x, config)
    sync()
    step_s = (time.perf_counter() - t0) / len(xs)
    t0 = time.perf_counter()
    for _ in range(3):
        for _ in batches:
            pass
    sync()
    data_s = (time.perf_counter() - t0) / (3 * len(batches))
    params = sum(p.numel() for p in model.parameters())
    return {"profile": profile, "mode": mode, "device": torch.cuda.get_device_name() if device.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)", "parameters": params, "batch": config.batch_size,
            "step_s": step_s, "seq_per_s": config.batch_size / step_s, "data_s": data_s, "warmup_s": warmup_s,
            "bf16_native": dsae.bf16_supported(device.type),
            "data_fraction": data_s / step_s, "loss": float(terms["loss"]),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mib": base_rss,
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="*", default=["smoke", "cpu", "paper"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after two warm-up steps")
    parser.add_argument("--modes", nargs="*", choices=list(MODES), help="default: all")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "train_throughput.json"))
    parser.add_argument("--child", nargs=2, metavar=("PROFILE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.steps)))
        return
    parser_modes = args.modes or list(MODES)
    rows = []
    for profile in args.profiles:
        for mode in parser_modes:
            out = subprocess.run([sys.executable, __file__, "--child", profile, mode, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['profile']:6} {r['mode']:31} {r['parameters'] / 1e6:8.2f}M {r['step_s']:9.3f} s/step "
                  f"{r['seq_per_s']:8.1f} seq/s  data {100 * r['data_fraction']:5.2f} %  "
                  f"peak RSS {r['peak_rss_mib']:7.0f} MiB" + (f"  peak CUDA {r['peak_cuda_mib']:.0f} MiB"
                                                            if r['peak_cuda_mib'] else ""), flush=True)
    eager = {r["profile"]: r for r in rows if r["mode"] == "fp32 eager"}
    for r in rows:
        base = eager.get(r["profile"])
        r["speedup_vs_fp32_eager"] = r["seq_per_s"] / base["seq_per_s"] if base else float("nan")
        saved = base["step_s"] - r["step_s"] if base else 0.0
        extra = r["warmup_s"] - 2 * r["step_s"]  # what the first two steps cost beyond two ordinary steps
        r["steps_to_pay_off"] = (max(extra, 0.0) / saved) if saved > 0 else float("inf")
    host = machine()
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": host, "steps": args.steps,
                                          "rows": rows}, indent=1))
    print(f"\n{host['cpu']}, {host['logical cores']} logical cores, torch {host['torch']}, "
          f"bf16 {'native' if host['cpu bf16 native'] else 'not native: the bf16 modes ran in fp32'}"
          + (f"; {host['cuda']}" if host["cuda"] else ""))
    print(f"{'profile':8}{'mode':33}{'params':>10}{'s/step':>10}{'seq/s':>9}{'data %':>8}{'speed-up':>10}"
          f"{'warm-up s':>11}{'peak MiB':>10}")
    for r in rows:
        peak = r["peak_cuda_mib"] or r["peak_rss_mib"]
        print(f"{r['profile']:8}{r['mode']:33}{r['parameters'] / 1e6:9.2f}M{r['step_s']:10.3f}{r['seq_per_s']:9.1f}"
              f"{100 * r['data_fraction']:8.2f}{r['speedup_vs_fp32_eager']:10.2f}{r['warmup_s']:11.1f}{peak:10.0f}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
