"""Inference engines behind one small interface; they know nothing of scales or fusion."""

from inference.backends.base import Backend, BackendUnavailable

__all__ = ["Backend", "BackendUnavailable"]
