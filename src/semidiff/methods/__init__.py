"""Training methods, created by name from the registry.

Importing this package imports every module in it, so each method registers itself
(:func:`register_method`): a new method is one new file here, and nothing lists it.
"""

from semidiff.methods.base import (
    METHODS,
    Method,
    MethodOptions,
    NetSpec,
    Progress,
    create_method,
    list_methods,
    method_class,
    method_options,
    register_method,
)
from semidiff.registry import import_submodules

__all__ = [
    "METHODS",
    "Method",
    "MethodOptions",
    "NetSpec",
    "Progress",
    "create_method",
    "list_methods",
    "method_class",
    "method_options",
    "register_method",
]

import_submodules(__name__, __path__)
