"""Where the network looked: Grad-CAM heatmaps (Selvaraju et al., 2017) and their overlays on the images.

    heatmaps(model, images, norm, targets)   ->  (N, H, W) maps in [0, 1] at the input size, one per image
    overlay(images, maps)                    ->  the images with the maps drawn over them (uint8, N, C, H, W)
    explain_run(run, paths, out)             ->  `cnnlab explain`: one PNG per image file, and what it wrote

The map is computed at the last convolution whose output is still at least 2x2 (`target_layer`: Grad-CAM's
usual choice, the last convolutional layer; one whose output is 1x1 would give a flat map), by captum's
`LayerGradCam`: the maintained implementation, a pure-Python package whose only needs (torch, NumPy,
matplotlib) cnnlab already has, and which handles any network with convolutions. pytorch-grad-cam needs
torchvision and OpenCV, which do not install beside this PyTorch. The maps use the float32 network on
single views (no test-time augmentation): a gradient per view would not add up to one map.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import files, models
from cnnlab.data.dataset import Normalization
from cnnlab.data.folders import expand_paths
from cnnlab.data.images import MAX_PIXELS, decode_image
from cnnlab.device import pick_device
from cnnlab.errors import CnnlabError
from cnnlab.evaluation.calibration import temperature_of
from cnnlab.run import Run

ALPHA = 0.5  # the heatmap's share of each overlay pixel


def target_layer(model: nn.Module, channels: int, image_size: tuple[int, int]) -> str:
    """The name of the last convolution (in the order a forward pass calls them) whose output is >= 2x2."""
    found: list[tuple[str, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: found.append((name, tuple(out.shape))))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, *image_size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    wide = [name for name, shape in found if min(shape[2:]) >= 2]
    if not wide:
        raise CnnlabError("this network has no convolution whose output is 2x2 or larger: Grad-CAM cannot map it")
    return wide[-1]


def heatmaps(model: nn.Module, images: torch.Tensor, norm: Normalization, targets: torch.Tensor,
             layer: str | None = None, batch_size: int = 64) -> torch.Tensor:
    """Grad-CAM maps of uint8 (N, C, H, W) images for the class index of each in `targets`: (N, H, W) floats,
    each scaled to [0, 1] (an all-zero map: nothing in the layer spoke for that class)."""
    from captum.attr import LayerAttribution, LayerGradCam

    model = model.float().eval()
    device = next(model.parameters()).device
    layer = layer or target_layer(model, images.shape[1], tuple(images.shape[2:]))
    try:
        cam = LayerGradCam(model, model.get_submodule(layer))
    except AttributeError:
        raise CnnlabError(f"the network has no layer {layer!r}") from None
    maps = []
    for i in range(0, len(images), batch_size):
        x = norm(images[i:i + batch_size].to(device)).requires_grad_(True)
        attr = cam.attribute(x, target=targets[i:i + batch_size].to(device).tolist(), relu_attributions=True)
        maps.append(LayerAttribution.interpolate(attr.detach(), tuple(images.shape[2:]), "bilinear")[:, 0].cpu())
    out = torch.cat(maps) if maps else torch.zeros(0, *images.shape[2:])
    peak = out.flatten(1).amax(1)[:, None, None]
    return torch.where(peak > 0, out / torch.where(peak > 0, peak, 1), 0).clamp(0, 1)


def overlay(images: torch.Tensor, maps: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """uint8 (N, C, H, W) images (grey ones drawn in colour) with `maps` (N, H, W) in a jet colour scale."""
    from matplotlib import colormaps

    colours = torch.from_numpy(colormaps["jet"](maps.numpy())[..., :3]).permute(0, 3, 1, 2).float() * 255
    base = images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
    return ((1 - alpha) * base + alpha * colours).round().clamp(0, 255).to(torch.uint8)


def enlarged(image: torch.Tensor, side: int = 224) -> torch.Tensor:
    """A (C, H, W) uint8 image scaled up (nearest pixels: what the network saw, not a smoothed guess) so that its
    longer side is at least `side`."""
    scale = max(1, -(-side // max(image.shape[1:])))
    return F.interpolate(image[None].float(), scale_factor=scale, mode="nearest")[0].to(torch.uint8)


def png_bytes(image: torch.Tensor) -> bytes:
    """A (C, H, W) uint8 image as PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def explain_run(run: Run | str | Path, paths: list[str], out: str | Path | None = None, class_name: str | None = None,
                layer: str | None = None, device: str = "auto") -> list[dict]:
    """`cnnlab explain`: Grad-CAM overlays of image files (folders: every image under them) with a run's final
    weights, written to `out` (default RUN/explanations/)."""
    if Path(run).suffix.lower() in (".onnx", ".xml"):
        raise CnnlabError(f"{run} is an exported model: explaining needs the run directory it was exported from "
                          "(gradients need the PyTorch weights)")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise CnnlabError(f"--out {out} is a file; give a folder for the overlays")
    run = Run.of(run)
    model, meta = models.load_model(run, pick_device(device))
    if not (paths := expand_paths(paths)):
        raise CnnlabError("no images found in the paths given")
    return explain_files(model, meta, paths, Path(out) if out else run.file(Run.EXPLANATIONS), class_name, layer)


def explain_files(model: nn.Module, meta: dict, paths: list[str], out: Path, class_name: str | None = None,
                  layer: str | None = None) -> list[dict]:
    """Per image file: the predicted class and probability, the class mapped (`class_name`, else the predicted
    one) and the overlay written to `out` as <file stem>.<class>.png. Unreadable files get {"filename", "error"}."""
    if class_name is not None and class_name not in meta["classes"]:
        raise CnnlabError(f"--class {class_name!r} is not one of the model's classes: {', '.join(meta['classes'])}")
    decoded, results = {}, []
    for p in paths:
        try:
            decoded[p] = torch.tensor(decode_image(p, meta["in_channels"], tuple(meta["image_size"]), MAX_PIXELS,
                                                   None, meta.get("resize", "squish"))).permute(2, 0, 1)
        except CnnlabError as e:
            results.append({"filename": p, "error": str(e)})
    if not decoded:
        return results
    answers, pictures = explain_images(model, Normalization.from_dict(meta["normalization"]),
                                       torch.stack(list(decoded.values())), meta["classes"], temperature_of(meta),
                                       class_name, layer)
    out.mkdir(parents=True, exist_ok=True)
    for p, name, picture, found in zip(decoded, unique_stems(list(decoded)), pictures, answers, strict=True):
        target = out / f"{name}.{found['class']}.png"
        files.write_bytes(target, png_bytes(enlarged(picture)))
        results.append({"filename": p, **found, "overlay": str(target)})
    return results


def explain_images(model: nn.Module, norm: Normalization, images: torch.Tensor, classes: list[str],
                   temperature: float = 1.0, class_name: str | None = None, layer: str | None = None
                   ) -> tuple[list[dict], torch.Tensor]:
    """uint8 (N, C, H, W) images -> per image {"predicted", "probability" (calibrated), "class" (the one mapped:
    `class_name`, else the predicted one)}, and the overlays (uint8, N, 3, H, W)."""
    with torch.no_grad():
        logits = model.float().eval()(norm(images.to(next(model.parameters()).device))).float().cpu()
    conf, pred = (logits / temperature).softmax(1).max(1)
    targets = torch.full_like(pred, classes.index(class_name)) if class_name else pred
    pictures = overlay(images, heatmaps(model, images, norm, targets, layer))
    answers = [{"predicted": classes[int(k)], "probability": float(c), "class": classes[int(t)]}
               for c, k, t in zip(conf, pred, targets, strict=True)]
    return answers, pictures


def unique_stems(paths: list[str]) -> list[str]:
    """A file name stem per path, distinct: the stem, else the folder and the stem, else those and a number."""
    stems = [Path(p).stem for p in paths]
    named = [s if stems.count(s) == 1 else f"{Path(p).parent.name}-{s}" for p, s in zip(paths, stems, strict=True)]
    return [n if named.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(named)]
