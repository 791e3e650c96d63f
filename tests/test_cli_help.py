"""Help that helps (issue 21, item 4): defaults in ``--help``, a hint for an unknown flag,
and a ``sact models`` that counts FLOPs on the meta device instead of running every model."""

from __future__ import annotations

import pytest
import torch
import yaml

import sact
from sact.cli import build_parser, main
from sact.models import model_summaries
from sact.commands.flags import DETECT_FLAGS, TRAIN_FLAGS
from sact.detection.config import DETECT_DEFAULTS
from sact.engine.config import TrainConfig


def _subparser(*path: str):
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if getattr(a, "choices", None) and name in a.choices)
        parser = action.choices[name]
    return parser


def _flag_defaults(*command: str) -> dict[str, str]:
    """Config flag -> the default its help shows."""
    shown = {}
    for action in _subparser(*command)._actions:
        if action.help and "(default: " in action.help and action.option_strings:
            shown[action.option_strings[0]] = action.help.rsplit("(default: ", 1)[1].rstrip(")")
    return shown


@pytest.mark.parametrize("command, base", [(("train",), {}), (("detect", "train"), DETECT_DEFAULTS)])
def test_help_shows_the_value_a_flag_left_out_takes(command, base, capsys):
    flags = TRAIN_FLAGS if command == ("train",) else DETECT_FLAGS
    shown = _flag_defaults(*command)
    assert main([*command, "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    checked = 0
    for flag, (key, *_) in flags.items():
        if resolved[key] is None:
            continue
        assert shown[flag] == str(resolved[key]) == str({**TrainConfig.defaults(), **base}[key]), flag
        checked += 1
    assert checked >= 20
    assert shown["--lr"] == str(base.get("lr", TrainConfig.defaults()["lr"]))


def test_rendered_help_has_the_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert f"base learning rate (default: {TrainConfig.defaults()['lr']})" in text
    assert f"ponder cost weight (default: {TrainConfig.defaults()['tau']})" in text


@pytest.mark.parametrize("argv, hint", [
    (["train", "--base-channels", "8"], "--set model_kwargs='{base_channels: 8}'"),
    (["train", "--warmup-steps=5"], "--set warmup_steps=5"),
    (["train", "--lerning", "0.1"], "did you mean --lr?"),
    (["models", "--image-sise", "64"], "did you mean --image-size?"),
    (["detect", "train", "--base-width", "32"], "--set model_kwargs='{base_width: 32}'"),
])
def test_unknown_flags_get_a_hint(argv, hint, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"usage: sact {' '.join(argv[:2 if argv[0] == 'detect' else 1])}")
    errors = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and "unrecognized arguments" in errors[0] and hint in errors[0], errors


def test_the_model_kwargs_hint_works(capsys):
    assert main(["train", "--set", "model_kwargs={base_channels: 8}", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model_kwargs"] == {"base_channels": 8}


@pytest.mark.parametrize("name", ["resnet20_cifar", "resnet18"])
def test_models_table_equals_a_real_forward(name):
    (row,) = model_summaries(pattern=[name])
    model = sact.create_model(name, mode="vanilla").eval()
    with torch.no_grad():
        flops = int(model(torch.zeros(1, model.in_chans, row[3], row[3])).flops.item())
    assert row == (name, sum(p.numel() for p in model.parameters()), flops, 32 if name.endswith("_cifar") else 224)


def test_models_command(capsys):
    assert main(["models", "resnet*_cifar", "--image-size", "40"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[1:]] == sact.list_models("resnet*_cifar")
    assert all(ln.split()[-1] == "40" for ln in lines[1:])
    assert main(["models", "nothing*"]) == 2
    assert "no registered model matches nothing*" in capsys.readouterr().err
