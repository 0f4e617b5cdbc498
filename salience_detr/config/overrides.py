"""Strict ``key=value`` overrides: a typo or a wrong type stops the run before any work, naming the fix.

detectron2's ``LazyConfig.apply_overrides`` adds any key it is given, so ``train.max_itr=2`` trains the full
schedule with the typo saved in ``config.yaml``, and ``train.max_iter=abc`` fails much later as chained
TypeErrors. Here an unknown key is an error naming the closest existing keys; a leading ``+`` adds a key on
purpose (``++`` adds or replaces), as in Hydra's grammar; a value whose type does not fit the current one is an
error naming the key and the type it expects.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

_ABSENT = object()


class ConfigOverrideError(ValueError):
    """A command-line override that does not fit the config; the message says how to write it instead."""


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """Apply ``key=value`` overrides to ``cfg`` in place, checking each key and value type first; returns ``cfg``."""
    overrides = list(overrides)
    _refuse_flags(overrides)
    for parsed in _parse(overrides):
        _apply_one(cfg, parsed)
    return cfg


def _refuse_flags(overrides: list[str]) -> None:
    """argparse hands everything after the first override to the config, flags included: name them."""
    flags = [item for item in overrides if item.startswith("-")]  # no config key starts with "-"
    if flags:
        raise ConfigOverrideError(
            f"Command-line flag(s) {flags} appear among the config overrides; everything after the first "
            f"key=value is read as an override. Put flags before the overrides: `... {flags[0]} key=value`, "
            f"not `... key=value {flags[0]}`."
        )


def _parse(overrides: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.extend(parser.parse_overrides([text]))
        except OverrideParseException as error:
            raise ConfigOverrideError(
                f"Cannot parse the override {text!r}: write it as key=value (e.g. train.max_iter=100; quote "
                f"values with spaces or special characters). Parser said: {_parser_detail(error)}"
            ) from None
    return parsed


def _parser_detail(error: Exception) -> str:
    """Hydra's reason without its caret line and documentation link."""
    lines = [line for line in str(error).splitlines() if line.strip(" ^") and not line.startswith("See https")]
    return lines[-1] if lines else str(error)


def _apply_one(cfg: DictConfig, override) -> None:
    key, text = override.key_or_group, override.input_line
    if not key:
        raise ConfigOverrideError(f"The override {text!r} has no key; write it as key=value, e.g. train.max_iter=100")
    if override.is_delete():
        raise ConfigOverrideError(f"Deleting keys ({text!r}) is not supported; set the key to null instead: {key}=null")
    if override.is_sweep_override():
        raise ConfigOverrideError(f"{text!r} is a sweep (several values); give one value per run, e.g. {key}=VALUE")
    value = override.value()
    current = _lookup(cfg, key, text)
    if override.is_add():
        if current is not _ABSENT:
            raise ConfigOverrideError(
                f"{text!r} adds {key!r}, but the config already has it; drop the leading '+' to change it "
                f"({text.lstrip('+')}), or write '++' to add or replace."
            )
    elif not override.is_force_add():
        if current is _ABSENT and not _is_constructor_argument(cfg, key):
            raise ConfigOverrideError(_unknown_key_message(cfg, key, text))
        if current is not _ABSENT:
            value = _checked_value(key, current, value, text)
    OmegaConf.update(cfg, key, value, merge=True)


def _lookup(cfg: DictConfig, key: str, text: str) -> Any:
    """The current value at ``key`` (interpolations resolved; None when they cannot be), or ``_ABSENT``."""
    parts = key.split(".")
    node: Any = cfg
    for depth, part in enumerate(parts):
        if isinstance(node, DictConfig):
            if part not in node:
                return _ABSENT
        elif isinstance(node, ListConfig):
            if not part.isdigit() or int(part) >= len(node):
                return _ABSENT
            part = int(part)
        else:
            prefix = ".".join(parts[:depth])
            kind = "null" if node is None else f"a {type(node).__name__} value"
            raise ConfigOverrideError(
                f"{text!r} sets a key inside {prefix!r}, which is {kind}, not a group of keys; "
                f"set {prefix}=VALUE instead."
            )
        node = OmegaConf.select(cfg, ".".join(parts[: depth + 1]), throw_on_resolution_failure=False)
    return node


def _target_parameters(node: Any) -> set[str] | None:
    """Argument names of a LazyCall node's target (None: it takes any keyword); empty for a plain group."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return set()
    target = node._target_
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        target = locate(target)
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def _is_constructor_argument(cfg: DictConfig, key: str) -> bool:
    """A LazyCall node takes every argument of its target, set in the config or left at its default."""
    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
    parameters = _target_parameters(node)
    return parameters is None or name in parameters


def _unknown_key_message(cfg: DictConfig, key: str, text: str) -> str:
    parent, _, leaf = key.rpartition(".")
    keys = list(_all_keys(cfg))
    siblings = sorted(k for k in keys if k.rpartition(".")[0] == parent)
    close = _close_by_leaf(leaf, siblings) or _close_by_leaf(leaf, keys)
    if close:
        hint = "Did you mean " + " or ".join(close) + "?"
    else:
        where = f"under {parent!r}" if parent else "at the top level"
        hint = f"Keys {where}: {', '.join(siblings[:12])}{' ...' if len(siblings) > 12 else ''}."
    return f"Unknown config key {key!r} in override {text!r}. {hint} To add a new key on purpose, write +{text}"


def _close_by_leaf(leaf: str, keys: list[str]) -> list[str]:
    """Keys whose last part is spelled like ``leaf``, best first (the parts before it often share a prefix)."""
    by_leaf: dict[str, list[str]] = {}
    for k in keys:
        by_leaf.setdefault(k.rpartition(".")[2], []).append(k)
    close = difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.6)
    return [k for name in close for k in by_leaf[name]][:3]


def _all_keys(node: DictConfig, prefix: str = ""):
    """Every dotted key of a config, without resolving interpolations."""
    parameters = _target_parameters(node) or set()
    for name in sorted(parameters - set(node.keys())):
        yield f"{prefix}{name}"
    for name in node.keys():
        dotted = f"{prefix}{name}"
        yield dotted
        child = node._get_node(name)
        if isinstance(child, DictConfig) and not child._is_none():
            yield from _all_keys(child, dotted + ".")


def _checked_value(key: str, current: Any, value: Any, text: str) -> Any:
    """``value`` converted to the type of ``current`` where that is lossless; an error naming the type otherwise."""
    raw = text.split("=", 1)[1]
    if current is None or value is None:
        return value
    if isinstance(value, str) and value in ("None", "none") and not isinstance(current, str):
        raise ConfigOverrideError(f"{text!r}: Hydra reads {value} as a string; write {key}=null for None.")
    if isinstance(current, bool):
        expected, fits = "a bool (true or false)", isinstance(value, bool)
    elif isinstance(current, int):
        expected, fits = "an int", isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, float):
        expected, fits = "a float", isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if fits else value
    elif isinstance(current, str):
        if isinstance(value, (int, float, bool)):
            return raw
        expected, fits = "a string", isinstance(value, (str, list))
    elif isinstance(current, DictConfig):
        expected, fits = "a group of keys (set its fields as key.field=VALUE, or null)", isinstance(value, dict)
    elif isinstance(current, (ListConfig, list, tuple)):
        expected, fits = "a list, e.g. [a,b]", isinstance(value, (list, tuple))
    else:
        return value
    if not fits:
        raise ConfigOverrideError(
            f"Wrong type for {key!r} in override {text!r}: expects {expected} (now {current!r}), got {raw!r}. "
            f"Write e.g. {key}={_example(current)}"
        )
    return value


def _example(current: Any) -> str:
    if isinstance(current, bool):
        return "true"
    if isinstance(current, (int, float)):
        return repr(current)
    if isinstance(current, DictConfig):
        return "null"
    return "[a,b]"
