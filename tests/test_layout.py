"""The layout is the flow: stats -> detect -> repair -> report, the Guard a thin facade on top.

Read from the source with ``ast`` (no import needed): no module of src/gradguard over 400 lines, guard.py at most
300, no import cycle between modules, and no room imports a room later in the flow or the facade above it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "gradguard"
FLOW = ["stats", "detect", "repair", "report"]  # each may import the ones before it, never the ones after
ABOVE = {"guard", "hooks", "runner", "cli", "demo", "demo_modes", "doctor", "integrations"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Modules of gradguard that ``path`` imports (relative imports resolved; names imported from a package that
    are modules themselves count as those modules)."""
    mod = module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("gradguard"):
                target = node.module
            else:
                continue
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("gradguard"))
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    return {m: {d for d in imports(p) if d in files and d != m} for m, p in files.items()}


def test_no_module_over_400_lines_and_a_thin_guard() -> None:
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n > 400} == {}
    assert sizes["gradguard.guard"] <= 300


def test_rooms_import_only_down_the_flow() -> None:
    wrong = []
    for mod, deps in graph().items():
        parts = mod.split(".")
        if len(parts) < 3 or parts[1] not in FLOW:
            continue
        for dep in deps:
            d = dep.split(".")
            if len(d) < 2:
                continue
            if d[1] in ABOVE or (d[1] in FLOW and FLOW.index(d[1]) > FLOW.index(parts[1])):
                wrong.append(f"{mod} -> {dep}")
    assert wrong == []


def find_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycles() -> None:
    g = graph()
    # A package's __init__ re-exports its modules; an edge into it is an edge into what it re-exports.
    packages = {m for m in g if PKG.joinpath(*m.split(".")[1:], "__init__.py").exists()}
    assert find_cycles({m: ds - packages for m, ds in g.items()}) == []


def test_the_checks_can_fail() -> None:
    """The oracles above find a hand-made cycle, and see real edges of this package."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    g = graph()
    assert "gradguard.stats.recorder" in g["gradguard.detect.judge"]  # judge reads the recorder's host rows
    assert "gradguard.guard" in g["gradguard.doctor"]


# Which rooms a module may say it is in, by its folder; top-level modules may be in any room but a folder's.
FOLDER_ROOMS = {"stats": {"the step recorder"}, "detect": {"the judge", "the mode watcher"},
                "repair": {"the repairer"}, "report": {"the outputs"}, "integrations": {"above the Guard"}}
TOP_ROOMS = {"the facade", "the mode watcher", "above the Guard", "shared values"}
ROOM_LINE = re.compile(r"Room: (?P<room>[^.]+)\. It may touch: (?P<touch>.*?)\.\s*$", re.S)


def room_claim(doc: str | None) -> tuple[str, set[str]] | None:
    """(room, names it may touch) from the docstring's ``Room: ... It may touch: ...`` paragraph, or None."""
    if not doc or "\nRoom: " not in doc:
        return None
    m = ROOM_LINE.search("Room: " + doc.split("\nRoom: ", 1)[1])  # the paragraph that starts a line with "Room: "
    if m is None:
        return None
    touch = m["touch"]
    names = set(re.findall(r"``([\w.]+)``", touch))
    if not names and " ".join(touch.split()) != "no other module":
        return None
    return " ".join(m["room"].split()), names


def untouchable(mod: str, deps: set[str], names: set[str]) -> list[str]:
    """Imports of ``mod`` that its claimed names do not cover: a name covers itself and, for a package other than
    gradguard itself, every module inside it."""
    def covered(dep: str) -> bool:
        short = dep.removeprefix("gradguard.") if dep != "gradguard" else "gradguard"
        return any(short == n or (n != "gradguard" and short.startswith(n + ".")) for n in names)
    return sorted(d for d in deps if not covered(d))


def test_every_module_says_its_room_and_what_it_may_touch() -> None:
    """README's Layout promises that each module's docstring names its room and what it may touch: the room must
    fit the module's folder, the names must exist, and every gradguard import of the module must be among them."""
    g = graph()
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    short_names = {m.removeprefix("gradguard.") for m in files} | {"gradguard"}
    wrong = []
    for mod, path in sorted(files.items()):
        claim = room_claim(ast.get_docstring(ast.parse(path.read_text())))
        if claim is None:
            wrong.append(f"{mod}: no 'Room: ... It may touch: ...' paragraph")
            continue
        room, names = claim
        folder = mod.split(".")[1] if mod.count(".") and mod.split(".")[1] in FOLDER_ROOMS else None
        if room not in (FOLDER_ROOMS[folder] if folder else TOP_ROOMS):
            wrong.append(f"{mod}: room {room!r} does not fit its folder")
        wrong += [f"{mod}: names {n!r}, which is no module" for n in sorted(names - short_names)]
        wrong += [f"{mod}: imports {d} without saying so" for d in untouchable(mod, g[mod], names)]
    assert wrong == []


def test_the_room_check_can_fail() -> None:
    """The docstring oracle reads what a docstring says, and finds an import it leaves out."""
    doc = "Title.\n\nRoom: the judge. It may touch: ``detect``,\n``stats.layers``.\n"
    assert room_claim(doc) == ("the judge", {"detect", "stats.layers"})
    assert room_claim("Title.\n\nRoom: the judge. It may touch: no other\nmodule.\n") == ("the judge", set())
    assert room_claim("Title.\n\nRoom: the judge. It may touch: everything.\n") is None
    assert room_claim("Title, with no room.") is None
    deps = {"gradguard.detect.history", "gradguard.stats.layers", "gradguard.stats.norms", "gradguard.guard"}
    assert untouchable("gradguard.detect.x", deps, {"detect", "stats.layers"}) == ["gradguard.guard",
                                                                                   "gradguard.stats.norms"]
    assert untouchable("gradguard.x", {"gradguard.guard"}, {"gradguard"}) == ["gradguard.guard"]
