"""Entry point of group ``sglang.srt.plugins``: SGLang calls :func:`load` in every process."""


def load() -> None:
    """Install what this process needs; does nothing yet on any platform."""
