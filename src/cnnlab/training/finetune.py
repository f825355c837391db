"""Fine-tuning: the weights a run starts from and the inputs they expect, which layer of a network is its
head, how its parameters split into layer groups for discriminative learning rates, and what trains in an
epoch (`--freeze-epochs`, `--head-only`).

The backbones (backbones.py) name their head and where their body splits; any other network's head is its
last linear layer, and its body splits in two halves by parameter order. Where the weights come from
(downloads, files) is pretrained.py's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from cnnlab import models
from cnnlab.config import TrainConfig
from cnnlab.data.dataset import Normalization
from cnnlab.errors import CnnlabError
from cnnlab.models import pretrained
from cnnlab.run import Run

log = logging.getLogger(__name__)


def head_name(model: nn.Module) -> str:
    if hasattr(model, "head_name"):
        return model.head_name
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CnnlabError(f"{type(model).__name__} has no linear layer to serve as a classifier head")
    return linears[-1]


def is_head(name: str, head: str) -> bool:
    return name.startswith(head + ".")


def layer_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """[early body, late body, head]: the parameters from input to output."""
    if hasattr(model, "layer_groups"):
        return model.layer_groups()
    head = head_name(model)
    body = [p for n, p in model.named_parameters() if not is_head(n, head)]
    half = len(body) // 2
    return [body[:half], body[half:], [p for n, p in model.named_parameters() if is_head(n, head)]]


def lr_factors(spread: float) -> tuple[float, float, float]:
    """Each layer group's share of the learning rate: geometric from 1/spread to 1, as fastai's slice()."""
    return 1 / spread, spread ** -0.5, 1.0


def body_frozen(cfg: TrainConfig, epoch: int) -> bool:
    return cfg.head_only or epoch < cfg.freeze_epochs


def freeze_body(model: nn.Module, frozen: bool) -> None:
    """Freeze every parameter outside the head, or give each back the trainability it was built with."""
    if not hasattr(model, "_built_trainable"):  # what the network trains by design (airbench fixes some weights)
        model._built_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = head_name(model)
    for name, p in model.named_parameters():
        if not is_head(name, head):
            p.requires_grad_(not frozen and name in model._built_trainable)


def freeze_norms(model: nn.Module, frozen: bool) -> None:
    """While the body is frozen its normalization layers keep their statistics: BatchNorm in eval mode.
    (Call after model.train(), which sets every layer to training.)"""
    if not frozen:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def normalization(cfg: TrainConfig, ds, state: dict | None, say: bool = True) -> Normalization:
    """How pixels become inputs. Weights from a cnnlab run keep the statistics they were trained with (its
    model.json), as ImageNet's keep ImageNet's. A resumed run takes its checkpoint's statistics
    (TrainState.load_state_dict), so it makes no pass over the data for them."""
    meta = pretrained.run_meta(cfg.pretrained) if state is None else None
    if meta and meta.get("in_channels") == ds.channels:
        norm = Normalization.from_dict(meta["normalization"])
        if say:
            log.info(f"normalization of the weights' run: mean {_fmt(norm.mean)}, std {_fmt(norm.std)}")
        return norm
    if cfg.normalize == "imagenet":
        return Normalization(pretrained.IMAGENET_MEAN, pretrained.IMAGENET_STD)
    return Normalization.fit(ds.x_train) if cfg.normalize == "meanstd" and state is None else Normalization()


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def check_start(cfg: TrainConfig, image_size: tuple[int, int] | None) -> None:
    """Before any data is read: a probe needs a network that says what its embedding is; `imagenet` weights are
    fetched (or fail in one line); a weights file must fit the network, built without storage (any class and
    channel count fits: the head is replaced and the first convolution adapted). Without a known input size
    only the tensors' names are checked here (the tutorial's dense layer grows with the image); their shapes
    are checked when the weights are loaded."""
    if not (cfg.pretrained or cfg.head_only):
        return
    with torch.device("meta"):
        model = models.build(cfg.model, 3, 10, image_size or (224, 224))
    if cfg.head_only and not hasattr(model, "embed"):
        raise CnnlabError(f"--head-only needs a network that defines its embedding; {cfg.model} does not. The "
                          f"ImageNet backbones do: {', '.join(pretrained.IMAGENET)}")
    if cfg.pretrained:
        path = pretrained.source_path(cfg.model, cfg.pretrained)
        pretrained.fitted(pretrained.read(path), model.state_dict(), head_name(model), cfg.pretrained,
                          shapes=image_size is not None)


def start_from(model: nn.Module, cfg: TrainConfig, say: bool = True) -> None:
    """Weights from elsewhere: a finished cnnlab run (--init-from) or a weights file (--pretrained)."""
    if cfg.init_from:
        said = init_from(model, cfg.model, cfg.init_from)
        if say:
            log.info(said)
    if cfg.pretrained:
        said = pretrained.load_into(model, cfg.model, head_name(model), cfg.pretrained)
        if say:
            log.info(said)


def init_from(model: nn.Module, model_name: str, source: str | Path) -> str:
    """Start `model` from a finished run's weights (fine-tuning); say what was taken.

    The architecture must be the same. When the class count differs, the classifier (the last linear
    layer) keeps its fresh initialization and everything before it is copied.
    """
    run = Run(source)
    meta = run.read_json(Run.META, "--init-from needs a finished training run")
    if meta["model"] != model_name:
        raise CnnlabError(f"--init-from {source}: that run trained {meta['model']!r}, this one is {model_name!r}; "
                          "fine-tuning needs the same architecture (pass --model)")
    weights = run.weights(meta)
    own = model.state_dict()
    head = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
    differ = sorted(k for k in own if k in weights and weights[k].shape != own[k].shape)
    unfit = [k for k in differ if not head or not k.startswith(head[0] + ".")]
    unfit += sorted(set(own) ^ set(weights))
    if unfit:
        raise CnnlabError(f"--init-from {source}: its weights do not fit this model ({unfit[0]} differs, e.g. "
                          f"another input channel count or image size: it was trained on {meta['in_channels']} "
                          f"channels at {meta['image_size']})")
    model.load_state_dict({k: v for k, v in weights.items() if k not in differ}, strict=False)
    if differ:
        return (f"initialized from {source}; new classifier head ({len(meta['classes'])} -> "
                f"{own[head[0] + '.weight'].shape[0]} classes), all other layers copied")
    return f"initialized from {source}: all {len(own)} tensors copied"
