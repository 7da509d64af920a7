"""The argument parser of every `codis-*` command: a bad argument is one line on stderr and exit status 2.

argparse prints its usage block and then the error (two lines or more); the project promises one line
for every input error, naming the argument, so every command builds its parser from `OneLineParser`:

    codis-eval: error: argument --k: invalid int value: 'abc' (see codis-eval --help)

Standard library only: the commands parse their arguments before importing torch.
"""
from __future__ import annotations

import argparse

__all__ = ["OneLineParser"]


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2), like every other input error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")
