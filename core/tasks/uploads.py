"""What server managers upload to their task library (example images, task files), read apart from
members' requests.

Anyone can make a server and add the bot, so these files are as untrusted as members' uploads, but
nobody's answer waits on them: they are read one at a time, in a worker process of their own at a
lower CPU priority than the bot's, killed after ``images.decode_seconds``. A flood of them takes
neither members' decoding places nor any thread of the bot's, and at most one of its CPU cores.
"""

from __future__ import annotations

from core.config import ImageSettings
from core.errors import ServiceBusy
from core.images import BUSY, image_for_storage, in_worker
from core.tasks.archive import ArchiveLimits, BadArchive, TaskArchive, read_archive
from core.workers import PoolFull, TimedOut, WorkerDied, WorkerPool

# Jobs beyond the one running wait, each holding its upload (at most 25 MiB) in memory.
_WORKERS = WorkerPool("task-uploads", size=1, waiting=32, niceness=10, preload=("core.images", "core.tasks.archive"))


async def stored_image(data: bytes, settings: ImageSettings) -> bytes:
    """An example's upload decoded under the upload rules and encoded as stored, in the task-upload worker."""
    return await in_worker(_WORKERS, image_for_storage, data, settings)


async def task_file(data: bytes, limits: ArchiveLimits, settings: ImageSettings) -> TaskArchive:
    """An uploaded task file checked and unpacked (its images still undecoded), in the task-upload worker."""
    try:
        return await _WORKERS.run(settings.decode_seconds, read_archive, data, limits)
    except TimedOut:
        raise BadArchive("The task file took too long to read; export the task again from the bot.") from None
    except WorkerDied:
        raise BadArchive("The task file could not be read; export the task again from the bot.") from None
    except PoolFull:
        raise ServiceBusy(BUSY) from None
