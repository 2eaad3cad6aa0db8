"""The import layering of msfp_jax, read from the source with `ast`: every import, at module level, inside a
function or under `if TYPE_CHECKING:`, `import x` and `from x import y`, relative imports resolved.

A unit is a subpackage or a top-level module of msfp_jax; a unit imports its own modules freely, and otherwise
only the units ALLOWED lists for it:

  utilities        checkpoint, cli, config_record, guards, metrics, parallel, plotting, torch_pickle: each other
  configs          the ml_collections files: utilities
  data, quant, models, diffusion: utilities only (none knows the others: models know nothing of quantization
                   or of noise schedules, the converters record a schedule as data)
  lora             + quant (it plugs into quant's interceptor)
  evaluation       + models (the Inception network), diffusion and data (the digits score samples a model)
  train            + quant, lora, models, diffusion, data, evaluation
  run, stage_inputs, validate: the orchestration, + every library layer and configs (only run is imported by
                   the commands)
  the commands     main, train_fp, score_fp, fid, convert, diagnostics, bench: + run; nothing imports them.

Also: no import cycle between units, nor between modules (a function-level import that closes a cycle only
hides it), and no import of a msfp_jax module that does not exist. A module of a unit not listed here fails
the test: every new unit is given its place in the layering when it is added.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import pathlib
from collections.abc import Iterable, Mapping

PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1] / "msfp_jax"

UTILITIES = frozenset({"checkpoint", "cli", "config_record", "guards", "metrics", "parallel", "plotting",
                       "torch_pickle"})
LIBRARIES = frozenset({"data", "quant", "models", "diffusion", "lora", "evaluation", "train"})
ORCHESTRATION = frozenset({"run", "stage_inputs", "validate"})
COMMANDS = frozenset({"main", "train_fp", "score_fp", "fid", "convert", "diagnostics", "bench"})
ROOT = "<msfp_jax/__init__.py>"

ALLOWED: Mapping[str, frozenset[str]] = {
    ROOT: frozenset(),  # `import msfp_jax` stays free
    **{unit: UTILITIES for unit in UTILITIES},
    "configs": UTILITIES,
    "data": UTILITIES,
    "quant": UTILITIES,
    "models": UTILITIES,
    "diffusion": UTILITIES,
    "lora": UTILITIES | {"quant"},
    "evaluation": UTILITIES | {"models", "diffusion", "data"},
    "train": UTILITIES | {"quant", "lora", "models", "diffusion", "data", "evaluation"},
    **{unit: UTILITIES | LIBRARIES | {"configs", "stage_inputs", "validate"} for unit in ORCHESTRATION},
    **{unit: UTILITIES | LIBRARIES | ORCHESTRATION | {"configs"} for unit in COMMANDS},
}

# TEMPORARY: arrows against the layering in files that are being rewritten (msfp_jax/run/, main.py, train/,
# the former stages.py / ablation.py); each is "importer unit -> imported unit". Empty it as they are fixed: an
# entry that no longer occurs fails the test too, so the set cannot outlive its arrows.
TEMPORARY_EXPECTED_VIOLATIONS: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class Import:
  """One imported msfp_jax module, as the source names it."""

  path: pathlib.Path  # the importing file
  line: int
  importer: str  # dotted module name of the importing file
  named: str  # the dotted name the import statement gives
  imported: str  # the module imported: the longest prefix of `named` that exists in the tree
  in_function: bool  # inside a def (hidden from a reader of the module's top)

  @property
  def exists(self) -> bool:
    return self.named == self.imported

  def where(self, root: pathlib.Path) -> str:
    level = "function-level " if self.in_function else ""
    return f"{self.path.relative_to(root.parent)}:{self.line}: {level}import of {self.imported}"


def module_names(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py under package_dir (a package's name is its __init__.py)."""
  names = {}
  for path in sorted(package_dir.rglob("*.py")):
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    names[".".join(parts)] = path
  return names


def _nodes_with_function_depth(tree: ast.AST):
  """(node, inside a function) for every node, in source order."""
  stack = [(tree, False)]
  while stack:
    node, in_function = stack.pop()
    yield node, in_function
    inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    stack.extend((child, inner) for child in reversed(list(ast.iter_child_nodes(node))))


def read_imports(package_dir: pathlib.Path) -> list[Import]:
  """Every import of a module of the package by a module of the package, function-level ones included.

  `importlib.import_module("msfp_jax.x")` with a constant name counts as an import of msfp_jax.x.
  """
  package = package_dir.name
  modules = module_names(package_dir)

  def existing_prefix(name: str) -> str:
    parts = name.split(".")
    return next((".".join(parts[:end]) for end in range(len(parts), 0, -1) if ".".join(parts[:end]) in modules),
                package)

  imports = []
  for importer, path in modules.items():
    current_package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    for node, in_function in _nodes_with_function_depth(ast.parse(path.read_text(), str(path))):
      named: list[str] = []
      if isinstance(node, ast.Import):
        named = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          base_parts = current_package.split(".")[:len(current_package.split(".")) - node.level + 1]
          base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
          base = node.module or ""
        # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg.
        named = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
      elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        named = [node.args[0].value]
      for name in dict.fromkeys(named):  # `from pkg.m import a, b` is one import of pkg.m
        if name == package or name.startswith(package + "."):
          imports.append(Import(path=path, line=node.lineno, importer=importer, named=name,
                                imported=existing_prefix(name), in_function=in_function))
  return imports


def unit_of(module: str) -> str:
  """'msfp_jax.quant.config' -> 'quant', 'msfp_jax.main' -> 'main', 'msfp_jax' -> ROOT."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ROOT


def _cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one node (Tarjan), each sorted."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found = []

  def visit(node: str) -> None:
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for other in sorted(edges.get(node, ())):
      if other not in index:
        visit(other)
        low[node] = min(low[node], low[other])
      elif other in on_stack:
        low[node] = min(low[node], index[other])
    if low[node] == index[node]:
      component = []
      while True:
        other = stack.pop()
        on_stack.discard(other)
        component.append(other)
        if other == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for node in sorted(edges):
    if node not in index:
      visit(node)
  return found


def _describe_cycle(component: list[str], arrows: Mapping[tuple[str, str], list[Import]],
                    root: pathlib.Path) -> str:
  members = set(component)
  lines = [f"import cycle between {', '.join(component)}:"]
  for (a, b), where in sorted(arrows.items()):
    if a in members and b in members:
      lines.append(f"  {a} -> {b}: {where[0].where(root)}" + (f" (+{len(where) - 1} more)" if len(where) > 1 else ""))
  return "\n".join(lines)


def find_violations(package_dir: pathlib.Path, allowed: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
  """Arrow ("importer unit -> imported unit", or a cycle / missing-module key) -> messages naming file and line."""
  imports = read_imports(package_dir)
  violations: dict[str, list[str]] = collections.defaultdict(list)
  for unit in sorted({unit_of(m) for m in module_names(package_dir)} - set(allowed)):
    violations[f"unit {unit}"].append(f"{unit} is in no layer: give it its place in ALLOWED (tests/test_layering.py)")
  unit_arrows: dict[tuple[str, str], list[Import]] = collections.defaultdict(list)
  module_arrows: dict[tuple[str, str], list[Import]] = collections.defaultdict(list)
  for imp in imports:
    if not imp.exists:
      violations[f"missing {imp.named}"].append(f"{imp.where(package_dir)}: there is no module {imp.named}")
    source, target = unit_of(imp.importer), unit_of(imp.imported)
    if imp.imported != imp.importer:
      module_arrows[(imp.importer, imp.imported)].append(imp)
    if source == target:
      continue
    unit_arrows[(source, target)].append(imp)
    if source in allowed and target not in allowed[source]:
      violations[f"{source} -> {target}"].append(f"{imp.where(package_dir)}: forbidden arrow {source} -> {target}")
  for arrows, kind in ((unit_arrows, "units"), (module_arrows, "modules")):
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for a, b in arrows:
      edges[a].add(b)
    for component in _cycles(edges):
      violations[f"cycle of {kind} {' '.join(component)}"].append(_describe_cycle(component, arrows, package_dir))
  return dict(violations)


def _report(violations: Mapping[str, list[str]]) -> str:
  return "\n".join(message for key in sorted(violations) for message in violations[key])


# ----------------------------------------------------------------------------------------------------- msfp_jax
def test_msfp_jax_follows_its_layering():
  violations = find_violations(PACKAGE_DIR, ALLOWED)
  unexpected = {k: v for k, v in violations.items() if k not in TEMPORARY_EXPECTED_VIOLATIONS}
  assert not unexpected, "imports against the layering (see this file's docstring):\n" + _report(unexpected)
  gone = sorted(TEMPORARY_EXPECTED_VIOLATIONS - set(violations))
  assert not gone, f"no longer violated, remove from TEMPORARY_EXPECTED_VIOLATIONS: {gone}"


def test_every_unit_of_msfp_jax_has_a_layer_and_the_checker_sees_them():
  units = {unit_of(m) for m in module_names(PACKAGE_DIR)}
  assert {"quant", "lora", "models", "diffusion", "data", "evaluation", "train", "run", "bench"} <= units
  imports = read_imports(PACKAGE_DIR)
  # Both kinds of import statement and function-level imports are seen (bench imports torch-free code at the top
  # and the orbax wrapper is imported inside quant.state's functions).
  assert any(i.importer == "msfp_jax.quant.state" and i.imported == "msfp_jax.checkpoint" and i.in_function
             for i in imports)
  assert any(i.importer == "msfp_jax.quant.rules" and i.imported == "msfp_jax.quant.config" for i in imports)


# ------------------------------------------------------------------------------------------------- the controls
def _write_tree(root: pathlib.Path, files: Mapping[str, str]) -> pathlib.Path:
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return root / "pkg"


_CONTROL_ALLOWED = {ROOT: frozenset(), "quant": frozenset(), "models": frozenset(), "run": {"quant", "models"}}


def test_the_checker_reports_a_forbidden_module_level_import(tmp_path):
  package = _write_tree(tmp_path, {
      "pkg/__init__.py": "",
      "pkg/models/__init__.py": "",
      "pkg/models/net.py": "X = 1\n",
      "pkg/quant/__init__.py": "",
      "pkg/quant/rules.py": "import os\n\nfrom pkg.models import net\n",
      "pkg/run/__init__.py": "from pkg.quant import rules\nfrom pkg.models import net\n",
  })
  violations = find_violations(package, _CONTROL_ALLOWED)
  assert list(violations) == ["quant -> models"]
  assert violations["quant -> models"] == [
      "pkg/quant/rules.py:3: import of pkg.models.net: forbidden arrow quant -> models"]


def test_the_checker_reports_a_function_level_relative_import(tmp_path):
  package = _write_tree(tmp_path, {
      "pkg/__init__.py": "",
      "pkg/models/__init__.py": "",
      "pkg/models/net.py": "def build():\n  from ..quant import rules  # hidden in a function\n  return rules\n",
      "pkg/quant/__init__.py": "",
      "pkg/quant/rules.py": "",
  })
  violations = find_violations(package, _CONTROL_ALLOWED)
  assert violations == {"models -> quant": [
      "pkg/models/net.py:2: function-level import of pkg.quant.rules: forbidden arrow models -> quant"]}


def test_the_checker_reports_cycles_missing_modules_and_units_without_a_layer(tmp_path):
  package = _write_tree(tmp_path, {
      "pkg/__init__.py": "",
      "pkg/quant/__init__.py": "",
      "pkg/quant/config.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "  from pkg.quant.rules import Rule\n"),
      "pkg/quant/rules.py": "from pkg.quant import config\nimport pkg.quant.gone\n",
      "pkg/extra.py": "import importlib\nimportlib.import_module('pkg.quant.config')\n",
  })
  violations = find_violations(package, _CONTROL_ALLOWED)
  assert set(violations) == {"cycle of modules pkg.quant.config pkg.quant.rules", "missing pkg.quant.gone",
                             "unit extra"}
  cycle = violations["cycle of modules pkg.quant.config pkg.quant.rules"][0]
  assert "pkg/quant/config.py:3" in cycle and "pkg/quant/rules.py:1" in cycle
  # An allowed arrow in each direction is still a cycle of units.
  both_ways = {**_CONTROL_ALLOWED, "quant": {"models"}, "models": {"quant"}}
  package = _write_tree(tmp_path / "b", {
      "pkg/__init__.py": "", "pkg/quant/__init__.py": "from pkg import models\n",
      "pkg/models/__init__.py": "def f():\n  import pkg.quant\n",
  })
  assert set(find_violations(package, both_ways)) == {"cycle of units models quant",
                                                       "cycle of modules pkg.models pkg.quant"}
