#!/usr/bin/env python3
"""Fail if the library's files import each other in a cycle (DESIGN.md §2: "No import
cycles between files; lower floors never import the model").

    python3 scripts/check_import_cycles.py [crates/sparrow/src]

Every `crate::a::b` / `super::x` path (in `use` lines and inline) is resolved to the
file of the longest module prefix that exists; comment lines are ignored. Prints each
strongly connected component of more than one file and exits 1 if there is any.
"""

import os
import re
import sys

root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(__file__), "..", "crates", "sparrow", "src")
files = {}
for d, _, names in os.walk(root):
    for n in names:
        if n.endswith(".rs"):
            p = os.path.relpath(os.path.join(d, n), root)
            files[p] = open(os.path.join(d, n), encoding="utf-8").read()


def module(path):
    parts = path[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return tuple(parts)


mods = {module(p): p for p in files}


def target(m, parts):
    if parts[0] == "super":
        base, rest = list(m[:-1]), parts[1:]
        while rest and rest[0] == "super":
            base, rest = base[:-1], rest[1:]
    else:
        base, rest = [], parts[1:]
    for i in range(len(rest), -1, -1):
        c = tuple(base + rest[:i])
        if c in mods:
            return c
    return None


edges = {}
for m, p in mods.items():
    text = "\n".join(l for l in files[p].split("\n") if not l.strip().startswith("//"))
    deps = set()
    paths = [u.split("::") for u in re.findall(r"((?:crate|super)(?:::\w+)+)", text)]
    for base, items in re.findall(r"use\s+((?:crate|super)(?:::\w+)*)::\{([^}]*)\}", text):
        for item in items.split(","):
            item = item.strip().split("::")[0].split(" ")[0]
            if item and item != "self":
                paths.append(base.split("::") + [item])
    for parts in paths:
        c = target(m, parts)
        if c and c != m:
            deps.add(c)
    edges[m] = deps

# Tarjan's strongly connected components.
sys.setrecursionlimit(10000)
index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]


def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges.get(v, ()):
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            comps.append(comp)


for v in list(edges):
    if v not in index:
        visit(v)
for comp in comps:
    print("import cycle:", ", ".join(sorted("::".join(x) or "lib" for x in comp)))
print(f"{len(files)} files, {len(comps)} import cycles")
sys.exit(1 if comps else 0)
