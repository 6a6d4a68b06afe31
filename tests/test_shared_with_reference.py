"""Every function of reference.py that production code calls has an oracle test.

A function the engine and reference.py share cannot be checked by comparing the two: a bug
in it is on both sides. So each one must have a test against an independent oracle (torch's
own ops, Python loops, hand-computed values, a property), listed in ORACLES. A production
module that starts calling another reference function fails this test until the function
is added here with its oracle test.
"""

import ast
import inspect
from pathlib import Path

from fastunlearn import reference

PACKAGE = Path(reference.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent

# shared function -> the oracle tests ("file::test") that check it without calling it twice.
ORACLES = {
    "boundary_step": ["test_reference.py::test_fgsm_without_rounding_is_clamped_sign_step",
                      "test_reference.py::test_fgsm_on_grid_moves_whole_grid_steps",
                      "test_reference.py::test_lamda_pulls_back_to_origin",
                      "test_reference.py::test_std_chain_rule"],
    "relabel_check": ["test_reference.py::test_relabel_modes_against_python_loops"],
    "noise_offset": ["test_oracles.py::test_noise_counters_are_disjoint_contiguous_blocks",
                     "test_oracles.py::test_noise_counter_hand_computed_value",
                     "test_oracles.py::test_every_noise_draw_of_a_search_uses_its_own_counters"],
    "random_start_point": ["test_oracles.py::test_random_start_is_in_the_ball_and_on_the_grid",
                           "test_oracles.py::test_random_start_is_uniform_in_the_ball",
                           "test_oracles.py::test_random_start_on_the_grid_is_the_rounded_uniform_point"],
    "lamda_at": ["test_oracles.py::test_lamda_schedules_match_the_paper_by_hand",
                 "test_oracles.py::test_lamda_is_never_negative"],
    "interpolate": ["test_api.py::test_interpolate_endpoints_and_midpoint"],
}


def imports_of_reference(tree: ast.Module) -> tuple[set, set]:
    """(names imported from reference, local names bound to the reference module)."""
    names, aliases = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[-1] == "reference":
                names |= {a.name for a in node.names}
            else:
                aliases |= {a.asname or a.name for a in node.names if a.name == "reference"}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name.endswith(".reference") and a.asname}
    return names, aliases


def names_used_from_reference(path: Path) -> set:
    tree = ast.parse(path.read_text(), filename=str(path))
    names, aliases = imports_of_reference(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            names.add(node.attr)
    return names


def shared_functions() -> dict:
    """Function name -> the production modules (paths below the package) that call it."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "reference.py":
            continue
        for name in names_used_from_reference(path):
            if inspect.isfunction(getattr(reference, name, None)):
                out.setdefault(name, []).append(str(path.relative_to(PACKAGE)))
    return out


def test_the_scan_sees_the_engine():
    # The engine's search calls reference.noise_offset; if the scan missed it, it would miss others.
    shared = shared_functions()
    assert "noise_offset" in shared and "boundary_step" in shared, shared


def test_every_shared_function_has_an_oracle_test():
    shared = shared_functions()
    missing = sorted(set(shared) - set(ORACLES))
    assert not missing, f"production code calls reference.{missing} ({[shared[m] for m in missing]}): " \
                        "add an oracle test that does not call it and list it in ORACLES"
    stale = sorted(set(ORACLES) - set(shared))
    assert not stale, f"ORACLES lists {stale}, which no production module calls any more: drop them"


def test_every_listed_oracle_test_exists():
    defined = {}
    for entries in ORACLES.values():
        for entry in entries:
            file, name = entry.split("::")
            if file not in defined:
                tree = ast.parse((TESTS / file).read_text())
                defined[file] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert name in defined[file], f"{entry} is listed as an oracle but does not exist"
