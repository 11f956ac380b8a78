#!/usr/bin/env python3
"""Prints the slowest tests from the GoogleTest JSON reports in a directory.

    python3 tests/scripts/slowest_tests.py build/test-results [--top 10]

Each ctest process of the suite writes one report (tests/CMakeLists.txt); a test's time is
GoogleTest's own, so a fixture built once for a suite counts in the test that built it.
"""
import argparse
import glob
import json
import os
import sys


def parse_seconds(text):
    return float(text[:-1]) if text.endswith("s") else float(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="directory of GoogleTest JSON reports")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    rows = []
    for path in sorted(glob.glob(os.path.join(args.results, "*.json"))):
        try:
            with open(path) as f:
                report = json.load(f)
        except (OSError, ValueError) as e:
            print(f"{path}: unreadable report ({e})", file=sys.stderr)
            continue
        process = os.path.splitext(os.path.basename(path))[0]
        for suite in report.get("testsuites", []):
            for test in suite.get("testsuite", []):
                rows.append((parse_seconds(test.get("time", "0s")), f"{suite['name']}.{test['name']}", process))
    if not rows:
        print(f"no GoogleTest reports in {args.results}")
        return 0
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"\nthe {min(args.top, len(rows))} slowest of {len(rows)} tests ({total:.0f} s of test time in all):")
    for seconds, name, process in rows[: args.top]:
        print(f"  {seconds:7.1f} s  {name}  [{process}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
