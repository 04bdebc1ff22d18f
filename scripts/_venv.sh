# Sourced by the scripts: create or reuse ./.venv and install the project with the given extras.
# Re-installs only when pyproject.toml changed since the last install.
venv_setup() {
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
        echo "installing rlm-mlflow${extras:+[$extras]} into .venv" >&2
        .venv/bin/python -m pip install --quiet --upgrade pip >&2
        .venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}" >&2
        echo "$want" > "$stamp"
    fi
    export PATH="$PWD/.venv/bin:$PATH"
    export MLFLOW_DISABLE_TELEMETRY=true
}
