"""The deployment files agree with the Compose Specification, with the CLI and with livekit-server.

No Docker engine runs here, so docker-compose.yml is interpolated with .env.example (as `docker
compose` would do with a .env copied from it) and validated against the Compose Specification's JSON
schema (tests/data/compose-spec.json, source in compose-spec.SOURCE.md); each service's command and
environment are parsed by the real `captions` argument parsers; the livekit service's flags and
deploy/livekit.yaml are checked by the real livekit-server binary of the same version, which is then
started with that config and the keys from the environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml

from captions.config import ConfigError, check_livekit
from captions.dev.livekit_server import LIVEKIT_SERVER_VERSION, find_livekit_server
from captions.dev.processes import free_port_triple

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
IMAGE = "kyutai-livekit-captions:latest"
EXTRA_COMMANDS = {"web": ["token", "revoke"]}
"""Commands an operator runs inside a service's container (`docker compose run --rm web token ...`),
whose variables that service may therefore carry."""
NOT_CLI_VARIABLES = {"HF_TOKEN", "HF_HOME", "NO_TORCH_COMPILE", "LIVEKIT_KEYS"}
"""Variables read by libraries (huggingface_hub, moshi) or by livekit-server, not by our parsers."""

_spec = importlib.util.spec_from_file_location("config_table", ROOT / "deploy" / "config_table.py")
config_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(config_table)


# ---- compose interpolation, as `docker compose` does it ---------------------------------------------

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")


class MissingVariable(Exception):
    pass


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(text: str, env: dict[str, str], used: set[str] | None = None) -> str:
    """${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR and $$."""
    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match["name"] or match["bare"]
        if used is not None:
            used.add(name)
        value, op = env.get(name), match["op"]
        empty = value is None or (value == "" and op and op.startswith(":"))
        if op in (":-", "-") and (value is None if op == "-" else empty):
            return match["arg"]
        if op in (":?", "?") and (value is None if op == "?" else empty):
            raise MissingVariable(f"{name}: {match['arg']}")
        return value or ""

    return _VARIABLE.sub(replace, text)


def load_compose(env: dict[str, str], used: set[str] | None = None) -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env, used))


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(env_example) -> dict:
    return load_compose(env_example)


def our_services(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if s.get("image") == IMAGE}


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


# ---- the Compose Specification --------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification(compose):
    schema = json.loads(SCHEMA.read_text())
    assert schema["title"] == "Compose Specification"
    jsonschema.validate(compose, schema, cls=jsonschema.Draft7Validator)
    assert set(compose["services"]) == {"livekit", "worker", "web"}


def test_the_schema_catches_what_docker_compose_would_reject(compose):
    """The validation above can fail: a typo'd key or a wrong GPU reservation is an error."""
    schema = json.loads(SCHEMA.read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilites"] = ["gpu"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft7Validator)
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["restart"] = ["always"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft7Validator)


def test_worker_reserves_a_gpu_and_keeps_weights_and_transcripts_in_volumes(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    mounts = dict(reversed(v.split(":")[:2]) for v in worker["volumes"])
    dockerfile_env = dockerfile_variables()
    assert mounts[dockerfile_env["HF_HOME"]] == "hf-cache", "the Hugging Face cache must be a volume"
    assert mounts[environment(worker)["CAPTIONS_DATA_DIR"]] == "transcripts"
    assert {"hf-cache", "transcripts"} <= set(compose["volumes"])


# ---- .env.example -----------------------------------------------------------------------------------


def test_every_variable_the_compose_file_uses_is_in_env_example(env_example):
    used: set[str] = set()
    load_compose(env_example, used)
    missing = used - set(env_example)
    assert not missing, f"docker-compose.yml uses variables .env.example does not list: {sorted(missing)}"


def test_secrets_have_no_defaults_compose_refuses_to_start_without_them(env_example):
    for name in ("LIVEKIT_API_KEY", "LIVEKIT_API_SECRET", "CAPTIONS_VIEWER_SECRET", "LIVEKIT_NODE_IP"):
        without = {k: v for k, v in env_example.items() if k != name}
        with pytest.raises(MissingVariable, match=name):
            load_compose(without)


def test_env_example_lists_every_variable_of_the_deployed_commands():
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    with config_table.clean_environment():
        needed = {env for command in config_table.TABLE_COMMANDS
                  for _, env, _, _ in config_table.env_options(config_table.build_parser(command))}
    assert needed - documented == set(), f".env.example misses {sorted(needed - documented)}"


# ---- services against the CLI ------------------------------------------------------------------------


def parse_service(name: str, service: dict, monkeypatch) -> tuple[object, set[str]]:
    """Parses the service's command with its environment, as `captions` would in the container;
    returns the parsed options and the variables that the commands it may run read."""
    command = service["command"]
    assert command[0] in config_table.COMMANDS, f"{name}: unknown command {command[0]!r}"
    for key in [k for k in os.environ if k.startswith(("CAPTIONS_", "LIVEKIT_"))]:
        monkeypatch.delenv(key)
    for key, value in environment(service).items():
        monkeypatch.setenv(key, value)
    readable = set()
    for extra in [command[0], *EXTRA_COMMANDS.get(name, [])]:
        readable |= {env for _, env, _, _ in config_table.env_options(config_table.build_parser(extra))}
    # Builds the parser with the service's environment: add_option rejects a bad value here.
    args = config_table.build_parser(command[0]).parse_args(command[1:])
    return args, readable


@pytest.mark.parametrize("name", ["worker", "web"])
def test_service_command_and_environment_agree_with_the_cli(compose, name, monkeypatch):
    service = compose["services"][name]
    args, readable = parse_service(name, service, monkeypatch)
    unknown = {k for k in environment(service) if k not in readable and k not in NOT_CLI_VARIABLES}
    assert not unknown, f"{name} sets variables no captions option reads: {sorted(unknown)}"
    flags = {env: flag for flag, env, _, _ in
             config_table.env_options(config_table.build_parser(service["command"][0]))}
    for key, value in environment(service).items():
        if key in flags and value:
            dest = flags[key].lstrip("-").replace("-", "_")
            assert str(getattr(args, dest)) == value, f"{name}: {key}={value!r} did not reach {flags[key]}"


def test_worker_runs_in_deployment_mode_with_probes_reachable_by_its_healthcheck(compose, monkeypatch):
    worker = compose["services"]["worker"]
    args, _ = parse_service("worker", worker, monkeypatch)
    assert args.mode == "start", "deployments use `start` (refuses rooms above the load threshold)"
    assert args.device == "cuda"
    assert args.metrics_port != 0, "the healthcheck needs /readyz"
    check = " ".join(worker["healthcheck"]["test"])
    assert "/readyz" in check and "CAPTIONS_METRICS_PORT" in check
    assert worker["network_mode"] == "host" and args.url.startswith("ws://127.0.0.1:")


def test_web_serves_beyond_loopback_with_signed_links(compose, monkeypatch):
    args, _ = parse_service("web", compose["services"]["web"], monkeypatch)
    assert args.host == "0.0.0.0"
    assert args.viewer_secret
    assert not args.open, "signed links only in a deployment"


# ---- livekit-server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def livekit_binary() -> Path:
    binary = find_livekit_server()
    assert binary is not None, "livekit-server missing: run `uv run captions server --install-only`"
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout
    assert LIVEKIT_SERVER_VERSION.lstrip("v") in version, f"the checks need {LIVEKIT_SERVER_VERSION}: {version}"
    return binary


@pytest.mark.livekit
def test_livekit_service_is_the_tested_release_and_its_flags_exist(compose, livekit_binary):
    service = compose["services"]["livekit"]
    assert service["image"] == f"livekit/livekit-server:{LIVEKIT_SERVER_VERSION}"
    help_text = subprocess.run([str(livekit_binary), "--help"], capture_output=True, text=True, check=True).stdout
    for flag in [arg for arg in service["command"] if arg.startswith("--")]:
        assert re.search(rf"^\s+{re.escape(flag)}\b", help_text, re.MULTILINE), f"livekit-server has no {flag}"
    assert "[$LIVEKIT_KEYS]" in help_text and "LIVEKIT_KEYS" in environment(service)
    config_mount = next(v for v in service["volumes"] if "livekit.yaml" in v)
    assert (ROOT / config_mount.split(":")[0]).resolve() == ROOT / "deploy" / "livekit.yaml"


@pytest.mark.livekit
def test_livekit_config_is_accepted_by_the_strict_parser_and_opens_the_documented_ports(livekit_binary):
    result = subprocess.run([str(livekit_binary), "--config", str(ROOT / "deploy" / "livekit.yaml"),
                             "--keys", "key: " + "s" * 32, "--node-ip", "127.0.0.1", "ports"],
                            capture_output=True, text=True, timeout=30, check=False)
    output = result.stdout + result.stderr
    assert "could not parse config" not in output, output
    assert re.search(r"7880 - HTTP service", output) and re.search(r"7881 - ICE/TCP", output), output
    assert "7882" in output.split("UDP Ports", 1)[1], output


@pytest.mark.livekit
def test_livekit_started_as_compose_starts_it_accepts_exactly_the_keys_from_env(compose, livekit_binary, tmp_path):
    """deploy/livekit.yaml (ports moved to free loopback ports) + LIVEKIT_KEYS as compose builds it:
    the worker's keys from .env pass the worker's own start-up check; another secret does not."""
    config = yaml.safe_load((ROOT / "deploy" / "livekit.yaml").read_text())
    base = free_port_triple()  # livekit-server binds its ICE ports on every interface: all checked free
    config["port"], config["rtc"]["tcp_port"], config["rtc"]["udp_port"] = base, base + 1, base + 2
    (tmp_path / "livekit.yaml").write_text(yaml.safe_dump(config))
    service = compose["services"]["livekit"]
    worker_env = environment(compose["services"]["worker"])
    command = [str(livekit_binary), *[a if a != "/etc/livekit/livekit.yaml" else str(tmp_path / "livekit.yaml")
                                     for a in service["command"]], "--bind", "127.0.0.1"]
    env = {**os.environ, **environment(service)}
    with open(tmp_path / "livekit.log", "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"ws://127.0.0.1:{config['port']}"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "livekit.log").read_text()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{config['port']}", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        check_livekit(url, worker_env["LIVEKIT_API_KEY"], worker_env["LIVEKIT_API_SECRET"])
        with pytest.raises(ConfigError, match="rejected the API key"):
            check_livekit(url, worker_env["LIVEKIT_API_KEY"], "not-" + worker_env["LIVEKIT_API_SECRET"])
    finally:
        process.terminate()  # outside dev mode, livekit-server may take a while to drain: not tested here
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---- the image ---------------------------------------------------------------------------------------


def dockerfile_variables() -> dict[str, str]:
    """ENV values of the Dockerfile's final stage (simple `KEY=value` forms)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    final = text.rsplit("\nFROM ", 1)[1]
    values = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            values.update(re.findall(r"(\w+)=(\S+)", line))
    return values


def test_image_installs_from_the_lock_runs_unprivileged_and_keeps_the_model_out():
    text = (ROOT / "Dockerfile").read_text()
    final = text.rsplit("\nFROM ", 1)[1]
    assert final.startswith("${CUDA_IMAGE}") and re.search(r"ARG CUDA_IMAGE=nvidia/cuda:12\.\S+-runtime-ubuntu", text)
    syncs = re.findall(r"uv sync[^\n]*", final)
    assert syncs and all("--frozen" in s and "--no-dev" in s for s in syncs), syncs
    assert "npm ci" in text and "COPY --from=web" in final
    users = re.findall(r"^USER (\S+)", final, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), "the final stage must run as a non-root user"
    assert not re.search(r"hf_hub_download|huggingface-cli|snapshot_download|\.safetensors", text)
    volumes = json.loads(re.search(r"^VOLUME (\[.*\])$", final, re.MULTILINE)[1])
    assert dockerfile_variables()["HF_HOME"] in volumes
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", ".git", "web/node_modules", ".env", "data"):
        assert path in ignored, f".dockerignore must keep {path} out of the build context"


# ---- the documentation's configuration and security tables ------------------------------------------


def test_the_docs_configuration_table_is_generated_from_the_parsers():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert config_table.table() in page, "regenerate it: uv run python deploy/config_table.py"


def test_every_test_the_docs_security_table_names_exists():
    """The security table says which test tries to break each row: a renamed or removed test must not
    leave the row unchecked."""
    page = (ROOT / "docs" / "security.md").read_text()
    table = page[page.index("## Who may do what"):page.index("## What participants can know")]
    named, current = [], None
    for cell in re.findall(r"`((?:test_\w+\.py)?::\w+|test_\w+\.py::\w+)`", table):
        path, _, name = cell.partition("::")
        current = path or current
        named.append((current, name))
    assert len(named) >= 10, named
    missing = [f"{path}::{name}" for path, name in named
               if not re.search(rf"^(async )?def {name}\(", (ROOT / "tests" / path).read_text(), re.MULTILINE)]
    assert not missing, f"the security table names tests that do not exist: {missing}"
