"""The one registry style behind methods, dataset readers and networks."""

from __future__ import annotations

import sys

import pytest

from semidiff.data import READERS, create_reader, list_readers
from semidiff.errors import ConfigError
from semidiff.methods import METHODS, list_methods, method_class
from semidiff.nets import NETS, list_nets
from semidiff.registry import Registry, import_submodules


def test_register_lookup_names_and_mapping_reads():
    things: Registry[type] = Registry("thing", config_key="thing.name")

    @things.register("b")
    class B: ...

    @things.register("a")
    class A: ...

    assert things.lookup("a") is A and things["b"] is B
    assert things.names() == ["a", "b"] and list(things) == ["b", "a"]  # sorted / registration order
    assert "a" in things and "c" not in things and len(things) == 2
    assert things.get("c") is None  # Mapping semantics for optional reads
    with pytest.raises(KeyError):
        things["c"]
    with pytest.raises(ConfigError, match=r"^thing.name: unknown thing 'c'; known: a, b$"):
        things.lookup("c")
    with pytest.raises(ConfigError, match="unknown thing"):
        things.lookup(["unhashable"])  # type: ignore[arg-type]
    things.unregister("a")
    assert things.names() == ["b"]


def test_a_name_taken_by_another_object_is_refused_but_a_reload_is_not():
    things: Registry[object] = Registry("thing")

    def make():  # the same qualified name each time, like a module executed again
        def factory(): ...
        return factory

    first, again = make(), make()
    things.add("x", first)
    things.add("x", again)  # a reload replaces the entry
    assert things["x"] is again

    def other(): ...

    with pytest.raises(ValueError, match="'x' is already registered by .*make.<locals>.factory"):
        things.add("x", other)
    with pytest.raises(ValueError, match="non-empty name"):
        things.add("", other)


def test_import_submodules_registers_what_a_new_file_defines(tmp_path, monkeypatch):
    """A package whose __init__ calls import_submodules picks up a file nobody imports by name."""
    package = tmp_path / "toy_plugins"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from semidiff.registry import Registry, import_submodules\n"
        "THINGS = Registry('thing')\n"
        "import_submodules(__name__, __path__)\n")
    (package / "newly_added.py").write_text(
        "from toy_plugins import THINGS\n\n@THINGS.register('new')\nclass New: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import toy_plugins

        assert toy_plugins.THINGS.names() == ["new"]
    finally:
        for name in [m for m in sys.modules if m.startswith("toy_plugins")]:
            del sys.modules[name]
    import_submodules("semidiff.methods", [])  # nothing to import: no error


@pytest.mark.parametrize(("registry", "listing"), [(METHODS, list_methods), (READERS, list_readers),
                                                   (NETS, list_nets)])
def test_public_functions_read_the_registries(registry, listing):
    assert isinstance(registry, Registry)
    assert listing() == registry.names() and listing()


def test_unknown_names_are_config_errors_that_list_the_registry():
    with pytest.raises(ConfigError, match="^method.name: unknown method 'nope'") as info:
        method_class("nope")
    assert all(name in str(info.value) for name in list_methods())
    with pytest.raises(ConfigError, match="unknown dataset reader 'nope'"):
        create_reader("nope", ".")


def test_register_method_refuses_what_is_not_a_method():
    from semidiff.methods import register_method

    with pytest.raises(TypeError, match="Method subclass"):
        register_method("not_a_method")(object)  # type: ignore[arg-type]
    assert "not_a_method" not in list_methods()


def test_semidiff_list_prints_every_registry(capsys):
    from semidiff.cli import main

    assert main(["list"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["methods"].split(", ") == list_methods()
    assert lines["networks"].split(", ") == list_nets()
    assert lines["readers"].split(", ") == list_readers()
