"""The converter's error, in a module of its own: every part of the converter raises it, and
none has to import the package (``convert/__init__.py``, which imports them all) to do so."""

from __future__ import annotations


class ConversionError(RuntimeError):
    """The source cannot be converted; the message names the file or the reason."""
