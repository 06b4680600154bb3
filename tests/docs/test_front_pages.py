"""The front page and the guides (issue 25): README.md starts with the two commands and links only to files that
exist, as GitHub resolves them; the site's home page is README.md; every failure class a row can be recorded with
is explained on Reading a run, and every business code's class is in its generated table."""

from __future__ import annotations

import ast
import re

import generate

from batch.checkpoint.answered import INTERRUPTED, RETRYABLE_LATER
from batch.providers import ZHIPU_CODES

ROOT = generate.ROOT
README = ROOT / "README.md"
# A failure that is never a row's record: a Batch API result file downloaded short is downloaded again, and after
# retry.max_attempts the run stops (exit 3) with the batch unmerged.
NOT_A_ROW_CLASS = {"short_download"}


def _links(text: str) -> list[str]:
    """The relative targets of a Markdown text's links (not web addresses, not anchors within the page)."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [target for target in targets if not re.match(r"[a-z]+:", target) and not target.startswith("#")]


def test_the_readme_shows_make_demo_and_make_test_first():
    text = README.read_text(encoding="utf-8")
    first_block = re.search(r"```sh\n(.*?)```", text, re.DOTALL)
    assert first_block is not None
    assert first_block.group(1).split() == ["make", "demo", "make", "test"]


def test_every_link_of_the_readme_is_a_file_of_the_repository():
    links = _links(README.read_text(encoding="utf-8"))
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        assert (ROOT / link.split("#")[0]).is_file(), link


def test_the_sites_home_page_is_the_readme_with_its_links_into_docs():
    home = generate.readme_as_home()
    assert "[[[" not in home  # cog's markers stay in README.md
    assert home.startswith("# batch\n")
    for link in _links(home):
        assert (ROOT / "docs" / link.split("#")[0]).is_file(), link


def _recorded_classes() -> set[str]:
    """Every error_class the code can give a row's record: a Failure that is retried or fails the row (the record
    takes its class once retries run out), a record made failed by name, the business codes' row classes, the
    classes --retry-failed sends again, and the record of a row whose paid answers a stop cut short."""
    found = set(ZHIPU_CODES.row.values()) | RETRYABLE_LATER | {INTERRUPTED}
    for path in (ROOT / "batch").rglob("*.py"):
        if "simulator" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or len(node.args) < 2:
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            scope, error_class = node.args[0], node.args[1]
            if not (isinstance(error_class, ast.Constant) and isinstance(error_class.value, str)):
                continue
            if name == "Failure" and isinstance(scope, ast.Constant) and scope.value in ("retry", "row"):
                found.add(error_class.value)
            elif name == "failed_record":
                found.add(error_class.value)
    return found - NOT_A_ROW_CLASS


def test_every_failure_class_a_row_can_have_is_explained_on_reading_a_run():
    page = (ROOT / "docs" / "reading-a-run.md").read_text(encoding="utf-8")
    classes = _recorded_classes()
    assert {"rate_limited", "bad_prompt", "batch_expired", "batch_cancelled", "interrupted"} <= classes
    for error_class in classes:
        assert re.search(rf"^\| `{error_class}` \|", page, re.MULTILINE) or f"`{error_class}` (" in page, error_class


def test_the_business_codes_table_gives_every_code_its_class():
    table = generate.business_codes()
    for code, error_class in ZHIPU_CODES.row.items():
        row = next(line for line in table.splitlines() if re.search(rf"\b{code}\b", line))
        assert f"`{error_class}` | the row fails" in row, code
    for codes, error_class in ZHIPU_CODES.job:
        first = next(line for line in table.splitlines() if re.search(rf"(^\| |, ){codes.start}\b", line))
        assert f"`{error_class}` | the job stops" in first, codes
    for code in ZHIPU_CODES.rate_limited:
        assert re.search(rf"\b{code}\b.*`rate_limited` \| retried", table), code


def test_the_providers_tables_name_every_provider_and_its_key():
    from batch.providers import PROVIDERS

    tables = generate.providers_tables()
    for provider in PROVIDERS.values():
        assert f"| `{provider.name}` | `{provider.base_url}` | `{provider.api_key_env}` |" in tables


def test_a_section_of_the_job_file_is_the_references_rows_for_it():
    section = generate.job_file_section("limits")
    reference = generate.job_file_reference()
    for line in section.splitlines()[2:]:
        assert line in reference
    assert "| `limits.concurrency` | whole number | `8` | 1 to 4096 |" in section
