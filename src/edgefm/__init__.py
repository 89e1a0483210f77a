"""edgefm: take a masked-autoencoder Vision Transformer to an edge detector, measured.

The library behind the book *Foundation Models at the Edge*. Each stage is a function that reads a
typed config from :mod:`edgefm.config` and caches its result through :mod:`edgefm.artifacts`;
the same stages are ``edgefm`` subcommands (:mod:`edgefm.cli`).
"""

__version__ = "0.1.0"
