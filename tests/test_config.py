"""Configuration in one place (tools.config_table, api.settings): the table in docs/configuration.md, --print-config,
env variables."""
from __future__ import annotations

import json

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import click
from click.testing import CliRunner

from commands.serve_images import OPTION_SETTINGS, main as serve_images
from api.settings import SETTINGS
from commands.options import env_prefix
from tools.config_table import (COMMANDS, all_rows, load_command, main as config_table, markdown_table,
                                  readme_table)
from commands.model_info import main as model_info

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATION_PAGE = ROOT / "docs" / "configuration.md"   # the table moved here from README.md


def print_config(*args: str, **env: str) -> dict[str, tuple[str, str]]:
    """serve-images --print-config in a fresh process (no RETRIEVAL_*/SERVE_IMAGES_* variables but env)
    -> setting -> (value, source); also checks that torch was never imported."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RETRIEVAL_", "SERVE_IMAGES_"))}
    probe = ("import sys\nfrom commands.serve_images import main\ntry:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
             "assert code in (0, None), code\nprint('torch loaded' if 'torch' in sys.modules else 'torch not loaded')")
    result = subprocess.run([sys.executable, "-c", probe, "--print-config", *args], capture_output=True, text=True,
                            env={**clean, **env}, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "torch not loaded"
    assert lines[0].split() == ["setting", "value", "source"]
    rows = {}
    for line in lines[1:-1]:
        name, shown, source = line.split(None, 2)
        rows[name] = (shown, source)
    return rows


def test_print_config_says_where_each_value_came_from(tmp_path):
    rows = print_config("--port", "9100", "--index-dir", str(tmp_path / "nowhere"),
                        SERVE_IMAGES_WORKERS="3", SERVE_IMAGES_PORT="9200", RETRIEVAL_MAX_UPLOAD_MB="5",
                        RETRIEVAL_DEVICE="auto")
    assert rows["--port"] == ("9100", "command line")        # the command line wins over SERVE_IMAGES_PORT
    assert rows["--workers"] == ("3", "environment variable SERVE_IMAGES_WORKERS")
    assert rows["--threads"] == ("8", "default")
    assert rows["--device"] == ("auto", "environment variable RETRIEVAL_DEVICE")
    assert rows["--index-dir"] == (str(tmp_path / "nowhere"), "command line")
    assert rows["RETRIEVAL_MAX_UPLOAD_MB"] == ("5", "environment variable RETRIEVAL_MAX_UPLOAD_MB")
    assert rows["RETRIEVAL_GALLERY_K"] == ("12", "default")
    assert rows["RETRIEVAL_TORCH_THREADS"][1].startswith("serve-images")   # derived from the cores and --workers
    # every setting of the app is listed, and nothing was started: no index is needed
    options = set(OPTION_SETTINGS.values())   # these show as their option (--index-dir, --device, ...)
    assert {s.envvar for s in SETTINGS if s.name not in options} <= set(rows)
    assert not (tmp_path / "nowhere").exists()


def test_print_config_defaults_and_derived_values():
    rows = print_config(RETRIEVAL_TORCH_THREADS="2")
    assert rows["--port"] == ("8000", "default")
    assert rows["--device"] == ("cpu", "default")             # the app's own default when --device is not given
    assert rows["--index-dir"] == (str(Path("index").resolve()), "default")
    assert rows["RETRIEVAL_TORCH_THREADS"] == ("2", "environment variable RETRIEVAL_TORCH_THREADS")
    assert rows["--nprobe"] == ("-", "default: the index's, as index-images tuned it")   # not a number it never uses
    assert print_config("--nprobe", "4")["--nprobe"] == ("4", "command line")


def test_the_environment_variable_of_an_option_sets_it(monkeypatch):
    # the names in the table are the names the commands read
    monkeypatch.setenv("MODEL_INFO_INPUT_SIZE", "0")
    result = CliRunner().invoke(model_info, ["alexnet"])
    assert result.exit_code == 2 and "--input-size" in result.output, result.output
    monkeypatch.setenv("SERVE_IMAGES_READ_TIMEOUT", "0")
    result = CliRunner().invoke(serve_images, ["--print-config"])
    assert result.exit_code == 2 and "--read-timeout" in result.output, result.output


def test_an_options_variable_is_named_after_the_option_as_typed(monkeypatch):
    """--json reads MODEL_INFO_JSON (the name a user derives from --help), and still MODEL_INFO_AS_JSON (its
    parameter's name, which it was before)."""
    assert not CliRunner().invoke(model_info, ["alexnet"]).output.lstrip().startswith("{")
    for name in ("MODEL_INFO_JSON", "MODEL_INFO_AS_JSON"):
        with monkeypatch.context() as env:
            env.setenv(name, "1")
            result = CliRunner().invoke(model_info, ["alexnet"])
        assert result.exit_code == 0 and json.loads(result.output)["model"] == "alexnet", (name, result.output[:200])


def test_readme_table_matches_the_commands():
    table = readme_table(CONFIGURATION_PAGE.read_text(encoding="utf-8"))
    assert table is not None, "docs/configuration.md has no configuration table"
    assert table == markdown_table(), "docs/configuration.md's configuration table is out of date: " \
                                      "run python -m tools.config_table --write docs/configuration.md"


def test_the_table_has_every_option_of_every_command():
    rows = all_rows()
    listed = {(r.command, r.option.split(",")[0].split(" / ")[0]) for r in rows}
    for name, target in COMMANDS:
        command = load_command(target)
        for param in command.params:
            if isinstance(param, click.Option):
                assert (name, max(param.opts, key=len)) in listed, f"{name} {param.opts} is not in the table"
    assert {r.envvar for r in rows if r.command == "serve-images"} >= {s.envvar for s in SETTINGS}
    # one variable never means two different things
    meaning: dict[str, set[str]] = {}
    for r in rows:
        if r.envvar:
            meaning.setdefault(r.envvar, set()).add(r.option or r.envvar)
    assert all(len(options) == 1 for options in meaning.values()), meaning


def test_every_command_is_in_the_table_and_reads_its_variables():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert sorted(scripts) == sorted(name for name, _ in COMMANDS), "a command is missing from tools.config_table"
    for name, target in COMMANDS:
        settings = load_command(target).context_settings
        assert settings.get("auto_envvar_prefix") == env_prefix(name), f"{name}: use command_settings({name!r})"


def test_check_and_write(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n" + markdown_table().replace("`8000`", "`8001`") + "\n\nafter\n", encoding="utf-8")
    stale = CliRunner().invoke(config_table, ["--check", str(readme)])
    assert stale.exit_code == 1 and "--write" in stale.output
    assert CliRunner().invoke(config_table, ["--write", str(readme)]).exit_code == 0
    assert CliRunner().invoke(config_table, ["--check", str(readme)]).exit_code == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# x\n\n") and text.endswith("\n\nafter\n") and "`8000`" in text
