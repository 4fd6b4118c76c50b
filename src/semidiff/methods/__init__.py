"""Training methods, created by name from the registry."""

from semidiff.methods.base import (
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

# Importing a method module registers it.
from semidiff.methods import supervised  # noqa: E402,F401
from semidiff.methods import bcp, cps, mean_teacher, ua_mt  # noqa: E402,F401
from semidiff.methods import protodiff  # noqa: E402,F401
from semidiff.methods import diffcl  # noqa: E402,F401

__all__ = [
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
