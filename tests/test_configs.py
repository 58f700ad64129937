"""Config files load and validate; bad keys and values are reported by their dotted name."""

import importlib.util
import pathlib

import pytest

from gram_jax.training.config import ConfigError, base_config, load_config, validate

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.py"))
SYNTHETIC = str(ROOT / "configs" / "synthetic.py")
# Every variant of every experiment file: (path[:arg], expected config name).
SYNTHETIC_METHODS = (
    "gram", "gram_exact", "gram_infonce", "gram_handover", "simplex", "triangle", "symile",
    "infonce", "infonce_all", "siglip", "comm",
)  # fmt: skip
DEFAULT_METHOD = "triangle"  # what `python train.py` trains
VARIANTS = [
    (SYNTHETIC, f"{DEFAULT_METHOD}_synthetic"),
    *[(f"{SYNTHETIC}:method={m}", f"{m}_synthetic") for m in SYNTHETIC_METHODS],
    (f"{SYNTHETIC}:scale=pod", f"{DEFAULT_METHOD}_synthetic_pod"),
    (str(ROOT / "configs" / "trifeature.py"), "comm_trifeature"),
    *[
        (str(ROOT / "configs" / f"trifeature.py:method={m}"), f"{m}_trifeature")
        for m in ("cross", "cross_self", "gram")
    ],
    (str(ROOT / "configs" / "gram_embeddings.py"), "gram_embeddings"),
    (str(ROOT / "configs" / "gram_embeddings.py:subtitles=True"), "gram_embeddings"),
]


def _train_module():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_config_file_is_covered():
    names = {p.stem for p in CONFIGS}
    assert names == {pathlib.Path(p.split(":")[0]).stem for p, _ in VARIANTS}


@pytest.mark.parametrize("path, name", VARIANTS, ids=lambda x: pathlib.Path(x).name)
def test_config_loads_and_validates(path, name):
    c = load_config(path)
    assert c.name == name
    validate(c)


def test_comparison_variants_differ_only_in_the_method():
    base = load_config(SYNTHETIC)
    assert load_config(f"{SYNTHETIC}:method={DEFAULT_METHOD}").to_dict() == dict(
        base.to_dict(), name=f"{DEFAULT_METHOD}_synthetic"
    )
    for method in SYNTHETIC_METHODS:
        c = load_config(f"{SYNTHETIC}:method={method}")
        for key in ("seed", "train.steps", "train.batch_size", "data.name", "optim.lr"):
            node_a, node_b = base, c
            for part in key.split("."):
                node_a, node_b = node_a[part], node_b[part]
            assert node_a == node_b, (method, key)
    assert load_config(f"{SYNTHETIC}:method=infonce").loss.name == "infonce"
    assert load_config(f"{SYNTHETIC}: method = comm ,scale=cpu").model.kind == "comm"


def test_tpu_pod_config_is_pod_sized():
    c = load_config(f"{SYNTHETIC}:scale=pod")
    assert c.train.batch_size >= 4096
    assert c.loss.impl == "ring" and c.model.dtype == "bfloat16"
    assert c.mesh.fsdp > 1 and c.mesh.params == "fsdp"
    assert all(m.preset == "base" for m in c.model.modalities.values())


@pytest.mark.parametrize(
    "arg, message",
    [
        ("method=triplet", r"^config argument method='triplet': not one of"),
        ("methd=gram", r"^config argument 'methd': no such key"),
        ("method", r"^config argument 'method' must look like key=value"),
    ],
)
def test_bad_variant_argument_is_reported(arg, message):
    with pytest.raises(ConfigError, match=message):
        load_config(f"{SYNTHETIC}:{arg}")


def test_variant_argument_needs_a_get_config_that_takes_it(tmp_path):
    from gram_jax.training.config import parse_arg

    plain = tmp_path / "plain.py"
    plain.write_text("from gram_jax.training.config import base_config as get_config\n")
    with pytest.raises(ConfigError, match="takes no argument"):
        load_config(f"{plain}:x=1")
    arg = parse_arg("steps=5,lr=1", steps=600, lr=1e-3, name="a")
    assert arg.steps == 5 and arg.lr == 1.0 and isinstance(arg.lr, float) and arg.name == "a"
    with pytest.raises(ConfigError, match="'steps'"):
        parse_arg("steps=fast", steps=600)


def test_overrides_are_typed():
    c = load_config(
        SYNTHETIC,
        ["optim.lr=3e-4", "config.train.steps=70", "optim.schedule=linear", "train.steps=80"],
    )
    assert c.optim.lr == 3e-4 and c.train.steps == 80 and c.optim.schedule == "linear"
    c = load_config(SYNTHETIC, ["optim.lr=1"])
    assert isinstance(c.optim.lr, float)
    c = load_config(
        SYNTHETIC,
        [
            "model.modalities.image.overrides.width=32",
            "optim.lr_multipliers=(('encoders/image', 0), ('heads/', 0.5))",
        ],
    )
    assert c.model.modalities.image.overrides.width == 32
    assert c.optim.lr_multipliers == (("encoders/image", 0), ("heads/", 0.5))


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lrr=1e-3", "config.optim.lrr"),
        ("optimizer.lr=1e-3", "config.optimizer"),
        ("optim.lr=fast", "config.optim.lr"),
        ("optim.lr=-1.0", "config.optim.lr"),
        ("train.steps=2.5", "config.train.steps"),
        ("loss.name=triplet", "config.loss.name"),
        ("loss.impl=allgather", "config.loss.impl"),
        ("model.anchor=video", "config.model.anchor"),
        ("model.modalities.image.kind=picture", "config.model.modalities.image.kind"),
        ("optim.warmup_steps=100000", "config.optim.warmup_steps"),
        ("train.grad_accum=3", "config.train.grad_accum"),
        ("eval.scores=('volume','dot')", "config.eval.scores"),
        ("optim.lr_multipliers=(('encoders/(', 0.1),)", "config.optim.lr_multipliers[0]"),
        ("optim.lr_multipliers=(('encoders/', -1),)", "config.optim.lr_multipliers[0]"),
        ("optim.lr_multipliers=('encoders/=0.1',)", "config.optim.lr_multipliers[0]"),
        ("mesh.rules=(('heads', 'fsdp', 1),)", "config.mesh.rules[0]"),
    ],
)
def test_config_errors_name_the_bad_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(SYNTHETIC, [override])
    assert str(e.value).startswith(key), str(e.value)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"did you mean config\.optim\.lr\?"):
        load_config(SYNTHETIC, ["optim.lrr=1e-3"])


def test_typo_inside_a_config_file_is_reported(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from gram_jax.training.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        "    c.train.stepz = 3\n"
        "    return c\n"
    )
    with pytest.raises(ConfigError, match=r"^config\.train\.stepz: no such key"):
        load_config(str(bad))


def test_incoherent_settings_are_rejected():
    c = base_config()
    c.model.kind = "comm"
    with pytest.raises(ConfigError, match=r"^config\.loss\.name"):
        validate(c)
    c = base_config()
    c.loss.dam_weight = 0.1
    c.train.grad_accum = 2
    with pytest.raises(ConfigError, match=r"^config\.loss\.dam_weight"):
        validate(c)


def test_train_cli_reports_config_errors(capsys):
    train = _train_module()
    rc = train.main(["--config", SYNTHETIC, "--config.optim.lrr=1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "config.optim.lrr" in err
    rc = train.main(["--config", str(ROOT / "configs" / "nope.py")])
    assert rc == 2


def test_train_cli_parses_both_override_forms():
    train = _train_module()
    args, overrides = train.parse_args(
        ["--workdir", "/tmp/x", "--config.optim.lr=0.1", "--config.train.steps", "5"]
    )
    assert args.workdir == "/tmp/x"
    assert overrides == ["optim.lr=0.1", "train.steps=5"]
