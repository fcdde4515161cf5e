"""``python main.py`` as an operator runs it: fast, clear refusals and an online backup."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import main
from core.config import PROJECT_ROOT
from core.storage.task_store import TaskStore
from tests.helpers.cli import run_main


def main_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """With an empty token unless ``env`` gives one, and no hub setting: what each test needs, it sets."""
    return run_main(*args, env={"PATH": "/usr/bin:/bin", "DISCORD_TOKEN": ""} | (env or {}), timeout=120)


def test_running_without_a_token_says_how_to_set_it_without_importing_the_model_stack():
    probe = (
        "import sys, main; code = main.main([]); "
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "DISCORD_TOKEN": ""},
    )
    assert result.returncode == 2
    assert result.stderr == "error: no Discord bot token: set DISCORD_TOKEN in the environment or in a .env file\n"
    assert result.stdout == "torch not imported\n"


def test_a_bad_setting_is_one_line(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[model]\nprecision = "fp8"\n')
    result = main_process("--config", str(config), env={"DISCORD_TOKEN": "x"})
    assert result.returncode == 2
    assert result.stderr.startswith("error: bad setting model.precision: Input should be 'auto'")
    assert result.stderr.count("\n") == 1


def test_a_misspelt_variable_or_a_token_in_the_file_is_one_line_naming_what_is_meant(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("")
    result = main_process(
        "--config", str(config), env={"DISCORD_TOKEN": "x", "FLAMINGO_QUOTA__USER_COOLDOWN_SECONDS": "5"}
    )
    assert result.returncode == 2
    assert result.stderr == (
        "error: unknown setting FLAMINGO_QUOTA__USER_COOLDOWN_SECONDS; "
        "did you mean FLAMINGO_QUOTAS__USER_COOLDOWN_SECONDS?\n"
    )
    config.write_text('[discord]\ntoken = "abc"\n')
    result = main_process("--config", str(config), "backup", str(tmp_path / "copy.db"))
    assert result.returncode == 2
    assert result.stderr == (
        "error: config.toml must not hold the bot token (discord.token); "
        "set DISCORD_TOKEN in the environment or .env, never in config.toml\n"
    )


def _help(capsys: pytest.CaptureFixture[str], *command: str) -> str:
    with pytest.raises(SystemExit) as done:
        main.main([*command, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrapped: argparse breaks lines at the terminal's width


def test_every_commands_help_gives_each_options_default_and_range(capsys):
    parser = main._parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    for name, command in [("", parser), *commands.choices.items()]:
        options = [action for action in command._actions if action.option_strings and action.dest != "help"]
        assert options, name
        shown = _help(capsys, *([name] if name else []))
        for option in options:
            assert "(default: " in (option.help or ""), (name, option.option_strings)
            assert option.help is not None and " ".join(option.help.split()) in shown
    describe = _help(capsys, "describe")
    for expected in [
        "--max-new-tokens MAX_NEW_TOKENS Longest answer, in tokens (default: 30, 1 to 256)",
        "--num-beams NUM_BEAMS Beam search width (default: 1, 1 to 5)",
        "--temperature TEMPERATURE Sampling randomness (needs do_sample) (default: the model's own, 0.05 to 2)",
        "--do-sample Sample instead of taking the most likely words (default: off)",
        "--task TASK built-in task whose examples are prepended (default: caption)",
        "--precision {auto,fp32,bf16,fp16,int8,nf4} number format of the weights (default: the settings' "
        "model.precision, auto as shipped)",
    ]:
        assert expected in describe, expected
    assert "--config CONFIG settings file (default: config.toml beside main.py)" in _help(capsys)


def test_backup_copies_the_database_while_it_is_open(tmp_path):
    database = tmp_path / "live.db"
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\ndatabase = "{database}"\n')

    async def populate() -> TaskStore:
        store = await TaskStore.open(database)
        await store.create_task(1, "cats", "", "<image>Output:", 7, max_tasks=5, max_image_bytes=2**30)
        await store.add_example(
            1, "cats", b"jpeg", "<image>Output:A cat.", max_examples=8, max_image_bytes=2**30, added_by=42
        )
        return store

    store = asyncio.run(populate())
    target = tmp_path / "copy.db"
    result = main_process("--config", str(config), "backup", str(target))
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(target) as copy:
        assert copy.execute("SELECT name FROM tasks").fetchall() == [("cats",)]
        assert copy.execute("SELECT text FROM examples").fetchall() == [("<image>Output:A cat.",)]
    asyncio.run(store.close())


def test_backup_without_a_database_is_one_line(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\ndatabase = "{tmp_path / "none.db"}"\n')
    result = main_process("--config", str(config), "backup", str(tmp_path / "x.db"))
    assert result.returncode == 2
    assert result.stderr == f"error: there is no database at {tmp_path / 'none.db'} yet\n"
    assert not Path(tmp_path / "x.db").exists()


def test_backup_refuses_the_database_itself_and_unwritable_targets_in_one_line(tmp_path):
    database = tmp_path / "live.db"
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\ndatabase = "{database}"\n')
    asyncio.run(asyncio.run(TaskStore.open(database)).close())
    (tmp_path / "notes.txt").write_text("not a database, and not to be overwritten\n" * 100)
    for target, message in [
        (database, f"error: {database} is the database itself; back it up to another file\n"),
        (tmp_path / "sub" / ".." / "live.db", f"error: {tmp_path / 'sub' / '..' / 'live.db'} is the database itself"),
        (tmp_path / "notes.txt", f"error: could not back up to {tmp_path / 'notes.txt'}: file is not a database\n"),
    ]:
        (tmp_path / "sub").mkdir(exist_ok=True)
        result = main_process("--config", str(config), "backup", str(target))
        assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert (tmp_path / "notes.txt").read_text().startswith("not a database")
    into_folder = main_process("--config", str(config), "backup", str(tmp_path / "sub"))
    assert into_folder.returncode == 0
    assert into_folder.stderr == f"Copied {database} to {tmp_path / 'sub' / 'live.db'}\n"
    with sqlite3.connect(tmp_path / "sub" / "live.db") as copy:
        assert copy.execute("SELECT count(*) FROM tasks").fetchall() == [(0,)]


def test_backup_into_a_folder_named_with_a_slash_makes_it_and_config_may_follow_the_command(tmp_path):
    database = tmp_path / "live.db"
    config = tmp_path / "staging.toml"
    config.write_text(f'[storage]\ndatabase = "{database}"\n')
    asyncio.run(asyncio.run(TaskStore.open(database)).close())
    result = main_process("backup", f"{tmp_path / 'backups' / 'nightly'}/", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "backups" / "nightly" / "live.db").is_file()
    blocked = tmp_path / "file"
    blocked.write_text("in the way")
    result = main_process("backup", f"{blocked / 'sub'}/", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: could not back up to {blocked / 'sub' / 'live.db'}: ")
    assert result.stderr.count("\n") == 1


def test_discord_out_of_reach_is_one_line(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\ndatabase = "{tmp_path / "tasks.db"}"\n')
    closed_port = "http://127.0.0.1:9/api/v10"
    environment = {"DISCORD_TOKEN": "x", "FLAMINGO_DISCORD__API_BASE_URL": closed_port}
    result = main_process("--config", str(config), env=environment)
    assert result.returncode == 2
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"error: cannot reach Discord at {closed_port}: Cannot connect"), result.stderr
    assert "Traceback" not in result.stderr


def test_debug_logging_keeps_interaction_payloads_sql_parameters_and_exif_out_even_with_prompts():
    from core.config import LoggingSettings
    from main import PRIVATE_DEBUG_LOGGERS, setup_bot_logging

    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        setup_bot_logging(LoggingSettings(level="DEBUG"))
        assert root.level == logging.DEBUG
        assert all(logging.getLogger(name).getEffectiveLevel() == logging.INFO for name in PRIVATE_DEBUG_LOGGERS)
        # These log URLs that carry interaction tokens, payloads, and photos' EXIF tags.
        for name in ("discord.webhook.async_", "discord.http", "discord.gateway", "PIL.TiffImagePlugin"):
            assert logging.getLogger(name).getEffectiveLevel() == logging.INFO, name
        setup_bot_logging(LoggingSettings(level="DEBUG", log_prompts=True))  # prompts are not tokens
        assert all(logging.getLogger(name).getEffectiveLevel() == logging.INFO for name in PRIVATE_DEBUG_LOGGERS)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        for name in PRIVATE_DEBUG_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
