"""The service's guards without a server: API keys, the backend allow-list, the bounded JSON
parser, model specs, the journal's all-or-nothing writes, the first-in first-out feature store and
the checkpointed feedback flags (issue 12; the end-to-end tests are in test_security.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("yaml")

from mixllm_jax.serve.auth import AuthError, Authenticator, hash_key, is_loopback, load_keys  # noqa: E402
from mixllm_jax.serve.backends import load_backends_file, request_backend  # noqa: E402
from mixllm_jax.serve.http import ApiError, get_number, loads_checked, model_spec  # noqa: E402

DEFAULTS = {"ttft_s": 0.5, "tokens_per_s": 50.0, "max_concurrency": 8}


def keys_file(tmp_path, entries, name="keys.yaml"):
    import yaml

    p = tmp_path / name
    p.write_text(yaml.safe_dump({"keys": entries}))
    return p


def test_keys_file_and_roles(tmp_path):
    p = keys_file(tmp_path, [{"name": "app", "sha256": hash_key("k-app"), "roles": ["route", "feedback"]},
                             {"name": "ops", "sha256": "sha256:" + hash_key("k-ops").upper(), "roles": "admin"}])
    auth = Authenticator(load_keys(p))
    assert auth.check("Bearer k-app", "route").name == "app"
    assert auth.check("bearer   k-app ", "feedback").name == "app"
    assert auth.check("Bearer k-ops", "route").name == "ops"  # admin may call everything
    for header, role, status in [(None, "route", 401), ("Bearer nope", "route", 401), ("Basic k-app", "route", 401),
                                 ("Bearer", "route", 401), ("Bearer k-app", "admin", 403)]:
        with pytest.raises(AuthError) as e:
            auth.check(header, role)
        assert e.value.status == status
    assert Authenticator(None).check(None, "admin") is None  # no keys file: open (loopback)


@pytest.mark.parametrize("entries, needle", [
    ([{"name": "a", "sha256": "k-plain", "roles": ["route"]}], "64 hex digits"),
    ([{"name": "a", "sha256": hash_key("x"), "roles": ["root"]}], "roles"),
    ([{"name": "a", "sha256": hash_key("x"), "roles": []}], "roles"),
    ([{"name": "a", "sha256": hash_key("x"), "roles": ["route"]},
      {"name": "b", "sha256": hash_key("x"), "roles": ["route"]}], "the same key"),
    ([{"name": "a", "sha256": hash_key("x"), "roles": ["route"], "key": "x"}], "unknown key"),
    ([], "at least one key"),
])
def test_bad_keys_files_are_clear_errors(tmp_path, entries, needle):
    with pytest.raises(ValueError, match=needle):
        load_keys(keys_file(tmp_path, entries))


def test_loopback():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com", ""))


@pytest.fixture
def allow(tmp_path):
    p = tmp_path / "backends.yaml"
    p.write_text(json.dumps({"backends": {"m": {"base_url": "https://api.example.com/v1", "api_key_env": "EX_KEY"}},
                             "allow_hosts": ["127.0.0.1:9001", {"host": "api.example.com", "api_key_env": "EX_KEY"}]}))
    return load_backends_file(p)


@pytest.mark.parametrize("backend, status", [
    ({"base_url": "http://169.254.169.254/latest"}, 403),
    ({"base_url": "http://127.0.0.1:9002/v1"}, 403),
    ({"base_url": "http://127.0.0.1/v1"}, 403),  # port 80, not 9001
    ({"base_url": "http://127.0.0.1:9001@evil.example/v1"}, 422),
    ({"base_url": "http://evil.example#@127.0.0.1:9001/v1"}, 422),
    ({"base_url": "http://127.0.0.1:9001/v1", "api_key_env": "HOME"}, 403),
    ({"base_url": "gopher://127.0.0.1:9001/"}, 422),
    ({"base_url": "http://127.0.0.1:9001/v1\r\nX: y"}, 422),
    ({"base_url": "http://127.0.0.1:9001/v1", "timeout_s": 1e300}, 422),
    ({"base_url": "http://127.0.0.1:9001/v1", "url": "x"}, 422),
    ("http://127.0.0.1:9001/v1", 422),
])
def test_request_backends_need_the_allow_list(allow, backend, status):
    with pytest.raises(ApiError) as e:
        request_backend(backend, allow)
    assert e.value.status == status


def test_allowed_backends_take_the_entrys_key(allow):
    b = request_backend({"base_url": "https://API.example.com/v2", "model": "x"}, allow)
    assert b.api_key_env == "EX_KEY" and b.record() == {"base_url": "https://API.example.com/v2", "model": "x",
                                                        "timeout_s": 60.0, "context_window": None}
    assert "base_url" not in b.public() and "api_key_env" not in b.public()
    assert request_backend({"base_url": "http://127.0.0.1:9001/ok"}, allow).api_key_env is None


@pytest.mark.parametrize("text, needle", [
    ("[" * 5000 + "]" * 5000, "nested deeper than 64"),
    ('{"a": ' * 65 + "1" + "}" * 65, "nested deeper than 64"),
    ('{"a": ' + "1" * 401 + "}", "401 digits"),
    ('{"a": -' + "9" * 41 + "}", "41 digits"),
    ('{"a": 1e400}', "out of range"),
    ('{"a": NaN}', "NaN"),
    ('{"a": "\\ud800"}', "surrogate"),
    ('{"\\udfff": 1}', "surrogate"),
    ('{"a": ', "Expecting value"),
])
def test_bounded_json(text, needle):
    with pytest.raises(ValueError, match=needle):
        loads_checked(text)


def test_bounded_json_accepts_the_ordinary():
    assert loads_checked('{"a": [' * 30 + "1" + "]}" * 30)
    assert loads_checked('{"e": "\\ud83d\\ude00", "n": ' + "9" * 40 + ', "f": 3.5e38}')["e"] == "\U0001f600"


@pytest.mark.parametrize("field, value", [("price_in_per_mtok", 1e300), ("price_out_per_mtok", 10 ** 400),
                                          ("ttft_s", 1e300), ("tokens_per_s", 1e-300), ("prior", 1e300),
                                          ("max_concurrency", 33), ("max_concurrency", 2.0), ("name", "\ud800"),
                                          ("name", "a/b c"), ("name", "x" * 129), ("prior", "optimistic")])
def test_model_spec_refuses_poison(field, value):
    body = {"name": "ok-model", "price_in_per_mtok": 1.0, "price_out_per_mtok": 2.0, field: value}
    with pytest.raises(ApiError) as e:
        model_spec(body, 32, DEFAULTS)
    assert e.value.status == 422 and e.value.param == field


def test_get_number_never_overflows():
    for v in (10 ** 400, -(10 ** 400), float("inf"), float("nan")):
        with pytest.raises(ApiError):
            get_number({"k": v}, "k", lo=0, hi=1e6)
    with pytest.raises(AssertionError):  # a bound past float32 is a programming error
        get_number({"k": 1}, "k", lo=0, hi=1e39)


def test_journal_writes_a_group_whole_and_refuses_bad_records_alone(tmp_path):
    from mixllm_jax.store.journal import Journal

    j = Journal(tmp_path)
    j.start()
    with pytest.raises(ValueError, match="not valid JSON"):
        j.append({"type": "quality", "q": float("nan")})
    with pytest.raises(ValueError, match="not valid JSON"):
        j.append_many([{"type": "ok"}, {"type": "bad", "s": "\ud800"}])
    assert j.append_many([{"type": "a"}, {"type": "b"}]).result(30) == [1, 2]
    assert j.append({"type": "c"}).result(30) == 3
    j.close()
    assert [r["type"] for r in Journal(tmp_path).read()] == ["a", "b", "c"]


def test_feature_store_is_first_in_first_out_across_restarts(tmp_path):
    from mixllm_jax.store.journal import Entry, FeatureStore

    fs = FeatureStore(tmp_path, capacity=10)
    x = np.zeros(3, np.float32)
    for i in range(30):
        fs.put_many([(f"r{i}", Entry(x, 0, 0, "m", 1.0, 1.0))])
        if i >= 20:
            assert fs.get("r20") is not None  # reading it does not keep it alive
    live = [rid for rid, _ in fs.items()]
    assert live == [f"r{i}" for i in range(20, 30)]
    fs.close()
    again = FeatureStore(tmp_path, capacity=10)
    again.load()
    assert [rid for rid, _ in again.items()] == live  # a restart reloads exactly the same requests


def test_feedback_flags_round_trip_through_a_checkpoint_array():
    from mixllm_jax.serve.compute import applied_from_array, applied_to_array
    from mixllm_jax.serve.service import rid_key

    flags = {rid_key(f"req-{i}"): 1 + (i % 3) for i in range(50)}
    a = applied_to_array(flags)
    assert a.dtype == np.uint8 and a.shape == (51, 17)
    assert applied_from_array(a) == flags
    assert applied_from_array(applied_to_array({})) == {}


# ---- --cluster (serve/cluster.py): the pure parts; the replicas themselves are in test_cluster.py


@pytest.mark.parametrize("url, ok", [("nats://127.0.0.1:4222", True), ("tls://nats.internal:4222", True),
                                     ("http://127.0.0.1:4222", False), ("nats://127.0.0.1", False),
                                     ("nats://user:pw@host:4222", False), ("nats://h:4222/x", False)])
def test_cluster_url_is_checked(url, ok):
    from mixllm_jax.serve import ServeConfig

    cfg = ServeConfig.of(checkpoint="ck", cluster=url)
    if ok:
        cfg.check()
    else:
        with pytest.raises(ValueError, match="cluster must be nats://HOST:PORT"):
            cfg.check()
    with pytest.raises(ValueError, match="stream must be"):
        ServeConfig.of(checkpoint="ck", cluster="nats://h:1", stream="a.b").check()
    with pytest.raises(ValueError, match="concurrency_share"):
        ServeConfig.of(checkpoint="ck", concurrency_share=0.0).check()


def test_decision_record_round_trips_with_its_claims():
    from mixllm_jax.store.journal import Entry
    from mixllm_jax.serve.cluster import entry_from_json, entry_to_json, kv_key

    e = Entry(x=np.linspace(-3, 3, 7).astype(np.float32), slot=4, generation=12, model="m/x", prompt_tokens=9.0,
              log_tokens=3.5, propensity=0.25)
    back, flags = entry_from_json(entry_to_json(e, flags=2))
    assert flags == 2 and back.has_thumbs and not back.has_quality
    np.testing.assert_array_equal(back.x, e.x)
    assert (back.slot, back.generation, back.model, back.propensity) == (4, 12, "m/x", 0.25)
    assert kv_key("req-0af3") == "req-0af3"
    with pytest.raises(KeyError):
        kv_key("req.a>*")  # not a bucket key: no wildcard or subject separator reaches NATS


def test_newest_shared_checkpoint_is_the_highest_sequence(tmp_path):
    from mixllm_jax.serve.cluster import newest_checkpoint

    assert newest_checkpoint(tmp_path) is None
    for name, step, seq in (("a", 3, 40), ("b", 9, 17), ("c", 1, 41)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "latest.json").write_text(json.dumps({"step": step, "seq": seq}))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "latest.json").write_text("{not json")
    assert newest_checkpoint(tmp_path) == (tmp_path / "c", 1, 41)


def test_concurrency_share_closes_serving_slots():
    from mixllm_jax.core import state as S
    from mixllm_jax.serve.compute import reset_load

    st = S.init_state(4, 3, load_slots=8)
    st = st.replace(max_concurrency=np.array([8, 3, 1, 8], np.int32), active=np.array([True, True, True, False]))
    free = np.asarray(reset_load(st, 5.0, 0.5).free_at)
    np.testing.assert_array_equal(np.isfinite(free).sum(axis=1), [4, 2, 1, 0])  # ceil(share * limit), >= 1
    assert np.all(free[np.isfinite(free)] == 5.0)
    np.testing.assert_array_equal(np.isfinite(np.asarray(reset_load(st, 0.0).free_at)).sum(axis=1), [8, 3, 1, 0])
