"""
The layering of egateway's packages, read from the source.

Every module under C{egateway/} is parsed with L{ast}; each import counts,
whether at the top, inside a function or under C{if TYPE_CHECKING:}, since
any of them ties the importer to the imported layer.  From those imports we
build the module graph and the package graph and hold them to the gateway's
layering:

    api  ->  kernels  ->  clusters, wire, store;  clusters  ->  wire
    ops  ->  kernels;  api  ->  ops
    every layer  ->  the leaves (config, errors, observe, names)
    tap, cli, validation (the assembly)  ->  everything

An import that breaks a rule names the importing module, the line and the
rule, so the failure says what to move.
"""

from __future__ import annotations

import ast
import os
from typing import Iterable, Mapping

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LEAVES = frozenset({"egateway", "egateway.config", "egateway.errors", "egateway.names", "egateway.observe"})
"""
Packages and modules every layer may use and that use no other part of the
gateway (C{egateway} itself only holds the version).
"""

ASSEMBLY = frozenset({"egateway.tap", "egateway.cli", "egateway.validation"})
"""
The modules that put the layers together: they may import anything, and
nothing below them imports them.
"""

FORBIDDEN: Mapping[str, frozenset[str]] = {
    "egateway.wire": frozenset({"egateway.clusters", "egateway.kernels", "egateway.api", "egateway.ops"}),
    "egateway.store": frozenset({"egateway.clusters", "egateway.kernels", "egateway.api", "egateway.ops"}),
    "egateway.clusters": frozenset({"egateway.kernels", "egateway.api", "egateway.ops"}),
    "egateway.kernels": frozenset({"egateway.api"}),
    "egateway.ops": frozenset({"egateway.api"}),
}
"""
For each layer, the layers above it, which it must not import.
"""

HELPERS = frozenset({"egateway.legacy_env"})
"""
Top-level modules that serve the assembly and use only the leaves.
"""


def module_files(top: str = "egateway") -> dict[str, str]:
    """
    Every module under C{top} (relative to the repository), by dotted
    name; a package is named by its C{__init__.py}.
    """
    modules = {}
    for directory, subdirectories, files in os.walk(os.path.join(ROOT, top)):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith((".", "_")))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            dotted = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
            if dotted.endswith(".__init__"):
                dotted = dotted[: -len(".__init__")]
            modules[dotted] = path
    return modules


def imports_of(name: str, path: str, known: Iterable[str]) -> dict[str, int]:
    """
    The egateway modules C{name} imports anywhere in its source, each with
    the line of its first import.  C{from package import submodule} counts
    as an import of the submodule; relative imports are resolved.
    """
    known = set(known)
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if target == "egateway" or target.startswith("egateway."):
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            found.setdefault(target, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in known else base, node.lineno)
    return found


def module_graph(top: str = "egateway") -> dict[str, dict[str, int]]:
    """
    Each module's imports of other modules (with their lines).
    """
    files = module_files(top)
    known = set(files) | set(module_files("egateway"))
    return {name: {t: n for t, n in imports_of(name, path, known).items() if t != name} for name, path in files.items()}


def layer_of(module: str) -> str:
    """
    The package (C{egateway.api}) or top-level module (C{egateway.tap})
    a module belongs to.
    """
    return ".".join(module.split(".")[:2])


def package_graph(graph: Mapping[str, Mapping[str, int]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = packages.setdefault(layer_of(module), set())
        edges.update(layer_of(t) for t in targets if layer_of(t) != layer_of(module))
    return packages


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """
    One cycle of C{graph} as the path around it (first node repeated at
    the end), or C{None}.
    """
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = [start]
        on_path = {start}
        stack = [iter(sorted(graph.get(start, ())))]
        while stack:
            following = next(stack[-1], None)
            if following is None:
                stack.pop()
                done.add(path[-1])
                on_path.discard(path.pop())
                continue
            if following in on_path:
                return path[path.index(following) :] + [following]
            if following in done:
                continue
            path.append(following)
            on_path.add(following)
            stack.append(iter(sorted(graph.get(following, ()))))
    return None


def violations(graph: Mapping[str, Mapping[str, int]]) -> list[str]:
    """
    Every import that breaks a layer rule, as C{module:line imports target
    (why)}.
    """
    found = []
    for module, targets in sorted(graph.items()):
        layer = layer_of(module)
        for target, line in sorted(targets.items()):
            above = layer_of(target)
            if above == layer:
                continue
            why = ""
            if above in ASSEMBLY:
                why = "only the assembly imports the assembly"
            elif layer in LEAVES or layer in HELPERS:
                if above not in LEAVES:
                    why = f"{layer} is a leaf: it imports only other leaves"
            elif above in FORBIDDEN.get(layer, ()):
                why = f"{layer} is below {above}"
            if why and layer not in ASSEMBLY:
                found.append(f"{module}:{line} imports {target} ({why})")
    return found


class LayerTests(SynchronousTestCase):
    """
    The import graph of the gateway's modules.
    """

    def setUp(self) -> None:
        self.graph = module_graph()

    def test_graph_is_read(self) -> None:
        """
        The parser finds the modules and their imports, those inside
        functions and under C{if TYPE_CHECKING:} included.
        """
        self.assertIn("egateway.kernels.manager", self.graph)
        self.assertIn("egateway.config", self.graph)
        self.assertIn("egateway.kernels.manager", self.graph["egateway.tap"])
        source = (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from egateway.api import http\n"
            "def f():\n    from ..kernels.kernel import Kernel\n    import egateway.wire.zmq\n"
        )
        path = os.path.join(self.mktemp() + ".py")
        with open(path, "w") as f:
            f.write(source)
        known = set(module_files())
        self.assertEqual(
            set(imports_of("egateway.ops.example", path, known)),
            {"egateway.api.http", "egateway.kernels.kernel", "egateway.wire.zmq"},
        )

    def test_no_module_cycle(self) -> None:
        """
        No module imports itself through others: every module can be
        understood (and imported) after the ones it uses.
        """
        cycle = find_cycle(self.graph)
        self.assertIsNone(cycle, f"import cycle between modules: {' -> '.join(cycle or [])}")

    def test_no_package_cycle(self) -> None:
        """
        No layer imports itself through others.
        """
        cycle = find_cycle(package_graph(self.graph))
        self.assertIsNone(cycle, f"import cycle between packages: {' -> '.join(cycle or [])}")

    def test_layer_rules(self) -> None:
        """
        Every import goes down the layers (or to a leaf); config, errors,
        observe and names import no other part of the gateway.
        """
        found = violations(self.graph)
        self.assertEqual(found, [], "imports against the layering:\n" + "\n".join(found))

    def test_cycle_and_rule_detection(self) -> None:
        """
        The checks find what they are for: a cycle, with its path, and an
        upward import, with its line.
        """
        self.assertEqual(find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}), ["a", "b", "c", "a"])
        self.assertIsNone(find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}))
        graph = {
            "egateway.config.schema": {"egateway.clusters.slurm": 12},
            "egateway.clusters.ssh": {"egateway.kernels.env": 3, "egateway.names": 4},
            "egateway.kernels.manager": {"egateway.tap": 7},
            "egateway.tap": {"egateway.api.http": 1},
        }
        self.assertEqual(
            violations(graph),
            [
                "egateway.clusters.ssh:3 imports egateway.kernels.env (egateway.clusters is below egateway.kernels)",
                "egateway.config.schema:12 imports egateway.clusters.slurm "
                "(egateway.config is a leaf: it imports only other leaves)",
                "egateway.kernels.manager:7 imports egateway.tap (only the assembly imports the assembly)",
            ],
        )

    def test_twisted_plugin(self) -> None:
        """
        The twistd plugin names the assembly and imports nothing else of
        the gateway (twistd imports every plugin to list them).
        """
        plugins = module_graph("twisted")
        self.assertTrue(plugins)
        for module, targets in plugins.items():
            self.assertLessEqual(set(targets), {"egateway.tap"}, module)
