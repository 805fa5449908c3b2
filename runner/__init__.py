"""runner: resumable bulk generation against Yandex AI Studio's completionAsync API.

Jobs come from a JSONL file, live in SQLite, and are submitted and polled by one anyio task
group; see the module docstrings of ``inputs``, ``store``, ``api`` and ``scheduler``.
"""

__version__ = "0.1.0"
