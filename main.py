"""Entry point: ``python main.py`` runs the bot; ``describe`` answers offline; ``evaluate`` scores models
on a task offline; ``backup`` copies the database.

Configuration and the token are checked before the model stack is imported (torch and friends
take seconds), so a missing token is reported at once. ``describe`` prints only the answer on
stdout, ``evaluate`` only its table (or JSON); progress and errors go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import get_args

from PIL import Image

from core.config import (
    ConfigError,
    GenerationSettings,
    LoggingSettings,
    ModelSettings,
    Precision,
    Settings,
    load_settings,
)
from core.errors import BadImage, FlamingoError, UnknownTask
from core.evaluation import leave_one_out
from core.evaluation.report import ModelRun, as_json, as_table
from core.evaluation.sources import TEXTS_FILE, load_task
from core.generation import OPTIONS, GenerationParams, generation_kwargs
from core.images import load_image
from core.prompts import END_OF_CHUNK, check_user_text
from core.tasks.builtin import DEFAULT_TASK, load_builtin_tasks

log = logging.getLogger("flamingo")


def _parser() -> argparse.ArgumentParser:
    """Every option's help ends with its default and, where values are bounded, its range."""
    parser = argparse.ArgumentParser(prog="main.py", description="OpenFlamingo for Discord servers.")
    parser.add_argument("--config", type=Path, help="settings file (default: config.toml beside main.py)")
    # Also after the command; SUPPRESS keeps a --config given before it when none follows.
    config_too = argparse.ArgumentParser(add_help=False)
    config_too.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help="settings file (default: the one given before the command, else config.toml beside main.py)",
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", parents=[config_too], help="run the bot (the default)")
    backup = commands.add_parser(
        "backup", parents=[config_too], help="copy the task database safely, even while the bot runs"
    )
    backup.add_argument("target", metavar="PATH", help="a file to write (replaced if it exists), or a folder")
    describe = commands.add_parser(
        "describe", parents=[config_too], help="answer a prompt about local images, without Discord"
    )
    describe.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="one per <image> of the prompt")
    describe.add_argument("--prompt", help="text with one <image> per image (default: the task's template)")
    describe.add_argument(
        "--task", default=DEFAULT_TASK, help=f"built-in task whose examples are prepended (default: {DEFAULT_TASK})"
    )
    shipped = ModelSettings()
    describe.add_argument(
        "--model",
        help=f"registry name or local model directory (default: the settings' model.name, {shipped.name} as shipped)",
    )
    describe.add_argument(
        "--precision",
        choices=get_args(Precision),
        help=f"number format of the weights (default: the settings' model.precision, {shipped.precision} as shipped)",
    )
    describe.add_argument(
        "--device", help=f"auto, cpu, cuda or cuda:N (default: the settings' model.device, {shipped.device} as shipped)"
    )
    describe.add_argument(
        "--language-model",
        help="another causal LM (hub id or directory) of the model's shape under its trained layers "
        "(default: the settings' model.language_model, none as shipped)",
    )
    describe.add_argument(
        "--skip-resource-checks",
        action="store_true",
        help="load even when free memory or disk looks too small for the model "
        "(default: the settings' model.skip_resource_checks, off as shipped)",
    )
    length = GenerationSettings().max_new_tokens_default
    generation = describe.add_argument_group(
        "generation", "defaults and ranges as shipped; the settings file may narrow a range or change the length"
    )
    for option in OPTIONS:
        flag = "--" + option.name.replace("_", "-")
        if option.kind is bool:
            switch = "on" if option.default else "off"
            generation.add_argument(
                flag, dest=option.name, action="store_true", help=f"{option.help} (default: {switch})"
            )
            continue
        default = length if option.name == "max_new_tokens" else option.default
        shown = "the model's own" if default is None else f"{default:g}"
        bounds = "" if option.range is None else f", {option.range.low:g} to {option.range.high:g}"
        generation.add_argument(
            flag,
            dest=option.name,
            type=option.kind,
            default=option.default,
            help=f"{option.help} (default: {shown}{bounds})",
        )
    evaluate = commands.add_parser(
        "evaluate",
        parents=[config_too],
        help="score models on a task, each example answered with the task's other examples as context",
        description="Each example of the task is held out in turn: the model answers its image, with the other "
        "examples as context and the example's text up to its answer as the prompt (the answer begins after "
        "the longest ending of the task's template that the text holds), greedily. The answers are scored "
        "against the examples' own by exact match after VQA normalisation and by token F1.",
        epilog=f'A folder holds the images and a {TEXTS_FILE}, a JSON object: "examples" maps each image\'s file '
        'name to its example text, in order, and an optional "template" is the task\'s template (default: '
        f"the {DEFAULT_TASK} task's), e.g. "
        '{"template": "<image>Output:", "examples": {"cat.jpg": "<image>Output:A cat on a sofa.", '
        '"dog.jpg": "<image>Output:A dog in the snow."}}',
    )
    evaluate.add_argument(
        "--task",
        default=DEFAULT_TASK,
        metavar="NAME|FILE|DIR",
        help="a built-in task's name, a task file from /tasks export, or a folder of images with "
        f"{TEXTS_FILE}; a path that exists is read as a file or folder (default: {DEFAULT_TASK})",
    )
    evaluate.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="MODEL",
        help="registry name or local model directory; give it again to compare models, loaded one at a time "
        f"(default: the settings' model.name, {shipped.name} as shipped)",
    )
    evaluate.add_argument(
        "--language-model",
        help="another causal LM (hub id or directory) of the models' shape under each one's trained layers "
        "(default: the settings' model.language_model, none as shipped)",
    )
    evaluate.add_argument(
        "--json", action="store_true", help="print one JSON line instead of the table (default: the table)"
    )
    return parser


def _describe_settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    chosen = ("model", "precision", "device", "language_model", "skip_resource_checks")
    overrides = {key: getattr(args, key) for key in chosen if getattr(args, key)}
    if "model" in overrides:
        overrides["name"] = overrides.pop("model")
    return settings.model_copy(update={"model": settings.model.model_copy(update=overrides)})


def _read_image(path: Path, settings: Settings) -> Image.Image:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadImage(f"Cannot read {path}: {error.strerror or error}.") from None
    try:
        return load_image(data, settings.images)
    except BadImage as error:
        raise BadImage(f"{path}: {error}") from None


def describe(args: argparse.Namespace) -> int:
    settings = _describe_settings(args)
    params = GenerationParams(**{option.name: getattr(args, option.name) for option in OPTIONS})
    # Everything that needs no model is checked before the (slow) model load.
    generation_kwargs(params, settings.generation)
    tasks = load_builtin_tasks(settings.data_dir, settings.images)
    if args.task not in tasks:
        raise UnknownTask(f"There is no task called {args.task!r}; built-in tasks: {', '.join(sorted(tasks))}.")
    task = tasks[args.task]
    prompt = args.prompt if args.prompt is not None else task.prompt_template
    check_user_text(
        prompt, images=len(args.images), reserved=[END_OF_CHUNK], max_chars=settings.prompts.max_chars, what="prompt"
    )
    images = [_read_image(path, settings) for path in args.images]

    # Imported here: torch and transformers take seconds to import, and refusals should be instant.
    from core.serving.local import start_service

    with contextlib.redirect_stdout(sys.stderr):
        service = start_service(settings)
    try:
        answer = asyncio.run(service.answer(images, prompt, task, params))
    finally:
        service.close()
    if not answer.text:
        log.info("(the model gave an empty answer)")
    print(answer.text)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    # Every input is read and checked before the first (slow) model load.
    planned = leave_one_out.plan(load_task(args.task, settings, lambda path: _read_image(path, settings)))
    changes = {} if args.language_model is None else {"language_model": args.language_model}
    runs = []
    for name in args.models or [settings.model.name]:
        model = settings.model.model_copy(update={"name": name} | changes)
        chosen = settings.model_copy(update={"model": model})
        runs.append(ModelRun(name, model.language_model, _evaluate_with(planned, chosen)))
        gc.collect()  # the model went with its service: free it before the next loads
    print(json.dumps(as_json(runs), ensure_ascii=False) if args.json else as_table(runs))
    return 0


def _evaluate_with(planned: leave_one_out.Plan, settings: Settings) -> leave_one_out.Evaluation:
    from core.serving.local import start_service

    with contextlib.redirect_stdout(sys.stderr):
        service = start_service(settings)
    scored: list[leave_one_out.ExampleScore] = []

    def progress(score: leave_one_out.ExampleScore) -> None:
        scored.append(score)
        name, total = settings.model.name, len(planned.cases)
        log.info("%s: %d of %d scored (example %d: F1 %.2f)", name, len(scored), total, score.position, score.f1)

    try:
        return asyncio.run(
            leave_one_out.evaluate(planned, service.answer, service.rules.count_tokens, settings.generation, progress)
        )
    finally:
        service.close()


# At DEBUG these log every interaction's payload (prompts, user ids, interaction tokens, signed
# attachment URLs), every SQL statement's parameters (stored prompts and whole images) and photos'
# EXIF tags (GPS positions, names): kept at INFO always. Tokens are secrets whatever
# ``logging.log_prompts`` says; it governs only the bot's own line per request.
PRIVATE_DEBUG_LOGGERS = (
    "discord.gateway",
    "discord.http",
    "discord.webhook",  # interaction follow-ups: the URL carries the interaction's token
    "discord.client",
    "discord.state",
    "aiosqlite",
    "PIL",
)


def setup_bot_logging(settings: LoggingSettings) -> None:
    import discord

    level = getattr(logging, settings.level)
    discord.utils.setup_logging(level=level)
    discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False  # the bot never joins voice
    for name in PRIVATE_DEBUG_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.INFO))


async def _serve(settings: Settings, token: str) -> None:
    from cogs.utils.bot import FlamingoBot

    bot = FlamingoBot(settings)

    def on_signal() -> None:
        """Finish what is being answered, then stop; but during start-up (loading the model can
        take minutes, and it cannot be interrupted) or on a second signal, stop at once."""
        if bot.started_up and not bot.closing:
            bot.request_shutdown()
            return
        log.warning("stopping at once: %s", "a second signal" if bot.closing else "still starting up")
        logging.shutdown()
        os._exit(0 if not bot.closing else 1)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    async with bot:
        await bot.start(token)
    await bot.finish_closing()


def run_bot(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if settings.discord_token is None or not settings.discord_token.get_secret_value().strip():
        raise ConfigError("no Discord bot token: set DISCORD_TOKEN in the environment or in a .env file")
    import aiohttp
    import discord

    setup_bot_logging(settings.logging)
    try:
        asyncio.run(_serve(settings, settings.discord_token.get_secret_value().strip()))
    except discord.LoginFailure:
        raise ConfigError("Discord refused the bot token; check DISCORD_TOKEN") from None
    except (aiohttp.ClientError, discord.GatewayNotFound) as error:
        where = settings.discord.api_base_url
        raise ConfigError(f"cannot reach Discord at {where}: {error or type(error).__name__}") from None
    if settings.service.backend == "ray":
        _end_without_teardown()
    return 0


def _end_without_teardown() -> None:
    """End a process that was a Ray driver once the bot has closed everything: Ray's gRPC threads keep
    running in C code after ``ray.shutdown()``, and the interpreter's teardown then crashed in about
    one stop in three (SIGABRT inside its last garbage collection, a core dump showed), turning a clean
    stop into a failure for systemd or a container. The image workers end when their pipes close."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def backup(args: argparse.Namespace) -> int:
    from core.storage.database import backup_database

    settings = load_settings(args.config)
    source = settings.storage.database_path
    if not source.is_file():
        raise ConfigError(f"there is no database at {source} yet")
    target = Path(args.target)
    into_folder = args.target.endswith(os.sep) or target.is_dir()  # "backups/" is a folder, even one not made yet
    if into_folder:
        target /= source.name
    if target.exists() and target.samefile(source):
        raise ConfigError(f"{target} is the database itself; back it up to another file")
    try:
        if into_folder:
            target.parent.mkdir(parents=True, exist_ok=True)
        backup_database(source, target)
    except (sqlite3.Error, OSError) as error:
        raise ConfigError(f"could not back up to {target}: {error}") from None
    print(f"Copied {source} to {target}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("describe", "evaluate", "backup"):
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    command = {"describe": describe, "evaluate": evaluate, "backup": backup}.get(args.command, run_bot)
    try:
        return command(args)
    except (FlamingoError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
