"""Domain errors: each carries the sentence the person who made the request should read.

Adapters (the CLI, the Discord cogs) show ``str(error)`` for any ``FlamingoError`` and treat
every other exception as a bug to log.
"""

from __future__ import annotations

import logging
import secrets


class FlamingoError(Exception):
    """Base class: the message is written for the end user."""


class BadImage(FlamingoError):
    """An uploaded file cannot be used as an image."""


class DownloadFailed(FlamingoError):
    """An upload could not be fetched from where the front end keeps it (gone, refused or too slow)."""


class BadPrompt(FlamingoError):
    """A prompt or example text breaks the prompt format or the model's limits."""


class BadParameter(FlamingoError):
    """A generation parameter is out of its allowed range or makes no sense with the others."""


class TaskError(FlamingoError):
    """A change to a task library cannot be made."""


class UnknownTask(TaskError):
    """The named task does not exist."""


class TaskExists(TaskError):
    """The guild already has a task of that name."""


class TaskChanged(TaskError):
    """Someone else changed the task between reading it and writing the change."""


class ExampleNotFound(TaskError):
    """The task has no example at that position."""


class LimitReached(TaskError):
    """A configured cap (tasks per guild, examples per task, context length) would be exceeded."""


class ReadOnlyTask(TaskError):
    """Built-in tasks cannot be changed, only copied."""


class BadName(TaskError):
    """A task name is too long, too short, or uses characters that are not allowed."""


class ModelLoadError(FlamingoError):
    """The model, its files or its checkpoint cannot be loaded."""


class ServiceBusy(FlamingoError):
    """The request queue is full."""


class ClusterUnavailable(FlamingoError):
    """The Ray cluster that runs the model cannot be reached; the bot rejoins it when it is back."""


class ServiceClosed(FlamingoError):
    """The model service is shutting down and accepts no more work."""


class GenerationFailed(FlamingoError):
    """The model raised while answering; the details are logged, not shown."""


class RequestExpired(FlamingoError):
    """A request waited past the time its answer could still be delivered."""


class RequestCancelled(FlamingoError):
    """The requester withdrew the request."""


class NotAllowedHere(FlamingoError):
    """A server's settings keep the bot from answering this member or in this channel."""


class StorageUnavailable(FlamingoError):
    """The database refused a write (disk full, read-only or failing file, or locked too long): the
    change was rolled back whole. Reads still work, and the next write that succeeds ends it."""

    def __init__(self, cause: str) -> None:
        super().__init__("The bot cannot save changes right now, so nothing was changed; try again later.")
        self.cause = cause  # SQLite's words, for the log: never shown to users


def unexpected_failure(error: BaseException, logger: logging.Logger) -> GenerationFailed:
    """A bug while the model answered: logged with an id the asker is given, so that the bot's owner
    can find it from a user's report."""
    error_id = secrets.token_hex(4)
    logger.error("generation failed (error %s)", error_id, exc_info=error)
    return GenerationFailed(
        f"Something went wrong while the model was answering (error id `{error_id}`); the bot's owner can look it up."
    )
