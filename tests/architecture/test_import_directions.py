"""Imports run one way: pretrain.model <- parallel <- the trainer; data_pipeline stands apart.

Every import statement of every module is read from its source (also the ones inside
functions, which a runtime check would miss until that function runs) and resolved to an
absolute module name; each package's rule below must hold for all of them.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pretrain", "parallel", "data_pipeline")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]  # `from pkg import module`
    return out


def forbidden(importer: str, target: str) -> bool:
    """Whether module `importer` may not import `target` (a dotted name)."""
    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    shared = ("pretrain.errors",)  # no imports of its own: every package may raise its errors
    if under(importer, "pretrain.model"):
        return (under(target, "parallel") or under(target, "data_pipeline")
                or (under(target, "pretrain") and not under(target, "pretrain.model")
                    and not any(under(target, s) for s in shared)))
    if under(importer, "data_pipeline"):
        return under(target, "pretrain") or under(target, "parallel")
    if under(importer, "parallel"):
        return (under(target, "pretrain") and not under(target, "pretrain.model")
                and not any(under(target, s) for s in shared))
    return False


def all_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def test_the_rules_catch_what_they_should():
    assert forbidden("pretrain.model.hnet", "parallel.step")
    assert forbidden("pretrain.model.hnet", "pretrain.config")
    assert forbidden("data_pipeline.balance", "pretrain.model.flops")
    assert forbidden("parallel.engine", "pretrain.config")
    assert not forbidden("parallel.engine", "pretrain.model")
    assert not forbidden("parallel.engine", "pretrain.errors")
    assert not forbidden("pretrain.train", "parallel.step")
    # relative imports resolve to absolute names
    names = [t for _, t in imports_of(REPO / "pretrain" / "model" / "hnet.py")]
    assert "pretrain.model.config" in names


def test_import_directions():
    bad = []
    for path in all_modules():
        me = module_name(path)
        for line, target in imports_of(path):
            if forbidden(me, target):
                bad.append(f"{path.relative_to(REPO)}:{line}: {me} imports {target}")
    assert not bad, "imports against the direction pretrain.model <- parallel <- trainer, data_pipeline apart:\n" + \
        "\n".join(bad)


def test_errors_module_imports_nothing_of_the_project():
    targets = [t for _, t in imports_of(REPO / "pretrain" / "errors.py")]
    assert not [t for t in targets if t.split(".")[0] in PACKAGES]


def test_slurm_mapping_needs_only_the_standard_library():
    """cluster/launch.sh runs parallel/slurm_env.py with the node's system python3."""
    roots = {t.split(".")[0] for _, t in imports_of(REPO / "parallel" / "slurm_env.py")}
    assert roots <= set(sys.stdlib_module_names) | {"__future__"}, roots


@pytest.mark.parametrize("module", ["data_pipeline.loader", "data_pipeline.shard"])
def test_data_pipeline_loads_without_the_model(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] in ('pretrain', 'parallel')))"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout
