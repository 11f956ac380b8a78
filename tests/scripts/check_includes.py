#!/usr/bin/env python3
"""Checks that every project #include follows the module arrows of docs/ARCHITECTURE.md.

The arrows are read from the block that follows the line

    <!-- arrows: read by tests/scripts/check_includes.py; ... -->

in ARCHITECTURE.md: a ```text fence with one line per module, `module -> dep dep ...`. A module
may include its own headers, the public headers of the modules after its arrow, and nothing else
of the project. The block itself must name each module once and be acyclic.

Which module a file belongs to:
  src/<m>/..., include/qlora/<m>/...   module m
  src/main.cpp                         cli
  kernels/..., include/qlora/kernels.h kernels
What an include depends on (system and third-party <...> includes are ignored):
  "qlora/<x>/..."                      x's public headers
  "qlora/kernels.h"                    kernels
  "<x>/..." with src/<x>/ a folder     x's private headers: only x itself may include them
  "name.h" found next to the file      the module of that file (its own, for a file beside it)

Usage: check_includes.py [--root DIR] [--architecture PATH]   exit 0: clean, 1: violations
       check_includes.py --self-test                          checks the checker on a fake tree
Standard library only.
"""

import argparse
import os
import re
import sys
import tempfile

MARKER = "<!-- arrows: read by tests/scripts/check_includes.py"
SOURCE_SUFFIXES = (".h", ".hpp", ".c", ".cc", ".cpp", ".cu", ".cuh", ".inc")
SCANNED_DIRS = ("src", "include", "kernels")
INCLUDE_RE = re.compile(r'^\s*#\s*include\s*([<"])([^">]+)[">]')
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
STRING_RE = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'')


class ArrowsError(Exception):
    """The arrows block is missing or malformed."""


# ---------------------------------------------------------------- the arrows block


def parse_arrows(text, where):
    """The block's arrows as {module: [deps]}, in the block's order; raises ArrowsError."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith(MARKER)), None)
    if start is None:
        raise ArrowsError(f"{where}: no arrows block (a line starting with '{MARKER}' followed by a ```text fence)")
    if start + 1 >= len(lines) or lines[start + 1].strip() != "```text":
        raise ArrowsError(f"{where}:{start + 2}: expected ```text right after the arrows marker")
    arrows = {}
    lineno = {}
    end = None
    for i in range(start + 2, len(lines)):
        line = lines[i].strip()
        if line == "```":
            end = i
            break
        if not line:
            continue
        if "->" not in line:
            raise ArrowsError(f"{where}:{i + 1}: expected 'module -> dep dep ...', got '{line}'")
        name, _, deps = (part.strip() for part in line.partition("->"))
        for n in [name] + deps.split():
            if not NAME_RE.match(n):
                raise ArrowsError(f"{where}:{i + 1}: '{n}' is not a module name")
        if name in arrows:
            raise ArrowsError(f"{where}:{i + 1}: module {name} is listed twice (first on line {lineno[name]})")
        arrows[name] = deps.split()
        lineno[name] = i + 1
    if end is None:
        raise ArrowsError(f"{where}:{start + 2}: the arrows block has no closing ```")
    if not arrows:
        raise ArrowsError(f"{where}:{start + 2}: the arrows block is empty")
    for name, deps in arrows.items():
        for d in deps:
            if d == name:
                raise ArrowsError(f"{where}:{lineno[name]}: module {name} lists itself")
            if d not in arrows:
                raise ArrowsError(f"{where}:{lineno[name]}: module {name} -> {d}, which has no line of its own")
        if len(set(deps)) != len(deps):
            raise ArrowsError(f"{where}:{lineno[name]}: module {name} lists a module twice")
    cycle = find_cycle(arrows)
    if cycle:
        raise ArrowsError(f"{where}: the arrows form a cycle: {' -> '.join(cycle)}; arrows must go one way")
    return arrows


def find_cycle(arrows):
    """A cycle of the graph as [a, b, ..., a], or None when it is acyclic."""
    state = {}  # 1: on the current path, 2: done
    path = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in arrows.get(m, []):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in arrows:
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


# ---------------------------------------------------------------- files and their modules


def module_of(rel):
    """The module of a repository-relative path ('/'-separated), or None for files of no module."""
    parts = rel.split("/")
    if parts[0] == "src":
        if len(parts) == 2:
            return "cli" if parts[1] == "main.cpp" else None
        return parts[1]
    if parts[0] == "include" and len(parts) >= 3 and parts[1] == "qlora":
        if len(parts) == 3:
            return "kernels" if parts[2] == "kernels.h" else None
        return parts[2]
    if parts[0] == "kernels":
        return "kernels"
    return None


def source_files(root):
    for top in SCANNED_DIRS:
        base = os.path.join(root, top)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for f in sorted(filenames):
                if f.endswith(SOURCE_SUFFIXES):
                    yield os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/")


def project_includes(path):
    """(line number, quoted include path) of each #include "..." outside block comments."""
    out = []
    in_comment = False
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if in_comment:
                end = line.find("*/")
                if end < 0:
                    continue
                line = line[end + 2:]
                in_comment = False
            m = INCLUDE_RE.match(line)
            if m and m.group(1) == '"':
                out.append((n, m.group(2).strip()))
            # A block comment opened on this line (and not closed on it) hides the next lines; a
            # "/*" inside a string literal opens none.
            code = STRING_RE.sub('""', line)
            stripped = re.sub(r"/\*.*?\*/", "", code.split("//", 1)[0])
            if "/*" in stripped:
                in_comment = True
    return out


def describe_allowed(arrows, m):
    deps = arrows.get(m, [])
    return " ".join(deps) if deps else "nothing but its own headers"


def check_tree(root, arrows):
    """(violations, files scanned, project includes seen)."""
    src_folders = set()
    if os.path.isdir(os.path.join(root, "src")):
        src_folders = {d for d in os.listdir(os.path.join(root, "src")) if os.path.isdir(os.path.join(root, "src", d))}
    violations = []
    files = 0
    includes = 0
    for rel in source_files(root):
        m = module_of(rel)
        if m is None:
            violations.append(f"{rel}:1: belongs to no module (see the rules in tests/scripts/check_includes.py)")
            continue
        files += 1
        if m not in arrows:
            violations.append(f"{rel}:1: module {m} has no line in the arrows block; add one, or move the file "
                              "into a module that has")
            continue
        here = os.path.dirname(rel)
        for line, inc in project_includes(os.path.join(root, rel)):
            beside = os.path.normpath(os.path.join(here, inc)).replace(os.sep, "/")
            first = inc.split("/", 1)[0]
            if "/" not in inc or inc.startswith("."):
                if not os.path.isfile(os.path.join(root, beside)):
                    continue  # not a file of the project
                target, private_of = module_of(beside), None
                if beside.startswith("src/") and target != m:
                    private_of = target
            elif first == "qlora":
                target, private_of = module_of("include/" + inc), None
                if target is None:
                    violations.append(f"{rel}:{line}: module {m} includes \"{inc}\", which belongs to no module "
                                      f"(allowed: {describe_allowed(arrows, m)})")
                    includes += 1
                    continue
            elif first in src_folders:
                target, private_of = first, (first if first != m else None)
            else:
                continue  # a third-party header spelled with quotes
            includes += 1
            if private_of is not None:
                violations.append(f"{rel}:{line}: module {m} includes {private_of}'s private header \"{inc}\" "
                                  f"(allowed: its own private headers; {private_of}'s public ones are in "
                                  f"include/qlora/{private_of}/)")
            elif target != m and target not in arrows.get(m, []):
                why = "" if target in arrows else f", a module with no line in the arrows block"
                violations.append(f"{rel}:{line}: module {m} includes {target}{why} "
                                  f"(allowed: {describe_allowed(arrows, m)})")
    return violations, files, includes


def shown(path, root):
    """path relative to root when it lies inside it, else as given."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return path if rel.startswith("..") else rel.replace(os.sep, "/")


def run(root, architecture, out=sys.stdout):
    """Checks the tree at root; prints what it finds and returns the exit code."""
    where = shown(architecture, root)
    try:
        with open(architecture, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        print(f"check_includes: cannot read {architecture}: {e.strerror}", file=out)
        return 1
    try:
        arrows = parse_arrows(text, where)
    except ArrowsError as e:
        print(f"check_includes: {e}", file=out)
        return 1
    violations, files, includes = check_tree(root, arrows)
    for v in violations:
        print(v, file=out)
    if violations:
        print(f"check_includes: {len(violations)} include(s) cross the arrows of {where} "
              f"({files} files, {includes} project includes)", file=out)
        return 1
    print(f"check_includes: {files} files, {includes} project includes, all along the arrows of "
          f"{where}", file=out)
    return 0


# ---------------------------------------------------------------- self-test


def self_test():
    """Runs the checker on fake trees: a clean one must pass, each kind of violation must fail."""
    import io

    block = ("# fake\n\n" + MARKER + "; test -->\n```text\nbase ->\nkernels ->\nmid -> base kernels\n"
             "cli -> base mid\n```\n")
    clean = {
        "src/main.cpp": '#include "qlora/cli/app.h"\n',
        "include/qlora/cli/app.h": '#pragma once\n#include "qlora/mid/mid.h"\n',
        "include/qlora/mid/mid.h": '#pragma once\n#include "qlora/base/base.h"\n#include <vector>\n',
        "include/qlora/base/base.h": "#pragma once\n",
        "include/qlora/kernels.h": "#pragma once\n",
        "src/mid/mid.cpp": ('#include "qlora/mid/mid.h"\n#include "mid/private.h"\n#include "beside.h"\n'
                            '#include "qlora/kernels.h"\n/*\n#include "qlora/cli/app.h"\n*/\n'),
        "src/mid/private.h": "#pragma once\n",
        "src/mid/beside.h": "#pragma once\n",
        "kernels/k.cu": '#include "k_common.cuh"\n#include "qlora/kernels.h"\n#include <cuda_runtime.h>\n',
        "kernels/k_common.cuh": '#include "qlora/kernels.h"\n',
    }
    cases = [
        ("a clean tree passes", {}, block, 0, []),
        ("an include against the arrows", {"src/base/base.cpp": '#include "qlora/mid/mid.h"\n'}, block, 1,
         ["src/base/base.cpp:1: module base includes mid (allowed: nothing but its own headers)"]),
        ("another module's private header", {"src/cli/x.cpp": '\n#include "mid/private.h"\n'}, block, 1,
         ["src/cli/x.cpp:2: module cli includes mid's private header \"mid/private.h\""]),
        ("a kernel including a module", {"kernels/bad.cuh": '#include "qlora/base/base.h"\n'}, block, 1,
         ["kernels/bad.cuh:1: module kernels includes base (allowed: nothing but its own headers)"]),
        ("a module folder with no arrow", {"src/extra/e.cpp": '#include "qlora/base/base.h"\n'}, block, 1,
         ["src/extra/e.cpp:1: module extra has no line in the arrows block"]),
        ("a cyclic block", {}, block.replace("base ->\n", "base -> cli\n"), 1,
         ["the arrows form a cycle: base -> cli -> base"]),
        ("a block naming an unknown module", {}, block.replace("base ->\n", "base -> nothere\n"), 1,
         ["module base -> nothere, which has no line of its own"]),
        ("no block", {}, "# no arrows here\n", 1, ["no arrows block"]),
    ]
    failures = 0
    for name, extra, doc, want_rc, want_lines in cases:
        with tempfile.TemporaryDirectory(prefix="check_includes.") as root:
            for rel, text in {**clean, **extra, "docs/ARCHITECTURE.md": doc}.items():
                path = os.path.join(root, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
            buf = io.StringIO()
            rc = run(root, os.path.join(root, "docs", "ARCHITECTURE.md"), buf)
            got = buf.getvalue()
            missing = [w for w in want_lines if w not in got]
            if rc != want_rc or missing:
                failures += 1
                print(f"self-test FAILED: {name}: exit {rc} (expected {want_rc}); missing {missing}; output:\n{got}")
    if failures:
        print(f"check_includes self-test: {failures} of {len(cases)} cases failed")
        return 1
    print(f"check_includes self-test: {len(cases)} cases passed")
    return 0


def main(argv):
    default_root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=default_root,
                   help="repository root to check (default: the one holding this script, %(default)s)")
    p.add_argument("--architecture", default=os.path.join("docs", "ARCHITECTURE.md"),
                   help="the Markdown file with the arrows block; a relative path is taken from --root "
                        "(default: %(default)s)")
    p.add_argument("--self-test", action="store_true",
                   help="check the checker itself on fake trees with and without violations")
    args = p.parse_args(argv)
    if args.self_test:
        return self_test()
    architecture = os.path.join(args.root, args.architecture)  # an absolute path replaces the root
    return run(args.root, architecture)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
