"""mutmut's command line (bench/mutation.sh), with two additions: it also mutates functions whose
only decorators are @torch.no_grad(), and a `report` command counts the results of the mutants
matching some names.

mutmut 3 skips every decorated function (it copies the decorators onto its trampoline and onto each
mutant, which is unsafe for decorators with side effects), so ppo.rollout and lib.responses'
sample_responses, sample_and_score and sequence_kl, all @torch.no_grad(), would get no mutants.
torch.no_grad() holds no state: copying it is safe, so those functions are let through.
This patches one private method of mutmut, so the version is pinned
(requirements-dev.txt) and checked here.

    python bench/mutmut_cli.py run "ppo.x_rollout__mutmut_*"     # any mutmut command
    # killed / survived / timeout / total, survivors
    python bench/mutmut_cli.py report "ppo.x_rollout__mutmut_*"
    # a function of lib/responses.py
    python bench/mutmut_cli.py run "lib.responses.x_sample_and_score__mutmut_*"
"""
import fnmatch
import re
import sys
from collections import Counter, defaultdict

import click
import libcst as cst
import mutmut
from libcst.metadata import PositionProvider
from mutmut.__main__ import cli
from mutmut.mutation import file_mutation
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files
from mutmut.utils.format_utils import mangled_name_from_mutant_name

TESTED_WITH = "3.8.1"
if mutmut.__version__ != TESTED_WITH:
    sys.exit(f"bench/mutmut_cli.py patches mutmut {TESTED_WITH} internals, found "
             f"{mutmut.__version__}: pip install -r requirements-dev.txt")


def is_no_grad(decorator):
    """True for the decorator expression torch.no_grad() (or no_grad())."""
    if not isinstance(decorator, cst.Call) or decorator.args:
        return False
    func = decorator.func
    name = func.attr.value if isinstance(func, cst.Attribute) else getattr(func, "value", "")
    return name == "no_grad"


_skip = file_mutation.MutationVisitor._skip_node_and_children


def skip_node_and_children(self, node):
    skip = _skip(self, node)
    if skip and isinstance(node, cst.FunctionDef) and node.decorators and all(
            is_no_grad(d.decorator) for d in node.decorators):
        # skipped for its decorator alone? then mutate it, unless a pragma or
        # mutmut's list of names excludes it
        position = self.get_metadata(PositionProvider, node, None)
        pragma = position is not None and position.start.line in self._ignored_node_lines
        return pragma or node.name.value in file_mutation.NEVER_MUTATE_FUNCTION_NAMES
    return skip


file_mutation.MutationVisitor._skip_node_and_children = skip_node_and_children



@cli.command()
@click.argument("patterns", nargs=-1, required=True)
def report(patterns):
    """Counts by status of the mutants matching PATTERNS (per function, then in
    all), and each survivor's diff."""
    by_function = defaultdict(Counter)  # "ppo.py:compute_gae" -> status -> count
    survivors = []
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        mutants = sorted(data.exit_code_by_key.items(), key=lambda kv: natural_key(kv[0]))
        for name, exit_code in mutants:
            if not any(fnmatch.fnmatch(name, p) for p in patterns):
                continue
            function = f"{path}:{mangled_name_from_mutant_name(name).rpartition('.x_')[2]}"
            status = status_by_exit_code[exit_code]
            by_function[function][status] += 1
            if status != "killed":
                survivors.append((name, function, status, path))
    total = sum(by_function.values(), Counter())
    main_columns = ["killed", "survived", "timeout"]
    columns = main_columns + sorted(set(total) - set(main_columns))
    print(f"{'function':44}" + "".join(f"{c:>13}" for c in columns + ["total"]))
    for function, counts in sorted(by_function.items()):
        numbers = [counts[c] for c in columns] + [sum(counts.values())]
        print(f"{function:44}" + "".join(f"{n:>13}" for n in numbers))
    print(" | ".join(f"{c} {total[c]}" for c in columns) + f" | total {sum(total.values())}")
    for name, function, status, path in survivors:
        diff = [line for line in get_diff_for_mutant(name, path=path).splitlines()
                if line[:1] in "-+" and not line.startswith(("---", "+++"))]
        print(f"\n{status}: {function}  ({name})\n" + "\n".join("    " + line for line in diff))


def natural_key(name):
    """ppo.x_f__mutmut_2 before ppo.x_f__mutmut_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


if __name__ == "__main__":
    cli()
