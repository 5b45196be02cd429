"""What experiment files use besides the base config (attn_jax/config.py): loading one another by path
(`experiments/` is a folder of files, not a package) and refusing a variant they do not have. Light
on purpose: loading an experiment imports no JAX or TensorFlow."""

import importlib.util
import types
from pathlib import Path

import ml_collections

from attn_jax.errors import UserError


class UnknownVariant(UserError, KeyError):
    """`--config=experiments/x.py:ARG` with an ARG the experiment lacks. A KeyError too, so that
    config_flags passes it on whole (it rewraps a ValueError under a traceback)."""

    def __str__(self) -> str:
        return str(self.args[0])


def load_module(path: str | Path) -> types.ModuleType:
    """The Python file at `path`, executed as a module."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_variant(file: str, arg: str | None, variants: tuple[str | None, ...]) -> None:
    """Refuses, in one line, an `arg` that is not among `variants` (the experiment's `VARIANTS`)."""
    if arg not in variants:
        names = [f"':{v}'" for v in variants if v is not None] + ["nothing"] * (None in variants)
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise UnknownVariant(f"{Path(file).name} has no variant {arg!r}: use {listed}")


def sibling_config(file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the experiment `name` in the folder of `file` (an experiment's
    `__file__`): how one experiment builds on another."""
    return load_module(Path(file).with_name(f"{name}.py")).get_config(arg)

