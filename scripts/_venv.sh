# Sourced by the scripts: create or reuse ./.venv and install the project with the given extras.
# Re-installs only when pyproject.toml changed since the last install.
venv_setup() {
    set -o pipefail  # a failed install fails, whatever its filtered output
    local extras="$1"
    local python="${PYTHON:-}"
    if [ -z "$python" ]; then
        python=$(command -v python3.11 || command -v python3)
    fi
    if [ ! -x .venv/bin/python ]; then
        echo "creating .venv with $($python --version)" >&2
        "$python" -m venv .venv
    fi
    local stamp=".venv/.installed-${extras:-base}"
    local want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "installing rlm-mlflow${extras:+[$extras]} into .venv (a few minutes the first time;" \
            "later runs reuse it)" >&2
        .venv/bin/python -m pip install --quiet --upgrade pip >&2
        # One line per package as pip takes it, so a long first install is not silent.
        local status=0
        .venv/bin/python -m pip install --progress-bar off -e ".${extras:+[$extras]}" 2>&1 \
            | { grep --line-buffered -iE '^(Collecting|Installing|Successfully|error)' || true; } \
            >&2 || status=$?
        if [ "$status" -ne 0 ]; then
            echo "pip install failed (exit $status); run it without the filter to see why:" >&2
            echo "  .venv/bin/python -m pip install -e '.${extras:+[$extras]}'" >&2
            return 1
        fi
        echo "$want" > "$stamp"
    fi
    export PATH="$PWD/.venv/bin:$PATH"
    export MLFLOW_DISABLE_TELEMETRY=true
}
