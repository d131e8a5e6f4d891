"""The example configs that ship inside the package: ``fedtune config --example NAME`` writes one.

The TOML files beside this module are the one source. The repository's ``configs/`` folder holds
byte-for-byte copies, so that ``fedtune run configs/NAME.toml`` works in a clone (a test keeps
them equal; refresh them with ``cp fedtune/configs/*.toml configs/``). Each file begins with the
command that runs it; a relative ``data.path`` in it resolves against ``data.root``, else against
the folder the file is in (:func:`fedtune.config.resolve_data_paths`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def names() -> list[str]:
    """The names of the shipped example configs, sorted."""
    return sorted(f.name[:-5] for f in resources.files(__name__).iterdir()
                  if f.name.endswith(".toml"))


def text(name: str) -> str:
    """The TOML text of example ``name``; an unknown name is a ValueError listing the known."""
    if name not in names():
        raise ValueError(f"no example config {name!r}; the examples are: {', '.join(names())}")
    return resources.files(__name__).joinpath(f"{name}.toml").read_text(encoding="utf-8")


def summary(name: str) -> str:
    """The first phrase of the example's header comment (what it runs), for a listing."""
    header = []
    for line in text(name).splitlines():
        if not line.startswith("#") or line.startswith("#   "):
            break
        header.append(line.lstrip("#").strip())
    words = " ".join(header)
    for stop in (": ", ". ", ", so ", ", the same"):
        words = words.split(stop, 1)[0]
    return words.rstrip(".")


def write(name: str, dest: str | Path = ".", force: bool = False) -> Path:
    """Write example ``name`` to ``dest`` (a folder: as ``NAME.toml`` in it) and return the file;
    an existing file is kept unless ``force``."""
    out = Path(dest)
    if out.is_dir():
        out = out / f"{name}.toml"
    content = text(name)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    out.write_text(content, encoding="utf-8")
    return out
