"""The errors a user can fix: bad input, named with its file, value or record.

Every such error derives from :class:`InputError`, which the command line prints in one line
(exit status 2) instead of a traceback. Nothing here imports PyTorch: the deployed path
(:mod:`edgefm.runtime`, :mod:`edgefm.runtime.images`) raises these too.
"""

from __future__ import annotations


class InputError(Exception):
    """A problem with something the user gave (a file, a folder, a name); the message names it."""


class DatasetError(InputError, ValueError):
    """A COCO dataset is malformed; the message names the file and the record."""


class ImageError(DatasetError):
    """An image file that is missing or cannot be decoded."""


class BundleError(InputError, ValueError):
    """A bundle folder that is missing, incomplete or inconsistent (the message names the file)."""
