"""Composing configs: typed defaults, group files, overrides, and clear errors."""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf

from fwlab import trainer_arguments
from fwlab.config import compose, config_dir, dataclass_from, group_choices
from fwlab.errors import ConfigError
from fwlab.optim import OptimConfig, make_optimizer
from fwlab.registry import Registry

from .conftest import run_fwlab

REGISTRY = Registry()


def make(*overrides, model="fast_weights", data="retrieval", **kwargs):
    return compose(REGISTRY, model=model, data=data, overrides=list(overrides), **kwargs)


def test_defaults_come_from_the_plugins_and_the_group_files():
    config = make()
    assert config.model.name == "fast_weights" and config.data.name == "retrieval"
    assert config.model.decay == 0.95 and config.model.inner_steps == 1
    assert config.data.train_size == 100_000
    assert config.logger.name == "wandb"
    assert config.trainer.accelerator == "auto"


def test_overrides_are_typed():
    config = make(
        "model.hidden_size=50",
        "data.batch_size=64",
        "trainer.max_steps=2000",
        "logger=csv",
        "optim.lr=3e-4",
    )
    assert config.model.hidden_size == 50 and isinstance(config.model.hidden_size, int)
    assert config.data.batch_size == 64
    assert config.trainer.max_steps == 2000
    assert config.logger.name == "csv"
    assert config.optim.lr == pytest.approx(3e-4)


def test_lstm_has_its_own_keys():
    config = make(model="lstm")
    assert "forget_bias" in config.model and "decay" not in config.model


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "model.hiden_size=50",
            "unknown config key 'model.hiden_size' (from the command line); "
            "did you mean 'model.hidden_size'?",
        ),
        ("data.batch_sise=3", "did you mean 'data.batch_size'?"),
        ("trainer.max_step=5", "did you mean 'trainer.max_steps'?"),
        ("optim.learning_rate=1", "unknown config key 'optim.learning_rate'"),
        ("sed=3", "did you mean 'seed'?"),
    ],
)
def test_unknown_keys_name_the_key_and_the_closest_valid_one(override, expected):
    with pytest.raises(ConfigError) as error:
        make(override)
    assert expected in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.name=adagrad"], "optim.name='adagrad' is not known: expected adam, adamw"),
        (
            ["optim.momentum=0.9"],
            "optim.momentum=0.9 has no effect with optim.name=adam: it is an option of rmsprop "
            "and sgd only",
        ),
        (["optim.name=sgd", "optim.rmsprop_decay=0.9"], "optim.rmsprop_decay=0.9 has no effect"),
        (["optim.rmsprop_decay=1"], "'optim.rmsprop_decay' (from the command line): must be"),
    ],
)
def test_an_optimiser_setting_it_cannot_take_is_refused_as_the_config_is_composed(
    overrides, expected
):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        make(*overrides)


def test_the_optimiser_gets_its_own_options():
    parameters = [torch.nn.Parameter(torch.zeros(2))]
    config = make("optim.name=rmsprop", "optim.rmsprop_decay=0.9", "optim.momentum=0.5")
    rmsprop = make_optimizer(parameters, dataclass_from(OptimConfig, config.optim))
    assert isinstance(rmsprop, torch.optim.RMSprop)
    assert rmsprop.defaults["alpha"] == 0.9 and rmsprop.defaults["momentum"] == 0.5
    sgd = make_optimizer(parameters, OptimConfig(name="sgd", momentum=0.7))
    assert sgd.defaults["momentum"] == 0.7
    assert make_optimizer(parameters, OptimConfig()).defaults["betas"] == (0.9, 0.999)


def test_a_value_of_the_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="model.hidden_size.*the command line"):
        make("model.hidden_size=many")
    with pytest.raises(ConfigError, match="model.form"):
        make("model.form=matrx")
    with pytest.raises(ConfigError, match="float32_matmul_precision"):
        make("float32_matmul_precision=fast")
    with pytest.raises(ConfigError, match="model.kernel"):
        make("model.kernel=cuda", model="irnn")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_steps=abc", "max_steps takes an integer, not 'abc'"),
        ("trainer.max_steps=true", "max_steps takes an integer, not True"),
        ("trainer.max_epochs=2.5", "max_epochs takes an integer or null, not 2.5"),
        ("trainer.precision=17", "precision takes one of 64, 32, 16, "),
        ("trainer.devices=[a]", "devices takes a list of integers or a string or an integer"),
        ("trainer.enable_progress_bar=1", "enable_progress_bar takes true or false or null"),
        ("trainer.max_time={days: x}", "max_time takes a string or a mapping or null"),
    ],
)
def test_a_trainer_value_lightning_cannot_take_names_the_key_and_what_it_takes(override, expected):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError) as error:
        make(override)
    message = str(error.value)
    assert message.startswith(f"bad value for '{key}' (from the command line): lightning.Trainer")
    assert expected in message


@pytest.mark.parametrize(
    "override",
    [
        "trainer.max_epochs=null",
        "trainer.precision=16-mixed",
        "trainer.precision=bf16",
        "trainer.precision=32",
        "trainer.devices=[0,1]",
        "trainer.devices=auto",
        "trainer.gradient_clip_val=1",  # an integer where a number is taken
        "trainer.val_check_interval=0.25",
        "trainer.max_time=00:12:00:00",
        "trainer.max_time={days: 1}",
        "trainer.deterministic=warn",
        "trainer.max_steps=${seed}",  # resolved later
    ],
)
def test_trainer_values_lightning_takes_pass(override):
    make(override)


@pytest.mark.parametrize(
    ("settings", "named", "expected"),
    [
        # what only Lightning judges, as a Trainer is built: named by how its message points
        ({"devices": 0, "max_epochs": 3}, "trainer.devices=0: ", "`Trainer(devices=0)`"),
        ({"strategy": "nonsense", "max_epochs": 3}, "trainer.strategy=nonsense: ", "strategy"),
        ({"max_epochs": -5, "devices": 1}, "trainer.max_epochs=-5: ", "non-negative integer"),
        ({"gradient_clip_algorithm": "foo"}, "trainer.gradient_clip_algorithm=foo: ", "foo"),
        # by the value it quotes: "No supported gpu backend found!"
        pytest.param(
            {"accelerator": "gpu", "max_epochs": 3},
            "trainer.accelerator=gpu: ",
            "gpu backend",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="Lightning takes it here"),
        ),
    ],
)
def test_a_trainer_setting_lightning_refuses_as_it_is_built_names_the_key(
    settings, named, expected
):
    with pytest.raises(ConfigError) as error:
        trainer_arguments.check_settings(settings)
    message = str(error.value)
    assert message.startswith(named + "lightning.Trainer refuses it: "), message
    assert expected in message and message.endswith("(stopped before anything was written)")


def test_a_refused_trainer_setting_its_message_does_not_point_at_names_them_all():
    settings = {"accelerator": "cpu", "devices": 1}
    problem = "Requirement 'torch_xla>=1.13' not met"
    assert trainer_arguments._pointed_at(settings, problem) == ["accelerator", "devices"]
    trainer_arguments.check_settings(settings | {"max_epochs": 3})  # and a good one passes


def test_a_trainer_value_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  max_epochs: ten\n")
    with pytest.raises(ConfigError, match=f"'trainer.max_epochs' \\(from {path}\\)"):
        make(config_files=[path])


def test_another_plugin_name_as_a_key_is_refused_with_the_option_that_chooses_it(tmp_path):
    # the fields are the chosen plugin's: data.name=omniglot built omniglot from retrieval's
    # fields (a KeyError traceback)
    with pytest.raises(ConfigError, match="data.name=omniglot .*is retrieval; .*--data omniglot"):
        make("data.name=omniglot")
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: lstm\n")
    with pytest.raises(ConfigError, match=f"model.name=lstm \\(from {path}\\).*--model lstm"):
        make(config_files=[path])
    assert make("data.name=retrieval").data.name == "retrieval"  # its own name is no change


def test_keys_fwlab_sets_itself_are_refused_with_the_alternative():
    with pytest.raises(ConfigError, match="trainer.logger.*logger=wandb\\|csv\\|none"):
        make("trainer.logger=false")


def test_an_unknown_group_choice_suggests_the_closest():
    with pytest.raises(ConfigError, match="Did you mean logger=csv"):
        make("logger=cvs")


def test_unknown_model_or_data_suggests_close_names():
    with pytest.raises(ConfigError, match="did you mean 'fast_weights'"):
        make(model="fastweights")
    with pytest.raises(ConfigError, match="did you mean 'retrieval'"):
        make(data="retrival")


def test_a_missing_model_is_a_clear_error():
    with pytest.raises(ConfigError, match="no model given: pass --model"):
        compose(REGISTRY, data="retrieval")


def test_an_unknown_key_in_a_config_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  hidden_sise: 3\n")
    with pytest.raises(ConfigError, match=f"model.hidden_sise.*{path}"):
        make(config_files=[path])


def test_a_saved_config_is_the_base_and_the_command_line_wins():
    saved = OmegaConf.to_container(make("model.hidden_size=33"))
    config = compose(REGISTRY, base=saved, overrides=["trainer.max_steps=7"])
    assert config.model.hidden_size == 33 and config.trainer.max_steps == 7
    # the same model and data may be named again, another not: the weights are the saved one's
    assert compose(REGISTRY, base=saved, model="fast_weights", data="retrieval").model.name
    with pytest.raises(ConfigError, match="--model lstm: the saved config is for model fast_w"):
        compose(REGISTRY, base=saved, model="lstm")
    with pytest.raises(ConfigError, match="--data seqmnist: the saved config is for data retr"):
        compose(REGISTRY, base=saved, data="seqmnist")


def every_yaml():
    return sorted(config_dir().rglob("*.yaml"))


@pytest.mark.parametrize("path", every_yaml(), ids=lambda p: str(p.relative_to(config_dir())))
def test_every_yaml_opens_with_its_command_and_composes(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# fwlab "), f"{path} must open with the command that uses it"
    group = path.parent.name
    if group == "experiment":
        config = compose(REGISTRY, overrides=[f"experiment={path.stem}"])
        assert config.experiment == path.stem
    elif group in ("trainer", "logger"):
        make(f"{group}={path.stem}")
    elif group == "model":
        make(model=path.stem)
    elif group == "data":
        make(data=path.stem)


def test_there_are_experiment_presets():
    assert group_choices("experiment")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.hiden_size=3", ["model.hiden_size", "model.hidden_size"]),
        ("trainer.max_steps=abc", ["'trainer.max_steps'", "takes an integer, not 'abc'"]),
        # the command runs with no GPU and no TRITON_INTERPRET (conftest.fwlab_env)
        ("model.kernel=triton", ["model.kernel=triton: needs", "model.kernel=auto runs"]),
        # found by the optimiser's check, which used to run only once Lightning had started
        ("optim.name=adagrad", ["optim.name='adagrad' is not known", "rmsprop or sgd"]),
        # refused by Lightning as its Trainer is built, which was once after the run directory
        # (the command's environment hides any GPU: CUDA_VISIBLE_DEVICES is empty)
        ("trainer.accelerator=gpu", ["trainer.accelerator=gpu: lightning.Trainer refuses it"]),
        # W&B online with no credentials (none in the command's environment): W&B's UsageError
        ("logger.mode=online", ["logger.mode=online: no W&B API key", "logger.mode=auto writes"]),
    ],
)
def test_cli_reports_config_errors_and_writes_nothing(tmp_path, override, expected):
    result = run_fwlab(
        "fit", "--model", "fast_weights", "--data", "retrieval", override, cwd=tmp_path
    )
    assert result.returncode == 2
    assert all(text in result.stderr for text in expected), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_print_config_prints_the_resolved_config(tmp_path):
    result = run_fwlab(
        "fit",
        "--model",
        "lstm",
        "--data",
        "retrieval",
        "model.hidden_size=21",
        "--print-config",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.model.name == "lstm" and printed.model.hidden_size == 21
    assert printed.trainer.max_epochs > 0
    assert not (tmp_path / "runs").exists()


def test_an_output_dir_that_cannot_be_made_names_the_key(tmp_path):
    from fwlab.rundir import create_run_dir

    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a file where the folder would go: refused even to root
    with pytest.raises(ConfigError, match=f"output_dir={blocker}/runs: cannot make a run dir"):
        create_run_dir(blocker / "runs", "fit", "lstm", "retrieval")
    assert create_run_dir(tmp_path / "runs", "fit", "lstm").parent == tmp_path / "runs"
