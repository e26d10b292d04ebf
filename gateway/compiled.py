"""The request path compiled to C with mypyc, and the guard against a stale build.

The modules in ``MODULES`` are what every request runs through. ``setup.py`` compiles
them with mypyc (the compiler that ships with mypy: the code is typed for
``mypy --strict`` already, and a compiled module keeps the same source, behaviour and
tests). Compiled, a small proxied request costs about a third less CPU
(docs/performance.md); ``GATEWAY_PURE_PYTHON=1`` at install time builds without it.

An editable install (``pip install -e .``) puts the compiled modules beside their
sources, and Python imports a compiled module before its ``.py``: after an edit or a
checkout, the old build would run silently. ``refuse_stale_build`` (called when the
package is imported) compares each compiled module's source with the digest recorded
when it was built, and stops with an error naming the fix.

Rules for the compiled modules, each from a difference between mypyc and CPython
(tests/unit/test_compiled.py checks the first, tests/unit/test_accesslog.py the second
where it bit):

- No ``await`` (or ``async with``/``async for``) inside an ``except`` or ``finally``
  block: a compiled coroutine that suspends there can raise the handled exception
  again when it resumes, or lose the one in flight (https://github.com/mypyc/mypyc/issues/1114,
  https://github.com/mypyc/mypyc/issues/1177). Handle, then await after the block.
- A parameter typed ``float`` turns an ``int`` into a float (``3000`` arrives as
  ``3000.0``): type what may be either as ``int | float``.
- A dataclass keeps the ``__init__`` the dataclasses module generates, which runs
  interpreted (measured: 212 ns against 36 ns compiled, for two fields): a class built
  per request is a plain class with its own ``__init__``.
- A format spec in an f-string (``f"{n:03d}"``) is a generic format call, several times
  slower than a table lookup or ``str()`` (``accesslog._THREE_DIGITS``).
- Bytes formatting of bytes and ints only (``b"%b: %d" % (name, n)``) is one C call that
  copies the parts (``exchange.Exchange.response_head``); an f-string of the same parts
  builds a str to encode. Check the generated C for ``CPyBytes_Build``: any other operand
  makes it a generic ``%``.
- On bytes, ``startswith``, ``endswith``, ``translate``, slicing and indexing are C calls;
  ``find``, ``isascii`` and ``isprintable`` are generic method calls, and ``find`` parses
  its arguments from a tuple on Python 3.11 (``front._plain_line``).
- A module-level name the request path reads is ``Final`` (``exchange._DONE``,
  ``front.MAX_HEAD_BYTES``): otherwise every use is a lookup in the module's dict, and a
  function from another module (``time.monotonic``) an attribute lookup per call.
- An interface the request path calls through is a mypyc ``@trait`` the implementation
  subclasses (``exchange.Client``, ``upstream.ResponseConsumer``), not a
  ``typing.Protocol``: through a protocol every call is a generic method call. Calling an
  instance (``__call__``) is generic too: give it a method (``headers._RandomIds.next``).

Pure: standard library only, so ``setup.py`` can read ``MODULES`` before anything is
installed.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
from pathlib import Path

MODULES = (
    "gateway.accesslog",
    "gateway.headers",
    "gateway.hostnames",
    "gateway.listener",
    "gateway.metrics",
    "gateway.missbudget",
    "gateway.proxy.accounting",
    "gateway.proxy.connlimit",
    "gateway.proxy.exchange",
    "gateway.proxy.front",
    "gateway.proxy.handler",
    "gateway.proxy.http",
    "gateway.proxy.sessions",
    "gateway.proxy.upstream",
    "gateway.proxy.wsframes",
    "gateway.proxy.wssplice",
    "gateway.routing.cache",
    "gateway.routing.model",
)

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# Written by setup.py beside this file: each compiled module's source digest at build
# time. File times can't tell: a rebuild of unchanged C code keeps the old ones.
MANIFEST = "compiled-sources.json"


class StaleBuildError(ImportError):
    """A compiled module was built from another version of its source."""


def source_files() -> list[str]:
    """The sources of ``MODULES``, relative to the repository root (for mypycify)."""
    return [_path(module) + ".py" for module in MODULES]


def _path(module: str) -> str:
    """``gateway.proxy.front`` -> ``gateway/proxy/front``: a module's file, no suffix."""
    return module.replace(".", "/")


def compiled_files(module: str, root: Path = _PACKAGE_ROOT) -> list[Path]:
    """The extension files of ``module`` beside its source under ``root`` (none in a
    pure build)."""
    base = root / _path(module)
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    return [path for suffix in suffixes if (path := base.with_name(base.name + suffix)).exists()]


def is_compiled(module: str) -> bool:
    """Whether ``module`` would be imported from a compiled extension."""
    return bool(compiled_files(module))


def describe_build() -> str:
    """How this installation runs the request path, in words (for reports and logs)."""
    built = sum(map(is_compiled, MODULES))
    if built == len(MODULES):
        return "request path compiled (mypyc)"
    if not built:
        return "pure Python (request path not compiled)"
    return f"{built} of {len(MODULES)} request-path modules compiled"


def source_digest(module: str, root: Path = _PACKAGE_ROOT) -> str:
    """The SHA-256 of ``module``'s source under ``root``."""
    source = root / (_path(module) + ".py")
    return hashlib.sha256(source.read_bytes()).hexdigest()


def write_manifest(root: Path = _PACKAGE_ROOT) -> None:
    """Record the digest of every source about to be compiled (setup.py's call)."""
    digests = {module: source_digest(module, root) for module in MODULES}
    (root / "gateway" / MANIFEST).write_text(json.dumps(digests, indent=1) + "\n")


def stale_modules(root: Path = _PACKAGE_ROOT) -> list[str]:
    """Compiled modules whose source is not the one they were built from."""
    try:
        built_from = json.loads((root / "gateway" / MANIFEST).read_text())
    except (OSError, ValueError):
        built_from = {}  # no record of the build: every compiled module is suspect
    return [
        module
        for module in MODULES
        if compiled_files(module, root) and built_from.get(module) != source_digest(module, root)
    ]


def refuse_stale_build() -> None:
    """Raise ``StaleBuildError`` if a compiled module would hide a changed source."""
    raise_if_stale(stale_modules())


def raise_if_stale(stale: list[str]) -> None:
    """Raise ``StaleBuildError`` naming ``stale`` (if any) and the two ways out.

    Raises:
        StaleBuildError: ``stale`` is not empty.
    """
    if stale:
        raise StaleBuildError(
            f"compiled {', '.join(stale)}: built from another version of the source; "
            f"rebuild with `pip install -e .` (or `python setup.py build_ext --inplace`), "
            f"or delete the compiled files (`bash scripts/pure`) to run the sources as "
            f"they are"
        )
