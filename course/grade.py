"""
Grade a student copy (made by course/make.py): run each exercise's reference tests with pytest in
the copy and print one table, exercise | passed / failed / not started | seconds, then one line per
failed exercise: its first failing assertion or error. Exit 0 only if every exercise asked for
passes.

    python course/grade.py --dir ../student                 # the exercises the copy was made with
    python course/grade.py --dir ../student gae whiten 8    # these (names or numbers)

An exercise is "not started" while its function still raises NotImplementedError("exercise N:
...") (its tests are not run). The others run in a pytest process each, with a time limit
(--timeout), so a student function that raises, returns the wrong shape or never returns fails its
exercise and the grader goes on.
"""
import argparse
import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from exercises import EXERCISES, find, function_body

MARKER = ".course.json"  # written by make.py
PYTEST = ["-x", "-q", "-p", "no:cacheprovider", "-m", "not distributed", "--tb=short",
          "-W", "ignore::DeprecationWarning"]


def fail(message):
    print(f"grade.py: {message}", file=sys.stderr)
    sys.exit(2)


def locate_tests(folder, names):
    """pytest node ids of the test functions `names`, wherever they are under folder/tests, and
    the names found nowhere."""
    sources = {}
    for root, _, files in os.walk(os.path.join(folder, "tests")):
        for f in sorted(files):
            if f.startswith("test_") and f.endswith(".py"):  # what pytest collects
                path = os.path.join(root, f)
                with open(path, errors="replace") as handle:
                    sources[os.path.relpath(path, folder)] = handle.read()
    found, missing = [], []
    for name in names:
        where = [rel for rel, text in sorted(sources.items())
                 if re.search(rf"^\s*def {re.escape(name)}\(", text, re.MULTILINE)]
        found += [f"{rel}::{name}" for rel in where]
        if not where:
            missing.append(name)
    return found, missing


def first_error(output):
    """Why the first test failed, in one line: pytest's first `E   ` line that names an exception
    or an assertion (else its first), with the next two lines of the same block that explain it."""
    lines = output.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("E ") and line[1:].strip()]
    exception = r"(\w+\.)*\w+(Error|Exception|Exit|Interrupt)\b|assert "
    named = [i for i in errors if re.match(exception, lines[i][1:].strip())]
    if not errors:
        return ""
    first = (named or errors)[0]
    said = [lines[first][1:].strip()]
    for line in lines[first + 1:first + 6]:
        if not line.startswith("E ") or len(said) == 3:
            break
        text = line[1:].strip()
        if text and not text.startswith(("+", "-", "?", "where ")):  # not pytest's explanations
            said.append(text)
    return " | ".join(said)


def failed_test(output):
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    if match:
        return match.group(1).split("::")[-1]
    match = re.search(r"_{3,} (?:ERROR collecting )?(\S+) _{3,}", output)
    return match.group(1) if match else None


def still_blank(exercise, folder):
    """Whether every function of the exercise still raises make.py's NotImplementedError."""
    try:
        with open(os.path.join(folder, exercise.file)) as f:
            source = f.read()
        nodes = [function_body(source, qualname)[0] for qualname in exercise.functions]
    except (OSError, SyntaxError, LookupError):
        return False  # the tests will say what is wrong
    return all(any(is_stub(s, exercise.number) for s in node.body) for node in nodes)


def is_stub(statement, number):
    """`raise NotImplementedError("exercise <number>: ...")`"""
    call = statement.exc if isinstance(statement, ast.Raise) else None
    if not (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "NotImplementedError"):
        return False
    message = getattr(call.args[0], "value", None) if call.args else None
    return isinstance(message, str) and message.startswith(f"exercise {number}:")


def grade(exercise, folder, timeout):
    """(status, seconds, one line) of one exercise in the student copy `folder`."""
    start = time.monotonic()
    if still_blank(exercise, folder):
        return "not started", time.monotonic() - start, ""
    tests, missing = locate_tests(folder, exercise.test_names)
    if missing:
        return "failed", 0.0, f"no test {', '.join(missing)} under {folder}/tests"
    command = [sys.executable, "-m", "pytest", *PYTEST, *tests]
    process = subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # a process group of its own, to stop whole
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return "failed", time.monotonic() - start, f"timed out after {timeout:g} s"
    seconds = time.monotonic() - start
    if process.returncode == 0:
        return "passed", seconds, ""
    error = first_error(output)
    own = re.search(r"NotImplementedError: exercise (\d+)\b", error)
    if own and int(own.group(1)) == exercise.number:
        return "not started", seconds, ""
    if own:
        other = find(own.group(1))
        needs = f"exercise {other.number} ({other.name})" if other else f"exercise {own.group(1)}"
        return "failed", seconds, f"needs {needs} first"
    if not error:
        tail = [line for line in output.splitlines() if line.strip()][-1:] or ["no output"]
        error = f"pytest exit code {process.returncode}: {tail[0]}"
    test = failed_test(output)
    return "failed", seconds, f"{test}: {error}" if test else error


def main(argv=None):
    first, rest = __doc__.strip().split("\n\n", 1)
    parser = argparse.ArgumentParser(description=first, epilog=rest,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, help="the student copy")
    parser.add_argument("exercises", nargs="*", help="names or numbers (default: the copy's)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per exercise")
    parser.add_argument("--jobs", type=int, default=1,
                        help="exercises graded at once (their seconds grow with it)")
    args = parser.parse_args(argv)
    names = ", ".join(e.name for e in EXERCISES)
    chosen = [find(n) for n in args.exercises]
    if None in chosen:
        unknown = ", ".join(n for n, e in zip(args.exercises, chosen) if e is None)
        fail(f"unknown exercise {unknown}; the exercises are: {names}")
    marker = os.path.join(args.dir, MARKER)
    if not os.path.isfile(marker):
        fail(f"{args.dir} is not a student copy (no {MARKER}); make one with "
             "python course/make.py --out DIR")
    if args.timeout <= 0:
        fail(f"--timeout {args.timeout:g} must be > 0 seconds")
    if args.jobs < 1:
        fail(f"--jobs {args.jobs} must be >= 1")
    if not chosen:
        with open(marker) as f:
            chosen = [find(n) for n in json.load(f)["exercises"]]
        chosen = [e for e in chosen if e is not None]
    folder = os.path.abspath(args.dir)

    print(f"{'exercise':<22} {'result':<12} {'seconds':>7}")
    failures, results = [], []
    chosen = sorted(set(chosen), key=lambda e: e.number)
    with ThreadPoolExecutor(args.jobs) as pool:  # the rows come in the list's order
        graded = pool.map(lambda e: grade(e, folder, args.timeout), chosen)
        for exercise, (status, seconds, line) in zip(chosen, graded):
            label = f"{exercise.number:>2} {exercise.name}"
            print(f"{label:<22} {status:<12} {seconds:>7.1f}", flush=True)
            results.append(status)
            if line:
                failures.append(f"{label}: {line}"[:300])
    if failures:
        print()
        print("\n".join(failures))
    passed = results.count("passed")
    print(f"\n{passed} of {len(results)} passed")
    sys.exit(0 if passed == len(results) else 1)


if __name__ == "__main__":
    main()
