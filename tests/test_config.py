"""The job runner: typed configs, overrides, validation before work, --help, --print-config."""

from __future__ import annotations

import json

import yaml
import pytest

from conftest import REPO, run_job
from georeasoner.core.config import ConfigError, load_config, parse_override
from georeasoner.core.runner import main
from georeasoner.world.make import MakeWorldConfig

LOCAL = str(REPO / "configs" / "make_world" / "local.yaml")


def _never(cfg):
    raise AssertionError("run() must not be called for an invalid config")


def test_overrides_are_typed_and_dotted():
    cfg = load_config(MakeWorldConfig, LOCAL, ["num_images=300", "ray.num_cpus=1", "output=s3://bkt/world", "countries=[fr, jp]"])
    assert cfg.num_images == 300 and isinstance(cfg.num_images, int)
    assert cfg.ray.num_cpus == 1
    assert cfg.output == "s3://bkt/world"
    assert cfg.countries == ["FR", "JP"]


def test_parse_override_keeps_strings_and_nulls():
    assert parse_override("a.b=hello") == ("a.b", "hello")
    assert parse_override("limit=null") == ("limit", None)
    assert parse_override("overwrite=true") == ("overwrite", True)
    assert parse_override("output=2024-01-01") == ("output", "2024-01-01")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("novalue")


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["num_imagez=3"], "unknown key 'num_imagez'"),
        (["ray.adress=x"], "unknown key 'ray.adress'"),
        (["num_images=lots"], "num_images"),
        (["overwrite=maybe"], "overwrite"),
        (["countries=[XX]"], "countries"),
        (["split_fractions=[0.5, 0.1, 0.1]"], "split_fractions"),
    ],
)
def test_bad_keys_and_types_exit_2_with_one_line(overrides, fragment, capsys):
    assert main("make_world", MakeWorldConfig, _never, ["--config", LOCAL, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert fragment in err


def test_unknown_key_suggests_the_close_one(capsys):
    main("make_world", MakeWorldConfig, _never, ["--config", LOCAL, "num_imagez=3"])
    assert "did you mean 'num_images'" in capsys.readouterr().err


def test_missing_and_unreadable_config_files(tmp_path, capsys):
    assert main("make_world", MakeWorldConfig, _never, ["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: [unclosed\n")
    assert main("make_world", MakeWorldConfig, _never, ["--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    assert main("make_world", MakeWorldConfig, _never, ["--config", str(listy)]) == 2
    assert "mapping" in capsys.readouterr().err


def test_help_lists_every_key_with_default(capsys):
    assert main("make_world", MakeWorldConfig, _never, ["--help"]) == 0
    out = capsys.readouterr().out
    for key in ("input", "output", "seed", "limit", "overwrite", "ray.address", "ray.num_cpus", "storage.endpoint_url",
                "storage.region", "num_images", "image_size", "clue_rate"):
        assert f"  {key} " in out, key
    assert "default 2000" in out


def test_print_config_round_trips(capsys):
    assert main("make_world", MakeWorldConfig, _never, ["--config", LOCAL, "num_images=7", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["num_images"] == 7
    assert load_config(MakeWorldConfig, None, [f"{k}={json.dumps(v)}" for k, v in printed.items() if not isinstance(v, dict)]).num_images == 7


def test_config_hash_ignores_runtime_keys_only():
    base = load_config(MakeWorldConfig, LOCAL)
    assert base.config_hash() == load_config(MakeWorldConfig, LOCAL, ["shard_size=7", "ray.num_cpus=1", "limit=5"]).config_hash()
    assert base.config_hash() != load_config(MakeWorldConfig, LOCAL, ["seed=1"]).config_hash()


def test_cli_errors_through_the_real_entrypoint():
    """The process boundary is the point: exit code 2, one line on stderr, no traceback."""
    for args, fragment in (
        (["--config", LOCAL, "bogus_key=1"], "unknown key 'bogus_key'"),
        (["--config", LOCAL, "num_images=abc"], "num_images"),
        (["--config", "configs/make_world/missing.yaml"], "does not exist"),
    ):
        proc = run_job("make_world", *args, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and fragment in proc.stderr
        assert "Traceback" not in proc.stderr


def test_relative_local_paths_become_absolute(tmp_path, monkeypatch):
    from georeasoner.locatability.curate import CurateConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "scores").mkdir()
    cfg = CurateConfig(input="scores", manifest="outputs/missing", output="out").absolute_paths()
    assert cfg.input == str(tmp_path / "scores") and cfg.output == str(tmp_path / "out")
    assert cfg.manifest == "outputs/missing"  # not an existing path: left as written
    s3 = CurateConfig(input="s3://b/scores", manifest="m", output="s3://b/out").absolute_paths()
    assert s3.input == "s3://b/scores" and s3.output == "s3://b/out"
