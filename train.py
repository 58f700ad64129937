"""Train a model of the n-modal family (GRAM, TRIANGLE, CoMM, ...) from a config file.

    python train.py                                # configs/synthetic.py, ./runs/triangle_synthetic
    python train.py --config configs/synthetic.py:method=comm --workdir /tmp/comm
    python train.py --config configs/synthetic.py --config.optim.lr=3e-4 --config.train.steps=50

Overrides are ``--config.<dotted.key>=<python literal>`` (also ``--config.key value``); they
are checked against the config schema and a wrong key or value stops the run with a message
naming it. Running again with the same ``--workdir`` resumes from the newest good checkpoint.

Exit status: 0 done (or already finished), 2 config error (also: a checkpoint written with a
structurally different config, data that does not fit the model), 3 non-finite loss, failed
checkpoint save or unusable dataset, 4 workdir in use by another run, 128 + signal number
after SIGTERM / SIGINT (130, 143).
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys

from gram_jax.training.config import ConfigError, load_config

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent / "configs" / "synthetic.py"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``(args, overrides)``; overrides are ``"dotted.key=value"`` strings."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="config file (.py[:variant])")
    parser.add_argument("--workdir", default=None, help="default: ./runs/<config.name>")
    args, rest = parser.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r} (overrides look like --config.a.b=v)")
        item = item[len("--config.") :]
        if "=" not in item:
            if i + 1 >= len(rest):
                parser.error(f"--config.{item} needs a value")
            item = f"{item}={rest[i + 1]}"
            i += 1
        overrides.append(item)
        i += 1
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    workdir = args.workdir or str(pathlib.Path("runs") / config.name)
    # Imported after the config is valid: JAX start-up is not paid for a typo.
    from gram_jax.data.registry import DataError
    from gram_jax.training.loop import (
        CheckpointWriteError,
        Interrupted,
        NonFiniteError,
        WorkdirBusy,
        train,
    )

    try:
        train(config, workdir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteError, CheckpointWriteError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except WorkdirBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except Interrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + e.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
