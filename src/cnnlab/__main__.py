"""`python -m cnnlab`: the same as the `cnnlab` command."""

from cnnlab.cli import entry

entry()
