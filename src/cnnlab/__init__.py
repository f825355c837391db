"""cnnlab: train, evaluate, analyze and serve CNN image classifiers (CIFAR-10 and image folders).

The package's layers, top to bottom (README "Layout"; pyproject.toml's import contracts check them):
cli > budget > doctor > deploy | training > evaluation > presets > models | data > run > base modules.
"""

from cnnlab import logs as _logs

__version__ = "0.1.0"
_logs.setup()
