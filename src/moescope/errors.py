"""Errors moescope raises, each saying what to do next."""

from __future__ import annotations


class UnsupportedModelError(ValueError):
    """No registered adapter recognised any MoE layer in the model.

    Raised by ``MoEMonitor``; the message names the adapter protocol
    (``moescope.capture.adapter.MoEAdapter``) and ``docs/custom_adapter.md``.
    """
