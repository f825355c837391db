"""The checks that need a CUDA GPU (issue 29), in one script that finishes in under 10 minutes on one GPU:

    python benchmarks/gpu_check.py --data DIR [--cpu-reference FILE]   # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --data DIR              # the CPU figures for the comparison
    python benchmarks/gpu_check.py --dry-run                            # its CPU-safe parts, smoke settings

Most wanted first (`plan`): `cnnlab doctor`; `fast` and `quick` on the data (test accuracy, images/s after the
first epoch, the training seconds and the wall clock); `fast` in fp16 and in fp32; training under
torch.cuda.set_sync_debug_mode("error") (hooks.NoHostSync: no step waits for the host); evaluate and the ONNX
export against the training's own test accuracy; `photos` at 128 px under a memory cap
(torch.cuda.set_per_process_memory_fraction) below twice its images, which makes it stream them; Ctrl-C in a
run and --resume, against the same run uninterrupted and two uninterrupted runs against each other; `fast`
with --compile; `fast`'s step profiled in each precision (kernels, casts and the largest of them). Each check
runs as its own command with a time limit (--check-seconds), and one that fails is recorded with its error
while the others go on (a GPU session is short); those that would start after --max-seconds are recorded as
skipped. The result file is written after every check, so a run cut short keeps what it measured.
benchmarks/gpu_run.sh runs it on a GPU machine, on the data benchmarks/gpu_pack.py packs.

Writes benchmarks/results/gpu_check-<device>.json, e.g. {"fast": {"test_accuracy", "cpu_test_accuracy",
"train_images", "images_per_s", "train_s", "wall_s"}, ...}: the CPU figures come from --cpu-reference (this
script's JSON from a `--device cpu` run on the same data), else they are null. With --dry-run every training
is cnnlab's own smoke setting (--dry-run: one epoch of 512 images) and nothing is written to results/.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import CNNLAB, DATA, HERE, ROOT, files, machine

LIMIT_S = 150.0  # one check's command at most (--check-seconds; the whole script: under 10 minutes on a GPU)
WORK = HERE / "work" / "gpu_check"  # (--work)


def cnnlab(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([*CNNLAB, *args], cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S)
    if proc.returncode:
        raise RuntimeError(f"cnnlab {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc, time.perf_counter() - t0


def trained(out: Path, wall: float) -> dict:
    """A finished run's figures: test accuracy, training images, images/s after the first epoch (which carries
    the one-time costs: compilation, cuDNN's algorithm search), training seconds, wall clock."""
    history = json.loads((out / "history.json").read_text())
    images = json.loads((out / "config.json").read_text())["data"]["train_images"]
    later = history[1:] or history
    return {"test_accuracy": json.loads((out / "metrics.json").read_text())["test_accuracy"],
            "train_images": images, "epochs": len(history),
            "images_per_s": round(images * len(later) / sum(h["seconds"] for h in later), 1),
            "train_s": round(sum(h["seconds"] for h in history), 2), "wall_s": round(wall, 1)}


def train(name: str, args: argparse.Namespace, *flags: str) -> dict:
    out = WORK / name
    shutil.rmtree(out, ignore_errors=True)
    _, wall = cnnlab("train", "--data", str(args.data), "--device", args.device, "--no-report", "--out", str(out),
                     *(["--dry-run"] if args.dry_run else []), *flags)
    return trained(out, wall)


def doctor(args: argparse.Namespace) -> dict:
    proc, _ = cnnlab("doctor", "--json", *(["--seconds", "0.1"] if args.dry_run else []))
    return json.loads(proc.stdout)


def interrupted(args: argparse.Namespace) -> dict:
    """`quick` for 4 epochs (dry run: 3 of batch 8), Ctrl-C once its first checkpoint is written, then --resume;
    against the same run uninterrupted: the weights' largest difference, beside that between two uninterrupted
    runs (both 0 on a CPU; on a GPU cuDNN's chosen algorithms and atomic adds differ from run to run, so the
    second figure is the floor the first is read against), and the test accuracies. (2 epochs on the H200
    ended before the Ctrl-C arrived: 4 leave it mid-run.)"""
    from safetensors.torch import load_file

    small = ["--subset", "512", "--batch-size", "8", "--epochs", "3", "--threads", "1"]  # (steps to interrupt)
    flags = ["--data", str(args.data), "--device", args.device, "--preset", "quick", "--no-report", "--seed", "1",
             *(small if args.dry_run else ["--epochs", "4"])]
    whole, again, cut = WORK / "whole", WORK / "again", WORK / "cut"
    for out in (whole, again, cut):
        shutil.rmtree(out, ignore_errors=True)
    for out in (whole, again):
        cnnlab("train", *flags, "--out", str(out))
    job = subprocess.Popen([*CNNLAB, "train", *flags, "--out", str(cut)], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + LIMIT_S
    while not (cut / "checkpoint.safetensors").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)
    code = job.wait(timeout=LIMIT_S)
    epochs_before = len(json.loads((cut / "history.json").read_text())) if code else None
    cnnlab("train", "--resume", str(cut))
    weights = {out: load_file(out / "model.safetensors") for out in (whole, again, cut)}

    def largest_difference(a: dict, b: dict) -> float:
        return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

    accuracy = [json.loads((out / "metrics.json").read_text())["test_accuracy"] for out in (whole, again, cut)]
    return {"interrupted_exit": code, "epochs_before_ctrl_c": epochs_before,
            "max_weight_difference": largest_difference(weights[whole], weights[cut]),
            "max_weight_difference_uninterrupted": largest_difference(weights[whole], weights[again]),
            "test_accuracy": accuracy}


def agree(args: argparse.Namespace) -> dict:
    """`cnnlab evaluate` of the `quick` run and of its ONNX export, against the test accuracy training wrote."""
    run = WORK / "quick"
    said = json.loads((run / "metrics.json").read_text())["test_accuracy"]
    evaluated, _ = cnnlab("evaluate", str(run), "--device", args.device, "--out", str(WORK / "evaluated"))
    cnnlab("export", str(run))
    exported, _ = cnnlab("evaluate", str(run / "model.onnx"), "--data", str(args.data))
    pattern = r"^Test accuracy: ([\d.]+)$"  # (evaluate.format_metrics: the tutorial's printout)
    return {"training": said, "evaluate": float(re.search(pattern, evaluated.stdout, re.M).group(1)),
            "onnx": float(re.search(pattern, exported.stdout, re.M).group(1))}


CAPPED = """import sys, torch
from cnnlab import cli
if torch.cuda.is_available():
    torch.cuda.set_per_process_memory_fraction(float(sys.argv[1]))
code = cli.main(sys.argv[2:])
print("peak_gib", torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0)
sys.exit(code)
"""


def photos_streamed(args: argparse.Namespace) -> dict:
    """`photos` at 128 px with the process capped at 1.8 times its training images' bytes (the images alone
    would take over half of it, so they stream: the log says so), 2 epochs (dry run: cnnlab's smoke settings,
    --stream on a CPU). Its figures, the cap and the peak memory PyTorch allocated."""
    out = WORK / "photos-streamed"
    shutil.rmtree(out, ignore_errors=True)
    images = sum(1 for f in (args.data / "train" if (args.data / "train").is_dir() else args.data).rglob("*")
                 if f.is_file())
    size = 3 * 128 * 128 * images
    fraction = 0.0
    if args.device != "cpu":
        import torch

        fraction = min(1.0, 1.8 * size / torch.cuda.get_device_properties(0).total_memory)
    flags = ["train", "--data", str(args.data), "--device", args.device, "--preset", "photos", "--image-size",
             "128", "--no-report", "--out", str(out), *(["--dry-run"] if args.dry_run else ["--epochs", "2"]),
             *(["--stream"] if args.device == "cpu" else [])]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CAPPED, str(fraction), *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=2 * LIMIT_S)
    if proc.returncode:
        raise RuntimeError(f"photos under a cap: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    said = proc.stdout + proc.stderr
    return {**trained(out, time.perf_counter() - t0), "images_gib": round(size / 2**30, 3),
            "cap_fraction": round(fraction, 5), "streamed": "streamed from the host" in said or args.device == "cpu",
            "peak_gib": float(re.search(r"^peak_gib ([\d.e-]+)$", proc.stdout, re.M).group(1))}


SYNCED = """import sys, dataclasses, torch
from cnnlab import training
from cnnlab.config import DataConfig
from cnnlab.presets import get
from cnnlab.training.hooks import NoHostSync
preset, augment, epochs, device, data, subset, out = sys.argv[1:]
cfg = dataclasses.replace(get(preset), epochs=int(epochs), device=device, augment=augment or get(preset).augment)
hook = NoHostSync() if torch.cuda.is_available() and device != "cpu" else NoHostSync(set_mode=lambda mode: None)
training.train(cfg, DataConfig(path=data, subset=int(subset) or None), out=out, with_report=False, hooks=[hook])
"""


def sync_debug(args: argparse.Namespace) -> dict:
    """`fast`, and `quick` with every augmentation and both mixers, each 2 epochs under hooks.NoHostSync: every
    step under torch.cuda.set_sync_debug_mode("error"), where an operation that waits for the host raises (the
    loop's periodic reads and the epoch ends excepted). Dry run or CPU: 512 images, one epoch, mode not set."""
    small = args.dry_run or args.device == "cpu"
    results = {}
    for preset, augment in (("fast", ""), ("quick", "flip-crop+color-jitter+erasing+mixup+cutmix")):
        out = WORK / f"sync-{preset}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", SYNCED, preset, augment, "1" if small else "2", args.device,
                               str(args.data), "512" if small else "0", str(out)], cwd=ROOT, capture_output=True,
                              text=True, timeout=2 * LIMIT_S)
        if proc.returncode:  # a step that syncs: the traceback's last line names the operation
            raise RuntimeError(f"{preset} under sync-debug mode: {proc.stderr.strip()[-800:]}")
        results[preset] = trained(out, time.perf_counter() - t0)
    return {**results, "mode_set": not small}


PROFILED = """import json, sys, time
import torch
from torch.profiler import ProfilerActivity, profile
from cnnlab.device import PRECISIONS, configure, pick_device
from cnnlab.doctor import preset_step
from cnnlab.presets import get
device, batch, steps, warm = pick_device(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cuda, cfg, out = device.type == "cuda", get("fast"), {}
configure(device)
for name in ("bf16", "fp16", "fp32") if cuda else ("bf16", "fp32"):  # (a CPU's fp16 convolutions: emulated)
    step = preset_step(cfg, batch, device, PRECISIONS[name])
    for _ in range(warm):
        step()
    torch.cuda.synchronize() if cuda else None
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize() if cuda else None
        seconds = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    on_gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    timed = on_gpu if cuda else [e for e in events if e.key.startswith("aten::")]
    self_us = lambda e: e.self_device_time_total if cuda else e.self_cpu_time_total
    top = sorted(timed, key=self_us, reverse=True)[:10]
    out[name] = {"ms_per_step": round(1e3 * seconds, 3), "images_per_s": round(batch / seconds),
                 "kernels_per_step" if cuda else "aten_calls_per_step": sum(e.count for e in timed) / steps,
                 "casts_per_step": sum(e.count for e in events if e.key in ("aten::_to_copy", "aten::copy_")) / steps,
                 "top_ms_per_step": {e.key[:80]: round(self_us(e) / 1e3 / steps, 3) for e in top}}
print(json.dumps(out))
"""


def step_profile(args: argparse.Namespace) -> dict:
    """`fast`'s training step (the doctor's: network, optimizer, autocast; no data loading) in bf16, fp16 and
    fp32 under torch.profiler: milliseconds and images/s per step, GPU kernels (on a CPU: aten calls) and casts
    per step, and the ten largest by their own time: on the H200 it showed a step bound by the host's launches,
    whatever the precision (docs/scale-out.md). Dry run or CPU: bf16 and fp32, batch 16, 1 step after 1."""
    small = args.dry_run or args.device == "cpu"
    sizes = ["16", "1", "1"] if small else ["1024", "20", "5"]  # batch, steps profiled, steps before
    proc = subprocess.run([sys.executable, "-c", PROFILED, args.device, *sizes], cwd=ROOT, capture_output=True,
                          text=True, timeout=LIMIT_S)
    if proc.returncode:
        raise RuntimeError(f"step profile: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan(args: argparse.Namespace) -> dict:
    """Every check, most wanted first: should the GPU's time run out, the later ones are those left out."""
    return {"doctor": lambda: doctor(args),
            "fast": lambda: train("fast", args, "--preset", "fast"),
            "quick": lambda: train("quick", args, "--preset", "quick"),
            "fast_fp16": lambda: train("fast-fp16", args, "--preset", "fast", "--precision", "fp16"),
            "fast_fp32": lambda: train("fast-fp32", args, "--preset", "fast", "--precision", "fp32"),
            "sync_debug": lambda: sync_debug(args),
            "evaluate_and_export": lambda: agree(args),
            "photos_streamed": lambda: photos_streamed(args),
            "ctrl_c_resume": lambda: interrupted(args),
            "fast_compile": lambda: train("fast-compile", args, "--preset", "fast", "--compile"),
            "step_profile": lambda: step_profile(args)}


def checks(args: argparse.Namespace, report) -> dict:
    """Every check, in order; one that fails is recorded as {"error": ...}, and once --max-seconds have passed
    the rest as {"error": "TimeoutError: skipped: ..."}. `report(results)` is called after each (it writes the
    result file)."""
    global LIMIT_S
    results, t_start = {}, time.perf_counter()
    for name, check in plan(args).items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        left = args.max_seconds - (t0 - t_start)
        LIMIT_S = min(args.check_seconds, left)  # (each command's time limit)
        try:
            if left < 10:
                raise TimeoutError(f"skipped: --max-seconds {args.max_seconds} had passed")
            results[name] = check()
        except Exception as e:  # recorded, and the next check runs
            results[name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
        print(f"{name}: {time.perf_counter() - t0:.0f} s: {json.dumps(results[name])[:300]}", flush=True)
        report(with_cpu(results, args.cpu_reference))
    return results


def with_cpu(results: dict, reference: Path | None) -> dict:
    """Each training's CPU test accuracy beside it, from a --device cpu run of this script on the same data; the
    variants of `fast` (fp16, fp32, --compile) beside the CPU's `fast` where the reference has no run of their
    own (the CPU takes an hour for fp32 on CIFAR-10): `cpu_reference` says which."""
    cpu = json.loads(reference.read_text())["checks"] if reference else {}
    for name, figures in results.items():
        if "test_accuracy" in figures and "epochs" in figures:
            own = name if "test_accuracy" in cpu.get(name, {}) else name.split("_")[0]
            figures["cpu_test_accuracy"] = cpu.get(own, {}).get("test_accuracy")
            figures["cpu_reference"] = own if figures["cpu_test_accuracy"] is not None else None
    return results


def main() -> None:
    global WORK
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="images (default: the shared CIFAR-10)")
    ap.add_argument("--device", default="auto", help="auto (the GPU), cuda:N or cpu")
    ap.add_argument("--cpu-reference", type=Path, help="this script's JSON from a --device cpu run on the same data")
    ap.add_argument("--dry-run", action="store_true", help="smoke settings; prints the JSON, writes no result file")
    ap.add_argument("--only", nargs="+", metavar="CHECK", help="these checks alone (evaluate_and_export needs quick)")
    ap.add_argument("--work", type=Path, default=WORK, help="where the runs go (default: benchmarks/work/gpu_check)")
    ap.add_argument("--check-seconds", type=float, default=LIMIT_S, help="one command's time limit (default 150; "
                    "on a CPU `fast` on CIFAR-10 takes 25 minutes)")
    ap.add_argument("--max-seconds", type=float, default=540, help="checks still to run after this are skipped "
                    "(default 540: the device tool's 10-minute command, less a minute to start)")
    ap.add_argument("--tag", default="", help="a suffix for the result file's name (a partial run beside a whole "
                    "one: gpu_check-<gpu>-<tag>.json)")
    args = ap.parse_args()
    if not re.fullmatch(r"[A-Za-z0-9_-]*", args.tag):
        ap.error(f"--tag {args.tag!r}: letters, digits, '-' and '_' only (it goes into a file name)")
    WORK = args.work
    WORK.mkdir(parents=True, exist_ok=True)
    t0, info = time.perf_counter(), machine()
    gpu = "cpu"
    if args.device != "cpu":
        import torch

        gpu = torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"
    name = f"gpu_check-{gpu if gpu != 'cpu' else 'cpu-' + info['cpu_class']}" + (f"-{args.tag}" if args.tag else "")

    def report(results: dict) -> dict:
        out = {"machine": info, "device": gpu, "data": str(args.data), "dry_run": args.dry_run,
               "seconds": round(time.perf_counter() - t0, 1), "checks": results}
        if not args.dry_run:
            files.write_json(HERE / "results" / f"{name}.json", out)  # after every check: a cut run keeps its part
        return out

    results = checks(args, report)
    out = report(with_cpu(results, args.cpu_reference))
    print(json.dumps(out, indent=1) if args.dry_run else f"wrote {HERE / 'results' / (name + '.json')}")
    sys.exit(1 if any("error" in r for r in results.values()) else 0)


if __name__ == "__main__":
    main()
