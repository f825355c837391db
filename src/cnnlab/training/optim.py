"""Optimizers, learning-rate schedules and lookahead weight averaging, built from a TrainConfig."""

from __future__ import annotations

import math

import torch
from torch import nn

from cnnlab.config import TrainConfig
from cnnlab.errors import CnnlabError

LOOKAHEAD_EVERY = 5  # steps between weight averages


def _skip_dynamo_import() -> None:
    """Keep torch.optim from importing torch._dynamo, which costs 0.8 s of every run's start-up.

    Optimizer.add_param_group, zero_grad, state_dict and load_state_dict are wrapped by torch._disable_dynamo,
    which imports torch._dynamo on their first call in order to exclude them from torch.compile'd graphs.
    cnnlab compiles only the model (--compile), never code that builds or steps an optimizer, so the
    exclusion has nothing to do: each wrapper is told it is already prepared. With --compile it is left alone.
    """
    for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict"):
        inner = getattr(getattr(torch.optim.Optimizer, name), "__wrapped__", None)
        if inner is not None and getattr(inner, "__dynamo_disable", None) is None:
            inner.__dynamo_disable = inner  # what torch._compile's wrapper caches after its first call


def step_lr(cfg: TrainConfig) -> float:
    """The learning rate one optimizer step takes: `cfg.lr` itself, or, for per-1024 rates (airbench's
    convention), what it means at this batch size and momentum.

    A step with momentum m moves the weights by about lr / (1 - m) in total, so 1024 examples with momentum
    contribute 1024 * (1 + 1 / (1 - m)) example-steps. Dividing by that keeps the update per example fixed
    when the batch size or momentum changes; times the batch for a mean (not summed) loss.
    """
    if not cfg.per_1024:
        return cfg.lr
    return cfg.lr * cfg.batch_size / (1024 * (1 + 1 / (1 - cfg.momentum)))


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if not cfg.compile:
        _skip_dynamo_import()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer in ("adam", "adamw"):
        # fused: one kernel for all parameters instead of a dozen small ops each (9.5 -> 6.0 ms a step here)
        kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        groups = _spread(cfg, model, [{"params": [p for _, p in params], "lr": cfg.lr}])
        return kind(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer not in ("sgd", "muon"):
        raise CnnlabError(f"unknown optimizer {cfg.optimizer!r}; use adam, adamw, sgd or muon")
    lr, decay = cfg.lr, cfg.weight_decay
    if cfg.per_1024:
        lr = step_lr(cfg)
        decay = cfg.weight_decay / cfg.lr  # decoupled: lr * decay, the shrink per step, scales as lr does
    filters = [p for _, p in params if p.ndim == 4] if cfg.optimizer == "muon" else []
    filter_ids = {id(p) for p in filters}
    norm_biases = [p for n, p in params if ".norm" in n]
    others = [p for n, p in params if ".norm" not in n and id(p) not in filter_ids]
    groups = [{"params": others, "lr": lr, "weight_decay": decay}]
    if norm_biases:
        scale = cfg.bias_lr_scale
        groups.append({"params": norm_biases, "lr": lr * scale, "weight_decay": decay / scale})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(_spread(cfg, model, groups), lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               fused=True)
    groups.append({"params": filters, "lr": cfg.filter_lr, "momentum": cfg.filter_momentum, "weight_decay": 0.0,
                   "orthogonal": True})
    return FilterMuon(_spread(cfg, model, groups), lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _spread(cfg: TrainConfig, model: nn.Module, groups: list[dict]) -> list[dict]:
    """--lr-spread: each group split by layer group (finetune.layer_groups), its rate scaled from lr / spread
    for the first layers to lr for the head. Weight decay stays per parameter as given."""
    if cfg.lr_spread == 1:
        return groups
    from cnnlab.training import finetune

    which = {id(p): i for i, g in enumerate(finetune.layer_groups(model)) for p in g}
    out = []
    for group in groups:
        for i, factor in enumerate(finetune.lr_factors(cfg.lr_spread)):
            ps = [p for p in group["params"] if which[id(p)] == i]
            if ps:
                out.append({**group, "params": ps, "lr": group["lr"] * factor})
    return out


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest matrix to `g` with all singular values near 1 (roughly 0.7-1.2), by a quintic iteration; for
    a stack of matrices (3-D), each of them, in one batched product per step.

    Each step maps every singular value s to a*s + b*s^3 + c*s^5; these coefficients (Jordan et al.) push
    small values up fast at the cost of not converging exactly to 1, which training does not mind.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    wide = x.size(-2) <= x.size(-1)
    x = x if wide else x.mT  # iterate on the smaller Gram matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # the Frobenius norm bounds the largest singular value
    x = x if x.ndim == 3 else x.unsqueeze(0)
    # baddbmm folds each scaling and sum into its product. FilterMuon's step on `fast`, against the form
    # a*x + (b*gram + c*gram@gram) @ x: 244 aten calls, not 354; 92-96 ms, not 108-112, on a 2-core
    # avx512_bf16 CPU (interleaved rounds); on an H200 420 kernels a step, not 494, at the same step time
    # (10.97 ms against 10.93: that step is bound elsewhere).
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    x = x.view(g.shape if wide else g.mT.shape)
    return x if wide else x.mT


class FilterMuon(torch.optim.Optimizer):
    """Nesterov SGD, except that groups marked `orthogonal` (conv filters) take orthogonalized steps (Muon).

    A conv's gradient is dominated by a few directions; orthogonalizing the momentum gives every direction
    of the filter bank the same step: `fast` for 5 epochs (filter lr 0.24) reached 89.38% against 88.26% with
    SGD (seed 0), and `quick` went from 70.30 to 73.95% (seeds 0-2). The filters are rescaled to a fixed norm
    before each step: BatchNorm follows every conv, so only their direction matters, and a fixed norm keeps
    the step's angle set by the learning rate. torch.optim.Muon takes 2-D weights only, hence this class.

    The filter banks of one shape step together (stacked: one batched Newton-Schulz iteration, as
    airbench94_muon does, instead of ~55 small kernels for each bank, which made a GPU step launch-bound), and
    the other parameters (elementwise Nesterov SGD) as one flattened vector, written back with foreach copies. It
    honours GradScaler's protocol itself (`_step_supports_amp_scaling`): GradScaler hands it `found_inf` and,
    when the gradients are still scaled, `grad_scale`, instead of reading the flag on the host every step.
    """
    _step_supports_amp_scaling = True

    def __init__(self, groups: list[dict], lr: float, momentum: float, nesterov: bool = True):
        super().__init__(groups, {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": 0.0,
                                  "orthogonal": False})

    @torch.no_grad()
    def step(self, closure=None):
        """One update; skipped on the device when `self.found_inf` (a 0-d tensor, as GradScaler sets it) is 1."""
        found_inf = getattr(self, "found_inf", None)
        keep = None if found_inf is None else found_inf.to(torch.bool)
        scale = getattr(self, "grad_scale", None)  # (GradScaler's, where it left the gradients scaled)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not group["orthogonal"]:  # biases, norms, the head: elementwise, so all of them as one vector
                if params:
                    self._update(params, group, keep, scale)
                continue
            shapes: dict[torch.Size, list[torch.Tensor]] = {}
            for p in params:
                shapes.setdefault(p.shape, []).append(p)
            for same in shapes.values():
                self._update(same, group, keep, scale)

    def _update(self, ps: list[torch.Tensor], group: dict, keep: torch.Tensor | None,
                scale: torch.Tensor | None) -> None:
        """One step of the parameters `ps`: filters of one shape stacked along a new first dimension, other
        parameters (any shapes) flattened into one vector; a few kernels whatever their number."""
        m = group["momentum"]
        join = torch.stack if group["orthogonal"] else (lambda ts: torch.cat([t.reshape(-1) for t in ts]))
        p, g = join(ps), join([q.grad for q in ps])
        if scale is not None:
            g = g / scale
        if group["weight_decay"]:
            g = g.add(p, alpha=group["weight_decay"])
        for q in ps:  # (allocated once: setdefault's default would be made, and filled, at every step)
            if "momentum_buffer" not in self.state[q]:
                self.state[q]["momentum_buffer"] = torch.zeros_like(q)
        bufs = [self.state[q]["momentum_buffer"] for q in ps]
        buf = join(bufs)
        new_buf = buf * m + g
        update = g.add(new_buf, alpha=m) if group["nesterov"] else new_buf
        new_p = p
        if group["orthogonal"]:
            rows = p.size(1)
            norms = p.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *[1] * (p.ndim - 1))
            new_p = p * (rows ** 0.5 / norms)
            update = orthogonalize(update.reshape(len(ps), rows, -1)).view_as(p)
        new_p = new_p.add(update, alpha=-group["lr"])
        if keep is not None:  # a non-finite step: keep the old values, decided on the device
            new_buf, new_p = torch.where(keep, buf, new_buf), torch.where(keep, p, new_p)
        if group["orthogonal"]:
            new_buf, new_p = new_buf.unbind(0), new_p.unbind(0)
        else:
            sizes = [q.numel() for q in ps]
            new_buf, new_p = ([v.view(q.shape) for v, q in zip(t.split(sizes), ps, strict=True)]
                              for t in (new_buf, new_p))
        torch._foreach_copy_(bufs, list(new_buf))
        torch._foreach_copy_(ps, list(new_p))


def improves(value: float, best: float | None, lower_is_better: bool) -> bool:
    """Whether a monitored value beats the best so far (any value beats none; a NaN beats nothing)."""
    return best is None or (value < best if lower_is_better else value > best)


def make_schedule(cfg: TrainConfig, opt: torch.optim.Optimizer, total_steps: int, frozen_steps: int = 0):
    """The learning-rate factor per step (times each group's rate), as a LambdaLR; `plateau` as PlateauLR.
    With a frozen phase (--freeze-epochs) its `frozen_steps` run one whole cycle of the shape, and the steps
    after it another (fastai's fine_tune: fit_one_cycle frozen, then fit_one_cycle unfrozen). Its `span`
    holds the total, which `TrainState.set_total_steps` may move between epochs (a re-planned run)."""
    span = {"total": total_steps}  # (a dict, not an attribute of a callable: LambdaLR's state_dict would save it)

    def factor(step: int) -> float:
        if step < frozen_steps:
            return _shape(cfg, step, frozen_steps)
        return _shape(cfg, step - frozen_steps, span["total"] - frozen_steps)
    if cfg.schedule == "plateau":
        schedule = PlateauLR(opt, factor, lower_is_better=cfg.monitor == "val_loss")
    else:
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    schedule.span = span
    return schedule


def _cosine(a: float, b: float, t: float) -> float:
    """From a (t=0) to b (t=1) along half a cosine."""
    return b + (a - b) * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0))) / 2


def _shape(cfg: TrainConfig, step: int, total: int) -> float:
    """The schedule's factor at `step` of `total` steps."""
    rise = cfg.warmup * total
    if cfg.schedule == "triangle":
        if step < rise:
            return cfg.lr_start + (1 - cfg.lr_start) * step / rise
        return 1 + (cfg.lr_end - 1) * (step - rise) / max(total - rise, 1)
    if cfg.schedule == "one-cycle":
        if step < rise:
            return _cosine(cfg.lr_start, 1.0, step / rise)
        return _cosine(1.0, cfg.lr_end, (step - rise) / max(total - rise, 1))
    if step < rise:  # the linear warm-up from 0 of constant, cosine, step and plateau
        return (step + 1) / rise
    if cfg.schedule == "cosine":
        return _cosine(1.0, cfg.lr_end, (step - rise) / max(total - rise, 1))
    if cfg.schedule == "step":
        return 0.1 ** ((step >= total * 0.5) + (step >= total * 0.75))
    return 1.0  # constant; plateau's drops come from PlateauLR.epoch_end


class PlateauLR(torch.optim.lr_scheduler.LambdaLR):
    """The warm-up per step, times 0.1 for each time the monitored value went 2 epochs without improving
    (Keras' ReduceLROnPlateau(factor=0.1, patience=2)). What it has seen is in its state_dict: resume is exact."""

    PATIENCE, DROP = 2, 0.1

    def __init__(self, opt: torch.optim.Optimizer, warm, lower_is_better: bool):
        self.scale, self.best, self.since, self.lower = 1.0, None, 0, lower_is_better
        super().__init__(opt, lambda step: warm(step) * self.scale)

    def epoch_end(self, value: float) -> None:
        better = improves(value, self.best, self.lower)
        self.best, self.since = (value, 0) if better else (self.best, self.since + 1)
        if self.since >= self.PATIENCE:
            self.scale, self.since = self.scale * self.DROP, 0

    def state_dict(self) -> dict:
        return {**super().state_dict(), "plateau": [self.scale, self.best, self.since]}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.scale, self.best, self.since = state.pop("plateau")
        super().load_state_dict(state)


class Lookahead:
    """Every few steps, pull the weights toward their running average, then continue from the average.

    The averaging weight rises with the cube of progress, so early training moves freely and the end is
    smoothed: about what a longer, decayed schedule would give, for free.
    """

    def __init__(self, model: nn.Module, total_steps: int):
        self.total_steps = total_steps
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def step(self, model: nn.Module, step: int, skip: torch.Tensor | None = None) -> None:
        """Call after optimizer step number `step` (counted from 1). `skip`: a 0-d bool tensor, true when
        that step was not taken (non-finite loss); then the weights and the average stay as they are."""
        if step % LOOKAHEAD_EVERY == 0 or step == self.total_steps:
            decay = 1.0 if step == self.total_steps else 0.95 ** LOOKAHEAD_EVERY * (step / self.total_steps) ** 3
            self._update(model, decay, skip)

    @torch.no_grad()
    def _update(self, model: nn.Module, decay: float, skip: torch.Tensor | None) -> None:
        """All tensors at once (foreach: a few kernels, not a few per tensor). A skipped step left the weights
        as they were (finite), so weights of 0 (decided on the device, no host read) move neither."""
        state = model.state_dict()
        keys = [k for k in self.average if k in state]
        averages, weights = [self.average[k] for k in keys], [state[k] for k in keys]
        if not keys:
            return
        if skip is None:
            torch._foreach_lerp_(averages, weights, 1 - decay)
            torch._foreach_copy_(weights, averages)
            return
        taken = (~skip).to(averages[0].dtype)  # (weights as tensors, one per tensor: a tensor where a number is
        # expected would be read on the host, a wait for the GPU)
        torch._foreach_lerp_(averages, weights, [taken * (1 - decay)] * len(keys))
        torch._foreach_lerp_(weights, averages, [taken] * len(keys))  # (a weight of 1: exactly the average)

    def state_dict(self) -> dict:
        return dict(self.average)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.average[k].copy_(v)


class EMA:
    """An exponential moving average of a model's weights (timm's ModelEmaV3, Keras' use_ema), updated on the
    device after every step; its buffers (BatchNorm statistics) are copied, not averaged."""

    def __init__(self, model: nn.Module, decay: float):
        import copy

        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - self.decay)
        mine = list(self.model.buffers())
        if mine:  # (a network without BatchNorm has none)
            torch._foreach_copy_(mine, list(model.buffers()))

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
