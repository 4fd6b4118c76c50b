"""Training methods, created by name from the registry."""

# Importing a method module registers it.
from semidiff.methods import (  # noqa: F401
    bcp,
    cps,
    diffcl,
    mean_teacher,
    protodiff,
    supervised,
    ua_mt,
)
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
