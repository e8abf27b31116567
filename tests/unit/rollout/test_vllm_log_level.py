"""set_vllm_log_level: vLLM at WARNING unless the user chose a level (VLLM_LOGGING_LEVEL or an explicit one),
in this process's loggers and, through the environment, in every vLLM process started later."""

import logging
import os

import pytest

from megatron_scope.rollout.vllm_engine import (
    VLLM_LOG_LEVEL_ENV,
    VLLMEngineConfig,
    VLLMRolloutEngine,
    set_vllm_log_level,
)


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    """Each test starts without the variables and leaves vLLM's logger levels as it found them."""
    for name in (VLLM_LOG_LEVEL_ENV, "VLLM_LOGGING_CONFIG_PATH", "VLLM_CONFIGURE_LOGGING"):
        monkeypatch.setenv(name, "")  # records the value to restore (set_vllm_log_level writes os.environ)
        monkeypatch.delenv(name)
    vllm_logger = logging.getLogger("vllm")
    levels = (vllm_logger.level, [(handler, handler.level) for handler in vllm_logger.handlers])
    yield
    vllm_logger.setLevel(levels[0])
    for handler, level in levels[1]:
        handler.setLevel(level)


@pytest.fixture
def vllm_handler():
    """The handler vLLM's logging configuration adds to the "vllm" logger at an engine start, and another
    one of the user's (set to DEBUG)."""
    vllm_logger = logging.getLogger("vllm")
    saved = vllm_logger.handlers[:]
    handler = logging.StreamHandler()
    handler.set_name("vllm")  # as logging.config.dictConfig names it
    handler.setLevel(logging.INFO)
    users = logging.NullHandler()
    users.setLevel(logging.DEBUG)
    vllm_logger.handlers = [handler, users]
    vllm_logger.setLevel(logging.INFO)
    yield handler
    vllm_logger.handlers = saved
    assert users.level == logging.DEBUG, "set_vllm_log_level changed a handler that is not vLLM's"


def vllm_levels() -> list[int]:
    """The "vllm" logger's level and its vLLM handler's."""
    vllm_logger = logging.getLogger("vllm")
    return [vllm_logger.level] + [h.level for h in vllm_logger.handlers if h.get_name() == "vllm"]


def test_warning_by_default():
    assert set_vllm_log_level(None) == "WARNING"
    assert set_vllm_log_level() == "WARNING"
    assert os.environ[VLLM_LOG_LEVEL_ENV] == "WARNING"


def test_the_users_variable_is_kept(monkeypatch):
    monkeypatch.setenv(VLLM_LOG_LEVEL_ENV, "info")
    assert set_vllm_log_level(None) == "INFO"
    assert os.environ[VLLM_LOG_LEVEL_ENV] == "INFO"


def test_an_explicit_level_wins_over_the_variable(monkeypatch):
    monkeypatch.setenv(VLLM_LOG_LEVEL_ENV, "ERROR")
    assert set_vllm_log_level("debug") == "DEBUG"
    assert os.environ[VLLM_LOG_LEVEL_ENV] == "DEBUG"


def test_unknown_levels_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="'loud' is not one of CRITICAL, ERROR, WARNING, INFO, DEBUG"):
        set_vllm_log_level("loud")
    monkeypatch.setenv(VLLM_LOG_LEVEL_ENV, "verbose")
    with pytest.raises(ValueError, match=f"'verbose' \\(from {VLLM_LOG_LEVEL_ENV}\\)"):
        set_vllm_log_level(None)


def test_vllms_logger_takes_the_level_at_once(vllm_handler):
    """After an engine start vLLM's logger has its own handler (set to the level of that start)."""
    set_vllm_log_level("ERROR")
    assert vllm_levels() == [logging.ERROR, logging.ERROR]
    set_vllm_log_level(None)  # the variable now says ERROR
    assert vllm_levels() == [logging.ERROR, logging.ERROR]
    set_vllm_log_level("info")
    assert vllm_levels() == [logging.INFO, logging.INFO]


@pytest.mark.parametrize("variable,value", [("VLLM_LOGGING_CONFIG_PATH", "/etc/my_vllm_logging.json"),
                                            ("VLLM_CONFIGURE_LOGGING", "0")])
def test_a_users_logging_setup_is_left_alone(monkeypatch, vllm_handler, variable, value):
    before = vllm_levels()
    monkeypatch.setenv(variable, value)
    assert set_vllm_log_level("DEBUG") == "DEBUG"
    assert os.environ[VLLM_LOG_LEVEL_ENV] == "DEBUG"  # vLLM applies it if its own configuration allows
    assert vllm_levels() == before


def test_the_engine_sets_the_default_before_vllm_starts(tmp_path):
    with pytest.raises(FileNotFoundError):
        VLLMRolloutEngine(VLLMEngineConfig(str(tmp_path / "nowhere"), kv_cache_bytes=1 << 20))
    assert os.environ[VLLM_LOG_LEVEL_ENV] == "WARNING"


def test_the_chat_template_warmup_failure_is_dropped_and_nothing_else(caplog):
    """Engines start without a tokenizer, so vLLM's chat-template warm-up always fails: exactly that warning
    (and its traceback) is filtered on vLLM's renderer logger; its other warnings still show."""
    from megatron_scope.rollout.vllm_engine import _quiet_chat_template_warmup

    _quiet_chat_template_warmup()
    _quiet_chat_template_warmup()  # idempotent: one filter
    renderer = logging.getLogger("vllm.renderers.base")
    assert len(renderer.filters) == 1
    with caplog.at_level(logging.WARNING, logger="vllm.renderers.base"):
        renderer.propagate, propagate = True, renderer.propagate
        try:
            renderer.warning("Chat template warmup failed", exc_info=True)
            renderer.warning("something else")
        finally:
            renderer.propagate = propagate
    assert [r.getMessage() for r in caplog.records if r.name == "vllm.renderers.base"] == ["something else"]


def test_known_start_up_warnings_are_filtered_until_the_user_chooses_a_level():
    """At the default level vLLM's processes get a logging configuration (VLLM_LOGGING_CONFIG_PATH: vLLM's default
    one at WARNING with the filter on its handler) that drops exactly the known start-up messages; a level the user
    chooses restores vLLM's own configuration, which shows them."""
    import json

    from megatron_scope.quiet import KNOWN_VLLM_WARNINGS, KnownVllmWarnings

    assert set_vllm_log_level(None) == "WARNING"
    with open(os.environ["VLLM_LOGGING_CONFIG_PATH"]) as handle:
        config = json.load(handle)
    assert config["handlers"]["vllm"]["filters"] == ["known_vllm_warnings"]
    assert config["filters"]["known_vllm_warnings"]["()"] == "megatron_scope.quiet.KnownVllmWarnings"
    assert config["handlers"]["vllm"]["level"] == config["loggers"]["vllm"]["level"] == "WARNING"
    assert set_vllm_log_level(None) == "WARNING"  # an engine's own call keeps the filter (not the user's level)
    assert os.environ.get("VLLM_LOGGING_CONFIG_PATH")

    def kept(message):
        return KnownVllmWarnings().filter(logging.LogRecord("vllm.x", logging.WARNING, "f.py", 1, message, (), None))

    assert not any(kept(message) for message in KNOWN_VLLM_WARNINGS)
    assert kept("Failed to load weights") and kept("Triton is installed")  # others, and only the start, print

    assert set_vllm_log_level("info") == "INFO"
    assert "VLLM_LOGGING_CONFIG_PATH" not in os.environ


@pytest.mark.parametrize("options, shown", [([], False), (["-W", "default"], True)])
def test_megatron_cores_import_time_fallback_warnings_are_quiet_unless_python_is_asked(options, shown):
    """megatron-core warns at import that Apex and Transformer Engine are missing (the local modules are what this
    code runs); `quiet_python_warnings` drops exactly those messages, and Python's own -W shows them again."""
    import subprocess
    import sys

    code = ("from megatron_scope.quiet import quiet_python_warnings; quiet_python_warnings(); "
            "import megatron.core.models.gpt.gpt_layer_specs, megatron.core.optimizer")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    done = subprocess.run([sys.executable, *options, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert ("Apex is not installed. Falling back to Torch Norm" in done.stderr) == shown, done.stderr[-2000:]
    assert ("Transformer Engine and Apex are not installed" in done.stderr) == shown
