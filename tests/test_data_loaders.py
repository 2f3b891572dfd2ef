"""Paper-task loaders: hub-format fixture files, pinned prompts, local formats, errors, drops."""

import json
import logging
import os

import datasets
import pytest

from molf_jax.data import load_task, render_example

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SQL_DIR = os.path.join(FIXTURES, "synthetic_text_to_sql")
MED_DIR = os.path.join(FIXTURES, "medmcqa")
COUNTERFACT = os.path.join(FIXTURES, "counterfact.json")


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_sql_fixture_uses_hub_splits_and_pins_the_alpaca_prompt():
    data = load_task("sql", SQL_DIR)
    assert (len(data.train), len(data.eval)) == (3, 2)
    assert data.eval[0]["sql_prompt"] == "List the titles of books published after 2000."
    example = render_example("sql", data.train[0])
    assert example.prompt == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n"
        "What is the total volume of timber sold by each salesperson, sorted by salesperson?\n\n"
        "### Input:\n"
        "CREATE TABLE salesperson (salesperson_id INT, name TEXT, region TEXT); INSERT INTO "
        "salesperson (salesperson_id, name, region) VALUES (1, 'John Doe', 'North'), (2, 'Jane "
        "Smith', 'South'); CREATE TABLE timber_sales (sales_id INT, salesperson_id INT, volume "
        "REAL, sale_date DATE); INSERT INTO timber_sales (sales_id, salesperson_id, volume, "
        "sale_date) VALUES (1, 1, 120, '2021-01-01'), (2, 1, 150, '2021-02-01'), (3, 2, 180, "
        "'2021-01-01');\n\n"
        "### Response:\n"
    )
    assert example.target == data.train[0]["sql"] and example.add_eos


def test_sql_prompt_without_schema_context():
    record = load_task("sql", SQL_DIR).train[2]
    example = render_example("sql", record, sql_with_context=False)
    assert example.prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n"
        "What is the total capacity of solar plants in Spain?\n\n### Response:\n"
    )


def test_med_fixture_reads_zero_based_cop_and_pins_the_prompt():
    data = load_task("med", MED_DIR)
    # The hub's "validation" split is the evaluation split; its unlabelled "test" is unused.
    assert [r["id"][-1] for r in data.eval] == ["3", "4"]
    example = render_example("med", data.train[0])
    assert example.prompt == (
        "Question: A 40-year-old man presents with 5 days of productive cough and fever. "
        "Pseudomonas aeruginosa is isolated from a pulmonary abscess. CBC shows an acute effect "
        "characterized by marked leukocytosis (50,000 mL) and the differential count reveals a "
        "shift to left in granulocytes. Which of the following terms best describes these "
        "hematologic findings?\n"
        "A. Leukemoid reaction\nB. Leukopenia\nC. Myeloid metaplasia\nD. Neutrophilia\n"
        "Answer:"
    )
    assert example.target == " A" and not example.add_eos
    assert [render_example("med", r).target for r in data.train] == [" A", " C", " B"]


def test_med_one_based_original_json_with_cop_base_1(tmp_path):
    rows = load_task("med", MED_DIR).train
    one_based = [{**r, "cop": r["cop"] + 1} for r in rows]
    path = _write_jsonl(tmp_path / "dev.jsonl", one_based)
    data = load_task("med", path, cop_base=1, eval_fraction=0.34, seed=0)
    assert sorted(r["cop"] for r in data.train + data.eval) == sorted(r["cop"] for r in rows)


def test_med_cop_out_of_range_names_file_column_and_hint(tmp_path):
    rows = [{**r, "cop": 4} for r in load_task("med", MED_DIR).train]
    path = _write_jsonl(tmp_path / "raw.jsonl", rows)
    with pytest.raises(ValueError, match=r"raw\.jsonl.*'cop'.*cop_base=1"):
        load_task("med", path)


def test_fact_fixture_pins_the_rewrite_prompt_and_evaluates_the_same_cases():
    data = load_task("fact", COUNTERFACT)
    example = render_example("fact", data.train[0])
    assert (example.prompt, example.target) == ("The mother tongue of Danielle Darrieux is",
                                               " English")
    assert data.eval == data.train  # edits are evaluated on the cases they rewrite
    assert data.train[0]["neighborhood_prompts"][0] == "The mother tongue of L\u00e9on Blum is"


def test_fact_prompt_dicts_are_flattened(tmp_path):
    record = json.load(open(COUNTERFACT))[1]
    record["neighborhood_prompts"] = [{"prompt": p, "target": "Vienna"}
                                      for p in record["neighborhood_prompts"]]
    path = tmp_path / "mcf.json"
    path.write_text(json.dumps([record]))
    loaded = load_task("fact", str(path)).train[0]
    assert loaded["neighborhood_prompts"] == ["Karl Hofer was born in",
                                              "The birthplace of Anna Weiss is"]


@pytest.mark.parametrize("kind", ["json_list", "jsonl", "parquet", "saved_dataset", "saved_dict"])
def test_every_local_format_reads_the_same_records(tmp_path, kind):
    reference = load_task("sql", SQL_DIR)
    rows = reference.train + reference.eval
    if kind == "json_list":
        path = tmp_path / "sql.json"
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        path = _write_jsonl(tmp_path / "sql.jsonl", rows)
    elif kind == "parquet":
        path = tmp_path / "sql.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "saved_dataset":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        path = tmp_path / "saved_dict"
        datasets.DatasetDict({
            "train": datasets.Dataset.from_list(reference.train),
            "test": datasets.Dataset.from_list(reference.eval),
        }).save_to_disk(str(path))
    data = load_task("sql", str(path), eval_fraction=0.4, seed=3)
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(data.train + data.eval, key=key) == sorted(rows, key=key)
    if kind == "saved_dict":
        assert data.eval == reference.eval
    else:  # no evaluation split: 40% of 5 rows carved out by the seed
        assert len(data.eval) == 2
        again = load_task("sql", str(path), eval_fraction=0.4, seed=3)
        assert again.eval == data.eval


def test_missing_file_is_named():
    with pytest.raises(FileNotFoundError, match="no_such_file.jsonl"):
        load_task("sql", "tests/fixtures/no_such_file.jsonl")


def test_wrong_columns_name_file_and_column(tmp_path):
    rows = [{"sql_prompt": "q", "context": "c", "sql": "SELECT 1;"}]
    path = _write_jsonl(tmp_path / "renamed.jsonl", rows)
    with pytest.raises(ValueError, match=r"renamed\.jsonl.*'sql_context'"):
        load_task("sql", path)


def test_missing_nested_counterfact_field_is_named(tmp_path):
    record = json.load(open(COUNTERFACT))[2]
    del record["requested_rewrite"]["target_true"]
    path = tmp_path / "broken_cf.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(ValueError, match=r"broken_cf\.json.*requested_rewrite\.target_true"):
        load_task("fact", str(path))


def test_empty_split_names_folder_and_split(tmp_path):
    reference = load_task("med", MED_DIR)
    folder = tmp_path / "with_empty_validation"
    (folder / "data").mkdir(parents=True)
    train = datasets.Dataset.from_list(reference.train)
    train.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    train.select([]).to_parquet(str(folder / "data" / "validation-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match=r"with_empty_validation \[validation\]: split is empty"):
        load_task("med", str(folder))


def test_empty_file_is_named(tmp_path):
    path = tmp_path / "nothing.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match=r"nothing\.jsonl: file is empty"):
        load_task("sql", str(path))


def test_unlabelled_rows_are_dropped_with_a_logged_count(tmp_path, caplog):
    rows = load_task("med", MED_DIR).train
    rows = rows + [{**rows[0], "id": "x1", "cop": -1}, {**rows[1], "id": "x2", "cop": -1},
                   {**rows[2], "id": "x3", "question": "  "}]
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="molf_jax.data"):
        data = load_task("med", path, eval_fraction=0.3)
    assert len(data.train) + len(data.eval) == 3
    assert data.dropped == {"train: unlabelled: cop is missing or -1": 2,
                            "train: empty question": 1}
    assert "dropped 2 of 6 rows (unlabelled" in caplog.text
    assert "dropped 1 of 6 rows (empty question)" in caplog.text


def test_a_split_with_no_usable_rows_is_an_error():
    with pytest.raises(ValueError, match=r"\[test\]: no usable rows"):
        load_task("med", MED_DIR, eval_split="test")


def test_unknown_task_and_split_are_errors():
    with pytest.raises(ValueError, match="unknown task"):
        load_task("math", SQL_DIR)
    with pytest.raises(ValueError, match="no evaluation split 'dev'"):
        load_task("sql", SQL_DIR, eval_split="dev")
