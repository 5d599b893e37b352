# Routine tasks. The README's two commands work without just.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
py := venv + "/bin/python"

# Create the virtual environment with every extra.
install:
    test -x {{py}} || python3 -m venv {{venv}}
    {{py}} -m pip install -q -e '.[dev]'

# Lint and type-check.
lint:
    {{venv}}/bin/ruff check
    {{venv}}/bin/ruff format --check
    {{venv}}/bin/mypy
    {{venv}}/bin/hadolint Containerfile

# Format the code.
fmt:
    {{venv}}/bin/ruff format
    {{venv}}/bin/ruff check --fix

# Run the tests (MariaDB tests run when the server answers; CI=true makes them required).
test *args:
    {{venv}}/bin/pytest {{args}}

# Start the service on the embedded defaults.
serve *args:
    {{venv}}/bin/xintu serve {{args}}

# Run the benchmark harness.
bench *args:
    {{py}} -m bench {{args}}
