"""verl_r3.wandb_naming: names, the mode decision (env, netrc, settings file), the shell form, and
real offline W&B runs started with the produced environment, read back from their .wandb files."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from verl_r3 import keys, wandb_naming
from verl_r3.quickstart import runner
from verl_r3.report import load_wandb_run

KEY = "k" * 40  # a well-formed (not real) W&B API key: 40 word characters
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(tmp_path) -> dict:
    """This process's environment without any W&B or netrc settings, HOME an empty temp directory."""
    home = tmp_path / "home"
    home.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    base["HOME"] = str(home)
    return base


def _netrc(path: Path, machine: str, password: str | None = KEY) -> Path:
    path.write_text(f"machine {machine}\n  login user\n" + (f"  password {password}\n" if password else ""))
    path.chmod(0o600)
    return path


# ----------------------------------------------------------------------------------------- names


def test_experiment_name_and_hydra_overrides():
    assert wandb_naming.experiment_name("20250512-101500", "grpo_r3") == "20250512-101500-grpo_r3"
    assert wandb_naming.hydra_overrides("verl_r3_math", "math.v2", "gspo") == [
        "trainer.project_name=verl_r3_math", "trainer.experiment_name=math.v2-gspo"]


@pytest.mark.parametrize("kind, value", [
    ("group", ""), ("group", "a b"), ("group", "a/b"), ("group", "-lead"), ("group", "it's"), ("group", "a,b"),
    ("group", "x" * 129), ("variant", "v" * 65), ("project", "p=q"), ("project", None), ("variant", 3),
])
def test_bad_names_raise(kind, value):
    with pytest.raises(ValueError, match=f"W&B {kind} must be"):
        wandb_naming.check_name(kind, value)


def test_longest_names_pass_and_unknown_kind_raises():
    assert wandb_naming.check_name("group", "g" * 128) == "g" * 128
    assert wandb_naming.check_name("variant", "v" * 64) == "v" * 64
    with pytest.raises(ValueError, match="unknown name kind"):
        wandb_naming.check_name("entity", "e")


def test_wandb_env_names_group_job_type_tags_and_dir(env, tmp_path):
    env["WANDB_TAGS"] = "my tag, grpo_r3"
    out = wandb_naming.wandb_env("proj", "g1", "grpo_r3", base_env=env, wandb_dir=tmp_path / "w", tags=["math"])
    assert out == {
        "WANDB_PROJECT": "proj",
        "WANDB_NAME": "g1-grpo_r3",
        "WANDB_RUN_GROUP": "g1",
        "WANDB_JOB_TYPE": "grpo_r3",
        "WANDB_TAGS": "grpo_r3,math,my tag",  # the variant first; the user's tags kept, no duplicates
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "w"),
    }
    assert "WANDB_DIR" not in wandb_naming.wandb_env("proj", "g1", "grpo", base_env=env)
    with pytest.raises(ValueError, match="W&B tag must be"):
        wandb_naming.wandb_env("proj", "g1", "grpo", base_env=env, tags=["two words"])
    with pytest.raises(ValueError, match="W&B variant must be"):
        wandb_naming.wandb_env("proj", "g1", "grpo r3", base_env=env)


# ------------------------------------------------------------------------------------------- mode


def test_no_key_is_offline(env):
    assert not wandb_naming.api_key_available(env)
    assert wandb_naming.wandb_mode(env) == "offline"


def test_api_key_or_identity_token_is_online(env):
    assert wandb_naming.wandb_mode(dict(env, WANDB_API_KEY=KEY)) == "online"
    assert wandb_naming.wandb_mode(dict(env, WANDB_IDENTITY_TOKEN_FILE="/some/token")) == "online"
    assert wandb_naming.wandb_mode(dict(env, WANDB_API_KEY="")) == "offline"


def test_netrc_entry_for_the_host_is_online(env, tmp_path):
    home = Path(env["HOME"])
    _netrc(home / ".netrc", "api.wandb.ai")
    assert wandb_naming.wandb_mode(env) == "online"
    # another server: its own entry counts, api.wandb.ai's does not
    other = dict(env, WANDB_BASE_URL="https://wandb.example.com")
    assert wandb_naming.wandb_mode(other) == "offline"
    _netrc(home / ".netrc", "wandb.example.com")
    assert wandb_naming.wandb_mode(other) == "online"
    assert wandb_naming.wandb_mode(env) == "offline"
    # `wandb login --host` keeps the host in the global settings file
    settings = home / ".config" / "wandb" / "settings"
    settings.parent.mkdir(parents=True)
    settings.write_text("[default]\nbase_url = https://wandb.example.com\n")
    assert wandb_naming.wandb_host(env) == "https://wandb.example.com"
    assert wandb_naming.wandb_mode(env) == "online"
    # NETRC names the file; an entry without a password is no key
    _netrc(tmp_path / "elsewhere", "wandb.example.com", password=None)
    assert wandb_naming.wandb_mode(dict(env, NETRC=str(tmp_path / "elsewhere"))) == "offline"


def test_unreadable_netrc_is_no_key(env):
    (Path(env["HOME"]) / ".netrc").write_text('machine "api.wandb.ai\n')
    assert wandb_naming.wandb_mode(env) == "offline"


@pytest.mark.parametrize("mode", ["offline", "online", "disabled", "shared"])
def test_explicit_wandb_mode_wins(env, mode):
    _netrc(Path(env["HOME"]) / ".netrc", "api.wandb.ai")
    for base in (env, dict(env, WANDB_API_KEY=KEY), dict(env, HOME=str(Path(env["HOME"]) / "empty"))):
        assert wandb_naming.wandb_mode(dict(base, WANDB_MODE=mode)) == mode
        assert wandb_naming.wandb_env("p", "g", "grpo", base_env=dict(base, WANDB_MODE=mode))["WANDB_MODE"] == mode


def test_settings_file_mode_is_an_explicit_choice(env):
    config = Path(env["HOME"]) / "wandbconfig"
    config.mkdir()
    (config / "settings").write_text("[default]\nmode = offline\n")
    logged_in = dict(env, WANDB_API_KEY=KEY, WANDB_CONFIG_DIR=str(config))
    assert wandb_naming.wandb_mode(logged_in) == "offline"
    assert wandb_naming.wandb_mode(dict(logged_in, WANDB_MODE="online")) == "online"


def test_bad_wandb_mode_raises(env):
    with pytest.raises(ValueError, match="WANDB_MODE='onlnie' is not a W&B mode"):
        wandb_naming.wandb_mode(dict(env, WANDB_MODE="onlnie"))


@pytest.mark.parametrize("case", ["saas", "saas_no_password", "other_host", "custom_host", "netrc_var", "garbled"])
def test_key_lookup_agrees_with_wandbs_own(env, tmp_path, monkeypatch, case):
    """wandb's internal netrc reader (wandb.sdk.lib.wbauth) finds a key exactly when ours does."""
    from wandb.sdk.lib import wbauth

    home = Path(env["HOME"])
    host = wandb_naming.DEFAULT_HOST
    if case == "saas":
        _netrc(home / ".netrc", "api.wandb.ai")
    elif case == "saas_no_password":
        _netrc(home / ".netrc", "api.wandb.ai", password=None)
    elif case == "other_host":
        _netrc(home / ".netrc", "wandb.example.com")
    elif case == "custom_host":
        _netrc(home / ".netrc", "wandb.example.com:8443")
        host = env["WANDB_BASE_URL"] = "https://wandb.example.com:8443"
    elif case == "netrc_var":
        env["NETRC"] = str(_netrc(tmp_path / "n", "api.wandb.ai"))
    else:
        (home / ".netrc").write_text("machine api.wandb.ai password\n")
    for name in [k for k in os.environ if k.startswith("WANDB_") or k == "NETRC"]:
        monkeypatch.delenv(name)
    for name in ("HOME", "NETRC"):
        if name in env:
            monkeypatch.setenv(name, env[name])
    theirs = wbauth.read_netrc_auth(host=host) is not None
    assert wandb_naming.api_key_available(env) == theirs
    assert theirs == (case in ("saas", "custom_host", "netrc_var"))


# ---------------------------------------------------------------------------------- shell form


def _cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "verl_r3.wandb_naming", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_export_lines_bash_can_eval(env, tmp_path):
    proc = _cli(["--project", "verl_r3_math", "--group", "g1", "--variant", "gspo_r3", "--dir", str(tmp_path),
                 "--tag", "math"], env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert all(line.startswith("export WANDB_") for line in lines)
    script = 'set -eu; vars=$(cat); eval "$vars"; printf "%s\\n" "$WANDB_PROJECT" "$WANDB_NAME" "$WANDB_RUN_GROUP" ' \
             '"$WANDB_JOB_TYPE" "$WANDB_TAGS" "$WANDB_MODE" "$WANDB_DIR"'
    shown = subprocess.run(["bash", "-c", script], input=proc.stdout, capture_output=True, text=True, check=True)
    assert shown.stdout.splitlines() == ["verl_r3_math", "g1-gspo_r3", "g1", "gspo_r3", "gspo_r3,math", "offline",
                                         str(tmp_path)]


def test_cli_keeps_the_users_mode_and_rejects_bad_names(env):
    proc = _cli(["--project", "p", "--group", "g", "--variant", "grpo"], dict(env, WANDB_MODE="disabled"))
    assert "export WANDB_MODE=disabled" in proc.stdout.splitlines()
    bad = _cli(["--project", "p", "--group", "two words", "--variant", "grpo"], env)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "W&B group must be" in bad.stderr


# ------------------------------------------------------------------------- real offline runs


def _run_record(run_dir: Path):
    """The run as verl_r3's report reads it back from the run's .wandb file."""
    run, notes = load_wandb_run(run_dir)
    assert notes == [], notes
    return run


_TRACKING = """
import sys
from verl.utils.tracking import Tracking
tracking = Tracking(project_name=sys.argv[1], experiment_name=sys.argv[2], default_backend=["wandb"],
                    config={"trainer": {}})
tracking.log({sys.argv[3]: 0.25}, step=3)
tracking.finish()
"""


def test_quickstart_variants_start_offline_runs_that_overlay(env, tmp_path):
    """verl's own Tracking (what main_ppo uses) started with the runner's env and overrides: the
    variants share project and group, differ in job type, and run offline under out_dir/wandb."""
    spec = runner.RunSpec(model="m", train_file="t", val_file="v", reward_file="r", out_dir=str(tmp_path / "qs"),
                          group="20250512-101500")
    runs = {}
    for variant in ("grpo", "grpo_r3"):
        overrides = dict(o.split("=", 1) for o in runner.variant_overrides(variant, spec))
        run_env = runner.run_env(spec, variant, base=env)
        os.makedirs(run_env["WANDB_DIR"], exist_ok=True)
        proc = subprocess.run([sys.executable, "-c", _TRACKING, overrides["trainer.project_name"],
                               overrides["trainer.experiment_name"], keys.K3_KL], env=run_env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (run_dir,) = [d for d in (tmp_path / "qs" / "wandb" / "wandb").glob("offline-run-*")
                      if d.name.split("-")[-1] not in runs]
        runs[run_dir.name.split("-")[-1]] = (variant, _run_record(run_dir))
    assert len(runs) == 2
    for run_id, (variant, run) in runs.items():
        assert run_id in run.source
        assert run.project == "verl_r3_quickstart"
        assert run.group == "20250512-101500"
        assert run.variant == variant  # W&B's job type
        assert run.name == f"20250512-101500-{variant}"
        assert run.tags == (variant,)
        # one step, logged at verl's step number: W&B's x axis "Step"
        assert list(run.steps) == [3] and run.steps[3][keys.K3_KL] == 0.25


def test_recipe_shell_form_starts_a_named_offline_run(env, tmp_path):
    """What a recipe does: eval the module's export lines, pass project and name to wandb.init."""
    script = (
        f'set -eu; vars=$({shlex.quote(sys.executable)} -m verl_r3.wandb_naming --project verl_r3_code '
        f'--group code-1 --variant gspo_r3 --dir {shlex.quote(str(tmp_path))}); eval "$vars"; '
        f'{shlex.quote(sys.executable)} -c "import os, wandb; '
        f'wandb.init(project=os.environ[\'WANDB_PROJECT\'], name=os.environ[\'WANDB_NAME\']).finish()"'
    )
    proc = subprocess.run(["bash", "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = _run_record(run_dir)
    assert (run.project, run.group, run.variant, run.name, run.tags) == (
        "verl_r3_code", "code-1", "gspo_r3", "code-1-gspo_r3", ("gspo_r3",))
