"""The course's stored notebooks: at least eight chapters, every code cell executed, in order.
(Strict nbval compares stored outputs but runs a cell stored unexecuted without comparing it.)"""
import json
from pathlib import Path

CHAPTERS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_at_least_eight_chapters_numbered_in_order():
    assert len(CHAPTERS) >= 8
    assert [int(p.name[:2]) for p in CHAPTERS] == list(range(1, len(CHAPTERS) + 1))


def test_every_code_cell_executed_in_order():
    for path in CHAPTERS:
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        counts = [c.get("execution_count") for c in cells]
        assert counts == list(range(1, len(cells) + 1)), f"{path.name}: execution counts {counts}"
        errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{path.name} holds an error output"


def test_each_chapter_imports_wfnet_first_and_is_a_course_chapter():
    for path in CHAPTERS:
        cells = json.loads(path.read_text())["cells"]
        assert 10 <= len(cells) <= 30, f"{path.name}: {len(cells)} cells"
        first = next(c for c in cells if c["cell_type"] == "code")
        src = "".join(first["source"])
        assert "sys.path" in src and "import wfnet" in src and "FULL = " in src, path.name
