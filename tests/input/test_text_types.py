"""Text in any Arrow type: pandas 2 (object), pandas 3 (`large_string`), Polars (`string_view`), categoricals
(dictionary-encoded). Every one gives the same ids, prompts and answers, from a Parquet file, the command line
and run_frame. `make test` runs this file under pandas 2 as well (.venv-pandas2)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import output_of
from hypothesis import given
from hypothesis import strategies as st

import batch
from batch.config import PromptSpec
from batch.input.prompts import PromptBuilder, RowPromptError
from batch.input.reader import InputTable
from batch.simulator import answer_for

TEXT_TYPES = {
    "string": pa.string(),
    "large_string": pa.large_string(),
    "string_view": pa.string_view(),
    "dictionary": pa.dictionary(pa.int32(), pa.string()),
    "dictionary of large_string": pa.dictionary(pa.int8(), pa.large_string()),
}
TEMPLATE = "{title}: {body}"


def typed(values: list[str | None], type_: pa.DataType) -> pa.Array:
    array = pa.array(values, pa.string())
    if pa.types.is_dictionary(type_):
        encoded = array.dictionary_encode()
        return pa.DictionaryArray.from_arrays(encoded.indices.cast(type_.index_type),
                                              encoded.dictionary.cast(type_.value_type))
    return array.cast(type_)


def prompts_of(path: Path, id_column: str | None) -> list[tuple[str, object, int | None]]:
    """Each row's id, and its messages (or why it cannot be sent) and prompt hash, as a run reads them."""
    builder = PromptBuilder(PromptSpec(template=TEMPLATE))
    table = InputTable(path, id_column, builder.columns, [])
    table.scan()
    seen = []
    for row in table.rows():
        try:
            sent: object = builder.messages(row.values)
        except RowPromptError as exc:
            sent = str(exc)
        seen.append((row.id, sent, row.prompt_hash))
    return seen


# Any unicode Arrow can hold (UTF-8: no lone surrogates), blanks and nulls included.
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)


@given(rows=st.lists(st.tuples(st.none() | texts, st.none() | texts), min_size=1, max_size=12),
       ids=st.booleans(), title_type=st.sampled_from(sorted(TEXT_TYPES)), body_type=st.sampled_from(sorted(TEXT_TYPES)))
def test_any_arrow_text_type_gives_the_same_ids_and_prompts(tmp_path_factory, rows, ids, title_type, body_type):
    folder = tmp_path_factory.mktemp("types")
    titles, bodies = [r[0] for r in rows], [r[1] for r in rows]
    row_ids = [f"k{i}" for i in range(len(rows))]

    def written(name: str, types: tuple[pa.DataType, pa.DataType]) -> Path:
        columns = {"title": typed(titles, types[0]), "body": typed(bodies, types[1])}
        if ids:
            columns["key"] = typed(row_ids, types[0])
        pq.write_table(pa.table(columns), folder / name)
        return folder / name

    plain = prompts_of(written("plain.parquet", (pa.string(), pa.string())), "key" if ids else None)
    other = prompts_of(written("typed.parquet", (TEXT_TYPES[title_type], TEXT_TYPES[body_type])),
                       "key" if ids else None)
    assert other == plain


@given(rows=st.lists(st.tuples(texts, texts), min_size=1, max_size=8))
def test_the_same_text_from_csv_or_jsonl_gives_the_prompts_parquet_gives(tmp_path_factory, rows):
    """CSV has no null (an empty field is empty text), so the values here are text; their prompts and ids match."""
    folder = tmp_path_factory.mktemp("formats")
    frame = pd.DataFrame({"key": [f"k{i}" for i in range(len(rows))], "title": [r[0] for r in rows],
                          "body": [r[1] for r in rows]}, dtype=object)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), folder / "rows.parquet")
    frame.to_csv(folder / "rows.csv", index=False, lineterminator="\r\n")  # which quotes a value holding a bare \r
    frame.to_json(folder / "rows.jsonl", orient="records", lines=True, force_ascii=False)
    from_parquet = prompts_of(folder / "rows.parquet", "key")
    for name in ("rows.csv", "rows.jsonl"):
        assert prompts_of(folder / name, "key") == from_parquet, name


def local_model(url: str) -> dict:
    return {"provider": "local", "name": "glm-4-flash", "base_url": url, "params": {"max_tokens": 64}}


def expected(title: str, body: str) -> str:
    return answer_for("glm-4-flash", [{"role": "user", "content": TEMPLATE.format(title=title, body=body)}])


FRAME_DTYPES = {
    "default": None,  # pandas 3: str (Arrow large_string); pandas 2: object
    "string[pyarrow]": "string[pyarrow]",
    "large_string": pd.ArrowDtype(pa.large_string()),
    "string_view": pd.ArrowDtype(pa.string_view()),
    "category": "category",
}


@pytest.mark.parametrize("dtype", sorted(FRAME_DTYPES))
def test_run_frame_takes_text_columns_of_any_dtype(sim, tmp_path, dtype):
    titles, bodies = ["Café", "雨", "plain"], ["über alles", "下雨了", "text"]
    frame = pd.DataFrame({"title": titles, "body": bodies}, index=pd.Index(["a", "b", "c"], name="key"),
                         dtype=FRAME_DTYPES[dtype])
    answered = batch.run_frame(frame, template=TEMPLATE, model=local_model(sim.url), output=tmp_path / "o.parquet",
                               progress=False)
    assert answered["status"].tolist() == ["ok"] * 3
    assert answered["response"].tolist() == [expected(t, b) for t, b in zip(titles, bodies)]


@pytest.mark.parametrize("type_name", sorted(TEXT_TYPES))
def test_a_parquet_of_any_text_type_runs_from_the_command_line(sim, make_job, run_cli, tmp_path, type_name):
    titles, bodies = ["Café", "雨", "plain"], ["über alles", "下雨了", "text"]
    type_ = TEXT_TYPES[type_name]
    job = make_job(sim, input_file="typed.parquet", rows=[{"review_id": "x"}], prompt={"template": TEMPLATE},
                   output={"path": "out/result.parquet", "keep_columns": ["title"]})
    pq.write_table(pa.table({"review_id": typed(["r1", "r2", "r3"], type_), "title": typed(titles, type_),
                             "body": typed(bodies, type_)}), tmp_path / "typed.parquet")
    assert run_cli("validate", job)[0] == 0
    assert run_cli("run", job)[0] == 0
    result = output_of(job)
    assert result["review_id"].tolist() == ["r1", "r2", "r3"]
    assert result["title"].tolist() == titles
    assert result["response"].tolist() == [expected(t, b) for t, b in zip(titles, bodies)]
