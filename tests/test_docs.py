"""The documentation resolves inside the repository: every docs page and section the code cites exists, no code
cites a note outside the repository, and every link of the README and the docs pages points at a file."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("alpaca_rlhf", "tests", "bench") for p in (ROOT / d).rglob("*.py")] + [ROOT / "cli.py"]


def cited(pattern: str) -> set[tuple[str, str]]:
    found = set()
    for path in SOURCES:
        for match in re.finditer(pattern, path.read_text()):
            found.add((str(path.relative_to(ROOT)), match.group(0)))
    return found


def test_every_docs_page_the_code_cites_exists():
    pages = {(where, ref) for where, ref in cited(r"docs/[a-z_-]+\.md")}
    assert pages, "the code cites no docs page: the pattern is wrong"
    missing = sorted((where, ref) for where, ref in pages if not (ROOT / ref).is_file())
    assert not missing, missing


def test_every_ppo_section_the_code_cites_exists():
    text = (ROOT / "docs/ppo.md").read_text()
    headings = set(re.findall(r"^#+ (\d+(?:\.\d+)?)\.? ", text, flags=re.M))
    items = {int(n) for n in re.findall(r"^(\d+)\. \*\*", text.split("## 3.")[1].split("## 4.")[0], flags=re.M)}
    convention = {int(n) for n in re.findall(r"^(\d+)\. ", text.split("## 4.")[1], flags=re.M)}
    assert {"1", "2.6", "2.14", "3", "4"} <= headings and len(items) >= 12 and len(convention) == 8
    refs = cited(r"docs/ppo\.md §[\d.]+(?:[-–]§?[\d.]+)?(?:,? (?:and )?§?[\d.]+)*(?: items? \d+(?: and \d+)?)?")
    assert len(refs) > 10
    for where, ref in refs:
        for section in re.findall(r"§([\d.]+\d)", ref):
            assert section in headings, (where, ref, section)
        item = re.search(r"§(\d) items? (\d+)(?: and (\d+))?", ref)
        if item:
            pool = items if item.group(1) == "3" else convention
            assert {int(n) for n in item.groups()[1:] if n} <= pool, (where, ref)


def test_no_code_cites_a_note_outside_the_repository():
    outside = cited(r"(?:\.\./shared/|\b)(?:PPO|ALGORITHMS|STYLE)\.md")
    assert not [(where, ref) for where, ref in outside if not ref.startswith("docs/")], outside


def test_readme_and_docs_links_resolve():
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "bench/README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            assert (page.parent / target).exists(), (page.name, target)


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text[: text.index("](")].split()) < 2000  # read before the first link
    assert len(text.splitlines()) < 250
    for page in ("recipe", "algorithms", "ppo", "inference", "models-and-memory", "reliability", "results"):
        assert f"](docs/{page}.md)" in text, page
