"""The project's errors: one base class, so the command line can turn every mistake a user can fix into one line.

`dalle-jax` catches `DalleJaxError` (and only it, besides a few OS errors about paths), prints `error: <message>`
and exits 2. A message names the field, file or flag that is wrong and says how to fix it. Anything else is a bug
and keeps its traceback.

The specific classes also derive from `ValueError` where callers and tests have always caught that.
"""

from __future__ import annotations


class DalleJaxError(Exception):
    """A mistake the user can fix; the message names the field/file and the fix."""


class ConfigError(DalleJaxError, ValueError):
    """A config value is wrong; the message names the field (`section.field`) and the allowed values."""


class ShardingError(DalleJaxError, ValueError):
    """A mesh, batch or array shape does not fit; the message carries the numbers."""


class DatasetError(DalleJaxError, ValueError):
    """A dataset directory is missing, empty or not what a stage reads; the message says how to build one."""


class InputError(DalleJaxError, ValueError):
    """A command-line input (prompt, image, file, directory, flag combination) that cannot be used."""
