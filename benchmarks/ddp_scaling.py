"""Training images/s with 1 and 2 data-parallel processes (torchrun, Gloo) on this machine.

On 2 cores one process already uses both (PyTorch's intra-op threads), so a second process cannot add
compute: the figure shows what data parallelism costs here (gradient all-reduce over loopback, each
process with one thread). On a machine with more cores or GPUs, the same command scales out.

    python benchmarks/ddp_scaling.py [--model seed] [--batch-size 256] [--subset 10000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys

from common import CNNLAB, DATA, HERE, machine, run, save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="seed")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--subset", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for nproc in (1, 2):
        out = HERE / "work" / f"ddp-{args.model}-{nproc}"
        shutil.rmtree(out, ignore_errors=True)
        flags = ["train", "--data", str(DATA), "--model", args.model, "--batch-size", str(args.batch_size),
                 "--subset", str(args.subset), "--epochs", str(args.epochs), "--no-report", "--out", str(out)]
        seconds, code, _ = run([*CNNLAB, *flags, "--nproc", str(nproc)], out.with_suffix(".log"))
        if code:
            sys.exit(f"{nproc} process(es) failed (exit {code}); see {out.with_suffix('.log')}")
        history = json.loads((out / "history.json").read_text())
        last = history[-1]  # the first epoch includes warm-up
        rows.append({"processes": nproc, "images_per_s": last["images_per_s"], "epoch_seconds": last["seconds"],
                     "test_accuracy": json.loads((out / "metrics.json").read_text())["test_accuracy"],
                     "wall_seconds": round(seconds, 1)})
        print(f"{nproc} process(es): {last['images_per_s']:,.0f} img/s in the last epoch ({last['seconds']:.1f} s), "
              f"wall {seconds:.1f} s", flush=True)
    ratio = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    print(f"2 processes / 1 process: {ratio:.2f}x")
    save("ddp_scaling", {"machine": machine(), "model": args.model, "batch_size": args.batch_size,
                         "subset": args.subset, "epochs": args.epochs, "rows": rows, "ratio_2_to_1": round(ratio, 3),
                         "command": "python benchmarks/ddp_scaling.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
