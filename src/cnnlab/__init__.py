"""cnnlab: train, evaluate, analyze and serve CNN image classifiers (CIFAR-10 and image folders)."""

__version__ = "0.1.0"
