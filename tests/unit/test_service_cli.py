"""The service CLIs are derived from their settings (`llm_common.cli`): every field is a
flag with its description, a flag beats its environment variable, and a bad value exits 2
naming the field, its flag and its variable (never a secret's value)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from llm_common.cli import resolve
from llm_engine import cli as engine_cli
from llm_engine.settings import EngineSettings
from llm_gateway import cli as gateway_cli
from llm_gateway import serve
from llm_gateway.settings import GatewaySettings
from llm_trainer import submit
from llm_trainer.submit import SubmitSettings

ROOT = Path(__file__).resolve().parents[2]


def serve_fields() -> dict[str, type[BaseSettings]]:
    """llm-serve's fields and the class declaring each: the gateway's, then the engine's,
    but those llm-serve sets itself."""
    fields = {f: EngineSettings for f in EngineSettings.model_fields}
    fields = {f: c for f, c in fields.items() if f not in serve.NOT_ENGINE_FLAGS}
    for f in GatewaySettings.model_fields:
        if f not in serve.NOT_GATEWAY_FLAGS:
            fields[f] = GatewaySettings
    return fields


CLIS: dict[str, tuple[Callable, dict[str, type[BaseSettings]]]] = {
    "llm-engine": (engine_cli.parse, dict.fromkeys(EngineSettings.model_fields, EngineSettings)),
    "llm-gateway": (
        gateway_cli.parse, dict.fromkeys(GatewaySettings.model_fields, GatewaySettings)
    ),
    "llm-serve": (serve.parse, serve_fields()),
    "llm-train submit": (
        submit.parse_args, dict.fromkeys(SubmitSettings.model_fields, SubmitSettings)
    ),
}  # fmt: skip


def help_of(parse: Callable, capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as e:
        parse(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def flags_in(text: str) -> set[str]:
    """The flags a help text lists under options (`  --slots int`, `  --x, --no-x  help`)."""
    options = text.split("\noptions:\n", 1)[1]
    lines = [line.strip() for line in options.splitlines() if line.startswith("  -")]
    names = [n for line in lines for n in re.split(r"\s{2,}", line)[0].split(", ")]
    return {n.split()[0] for n in names}


@pytest.mark.parametrize("prog", CLIS)
def test_every_setting_is_a_flag_with_its_description(prog: str, capsys) -> None:
    parse, fields = CLIS[prog]
    text = help_of(parse, capsys)
    assert text.startswith(f"usage: {prog} ")
    squeezed = "".join(text.split())  # argparse wraps lines, at spaces and after hyphens
    flags = flags_in(text)
    for name, cls in fields.items():
        description = cls.model_fields[name].description
        assert description, f"{cls.__name__}.{name} has no description: its --help is empty"
        assert "--" + name.replace("_", "-") in flags
        assert "".join(description.split()) in squeezed, name


def test_llm_serve_has_every_engine_option_but_those_it_sets(capsys) -> None:
    flags = flags_in(help_of(serve.parse, capsys))
    for flag in ("--slots", "--prefill-chunk", "--compile", "--no-compile", "--threads",
                 "--lora", "--max-loras", "--no-engine-process", "--kv-cache-gib"):  # fmt: skip
        assert flag in flags
    for flag in ("--auth-token", "--tls-cert", "--tls-client-ca", "--engine", "--engine-token",
                 "--engine-tls-ca"):  # fmt: skip
        assert flag not in flags  # llm-serve wires its engine itself


@pytest.mark.parametrize(
    ("main", "argv", "line"),
    [
        (engine_cli.main, ["--checkpoint", "x", "--slots", "0"],
         "slots: Input should be greater than or equal to 1 (got '0') [--slots, LLM_ENGINE_SLOTS]"),
        (serve.main, ["--checkpoint", "x", "--slots", "abc"],
         "slots: Input should be a valid integer"),
        (serve.main, ["--checkpoint", "x", "--port", "70000"],
         "port: Input should be less than or equal to 65535 (got '70000') [--port, LLM_GATEWAY_PORT]"),
        (gateway_cli.main, ["--max-connections", "-1"], "[--max-connections, LLM_GATEWAY_MAX_CONNECTIONS]"),
        (gateway_cli.main, ["--engine", ""], "engine: List should have at least 1 item"),
        (submit.main, ["--image", "i", "--max-replicas", "many"], "max_replicas: Input should be"),
        (submit.main, ["--image", "i", "--api", "jobset"], "[--api]"),
    ],
)  # fmt: skip
def test_a_bad_value_exits_2_naming_the_field(main, argv, line, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert line in err, err


def test_a_bad_environment_variable_names_it_too(monkeypatch, capsys) -> None:
    monkeypatch.setenv("LLM_ENGINE_PREFILL_CHUNK", "big")
    with pytest.raises(SystemExit) as e:
        serve.settings(["--checkpoint", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "  prefill_chunk: Input should be a valid integer" in err
    assert "(got 'big') [--prefill-chunk, LLM_ENGINE_PREFILL_CHUNK]" in err


def test_a_secret_is_never_printed(monkeypatch, capsys) -> None:
    for main, argv in (
        (gateway_cli.main, ["--rate-limit-redis-url", "http://user:pw-never-printed@host"]),
        (engine_cli.main, ["--auth-token", "pw-never-printed"]),  # no --checkpoint
        (gateway_cli.main, ["--api-key", "pw-never-printed rpm=-1"]),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        out, err = capsys.readouterr()
        assert "pw-never-printed" not in out + err
        assert re.search(r"^  (rate_limit_redis_url|checkpoint|api_keys): ", err, re.M), err


def test_a_flag_beats_its_variable_which_beats_the_default(monkeypatch) -> None:
    monkeypatch.setenv("LLM_ENGINE_SLOTS", "3")
    monkeypatch.setenv("LLM_ENGINE_PREFILL_CHUNK", "64")
    monkeypatch.setenv("LLM_GATEWAY_PORT", "9000")
    monkeypatch.setenv("LLM_GATEWAY_MAX_CONNECTIONS", "5")
    engine = resolve(EngineSettings, engine_cli.parse(["--checkpoint", "x", "--slots", "5"]), "t")
    assert (engine.slots, engine.prefill_chunk, engine.max_queue) == (5, 64, 64)
    gateway = resolve(GatewaySettings, gateway_cli.parse(["--port", "0"]), "t")
    assert (gateway.port, gateway.max_connections) == (0, 5)

    engine, gateway = serve.settings(["--checkpoint", "x", "--slots", "5", "--port", "0"])
    assert (engine.slots, engine.prefill_chunk) == (5, 64)
    assert (gateway.port, gateway.max_connections) == (0, 5)
    assert engine.port == 50051  # --port is the HTTP server's, not the engine's


def test_llm_serve_gives_a_shared_flag_to_both(monkeypatch) -> None:
    monkeypatch.setenv("LLM_GATEWAY_LOG_LEVEL", "ERROR")
    monkeypatch.setenv("LLM_ENGINE_SHUTDOWN_GRACE_S", "7")
    engine, gateway = serve.settings(["--checkpoint", "x"])
    assert (engine.log_level, gateway.log_level) == ("INFO", "ERROR")  # each its own variable
    assert (engine.shutdown_grace_s, gateway.shutdown_grace_s) == (7, 10)
    flags = ["--checkpoint", "x", "--log-level", "DEBUG", "--shutdown-grace-s", "2"]
    engine, gateway = serve.settings(flags)
    assert (engine.log_level, gateway.log_level) == ("DEBUG", "DEBUG")
    assert (engine.shutdown_grace_s, gateway.shutdown_grace_s) == (2, 2)


def test_list_flags_repeat(monkeypatch) -> None:
    # A LoRA path may hold a comma: each --lora is one NAME=PATH, whole.
    engine = resolve(
        EngineSettings,
        engine_cli.parse(["--checkpoint", "x", "--lora", "a=/m/a,1", "--lora", "b=/m/b"]),
        "t",
    )
    assert engine.loras == (("a", "/m/a,1"), ("b", "/m/b"))
    # Engines and keys take commas as their variables do, and repeat.
    flags = ["--engine", "a:1,b:2", "--engine", "dns:///c:3", "--api-key", "k1",
             "--api-key", "k2 rpm=3", "--admin-key", "root"]  # fmt: skip
    gateway = resolve(GatewaySettings, gateway_cli.parse(flags), "t")
    assert gateway.engine == ["a:1", "b:2", "dns:///c:3"]
    limits = gateway.load_key_limits()
    assert list(limits) == ["k1", "k2"] and limits["k2"].rpm == 3
    assert gateway.load_admin_keys() == ["root"]
    # A trainer override keeps its commas: it is one SECTION.FIELD=VALUE, whose list field
    # then takes the items.
    args = submit.parse_args(["--image", "i", "--set", "finetune.targets=q_proj,v_proj"])
    assert args.set == ["finetune.targets=q_proj,v_proj"]
    assert submit.overrides(args.set) == {"finetune": {"targets": ["q_proj", "v_proj"]}}


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("llm_engine", ["--checkpoint", "x", "--slots", "abc"]),
        ("llm_gateway", ["--port", "abc"]),
        ("llm_gateway.serve", ["--checkpoint", "x", "--prefill-chunk", "0"]),
        ("llm_gateway.serve", ["--no-such-flag"]),
    ],
)
def test_the_commands_exit_2_on_a_bad_flag(module: str, argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=120,
        cwd=ROOT, env={k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
        | {"PYTHONPATH": f"{ROOT / 'shared'}:{ROOT / 'services'}"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    flag = argv[-2] if argv[-1] != "--no-such-flag" else argv[-1]
    assert flag in proc.stderr
