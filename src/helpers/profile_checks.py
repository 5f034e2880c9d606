"""Before any work starts: does a profile ask for more than its data and model hold?

:func:`preflight` reads only what is cheap to read (the data file's record count, the model's ``config.json``
when it is already on disk) and returns the notes to print; sizes that cannot be met at all (edit layers the
model does not have) raise one :class:`ProfileSizeError` listing every such problem.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .profile_loader import Profile, cache_dir

log = logging.getLogger(__name__)


class ProfileSizeError(ValueError):
    """The profile asks for sizes its model or data cannot provide; the message lists each."""


def data_records(profile: Profile) -> int | None:
    """How many records the profile's data holds, when that is known without building anything."""
    data = profile.raw["data"]
    if data == "known":
        from .known import load_known

        try:
            return len(load_known())
        except Exception:  # noqa: BLE001 (the data stage reports a damaged vendored file in full)
            return None
    if data == "official":
        from .data import OFFICIAL_RECORDS

        return OFFICIAL_RECORDS
    if data == "world":
        return None  # generated with the world model
    from .data import zsre_path

    path = zsre_path(data) or data
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None  # the data stage reports a missing or malformed file with every problem in it
    return len(raw) if isinstance(raw, list) else None


def model_layers(profile: Profile) -> int | None:
    """The model's number of layers, if its config is already on disk (a folder, a converted named model)."""
    spec = str(profile.raw["model"])
    folder: Path | None = None
    if profile.uses_world:
        from .world import WORLD_PRESETS

        preset = WORLD_PRESETS.get(profile.raw["world"])
        return getattr(preset[1], "n_layer", None) if isinstance(preset, tuple) else None
    from .named_models import NAMED_MODELS

    if spec in NAMED_MODELS:
        from .gguf_convert import model_folder

        m = NAMED_MODELS[spec]
        folder = model_folder(cache_dir(), m.gguf_sha256, m.gguf_file)
    elif Path(spec).is_dir():
        folder = Path(spec)
    try:
        cfg = json.loads((folder / "config.json").read_text()) if folder is not None else {}
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    n = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    return int(n) if n is not None else None


def preflight(profile: Profile) -> list[str]:
    """Notes on sizes the data or model cannot fully provide (the run goes on with what there is); raises
    :class:`ProfileSizeError` for sizes that cannot be met at all."""
    notes, errors = [], []
    n_rec, max_facts = int(profile.raw["n_records"]), profile.raw.get("max_facts")
    have = data_records(profile)
    if have is not None and n_rec > have:
        notes.append(f"n_records = {n_rec}, but the data ({profile.raw['data']}) holds {have} records: all "
                     f"{have} are candidates")
    cap = min(n_rec, have) if have is not None else n_rec
    if max_facts is not None and int(max_facts) > cap:
        notes.append(f"max_facts = {max_facts}, but at most {cap} candidate records exist (fewer pass the "
                     "correctness filter)")
    edits = profile.runs_editing
    ed = profile.raw.get("editing", {})
    n_edit = ed.get("facts")
    if edits and n_edit is not None and max_facts is not None and int(n_edit) > int(max_facts):
        notes.append(f"editing.facts = {n_edit}, but max_facts = {max_facts} facts are kept: at most "
                     f"{max_facts} are edited")
    for key, sizes in (ed.get("cells") or {}).items():
        n_cell = sizes.get("facts")
        if edits and n_cell is not None and max_facts is not None and int(n_cell) > int(max_facts):
            notes.append(f"editing.cells.{key}.facts = {n_cell}, but max_facts = {max_facts} facts are kept: at "
                         f"most {max_facts} are edited")
    n_layers = model_layers(profile)
    specs = [("editing.layers", ed.get("layers", "all"))] + [
        (f"editing.cells.{key}.layers", sizes["layers"]) for key, sizes in (ed.get("cells") or {}).items()
        if "layers" in sizes]
    for where, layers in specs:
        if edits and n_layers is not None and layers != "all":
            bad = [l for l in layers if not 0 <= int(l) < n_layers]
            if bad:
                errors.append(f"{where} {bad} do not exist: the model has {n_layers} layers (0-{n_layers - 1})")
    if errors:
        raise ProfileSizeError(f"profile {profile.name}: " + "; ".join(errors))
    return notes
