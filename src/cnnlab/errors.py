"""The one exception type users see: its message is printed as a single line by the CLI."""


class CnnlabError(Exception):
    """A problem the user can fix (bad path, bad data, bad flag). The CLI prints it and exits 2."""
