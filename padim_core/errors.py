"""The project's own errors: one base, so a caller can tell them from bugs.

Every error raised on purpose (a bad config, image, model file, dataset, output folder...) is a
`PadimError` whose message names the bad value and what would be accepted. Job drivers catch
`PadimError`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PadimError(Exception):
    """Base of every error padim raises on purpose."""


class ConfigError(PadimError):
    """A config file, override or value that cannot be used."""


class DatasetError(PadimError):
    """A dataset folder or split manifest that is missing or does not have the expected layout."""


class ImageDecodeError(PadimError):
    """An image source that cannot be decoded; the message names the source and the reason."""


class BackboneError(PadimError):
    """A backbone name, layer name or weight file that cannot be used."""


class ModelFileError(PadimError):
    """A file that is not a usable padim model."""
