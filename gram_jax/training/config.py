"""Experiment configs: the base schema, loading ``configs/<name>.py``, overrides, validation.

A config file defines ``get_config(arg=None) -> ml_collections.ConfigDict``; every experiment
config starts from :func:`base_config` and changes fields, so the set of keys is the same
everywhere and an override or a typo can be checked against it.

Variants of one experiment live in one file (big_vision's convention): ``path.py:arg`` hands
the text after the colon to ``get_config(arg)`` (``None`` without a colon), and the file reads
it with :func:`parse_arg`, comma-separated ``key=value`` pairs typed like its defaults::

    python train.py --config configs/synthetic.py:method=infonce
    python train.py --config configs/trifeature.py:method=cross_self

Overrides use dotted paths::

    python train.py --config configs/synthetic.py --config.optim.lr=3e-4 --config.train.steps=50

Values are parsed as Python literals (``3e-4``, ``(1, 8)``, ``True``, ``'cosine'``) and fall
back to the raw string. Every error is a :class:`ConfigError` whose message starts with the
full dotted key (``config.optim.lr``), so a user sees which setting is wrong.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import math
import pathlib
import re
from typing import Any

import ml_collections

from gram_jax import losses
from gram_jax import modalities as modality_lib
from gram_jax import scores as score_lib
from gram_jax.distributed import IMPLS

__all__ = [
    "ConfigError",
    "base_config",
    "config_from_file",
    "load_config",
    "parse_arg",
    "path_rules",
    "apply_override",
    "validate",
    "LOSS_IMPLS",
    "modality",
]

# The losses are the registry gram_jax.losses.LOSSES (register_loss adds one).
LOSS_IMPLS = ("gspmd", *IMPLS)
# Old key -> its new name; the old one is still accepted (in files and overrides).
RENAMED_KEYS = {"loss.comm_temperature": "loss.nt_xent_temperature"}
SCHEDULES = ("cosine", "linear", "constant")
PRESETS = ("tiny", "small", "base", "large")
# Default eval scores; any name of the score table gram_jax.scores.SCORES is accepted.
SCORES = ("volume", "span_distance", "cosine")


class ConfigError(ValueError):
    """A bad config value or key; the message starts with the dotted key."""


def modality(kind: str, preset: str = "tiny", **overrides: Any) -> ml_collections.ConfigDict:
    """One encoder entry: ``kind`` (a registered modality kind, ``gram_jax.modalities``),
    ``preset`` and overrides of that kind's config dataclass (e.g. ``ImageConfig``)."""
    return ml_collections.ConfigDict(
        {"kind": kind, "preset": preset, "overrides": ml_collections.ConfigDict(overrides)}
    )


def base_config() -> ml_collections.ConfigDict:
    """Every key a config may set, with defaults (GRAM on ``synthetic_trimodal``, tiny)."""
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.kind = "gram"  # "gram": per-modality towers + heads; "comm": CoMM fusion model
    # modality name -> encoder; the names are also the batch keys the data pipeline yields.
    c.model.modalities = ml_collections.ConfigDict(
        {
            "text": modality("text", vocab_size=64),
            "image": modality("image", patch_size=8),
            "audio": modality("audio", audio_patch=(8, 8)),
        }
    )
    c.model.anchor = "text"
    c.model.embed_dim = 64
    c.model.temperature_init = 0.07
    c.model.learn_temperature = True  # False: tau stays temperature_init (losses with one)
    c.model.dtype = "float32"  # compute dtype of the encoders: "float32" or "bfloat16"
    # CoMM only: fusion transformer and projector (docs/authors_code.md section 7).
    c.model.fusion_width = 64
    c.model.fusion_depth = 1
    c.model.fusion_heads = 8
    c.model.projector_dims = (256, 128)
    # DAM (GRAM's matching head) size; used when loss.dam_weight > 0.
    c.model.matching_depth = 1
    c.model.matching_heads = 4

    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic_trimodal"
    c.data.data_dir = ""  # "": $GRAM_JAX_DATA_DIR or ~/.cache/gram_jax/datasets
    c.data.builder = ml_collections.ConfigDict()  # kwargs of gram_jax.data.prepare (sizes...)
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.augment = "none"  # gram_jax.data.augment preset: none, default, light, simclr
    c.data.two_views = False  # CoMM: two augmented views per example
    c.data.worker_count = 0

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "gram"
    c.loss.impl = "gspmd"  # how a sharded batch's loss is computed (see gram_jax.distributed)
    c.loss.label_smoothing = 0.1
    c.loss.gradient = "exact"  # GRAM: "exact" or the authors' "faithful" stop-gradient
    c.loss.pairs = "anchored"  # InfoNCE: "anchored" (anchor vs each) or "all" pairs
    c.loss.dam_weight = 0.0  # GRAM's matching (DAM) term weight; the authors use 0.1
    # Fixed NT-Xent temperature of "comm" and "cross_self" (formerly loss.comm_temperature).
    c.loss.nt_xent_temperature = 0.1
    for spec in losses.LOSSES.values():  # settings of registered losses
        for key, value in spec.config_keys.items():
            c.loss[key] = value

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.optim.schedule = "cosine"
    c.optim.end_lr_ratio = 0.0  # final lr = lr * end_lr_ratio
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0  # global-norm clipping; 0 disables
    # Per-module learning-rate multipliers: (regex, multiplier) pairs matched (re.search,
    # first match) against parameter paths such as "encoders/video/...". 0 freezes the module.
    c.optim.lr_multipliers = ()

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128  # global batch (all hosts)
    c.train.steps = 1000
    c.train.grad_accum = 1  # microbatches per step (GradCache: negatives stay global)
    c.train.log_every = 25
    c.train.eval_every = 0  # 0: evaluate only at the end
    c.train.checkpoint_every = 250
    c.train.keep_checkpoints = 2
    c.train.async_checkpointing = True
    c.train.save_on_signal = True  # SIGTERM / SIGINT: checkpoint the current step, then stop
    c.train.progress_bar = True
    c.train.final_eval = True  # held-out evaluation + final_metrics.json at the end

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.params = "replicated"  # or "fsdp": shard parameters over the fsdp axis
    c.mesh.fsdp_min_size = 2**14  # smaller parameters stay replicated under "fsdp"
    # (regex, spec) overrides per parameter path; spec "replicated" or per-dimension axes,
    # a tuple like ("fsdp", None) or the text "fsdp,None".
    c.mesh.rules = ()

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256
    c.eval.scores = SCORES  # () skips retrieval (e.g. probes only)
    c.eval.max_examples = 0  # 0: the whole split
    c.eval.probe_tasks = ()  # label names for linear probes (Trifeature: "share", ...)
    c.eval.probe_train_split = "train"
    c.eval.probe_train_examples = 4096
    # Probe features of a "gram"-kind model: "embeddings" (concatenated unit embeddings) or
    # "encoders" (concatenated pooled encoder outputs, CoMM's Cross baselines). CoMM: fused.
    c.eval.probe_features = "embeddings"

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = False  # call jax.distributed.initialize() (multi-host)
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    return c


# ---------------------------------------------------------------------------------------------
# Loading and overrides
# ---------------------------------------------------------------------------------------------


def _split_arg(path: str) -> tuple[str, str | None]:
    """``"configs/x.py:method=gram"`` -> ``("configs/x.py", "method=gram")``; no colon after
    the ``.py`` -> ``(path, None)``."""
    head, sep, arg = str(path).partition(".py:")
    if not sep:
        return str(path), None
    return head + ".py", arg


def _load_module(path: str):
    p = pathlib.Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_gram_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    return module


def _get_config(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of ``"file.py[:arg]"`` (``get_config()`` when there is no arg)."""
    file, arg = _split_arg(str(path))
    get_config = _load_module(file).get_config
    if arg is None:
        return get_config()
    if not inspect.signature(get_config).parameters:
        raise ConfigError(
            f"config file {file!r}: get_config() takes no argument, so {arg!r} (after the "
            "colon) cannot select a variant"
        )
    return get_config(arg)


def config_from_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of another config file ``"file.py[:arg]"``, unvalidated: for a config
    that builds on another experiment's (variants of one experiment belong in one file)."""
    return _get_config(path)


def eval_scores(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The scores held-out retrieval reports, primary first: the loss's own score (its
    ``LossSpec.score``: volume for GRAM, simplex for TRIANGLE, ...), then ``config.eval.scores``
    (duplicates dropped); ``()`` when ``config.eval.scores`` is empty (retrieval off)."""
    if not config.eval.scores:
        return ()
    own = losses.LOSSES[config.loss.name].score if config.loss.name in losses.LOSSES else None
    return tuple(dict.fromkeys(s for s in (own, *config.eval.scores) if s))


def parse_arg(
    arg: str | None, choices: dict[str, tuple] | None = None, **defaults: Any
) -> ml_collections.ConfigDict:
    """A config file's variant argument: ``"k1=v1,k2=v2"`` over ``defaults``.

    Keys must be among ``defaults``; each value is parsed as a Python literal (else kept as
    text) and must have its default's type (an int is accepted for a float) and, for a key of
    ``choices``, be one of its entries. ``None`` or ``""`` gives the defaults. For
    ``get_config(arg)`` in ``configs/*.py``::

        def get_config(arg=None):
            arg = parse_arg(arg, {"method": ("gram", "infonce")}, method="gram", steps=600)
    """
    out = ml_collections.ConfigDict(defaults)
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"config argument {item!r} must look like key=value")
        if key not in defaults:
            raise ConfigError(
                f"config argument {key!r}: no such key (this config takes {sorted(defaults)})"
            )
        out[key] = _coerce(f"config argument {key!r}", defaults[key], _parse_value(text.strip()))
    for key, allowed in (choices or {}).items():
        if out[key] not in allowed:
            raise ConfigError(f"config argument {key}={out[key]!r}: not one of {tuple(allowed)}")
    return out


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(key: str, old: Any, new: Any) -> Any:
    """Convert an override to the type of the value it replaces, or raise naming the key."""
    if old is None or isinstance(old, ml_collections.ConfigDict):
        return new
    if isinstance(old, bool):
        if isinstance(new, bool):
            return new
        if isinstance(new, str) and new.lower() in ("true", "false"):
            return new.lower() == "true"
        raise ConfigError(f"{key}: expected a bool, got {new!r}")
    if isinstance(old, int):
        if isinstance(new, int) and not isinstance(new, bool):
            return new
        if isinstance(new, float) and new.is_integer():
            return int(new)
        raise ConfigError(f"{key}: expected an int, got {new!r}")
    if isinstance(old, float):
        if isinstance(new, int | float) and not isinstance(new, bool):
            return float(new)
        raise ConfigError(f"{key}: expected a float, got {new!r}")
    if isinstance(old, str):
        return str(new)
    if isinstance(old, tuple | list):
        if isinstance(new, str):
            new = (new,) if new else ()
        if not isinstance(new, tuple | list):
            new = (new,)
        return tuple(new)
    return new


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Set ``config.<dotted> = literal(text)``, checking the key exists (or its parent is a map
    of user-named entries such as ``model.modalities``)."""
    dotted = RENAMED_KEYS.get(dotted, dotted)
    parts = dotted.split(".")
    node = config
    path = "config"
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = f"{path}.{part}"
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"{path}: is a value, it has no field {part!r}")
        if part not in node:
            # Entries under these maps are named by the user, so new ones may be created.
            open_maps = ("config.model.modalities", "config.data.builder")
            user_named = path.startswith("config.model.modalities.") and path.endswith(".overrides")
            if path in open_maps or user_named:
                if last:
                    node[part] = _parse_value(text)
                    return
                node[part] = ml_collections.ConfigDict()
            else:
                close = difflib.get_close_matches(part, list(node.keys()), n=1)
                hint = f" (did you mean {path}.{close[0]}?)" if close else ""
                raise ConfigError(f"{here}: no such key{hint}")
        if last:
            node[part] = _coerce(here, node[part], _parse_value(text))
            return
        node = node[part]
        path = here


def load_config(path: str, overrides: list[str] | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of ``"file.py[:arg]"``, with ``key=value`` overrides applied,
    validated.

    ``overrides`` are ``"optim.lr=3e-4"`` (optionally prefixed with ``config.``).
    """
    config = _get_config(path)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() of {path!r} must return an ml_collections.ConfigDict")
    _rename_old_keys(config)
    _check_schema(config, base_config(), "config")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        key = key.removeprefix("--").removeprefix("config.")
        apply_override(config, key, text)
    validate(config)
    return config


def _rename_old_keys(config) -> None:
    """Move values set under an old key name (:data:`RENAMED_KEYS`) to the new one."""
    for old, new in RENAMED_KEYS.items():
        (group, old_key), (_, new_key) = old.split("."), new.split(".")
        if group in config and old_key in config[group]:
            value = config[group][old_key]
            del config[group][old_key]
            config[group][new_key] = value


def _check_schema(config, schema, path: str) -> None:
    """Every key of ``config`` must exist in ``schema`` (a config file's typo is an error)."""
    for key in config.keys():
        here = f"{path}.{key}"
        if here in ("config.model.modalities", "config.data.builder"):
            continue
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema.keys()), n=1)
            hint = f" (did you mean {path}.{close[0]}?)" if close else ""
            raise ConfigError(f"{here}: no such key{hint}")
        if isinstance(config[key], ml_collections.ConfigDict) and isinstance(
            schema[key], ml_collections.ConfigDict
        ):
            _check_schema(config[key], schema[key], here)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _choice(config, key: str, choices) -> None:
    value = _get(config, key)
    if value not in choices:
        raise ConfigError(f"config.{key}: {value!r} is not one of {tuple(choices)}")


def _get(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _positive(config, key: str, allow_zero: bool = False) -> None:
    value = _get(config, key)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    ok = number and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config.{key}: must be a finite number {bound}, got {value!r}")


def path_rules(key: str, rules) -> list[tuple[re.Pattern, Any]]:
    """Per-path rules ``((regex, value), ...)`` -> ``[(compiled regex, value), ...]``.

    The first rule whose regex ``re.search``-es a parameter path (``"encoders/image/..."``)
    applies. Errors name ``config.<key>[i]``; the old ``"regex=value"`` string form is
    rejected with the tuple it should be.
    """
    out = []
    for i, rule in enumerate(rules):
        where = f"config.{key}[{i}]"
        if isinstance(rule, str):
            pattern, _, value = rule.rpartition("=")
            example = (pattern, _parse_value(value)) if pattern else ("regex", "value")
            raise ConfigError(
                f"{where}: {rule!r} is a 'regex=value' string; rules are (regex, value) pairs, "
                f"here {example!r}"
            )
        if not isinstance(rule, tuple | list) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ConfigError(f"{where}: expected a (regex, value) pair, got {rule!r}")
        try:
            out.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise ConfigError(f"{where}: bad regex {rule[0]!r} ({e})") from None
    return out


def _validate_loss(config: ml_collections.ConfigDict) -> None:
    """The loss's registry entry against the model kind, views, impl and its config keys."""
    name, spec = config.loss.name, losses.get_loss(config.loss.name)
    if spec.model != config.model.kind:
        raise ConfigError(
            f"config.loss.name: {name!r} trains a {spec.model!r}-kind model, but "
            f"config.model.kind = {config.model.kind!r}"
        )
    if spec.two_views != bool(config.data.two_views):
        need = "needs two augmented views (True)" if spec.two_views else "takes one view (False)"
        raise ConfigError(f"config.data.two_views: the {name!r} loss {need}")
    if config.loss.impl != "gspmd" and config.loss.impl not in spec.impls:
        raise ConfigError(
            f"config.loss.impl: the {name!r} loss supports {('gspmd', *spec.impls)}, got "
            f"{config.loss.impl!r}"
        )
    for key in spec.args.values():
        if key not in config.loss:
            raise ConfigError(f"config.loss.{key}: missing (the {name!r} loss reads it)")
    try:
        losses.check_label_smoothing(config.loss.label_smoothing)
    except ValueError as e:
        raise ConfigError(f"config.loss.label_smoothing: {e}") from None
    _positive(config, "loss.nt_xent_temperature")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise :class:`ConfigError` naming the first bad key; checks values and their coherence."""
    _choice(config, "model.kind", ("gram", "comm"))
    _choice(config, "loss.name", tuple(losses.LOSSES))
    _choice(config, "loss.impl", LOSS_IMPLS)
    _choice(config, "loss.gradient", ("exact", "faithful"))
    _choice(config, "loss.pairs", ("anchored", "all"))
    _choice(config, "optim.schedule", SCHEDULES)
    _choice(config, "mesh.params", ("replicated", "fsdp"))
    _choice(config, "model.dtype", ("float32", "bfloat16"))
    _choice(config, "data.augment", ("none", "default", "light", "simclr"))
    _choice(config, "eval.probe_features", ("embeddings", "encoders"))
    mods = config.model.modalities
    if len(mods) < 2:
        raise ConfigError("config.model.modalities: at least two modalities are needed")
    for name, mod in mods.items():
        key = f"model.modalities.{name}"
        for field in ("kind", "preset"):
            if field not in mod:
                raise ConfigError(f"config.{key}.{field}: missing")
        _choice(config, f"{key}.kind", tuple(modality_lib.KINDS))
        _choice(config, f"{key}.preset", PRESETS)
        cfg_cls = modality_lib.KINDS[mod.kind].config
        fields = sorted(f.name for f in dataclasses.fields(cfg_cls))
        for field in (mod.get("overrides") or {}).keys():
            if field not in fields:
                raise ConfigError(
                    f"config.{key}.overrides.{field}: not a field of {cfg_cls.__name__} (kind "
                    f"{mod.kind!r}; after switching kinds, reset config.{key}.overrides={{}}); "
                    f"fields: {fields}"
                )
        for field in mod.keys():
            if field not in ("kind", "preset", "overrides"):
                raise ConfigError(f"config.{key}.{field}: no such key (kind, preset, overrides)")
    if config.model.kind == "gram" and config.model.anchor not in mods:
        raise ConfigError(
            f"config.model.anchor: {config.model.anchor!r} is not one of the modalities "
            f"{tuple(mods.keys())}"
        )
    _validate_loss(config)
    _positive(config, "loss.dam_weight", allow_zero=True)
    if config.loss.dam_weight > 0:
        if config.loss.name != "gram":
            raise ConfigError("config.loss.dam_weight: the DAM term needs the 'gram' loss")
        if config.train.grad_accum > 1:
            raise ConfigError(
                "config.loss.dam_weight: DAM needs every item's tokens at once; it cannot be "
                "combined with config.train.grad_accum > 1"
            )
    for key in ("model.embed_dim", "model.temperature_init", "optim.lr", "train.batch_size"):
        _positive(config, key)
    for key in ("train.steps", "train.grad_accum", "train.log_every", "eval.batch_size"):
        _positive(config, key)
    for key in ("optim.warmup_steps", "optim.weight_decay", "optim.clip_norm"):
        _positive(config, key, allow_zero=True)
    for key in ("train.eval_every", "train.checkpoint_every", "eval.max_examples"):
        _positive(config, key, allow_zero=True)
    _positive(config, "train.keep_checkpoints")
    if not 0.0 <= config.optim.end_lr_ratio <= 1.0:
        raise ConfigError(
            f"config.optim.end_lr_ratio: must be in [0, 1], got {config.optim.end_lr_ratio}"
        )
    if config.optim.warmup_steps > config.train.steps:
        raise ConfigError(
            f"config.optim.warmup_steps: {config.optim.warmup_steps} exceeds config.train.steps "
            f"= {config.train.steps}"
        )
    if config.train.batch_size % config.train.grad_accum:
        raise ConfigError(
            f"config.train.grad_accum: {config.train.grad_accum} does not divide "
            f"config.train.batch_size = {config.train.batch_size}"
        )
    rules = path_rules("optim.lr_multipliers", config.optim.lr_multipliers)
    for i, (pattern, value) in enumerate(rules):
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ConfigError(
                f"config.optim.lr_multipliers[{i}]: the multiplier of {pattern.pattern!r} must "
                f"be a number >= 0, got {value!r}"
            )
    path_rules("mesh.rules", config.mesh.rules)
    if config.mesh.fsdp < 1 or config.mesh.data == 0 or config.mesh.data < -1:
        raise ConfigError(
            f"config.mesh: data must be -1 or >= 1 and fsdp >= 1, got data={config.mesh.data}, "
            f"fsdp={config.mesh.fsdp}"
        )
    for i, score in enumerate(config.eval.scores):
        if score not in score_lib.SCORES:
            known = tuple(score_lib.SCORES)
            raise ConfigError(f"config.eval.scores[{i}]: {score!r} is not one of {known}")
