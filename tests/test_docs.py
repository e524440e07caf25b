"""The docs stay true to the code: references resolve, tables and examples run.

docs/*.md and README.md point into the code as `path:symbol` (a function,
class, `Class.method` or module-level name, e.g. `rgref/layers.py:rg_lru`) and
into the tests as `path::test_name`. Each reference must name an existing
file that defines the symbol. Files are parsed with `ast`, never imported, so
a reference into a tool that needs PyTorch is checked too.

docs/ORACLE.md also lists every intermediate activation with its shape, which
is compared with what `Model.forward` returns, and its Python code blocks run
in order.
"""

import ast
import functools
import glob
import os
import re

import numpy as np
import pytest

from rgref.config import ATTENTION, RECURRENT, Config
from rgref.model import INTERMEDIATE_NAMES
from rgref.random_model import random_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))
if os.path.exists(os.path.join(REPO_ROOT, "README.md")):
    DOCS.append(os.path.join(REPO_ROOT, "README.md"))
ORACLE_GUIDE = os.path.join(REPO_ROOT, "docs", "ORACLE.md")

# `rgref/model.py:Model.forward`, `tests/test_x.py::test_name[case]`, `rgref/x.py:120`.
REFERENCE = re.compile(r"([\w./-]+\.py)(::?)([A-Za-z_][\w.:]*(?:\[[^\]`]*\])?|\d[\d-]*)")


def relative(path):
    return os.path.relpath(path, REPO_ROOT)


def references(doc):
    """Return (path, separator, symbol) for every code reference in a doc."""
    with open(doc, encoding="utf-8") as f:
        return [match.groups() for match in REFERENCE.finditer(f.read())]


@functools.lru_cache(maxsize=None)
def module_tree(path):
    with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


def defined_names(body):
    """Map each name a module or class body defines to its node."""
    names = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return names


def resolve(path, parts):
    """Return None if `parts` (e.g. ["Model", "forward"]) is defined in path, else why not."""
    body = module_tree(path).body
    for depth, part in enumerate(parts):
        node = defined_names(body).get(part)
        if node is None:
            where = ".".join(parts[:depth]) or "the module"
            return f"{path} defines no {part!r} in {where}"
        if depth < len(parts) - 1:
            if not isinstance(node, ast.ClassDef):
                return f"{'.'.join(parts[:depth + 1])} in {path} is not a class"
            body = node.body
    return None


def check_reference(path, separator, symbol):
    """Return None if the reference resolves, else a message saying what is wrong."""
    if re.fullmatch(r"\d[\d-]*", symbol):
        return "line numbers rot; write path:function, path:Class.method or path::test_name"
    if not os.path.isfile(os.path.join(REPO_ROOT, path)):
        return f"{path} does not exist"
    if separator == "::":
        parts = re.sub(r"\[.*\]$", "", symbol).split("::")
        if not parts[-1].startswith("test"):
            return f"{parts[-1]} is not a test name; use path:symbol for code"
    else:
        if "::" in symbol:
            return "a code reference uses one colon: path:symbol"
        parts = symbol.split(".")
    return resolve(path, parts)


@pytest.mark.parametrize("doc", DOCS, ids=relative)
def test_code_references_resolve(doc):
    problems = [f"`{path}{separator}{symbol}`: {reason}"
                for path, separator, symbol in references(doc)
                if (reason := check_reference(path, separator, symbol))]
    assert not problems, f"{relative(doc)} has broken code references:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", ["ARCHITECTURE.md", "ORACLE.md"])
def test_walkthroughs_point_into_code(doc):
    found = references(os.path.join(REPO_ROOT, "docs", doc))
    assert len({path for path, _, _ in found}) >= 3, f"docs/{doc} has references {found}"
    assert any(separator == "::" for _, separator, _ in found), f"docs/{doc} names no test"


def test_reference_checker_rejects_broken_references():
    """The checker itself: each broken form is reported."""
    assert check_reference("rgref/layers.py", ":", "rg_lru") is None
    assert check_reference("rgref/model.py", ":", "Model.forward") is None
    assert check_reference("rgref/model.py", ":", "INTERMEDIATE_NAMES") is None
    assert check_reference("tests/test_docs.py", "::", "test_code_references_resolve[x]") is None
    assert "does not exist" in check_reference("rgref/nothing.py", ":", "rg_lru")
    assert "defines no 'rg_lru_old'" in check_reference("rgref/layers.py", ":", "rg_lru_old")
    assert "defines no 'backward'" in check_reference("rgref/model.py", ":", "Model.backward")
    assert "not a class" in check_reference("rgref/layers.py", ":", "rg_lru.a")
    assert "line numbers" in check_reference("rgref/layers.py", ":", "120")
    assert "not a test name" in check_reference("tests/test_docs.py", "::", "REPO_ROOT")
    text = "see `rgref/model.py:Model.forward` and `tests/test_layers.py::test_gelu_tanh_values`"
    assert [m.groups() for m in REFERENCE.finditer(text)] == [
        ("rgref/model.py", ":", "Model.forward"),
        ("tests/test_layers.py", "::", "test_gelu_tanh_values")]


# =============================================================================
# docs/ORACLE.md
# =============================================================================

def section(path, heading):
    """Return the text under a `## heading` up to the next `## ` heading."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def intermediates_table():
    """Return {name: (blocks column, shape letters)} from the ORACLE.md table."""
    rows = {}
    for line in section(ORACLE_GUIDE, "Intermediate activations").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            letters = tuple(re.findall(r"[A-Z]", cells[2]))
            rows[cells[0].strip("`")] = (cells[1], letters)
    return rows


def test_intermediates_table_lists_every_name():
    kinds = {"model": "model", "every": "block", "recurrent": RECURRENT, "attention": ATTENTION}
    documented = intermediates_table()
    expected = {}
    for column, kind in kinds.items():
        for name in INTERMEDIATE_NAMES[kind]:
            expected[name if kind == "model" else f"blocks.{{i}}.{name}"] = column
    assert {name: column for name, (column, _) in documented.items()} == expected


def test_intermediates_table_shapes():
    # Every size differs, so a shape with the wrong letter cannot pass by accident.
    config = Config(vocab_size=61, width=16, mlp_width=40, num_heads=4, lru_width=24,
                    block_types=(RECURRENT, ATTENTION), attention_window=3)
    sizes = {"B": 2, "T": 5, "D": 16, "E": 24, "H": 4, "K": 4, "M": 40, "V": 61}
    assert config.head_dim == sizes["K"]
    tokens = np.arange(sizes["B"] * sizes["T"]).reshape(sizes["B"], sizes["T"])
    _, _, intermediates = random_model(config, seed=1).forward(tokens,
                                                               return_intermediates=True)
    for name, (_, letters) in intermediates_table().items():
        expected = tuple(sizes[letter] for letter in letters)
        found = [key for key in intermediates
                 if key == name or re.fullmatch(re.escape(name).replace(r"\{i\}", r"\d+"), key)]
        assert found, f"{name} is documented but not returned"
        for key in found:
            assert intermediates[key].shape == expected, (
                f"{key} has shape {intermediates[key].shape}; docs/ORACLE.md says "
                f"{letters} = {expected}")


def test_oracle_guide_code_runs(tmp_path, monkeypatch):
    """The ```python blocks of docs/ORACLE.md run in order, in an empty directory."""
    with open(ORACLE_GUIDE, encoding="utf-8") as f:
        blocks = re.findall(r"^```python\n(.*?)^```$", f.read(), flags=re.S | re.M)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/ORACLE.md python block {i + 1}", "exec"), namespace)
