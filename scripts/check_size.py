"""The size habits of ``STYLE.md``, enforced by ``make lint``: no module of the three packages past
``MAX_MODULE_LINES`` lines, no function past ``MAX_FUNCTION_LINES`` (its docstring and decorators included).

    python scripts/check_size.py [paths...]    # default: broker coordinator shard_worker

Prints each module or function over its limit and exits 1 if there is one."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
PACKAGES = ("broker", "coordinator", "shard_worker")


def oversized(path: Path) -> Iterator[str]:
    text = path.read_text(encoding="utf-8")
    lines = text.count("\n") + (not text.endswith("\n") and bool(text))
    if lines > MAX_MODULE_LINES:
        yield f"{path}: {lines} lines (at most {MAX_MODULE_LINES}): two concepts? split it"
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = (node.end_lineno or node.lineno) - start + 1
            if length > MAX_FUNCTION_LINES:
                yield f"{path}:{start}: {node.name} has {length} lines (at most {MAX_FUNCTION_LINES})"


def main(argv: Sequence[str]) -> int:
    roots = [Path(p) for p in (argv or PACKAGES)]
    files = sorted(f for r in roots for f in ([r] if r.is_file() else r.rglob("*.py")))
    problems = [p for f in files for p in oversized(f)]
    for p in problems:
        print(p)
    print(f"size check: {len(files)} modules, {len(problems)} over the limits", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
