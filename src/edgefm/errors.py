"""The errors a user can fix on the deployed path: bad input, named with its file.

:mod:`edgefm.runtime` and :mod:`edgefm.images` raise these without importing PyTorch; the command
line prints any :class:`InputError` (and the training side's own input errors) in one line.
"""

from __future__ import annotations


class InputError(Exception):
    """A problem with something the user gave (a file, a folder, a name); the message names it."""


class ImageError(InputError, ValueError):
    """An image file that is missing or cannot be decoded."""


class BundleError(InputError, ValueError):
    """A bundle folder that is missing, incomplete or inconsistent (the message names the file)."""
