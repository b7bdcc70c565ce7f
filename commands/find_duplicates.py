"""`find-duplicates`: groups of near-duplicate images of an index, with a suggested keeper each; nothing is deleted."""
from __future__ import annotations

import json
from pathlib import Path

import click

from retrieval.system import display_name, terminal_name

from commands.options import (Command, FloatRange, UserError, command_settings, db_url_option, exit_without_teardown, index_dir_option,
                              index_lag_note, open_index, querying, setup_logging)

# torch, FAISS and the network are imported after the arguments are parsed.


@click.command(cls=Command, context_settings=command_settings("find-duplicates"))
@index_dir_option
@db_url_option
@click.option("--threshold", type=FloatRange(min=0, max=2, min_open=True, max_open=True), default=None,
              metavar="DISTANCE",
              help="Group images all closer than this to one another (L2 distance between whitened vectors, the raw "
                   "unit ones below 32 images, 0-2) instead of the threshold calibrated on the collection.  "
                   "[default: calibrated]")
@click.option("--calibration-images", type=click.IntRange(min=1), default=24, show_default=True,
              help="Images of the collection whose edited copies calibrate the threshold.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the network runs for the calibration's copies.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"groups": [[{"id", "path", "label", "width", "height", "bytes", "sha256", "distance", '
                   '"link_to", "file"}, ...], ...], "threshold": {...}, "images": N, "data_dir"} on stdout (each group\'s '
                   'keeper first; distance: to it; link_to: the member whose file this one is too, a link, or null; '
                   'path: relative to data_dir; file: the whole path).')
@click.option("-v", "--verbose", is_flag=True, help="Log what is being done.")
def main(index_dir: Path, db_url: str | None, threshold: float | None, calibration_images: int, device: str,
         as_json: bool, verbose: bool) -> None:
    """Print groups of near-duplicate images of the index: edited copies (cropped, flipped, recompressed,
    brightened, scaled, rotated, greyscale, blurred) of one photo, and byte-identical files, which are always
    one group (which edits are found depends on the index's network and options: evaluate-index --copies measures
    it). Nothing is deleted or moved: each group names a suggested keeper (the largest, then the oldest).

    Vectors are compared after a PCA whitening learned on the collection's own vectors. Every two images of a
    group are closer than a threshold calibrated on the collection itself: edited copies of a sample of its
    images are put through the index's network, and the threshold is the distance with the best expected pair F1
    between their distances and those of the collection's images to their nearest others, counting as many
    copies among the latter as the collection seems to hold (few or none: a low threshold). It is printed with
    the share of the made copies within it of their original; --threshold overrides it.

    Options can also be set by environment variables (FIND_DUPLICATES_THRESHOLD, ...; see docs/configuration.md).

    Exit status: 0 done (duplicates or not), 2 no index, no usable images or a damaged catalog, 1 a full disk
    (one line: what to free), 130 interrupted.
    """
    setup_logging(verbose)
    from retrieval.search.duplicates import DuplicatesError, find_duplicates

    with querying(open_index(index_dir, db_url, device, load_network=threshold is None), index_dir, db_url) as index:
        try:
            result = find_duplicates(index, threshold=threshold, calibration_images=calibration_images, progress=True)
        except DuplicatesError as exc:
            raise UserError(str(exc)) from exc
        lagging = _index_lags_folder(index, index_dir)
    for note in ([lagging] if lagging else []) + result.notes():
        click.echo(f"note: {note}", err=True)
    if as_json:
        doc = result.to_json()
        doc["data_dir"] = display_name(doc["data_dir"])
        for group in doc["groups"]:
            for member in group:
                member["path"], member["file"] = display_name(member["path"]), display_name(member["file"])
                member["label"] = None if member["label"] is None else display_name(member["label"])
        click.echo(json.dumps(doc))
        return
    click.echo(format_groups(result))


def _index_lags_folder(index, index_dir: Path) -> str | None:  # noqa: ANN001 - retrieval.search.index.ImageIndex
    """The note when the index lags its data folder, or None: the groups are of the index, and a copy made since it
    was indexed is in none (a user expects to find it)."""
    snapshot = index.snapshot()
    return index_lag_note(snapshot.data_dir, Path(index_dir), snapshot.catalog, "these groups")


def format_groups(result) -> str:  # noqa: ANN001 - retrieval.search.duplicates.DuplicateGroups
    """The groups as a readable list: the keeper first, then the others with their distance to it."""
    from retrieval.search.duplicate_groups import byte_twin
    from retrieval.vectors.duplicates import MIN_WHITENED

    in_groups = sum(len(g) for g in result.groups)
    lines = [f"{len(result.groups)} group{'s' if len(result.groups) != 1 else ''} of near-duplicates "
             f"({in_groups} of {result.images} images); nothing was changed",
             result.threshold.describe(), *filter(None, [result.threshold.caution()]), ""]
    for n, group in enumerate(result.groups, 1):
        lines.append(f"group {n}: {len(group)} images")
        for i, m in enumerate(group):
            twin = byte_twin(group, i)
            tag = "keep " if i == 0 else ("link " if m.link_to else "same " if m.sha256 == group[0].sha256
                                          else f"{m.distance:.3f}")
            also = (f"  (another name of {terminal_name(m.link_to)}'s file)" if m.link_to else
                    f"  (byte-identical to {terminal_name(twin.path)})" if twin is not None else "")
            lines.append(f"  {tag:>6}  {m.width}x{m.height}  {terminal_name(m.path)}{also}")
    if result.groups:
        lines.append("")
        lines.append("keep: suggested keeper (largest, then oldest; a real file before a symlink); same: "
                     "byte-identical to it; link: a symlink or hard link to a file of the group (removing it frees "
                     "nothing); "
                     "a number: distance to it, between "
                     + ("vectors whitened on this collection" if result.whitened else
                        f"the raw unit vectors (fewer than {MIN_WHITENED} images: too few to learn a whitening)")
                     + " (0 to 2; not search-images' distances)")
    return "\n".join(lines).rstrip()


find_duplicates_entry = exit_without_teardown(main)

if __name__ == "__main__":   # python -m commands.find_duplicates ...: as the console script (it did nothing, exit 0)
    find_duplicates_entry()
