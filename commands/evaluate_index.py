"""Command line: `evaluate-index` measures how well an index's stored features separate its labelled classes."""
from __future__ import annotations

import json
from pathlib import Path

import click

from retrieval.features.weights import WeightsChoice
from retrieval.names import DEFAULT_KS
from retrieval.quality import held_out_words
from retrieval.system import terminal_name

from commands.options import (Command, PathArg, UserError, catalog_error, command_settings, db_url_option, exit_without_teardown,
                              index_dir_option, index_lag_note, open_index, querying, setup_logging)

# retrieval.learning.evaluation (numpy, the catalog, scikit-learn) is imported after the arguments are parsed.

MAX_MATRIX_CLASSES = 20   # larger confusion matrices are only in --json


def parse_ks(_ctx: click.Context | None, _param: click.Parameter | None, value: str) -> list[int]:
    """-k's callback: "1,5,10" -> [1, 5, 10] (sorted, unique); raises click.BadParameter (during parsing, so a value
    from EVALUATE_INDEX_K is named as the variable's)."""
    try:
        ks = sorted({int(part) for part in value.split(",") if part.strip()})
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of whole numbers, e.g. 1,5,10") from None
    if not ks or ks[0] < 1:
        raise click.BadParameter("give one or more numbers of neighbours, each at least 1")
    return ks


@click.command(cls=Command, context_settings=command_settings("evaluate-index"))
@index_dir_option
@db_url_option
@click.option("-k", "ks", default=",".join(map(str, DEFAULT_KS)), show_default=True, metavar="K[,K...]", callback=parse_ks,
              help="Numbers of neighbours for precision@k and the kNN vote.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed of the linear probe's train/test split, and of the images --copies draws (with seed + 1).")
@click.option("--compare", "compare_dir", type=PathArg(file_okay=False, path_type=Path, resolve_path=True),
              default=None, metavar="INDEX_DIR",
              help="A second index of the same labelled images (e.g. made with fine-tuned weights): both are evaluated "
                   "on the images they share and shown side by side.")
@click.option("--include-training-images", is_flag=True,
              help="Also evaluate on the images the network was fine-tuned on (left out by default: they flatter "
                   "it); the report says so.")
@click.option("--copies", type=click.IntRange(min=1), default=None, metavar="N",
              help="Label-free instead: make edited copies (every edit) of N images of the collection, search them "
                   "and report how often the original comes first (recall@1, @5) and the duplicate F1 of "
                   "find-duplicates' default threshold. Needs no labels.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the network runs for --copies.")
@click.option("--json", "as_json", is_flag=True, help="Print every number as one JSON object on stdout.")
@click.option("-v", "--verbose", is_flag=True, help="Log what is being done.")
def main(index_dir: Path, db_url: str | None, ks: str, seed: int, compare_dir: Path | None,
         include_training_images: bool, copies: int | None, device: str, as_json: bool, verbose: bool) -> None:
    """Evaluate the features of an index on its labelled images, from the stored vectors (no forward pass).

    Images are labelled by their class folder (DATA_DIR/<class>/...); unlabelled ones are left out.
    An index made with fine-tune's weights knows the images they were trained on (by content hash):
    those are left out of the queries (they stay in the searched collection and train the linear
    probe), and the report says how many; --include-training-images evaluates them too, labelled.
    Reports leave-one-out retrieval (precision@k, mAP over the whole ranking; relevant = same
    label), leave-one-out k-nearest-neighbour classification (majority vote, ties to the closer
    group), a linear probe (logistic regression on a stratified, seeded train/test split),
    per-class numbers, confusion matrices and the chance levels to compare with.

    With --compare B, both indexes are evaluated on the labelled images they share (same path relative
    to each index's data folder, same label, same content hash), with the same queries (neither
    network's training images) and the same probe split, and the numbers are shown side by side;
    --json then gives {"a": ..., "b": ..., "matched": ...}.

    Options can also be set by environment variables (EVALUATE_INDEX_K, ...; see docs/configuration.md).

    With --copies N, no labels are needed: N images of the collection are copied with the eight edits of a
    copy (crop, flip, JPEG 30, brightness, downscale, 7-degree rotation, greyscale, blur), the copies go
    through the index's network and are searched, and recall@1/@5 (the original found) and find-duplicates'
    pair precision/recall/F1 at its default threshold are reported (see docs/duplicates.md).

    Exit status: 0 done, 2 no index or not evaluable (fewer than two labels, a label with one image,
    no labelled image shared by the two indexes, no image left that the network was not trained on, a damaged
    catalog), 1 a full disk (one line: what to free), 130 interrupted.
    """
    setup_logging(verbose)
    k_list = ks
    if copies is not None:
        if compare_dir is not None:
            raise UserError("--copies measures one index: leave out --compare")
        result = copies_result(index_dir, db_url, copies, seed, device)
        click.echo(json.dumps(result) if as_json else format_copies(result))
        return
    from sqlalchemy.exc import SQLAlchemyError

    from retrieval.catalog import CatalogUnavailable, db_error_reason
    from retrieval.learning.evaluation import EvaluationError, compare_indexes, evaluate_index

    try:
        if compare_dir is None:
            result = evaluate_index(index_dir, k_list, seed=seed, db_url=db_url,
                                    include_training_images=include_training_images)
        else:
            result = compare_indexes(index_dir, compare_dir, k_list, seed=seed, db_url=db_url,
                                     include_training_images=include_training_images)
    except (FileNotFoundError, EvaluationError, CatalogUnavailable) as exc:
        raise UserError(str(exc)) from exc
    except SQLAlchemyError as exc:   # a damaged catalog or a full disk: one line, as from the other commands
        if compare_dir is None:
            if (problem := catalog_error(exc, index_dir, db_url)):
                raise problem from None
            raise
        raise UserError(f"the catalog of {index_dir} or of {compare_dir} cannot be read ({db_error_reason(exc, db_url)}):"
                        " index-images DATA --index-dir DIR --check says which, and what to do") from None
    for folder, url in [(index_dir, db_url)] + ([(compare_dir, None)] if compare_dir is not None else []):
        if (lagging := _lag_note(folder, url)) is not None:
            click.echo(f"note: {folder.name}: {lagging}" if compare_dir is not None else f"note: {lagging}", err=True)
    if as_json:
        click.echo(json.dumps(result))
    elif compare_dir is None:
        click.echo(format_report(result))
    else:
        click.echo(format_comparison(result))


def _lag_note(index_dir: Path, db_url: str | None) -> str | None:
    """The note when the index lags its data folder (images added since it was indexed are in no number), or None,
    also when it cannot be told (the numbers are printed whatever the folder's state)."""
    import logging

    from retrieval.catalog import Catalog

    try:
        catalog = Catalog(index_dir, url=db_url)
        try:
            settings = catalog.settings()
            return None if settings is None else index_lag_note(Path(settings.data_dir), index_dir, catalog,
                                                                "these numbers")
        finally:
            catalog.close()
    except Exception as exc:  # noqa: BLE001 - a note, never a failure after the evaluation succeeded
        logging.getLogger(__name__).debug("could not compare %s with its data folder: %s", index_dir, exc)
        return None


def copies_result(index_dir: Path, db_url: str | None, copies: int, seed: int, device: str) -> dict:
    """evaluate_copies on the index (its own network), with the index described; raises UserError."""
    from retrieval.search.duplicates import DuplicatesError, evaluate_copies
    from retrieval.search.index import weights_label

    with querying(open_index(index_dir, db_url, device), index_dir, db_url) as index:
        try:
            # seed 0 picks the threshold's calibration images
            result = evaluate_copies(index, copies, seed=seed + 1, progress=True)
        except DuplicatesError as exc:
            raise UserError(str(exc)) from exc
        s = index.settings
        result["index"] = {"dir": str(index_dir), "model": s.model, "layer": s.layer, "views": s.views,
                           "input_norm": s.input_norm, "regions": s.regions, "weights": s.weights,
                           "weights_label": weights_label(s), "seed": s.seed, "dim": s.dim, "normalize": s.normalize,
                           "images": len(index)}
    return result


def format_copies(r: dict) -> str:
    """The evaluate_copies result as text: recall of the copies (per edit) and the duplicate scores."""
    d, t = r["duplicates"], r["duplicates"]["threshold"]
    lines = [f"index {r['index']['dir']}: {network_text(r['index'])}, {r['index']['images']} images",
             f"{r['copies']} edited copies of {r['images']} images ({', '.join(r['edits'])}), searched in the index"
             + (f" ({r['asked']} asked: the other {r['calibration_images']} images calibrate find-duplicates' threshold)"
                if r.get("asked", 0) > r["images"] and r.get("calibration_images") else ""),
             "",
             f"{'':<24}{'value':>7}{'chance':>9}",
             f"  {'recall@1':<22}{r['recall_at_1']:>7.3f}{r['chance_at_1']:>9.3f}",
             f"  {'recall@5':<22}{r['recall_at_5']:>7.3f}{r['chance_at_5']:>9.3f}",
             "recall@1 by edit"]
    lines += [f"  {edit:<22}{value:>7.3f}" for edit, value in r["per_edit"].items()]
    lines += [f"grouped with the collection at find-duplicates' {t['source']} threshold {t['value']:.3f}",
              f"  {'within it of original':<22}{d['within_threshold']:>7.3f}   share of the copies "
              "(find-duplicates' \"lie within it\", on other images)",
              f"  {'pair precision':<22}{d['precision']:>7.3f}   of the pairs with a copy in the groups, "
              "those of one original",
              f"  {'pair recall':<22}{d['recall']:>7.3f}   of the pairs of one original (copies among themselves "
              "too), those in one group",
              f"  {'pair F1':<22}{d['f1']:>7.3f}",
              "  pair recall is below the share within the threshold: a group holds only images all within it of "
              "one another, and two copies are further apart than each is from its original"]
    if r.get("also_calibrated"):
        from retrieval.search.duplicates import CALIBRATION_IMAGES

        lines.append(f"note: {r['also_calibrated']} of the {r['images']} images also calibrated the threshold (the "
                     f"collection has too few images to keep them apart), so \"within it\" and the pair scores flatter "
                     f"it; with {CALIBRATION_IMAGES + r['asked']} images or more they are measured on others")
    return "\n".join(lines)


def network_text(ix: dict) -> str:
    """"alexnet fc7, weights random (seed 0), 4096-d, L2-normalised" for an evaluation's "index" entry, with its
    descriptor options where they are not the defaults ("flip views, own-statistics input, 5 regions per image")."""
    weights = ix.get("weights_label", ix["weights"])
    seed = f" (seed {ix['seed']})" if WeightsChoice.parse(ix["weights"]).is_random and ix.get("seed") is not None else ""
    options = [f"{ix['views']} views" if ix.get("views", "single") != "single" else "",
               "each image normalised by its own statistics" if ix.get("input_norm", "weights") != "weights" else "",
               f"{ix['regions']} regional vectors per image" if ix.get("regions") else ""]
    whitened = f", whitened to {ix['whitened_dim']}-d as searched" if ix.get("whitened_dim") else ""
    return (f"{ix['model']} {ix['layer']}{''.join(f', {o}' for o in options if o)}, weights {weights}{seed}, "
            f"{ix['dim']}-d{', L2-normalised' if ix['normalize'] else ''}{whitened}")


def format_comparison(c: dict) -> str:
    """The compare_indexes result: the two indexes' numbers side by side, each against the (shared) chance level."""
    a, b, m = c["a"], c["b"], c["matched"]
    ch, im, ks = a["chance"], a["images"], a["ks"]
    row = lambda label, va, vb, chance, extra="": (f"  {label:<30}{va:>7.3f}{vb:>9.3f}{vb - va:>+9.3f}"  # noqa: E731
                                                  f"{chance:>9.3f}{extra}")
    lines = [f"A  {a['index']['dir']}: {network_text(a['index'])}",
             f"B  {b['index']['dir']}: {network_text(b['index'])}",
             f"{m['images']} labelled images in {im['classes']} classes, the same in both (matched by {m['by']}); "
             f"left out: {m['only_a']} only in A, {m['only_b']} only in B, {m['differing']} with another label or content",
             f"evaluated on {held_out_words(c)}, the same for both",
             "",
             f"{'':<32}{'A':>7}{'B':>9}{'B - A':>9}{'chance':>9}",
             "retrieval (leave-one-out, relevant = same label)"]
    for k in ks:
        lines.append(row(f"precision@{k}", a["retrieval"]["precision_at_k"][str(k)],
                         b["retrieval"]["precision_at_k"][str(k)], ch["retrieval_precision"]))
    lines.append(row("mAP", a["retrieval"]["map"], b["retrieval"]["map"], ch["retrieval_precision"], "  (about)"))
    lines.append("nearest-neighbour classification (leave-one-out majority vote)")
    for k in ks:
        lines.append(row(f"k={k} accuracy", a["knn"]["accuracy"][str(k)], b["knn"]["accuracy"][str(k)],
                         ch["majority_class"]))
    pa, pb = a["linear_probe"], b["linear_probe"]
    if pa is not None and pb is not None:
        lines.append(f"linear probe (logistic regression, {probe_split_text(pa)}, the same split for both)")
        lines.append(row("test accuracy", pa["accuracy"], pb["accuracy"], ch["majority_class"]))
    lines.append(f"chance: retrieval {ch['retrieval_precision']:.3f} (precision of a random ranking); classification "
                 f"{ch['majority_class']:.3f} (always the largest class), {ch['uniform']:.3f} (1/{im['classes']} classes)")
    lines.append(_verdict(a, b))

    width = max(12, *(len(name) for name in a["labels"]))
    kk = str(a["knn"]["k"])
    lines += ["", f"per class (AP: average precision; kNN@{kk}: accuracy on the class's images)",
              f"{'class':<{width}}  {'images':>6}{'AP A':>8}{'AP B':>8}{'kNN A':>8}{'kNN B':>8}"]
    for name in a["per_class"]:
        ca, cb = a["per_class"][name], b["per_class"][name]
        lines.append(f"{name:<{width}}  {ca['images']:>6}{ca['average_precision']:>8.3f}{cb['average_precision']:>8.3f}"
                     f"{ca['knn_accuracy'][kk]:>8.3f}{cb['knn_accuracy'][kk]:>8.3f}")
    lines += [f"note: {n}" for n in m.get("notes", [])]
    for side, r in (("A", a), ("B", b)):
        lines += [f"note ({side}): {n}" for n in r["notes"]]
    return "\n".join(lines)


def _verdict(a: dict, b: dict) -> str:
    """One line: on how many of the measures above B is ahead (a note says when only A holds fine-tuned weights:
    B - A then reads the fine-tune's gain as a loss)."""
    pairs = [(a["retrieval"]["precision_at_k"][k], b["retrieval"]["precision_at_k"][k]) for k in a["retrieval"]["precision_at_k"]]
    pairs += [(a["retrieval"]["map"], b["retrieval"]["map"])]
    pairs += [(a["knn"]["accuracy"][k], b["knn"]["accuracy"][k]) for k in a["knn"]["accuracy"]]
    if a["linear_probe"] is not None and b["linear_probe"] is not None:
        pairs.append((a["linear_probe"]["accuracy"], b["linear_probe"]["accuracy"]))
    ahead = sum(vb - va > 0.0005 for va, vb in pairs)
    behind = sum(va - vb > 0.0005 for va, vb in pairs)
    return (f"B - A: B ahead on {ahead} of these {len(pairs)} measures, behind on {behind} "
            f"(mAP {b['retrieval']['map'] - a['retrieval']['map']:+.3f})")


def probe_split_text(probe: dict) -> str:
    """"15 train / 5 test images, seed 0", or "trained on the 19 training images, tested on the 8 held-out ones"."""
    if probe.get("split") == "held_out":
        return f"trained on the {probe['train']} training images, tested on the {probe['test']} held-out ones"
    return f"{probe['train']} train / {probe['test']} test images, seed {probe['seed']}"


def format_report(r: dict) -> str:
    """The evaluate_index result as a readable text report."""
    ix, im, ch = r["index"], r["images"], r["chance"]
    ks = r["ks"]
    row = lambda label, value, chance, extra="": f"  {label:<30}{value:>7.3f}{chance:>9.3f}{extra}"  # noqa: E731
    lines = [f"index {ix['dir']}: {network_text(ix)}",
             f"{im['labelled']} labelled images in {im['classes']} classes; {im['unlabelled']} unlabelled left out"
             + (f"; {im['single_image_labels']} label(s) of a single image left out (note below)"
                if im.get("single_image_labels") else ""),
             f"evaluated on {held_out_words(r)}",
             "",
             f"{'':<32}{'value':>7}{'chance':>9}",
             "retrieval (leave-one-out, relevant = same label)"]
    for k in ks:
        lines.append(row(f"precision@{k}", r["retrieval"]["precision_at_k"][str(k)], ch["retrieval_precision"]))
    lines.append(row("mAP", r["retrieval"]["map"], ch["retrieval_precision"], "  (about)"))
    lines.append("nearest-neighbour classification (leave-one-out majority vote)")
    for k in ks:
        lines.append(row(f"k={k} accuracy", r["knn"]["accuracy"][str(k)], ch["majority_class"]))
    probe = r["linear_probe"]
    if probe is not None:
        lines.append(f"linear probe (logistic regression, {probe_split_text(probe)})")
        lines.append(row("test accuracy", probe["accuracy"], ch["majority_class"]))
    lines.append(f"chance: retrieval {ch['retrieval_precision']:.3f} (precision of a random ranking); classification "
                 f"{ch['majority_class']:.3f} (always the largest class), {ch['uniform']:.3f} (1/{im['classes']} classes)")

    shown = {name: terminal_name(name) for name in r["labels"]}   # a class named with \u202e or \x1b: escaped here
    width = max(12, *(len(name) for name in shown.values()))
    header = f"{'class':<{width}}  {'images':>6}" + "".join(f"{'P@' + str(k):>7}" for k in ks) + \
        f"{'AP':>7}{'kNN@' + str(r['knn']['k']):>8}{'probe':>7}"
    lines += ["", "per class (P@k: retrieval precision; kNN: accuracy on the class's images; probe: on its test images)", header]
    for name in r["per_class"]:
        c = r["per_class"][name]
        probe_acc = "-" if c["probe_accuracy"] is None else f"{c['probe_accuracy']:.3f}"
        lines.append(f"{shown.get(name, terminal_name(name)):<{width}}  {c['images']:>6}" + "".join(f"{c['precision_at_k'][str(k)]:>7.3f}" for k in ks) +
                     f"{c['average_precision']:>7.3f}{c['knn_accuracy'][str(r['knn']['k'])]:>8.3f}{probe_acc:>7}")

    if len(r["labels"]) <= MAX_MATRIX_CLASSES:
        lines += ["", f"confusion matrix, kNN k={r['knn']['k']} leave-one-out (rows: true, columns: predicted; . = 0)"]
        lines += confusion_lines(r["labels"], r["knn"]["confusion"])
        if probe is not None:
            lines += ["", "confusion matrix, linear probe on its test images"]
            lines += confusion_lines(r["labels"], probe["confusion"])
    else:
        lines += ["", f"confusion matrices left out for {len(r['labels'])} classes (over {MAX_MATRIX_CLASSES}); see --json"]
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def confusion_lines(labels: list[str], matrix: list[list[int]]) -> list[str]:
    """A plain ASCII confusion matrix: numbered rows with the label names, columns headed by the same numbers."""
    labels = [terminal_name(name) for name in labels]
    width = max(len(labels[0]), *(len(name) for name in labels))
    cell = max(3, len(str(max(max(row) for row in matrix))) + 1, len(str(len(labels))) + 1)
    pad = 4 + width
    out = [" " * pad + "".join(f"{j + 1:>{cell}}" for j in range(len(labels)))]
    for i, (name, row) in enumerate(zip(labels, matrix)):
        out.append(f"{i + 1:>2} {name:<{width}} " + "".join(f"{(v if v else '.'):>{cell}}" for v in row))
    return out


evaluate_index_entry = exit_without_teardown(main)

if __name__ == "__main__":   # python -m commands.evaluate_index ...: as the console script (it did nothing, exit 0)
    evaluate_index_entry()
