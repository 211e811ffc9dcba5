"""Every number in the docs' result tables is in the committed result file the table cites.

The convention (docs/development.md, "Result tables"): a markdown table in README.md or
docs/*.md cites its results with a `benchmarks/results/...` path (a file, or a folder: every
text file in it) in the 3 lines above its header row. Such a table is checked: every number
in its data cells, outside `code`, must be in a cited file, written the same way or as a
number that rounds to it at the table's precision (4.72 matches 4.7216; 99.40% matches 0.994
or 99.4; 175 ms matches 0.175 s; 12.6k matches 12,600). A table whose header names a measured
quantity (goodput, p99, GPU-h, tok/s, ratio, SLO, ...) must cite a file, unless the 3 lines
above it say "not a measurement". Tables of fields, metrics or policies cite nothing and are
skipped.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = "benchmarks/results"
CAPTION_LINES = 3
NOT_MEASURED = "not a measurement"
# Header words that make a table a result table, which must then cite its file.
RESULT_WORDS = re.compile(
    r"goodput|p50|p90|p99|gpu-h|tok/s|req/s|ratio|slo|throughput|ttft|tpot|latency|"
    r"hit rate|prefix hit|agreement|\bkl\b|completed|failed|orphans|preemptions|measured",
    re.I,
)
_PATH = re.compile(re.escape(RESULTS) + r"/[\w./-]*")
# A number in a table cell: thousands separators allowed; not part of a name (pow2, 688c03d, x1.75).
_CELL_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(%|k(?![\w]))?(?![\w.]\d|[\w])")
_FILE_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")


@dataclass
class Table:
    doc: str
    line: int  # 1-based line of the header row
    header: str
    rows: list[tuple[int, str]]  # (1-based line, text) of each data row
    caption: list[str]

    @property
    def cited(self) -> list[str]:
        paths = []
        for text in self.caption:
            for p in _PATH.findall(text):
                p = p.rstrip(".,:;)")
                if p.rstrip("/") != RESULTS and p not in paths:
                    paths.append(p)
        return paths


def tables(doc: str, text: str) -> list[Table]:
    lines = text.splitlines()
    found, i, fence = [], 0, False
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            fence = not fence
        is_row = not fence and lines[i].lstrip().startswith("|")
        if is_row and i + 1 < len(lines) and re.match(r"\s*\|[\s:|-]*-[\s:|-]*$", lines[i + 1]):
            j = i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            rows = [(k + 1, lines[k]) for k in range(i + 2, j)]
            found.append(Table(doc, i + 1, lines[i], rows, lines[max(0, i - CAPTION_LINES):i]))
            i = j
            continue
        i += 1
    return found


def cell_numbers(row: str) -> list[tuple[str, float, float, bool]]:
    """(as written, value, rounding tolerance, is a percentage) of every number outside `code`."""
    row = re.sub(r"`[^`]*`", " ", row).replace("**", "")
    out = []
    for m in _CELL_NUMBER.finditer(row):
        whole, frac, suffix = m.group(1), m.group(2) or "", m.group(3) or ""
        value = float(whole.replace(",", "") + frac)
        tolerance = 0.5 * 10 ** -(len(frac) - 1 if frac else 0) + 1e-9
        out.append((m.group(0), value, tolerance, suffix == "%"))
    return out


class ResultFile:
    """The numbers of one or more committed files, sorted, for lookups at any precision."""

    def __init__(self, paths: list[Path]):
        values = set()
        for path in paths:
            data = path.read_bytes()
            if b"\0" in data:  # a plot, not text
                continue
            for token in _FILE_NUMBER.findall(data.decode("utf-8", "replace")):
                parts = [token] + token.split(",")
                if re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", token):
                    parts.append(token.replace(",", ""))
                for part in parts:
                    try:
                        values.add(float(part))
                    except ValueError:
                        pass
        self.values = sorted(values)

    def _near(self, value: float, tolerance: float) -> bool:
        i = bisect.bisect_left(self.values, value - tolerance)
        return i < len(self.values) and self.values[i] <= value + tolerance

    def holds(self, value: float, tolerance: float, percent: bool) -> bool:
        # Units differ between docs and files: s / ms / µs, a share / a percentage, 12.6k / 12,600.
        scales = [1.0, 1e3, 1e-3] + ([100.0] if percent else [])
        return any(self._near(value / s, tolerance / s) for s in scales)


def cited_files(root: Path, cited: list[str]) -> tuple[list[Path], list[str]]:
    files, missing = [], []
    for p in cited:
        path = root / p
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.is_file())
        elif path.is_file():
            files.append(path)
        else:
            missing.append(p)
    return files, missing


def check(table: Table, root: Path = ROOT) -> list[str]:
    """What is wrong with one table: each problem names the doc, the line, the number and the file."""
    cited = table.cited
    if not cited:
        caption = " ".join(table.caption).lower()
        if RESULT_WORDS.search(table.header) and NOT_MEASURED not in caption:
            return [f"{table.doc}:{table.line}: a result table ({table.header.strip()}) cites no "
                    f"{RESULTS}/... file in the {CAPTION_LINES} lines above it"]
        return []
    files, missing = cited_files(root, cited)
    problems = [f"{table.doc}:{table.line}: cites {p}, which is not committed" for p in missing]
    numbers = ResultFile(files)
    names = ", ".join(cited)
    for line, row in table.rows:
        for written, value, tolerance, percent in cell_numbers(row):
            if not numbers.holds(value, tolerance, percent):
                problems.append(f"{table.doc}:{line}: {written} (table at line {table.line}) is not in {names}")
    return problems


def _doc_tables() -> list[Table]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [t for d in docs for t in tables(str(d.relative_to(ROOT)), d.read_text())]


DOC_TABLES = _doc_tables()


@pytest.mark.parametrize("table", DOC_TABLES, ids=[f"{t.doc}:{t.line}" for t in DOC_TABLES])
def test_result_table_numbers_are_in_the_cited_files(table):
    problems = check(table)
    assert not problems, "\n".join(problems)


def test_some_tables_are_checked():
    assert sum(bool(t.cited) for t in DOC_TABLES) >= 5


# The check itself, on a made-up doc: it must fail on a changed number and on a missing citation.

_DOC = """\
Results in `benchmarks/results/x/out.json`:

| policy | goodput req/s | SLO met | TTFT p99 |
|---|---|---|---|
| **a** (`threshold 7`) | 4.72 | 99.40% | 175 ms |
| pow2 | 1,131 | 12.6k | 0 |
"""


def _made_up(tmp_path, doc: str, data: str) -> list[str]:
    (tmp_path / "benchmarks/results/x").mkdir(parents=True)
    (tmp_path / "benchmarks/results/x/out.json").write_text(data)
    return [p for t in tables("doc.md", doc) for p in check(t, tmp_path)]


def test_check_accepts_rounded_scaled_and_separated_numbers(tmp_path):
    data = '{"gpu_hours": 4.7216, "slo": 0.993958, "tpot_p99_s": 0.175008, "n": 1131, "tok": 12600, "z": 0}'
    assert _made_up(tmp_path, _DOC, data) == []


def test_check_fails_on_a_changed_number(tmp_path):
    data = '{"gpu_hours": 4.7616, "slo": 0.993958, "tpot_p99_s": 0.175008, "n": 1131, "tok": 12600, "z": 0}'
    assert _made_up(tmp_path, _DOC, data) == [
        "doc.md:5: 4.72 (table at line 3) is not in benchmarks/results/x/out.json"]


def test_check_fails_without_a_citation(tmp_path):
    problems = _made_up(tmp_path, _DOC.replace("`benchmarks/results/x/out.json`", "the run"), "{}")
    assert len(problems) == 1 and "doc.md:3: a result table" in problems[0]
    exempt = _DOC.replace("Results in `benchmarks/results/x/out.json`", "Targets, not a measurement")
    assert _made_up(tmp_path / "b", exempt, "{}") == []


def test_check_fails_on_a_missing_file(tmp_path):
    doc = _DOC.replace("x/out.json", "x/gone.json")
    assert any("cites benchmarks/results/x/gone.json, which is not committed" in p
               for p in _made_up(tmp_path, doc, "{}"))


# Every results path a reader is pointed to exists, and the results index lists every result.

def _pointed_to() -> list[tuple[str, str]]:
    """(where, path) of every ``benchmarks/results/...`` path in the docs, the results READMEs and the code."""
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / RESULTS).rglob("README.md"),
             *(ROOT / "cluster").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    found = []
    for f in files:
        for p in _PATH.findall(f.read_text()):
            p = p.rstrip(".,:;)/")
            if p != RESULTS:
                found.append((str(f.relative_to(ROOT)), p))
    return found


def test_every_results_path_in_the_docs_and_code_exists():
    missing = []
    for where, p in _pointed_to():
        p = re.split(r"[A-Z]{3,}", p)[0]  # a placeholder (sim-fidelity-HHMM.json) ends the name
        if p.endswith(("-", "_")):  # a name pattern (soak-<stamp>.md): some result must start with it
            ok = any(q.name.startswith(p.rsplit("/", 1)[-1]) for q in (ROOT / p).parent.iterdir())
        else:
            ok = (ROOT / p).exists()
        if not ok:
            missing.append(f"{where}: {p}")
    assert len(_pointed_to()) > 20 and not missing, "\n".join(missing)


def test_the_results_index_lists_every_result():
    index = (ROOT / RESULTS / "README.md").read_text()
    unlisted = [p.name for p in (ROOT / RESULTS).iterdir() if p.name != "README.md"
                and f"`{p.name}" not in index and f"`{p.stem}." not in index and f", `{p.name}" not in index]
    assert not unlisted, f"not in {RESULTS}/README.md: {unlisted}"
