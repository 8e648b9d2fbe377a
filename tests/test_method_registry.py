"""A method is one file: the registry finds it, a copy under a new name is a working method, and no
code outside methods/ names a method or reads a method's knob."""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

import sparse_peft
from sparse_peft import METHODS, SparseConfig, SparseScheduler
from sparse_peft import methods as registry

from .conftest import method_config, tiny_llama


PACKAGE = Path(sparse_peft.__file__).parent
ROOT = PACKAGE.parent
BUILTIN = sorted(p.stem for p in (PACKAGE / "methods").glob("*.py") if not p.stem.startswith("_"))


@pytest.fixture
def copied_method(tmp_path, request):
    """methods/<name>.py copied as copy_of_<name>.py into a folder on the methods package's path."""
    name = request.param
    copy = f"copy_of_{name}"
    shutil.copy(PACKAGE / "methods" / f"{name}.py", tmp_path / f"{copy}.py")
    registry.__path__.append(str(tmp_path))
    try:
        registry._discover()
        yield copy
    finally:
        registry.__path__.remove(str(tmp_path))
        METHODS.pop(copy, None)
        for owners in registry.KNOBS.values():
            if copy in owners:
                owners.remove(copy)
        sys.modules.pop(f"sparse_peft.methods.{copy}", None)


@pytest.mark.parametrize("copied_method", BUILTIN, indirect=True)
def test_a_copy_of_a_method_file_under_a_new_name_is_a_working_method(copied_method, tmp_path):
    original = copied_method.removeprefix("copy_of_")
    assert METHODS[copied_method].name == copied_method
    targets = {} if METHODS[original].default_targets == "roles" else dict(target_modules=["q_proj", "v_proj", "down_proj"])
    config = method_config(copied_method, init_weights=False, **targets)
    reference = method_config(original, init_weights=False, **targets)
    assert config.method_config == reference.method_config  # the same knobs, from the copied file
    model = get_peft_model(tiny_llama().train(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    SparseScheduler(model, optimizer, total_steps=4)
    for step in range(3):
        ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(step))
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    x = torch.randint(0, 128, (2, 9))
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert loaded.peft_config["default"].method == copied_method
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert METHODS[copied_method].title in card


def test_every_method_has_a_page_an_example_and_a_row_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for name in METHODS:
        assert (ROOT / "docs" / "methods" / f"{name}.md").exists(), name
        assert (ROOT / "examples" / name / "train.py").exists(), name
        assert f"| `{name}` |" in readme, name


def _code_words(path: Path) -> set[str]:
    """Attribute names, keyword names and whole string constants of a file's code (not its docstrings,
    comments or the prose of help texts)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    words = set()  # local variable names are left out: a `threshold` in a generator is nobody's knob
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            words.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.add(node.value)  # a whole string, as code uses a name; names inside prose (help texts) are docs
    return words


# names kept for compatibility: sparse_peft.sltrain (the pretraining converter's name before it moved), and
# the key under which pretrained SLTrain models keep their spec in the model config (files in the wild)
COMPATIBILITY = {("__init__.py", "sltrain"), ("pretraining.py", "sltrain")}


def test_no_code_outside_methods_names_a_method_or_reads_its_knobs():
    names = set(METHODS)
    knobs = set(registry.KNOBS) | set(registry.FLAT_FIELDS_BEFORE_KNOBS)
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "methods" in path.relative_to(PACKAGE).parts:
            continue
        hits = (_code_words(path) & (names | knobs)) - {w for f, w in COMPATIBILITY if path.name == f}
        offenders += [f"{path.relative_to(ROOT)}: {w}" for w in sorted(hits)]
    assert not offenders, offenders


def test_the_package_has_no_import_cycle():
    """Module-level imports between the package's modules form no cycle (function-level imports don't count:
    there should be none that only dodge a cycle)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges = set()
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                if node.module:  # from .x import y: module x (y may be a name in it, or its submodule)
                    target = ".".join(base + [node.module])
                    edges.add(target)
                    edges.update(f"{target}.{a.name}" for a in node.names)
                else:  # from . import x: submodule x
                    edges.update(".".join(base + [a.name]) for a in node.names)
        graph[module] = edges
    graph = {m: {e for e in edges if e in graph and e != m} for m, edges in graph.items()}
    visiting, done, cycles = set(), set(), []

    def visit(m, stack):
        visiting.add(m)
        for n in graph[m]:
            if n in visiting:
                cycles.append(stack + [n])
            elif n not in done:
                visit(n, stack + [n])
        visiting.discard(m)
        done.add(m)

    for m in sorted(graph):
        if m not in done:
            visit(m, [m])
    assert not cycles, cycles


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_merges_exactly_switches_adapters_and_disables(method):
    base = tiny_llama()
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        reference = base(x).logits
    model = get_peft_model(base, method_config(method, init_weights=False)).eval()
    model.add_adapter("second", method_config(method, init_weights=False))
    with torch.no_grad():
        first = model(x).logits
        model.set_adapter("second")
        second = model(x).logits
        model.set_adapter("default")
        with model.disable_adapter():
            torch.testing.assert_close(model(x).logits, reference)
        assert not torch.allclose(first, second)  # two adapters, two updates
        model.merge_adapter()
        torch.testing.assert_close(model(x).logits, first, rtol=1e-4, atol=1e-4)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x).logits, first, rtol=1e-4, atol=1e-4)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(x).logits, first, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, sparse_peft.SparseLayer) for m in merged.modules())


def test_another_package_registers_a_method_with_knobs():
    from dataclasses import dataclass, field

    @dataclass
    class StrideKnobs:
        stride: int = field(default=2, metadata={"help": "every stride-th column"})

    class EveryOther(sparse_peft.Method):
        title, paper = "every other column", "https://example.org"
        defaults = dict(structure="columns", selection="random", r=0)
        Knobs = StrideKnobs

        def budget(self, config, structure, out_features, in_features):
            return in_features // config.knobs.stride

    sparse_peft.register_method(EveryOther, name="every_other")
    try:
        config = SparseConfig(method="every_other", stride=4)
        assert config.method_config == {"stride": 4}
        model = get_peft_model(tiny_llama(), SparseConfig(method="every_other", stride=4, target_modules=["q_proj"]))
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert layer.sparse_col_block["default"].shape == (32, 8)
        with pytest.raises(ValueError, match="registered already"):
            sparse_peft.register_method(type("Other", (sparse_peft.Method,), {"__module__": "elsewhere"}), name="every_other")
    finally:
        METHODS.pop("every_other")
        registry.KNOBS["stride"].remove("every_other")
        if not registry.KNOBS["stride"]:
            del registry.KNOBS["stride"]
