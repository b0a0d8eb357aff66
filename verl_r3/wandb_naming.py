"""W&B names for verl runs with verl_r3, so that R3 and baseline runs overlay in one chart.

The scheme (one set of rules for the quickstart and the recipes):

========================  ===============================  ==========================================
W&B field                 value                            set through
========================  ===============================  ==========================================
project                   one per study, e.g.              ``trainer.project_name`` (verl passes it to
                          ``verl_r3_quickstart``           ``wandb.init(project=...)``); also
                                                           ``WANDB_PROJECT``
group                     one launch of runs to compare    ``WANDB_RUN_GROUP``
                          (a timestamp, a recipe tag)
job type                  the variant: ``grpo``,           ``WANDB_JOB_TYPE``; ``verl-r3
                          ``grpo_r3``, ``gspo_r3``, ...    wandb-dashboard`` groups runs by it
tags                      the variant, then any extra      ``WANDB_TAGS`` (the user's own
                          tags                             ``WANDB_TAGS`` are kept after ours)
run name                  ``{group}-{variant}``            ``trainer.experiment_name`` (verl passes it
                                                           to ``wandb.init(name=...)``); also
                                                           ``WANDB_NAME``
mode                      see below                        ``WANDB_MODE``
========================  ===============================  ==========================================

Mode: offline unless the user chose otherwise or has logged in.

1. ``WANDB_MODE`` in the environment always wins (``online``, ``offline``, ``disabled``, ...).
2. Otherwise ``mode`` in W&B's global settings file (``$WANDB_CONFIG_DIR/settings``, else
   ``~/.config/wandb/settings``), if set there.
3. Otherwise ``online`` when an API key for the W&B host is available: ``WANDB_API_KEY`` (or
   ``WANDB_IDENTITY_TOKEN_FILE``) set, or an entry for the host in the netrc file (``$NETRC``,
   else ``~/.netrc``, else ``~/_netrc``) -- where ``wandb login`` stores the key. The host is
   ``WANDB_BASE_URL``, else ``base_url`` in the global settings file (``wandb login --host``
   writes it), else ``https://api.wandb.ai``. This is the order wandb 0.31 itself follows
   (``wandb/sdk/lib/wbauth``), read here without importing wandb and without network calls;
   wandb has no public function for it.
4. Otherwise ``offline``: runs are written under ``$WANDB_DIR/wandb/offline-run-*`` and can be
   uploaded later with ``wandb sync``.

Project, group, variant and extra tags must be 1-128 characters (the variant, also a tag, and
extra tags 1-64: W&B's limit for tags) of letters, digits, ``.``, ``_`` and ``-``, starting with a
letter or digit: they travel through Hydra overrides and run filters unquoted. Anything else raises
``ValueError``.

Python::

    from verl_r3 import wandb_naming
    env.update(wandb_naming.wandb_env("verl_r3_math", "math-0512", "grpo_r3", base_env=env, wandb_dir=out))
    overrides += wandb_naming.hydra_overrides("verl_r3_math", "math-0512", "grpo_r3")

Shell (recipes)::

    WANDB_VARS=$(python -m verl_r3.wandb_naming --project verl_r3_math --group "$GROUP" --variant grpo_r3 \\
                 --dir "$OUT")           # a failure stops a `set -e` script here
    eval "$WANDB_VARS"                   # export WANDB_PROJECT=... WANDB_NAME=... WANDB_RUN_GROUP=... ...
    python -m verl.trainer.main_ppo ... trainer.logger='[console,wandb]' \\
        trainer.project_name="$WANDB_PROJECT" trainer.experiment_name="$WANDB_NAME"

The command prints only ``export NAME=value`` lines (values shell-quoted), one per variable, and
reads the current environment (and netrc / settings file) to decide the mode.
"""

from __future__ import annotations

import argparse
import configparser
import netrc
import os
import re
import shlex
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_HOST",
    "MODES",
    "api_key_available",
    "check_name",
    "experiment_name",
    "hydra_overrides",
    "main",
    "wandb_env",
    "wandb_host",
    "wandb_mode",
]

#: W&B's SaaS API host, wandb's default ``base_url``.
DEFAULT_HOST = "https://api.wandb.ai"
#: The values wandb 0.31 accepts for ``WANDB_MODE`` (``wandb.Settings.mode``).
MODES = ("online", "offline", "shared", "disabled", "dryrun", "run")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_LIMITS = {"project": 128, "group": 128, "variant": 64, "tag": 64}


def check_name(kind: str, value) -> str:
    """``value`` if it is a valid ``kind`` name (``project``, ``group``, ``variant``, ``tag``); else ``ValueError``."""
    if kind not in _LIMITS:
        raise ValueError(f"unknown name kind {kind!r}; one of {', '.join(_LIMITS)}")
    limit = _LIMITS[kind]
    if not isinstance(value, str) or not _NAME.fullmatch(value) or len(value) > limit:
        raise ValueError(f"W&B {kind} must be 1-{limit} characters of letters, digits, '.', '_' and '-', "
                         f"starting with a letter or digit; got {value!r}")
    return value


def experiment_name(group: str, variant: str) -> str:
    """The run name of ``variant`` in ``group``: ``{group}-{variant}`` (``trainer.experiment_name``)."""
    return f"{check_name('group', group)}-{check_name('variant', variant)}"


def hydra_overrides(project: str, group: str, variant: str) -> list[str]:
    """verl's ``trainer.project_name`` / ``trainer.experiment_name`` overrides for this run."""
    return [f"trainer.project_name={check_name('project', project)}",
            f"trainer.experiment_name={experiment_name(group, variant)}"]


# ------------------------------------------------------------------------------ host, key, mode


def _home(env: Mapping[str, str]) -> Path:
    return Path(env["HOME"]) if env.get("HOME") else Path.home()


def _expand(path: str, env: Mapping[str, str]) -> Path:
    if path == "~" or path.startswith("~/"):
        return _home(env) / path[2:]
    return Path(os.path.expanduser(path))


def _global_settings(env: Mapping[str, str]) -> dict[str, str]:
    """The ``[default]`` section of W&B's global settings file (empty when absent or unreadable)."""
    config_dir = env.get("WANDB_CONFIG_DIR")
    path = _expand(config_dir, env) / "settings" if config_dir else _home(env) / ".config" / "wandb" / "settings"
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except (configparser.Error, OSError, UnicodeDecodeError):
        return {}
    return dict(parser["default"]) if parser.has_section("default") else {}


def wandb_host(env: Mapping[str, str] | None = None) -> str:
    """The W&B server URL wandb would use: ``WANDB_BASE_URL``, the settings file's ``base_url``, or the default."""
    env = os.environ if env is None else env
    return (env.get("WANDB_BASE_URL") or _global_settings(env).get("base_url") or DEFAULT_HOST).rstrip("/")


def _netrc_path(env: Mapping[str, str]) -> Path | None:
    if env.get("NETRC"):
        return _expand(env["NETRC"], env)
    for name in (".netrc", "_netrc"):
        if (path := _home(env) / name).exists():
            return path
    return None


def api_key_available(env: Mapping[str, str] | None = None) -> bool:
    """Whether wandb would find credentials for :func:`wandb_host` (no network call, key not validated)."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = _netrc_path(env)
    netloc = urlsplit(wandb_host(env)).netloc
    if path is None or not netloc:
        return False
    try:
        creds = netrc.netrc(str(path)).authenticators(netloc)
    except (FileNotFoundError, netrc.NetrcParseError, OSError, UnicodeDecodeError):
        return False  # wandb warns and treats the file as holding no key
    return bool(creds and creds[2])


def wandb_mode(env: Mapping[str, str] | None = None) -> str:
    """The W&B mode for a run started with ``env`` (see the module docstring for the order)."""
    env = os.environ if env is None else env
    explicit = env.get("WANDB_MODE") or _global_settings(env).get("mode")
    if explicit:
        if explicit not in MODES:
            raise ValueError(f"WANDB_MODE={explicit!r} is not a W&B mode; use one of {', '.join(MODES)}")
        return explicit
    return "online" if api_key_available(env) else "offline"


def wandb_env(project: str, group: str, variant: str, *, base_env: Mapping[str, str] | None = None,
              wandb_dir: str | os.PathLike | None = None, tags: Iterable[str] = ()) -> dict[str, str]:
    """The W&B variables to set for ``variant``'s run in ``group`` of ``project``.

    Returns only those variables (merge them into ``base_env``, default ``os.environ``, which
    decides the mode and supplies the user's own ``WANDB_TAGS``). ``wandb_dir`` sets
    ``WANDB_DIR`` (W&B writes ``<wandb_dir>/wandb/...``); left out, the user's stays.
    """
    base_env = os.environ if base_env is None else base_env
    all_tags: list[str] = []
    user_tags = [t.strip() for t in base_env.get("WANDB_TAGS", "").split(",") if t.strip()]
    ours = [check_name("variant", variant), *(check_name("tag", tag) for tag in tags)]
    for tag in ours + user_tags:  # the user's own tags go to wandb as they are
        if tag not in all_tags:
            all_tags.append(tag)
    env = {
        "WANDB_PROJECT": check_name("project", project),
        "WANDB_NAME": experiment_name(group, variant),
        "WANDB_RUN_GROUP": group,
        "WANDB_JOB_TYPE": variant,
        "WANDB_TAGS": ",".join(all_tags),
        "WANDB_MODE": wandb_mode(base_env),
    }
    if wandb_dir is not None:
        if not str(wandb_dir):
            raise ValueError("wandb_dir must not be empty")
        env["WANDB_DIR"] = os.path.abspath(os.fspath(wandb_dir))
    return env


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m verl_r3.wandb_naming",
        description="Print `export NAME=value` lines naming one verl run in W&B (project, run name, group = "
        "the launch, job type = the variant, tags, mode: offline unless WANDB_MODE is set or a W&B API key "
        "is available). Pass trainer.project_name=\"$WANDB_PROJECT\" trainer.experiment_name=\"$WANDB_NAME\" "
        "to main_ppo after `eval`.",
    )
    parser.add_argument("--project", required=True, help="W&B project (one per study)")
    parser.add_argument("--group", required=True, help="the launch of runs to compare, e.g. a timestamp")
    parser.add_argument("--variant", required=True, help="the variant: grpo, grpo_r3, gspo_r3, ... (job type)")
    parser.add_argument("--dir", default=None, help="WANDB_DIR (W&B writes DIR/wandb/...); default: unchanged")
    parser.add_argument("--tag", action="append", default=[], help="an extra tag (repeatable)")
    args = parser.parse_args(argv)
    try:
        env = wandb_env(args.project, args.group, args.variant, wandb_dir=args.dir, tags=args.tag)
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    for name, value in env.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
