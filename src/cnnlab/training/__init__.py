"""The training layer: a run trained, resumed, extended, from a configuration and a data set.

    lifecycle   `train` and `resume`: the run's life, from the preflight to its report (the API)
    preflight   every check that needs no data, resolved once into a `Plan`
    build       the state a run starts from: model, optimizer, schedule, data on the device
    loop        `fit(state, batches, hooks)`: the one training loop, and the `Hook` events it calls
    step        `Step`: forward, backward, update for one batch (also what `cnnlab doctor` times)
    hooks       what extends the loop: validation and history, checkpoints, best weights and early
                stopping, progress, trackers, Ctrl-C
    state, optim, finetune, batchnorm   what a step updates, how, and which parts
    probe, lrfind                       the head-only probe and the learning-rate finder, on the same loop
    threads, tracking                   the busy-machine governor; TensorBoard and MLflow

It stands on evaluation (validation, the run's end), models, data and the run directory (run.py).
"""

from cnnlab.training.lifecycle import load_data, resume, train  # noqa: F401
