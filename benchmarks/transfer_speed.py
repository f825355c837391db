"""How fast each ImageNet backbone fine-tunes and embeds at 224 px on this CPU: images per second of
- a frozen-phase step (--freeze-epochs: the head alone trains; the body runs forward only, BatchNorm in eval),
- a full training step (after the thaw: everything trains),
- embedding for a linear probe (--head-only: eval-mode forward of the body, in the preset's evaluation batches),
each as cnnlab runs it (channels-last, `auto` precision: bf16 where the CPU has it, else fp32; AdamW).

    .venv/bin/python benchmarks/transfer_speed.py [--isa native|avx2] [--batch 32] [--steps 3] [--models ...]

`--isa avx2` caps PyTorch and oneDNN at AVX2 before torch loads (see fp32_path.py): an emulated AVX2-only
CPU, where `auto` is fp32. Writes benchmarks/results/transfer_speed-<class>.json. Run alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ISA_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
if "--isa" in sys.argv and sys.argv[sys.argv.index("--isa") + 1] == "avx2":
    os.environ.update(ISA_ENV)  # before torch is imported: both are read when the libraries load

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cnnlab import models, presets  # noqa: E402
from cnnlab.device import autocast, pick_precision, precision_name  # noqa: E402
from cnnlab.training import finetune, probe  # noqa: E402
from cnnlab.training.optim import make_optimizer  # noqa: E402

BACKBONES = ("resnet18_imagenet", "mobilenet_v3_large", "efficientnet_b0", "resnet50", "convnext_tiny")


def images_per_s(step, batch: int, steps: int) -> float:
    step()  # the first call allocates and picks kernels
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def train_step(model, batch: int, dtype: torch.dtype, frozen: bool):
    finetune.freeze_body(model, frozen)
    model.train()
    finetune.freeze_norms(model, frozen)
    opt = make_optimizer(presets.get("finetune"), model)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        with autocast(torch.device("cpu"), dtype):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


EMBED_BATCH = presets.get("finetune").eval_batch_size  # what --head-only embeds at a time


def embed_step(model, dtype: torch.dtype):
    embedder = probe.Embedder(model).eval()
    x = torch.randn(EMBED_BATCH, 3, 224, 224).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.no_grad(), autocast(torch.device("cpu"), dtype):
            embedder(x)
    return step


def main() -> None:
    from common import cpu_class, machine, save

    parser = argparse.ArgumentParser()
    parser.add_argument("--isa", choices=["native", "avx2"], default="native")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=BACKBONES, choices=BACKBONES)
    args = parser.parse_args()
    # the cap does not change /proc/cpuinfo, which `auto` reads: an AVX2-only CPU's `auto` is fp32
    dtype = torch.float32 if args.isa == "avx2" else pick_precision("auto", torch.device("cpu"))
    results = {}
    for name in args.models:
        torch.manual_seed(0)
        model = models.build(name, 3, 10, (224, 224)).to(memory_format=torch.channels_last)
        row = {"frozen_step": images_per_s(train_step(model, args.batch, dtype, True), args.batch, args.steps),
               "full_step": images_per_s(train_step(model, args.batch, dtype, False), args.batch, args.steps),
               "embedding": images_per_s(embed_step(model, dtype), EMBED_BATCH, args.steps)}
        results[name] = {k: round(v, 1) for k, v in row.items()}
        print(f"{name:<20} {precision_name(dtype)}: frozen step {row['frozen_step']:6.1f} img/s, full step "
              f"{row['full_step']:6.1f} img/s, embedding {row['embedding']:6.1f} img/s", flush=True)
    label = "avx2-emulated" if args.isa == "avx2" else cpu_class()
    save(f"transfer_speed-{label}", {"machine": machine(), "isa": args.isa, "precision": precision_name(dtype),
                                     "batch": args.batch, "image_size": 224, "results": results})


if __name__ == "__main__":
    main()
