#!/usr/bin/env bash
# Structure checks the compiler does not make: no import cycle between sibling modules, no
# `.rs` file over 800 lines, no `main.rs` over 80 (a main parses, builds, runs; the rest lives
# in the library).
#
#   scripts/check-cycles.sh             # every crate of the workspace (and fuzz/)
#   scripts/check-cycles.sh node cli    # only the crates in those folders
#   scripts/check-cycles.sh -C DIR      # another checkout (a worktree, main) instead of this one
#
# Sibling modules are children of one parent module (`a` and `b` in `src/a.rs`, `src/b/mod.rs`;
# `x` and `y` in `src/b/x.rs`, `src/b/y.rs`). A reference from anywhere inside `a` to anywhere
# inside `b` (`use crate::b::...`, `crate::b::f()`, `super::b`, `use b::...` where `b` is a
# child) is an edge a -> b; a cycle is a set of siblings that reach each other along such
# edges (most often two that import each other both ways). Comments and string literals do
# not count; `#[cfg(test)]` code does (it is compiled with the module). To break a cycle, move
# what both need into a third module.
#
# Prints each problem with the file and line of every edge involved; exits 1 when there is
# any, 0 when there is none, 64 on bad usage. Needs python3 (on every machine of this project).
# Limits can be changed for a trial run: MAX_FILE_LINES (800), MAX_MAIN_LINES (80).
set -euo pipefail
script=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
root="$(dirname "$script")/.."
if [ "${1:-}" = "-C" ]; then
    [ $# -ge 2 ] && [ -f "$2/Cargo.toml" ] || { echo "check-cycles: -C needs a workspace folder" >&2; exit 64; }
    root=$2
    shift 2
fi
cd "$root"

for arg in "$@"; do
    case $arg in
        -h | --help) sed -n '2,20p' "$script" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "check-cycles: unknown option $arg" >&2; exit 64 ;;
        *) [ -f "$arg/Cargo.toml" ] || { echo "check-cycles: $arg: not a crate folder (no Cargo.toml)" >&2; exit 64; } ;;
    esac
done
command -v python3 >/dev/null 2>&1 || { echo "check-cycles: needs python3" >&2; exit 1; }

exec python3 - "${MAX_FILE_LINES:-800}" "${MAX_MAIN_LINES:-80}" "$@" <<'PY'
import os
import re
import sys

max_file, max_main = int(sys.argv[1]), int(sys.argv[2])
wanted = sys.argv[3:]


def crates():
    """Folders holding a Cargo.toml with a [package], outside target/."""
    found = []
    for top in sorted(os.listdir(".")):
        if os.path.isfile(os.path.join(top, "Cargo.toml")) and top != "target":
            with open(os.path.join(top, "Cargo.toml")) as f:
                if "[package]" in f.read():
                    found.append(top)
    return found


def crate_roots(crate):
    """Each compilation unit's root file: the library, binaries, tests, benches, examples."""
    roots = []
    for name in ("src/lib.rs", "src/main.rs"):
        if os.path.isfile(os.path.join(crate, name)):
            roots.append(os.path.join(crate, name))
    for folder in ("src/bin", "tests", "benches", "examples", "fuzz_targets"):
        d = os.path.join(crate, folder)
        if os.path.isdir(d):
            for entry in sorted(os.listdir(d)):
                p = os.path.join(d, entry)
                if entry.endswith(".rs") and os.path.isfile(p):
                    roots.append(p)
                elif os.path.isfile(os.path.join(p, "main.rs")):
                    roots.append(os.path.join(p, "main.rs"))
    return roots


def strip(text):
    """The source with comments, string and char literals blanked (newlines kept)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            end = n if end < 0 else end + 1 + len(hashes)
            out.append(' ""' + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4]) or c == "'" and text.startswith("'\\", i):
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\x[0-9a-fA-F]{2}|\\.|[^\\'])'", text[i:])
            if m:
                out.append("' '")
                i += len(m.group(0))
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


MOD_DECL = re.compile(r'(?:#\[path\s*=\s*""\]\s*)?(?:pub(?:\([^)]*\))?\s+)?mod\s+([A-Za-z_][A-Za-z0-9_]*)\s*;')
PATH_ATTR = re.compile(r'#\[path\s*=\s*"([^"]+)"\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+([A-Za-z_][A-Za-z0-9_]*)\s*;')


class Crate:
    def __init__(self, root):
        self.root = root
        self.files = {}  # module path (tuple) -> file
        self.walk(root, ())

    def walk(self, path, module):
        self.files[module] = path
        with open(path) as f:
            raw = f.read()
        base = os.path.dirname(path)
        is_dir_owner = os.path.basename(path) in ("lib.rs", "main.rs", "mod.rs") or module == ()
        child_dir = base if is_dir_owner else os.path.join(base, os.path.basename(path)[:-3])
        explicit = {m.group(2): m.group(1) for m in PATH_ATTR.finditer(raw)}
        for m in MOD_DECL.finditer(strip(raw)):
            name = m.group(1)
            if name in explicit:
                candidates = [os.path.join(base, explicit[name])]
            else:
                candidates = [os.path.join(child_dir, name + ".rs"), os.path.join(child_dir, name, "mod.rs")]
            for c in candidates:
                if os.path.isfile(c):
                    self.walk(c, module + (name,))
                    break


def use_paths(tree):
    """Expands a use tree (`crate::{a, b::{c, d as e}}`) into segment lists."""
    tree = re.sub(r"\s+", "", re.sub(r"\s+as\s+[A-Za-z_][A-Za-z0-9_]*", "", tree))
    out = []

    def expand(prefix, s):
        depth, parts, start = 0, [], 0
        for i, ch in enumerate(s):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                parts.append(s[start:i])
                start = i + 1
        parts.append(s[start:])
        for part in parts:
            if not part:
                continue
            if "{" in part:
                head, _, rest = part.partition("{")
                expand(prefix + [x for x in head.split("::") if x], rest[: rest.rfind("}")])
            else:
                out.append(prefix + [x for x in part.split("::") if x])

    expand([], tree)
    return out


USE = re.compile(r"\buse\s+([^;]+);")
INLINE = re.compile(r"(?<![A-Za-z0-9_:])((?:crate|super|self)(?:\s*::\s*[A-Za-z_][A-Za-z0-9_]*)+)")


INLINE_MOD = re.compile(r"\bmod\s+([A-Za-z_][A-Za-z0-9_]*)\s*\{")


def inline_modules(text):
    """(start, end, name) of each `mod name { ... }` in stripped source."""
    spans = []
    for m in INLINE_MOD.finditer(text):
        depth, i = 0, m.end() - 1
        while i < len(text):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        spans.append((m.start(), i, m.group(1)))
    return spans


def references(crate, file_module, path):
    """(source module, target module path, line) for every path in the file that names a
    module; the source is the file's module, or an inline module (`mod tests { }`) in it."""
    with open(path) as f:
        text = strip(f.read())
    modules = crate.files
    inline = inline_modules(text)
    found = []

    def resolve(segs, line, pos):
        module = file_module + tuple(name for a, b, name in inline if a <= pos < b)
        segs = [s for s in segs if s not in ("*",)]
        if not segs:
            return
        if segs[0] == "crate":
            absolute, rest = [], segs[1:]
        elif segs[0] in ("super", "self"):
            absolute, rest = list(module), segs
            while rest and rest[0] in ("super", "self"):
                if rest[0] == "super":
                    if not absolute:
                        return
                    absolute.pop()
                rest = rest[1:]
        elif tuple(module) + (segs[0],) in modules:
            absolute, rest = list(module), segs  # a child module, named relatively
        elif module == () and (segs[0],) in modules:
            absolute, rest = [], segs
        else:
            return  # another crate, or an item in scope
        target = tuple(absolute)
        for seg in rest:
            if target + (seg,) in modules:
                target = target + (seg,)
            else:
                break
        found.append((module, target, line))

    spans = []
    for m in USE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        spans.append((m.start(), m.end()))
        for segs in use_paths(m.group(1)):
            resolve(segs, line, m.start())
    for m in INLINE.finditer(text):
        if any(a <= m.start() < b for a, b in spans):
            continue
        line = text.count("\n", 0, m.start()) + 1
        resolve(re.sub(r"\s+", "", m.group(1)).split("::"), line, m.start())
    return found


def sibling_edges(crate):
    """{parent: {(a, b): [(file, line), ...]}} for every reference from inside a to inside b."""
    edges = {}
    for file_module, path in crate.files.items():
        for module, target, line in references(crate, file_module, path):
            common = 0
            while common < min(len(module), len(target)) and module[common] == target[common]:
                common += 1
            if common == len(module) or common == len(target):
                continue  # an ancestor or a descendant, not a sibling
            parent = module[:common]
            pair = (module[common], target[common])
            edges.setdefault(parent, {}).setdefault(pair, []).append((path, line))
    return edges


def cycles(pairs):
    """Strongly connected sets of more than one module (Tarjan), each sorted."""
    graph = {}
    for a, b in pairs:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def lines_of(path):
    with open(path, "rb") as f:
        return f.read().count(b"\n")


problems = 0
folders = wanted or crates()
cycle_report, long_files, long_mains = [], [], []
for folder in folders:
    for root in crate_roots(folder):
        crate = Crate(root)
        for parent, pairs in sorted(sibling_edges(crate).items()):
            for group in cycles(pairs):
                where = "::".join(("crate",) + parent)
                members = set(group)
                kind = " <-> ".join(group) if len(group) == 2 else "a cycle through " + ", ".join(group)
                cycle_report.append(f"  {root}: in {where}: {kind}")
                for (a, b), sites in sorted(pairs.items()):
                    if a in members and b in members:
                        shown = ", ".join(f"{p}:{l}" for p, l in sorted(set(sites))[:4])
                        more = f" (+{len(set(sites)) - 4} more)" if len(set(sites)) > 4 else ""
                        cycle_report.append(f"      {a} -> {b}: {shown}{more}")
                problems += 1
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d not in ("target", ".git", "node_modules"))
        for name in sorted(filenames):
            if not name.endswith(".rs"):
                continue
            p = os.path.join(dirpath, name)
            n = lines_of(p)
            if n > max_file:
                long_files.append(f"  {p}: {n} lines")
                problems += 1
            if name == "main.rs" and n > max_main:
                long_mains.append(f"  {p}: {n} lines")
                problems += 1

if cycle_report:
    print("import cycles between sibling modules (move what both need into a third module):")
    print("\n".join(cycle_report))
if long_files:
    print(f".rs files over {max_file} lines:")
    print("\n".join(long_files))
if long_mains:
    print(f"main.rs files over {max_main} lines (parse, build, run; the rest belongs in the library):")
    print("\n".join(long_mains))
if problems:
    print(f"check-cycles: {problems} problem(s) in {', '.join(folders)}")
    sys.exit(1)
print(f"check-cycles: no sibling import cycle, no file over {max_file} lines, no main.rs over {max_main} ({', '.join(folders)})")
PY
