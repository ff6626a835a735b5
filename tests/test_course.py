"""The course kit (course/): make.py's student copy has every exercise blanked and no solution
line left; grade.py says "not started" on the blank copy, passes the reference bodies put back,
fails each planted wrong solution (and a student function that raises, returns the wrong shape or
never returns) with one line; both refuse bad input with one line; and the copy with the
reference bodies runs the quick lab to the reference's results.json.

One copy is made per module. The blank copy is graded whole (a blank exercise runs no test); the
others on a few exercises only, as each graded exercise is a pytest process of a few seconds."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from course.exercises import EXERCISES, find, function_body

MAKE = os.path.join(REPO, "course", "make.py")
GRADE = os.path.join(REPO, "course", "grade.py")
PLANTED = ["gae", "kl_reward", "policy_loss", "value_loss", "dpo_loss"]


def run(script, *args):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          cwd=REPO)


def table(stdout):
    """grade.py's table: {exercise name: (status, seconds)}, and its lines after the table."""
    rows = {}
    for line in stdout.splitlines():
        match = re.match(r"^\s*\d+ (\w+)\s+(passed|failed|not started)\s+([\d.]+)$", line)
        if match:
            rows[match.group(1)] = (match.group(2), float(match.group(3)))
    return rows


def failure_lines(stdout):
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s*\d+ (\w+): (.*)$", stdout, re.M)}


def tracked_files():
    out = subprocess.run(["git", "-C", REPO, "ls-files"], capture_output=True, text=True,
                         check=True)
    return [p for p in out.stdout.splitlines() if os.path.isfile(os.path.join(REPO, p))]


def code(line):
    return line.split("  #")[0].strip()


def solution_lines(exercise):
    """The code lines of the exercise's reference bodies that appear nowhere else in its file
    (a line such as `B, T, C = x.shape` written elsewhere too is no solution)."""
    with open(os.path.join(REPO, exercise.file)) as f:
        source = f.read()
    lines, inside = source.splitlines(), set()
    for qualname in exercise.functions:
        _, first, last = function_body(source, qualname)
        inside |= set(range(first - 1, last))  # 0-based indices of the body's lines
    outside = {code(line) for i, line in enumerate(lines) if i not in inside}
    body = {code(lines[i]) for i in inside} - outside
    return {line for line in body if len(line) >= 8 and not line.startswith("#")}


def replace_body(folder, exercise, qualname, transform):
    """Plant a wrong solution: the body of `qualname` in the copy's file, passed through
    `transform` (a function of the body's text)."""
    path = os.path.join(folder, exercise.file)
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    _, first, last = function_body("".join(lines), qualname)
    body = "".join(lines[first - 1:last])
    planted = transform(body)
    assert planted != body, f"the plant did not change {qualname}: is the reference rewritten?"
    with open(path, "w") as f:
        f.write("".join(lines[:first - 1]) + planted + "".join(lines[last:]))


def substitute(pattern, replacement):
    def transform(body):
        new, n = re.subn(pattern, replacement, body)
        assert n, f"{pattern!r} is not in the reference body:\n{body}"
        return new
    return transform


def swap(a, b):
    return substitute(rf"\b({a}|{b})\b", lambda m: b if m.group(1) == a else a)


def put_back(folder):
    """The reference bodies: the repository's own files of every exercise, copied in."""
    for rel in {e.file for e in EXERCISES}:
        shutil.copy2(os.path.join(REPO, rel), os.path.join(folder, rel))


@pytest.fixture(scope="module")
def blank(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("course") / "student")
    result = run(MAKE, "--out", out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def solved(blank, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("course") / "solved")
    shutil.copytree(blank, folder)
    put_back(folder)
    return folder


# ----------------------------------------------------------------------------------------- make.py

def test_the_list_is_numbered_in_order_and_names_each_function_and_test_once():
    assert [e.number for e in EXERCISES] == list(range(1, len(EXERCISES) + 1))
    assert len({e.name for e in EXERCISES}) == len(EXERCISES)
    assert find("7") is find("gae") is EXERCISES[6] and find("nope") is None
    tests_dir = os.path.join(REPO, "tests")
    sources = "".join(open(os.path.join(tests_dir, f)).read() for f in os.listdir(tests_dir)
                      if f.startswith("test_") and f.endswith(".py"))
    for e in EXERCISES:
        with open(os.path.join(REPO, e.file)) as f:
            source = f.read()
        for qualname in e.functions:
            function_body(source, qualname)  # raises if it is not there
        for name in e.test_names:
            assert len(re.findall(rf"^\s*def {name}\(", sources, re.M)) == 1, (e.name, name)


def test_the_copy_has_every_body_blanked_and_the_rest_as_in_the_repository(blank):
    with open(os.path.join(blank, ".course.json")) as f:
        assert json.load(f)["exercises"] == [e.name for e in EXERCISES]
    assert not os.path.exists(os.path.join(blank, ".git"))
    assert not os.path.exists(os.path.join(blank, "tests", "test_course.py"))
    edited = {e.file for e in EXERCISES}
    for rel in tracked_files():
        if rel in edited or rel == "tests/test_course.py":
            continue
        with open(os.path.join(REPO, rel), "rb") as a, open(os.path.join(blank, rel), "rb") as b:
            assert a.read() == b.read(), rel
    for e in EXERCISES:
        with open(os.path.join(REPO, e.file)) as f:
            reference = f.read()
        with open(os.path.join(blank, e.file)) as f:
            student = f.read()
        for qualname in e.functions:
            ref_node, _, _ = function_body(reference, qualname)
            node, first, last = function_body(student, qualname)
            assert ast.unparse(node.args) == ast.unparse(ref_node.args), "the signature stays"
            if docstring(ref_node):
                assert docstring(node) == docstring(ref_node), "the docstring stays"
            else:
                assert docstring(node).startswith(f"Exercise {e.number}: ")
            statements = node.body[1:]
            assert len(statements) == 1, f"{qualname}: the body is only the raise"
            call = statements[0].exc
            assert isinstance(statements[0], ast.Raise) and call.func.id == "NotImplementedError"
            assert call.args[0].value.startswith(f"exercise {e.number}: "), call.args[0].value


def docstring(node):
    return ast.get_docstring(node, clean=False)


def test_no_line_of_a_blanked_body_is_left_in_the_copy(blank):
    """Neither in the exercise's file nor in any other file of the copy."""
    texts = {}
    for root, _, files in os.walk(blank):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as handle:
                text = handle.read().decode(errors="replace")  # a PNG's lines match nothing
            texts[os.path.relpath(path, blank)] = {code(x) for x in text.splitlines()}
    for e in EXERCISES:
        lines = solution_lines(e)
        assert lines, e.name
        left = {rel: lines & text for rel, text in texts.items() if lines & text}
        assert not left, f"exercise {e.number} ({e.name}): solution lines in the copy: {left}"


# ---------------------------------------------------------------------------------------- grade.py

def test_the_blank_copy_is_not_started_and_fails(blank):
    """Every exercise (the copy's list, by default) is "not started", without running its tests."""
    result = run(GRADE, "--dir", blank)
    print(result.stdout)
    assert result.returncode == 1
    rows = table(result.stdout)
    assert {k: v[0] for k, v in rows.items()} == {e.name: "not started" for e in EXERCISES}
    assert f"0 of {len(EXERCISES)} passed" in result.stdout and not failure_lines(result.stdout)


def test_the_reference_bodies_put_back_pass(solved):
    result = run(GRADE, "--dir", solved, "--jobs", "2", *PLANTED)
    print(result.stdout)
    assert {k: v[0] for k, v in table(result.stdout).items()} == dict.fromkeys(PLANTED, "passed")
    assert result.returncode == 0


def test_each_planted_wrong_solution_fails_its_exercise_with_one_line(solved, tmp_path):
    """The reference with one mistake each, as a student would make it; and a student function
    that raises or returns the wrong shape: each a failed exercise with one line, not a crash."""
    folder = str(tmp_path / "planted")
    shutil.copytree(solved, folder)
    plants = {
        "gae": ("compute_gae", swap("gamma", "lam")),  # gamma and lambda swapped
        "kl_reward": ("compute_rewards", substitute(r"-\s*kl_coef\b", "kl_coef")),  # +beta KL
        "policy_loss": ("ppo_policy_loss", substitute(r"\blogprobs - old_logprobs\b",
                                                      "old_logprobs - logprobs")),  # pi_old / pi
        "value_loss": ("ppo_value_loss", substitute(r"torch\.max\(losses, losses_clipped\)",
                                                    "losses")),  # no value clip
        "dpo_loss": ("dpo_loss", swap("ref_logps_chosen", "ref_logps_rejected")),  # wrong reference
        "sft_loss": ("sft_loss", lambda body: '    raise ValueError("a student\'s own error")\n'),
        "preference_loss": ("preference_loss",  # one loss per pair, not their mean: shape (P,)
                            lambda body: "    return -F.logsigmoid(r_chosen - r_rejected)\n"),
    }
    for name, (qualname, transform) in plants.items():
        replace_body(folder, find(name), qualname, transform)
    result = run(GRADE, "--dir", folder, "--jobs", "2", *plants)
    print(result.stdout)
    assert result.returncode == 1
    assert {k: v[0] for k, v in table(result.stdout).items()} == dict.fromkeys(plants, "failed")
    lines = failure_lines(result.stdout)
    assert set(lines) == set(plants) and all(0 < len(line) <= 300 for line in lines.values())
    assert "ValueError: a student's own error" in lines["sft_loss"]
    assert "a Tensor with 4 elements cannot be converted to Scalar" in lines["preference_loss"]
    assert "Traceback" not in result.stdout and "0 of 7 passed" in result.stdout


def test_a_function_that_never_returns_times_out_as_a_failed_exercise(solved, tmp_path):
    folder = str(tmp_path / "loop")
    shutil.copytree(solved, folder)
    replace_body(folder, find("wilson_interval"), "wilson_interval",
                 lambda body: "    while True:\n        pass\n")
    result = run(GRADE, "--dir", folder, "--timeout", "10", "wilson_interval")
    print(result.stdout)
    assert result.returncode == 1
    status, seconds = table(result.stdout)["wilson_interval"]
    assert status == "failed" and 10 <= seconds < 60
    assert failure_lines(result.stdout) == {"wilson_interval": "timed out after 10 s"}


def test_a_test_that_needs_an_unfinished_exercise_says_which(blank, tmp_path):
    """kl_reward solved while score_at_eos (last_token_index) is still blank."""
    folder = str(tmp_path / "partial")
    shutil.copytree(blank, folder)
    shutil.copy2(os.path.join(REPO, "ppo.py"), os.path.join(folder, "ppo.py"))
    result = run(GRADE, "--dir", folder, "kl_reward")
    print(result.stdout)
    assert table(result.stdout)["kl_reward"][0] == "failed"
    assert failure_lines(result.stdout) == {"kl_reward": "needs exercise 4 (score_at_eos) first"}


# --------------------------------------------------------------------------------------- bad input

def one_line(result):
    assert result.returncode != 0 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_make_refuses_a_non_empty_folder_and_the_repository_writing_nothing(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    assert "not empty" in one_line(run(MAKE, "--out", str(full)))
    assert os.listdir(full) == ["notes.txt"]
    assert "inside" in one_line(run(MAKE, "--out", REPO))
    inside = os.path.join(REPO, "out", "course_test_student")
    assert "inside" in one_line(run(MAKE, "--out", inside))
    assert not os.path.exists(inside) and not os.path.exists(os.path.join(REPO, ".course.json"))
    message = one_line(run(MAKE, "--out", str(tmp_path / "new"), "gae", "nope"))
    assert "unknown exercise nope" in message and "gae, whiten" in message
    assert not os.path.exists(tmp_path / "new")


def test_grade_refuses_a_folder_that_is_no_student_copy_and_an_unknown_exercise(blank, tmp_path):
    assert "not a student copy" in one_line(run(GRADE, "--dir", str(tmp_path)))
    assert "not a student copy" in one_line(run(GRADE, "--dir", REPO))
    message = one_line(run(GRADE, "--dir", blank, "gae", "grpo"))
    assert "unknown exercise grpo" in message
    assert all(e.name in message for e in EXERCISES)


# ----------------------------------------------------------------------------------------- the lab

TIMING = re.compile(r"(^|_)(time|times|seconds|minutes|elapsed|eta|ms)(_|$)")


def without_timing(value):
    """results.json without its wall times (the only thing two runs of one seed differ in)."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if not TIMING.search(k)}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def test_the_copy_with_the_reference_bodies_gives_the_reference_quick_lab(solved, tmp_path,
                                                                          quick_lab):
    """The lab as the final exam: the student copy (here with the reference bodies) runs the quick
    lab to the same results.json as the repository's (conftest's quick_lab), seed for seed."""
    out = tmp_path / "student"
    command = [sys.executable, "pipeline.py", "--task", "lab", "--quick", "--in_process",
               "--out_dir", str(out)]
    result = subprocess.run(command, cwd=solved, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as f:
        student = json.load(f)
    with open(os.path.join(quick_lab[0], "results.json")) as f:
        reference = json.load(f)
    as_text = [json.dumps(without_timing(r), sort_keys=True) for r in (student, reference)]
    assert as_text[0] == as_text[1]  # as text: NaN (no premise prompt in --quick) equals NaN


# ------------------------------------------------------------------------- the instructor's tables

def test_the_instructors_tables_are_the_scripts_output_on_the_saved_runs():
    """course/instructor.md's tables are course/experiments.py's output on the committed runs
    (course/results/NAME_seedN.json): every experiment on three seeds or more; a number edited by
    hand, or a run saved without its table being written again, fails here."""
    from course import experiments
    found = experiments.collect(os.path.join(REPO, "course", "results"))
    assert set(found) == set(experiments.EXPERIMENTS)
    assert all(len(runs) >= 3 for runs in found.values()), {k: len(v) for k, v in found.items()}
    with open(os.path.join(REPO, "course", "instructor.md")) as f:
        page = f.read()
    for name, table in experiments.tables(found).items():
        block = f"<!-- experiments:{name} -->\n\n{table}\n\n<!-- /experiments:{name} -->"
        assert block in page, (f"course/instructor.md's {name} table is not the script's output: "
                               "python course/experiments.py table course/results --write "
                               "course/instructor.md")
