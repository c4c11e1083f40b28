"""The config skeleton install.sh writes is generated from runtime/config.py: every option, at its default."""

from __future__ import annotations

import dataclasses
import re
import tomllib

from hmoe.runtime.config import SECTIONS, Config, load_config, skeleton


def test_every_field_appears_with_its_variable():
    text = skeleton()
    for section, cls in SECTIONS.items():
        assert f"\n[{section}]\n" in text
        for f in dataclasses.fields(cls):
            if not f.name.startswith("_"):
                assert re.search(rf"^# {f.name} = ", text, re.M), f"[{section}] {f.name} missing"
                assert f"env HMOE_{section.upper()}_{f.name.upper()}" in text


def test_skeleton_is_valid_toml_and_uncommented_gives_the_defaults(tmp_path):
    text = skeleton()
    assert tomllib.loads(text) == {name: {} for name in SECTIONS}  # everything commented out
    uncommented = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.M)
    path = tmp_path / "hmoe.toml"
    path.write_text(uncommented)
    assert load_config(path, env={}) == Config()
    assert sum(len(v) for v in tomllib.loads(uncommented).values()) == sum(
        len([f for f in dataclasses.fields(c) if not f.name.startswith("_")]) for c in SECTIONS.values()
    )
