"""The course's stored notebooks: at least eight chapters, every code cell executed, in order.
(Strict nbval compares stored outputs but runs a cell stored unexecuted without comparing it.)"""
import json, re
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


def _text(cell):
    """Everything a code cell printed (stdout, stderr, text/plain), as one string."""
    out = []
    for o in cell.get("outputs", []):
        out.append("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")))
    return "".join(out)


def test_every_decimal_in_the_prose_is_in_the_chapters_outputs():
    """Prose states claims, cells show the digits: a decimal number written in a chapter's markdown
    (outside links) must appear in one of that chapter's stored outputs, or it has gone stale."""
    for path in CHAPTERS:
        cells = json.loads(path.read_text())["cells"]
        outputs = " ".join(_text(c) for c in cells if c["cell_type"] == "code")
        prose = " ".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        prose = re.sub(r"\]\([^)]*\)|https?://\S+|arXiv:? ?\d{4}\.\d{4,5}", " ", prose)   # links, paper ids
        missing = [n for n in re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", prose) if n not in outputs]
        assert not missing, f"{path.name}: the prose says {missing}, which no stored output shows"


def test_an_ignored_output_goes_with_an_assert_or_is_the_cache_speaking():
    """A cell marked NBVAL_IGNORE_OUTPUT prints digits that differ between machines; it asserts the
    claim they support, unless all it prints is the cache's loaded/trained messages."""
    cache = re.compile(r"^(loaded|reusing|trained|untrained|retrained|saved|\S+ was made with other settings)\b")
    for path in CHAPTERS:
        for i, c in enumerate(json.loads(path.read_text())["cells"]):
            src = "".join(c["source"])
            if c["cell_type"] != "code" or "NBVAL_IGNORE_OUTPUT" not in src or "assert" in src:
                continue
            lines = [s for s in _text(c).splitlines() if s.strip()]
            assert all(cache.match(s) for s in lines), f"{path.name} cell {i}: ignored output, no assert"


def test_source_listings_are_compared():
    """inspect.getsource prints the same text on every machine: nbval compares it, so a stale listing fails."""
    for path in CHAPTERS:
        for c in json.loads(path.read_text())["cells"]:
            src = "".join(c["source"])
            if "getsource" in src:
                assert "NBVAL_IGNORE_OUTPUT" not in src, f"{path.name}: a source listing is ignored"


def test_every_chapter_links_its_neighbours_and_ends_with_what_to_remember_and_exercises():
    for k, path in enumerate(CHAPTERS):
        cells = json.loads(path.read_text())["cells"]
        prose = " ".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        if k > 0:
            assert f"({CHAPTERS[k - 1].name})" in prose, f"{path.name}: no link to {CHAPTERS[k - 1].name}"
        if k + 1 < len(CHAPTERS):
            assert f"({CHAPTERS[k + 1].name})" in prose, f"{path.name}: no link to {CHAPTERS[k + 1].name}"
        assert "arxiv.org/abs/2304.02049" in prose, f"{path.name}: no link to the paper"
        tail = "".join(cells[-1]["source"]) if cells[-1]["cell_type"] == "markdown" else ""
        assert "What to remember" in tail and "Exercises" in tail, f"{path.name}: no closing summary"
        for link in re.findall(r"\]\(([^)#]+\.(?:md|ipynb|py))[)#]", prose):
            assert (path.parent / link).resolve().exists(), f"{path.name}: broken link {link}"
