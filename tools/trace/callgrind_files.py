#!/usr/bin/env python3
"""Self instructions per source file in a callgrind profile, inlined code included.

Usage: python3 tools/trace/callgrind_files.py CALLGRIND_OUT PREFIX

Reads the profile's cost lines and charges each to the file it came from: `fl=` (the
function's file) or, inside it, `fi=`/`fe=` (code inlined from another file), which is how
callgrind records debug line tables. The cost line after a `calls=` line is the callee's
inclusive cost, charged to the callee where it runs, so it is skipped here. Costs at line 0
(code the compiler made with no source line, e.g. a derived trait's glue) are counted apart
and do not make a file "run". The profile must be written with `--compress-pos=no`
(absolute line numbers). Prints one JSON line: the files under PREFIX (relative to it) with
their instruction counts, most first, and the totals. Standard library only.
"""

import json
import re
import sys

NAMED = re.compile(r"^(fl|fi|fe|cfi|cfl|fn|cfn)=\((\d+)\)(?: (.*))?$")


def files_of(profile_path):
    names = {}  # callgrind compresses a name to "(id)" after its first use
    costs = {}
    without_line = 0
    function_file = None
    current_file = None
    skip_next_cost = False
    with open(profile_path, encoding="utf-8", errors="replace") as profile:
        for line in profile:
            line = line.rstrip("\n")
            named = NAMED.match(line)
            if named:
                kind, ident, name = named.groups()
                space = "fn" if kind in ("fn", "cfn") else "file"
                if name is not None:
                    names[(space, ident)] = name
                name = names.get((space, ident), f"({ident})")
                if kind == "fl":
                    function_file = current_file = name
                elif kind in ("fi", "fe"):
                    current_file = name
                elif kind == "fn":
                    current_file = function_file
                continue
            if line.startswith("calls="):
                skip_next_cost = True
                continue
            if not line or not line[0].isdigit():
                if line and line[0] in "+-*":
                    sys.exit("error: relative positions: write the profile with --compress-pos=no")
                continue
            if skip_next_cost:
                skip_next_cost = False
                continue
            fields = line.split()
            if len(fields) >= 2 and current_file is not None:
                if fields[0] == "0":
                    without_line += int(fields[1])
                else:
                    costs[current_file] = costs.get(current_file, 0) + int(fields[1])
    return costs, without_line


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    profile_path, prefix = sys.argv[1], sys.argv[2].rstrip("/") + "/"
    costs, without_line = files_of(profile_path)
    total = sum(costs.values()) + without_line
    ours = sorted(
        ((path, ir) for path, ir in costs.items() if path.startswith(prefix)),
        key=lambda item: -item[1],
    )
    print(
        json.dumps(
            {
                "files": len(ours),
                "instructions_total": total,
                "instructions_in_prefix": sum(ir for _, ir in ours),
                "instructions_without_line": without_line,
                "per_file": {path[len(prefix):]: ir for path, ir in ours},
            }
        )
    )


if __name__ == "__main__":
    main()
