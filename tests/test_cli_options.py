"""The command line's options and output: reference checked first, --no-baselines on test-only data,
--cost-weights / --budgets grids, progress only on a terminal, the train summary, a compact report."""
import pytest

from mixllm_jax import cli, data
from mixllm_jax.cli import offline
from mixllm_jax.util import progress

MODELS = str(data.routerbench_dir() / "models.json")


def test_grids_parse_sort_and_refuse_bad_values():
    assert offline._grid("100, 0,10", "--cost-weights") == [0.0, 10.0, 100.0]
    assert offline._grid("24.18%,10", "--budgets", percent=True) == [10.0, 24.18]
    assert offline._grid(None, "--budgets") is None
    for bad, opt, pct in (("1,x", "--cost-weights", False), ("-1", "--cost-weights", False),
                          ("0", "--budgets", True), ("inf", "--cost-weights", False)):
        with pytest.raises(ValueError, match=opt):
            offline._grid(bad, opt, percent=pct)


@pytest.mark.parametrize("with_models", [True, False])
def test_unknown_reference_is_one_line_before_any_work(tmp_path, capsys, with_models):
    """Checked before the router is restored (it does not even exist here) or anything embedded."""
    argv = ["eval", "--router", str(tmp_path / "no-router"), "--reference", "gpt-5", "--out", str(tmp_path / "o")]
    if with_models:  # a JSONL file that does not exist: the models file alone answers
        argv += ["--data", str(tmp_path / "none.jsonl"), "--models", MODELS]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixllm-jax: error: --reference 'gpt-5' is not an LLM of ")
    assert "gpt-4-1106-preview" in err[0] and "mistralai/mixtral-8x7b-chat" in err[0]  # the names, listed
    assert not (tmp_path / "o").exists()


def test_default_reference_is_the_most_expensive_llm_of_the_models_file():
    specs = data.load_models(MODELS)
    names = [s.name for s in specs]
    assert offline._reference(None, names, "x", specs) == "gpt-4-1106-preview"
    import dataclasses

    dear = [dataclasses.replace(s, price_in_per_mtok=1e4) if s.name == "mistralai/mistral-7b-chat" else s
            for s in specs]
    assert offline._reference(None, names, "x", dear) == "mistralai/mistral-7b-chat"


def test_progress_only_on_a_terminal(capsys, monkeypatch):
    assert not progress.enabled()  # pytest captures: not a terminal
    with progress.step("quiet step"):
        pass
    assert list(progress.bar(range(3), desc="quiet bar")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "enabled", lambda: True)
    with progress.step("loud step"):
        pass
    assert "loud step: " in capsys.readouterr().err


def test_train_summary_format():
    s = {"domains": {f"d{i}": i for i in range(20)}, "budget": "25% of gpt-4's cost",
         "fit": {"gpt-4": {"n": 10, "quality_rmse": 0.25, "cost_ratio": 1.02},
                 "llama": {"n": 0, "quality_rmse": None, "cost_ratio": None}},
         "cost_weight": 120.0, "mix_cost_weight": 300.0, "mix": 0.4,
         "held_out": {"spend_usd": 0.0012, "quality": 0.71, "n_queries": 40},
         "ridge": 300.0, "domain_precision": 1000.0}
    out = offline.format_train_summary(s)
    assert "prior: ridge 300 on the embedding, domain intercepts' precision 1e+03 (pulled towards" in out
    assert "precision 0.1 (free)" in offline.format_train_summary({**s, "domain_precision": 0.1})
    assert "20 domains" in out and "d19 (19)" in out and "8 more" in out
    assert "0.2500" in out and "1.020" in out and "llama" in out
    assert "25% of gpt-4's cost -> cost weight (lambda) 120, 40.0% of queries at 300" in out
    assert "quality 0.710" in out


# End to end (train summary, eval grids, --no-baselines on a test-only file, compact report.json):
# tests/test_readme.py, on the router the README's own commands train.


def test_data_llms_missing_from_the_router_is_an_error_before_embedding(tmp_path, capsys, monkeypatch):
    import types

    from mixllm_jax.offline import train

    fake = types.SimpleNamespace(registry=types.SimpleNamespace(slots={"gpt-4-1106-preview": 0, "claude-v2": 1}))
    monkeypatch.setattr(offline, "restore", lambda args: fake)
    monkeypatch.setattr(train, "embed", lambda *a, **k: pytest.fail("embedded before the check"))
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--router", str(tmp_path), "--no-baselines", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "are not LLMs of the router" in err and "mistralai/mistral-7b-chat" in err


def test_run_is_train_then_eval_with_their_defaults(monkeypatch, tmp_path):
    """`run` hands train and eval namespaces parsed by their own parsers (every option present, a new
    one included: one missing once broke `make run`), with run's options in them."""
    seen = {}
    monkeypatch.setattr(cli, "cmd_train", lambda a: seen.setdefault("train", a) and tmp_path / "ck")
    monkeypatch.setattr(cli, "cmd_eval", lambda a: seen.setdefault("eval", a))
    ap = cli.build_parser()
    cli.cmd_run(ap.parse_args(["run", "--max-length", "64", "--router-out", str(tmp_path / "ck"),
                               "--report-out", str(tmp_path / "r")]))
    train, ev = seen["train"], seen["eval"]
    want = ap.parse_args(["train"])
    assert set(vars(train)) == set(vars(want))  # every train option, nothing else
    assert (train.max_length, train.budget, train.budget_reference, train.out) == (
        64, "24.18%", "gpt-4-1106-preview", str(tmp_path / "ck"))
    assert set(vars(ev)) == set(vars(ap.parse_args(["eval", "--router", "x"])))
    assert (ev.router, ev.reference, ev.out, ev.split, ev.no_baselines, ev.compare) == (
        str(tmp_path / "ck"), "gpt-4-1106-preview", str(tmp_path / "r"), "test", False, None)
