"""Config: YAML round-trip, overrides, and one-line rejections of bad keys, values and layouts."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moe_erc.config import Config, check_layout, load_config
from moe_erc.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_yaml_round_trip_preserves_every_value(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["moe.num_experts=16", "erc.enabled=true", "erc.alpha=0.5"])
    path = tmp_path / "saved.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert again == cfg
    assert again.moe.num_experts == 16 and again.erc.enabled is True and again.erc.alpha == 0.5


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(None, ["training.train_iters=50", "moe.moe_z_loss_coeff=1e-3",
                             "logging.tensorboard=false", "data.data_path=[0.3, a, 0.7, b]"])
    assert cfg.training.train_iters == 50
    assert cfg.moe.moe_z_loss_coeff == pytest.approx(1e-3)
    assert cfg.logging.tensorboard is False
    assert cfg.data.data_path == [0.3, "a", 0.7, "b"]


def test_tiny_config_matches_the_issue_shape():
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.moe.num_experts, cfg.moe.moe_router_topk) == (4, 128, 8, 2)
    assert cfg.model.swiglu


@pytest.mark.parametrize("overrides, expected", [
    (["moe.num_expert=3"], "unknown config key 'moe.num_expert'; did you mean 'moe.num_experts'?"),
    (["mode.num_layers=3"], "unknown config section 'mode'; did you mean 'model'?"),
    (["training.train_iters=abc"], "training.train_iters"),
    (["moe.moe_router_topk=9"], "moe.moe_router_topk=9 exceeds moe.num_experts=8"),
    (["erc.alpha=-1"], "erc.alpha=-1.0 must be >= 0"),
    (["moe.router=kmeans", "erc.enabled=true"], "needs a router matrix"),
    (["moe.router=magic"], "moe.router"),
    (["moe.router=kmeans"], "set moe.moe_router_load_balancing_type=none"),
    (["moe.kmeans_momentum=1.5"], "moe.kmeans_momentum=1.5 must be in [0, 1)"),
    (["moe.moe_router_topk=1"], "needs moe.moe_router_pre_softmax=true"),
    (["model.hidden_size=100", "model.num_attention_heads=3"], "not divisible"),
    (["training.micro_batch_size=0"], "training.micro_batch_size=0 must be >= 1"),
    (["data.split=9,x"], "data.split"),
    (["trainingtrain_iters=5"], "section.key"),
    (["training.train_iters"], "section.key=value"),
])
def test_bad_overrides_raise_one_line_errors(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert expected in message and "\n" not in message


@pytest.mark.parametrize("overrides, world, expected", [
    (["parallel.expert_model_parallel_size=3"], 3, "moe.num_experts=8 is not divisible by parallel.expert_model_parallel_size=3"),
    (["parallel.tensor_model_parallel_size=3"], 3, "num_attention_heads=4 is not divisible"),
    (["parallel.tensor_model_parallel_size=2"], 3, "world size 3 is not divisible"),
    (["parallel.world_size=8"], 2, "parallel.world_size=8 but 2 processes"),
    (["training.global_batch_size=6", "training.micro_batch_size=4"], 1, "must be a multiple"),
    (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=false"], 2, "requires sequence parallelism"),
])
def test_layouts_are_checked_before_any_process_group(overrides, world, expected):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace("*", r"\*")):
        check_layout(cfg, world)


def test_valid_layouts_pass():
    for world, overrides in [(1, []), (2, ["parallel.expert_model_parallel_size=2"]),
                             (2, ["parallel.tensor_model_parallel_size=2"]),
                             (4, ["parallel.tensor_model_parallel_size=2", "parallel.expert_model_parallel_size=2",
                                  "training.global_batch_size=32"])]:
        check_layout(load_config(None, overrides), world)


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: 4\n   hidden_size: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: YAML syntax error at line \d+"):
        load_config(bad)


def test_cli_reports_bad_key_in_one_line_with_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moe_erc", "train", str(REPO / "configs" / "tiny.yaml"),
                           "moe.num_expertz=4"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "moe-erc: error: unknown config key 'moe.num_expertz'; did you mean 'moe.num_experts'?")
    assert "Traceback" not in proc.stderr


def test_defaults_are_complete_yaml():
    assert set(yaml.safe_load(Config().to_yaml())) == {
        "model", "moe", "erc", "parallel", "data", "tokenizer", "training", "optimizer", "logging", "checkpoint"}


def test_a_key_given_twice_in_a_yaml_file_is_refused_naming_the_key_and_both_lines(tmp_path):
    """Plain YAML keeps the last of two equal keys silently; a config that says two things is refused."""
    path = tmp_path / "twice.yaml"
    path.write_text("model:\n  hidden_size: 64\n  num_layers: 2\n  hidden_size: 128\ntraining:\n  train_iters: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: duplicate key 'hidden_size' at line 4 (first at line 2); YAML would keep "
                              f"only the last: remove one")
    path.write_text("model:\n  hidden_size: 64\nmoe:\n  num_experts: 4\nmodel:\n  num_layers: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'model' at line 5 \\(first at line 1\\)"):
        load_config(path)
    path.write_text("model:\n  hidden_size: 64\nmoe:\n  hidden_size: 8\n")  # the same name in two sections is fine
    with pytest.raises(ConfigError, match="unknown config key 'moe.hidden_size'"):
        load_config(path)
