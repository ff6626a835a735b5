"""
Write a student copy of the repository with the body of every exercise's function (the list in
course/exercises.py) replaced by `raise NotImplementedError("exercise N: <what to implement>")`.

The copy holds the repository's tracked files (`git ls-files`: no .git history, no out/) but
tests/test_course.py, which plants wrong solutions written from the reference.

The signature, the docstring (the paper's equation, the shapes) and the body's whole-line comments
stay; the code does not. A function without a docstring gets the exercise's task and hint as one.
DIR/.course.json lists the blanked exercises: course/grade.py grades a folder only if it has one.

    python course/make.py --out ../student                  # every exercise
    python course/make.py --out ../student sft_loss gae     # only these (names or numbers)
    python course/grade.py --dir ../student                 # then, from either copy
"""
import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap

from exercises import EXERCISES, find, function_body

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = ".course.json"
NOT_COPIED = ("tests/test_course.py",)  # the kit's own test plants wrong solutions: reference text


def fail(message):
    print(f"make.py: {message}", file=sys.stderr)
    sys.exit(2)


def blank_function(lines, qualname, exercise):
    """`lines` (the file's, with line ends) with the body of `qualname` replaced by the stub."""
    node, first, last = function_body("".join(lines), qualname)
    indent = " " * node.body[-1].col_offset
    comments = [indent + line.lstrip() for line in lines[first - 1:last]
                if line.lstrip().startswith("#")]
    stub = []
    if first == node.body[0].lineno:  # no docstring: the task and the hint become one
        paragraphs = [f"Exercise {exercise.number}: {exercise.task}.", exercise.hint]
        text = "\n\n".join(textwrap.fill(p, 96, initial_indent=indent, subsequent_indent=indent)
                            for p in paragraphs)
        stub.append(f'{indent}"""{text.lstrip()}\n{indent}"""\n')
    message = f"exercise {exercise.number}: {exercise.task}"
    call = f"{indent}raise NotImplementedError({json.dumps(message)})\n"
    if len(call) > 101:  # within 100 characters: the message on a line of its own, or on several
        parts = textwrap.wrap(message, 100 - len(indent) - 7, drop_whitespace=False)
        quoted = "\n".join(f"{indent}    {json.dumps(p)}" for p in parts)
        call = f"{indent}raise NotImplementedError(\n{quoted})\n"
    return lines[:first - 1] + stub + comments + [call] + lines[last:]


def blanked_source(exercise, source):
    lines = source.splitlines(keepends=True)
    spans = sorted(((function_body(source, q)[1], q) for q in exercise.functions), reverse=True)
    for _, qualname in spans:  # bottom-up: earlier line numbers stay valid
        lines = blank_function(lines, qualname, exercise)
    return "".join(lines)


def used_names(source):
    return {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}


def keep_imports(reference, blanked):
    """Mark `# noqa: F401` the imports only the blanked bodies used, so that the student copy's
    `ruff check` passes and the import is still there for the student's code."""
    lost = used_names(reference) - used_names(blanked)
    lines = blanked.splitlines(keepends=True)
    for node in ast.parse(blanked).body:
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for alias in node.names:
            name = (alias.asname or alias.name).split(".")[0]
            i = alias.lineno - 1
            if name in lost and "noqa" not in lines[i]:
                lines[i] = lines[i].rstrip("\n") + "  # noqa: F401\n"
    return "".join(lines)


def tracked_files():
    try:
        out = subprocess.run(["git", "-C", REPO, "ls-files", "-z"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        fail(f"{REPO} is not a git repository: run make.py from the reference repository")
    return [p for p in out.stdout.decode().split("\0") if p and p not in NOT_COPIED
            and os.path.isfile(os.path.join(REPO, p))]


def check_out_dir(out):
    """Refuse a DIR that is the repository, inside it, or an existing non-empty folder."""
    real, repo = os.path.realpath(out), os.path.realpath(REPO)
    if real == repo or real.startswith(repo + os.sep):
        fail(f"--out {out} is the repository or inside it; choose a folder outside {repo}")
    if os.path.exists(real) and not os.path.isdir(real):
        fail(f"--out {out} is a file, not a folder")
    if os.path.isdir(real) and os.listdir(real):
        fail(f"--out {out} exists and is not empty; choose a new folder")


def make(out, names=()):
    """Write the student copy into `out`; returns the blanked exercises."""
    chosen = [find(n) for n in names] or EXERCISES
    if None in chosen:
        unknown = [n for n, e in zip(names, chosen) if e is None]
        fail(f"unknown exercise {', '.join(unknown)}; the exercises are: "
             + ", ".join(e.name for e in EXERCISES))
    check_out_dir(out)
    files = tracked_files()
    edited, originals = {}, {}  # everything is computed before the first file is written
    for exercise in sorted(set(chosen), key=lambda e: e.number):
        path = os.path.join(REPO, exercise.file)
        source = edited.get(exercise.file) or open(path).read()
        try:
            edited[exercise.file] = blanked_source(exercise, source)
            originals.setdefault(exercise.file, source)
        except (LookupError, SyntaxError) as e:
            fail(f"exercise {exercise.number} ({exercise.name}): {exercise.file}: {e}")
    edited = {rel: keep_imports(originals[rel], text) for rel, text in edited.items()}
    for rel in files:
        dest = os.path.join(out, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if rel in edited:
            with open(dest, "w") as f:
                f.write(edited[rel])
            shutil.copymode(os.path.join(REPO, rel), dest)
        else:
            shutil.copy2(os.path.join(REPO, rel), dest, follow_symlinks=False)
    names = [e.name for e in EXERCISES if e in chosen]
    with open(os.path.join(out, MARKER), "w") as f:
        json.dump({"exercises": names}, f, indent=1)
        f.write("\n")
    return names


def main(argv=None):
    first, rest = __doc__.strip().split("\n\n", 1)
    parser = argparse.ArgumentParser(description=first, epilog=rest,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a new or empty folder outside the repository")
    parser.add_argument("exercises", nargs="*", help="names or numbers (default: all)")
    args = parser.parse_args(argv)
    names = make(args.out, args.exercises)
    print(f"wrote a student copy to {args.out} with {len(names)} exercises blanked: "
          + ", ".join(names))
    print(f"grade it with: python course/grade.py --dir {args.out}")


if __name__ == "__main__":
    main()
