"""ServeConfig and the `serve` options generated from it (no server, no JAX)."""

import argparse
import dataclasses
import subprocess
import sys

from mixllm_jax.serve.options import GROUPS, ServeConfig, add_serve_arguments, config_from_args, dest, leaf_fields

# the flags `mixllm-jax serve` had before they were generated from the fields
FLAGS = ("--checkpoint", "--backends", "--host", "--port", "--window-ms", "--max-batch", "--queue-limit",
         "--log-dir", "--checkpoint-every-s", "--keep-checkpoints", "--max-prompt-chars", "--max-prompts",
         "--feature-cache", "--max-inflight-proxy", "--route-on", "--no-book-load", "--warmup",
         "--compilation-cache", "--api-keys", "--insecure", "--max-llms", "--header-timeout-s", "--body-timeout-s",
         "--max-connections")


def parser():
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return p


def test_every_field_has_help_and_an_option():
    p = parser()
    dests = {a.dest: a for a in p._actions}
    leaves = leaf_fields()
    for _, f in leaves:
        assert f.metadata["help"], f.name
        assert dests[dest(f)].help, f.name
    assert len({dest(f) for _, f in leaves}) == len(leaves)  # one option each
    for flag in FLAGS:
        assert flag in p._option_string_actions, flag


def test_groups_are_nested_and_small():
    """The options are grouped in nested dataclasses (no class of serve/ has more than 15 fields)."""
    for cls in (ServeConfig, *GROUPS.values()):
        assert len(dataclasses.fields(cls)) <= 15, cls
    cfg = ServeConfig.of(checkpoint="ck", port=9, cluster="nats://h:1", max_llms=3)
    assert (cfg.http.port, cfg.cluster.url, cfg.cluster.enabled, cfg.limits.max_llms) == (9, "nats://h:1", True, 3)
    assert cfg == ServeConfig(checkpoint="ck", http=dataclasses.replace(ServeConfig(checkpoint="x").http, port=9),
                              cluster=GROUPS["cluster"](url="nats://h:1"), limits=GROUPS["limits"](max_llms=3))
    import pytest

    with pytest.raises(TypeError, match="nope"):
        ServeConfig.of(checkpoint="ck", nope=1)


def test_defaults_round_trip():
    cfg = config_from_args(parser().parse_args(["--checkpoint", "ck"]))
    assert cfg == ServeConfig(checkpoint="ck")
    cfg.check()


def test_flags_set_fields():
    cfg = config_from_args(parser().parse_args([
        "--checkpoint", "ck", "--port", "9", "--window-ms", "0.5", "--no-book-load", "--warmup",
        "--route-on", "conversation", "--compilation-cache", "off", "--max-body-bytes", "100"]))
    assert (cfg.http.port, cfg.batching.window_ms, cfg.batching.book_load, cfg.warmup) == (9, 0.5, False, True)
    assert (cfg.gateway.route_on, cfg.compilation_cache, cfg.http.max_body_bytes) == ("conversation", None, 100)


def test_non_loopback_needs_keys_or_insecure():
    import pytest

    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        ServeConfig.of(checkpoint="ck", host=host).check()
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        with pytest.raises(ValueError, match="without API keys"):
            ServeConfig.of(checkpoint="ck", host=host).check()
        ServeConfig.of(checkpoint="ck", host=host, insecure=True).check()
        ServeConfig.of(checkpoint="ck", host=host, api_keys="keys.yaml").check()


def test_config_is_light_to_import():
    code = ("import sys, mixllm_jax.serve, mixllm_jax.serve.options; "
            "print(sorted(m for m in ('jax', 'flax', 'starlette', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
