"""Hostile configs (issue 21, hostile 2-4): YAML anchor bombs and huge files, absurd
``threads`` / ``workers``, and the ``clutter`` sub-config: each refused with one line, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from sact.cli import main
from sact.data import ClutterConfig
from sact.engine.config import MAX_CONFIG_BYTES, MAX_CONFIG_NODES, ConfigError, cpu_cores, yaml_load
from sact.engine.config import expanded_size, max_workers
from helpers import error_line


def _bomb(levels: int = 9) -> str:
    """Nested aliases: 9 ** levels values once expanded, a few hundred characters of text."""
    items = ["&a0 [" + ", ".join(["0.5"] * 9) + "]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def test_expanded_size_counts_aliases_with_their_multiplicity():
    assert expanded_size(yaml.compose("[1, 2, [3]]"), 100) == 5
    assert expanded_size(yaml.compose("a: &x [1, 2]\nb: *x"), 100) == 1 + 2 + 2 * 3
    assert expanded_size(yaml.compose("s: " + "x" * 250), 100) == 1 + 1 + 3  # long strings count by length
    assert expanded_size(yaml.compose(_bomb()), 1000) == 1001  # stopped at the cap
    assert expanded_size(yaml.compose("&a [*a]"), 1000) == 1001  # a cycle never ends


def test_yaml_load_refuses_bombs_and_keeps_aliases():
    assert yaml_load("a: &x [1, 2]\nb: *x") == {"a": [1, 2], "b": [1, 2]}
    for text in (f"boundaries: {_bomb()}", "model_kwargs: {x: " + _bomb() + "}", "&a [*a]", "[" * 100000):
        with pytest.raises(ConfigError, match="expands to more than|nested too deeply|not valid YAML"):
            yaml_load(text)
    assert expanded_size(yaml.compose(_bomb(5)), MAX_CONFIG_NODES) < MAX_CONFIG_NODES  # 9**5: allowed
    yaml_load(_bomb(5))


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    """``sact ARGS`` in a subprocess: a regression hangs there, not in the test run."""
    return subprocess.run([sys.executable, "-c", "import sys; from sact.cli import main; sys.exit(main(sys.argv[1:]))",
                           *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("where", ["file", "set"])
def test_anchor_bomb_in_a_valid_key_is_refused_quickly(tmp_path, where):
    if where == "file":
        (tmp_path / "bomb.yaml").write_text(f"boundaries: {_bomb()}\n")
        args = ["--config", str(tmp_path / "bomb.yaml")]
    else:
        args = ["--set", "model_kwargs={x: " + _bomb() + "}"]
    proc = _cli(["train", *args, "--out", str(tmp_path / "run"), "--print-config"])
    assert proc.returncode == 2 and "expands to more than" in error_line(proc.stderr, "train")
    assert not (tmp_path / "run").exists()


def test_config_file_size_is_capped(tmp_path, capsys):
    cfg = tmp_path / "big.yaml"
    cfg.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1) + "lr: 0.1\n")
    assert main(["train", "--config", str(cfg), "--print-config"]) == 2
    assert f"at most {MAX_CONFIG_BYTES}" in error_line(capsys.readouterr().err, "train")


def test_threads_and_workers_are_bounded_by_the_machine(capsys):
    assert main(["train", "--threads", "10000", "--workers", "100000", "--print-config"]) == 2
    line = error_line(capsys.readouterr().err, "train")
    assert f"threads=10000 (must be in [0, {cpu_cores()}]" in line
    assert f"workers=100000 (must be in [0, {max_workers()}]" in line
    assert main(["train", "--threads", str(cpu_cores()), "--workers", str(max_workers()), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["threads"], printed["workers"]) == (cpu_cores(), max_workers())


@pytest.mark.parametrize("clutter, expected", [
    ("{canvas_size: 100000}", ["canvas_size=100000 (must be in [8, 4096])"]),
    ("[64, 6]", ["clutter=[64, 6] (expected a mapping"]),
    ("{canvas_size: [64]}", ["canvas_size=[64] (must be an int)"]),
    ("{canvas_sise: 64}", ["unknown keys ['canvas_sise']", "known: canvas_size"]),
    ("{num_clutter: 1e9, clutter_intensity: 0.5, max_tries: 0}",
     ["num_clutter=1000000000.0 (must be an int)", "clutter_intensity=0.5 (must be two numbers", "max_tries=0"]),
])
def test_clutter_settings_are_checked(clutter, expected, capsys):
    assert main(["train", "--set", f"clutter={clutter}", "--print-config"]) == 2
    line = error_line(capsys.readouterr().err, "train")
    assert all(e in line for e in expected), line


def test_clutter_config_owns_its_checks():
    assert ClutterConfig.from_dict({"canvas_size": 96, "clutter_intensity": [0.1, 0.2]}) == ClutterConfig(
        canvas_size=96, clutter_intensity=(0.1, 0.2))
    for bad in ({"canvas_size": 4097}, {"min_scale": float("nan")}, {"max_objects": 101}, {"bogus": 1}, [1]):
        with pytest.raises(ValueError, match="ClutterConfig"):
            ClutterConfig.from_dict(bad)


def test_demo_threads_bounded_by_the_cores(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--threads", str(cpu_cores() + 1), "--out", str(out)]) == 2
    assert "threads" in error_line(capsys.readouterr().err, "demo")
    assert not out.exists()
