"""Configuration shared by every service: tiers, state directory, defaults."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from nitsum_core.errors import InvalidRequest


@dataclass(frozen=True)
class Tier:
    """A traffic class with its SLO: a request meets it if TTFT <= ttft_s and mean TPOT <= tpot_s."""

    name: str
    ttft_s: float
    tpot_s: float
    priority: int


def _parse_tiers(data: dict, source: str) -> dict[str, Tier]:
    table = data.get("tiers")
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{source}: expected a [tiers.<name>] table with at least one tier")
    tiers: dict[str, Tier] = {}
    for name, spec in table.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{source}: [tiers.{name}] must be a table")
        unknown = set(spec) - {"ttft_s", "tpot_s", "priority"}
        if unknown:
            raise ValueError(f"{source}: [tiers.{name}] has unknown keys {sorted(unknown)}")
        try:
            tier = Tier(
                name=name,
                ttft_s=float(spec["ttft_s"]),
                tpot_s=float(spec["tpot_s"]),
                priority=int(spec.get("priority", len(tiers))),
            )
        except KeyError as exc:
            raise ValueError(f"{source}: [tiers.{name}] is missing {exc.args[0]!r}") from None
        if tier.ttft_s <= 0 or tier.tpot_s <= 0:
            raise ValueError(f"{source}: [tiers.{name}] targets must be positive")
        tiers[name] = tier
    return tiers


def load_tiers(path: str | os.PathLike[str] | None = None) -> dict[str, Tier]:
    """Tiers from a TOML file, or the packaged defaults (``default_tiers.toml``) when ``path`` is None."""
    if path is None:
        text = resources.files("nitsum_core").joinpath("default_tiers.toml").read_text()
        return _parse_tiers(tomllib.loads(text), "default_tiers.toml")
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"tier file {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"tier file {p} is not valid TOML: {exc}") from None
    return _parse_tiers(data, str(p))


def check_tier(tiers: dict[str, Tier], name: str) -> Tier:
    """The tier called ``name``, or InvalidRequest listing the known ones."""
    tier = tiers.get(name)
    if tier is None:
        from nitsum_core.errors import UnknownTier

        raise UnknownTier(f"unknown tier {name!r}; known tiers: {', '.join(sorted(tiers))}")
    return tier


def state_dir() -> Path:
    """Where Nitsum keeps its bus data, stack file and model cache (``$NITSUM_HOME``, default ~/.cache/nitsum)."""
    root = os.environ.get("NITSUM_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nitsum"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# Request limits the router enforces (a request over them gets a typed error, not a crash).
MAX_TOKENS_LIMIT = 8192
MAX_STOP_STRINGS = 16

__all__ = ["Tier", "load_tiers", "check_tier", "state_dir", "InvalidRequest", "MAX_TOKENS_LIMIT"]
