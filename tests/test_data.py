"""Loaders: models file, long JSONL (each error with a tiny file), RouterBench slice, token recovery."""

import json
import math

import numpy as np
import pytest

from mixllm_jax.data import (DataError, Dataset, ModelSpec, load_jsonl, load_models,
                             load_routerbench, recover_tokens, routerbench_dir,
                             split_offline_online, write_jsonl)

RB = routerbench_dir()
needs_rb = pytest.mark.skipif(not (RB / "models.json").exists(), reason=f"RouterBench slice not at {RB}")


# ------------------------------------------------------------------------------ models file


def _write_models(path, models):
    path.write_text(json.dumps({"models": models}))
    return path


TWO = [
    {"name": "big", "price_in_per_mtok": 10.0, "price_out_per_mtok": 30.0, "ttft_s": 0.5},
    {"name": "small", "price_in_per_mtok": 1.0, "price_out_per_mtok": 1.0},
]


@pytest.fixture
def models_file(tmp_path):
    return _write_models(tmp_path / "models.json", TWO)


def test_load_models(models_file):
    specs = load_models(models_file)
    assert [s.name for s in specs] == ["big", "small"]
    assert specs[0].price_in == pytest.approx(1e-5) and specs[0].price_out == pytest.approx(3e-5)
    assert specs[0].ttft_s == 0.5 and specs[1].ttft_s is None


@needs_rb
def test_load_models_routerbench():
    specs = load_models(RB / "models.json")
    assert len(specs) == 11 and specs[0].name == "gpt-4-1106-preview"
    assert all(s.max_concurrency and s.tokens_per_s and s.ttft_s for s in specs)


@pytest.mark.parametrize("models, field, value", [
    ([{**TWO[0], "price_in_per_mtok": -1.0}], "price_in_per_mtok", "-1.0"),
    ([TWO[0], {**TWO[1], "name": "big"}], "name", "'big'"),
    ([{"name": "big", "price_in_per_mtok": 1.0}], "price_out_per_mtok", None),
    ([{**TWO[1], "max_concurrency": 0}], "max_concurrency", "0"),
    ([{**TWO[1], "price_in": 1.0}], "price_in", None),
])
def test_load_models_errors(tmp_path, models, field, value):
    path = _write_models(tmp_path / "m.json", models)
    with pytest.raises(ValueError) as e:
        load_models(path)
    msg = str(e.value)
    assert "m.json" in msg and f"'{field}'" in msg and ("'big'" in msg or "'small'" in msg)
    if value is not None:
        assert value in msg


# ------------------------------------------------------------------------------ JSONL


def _jsonl(tmp_path, lines, name="log.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


GOOD = [
    {"query_id": "q1", "prompt": "2+2?", "model": "big", "quality": 1.0, "cost": 0.001,
     "prompt_tokens": 10, "tags": ["math"], "split": "train", "latency_s": 1.5},
    {"query_id": "q1", "prompt": "2+2?", "model": "small", "quality": 0.0,
     "prompt_tokens": 10, "completion_tokens": 5, "split": "train"},
    {"query_id": "q2", "prompt": "hi", "model": "small", "quality": 0.5, "cost": 2e-5, "tags": "chat",
     "split": "test"},
]


def test_load_jsonl_valid(tmp_path, models_file):
    d = load_jsonl(_jsonl(tmp_path, GOOD), models_file)
    assert len(d) == 2 and d.models == ["big", "small"] and d.query_ids == ["q1", "q2"]
    assert d.tags == [("math",), ("chat",)] and d.split == ["train", "test"]
    np.testing.assert_allclose(d.quality[0], [1.0, 0.0])
    assert d.quality[1, 1] == 0.5 and math.isnan(d.quality[1, 0]) and math.isnan(d.cost[1, 0])
    # cost missing -> tokens x prices: 10 * 1e-6 + 5 * 1e-6
    assert d.cost[0, 1] == pytest.approx(15e-6)
    # completion tokens missing -> from cost and prompt tokens: (0.001 - 10 * 1e-5) / 3e-5 = 30
    assert d.completion_tokens[0, 0] == pytest.approx(30.0)
    assert d.prompt_tokens[0] == 10
    assert d.report["prompt_tokens_estimated"] == 1 and d.prompt_tokens[1] == pytest.approx(2 / 4)
    assert d.latency_s is not None and d.latency_s[0, 0] == 1.5 and math.isnan(d.latency_s[0, 1])
    assert d.report["skipped_lines"] == 0
    parts = d.by_split()
    assert list(parts) == ["train", "test"] and parts["test"].query_ids == ["q2"]
    assert load_jsonl(_jsonl(tmp_path, GOOD), load_models(models_file), split="test").query_ids == ["q2"]


BASE = {"query_id": "q9", "prompt": "p", "model": "big", "quality": 1.0, "cost": 0.01}


@pytest.mark.parametrize("bad, field, value", [
    ('{"query_id": "q9", "prompt": ', None, None),  # invalid JSON
    ('{"query_id": "q9", "prompt": "p", "model": "big", "quality": NaN, "cost": 1}', None, "NaN"),
    ({**BASE, "quality": 1.5}, "quality", "1.5"),
    ({**BASE, "quality": "good"}, "quality", "'good'"),
    ({**BASE, "model": "gpt-9"}, "model", "'gpt-9'"),
    ({**BASE, "cost": -0.5}, "cost", "-0.5"),
    ({k: v for k, v in BASE.items() if k != "prompt"}, "prompt", None),
    ({k: v for k, v in BASE.items() if k != "cost"}, "cost", None),
    ({**BASE, "query_id": "q1", "prompt": "other"}, "prompt", "'other'"),
    ({**BASE, "query_id": "q1", "prompt": "2+2?"}, "model", "'big'"),  # duplicate (query, model)
    ({**BASE, "completion_tokens": -3}, "completion_tokens", "-3"),
    ("[1, 2]", None, None),
])
def test_load_jsonl_errors_name_file_line_field_value(tmp_path, models_file, bad, field, value):
    path = _jsonl(tmp_path, [GOOD[0], bad, GOOD[2]])
    with pytest.raises(DataError) as e:
        load_jsonl(path, models_file)
    msg = str(e.value)
    assert f"log.jsonl:2:" in msg and e.value.line == 2
    if field is not None:
        assert f"field '{field}'" in msg and e.value.field == field
    if value is not None:
        assert value in msg


def test_load_jsonl_query_without_outcomes(tmp_path, models_file):
    path = _jsonl(tmp_path, [GOOD[0], {**BASE, "quality": None}, {**BASE, "model": "small", "quality": None}])
    with pytest.raises(DataError, match=r"log.jsonl:2: field 'quality': query 'q9' has no scored outcome"):
        load_jsonl(path, models_file)


def test_load_jsonl_skip_counts_and_reports(tmp_path, models_file):
    path = _jsonl(tmp_path, [GOOD[0], {**BASE, "quality": 2}, "not json", GOOD[1], GOOD[2],
                             {**BASE, "query_id": "q7", "quality": None}])
    d = load_jsonl(path, models_file, on_error="skip")
    assert d.query_ids == ["q1", "q2"]
    assert d.report["skipped_lines"] == 2 and d.report["skipped_queries"] == 1
    assert len(d.report["errors"]) == 3 and ":2:" in d.report["errors"][0]


def test_load_jsonl_bad_on_error(tmp_path, models_file):
    with pytest.raises(ValueError, match="on_error"):
        load_jsonl(_jsonl(tmp_path, GOOD), models_file, on_error="ignore")


# ------------------------------------------------------------------------------ token recovery


def test_recover_tokens_exact_and_fallback():
    pin = np.array([1e-6, 1e-6, 1e-6])
    pout = np.array([1e-6, 2e-6, 3e-6])  # ratios 1, 2, 3
    p_true = np.array([100.0, 40.0])
    n_true = np.array([[7.0, 1.0, 1.0], [12.0, 30.0, 9.0]])
    cost = p_true[:, None] * pin + n_true * pout
    responses = [["x y z", "A", "A"], ["aaa", "bbb", "ccc"]]  # row 0: models 1 and 2 answer the same
    p, n, exact = recover_tokens(cost, pin, pout, responses, prompt_chars=np.array([400.0, 4 * 41.0]))
    assert exact.tolist() == [True, False]
    assert p[0] == 100 and n[0].tolist() == [7, 1, 1]
    # row 1: estimate 41 snapped to the nearest p with integer n for ratios 2 and 3 (p = 40 mod 6)
    assert p[1] == 40 and n[1].tolist() == [12, 30, 9]
    np.testing.assert_allclose(p[:, None] * pin + n * pout, cost, rtol=1e-12)


# ------------------------------------------------------------------------------ RouterBench


@pytest.fixture(scope="module")
def rb_train():
    return load_routerbench(split="train")


@pytest.fixture(scope="module")
def rb_test():
    return load_routerbench(split="test")


@needs_rb
def test_routerbench_rows_and_defects(rb_train, rb_test):
    tr, te = rb_train.report["tasks"], rb_test.report["tasks"]
    raw = {t: (tr[t]["rows_read"], te[t]["rows_read"]) for t in tr}
    assert raw == {"arc_challenge": (1039, 445), "mbpp": (299, 128), "winogrande": (887, 380)}
    arc_tr, arc_te = tr["arc_challenge"], te["arc_challenge"]
    assert arc_tr["duplicate_rows_dropped"] == 7 and len(arc_tr["duplicate_ids"]) == 7
    assert arc_tr["overlap_rows_dropped"] == 6 and len(arc_te["ids_also_in_train"]) == 6
    assert arc_tr["rows_with_empty_score_read"] + arc_te["rows_with_empty_score_read"] == 28
    assert arc_te["duplicate_rows_dropped"] == 1  # also one in test (not in the data README)
    for t in ("mbpp", "winogrande"):
        assert tr[t]["rows_kept"] == tr[t]["rows_read"] and te[t]["rows_kept"] == te[t]["rows_read"]
    # after defects: duplicate halves, overlap and rows with an empty score are gone
    assert arc_tr["rows_kept"] == 1039 - 7 - 6 - 7 and len(rb_train) == 1019 + 299 + 887
    assert arc_te["rows_kept"] == 445 - 1 - 7 and len(rb_test) == 437 + 128 + 380
    for d in (rb_train, rb_test):
        assert len(set(d.query_ids)) == len(d)
        assert not np.isnan(d.quality).any() and set(np.unique(d.quality)) <= {0.0, 1.0}
        assert d.quality.shape == d.cost.shape == d.completion_tokens.shape == (len(d), 11)
    assert not set(rb_train.query_ids) & set(rb_test.query_ids)
    assert {t for (t,) in rb_train.tags} == {"arc-challenge", "mbpp", "winogrande"}


@needs_rb
def test_routerbench_missing_keep_and_error(rb_test):
    kept = load_routerbench(split="test", tasks=["arc-challenge"], missing="keep")
    assert len(kept) == 444 and int(np.isnan(kept.quality).any(axis=1).sum()) == 7
    assert int(np.isnan(kept.quality).sum()) == kept.report["tasks"]["arc_challenge"]["empty_score_cells"]
    with pytest.raises(DataError, match="sample_id.*duplicated id"):
        load_routerbench(split="train", tasks=["arc_challenge"], on_defect="error")
    # of each duplicated pair the more complete half is kept: only gpt-3.5's score is empty there
    tr = load_routerbench(split="train", tasks=["arc_challenge"], missing="keep")
    dup = [tr.query_ids.index(i) for i in tr.report["tasks"]["arc_challenge"]["duplicate_ids"]]
    assert np.isnan(tr.quality[dup]).sum(axis=1).tolist() == [1] * 7
    assert np.isnan(tr.quality[dup, tr.models.index("gpt-3.5-turbo-1106")]).all()
    clean = load_routerbench(split="train", tasks=["winogrande"], on_defect="error")
    assert len(clean) == 887


@needs_rb
def test_routerbench_token_recovery(rb_train, rb_test):
    for d in (rb_train, rb_test):
        rebuilt = d.prompt_tokens[:, None].astype(np.float64) * d.price_in + \
            d.completion_tokens.astype(np.float64) * d.price_out
        np.testing.assert_allclose(rebuilt, d.cost, rtol=1e-6)
        assert (d.completion_tokens >= 0).all() and (d.prompt_tokens > 0).all()
        # every count is an integer (exact rows exactly, MBPP rows by the lattice snap)
        assert np.array_equal(d.completion_tokens, np.round(d.completion_tokens))
        assert np.array_equal(d.prompt_tokens, np.round(d.prompt_tokens))
    tok = rb_train.report["tokens"]
    assert tok["exact_rows_by_task"] == {"arc-challenge": 1018, "mbpp": 0, "winogrande": 887}
    # by hand, winogrande.dev.1: gpt-4 and gpt-3.5 both answer "B"; costs 0.00347 and 0.000346 give
    # p + 3n = 347 and p + 2n = 346, so n = 1, p = 344; claude-instant ("A)") 0.00028 / 0.8e-6 = 344 + 3*2
    i = rb_test.query_ids.index("winogrande.dev.1")
    n = dict(zip(rb_test.models, rb_test.completion_tokens[i]))
    assert rb_test.prompt_tokens[i] == 344
    assert (n["gpt-4-1106-preview"], n["gpt-3.5-turbo-1106"], n["claude-instant-v1"]) == (1, 1, 2)


@needs_rb
def test_routerbench_prompts_and_subsets():
    d = load_routerbench(split="test", tasks=["mbpp"], models=["mistralai/mistral-7b-chat", "gpt-4-1106-preview"])
    assert len(d) == 128 and d.models == ["mistralai/mistral-7b-chat", "gpt-4-1106-preview"]
    assert d.price_in[1] == pytest.approx(1e-5) and all(p.strip() for p in d.prompts)
    arc = load_routerbench(split="test", tasks=["arc_challenge"])
    assert all(p.rstrip().endswith("Answer:") for p in arc.prompts)  # the question is at the end
    with pytest.raises(ValueError, match="unknown model 'gpt-9'"):
        load_routerbench(split="test", tasks=["mbpp"], models=["gpt-9"])
    with pytest.raises(ValueError, match="split"):
        load_routerbench(split="val")


@needs_rb
def test_routerbench_jsonl_round_trip(rb_test, tmp_path):
    part = rb_test.select(np.arange(0, len(rb_test), 19))
    path = tmp_path / "rb.jsonl"
    assert write_jsonl(part, path) == len(part) * 11
    back = load_jsonl(path, part.specs)
    assert back.query_ids == part.query_ids and back.tags == part.tags and back.split == part.split
    assert back.prompts == part.prompts
    for name in ("quality", "cost", "completion_tokens", "prompt_tokens"):
        np.testing.assert_array_equal(getattr(back, name), getattr(part, name), err_msg=name)
    assert back.report["skipped_lines"] == 0 and back.report["prompt_tokens_estimated"] == 0


# ------------------------------------------------------------------------------ Dataset helpers


def _tiny(n=10):
    return Dataset(
        query_ids=[f"q{i}" for i in range(n)], prompts=["p"] * n, tags=[("t",)] * n, models=["a", "b"],
        quality=np.zeros((n, 2)), cost=np.ones((n, 2)), prompt_tokens=np.ones(n),
        completion_tokens=np.ones((n, 2)), split=["train"] * n,
        specs=[ModelSpec("a", 1.0, 2.0), ModelSpec("b", 0.5, 0.5)],
    )


def test_dataset_select_and_validation():
    d = _tiny()
    s = d.select(np.array([True, False] * 5))
    assert len(s) == 5 and s.query_ids == ["q0", "q2", "q4", "q6", "q8"] and s.cost.shape == (5, 2)
    assert d.select(3).query_ids == ["q3"]
    assert d.quality.dtype == np.float32
    with pytest.raises(ValueError, match="prompts"):
        Dataset(query_ids=["a"], prompts=[], tags=[()], models=["m"], quality=[[1]], cost=[[1]],
                prompt_tokens=[1], completion_tokens=[[1]], split=["train"])


def test_split_offline_online():
    d = _tiny(10)
    off, on = split_offline_online(d, 0.3, seed=1)
    assert len(off) == 3 and len(on) == 7
    assert sorted(off.query_ids + on.query_ids) == sorted(d.query_ids)
    assert split_offline_online(d, 0.3, seed=1)[1].query_ids == on.query_ids  # seeded
    with pytest.raises(ValueError, match="frac_offline"):
        split_offline_online(d, 1.5)


# ------------------------------------------------------------------------------ malformed inputs (issue 12 #7)

HUGE = "1" * 401  # a 401-digit integer literal


@pytest.mark.parametrize("raw, field", [
    (b'{"query_id": "q9", "prompt": "\xff\xfe", "model": "big", "quality": 1.0, "cost": 0.01}', None),  # not UTF-8
    (('{"query_id": "q9", "prompt": "p", "model": "big", "quality": 1.0, "cost": %s}' % HUGE).encode(), None),
    (('{"query_id": %s, "prompt": "p", "model": "big", "quality": 1.0, "cost": 0.01}' % HUGE).encode(), None),
    (b'{"query_id": "q9", "prompt": "p", "model": "big", "quality": 1.0, "cost": 1e400}', None),  # inf
    (b'{"query_id": "q9", "prompt": "p", "model": "big", "quality": 1.0, "cost": 1e30}', "cost"),
    (b'{"query_id": "q9", "prompt": "p", "model": "big", "quality": 1.0, "cost": 0.1, "prompt_tokens": 1e30}',
     "prompt_tokens"),
    (b'{"query_id": "q9", "prompt": "p", "model": "big", "quality": 1.0, "cost": 0.1, '
     b'"completion_tokens": 1e12}', "completion_tokens"),
    (b'{"query_id": "q9", "prompt": "p", "model": "big", "quality": 1.0, "cost": 0.1, "latency_s": 1e9}',
     "latency_s"),
    (b'{"query_id": "q9", "prompt": "\\ud800", "model": "big", "quality": 1.0, "cost": 0.01}', "prompt"),
    (b'[' * 5000 + b']' * 5000, None),
    (b'{"query_id": "q9", "prompt": "p", "model": "big", "quality": ' + HUGE.encode() + b', "cost": 0.01}', None),
])
def test_malformed_jsonl_is_a_data_error_naming_file_line_field(tmp_path, models_file, raw, field):
    path = tmp_path / "log.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode() + b"\n" + raw + b"\n" + json.dumps(GOOD[2]).encode() + b"\n")
    with pytest.raises(DataError) as e:
        load_jsonl(path, models_file)
    assert "log.jsonl:2:" in str(e.value) and e.value.line == 2 and len(str(e.value)) < 400
    if field is not None:
        assert f"field '{field}'" in str(e.value)


def test_truncated_gzip_jsonl_is_a_data_error(tmp_path, models_file):
    import gzip

    blob = gzip.compress("".join(json.dumps(x) + "\n" for x in GOOD * 50).encode())
    path = tmp_path / "log.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="log.jsonl.gz:.*cannot be read"):
        load_jsonl(path, models_file)


@pytest.mark.parametrize("raw, field", [
    (b'{"models": [{"name": "big", "price_in_per_mtok": 1.0, "price_out_per_mtok": 1.0, "x": "\xff"}]}', None),
    (('{"models": [{"name": "big", "price_in_per_mtok": %s, "price_out_per_mtok": 1}]}' % HUGE).encode(), None),
    (b'{"models": [{"name": "big", "price_in_per_mtok": 1e30, "price_out_per_mtok": 1}]}', "price_in_per_mtok"),
    (b'{"models": [{"name": "big", "price_in_per_mtok": 1, "price_out_per_mtok": 1e400}]}', None),
    (b'{"models": [{"name": "big", "price_in_per_mtok": 1, "price_out_per_mtok": 1, "max_concurrency": 1e9}]}',
     "max_concurrency"),
    (b'{"models": [{"name": "big", "price_in_per_mtok": 1, "price_out_per_mtok": 1, "ttft_s": 1e20}]}', "ttft_s"),
    (b'{"models": [{"name": "big", "price_in_per_mtok": 1, "price_out_per_mtok": 1, "tokens_per_s": '
     + ("9" * 39).encode() + b'}]}', "tokens_per_s"),
    (b'{"models": [{"name": "\\ud800", "price_in_per_mtok": 1, "price_out_per_mtok": 1}]}', "name"),
    (b'{"models": ' + b'[' * 5000 + b']' * 5000 + b'}', None),
])
def test_malformed_models_file_is_a_data_error(tmp_path, raw, field):
    path = tmp_path / "m.json"
    path.write_bytes(raw)
    with pytest.raises(DataError) as e:
        load_models(path)
    assert "m.json" in str(e.value) and len(str(e.value)) < 400
    if field is not None:
        assert f"'{field}'" in str(e.value)


def _rb_dir(tmp_path, csv_bytes: bytes):
    """A RouterBench-like folder with one task file (train) and the two-model models.json."""
    d = tmp_path / "rb"
    d.mkdir()
    _write_models(d / "models.json", TWO)
    (d / "task_train.csv").write_bytes(csv_bytes)
    return d


RB_HEADER = b"sample_id,prompt,eval_name,big,big|total_cost,big|model_response,small,small|total_cost,small|model_response\n"


@pytest.mark.parametrize("body, needle", [
    (b"", "header but no rows"),
    (b's1,"[\'q\']",task,1,0.001,A,0,0.0001,B\ns2,"[\'\xff\']",task,1,0.001,A,0,0.0001,B\n', "not UTF-8"),
    (b's1,"[\'q\']",task,1,1e30,A,0,0.0001,B\n', "cost must be a finite number"),
    (b's1,"[\'q\']",task,1,' + HUGE.encode() + b',A,0,0.0001,B\n', "cost must be a finite number"),
    (b's1,"[\'q\']",task,1,inf,A,0,0.0001,B\n', "cost must be a finite number"),
    (b's1,"[\'\\ud800\']",task,1,0.001,A,0,0.0001,B\n', "surrogate"),
    (b's1,"[\'q\']",task,1,0.001,A\n', "different number of fields"),
    (b's1,"' + b'[' * 5000 + b'",task,1,0.001,A,0,0.0001,B\n', "prompt"),
])
def test_malformed_routerbench_csv_is_a_data_error(tmp_path, body, needle):
    d = _rb_dir(tmp_path, RB_HEADER + body)
    with pytest.raises(DataError) as e:
        load_routerbench(d, split="train")
    assert "task_train.csv" in str(e.value) and needle in str(e.value) and len(str(e.value)) < 500
