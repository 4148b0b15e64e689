"""The hook specifications of TorchRecord's plugin system (pluggy, project name ``torchrecord``).

A plugin is any module or object with functions marked ``@torchrecord.hookimpl``. The built-in
codecs and serializers are plugins too, registered through these same hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT_NAME = "torchrecord"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def torchrecord_register_codecs(register: Callable[[Any], None]) -> None:
    """Register codecs by calling ``register(codec)`` once for each codec instance."""


@hookspec
def torchrecord_register_serializers(register: Callable[[Any], None]) -> None:
    """Register serializers by calling ``register(serializer)`` once for each instance."""
