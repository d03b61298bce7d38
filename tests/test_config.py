"""Config files, arguments and overrides: locked schema, typed values, clear errors."""
import ast
import json
import pathlib
import subprocess
import sys

import pytest

from tl_jax import config as config_lib
from tl_jax.cli import main, split_overrides
from tl_jax.util import config_checks, config_errors

ROOT = pathlib.Path(__file__).resolve().parents[1]

EXP = "experiments/mnist_to_digits.py"


def test_load_and_override():
    c = config_lib.load_config(f"{EXP}:stage=target,shots=10")
    assert c.data.name == "optdigits" and c.data.shots == 10
    config_lib.apply_overrides(c, ['param_rules=[["backbone/.*", null], [".*", 1.0]]', "init_from=runs/src",
                                   "optimizer.learning_rate=3e-4", "train.steps=7"])
    assert c.param_rules == [["backbone/.*", None], [".*", 1.0]]
    assert c.init_from == "runs/src" and c.optimizer.learning_rate == 3e-4 and c.train.steps == 7


@pytest.mark.parametrize("override, msg", [
    ("trian.steps=3", r"unknown config key config.trian.steps; did you mean config.train.steps"),
    ("train.steps=abc", r"config.train.steps: expected int"),
    ("data.shots=[1]", r"config.data.shots: expected int or None"),
    ("train.steps", r"needs a value"),
])
def test_bad_overrides(override, msg):
    c = config_lib.load_config(f"{EXP}:stage=source")
    with pytest.raises(config_lib.ConfigError, match=msg):
        config_lib.apply_overrides(c, [override])


def test_bad_config_args():
    with pytest.raises(config_lib.ConfigError, match="unknown config argument 'shot'"):
        config_lib.load_config(f"{EXP}:stage=target,shot=10")
    with pytest.raises(config_lib.ConfigError, match="stage='tgt'"):
        config_lib.load_config(f"{EXP}:stage=tgt")
    with pytest.raises(config_lib.ConfigError, match="no such file"):
        config_lib.load_config("experiments/nope.py")


def test_roundtrip_json():
    c = config_lib.load_config(f"{EXP}:stage=target,shots=1,method=linear_probe")
    c2 = config_lib.from_dict(config_lib.to_dict(c))
    assert config_lib.to_dict(c2) == config_lib.to_dict(c) and c2.param_rules == [["backbone/.*", None], [".*", 1.0]]


def test_model_kwargs_are_free():
    c = config_lib.base_config()
    config_lib.apply_overrides(c, ["model.kwargs.width=2"])
    assert c.model.kwargs.width == 2


def test_split_overrides():
    rest, ov = split_overrides(["--config", "f.py", "--config.a.b=1", "--config.c", "x", "--workdir", "w"])
    assert rest == ["--config", "f.py", "--workdir", "w"] and ov == ["a.b=1", "c=x"]


def _config_file(tmp_path, body: str) -> str:
    path = tmp_path / "my_config.py"
    path.write_text("from tl_jax import config as config_lib\n\n\ndef get_config(arg=None):\n"
                    "    c = config_lib.base_config()\n" + body + "    return c\n")
    return str(path)


def test_typo_in_own_config_file_is_one_line_with_file_line_key(tmp_path):
    path = _config_file(tmp_path, "    c.model.name = 'cnn'\n    c.train.stepz = 3\n")
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load_config(path)
    assert str(e.value) == (f"--config: {path} line 7 (c.train.stepz = 3): unknown config key config.train.stepz; "
                            f"did you mean config.train.steps?")


def test_wrong_type_in_own_config_file_names_key_through_an_alias(tmp_path):
    path = _config_file(tmp_path, "    tc = c.train\n    tc.steps = 'many'\n")
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load_config(path)
    assert str(e.value) == (f"--config: {path} line 7 (tc.steps = 'many'): config.train.steps: expected int, "
                            f"got 'many' (str)")


def test_other_errors_in_own_config_file_keep_their_traceback(tmp_path):
    path = _config_file(tmp_path, "    {}['missing']\n")
    with pytest.raises(KeyError, match="missing"):
        config_lib.load_config(path)


def test_typo_in_own_config_file_through_the_cli_is_one_line(tmp_path, capsys):
    path = _config_file(tmp_path, "    c.optimizer.learning_rat = 0.1\n")
    assert main(["train", "--config", path, "--workdir", str(tmp_path / "wd")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tl-jax train: error: --config: ") and "line 6" in err[0]
    assert err[0].endswith("did you mean config.optimizer.learning_rate?") and not (tmp_path / "wd").exists()


HINT = "; JSON needs quotes around strings, and the shell removes unquoted ones (and splits unquoted {a,b}): "


def test_unquoted_json_override_gets_a_quoting_hint():
    c = config_lib.base_config()
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.apply_overrides(c, ["param_rules=[[backbone/.*,null],[.*,1.0]]"])
    assert str(e.value) == ("config.param_rules: expected list, got '[[backbone/.*,null],[.*,1.0]]' (str)" + HINT +
                            "quote the whole value, e.g. "
                            "--config.param_rules='[[\"backbone/.*\", null], [\".*\", 1.0]]'")
    with pytest.raises(config_lib.ConfigError) as e:  # the brackets gone too: the value as a one-element list
        config_lib.apply_overrides(c, ["dont_load=head/.*"])
    assert str(e.value).endswith(HINT + "quote the whole value, e.g. --config.dont_load='[\"head/.*\"]'")
    with pytest.raises(config_lib.ConfigError) as e:  # bash split --config.model.kwargs={width:2,stem:cifar}
        config_lib.apply_overrides(c, ["model.kwargs=width:2"])
    assert str(e.value).endswith(HINT + "quote the whole value, e.g. --config.model.kwargs='{\"width\": 2}'")
    with pytest.raises(config_lib.ConfigError, match=r"expected int, got 'abc' \(str\)$"):  # no hint: not JSON
        config_lib.apply_overrides(c, ["train.steps=abc"])


@pytest.mark.parametrize("raw, fixed", [
    ("[[backbone/.*,null]]", '[["backbone/.*", null]]'),
    ("[head/.*, 0.1, true]", '["head/.*", 0.1, true]'),
    ("{width:2}", '{"width": 2}'),
    ("[[a,b]", None),
])
def test_quoted_json(raw, fixed):
    assert config_errors.quoted_json(raw) == fixed


def test_config_imports_none_of_the_modules_that_check_it():
    """config.py is the schema: the modules owning a group's check register it (tl_jax/util/config_checks.py)."""
    code = ("import sys, tl_jax.config; mods = sorted(m for m in sys.modules if m.startswith('tl_jax.') "
            "and not m.startswith(('tl_jax.util', 'tl_jax.config'))); assert not mods, mods")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    tree = ast.parse((ROOT / "tl_jax" / "config.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module.startswith("tl_jax")}
    # the objectives own the config.objective group's defaults (imported by base_config: they import JAX)
    assert imported == {"tl_jax.util.config_checks", "tl_jax.util.config_errors", "tl_jax.objectives"}


def test_validate_runs_the_registered_checks(monkeypatch):
    monkeypatch.setattr(config_checks, "_CHECKS", {})
    c = config_lib.base_config()
    config_lib.validate(c)
    seen = []

    def check(config):
        seen.append(config.train.steps)
        if config.train.steps > 1000:
            raise ValueError("config.train.steps: too many for this test")

    config_checks.register_check("train.steps", check)
    config_lib.validate(c)
    c.train.steps = 1001
    with pytest.raises(config_lib.ConfigError, match="^config.train.steps: too many for this test$"):
        config_lib.validate(c)
    assert seen == [500, 1001]


BAD_GROUPS = [  # (override, the one line tl-jax train prints): each check is registered by its group's module
    ("--config.recipe.name=bogus", "config.recipe.name must be one of ('', 'lp_ft')"),
    ('--config.evals=[{"kind": "nope", "dataset": "optdigits"}]', "config.evals[0].kind must be one of ('fewshot', 'knn', 'linear')"),
    ("--config.model.head.activation=nope", "config.model.head.activation: unknown activation 'nope'"),
    ("--config.train.ema_decay=1.5", "config.train.ema_decay must be a number in [0, 1)"),
    ('--config.init_map=[["(", null]]', "config.init_map[0]: invalid regex '('"),
    ("--config.data.val_fraction=1.5", "config.data.val_fraction must be in (0, 1)"),
]
_RUN_BAD = """
import contextlib, io, json, sys
from tl_jax.cli import main
out = []
for override in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", "--config", "tests/configs/tiny.py", "--workdir", sys.argv[2], override])
    out.append([rc, err.getvalue()])
print(json.dumps(out))
"""


def test_registered_checks_still_refuse_through_tl_jax_train(tmp_path):
    """A fresh process that imports only the CLI: `tl-jax train` itself must load every group's check."""
    wd = tmp_path / "wd"
    proc = subprocess.run([sys.executable, "-c", _RUN_BAD, json.dumps([o for o, _ in BAD_GROUPS]), str(wd)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for (override, msg), (rc, err) in zip(BAD_GROUPS, json.loads(proc.stdout.strip().splitlines()[-1])):
        lines = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"tl-jax train: error: {msg}"), (override, err)
    assert not wd.exists()
