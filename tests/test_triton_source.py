"""The Triton kernels' source stays within what Triton 3.3, the oldest supported version, compiles.

The interpreter runs kernel bodies as Python, so it accepts constructs that the compiler's
front end rejects; this reads the source of every @triton.jit function instead.  (Found with
Triton 3.3.1: ``if A and B and C`` in a kernel fails there with "chained boolean operators are
not supported", while 3.6 and the interpreter accept it.)"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_FILES = sorted((ROOT / "kernels").glob("*.py"))


def jit_functions(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
            yield node


def test_the_kernels_are_found():
    assert sum(1 for p in KERNEL_FILES for _ in jit_functions(p)) >= 10


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
def test_no_chained_boolean_operators(path):
    chained = [f"{path.name}:{op.lineno}: {ast.unparse(op)}" for fn in jit_functions(path) for op in ast.walk(fn)
               if isinstance(op, ast.BoolOp) and len(op.values) > 2]
    assert not chained, "Triton 3.3 rejects `A and B and C` in a kernel; parenthesise:\n" + "\n".join(chained)


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
def test_no_chained_comparisons(path):
    chained = [f"{path.name}:{op.lineno}: {ast.unparse(op)}" for fn in jit_functions(path) for op in ast.walk(fn)
               if isinstance(op, ast.Compare) and len(op.ops) > 1]
    assert not chained, "Triton's compiler rejects `a < b < c` in a kernel; split it:\n" + "\n".join(chained)


@pytest.mark.parametrize("body,check,word", [("if A and B and C:", test_no_chained_boolean_operators, "3.3 rejects"),
                                             ("if 0 < A < B:", test_no_chained_comparisons, "split it")])
def test_the_checks_catch_a_chain(tmp_path, body, check, word):
    src = tmp_path / "k.py"
    src.write_text(f"import triton\n@triton.jit\ndef k(A, B, C):\n    {body}\n        pass\n")
    with pytest.raises(AssertionError, match=word):
        check(src)
