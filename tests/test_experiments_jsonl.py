"""The experiments on any JSONL log (--data / --models / --reference), with an `ood` split: tiny data written here."""

import json

import numpy as np
import pytest

from mixllm_jax import cli
from mixllm_jax.sim import experiments as E

MODELS = [  # name, USD per million tokens in / out; latency profile
    ("big", 10.0, 30.0), ("mid-a", 1.0, 2.0), ("mid-b", 1.0, 2.0), ("small", 0.1, 0.2)]
# mean quality per task: "big" is good everywhere, each mid LLM on its own tasks, "small" nowhere
SKILL = {"a": [0.9, 0.8, 0.2, 0.1], "b": [0.9, 0.2, 0.8, 0.1], "c": [0.8, 0.7, 0.1, 0.1], "d": [0.8, 0.1, 0.7, 0.1]}
SPLITS = {"train": {"a": 30, "b": 30}, "test": {"a": 15, "b": 15}, "ood": {"c": 15, "d": 15}}


def write_log(tmp_path, blind=False):
    """A JSONL log (one line per query and LLM) and its models file; blind: every LLM has the same
    prices and answer lengths, so every LLM costs the same on every query (like routerdc7)."""
    rng = np.random.default_rng(0)
    models = tmp_path / "models.json"
    models.write_text(json.dumps({"models": [
        {"name": n, "price_in_per_mtok": 1.0 if blind else pin, "price_out_per_mtok": 1.0 if blind else pout,
         "ttft_s": 0.5,
         "tokens_per_s": 50.0, "max_concurrency": 4} for n, pin, pout in MODELS]}))
    lines = []
    for split, tasks in SPLITS.items():
        for task, n in tasks.items():
            for i in range(n):
                qid, p_tok = f"{split}-{task}-{i}", float(20 + i)
                for j, (name, pin, pout) in enumerate(MODELS):
                    c_tok = 10.0 if blind else float(10 + 5 * j)
                    pin, pout = (1.0, 1.0) if blind else (pin, pout)
                    lines.append({"query_id": qid, "prompt": f"task {task} question {i}", "model": name,
                                  "quality": float(rng.random() < SKILL[task][j]), "tags": [task], "split": split,
                                  "prompt_tokens": p_tok, "completion_tokens": c_tok,
                                  "cost": (p_tok * pin + c_tok * pout) * 1e-6})
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return log, models


def test_out_of_domain_on_a_jsonl_with_an_ood_split(tmp_path, capsys):
    log, models = write_log(tmp_path)
    out = tmp_path / "runs"
    cli.main(["experiment", "out-of-domain", "--quick", "--data", str(log), "--models", str(models),
              "--reference", "big", "--seeds", "0,1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "## The data's `ood` split" in printed and "Over seeds 0, 1" in printed
    r = json.loads((out / "out-of-domain.json").read_text())
    assert r["reference"] == "big" and r["data"]["n_ood"] == 30 and r["data"]["cost_blind"] is False
    assert r["tasks"] == ["a", "b"] and r["skipped_tasks"] == []  # held-out tasks, as on RouterBench
    s = r["ood_split"]  # the ood split: train on train, stream part of the ood queries, evaluate on the rest
    assert s["tasks"] == ["c", "d"] and s["n_stream"] + s["n_eval"] == 30 and s["n_stream"] == 16
    assert set(s["modes"]) == {"none", "refined", "binary", "refined_greedy", "refined_thompson"}
    assert all(len(m["regret"]["n"]) and m["regret"]["n"][-1] == s["n_stream"] for m in s["modes"].values())
    for m in s["modes"].values():
        assert m["stream"]["n"] == s["n_stream"] and set(m["by_task"]) == {"c", "d"}
        assert 0.0 <= m["by_task"]["c"]["mean_quality"] <= 100.0
    assert s["modes"]["none"]["drop_rel_pct"] is not None
    assert s["mean_quality_over_tasks"]["oracle"] >= s["mean_quality_over_tasks"]["best_single"]
    o = r["ood_split_seeds"]  # each seed draws its own halves; the figures are averaged over them
    assert o["seeds"] == [0, 1] and len(o["per_seed"]) == 2
    assert o["per_seed"][0]["refined"]["regret"] == s["modes"]["refined"]["regret"]["final"]
    for m in s["modes"]:
        per = [p[m]["drop_rel_pct"] for p in o["per_seed"]]
        assert abs(o["mean"][m]["drop_rel_pct"] - (per[0] + per[1]) / 2) < 1e-9
    h = r["held_out_seeds"]  # the held-out tasks too: each seed orders the streams, means over seeds
    first = np.mean([e["modes"]["refined"]["drop_rel_pct"] for e in r["per_task"]])
    assert h["seeds"] == [0, 1] and h["per_seed"][0]["refined"]["drop_rel_pct"] == pytest.approx(first)
    assert r["mean_drop_rel_pct"]["refined"] == pytest.approx(np.mean([p["refined"]["drop_rel_pct"] for p in h["per_seed"]]))
    red = r["drop_reduction_pct_points"]["ood_split_refined"]
    assert abs(red - (o["mean"]["refined"]["drop_rel_pct"] - o["mean"]["none"]["drop_rel_pct"])) < 1e-9
    assert (out / "out-of-domain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cost_blind_data_and_default_llm_changes(tmp_path):
    (tmp_path / "blind").mkdir()
    (tmp_path / "priced").mkdir()
    log, models = write_log(tmp_path / "blind", blind=True)  # every LLM costs the same on every query
    blind = E.load_data(quick=True, data_path=log, models=models, reference="big")
    assert E.cost_blind(blind.train) and blind.info()["cost_blind"]  # calibrates to cost weight 0
    log, models = write_log(tmp_path / "priced")
    priced = E.load_data(quick=True, data_path=log, models=models, reference="big")
    assert not E.cost_blind(priced.train)
    added, removed = E.default_changes(priced.train, "big")  # not RouterBench: chosen from the data
    assert len(added) == 1 and {added[0], removed} == {"mid-a", "mid-b"}


def test_data_options_are_checked(tmp_path, capsys):
    log, models = write_log(tmp_path)
    with pytest.raises(ValueError, match="not a model of the data"):
        E.load_data(quick=True, data_path=log, models=models)  # gpt-4-1106-preview is not in this log
    with pytest.raises(ValueError, match="needs its models file"):
        E.load_data(quick=True, data_path=log)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["experiment", "latency", "--quick", "--data", str(log)])
    assert exit_.value.code == 2 and "--models is required" in capsys.readouterr().err
