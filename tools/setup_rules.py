"""setup.py's own rules (which kernel TUs build, their nvcc flags, the headers
they include, where CUDA is), for the tools and tests that must follow them.

setup.py cannot be imported (importing it runs setup(), which builds), so the
named functions are compiled from its source. Stdlib only: the device runs
tools/device_pack.py before anything is installed.
"""
from __future__ import annotations

import ast
import glob
import os
import re
import subprocess
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_functions(*names, root: str = ROOT, **globs) -> types.SimpleNamespace:
    """The named functions of root/setup.py, plus ``source``: their source text.
    ``globs`` adds or replaces names they see (ROOT is ``root``)."""
    with open(os.path.join(root, "setup.py")) as f:
        src = f.read()
    fns = [n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name in names]
    missing = set(names) - {f.name for f in fns}
    if missing:
        raise LookupError(f"setup.py has no function {sorted(missing)}")
    ns = dict(os=os, re=re, glob=glob, subprocess=subprocess, ROOT=root, **globs)
    exec(compile(ast.Module(body=fns, type_ignores=[]), "setup.py", "exec"), ns)
    return types.SimpleNamespace(source="\n".join(ast.get_source_segment(src, f) for f in fns),
                                 **{n: ns[n] for n in names})
