import sys

import pytest

from split_trainer.config import ConfigError, load_config, parse_override

from conftest import ROOT, run, torchrun_cmd


def test_shipped_config_is_one_central_three_edges():
    cfg = load_config(ROOT / "configs" / "mnist.yaml")
    assert cfg.topology.edges == 3 and cfg.world_size == 4
    assert cfg.model.name == "mnist_cnn" and cfg.model.split == "pool"



@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_is_valid(name):
    load_config(ROOT / "configs" / name)


def test_the_private_config_keeps_data_labels_and_edge_weights_on_the_edges():
    cfg = load_config(ROOT / "configs" / "mnist_private.yaml")
    assert cfg.data.placement == "edge" and cfg.privacy.edge_weights == "edges"
    assert cfg.model.plan[-1]["place"] == "edge"  # U-shaped: the loss, so the labels, on the edge

def test_overrides_parse_yaml_scalars_and_dotted_keys():
    cfg = load_config(None, ["train.max_steps=60", "train.lr=1e-2", "data.root=/x/y", "model.dropout=false",
                             "train.max_steps=70"])
    assert cfg.train.max_steps == 70 and cfg.train.lr == 0.01 and cfg.data.root == "/x/y"
    assert cfg.model.dropout is False
    assert parse_override("train.max_steps=null") == (["train", "max_steps"], None)


def test_int_is_accepted_where_a_float_is_expected():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize("override, words", [
    (["train.bogus=1"], "unknown config key train.bogus"),
    (["nosection.x=1"], "unknown config key nosection"),
    (["train.epochs=two"], "train.epochs must be int"),
    (["train.epochs=1.5"], "train.epochs must be int"),
    (["data.download=1"], "data.download must be bool"),
    (["train.seed=true"], "train.seed must be int"),
    (["train.epochs=0"], "train.epochs must be at least 1"),
    (["train.lr=-0.1"], "train.lr must be positive"),
    (["train.lr_gamma=1.5"], "train.lr_gamma must be in (0, 1]"),
    (["train.momentum=1"], "train.momentum must be in [0, 1)"),
    (["topology.edges=0"], "topology.edges must be at least 1"),
    (["data.batch_size=0"], "data.batch_size must be at least 1"),
    (["train.optimizer=lbfgs"], "train.optimizer must be one of sgd, adadelta, adam"),
    (["rpc.timeout_s=0"], "rpc.timeout_s must be positive"),
    (["train.edge_sync_every=0"], "train.edge_sync_every must be at least 1"),
    (["data.name=cifar"], "data.name must be one of mnist, fashion_mnist"),
    (["data.mean=[0.5, 0.5]"], "data.mean must be null or a list of 3 numbers"),
    (["train=3"], "train must be a mapping"),
    (["novalue"], "must look like KEY=VALUE"),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert words in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.max_steps=5"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_cli_bad_value_exits_2_with_one_line(in_process):
    code, out, err = in_process("--config", "configs/mnist.yaml", "--set", "train.lr=fast")
    assert code == 2
    assert (out + err).strip() == "split_trainer: error: train.lr must be float, got str 'fast'"


def test_cli_world_size_mismatch_exits_2(in_process):
    code, out, err = in_process("--config", "configs/mnist.yaml")  # no torchrun: world size 1
    assert code == 2
    assert "world size 1 does not match topology.edges=3" in err
    assert "Traceback" not in out + err


@pytest.mark.slow
def test_torchrun_world_size_mismatch_exits_2_on_every_rank(tmp_path):
    result = run(torchrun_cmd(2, "--config", "configs/mnist.yaml", "--set", f"output.run_dir={tmp_path}"),
                 timeout=180)
    assert result.returncode == 1, result.stdout[-3000:]  # torchrun's: a rank failed
    assert "world size 2 does not match topology.edges=3: 1 central + 3 edges needs 4 ranks" in result.stdout
    assert "exitcode  : 2" in result.stdout  # torchrun's report of the ranks' exit code
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_missing_data_exits_2_before_training(in_process, tmp_path):
    code, _, err = in_process("--set", "topology.edges=1", "topology.transport=loopback",
                              f"data.root={tmp_path / 'nowhere'}", "data.download=false",
                              f"output.run_dir={tmp_path / 'run'}")
    assert "lacks mnist file(s) train-images-idx3-ubyte" in err
    assert code == 2
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("args, words", [
    (["--set", "topology.edges=1", "model.split=fc2"], "model.split 'fc2' is not a layer of mnist_cnn"),
    (["--resume", "/nonexistent/step_00000010", "--set", "topology.edges=1"], "not a complete checkpoint folder"),
])
def test_bad_model_or_resume_path_exits_2_before_writing(in_process, mnist_root, tmp_path, args, words):
    code, out, err = in_process(*args, "topology.transport=loopback", f"data.root={mnist_root}",
                                f"output.run_dir={tmp_path}")
    assert words in err and code == 2, (out + err)[-3000:]
    assert list(tmp_path.iterdir()) == []  # nothing half-written, not even config.yaml


@pytest.mark.parametrize("plan, words", [
    ("[{place: edge, until: pool0}, {place: edge, until: pool1}, {place: central}]", "places must alternate"),
    ("[{place: edge, until: pool0}, {place: central, until: nope}, {place: edge}]", "'nope' is not a layer"),
    ("[{place: edge, until: pool1}, {place: central, until: pool0}, {place: edge}]", "does not come after"),
    ("[{place: edge, until: pool0}, {place: central, until: relu2}]", "leaves layers avgpool, flatten, fc"),
])
def test_a_bad_plan_exits_2_with_one_line(in_process, tmp_path, plan, words):
    code, out, err = in_process("--config", "configs/mnist_tutorial.yaml", "--set", f"model.plan={plan}",
                                f"output.run_dir={tmp_path}")
    assert code == 2
    lines = (out + err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("split_trainer: error: model.plan") and words in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_bad_plan_stops_every_rank_before_rpc(tmp_path):
    plan = "[{place: edge, until: pool0}, {place: edge, until: pool1}, {place: central}]"
    result = run(torchrun_cmd(3, "--config", "configs/mnist_tutorial.yaml", "--set", "topology.edges=2",
                              f"model.plan={plan}", f"output.run_dir={tmp_path}"), timeout=180)
    # Each rank checks before RPC; torchrun stops the others as soon as the first has exited 2.
    assert result.returncode == 1, result.stdout[-3000:]  # torchrun's: a rank failed
    assert "split_trainer: error: model.plan: segments 1 and 2 both run on the edge" in result.stdout
    assert "exitcode  : 2" in result.stdout and "Traceback" not in result.stdout.split("error: model.plan")[0]
    assert list(tmp_path.iterdir()) == []


def test_the_central_gets_as_many_cores_as_the_edges_on_its_host():
    from split_trainer.transport.topology import thread_split
    assert thread_split(16, 3, True) == [8, 3, 3, 2]
    assert thread_split(16, 7, True) == [8, 2, 1, 1, 1, 1, 1, 1]
    assert thread_split(16, 1, True) == [8, 8]
    assert thread_split(2, 3, True) == [1, 1, 1, 1]  # fewer cores than ranks: one thread each
    assert thread_split(16, 0, True) == [16]  # the central alone on its host
    assert thread_split(16, 4, False) == [4, 4, 4, 4]  # an edge host


def test_the_configuration_reference_is_what_the_code_generates():
    """docs/configuration.md is `config --reference`'s output: a field added or redocumented in
    split_trainer/config/ without regenerating the page fails here."""
    result = run([sys.executable, "-m", "split_trainer", "config", "--reference"], timeout=60)
    assert result.returncode == 0, result.stdout
    assert result.stdout == (ROOT / "docs" / "configuration.md").read_text(), \
        "run: python -m split_trainer config --reference > docs/configuration.md"
    assert "| `rpc.activation_dtype` | `float32` \\| `float16` \\| `bfloat16` \\| `float8` \\| `int8` | `float32` |" \
        in result.stdout


def test_config_resolves_a_file_without_starting_anything(in_process):
    code, out, _ = in_process("config", "--config", "configs/mnist.yaml", "--set", "train.lr=0.1")
    assert code == 0 and "lr: 0.1\n" in out and "edges: 3\n" in out
    code, out, err = in_process("config", "--set", "train.lr=-1")
    assert code == 2 and (out + err).strip() == "split_trainer: error: train.lr must be positive, got -1.0"


@pytest.mark.parametrize("override", ["train.lr=.inf", "privacy.clip=.inf", "data.mean=[.nan]", "rpc.timeout_s=.inf",
                                      "train.lr=1e999"])
def test_a_number_that_is_not_finite_is_refused(override):
    with pytest.raises(ConfigError, match=f"{override.split('=')[0]} must be finite"):
        load_config(None, [override])


LIVE_KEYS = {"topology.transport": "grpc", "topology.membership": "live", "train.dispatch": "free_first"}


def test_a_live_fleet_refuses_what_it_cannot_carry():
    for key, value in (("topology.transport", "rpc"), ("train.engine", "autograd"), ("train.edge_loss", "local")):
        keys = {**LIVE_KEYS, "topology.transport": "loopback", key: value}
        with pytest.raises(ConfigError, match=f"topology.membership=live does not take {key}={value}"):
            load_config(None, [f"{k}={v}" for k, v in keys.items()])
    for keys in ({"topology.transport": "loopback"}, {"train.dispatch": "round_robin"}, {"data.placement": "edge"},
                 {"privacy.edge_weights": "edges"}, {"data.placement": "vertical", "train.dispatch": "round_robin"}):
        load_config(None, [f"{k}={v}" for k, v in {**LIVE_KEYS, **keys}.items()])  # each is carried
