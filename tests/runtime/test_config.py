"""load_config: file < HMOE_* environment < flags; types, ranges and choices refused with config_invalid
and a message naming the option; unknown sections and options refused wherever they come from."""

from __future__ import annotations

import dataclasses

import pytest

from hmoe.runtime.config import SECTIONS, Config, load_config
from hmoe.runtime.errors import HmoeError


@pytest.fixture
def toml(tmp_path):
    def write(text: str):
        path = tmp_path / "hmoe.toml"
        path.write_text(text)
        return path

    return write


def refused(match: str, **kwargs) -> HmoeError:
    with pytest.raises(HmoeError) as info:
        load_config(**{"env": {}, **kwargs})
    assert info.value.code == "config_invalid", info.value
    assert match in info.value.message, info.value.message
    return info.value


def test_nothing_given_is_every_default():
    assert load_config(env={}) == Config()


def test_file_then_environment_then_flags(toml):
    path = toml('[worker]\nmax_batch = 8\nkv_cache_gib = 3\n[router]\nmax_queued = 10\n[shm]\nprefix = "file."\n')
    env = {"HMOE_WORKER_MAX_BATCH": "16", "HMOE_SHM_PREFIX": "env.", "HOME": "/x", "HMOE_ROUTERX": "ignored"}
    flags = {"worker": {"max_batch": 24, "micro_batches": None}, "router": {"log_level": "debug"}}
    assert load_config(path, env={}).worker.max_batch == 8
    assert load_config(path, env=env).worker.max_batch == 16
    config = load_config(path, env=env, overrides=flags)
    assert config.worker.max_batch == 24  # the flag wins
    assert config.worker.micro_batches == 2  # a flag not given (None) leaves the default
    assert config.worker.kv_cache_gib == 3.0 and isinstance(config.worker.kv_cache_gib, float)  # TOML int -> float
    assert config.router.max_queued == 10 and config.router.log_level == "debug"
    assert config.shm.prefix == "env."  # the [shm] section is loaded like the others


def test_the_process_environment_is_read_when_none_is_passed(monkeypatch):
    monkeypatch.setenv("HMOE_WORKER_KV_BLOCK_SIZE", "32")
    assert load_config().worker.kv_block_size == 32


@pytest.mark.parametrize(
    "text, value", [("0.5", 0.5), (" 2 ", 2.0), ("1e-2", 0.01)], ids=["fraction", "spaces", "exponent"]
)
def test_environment_strings_become_numbers(text, value):
    assert load_config(env={"HMOE_WORKER_KV_CACHE_GIB": text}).worker.kv_cache_gib == value


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"env": {"HMOE_WORKER_MAX_BATCH": "lots"}}, "[worker] max_batch: 'lots' is not an integer"),
        ({"env": {"HMOE_WORKER_MAX_BATCH": "2.5"}}, "[worker] max_batch"),
        ({"overrides": {"worker": {"max_batch": True}}}, "[worker] max_batch"),
        ({"overrides": {"worker": {"kv_cache_gib": "big"}}}, "[worker] kv_cache_gib"),
        ({"overrides": {"router": {"frontend": 5555}}}, "[router] frontend"),
    ],
)
def test_values_of_the_wrong_type_are_refused(kwargs, match):
    refused(match, **kwargs)


def test_a_file_value_of_the_wrong_type_is_refused(toml):
    refused("[worker] max_batch: 8.5 is not an integer", path=toml("[worker]\nmax_batch = 8.5\n"))


RANGES = [
    (section, name, low, high)
    for section, cls in SECTIONS.items()
    for name, (low, high) in getattr(cls, "_ranges", {}).items()
]


@pytest.mark.parametrize("section, name, low, high", RANGES, ids=[f"{s}.{n}" for s, n, _, _ in RANGES])
def test_every_range_admits_its_bounds_and_refuses_past_them(section, name, low, high):
    env = f"HMOE_{section.upper()}_{name.upper()}"
    assert getattr(getattr(load_config(env={env: str(low)}), section), name) == low
    assert getattr(getattr(load_config(env={env: str(high)}), section), name) == high
    step = 1 if isinstance(low, int) else max(abs(low), 1.0) * 1e-3
    for outside in (low - step, high + step * max(1, high)):
        error = refused(f"[{section}] {name} = ", env={env: str(outside)})
        assert f"outside its sane range [{low}, {high}]" in error.message


def test_ranges_guard_the_options_that_matter():
    """Not just whatever the table says: the limits the engines rely on are there."""
    worker = SECTIONS["worker"]._ranges
    assert worker["micro_batches"] == (1, 2) and worker["max_batch"][0] >= 1 and worker["kv_block_size"][0] >= 1
    assert SECTIONS["router"]._ranges["heartbeat_liveness"][0] >= 2


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(text):
    refused("[worker] kv_cache_gib = ", env={"HMOE_WORKER_KV_CACHE_GIB": text})


@pytest.mark.parametrize(
    "section, name, good, bad",
    [("worker", "experts", "torch", "gpu"), ("worker", "dtype", "bf16", "fp16"), ("shm", "hugepages", "off", "on")],
)
def test_choices_are_enforced_and_listed(section, name, good, bad):
    assert getattr(getattr(load_config(overrides={section: {name: good}}, env={}), section), name) == good
    error = refused(f"[{section}] {name} = {bad!r}; choose one of", overrides={section: {name: bad}})
    for choice in SECTIONS[section]._choices[name]:
        assert choice in error.message


def test_unknown_sections_and_options_are_refused_wherever_they_come_from(toml):
    refused("unknown section [workers]", path=toml("[workers]\nmax_batch = 1\n"))
    refused("[router]", path=toml("router = 5\n"))  # a key outside any section
    refused("[worker]: unknown options ['max_bacth']", path=toml("[worker]\nmax_bacth = 1\n"))
    refused("[worker]: unknown options ['max_bacth']", env={"HMOE_WORKER_MAX_BACTH": "1"})
    refused("[router]: unknown options ['frontent']", overrides={"router": {"frontent": "tcp://x"}})
    refused("[shm]: unknown options ['_choices']", overrides={"shm": {"_choices": {}}})  # class data is no option


def test_a_broken_or_missing_file_is_a_clear_error(toml, tmp_path):
    refused("hmoe.toml", path=toml("[worker\n"))
    with pytest.raises(HmoeError) as info:
        load_config(tmp_path / "absent.toml", env={})
    assert info.value.code == "config_missing" and "absent.toml" in info.value.message


@pytest.mark.parametrize("prefix", ["../etc/", "a/b.", "", "x" * 40])
def test_a_bad_shm_prefix_is_config_invalid(prefix):
    refused("[shm] prefix", env={"HMOE_SHM_PREFIX": prefix})


def test_the_config_is_frozen():
    config = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.worker.max_batch = 1  # type: ignore[misc]
