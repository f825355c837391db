"""cnnlab's ImageNet backbones against torchvision's: the same state_dict keys and shapes, the same outputs.

torchvision does not import beside cnnlab's PyTorch build, so this runs in a venv of its own
(`make parity` builds .venv-parity with torch 2.14.1 and torchvision 0.29.1 and runs this script in it,
with cnnlab's source on the path). Per backbone it builds torchvision's network without weights, gives
every floating tensor of it random values (BatchNorm variances positive), loads that state_dict into
cnnlab's network with strict=True, and compares the two in eval mode on a batch of random images in fp32.

Writes benchmarks/results/torchvision_parity.json, and tests/torchvision_manifest.json (every key and shape,
in order), which the regular tests compare with cnnlab's networks without this venv.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from cnnlab import models  # noqa: E402
from cnnlab.hardware import cpu_class, cpu_model  # noqa: E402

# cnnlab's name -> torchvision's builder
BACKBONES = {"resnet18_imagenet": "resnet18", "resnet50": "resnet50", "mobilenet_v3_large": "mobilenet_v3_large",
             "efficientnet_b0": "efficientnet_b0", "convnext_tiny": "convnext_tiny"}
TOLERANCE = 1e-4  # largest absolute difference of the logits allowed, fp32


def randomized(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The network's state_dict with random values in every floating tensor: nothing passes by being zero."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, t in net.state_dict().items():
        if t.is_floating_point():
            t = torch.randn(t.shape, generator=g) * 0.1
            if key.endswith("running_var"):
                t = t.abs() + 0.5
        state[key] = t
    return state


def compare(name: str, tv_name: str, torchvision) -> dict:
    theirs = getattr(torchvision.models, tv_name)(weights=None).eval()
    ours = models.build(name, 3, 1000, (224, 224)).eval()
    state = randomized(theirs, seed=0)
    theirs.load_state_dict(state)
    their_keys = [(k, list(v.shape)) for k, v in theirs.state_dict().items()]
    our_keys = [(k, list(v.shape)) for k, v in ours.state_dict().items()]
    ours.load_state_dict(state, strict=True)
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = theirs(x), ours(x)
    diff = (a - b).abs().max().item()
    return {"keys": len(their_keys), "keys_equal": their_keys == our_keys, "params": sum(p.numel() for p in
            ours.parameters()), "max_abs_diff": diff, "logit_scale": a.abs().max().item(),
            "ok": their_keys == our_keys and diff < TOLERANCE, "manifest": our_keys}


def main() -> int:
    import torchvision

    torch.set_num_threads(os.cpu_count() or 1)
    results, manifest = {}, {}
    for name, tv_name in BACKBONES.items():
        t0 = time.perf_counter()
        r = compare(name, tv_name, torchvision)
        manifest[name] = r.pop("manifest")
        r["seconds"] = round(time.perf_counter() - t0, 2)
        results[name] = r
        print(f"{name:<20} torchvision.models.{tv_name:<20} keys {r['keys']:>4} equal {r['keys_equal']}  "
              f"params {r['params']:>11,}  max |diff| {r['max_abs_diff']:.2e} (logits up to {r['logit_scale']:.1f})  "
              f"{'OK' if r['ok'] else 'FAILED'}")
    out = {"torch": torch.__version__, "torchvision": torchvision.__version__, "cpu": cpu_model(),
           "cpu_class": cpu_class(), "date": time.strftime("%Y-%m-%d %H:%M"), "tolerance": TOLERANCE,
           "dtype": "float32", "batch": [4, 3, 224, 224], "results": results}
    (ROOT / "benchmarks" / "results" / "torchvision_parity.json").write_text(json.dumps(out, indent=1) + "\n")
    (ROOT / "tests" / "torchvision_manifest.json").write_text(json.dumps(
        {"torchvision": torchvision.__version__, "backbones": manifest}, separators=(",", ":")) + "\n")
    print("wrote benchmarks/results/torchvision_parity.json and tests/torchvision_manifest.json")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
