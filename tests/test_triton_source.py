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


def test_the_check_catches_a_chain(tmp_path):
    src = tmp_path / "k.py"
    src.write_text("import triton\n@triton.jit\ndef k(A, B, C):\n    if A and B and C:\n        pass\n")
    with pytest.raises(AssertionError, match="Triton 3.3 rejects"):
        test_no_chained_boolean_operators(src)
