"""The data layer: every layout and format read into one `Dataset`, and the batches training draws from it.

    sources, cifar, idx, folders   where images come from (CIFAR archives, IDX files, folders, CSVs)
    images                         one file decoded to pixels (every format, EXIF turns, resizing)
    cache                          decoded pixels kept on disk, memory-mapped, so sets larger than memory train
    cachedir, integrity            the cache folder kept in order (one builder, locks); entries checked on open
    description                    `data info` in words, from a cache entry's meta.json
    check, check_page              `data check`: copies, leaks, conflicts, odd files; its page of thumbnails
    dataset                        `Dataset`, `Normalization`, `load`: what the layers above use
    augment, mix                   random changes of a batch (flips, crops, RandAugment; MixUp/CutMix)
    loader                         `Batches`: an epoch's finished, sharded, augmented batches

It imports only the base modules (config, errors, files, hardware, dist) and nothing of models, training
or evaluation: a data set never depends on what trains on it. The names below are this layer's API;
they are read from dataset.py on first use, so that `images` or `folders` alone (the ONNX prediction path)
never import PyTorch.
"""

API = ("Dataset", "Normalization", "cache_dir", "class_weights", "detect_format", "info", "load", "load_dataset",
       "resolve_path", "stratified_pick")


def __getattr__(name: str):
    if name in API:
        from cnnlab.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'cnnlab.data' has no attribute {name!r}")
