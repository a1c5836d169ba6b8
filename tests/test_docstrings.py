"""Every public class and function documents itself: what it does, each argument, what it returns and raises,
and a short example.

Why: the API reference (``docs/api/``) is generated from these docstrings, so an undocumented argument or a
missing example is a hole in the documentation users read. The check parses each docstring the way the site
does (griffe, Google style) and compares its sections with the real signature, so a renamed or new argument
that the docstring does not follow fails here. The public names are the ``__all__`` of the modules the API
reference covers (``tests/test_docs_site.py``).
"""

from __future__ import annotations

import dataclasses
import doctest
import enum
import importlib
import inspect
import logging
import re
import textwrap
import typing

import pytest

griffe = pytest.importorskip("griffe", reason="griffe (installed with mkdocstrings-python) parses the docstrings")

MODULES = (
    "deqlab",
    "deqlab.nn",
    "deqlab.solvers",
    "deqlab.state",
    "deqlab.instrument",
    "deqlab.lightning",
    "deqlab.data",
    "deqlab.zoo",
    "deqlab.models",
)

logging.getLogger("griffe").setLevel(logging.ERROR)  # griffe warns about missing types; annotations hold them


def _public(module_name: str) -> list[tuple[str, object]]:
    module = importlib.import_module(module_name)
    return [(name, getattr(module, name)) for name in module.__all__]


def _documented_object(obj: object) -> bool:
    return inspect.isclass(obj) or inspect.isfunction(obj)


def _docstring(obj: object) -> str:
    """The text the site shows: the class docstring with ``__init__``'s merged in (``merge_init_into_class``)."""
    parts = (
        [inspect.cleandoc(obj.__dict__["__doc__"])]
        if inspect.isclass(obj) and obj.__dict__.get("__doc__")
        else ([inspect.cleandoc(obj.__doc__)] if not inspect.isclass(obj) and obj.__doc__ else [])
    )
    init = obj.__dict__.get("__init__") if inspect.isclass(obj) else None
    if init is not None and getattr(init, "__doc__", None):
        parts.append(inspect.cleandoc(init.__doc__))
    return "\n\n".join(parts)


def _sections(text: str) -> list:
    return griffe.Docstring(text, parser="google").parse()


def _parameters(obj: object) -> list[inspect.Parameter]:
    """The arguments a user passes: ``__init__``'s for a class (not ``self``), none for protocols and enums."""
    if inspect.isclass(obj):
        if issubclass(obj, (BaseException, enum.Enum)) or getattr(obj, "_is_protocol", False):
            return []
        if (
            "__init__" not in obj.__dict__
            and not dataclasses.is_dataclass(obj)
            and not any(b for b in obj.__mro__[1:] if b.__module__.startswith("deqlab") and "__init__" in b.__dict__)
        ):
            return []
        target = obj.__init__
    else:
        target = obj
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    params = list(signature.parameters.values())
    if inspect.isclass(obj) and params and params[0].name == "self":
        params = params[1:]
    return params


def _param_doc_name(p: inspect.Parameter) -> set[str]:
    if p.kind is inspect.Parameter.VAR_POSITIONAL:
        return {p.name, f"*{p.name}"}
    if p.kind is inspect.Parameter.VAR_KEYWORD:
        return {p.name, f"**{p.name}"}
    return {p.name}


def _raises_itself(obj: object) -> bool:
    """Whether the function (or the class's ``__init__``) has a ``raise`` statement of its own."""
    target = obj.__dict__.get("__init__") if inspect.isclass(obj) else obj
    if target is None:
        return False
    try:
        source = textwrap.dedent(inspect.getsource(target))
    except (OSError, TypeError):
        return False
    body = re.sub(r'(?s)""".*?"""', "", source)
    return re.search(r"^\s*raise\s+\w", body, re.MULTILINE) is not None


def _returns_something(obj: object) -> bool:
    if inspect.isclass(obj):
        return False
    try:
        hints = typing.get_type_hints(obj)
    except Exception:
        hints = getattr(obj, "__annotations__", {})
    ret = hints.get("return", inspect.Signature.empty)
    return ret is not type(None) and ret is not None and ret is not typing.NoReturn


def problems_of(name: str, obj: object) -> list[str]:
    text = _docstring(obj)
    if not text.strip():
        return [f"{name}: no docstring"]
    sections = _sections(text)
    kinds = {s.kind.value for s in sections}
    found: list[str] = []
    documented: list[str] = []
    for s in sections:
        if s.kind.value in ("parameters", "other parameters"):
            documented += [p.name for p in s.value]
        if s.kind.value == "attributes" and dataclasses.is_dataclass(obj):
            documented += [a.name for a in s.value]
    for d in documented:
        if "," in d or " " in d.strip():
            found.append(f"{name}: document each argument on its own line, not {d!r}")
    params = _parameters(obj)
    known = set().union(*(_param_doc_name(p) for p in params)) if params else set()
    for p in params:
        if not (_param_doc_name(p) & set(documented)):
            found.append(f"{name}: argument {p.name!r} is not in its Args section")
    for d in documented:
        if "," not in d and d.lstrip("*") not in {k.lstrip("*") for k in known} and not dataclasses.is_dataclass(obj):
            found.append(f"{name}: documents {d!r}, which is not an argument")
    if _returns_something(obj) and "returns" not in kinds and "yields" not in kinds:
        found.append(f"{name}: no Returns section")
    if _raises_itself(obj) and "raises" not in kinds:
        found.append(f"{name}: raises, but has no Raises section")
    has_example = "examples" in kinds or any(
        s.kind.value == "admonition" and s.title and s.title.lower().startswith("example") for s in sections
    )
    if not has_example:
        found.append(f"{name}: no Example section")
    return found


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_documents_its_arguments_returns_raises_and_an_example(module_name):
    problems = []
    for name, obj in _public(module_name):
        if _documented_object(obj) and getattr(obj, "__module__", "").startswith("deqlab"):
            problems += problems_of(f"{module_name}.{name}", obj)
    assert not problems, f"{len(problems)} docstring problems:\n" + "\n".join(problems)


def _examples_of(module_name: str):
    finder, seen = doctest.DocTestFinder(recurse=False), set()
    for name, obj in _public(module_name):
        if not (_documented_object(obj) and getattr(obj, "__module__", "").startswith("deqlab")) or id(obj) in seen:
            continue
        seen.add(id(obj))
        targets = [obj] + ([obj.__dict__["__init__"]] if inspect.isclass(obj) and "__init__" in obj.__dict__ else [])
        for target in targets:
            for test in finder.find(target, f"{module_name}.{name}", globs={}):
                if test.examples:
                    yield test


@pytest.mark.parametrize("module_name", MODULES[1:])  # deqlab re-exports the others' objects
def test_docstring_examples_run(module_name):
    """The examples are doctests: they run here, so an example that no longer works fails CI."""
    import torch

    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures = []
    for test in _examples_of(module_name):
        torch.manual_seed(0)
        out: list[str] = []
        result = runner.run(test, out=out.append, clear_globs=True)
        if result.failed:
            failures.append(f"{test.name}:\n" + "".join(out)[-2000:])
    assert not failures, "\n".join(failures)


# The checker itself: each rule fires on a docstring that breaks it, and a complete docstring passes.


def _complete(a: int, b: int = 2) -> int:
    """Add.

    Args:
        a: first.
        b: second.

    Returns:
        The sum.

    Raises:
        ValueError: never, here.

    Example:
        >>> _complete(1)
        3
    """
    if a is None:
        raise ValueError("a")
    return a + b


def _grouped(a: int, b: int) -> int:
    """Add.

    Args:
        a, b: the numbers.

    Returns:
        The sum.

    Example:
        >>> _grouped(1, 2)
    """
    return a + b


def _bare(a: int) -> int:
    """Add one."""
    if a < 0:
        raise ValueError("negative")
    return a + 1


def test_the_checker_accepts_a_complete_docstring_and_names_each_missing_part():
    assert problems_of("c", _complete) == []
    assert any("on its own line" in p for p in problems_of("g", _grouped))
    bare = problems_of("b", _bare)
    assert any("'a' is not in its Args" in p for p in bare)
    assert any("no Returns" in p for p in bare) and any("no Raises" in p for p in bare)
    assert any("no Example" in p for p in bare)
