"""Command line: `fine-tune DATA_DIR --out FILE` (train the network on the labelled folders; weights for index-images)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from retrieval.features.weights import WeightsChoice, weights_error_message
from retrieval.names import AUTO_TRAIN_BATCH_CAP, DEFAULT_FINE_TUNE_OBJECTIVE, FINE_TUNE_OBJECTIVES, MODEL_NAMES, MODEL_PARAMETERS
from retrieval.system import display_name, duration_words, terminal_name

from commands.options import (Command, FloatRange, DiskFull, PathArg, UserError, batch_size_value,
                              command_settings, exit_without_teardown, setup_logging)

# Nothing heavy at module level: --help and usage errors answer at once; torch is imported in the command.
TRAIN_MODES = ("head", "fc", "all")      # retrieval.learning.finetune.TRAIN_MODES, without importing torch


def _weights_value(_ctx: click.Context | None, _param: click.Parameter | None, value: str) -> str:
    """--weights' callback: imagenet, random, or a state dict file's absolute path. Raises click.BadParameter (while
    parsing: a value from FINE_TUNE_WEIGHTS is named as the variable's)."""
    choice = WeightsChoice.parse(value)
    if not choice.is_file:
        return value
    path = choice.path.expanduser().resolve()
    if not path.is_file():
        raise click.BadParameter(f"{value!r} is not 'imagenet', 'random' or a file")
    return str(path)


@click.command(cls=Command, context_settings=command_settings("fine-tune"))
@click.argument("data_dir", type=PathArg(exists=True, file_okay=False, path_type=Path, resolve_path=True))
@click.option("--model", type=click.Choice(MODEL_NAMES), default="alexnet", show_default=True, help="Backbone network.")
@click.option("--weights", default="imagenet", show_default=True, metavar="imagenet|random|PATH", callback=_weights_value,
              help="Where training starts: ImageNet weights, seeded random weights (--seed; the same network as "
                   "index-images --weights random --seed), or a state dict file.")
@click.option("--out", "out", required=True, type=PathArg(dir_okay=False, path_type=Path, resolve_path=True),
              help="Weights file to write (the epoch that retrieves best, or the starting weights when none beats them); "
                   "its history goes to <stem>.history.json next to it.")
@click.option("--train", "train", type=click.Choice(TRAIN_MODES), default="fc", show_default=True,
              help="head: the new classification layer only; fc: fc6, fc7 and the head (convolutions frozen, "
                   "their output cached); all: the whole network.")
@click.option("--objective", type=click.Choice(FINE_TUNE_OBJECTIVES), default=DEFAULT_FINE_TUNE_OBJECTIVE,
              show_default=True,
              help="What training minimises. ce: cross-entropy of the new classification layer; proxy-anchor, "
                   "norm-softmax, supcon, triplet: a metric-learning loss on the L2-normalised fc7 that the index "
                   "stores (the layer is still trained, on its own); ce+X: both.")
@click.option("--val-fraction", type=FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Share of each class held out for validation (stratified, seeded).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the split, the head, augmentation, batch order and --weights random.")
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True, help="At most this many epochs.")
@click.option("--lr", type=FloatRange(min=0, min_open=True), default=None,
              help="Initial learning rate. [default: 1e-3 for adamw, 0.01 for sgd]")
@click.option("--lr-schedule", type=click.Choice(["cosine", "step"]), default="cosine", show_default=True,
              help="Learning-rate decay: cosine to 0 over --epochs, or x0.1 every third of them.")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True,
              help="AdamW, or SGD with momentum 0.9.")
@click.option("--weight-decay", type=FloatRange(min=0), default=5e-4, show_default=True,
              help="L2 penalty on the trained weights (decoupled for adamw), against overfitting small classes.")
@click.option("--dropout", type=FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Dropout before fc6 and fc7 while training (the network's own is 0.5).")
@click.option("--patience", type=click.IntRange(min=1), default=5, show_default=True,
              help="Stop after this many epochs without better validation retrieval (kNN@10, then mAP).")
@click.option("--batch-size", default="auto", show_default=True, metavar="N|auto", callback=batch_size_value,
              help=f"Training images per step. auto: 32 on the CPU (10 with --train all, whose gradients run through the "
                   f"convolutions); on CUDA what the free memory holds (a third of it with --train all), at most "
                   f"{AUTO_TRAIN_BATCH_CAP}.")
@click.option("--cache-views", type=click.IntRange(min=1), default=4, show_default=True,
              help="Augmented views (random resized crop, flip) per training image whose convolutional output is "
                   "computed once and cached (head, fc).")
@click.option("--sanity", is_flag=True, help="Also overfit a tiny subset (2 images per class, at most 20) with "
                                             "weight decay and dropout off, and report whether the loss gets under 0.05.")
@click.option("--overwrite", is_flag=True, help="Replace --out when it exists (an index made with it then no longer "
                                                "matches its weights: index again into a new folder).")
@click.option("--keep-head", is_flag=True, help="Keep the new classification layer in the weights file.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the network trains: auto is a CUDA GPU when there is one, else the CPU.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary object on stdout.")
@click.option("-v", "--verbose", is_flag=True, help="Log details (and each skipped file).")
def main(data_dir: Path, model: str, weights: str, out: Path, train: str, objective: str, val_fraction: float,  # noqa: PLR0913
         seed: int, epochs: int, lr: float | None, lr_schedule: str, optimizer: str, weight_decay: float, dropout: float,
         patience: int,
         batch_size: str, cache_views: int, sanity: bool, overwrite: bool, keep_head: bool, device: str, as_json: bool,
         verbose: bool) -> None:
    """Fine-tune the network on the classes of DATA_DIR (DATA_DIR/<class>/<image>) and write its weights.

    fc7, the layer the index stores, is trained for nearest-neighbour search (--objective), with a new
    classification layer for the classes, on a stratified train/validation split. Each epoch the
    validation images' fc7 is searched among the training images' (L2-normalised, as indexed); the
    epoch that retrieves best (kNN@10 accuracy, then mAP) is kept in --out, a state dict that
    `index-images --weights FILE` uses (same --model). The starting weights are epoch 0: when no epoch
    beats them, --out holds them unchanged and the summary says so. Before training the initial loss
    is shown against chance, ln(classes). Ctrl-C stops training and keeps the best checkpoint so far.

    Exit status: 0 done, 2 usage or data error (--out in a read-only folder or one without room for the weights
    included, told before training), 130 interrupted, 1 unexpected failure.
    """
    setup_logging(verbose, quiet=as_json)
    requested_batch = batch_size
    _check_out(out, model, overwrite)   # before any training: a folder that cannot take the weights is told at once

    from retrieval.features.backbones import DeviceUnavailable, WeightsUnavailable, resolve_device
    from retrieval.learning.finetune import FineTuneConfig, FineTuneError, batch_sizes, fine_tune

    try:
        dev = resolve_device(device)
    except DeviceUnavailable as exc:
        raise UserError(str(exc)) from exc
    train_batch, cache_batch = batch_sizes(requested_batch, model, train, dev)
    try:
        cfg = FineTuneConfig(data_dir=data_dir, out=out, model=model, weights=weights, seed=seed, train=train,
                             objective=objective, val_fraction=val_fraction, epochs=epochs, lr=lr, optimizer=optimizer,
                             weight_decay=weight_decay, lr_schedule=lr_schedule, patience=patience,
                             batch_size=train_batch, cache_batch_size=cache_batch, cache_views=cache_views,
                             dropout=dropout, sanity=sanity, keep_head=keep_head, device=str(dev), overwrite=overwrite,
                             progress=not as_json and sys.stderr.isatty())   # bars on a terminal; a line per epoch always
    except FineTuneError as exc:
        raise UserError(str(exc)) from exc
    echo = (lambda _e, _f: None) if as_json else _printer(verbose, cached=train != "all", epochs=epochs)
    if not as_json:
        click.echo(f"fine-tuning {model} ({train}, {objective}, {cfg.optimizer} lr {cfg.lr:g}, dropout {dropout:g}) "
                   f"from {weights} weights on {dev}, batch {train_batch}", err=True)
    try:
        result = fine_tune(cfg, report=echo)
    except FineTuneError as exc:
        raise UserError(str(exc)) from exc
    except WeightsUnavailable as exc:
        raise UserError(weights_error_message(exc)) from exc
    except KeyboardInterrupt:
        click.echo("\ninterrupted before the first epoch ended: nothing was saved.", err=True)
        sys.exit(130)
    except Exception as exc:
        from retrieval.files import FULL, disk_trouble, no_space_message

        if disk_trouble(exc) != FULL:
            raise
        # the disk filled after the check before training (another writer): torch.save's "unexpected pos" traceback
        needed = (MODEL_PARAMETERS.get(model, 0) * 4 + 2**20) / 2**20
        raise DiskFull(no_space_message(out.parent).replace("; nothing was lost", "") + f": the weights need about "
                       f"{needed:.0f} MB ({out} is as it was before this write: files are replaced whole or not at "
                       "all)") from None
    summary = _summary(result, _draw_plots(result.history_path) if result.weights_path else [])
    if as_json:
        click.echo(json.dumps(summary))
    else:
        _print_summary(summary)
        h = result.history
        if keep_head and result.weights_path and h["best_val_accuracy"] <= 1 / len(h["classes"]) + 1e-9:
            # the epoch is chosen for retrieval: on classes fc7 already separates that can be epoch 0 or 1, whose head
            # has not learnt yet
            click.echo(f"note: the kept head (epoch {h['best_epoch']}) classifies the validation images at chance "
                       f"({h['best_val_accuracy']:.3f}, {len(h['classes'])} classes): the epoch was chosen for "
                       "retrieval, not for its head; do not use that head as a classifier", err=True)
    if result.stopped == "interrupted":
        r = summary["retrieval"]
        click.echo(f"interrupted: kept the best checkpoint (epoch {summary['best_epoch']}, validation kNN@{r['k']} "
                   f"{r['after']['knn_accuracy']:.3f}) in {result.weights_path}; history in {result.history_path}",
                   err=True)
        sys.exit(130)


def _check_out(out: Path, model: str, overwrite: bool = False) -> None:
    """--out does not exist yet (unless overwrite), and its folder (or the nearest one above it that exists: the rest
    is made) can be written and has room for the weights, about the network's state dict, and its history. Raises
    UserError."""
    from retrieval.files import device_words, free_bytes, is_read_only

    from retrieval.learning.history import out_taken

    if not overwrite and (taken := out_taken(out)) is not None:
        raise UserError(f"--out {taken}. Choose another --out, or pass --overwrite to replace it")
    folder = out.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is not a folder")
    if is_read_only(existing):
        raise UserError(f"--out {out}: the folder {existing} is read-only ({device_words(existing)} is mounted "
                        "read-only); choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: the folder {existing} is read-only for this user; choose another --out")
    needed = MODEL_PARAMETERS.get(model, 0) * 4 + 2**20   # the state dict (the new head is small), the history
    free = free_bytes(existing)
    if free is not None and free < needed:
        raise UserError(f"--out {out}: no space for the weights on {device_words(existing)}: they need about "
                        f"{needed / 2**20:.0f} MB, {free / 2**20:.1f} MB free; free "
                        f"{(needed - free) / 2**20:.0f} MB or choose another --out")


DIVERGED = 10   # a training loss this many times chance's ln(C) after an epoch: the learning rate is too high


def _printer(verbose: bool, cached: bool = True, epochs: int | None = None):  # noqa: ANN202 - the report callback
    chance: list[float] = []   # ln(C), from the initial event
    warned: list[bool] = []
    took: list[float] = []     # each epoch's seconds, for the time left

    def report(event: str, facts: dict) -> None:
        if event == "skipped":
            click.echo(f"  skipped {terminal_name(facts['path'])}: {facts['reason']}", err=True)
        elif event == "initial":
            chance.append(facts["chance_loss"])
            ratio = facts["initial_loss"] / facts["chance_loss"]
            verdict = "as expected" if abs(ratio - 1) <= 0.1 else "off: check the data, labels and the head"
            click.echo(f"initial loss {facts['initial_loss']:.4f}, chance ln(C) = {facts['chance_loss']:.4f} "
                       f"(x{ratio:.2f}, {verdict})"
                       + (f"; features cached in {facts['cache_seconds']:.1f} s" if cached else ""), err=True)
        elif event == "sanity":
            click.echo(f"sanity: overfitting {facts['subset_size']} images (no weight decay, no dropout): training loss "
                       f"{facts['final_train_loss']:.4f} after {facts['steps']} steps: "
                       f"{'passed' if facts['passed'] else 'FAILED (it should get under 0.05: check the learning rate)'}",
                       err=True)
        elif event == "unvalidated":
            names = ", ".join(repr(terminal_name(c)) for c in facts["classes"][:10]) + \
                (" ..." if len(facts["classes"]) > 10 else "")
            click.echo(f"note: {len(facts['classes'])} class(es) with no validation image (one image, or copies of "
                       f"one): trained on, but never checked, and their search not measured: {names}", err=True)
        elif event == "before":
            click.echo(f"epoch   0  (the starting weights)  val kNN@{facts['k']} {facts['knn_accuracy']:.3f}  val mAP "
                       f"{facts['map']:.3f}  ({facts['val_images']} validation images searched among "
                       f"{facts['train_images']} training images, fc7 L2-normalised)", err=True)
        elif event == "epoch":
            took.append(facts["seconds"])
            remaining = (epochs or 0) - facts["epoch"]   # early stopping (--patience) may end it sooner
            left = f"  (at most ~{duration_words(remaining * sum(took) / len(took))} left)" if remaining > 0 else ""
            objective = ("" if facts["train_objective_loss"] == facts["train_loss"]
                         else f" (objective {facts['train_objective_loss']:.4f})")   # ce + a metric loss: its sum
            click.echo(f"epoch {facts['epoch']:>3}  train loss {facts['train_loss']:.4f}{objective}  train acc "
                       f"{facts['train_accuracy']:.3f}  val loss {facts['val_loss']:.4f}  val acc {facts['val_accuracy']:.3f}"
                       f"  val kNN {facts['val_knn_accuracy']:.3f}  val mAP {facts['val_map']:.3f}  lr {facts['lr']:.2e}"
                       f"  {facts['seconds']:.1f} s" + left, err=True)
            loss = facts["train_loss"]
            if chance and not warned and not loss < DIVERGED * chance[0]:   # NaN too
                warned.append(True)   # --lr 0.1 reached a training loss of 138,017 without a word
                click.echo(f"note: the training loss ({loss:.4g}) is far above chance's ln(C) = {chance[0]:.3f}: "
                           "training is diverging; the kept epoch is still the best by validation retrieval, but try "
                           "a lower --lr", err=True)
        elif event == "saved" and verbose:
            click.echo(f"  best so far: saved {facts['path']}", err=True)
    return report


def _draw_plots(history_path: Path) -> list[Path]:
    """The loss, accuracy (and, with --train all, filter) charts next to the history; a failure is only a warning."""
    from retrieval.learning.history import HistoryError
    from retrieval.reports.training import write_training_plots

    try:
        return write_training_plots(history_path)
    except (HistoryError, OSError) as exc:
        click.echo(f"warning: could not draw the training charts: {exc}", err=True)
        return []


def _summary(result, plots: list[Path]) -> dict:  # noqa: ANN001 - retrieval.learning.finetune.FineTuneResult
    h = result.history
    return {"weights": str(result.weights_path) if result.weights_path else None, "history": str(result.history_path),
            "plots": [str(p) for p in plots],
            "stopped": h["stopped"], "best_epoch": h["best_epoch"], "best_val_accuracy": h["best_val_accuracy"],
            "retrieval": {"k": h["retrieval_k"], "before": h["initial_retrieval"], "after": h["best_retrieval"],
                          "improved": h["improved"], "selection": h["selection"]},
            "objective": h["objective"], "train": h["train"],
            "epochs_run": len(h["epochs_run"]), "classes": h["classes"], "train_images": len(h["split"]["train"]),
            "val_images": len(h["split"]["val"]), "initial_loss": h["initial_loss"], "chance_loss": h["chance_loss"],
            "sanity": h["sanity"], "skipped": [{"path": display_name(p), "reason": r} for p, r in sorted(result.skipped.items())],
            "unlabelled": result.unlabelled, "cache_seconds": result.cache_seconds, "seconds": h["seconds"],
            "batch_size": h.get("batch_size"), "patience": h.get("patience")}


FEW_STEPS = 8   # optimiser steps per epoch under which --patience epochs are too few steps to tell
FEW_VALIDATION = 50   # validation images under which a kNN gain is a handful of images: told so


def _few_steps(s: dict) -> str | None:
    """The advice for a small collection: with batches of 32, 53 training images make 2 steps an epoch, and the
    default patience stops after 10 steps (measured: --batch-size 8 --patience 20 gave kNN@10 0.750 -> 0.833)."""
    batch, patience = s.get("batch_size"), s.get("patience")
    if not batch or not patience:
        return None
    steps = -(-s["train_images"] // batch)
    if steps >= FEW_STEPS:
        return None
    return (f"With {s['train_images']} training images in batches of {batch}, an epoch is {steps} step(s), and "
            f"--patience {patience} stopped it after {steps * patience}: try --batch-size 8 --patience 20, or more "
            "images per class.")


def _small_gain(s: dict) -> str | None:
    """A caution for a gain measured on few validation images, or one whose mAP fell: a review saw "kNN@10 0.579 ->
    0.737, mAP 0.580 -> 0.572" on 19 validation images (3 of them), and on pictures it never saw precision@1 rose by
    0.055 whitened and fell by 0.055 raw."""
    r = s["retrieval"]
    before, after = r["before"], r["after"]
    fell = after["map"] < before["map"]
    if s["val_images"] >= FEW_VALIDATION and not fell:
        return None
    gained = round((after["knn_accuracy"] - before["knn_accuracy"]) * s["val_images"])
    return (f"measured on {s['val_images']} validation images, where kNN@{r['k']} found {gained} more right"
            + (f" and mAP fell ({before['map']:.3f} -> {after['map']:.3f})" if fell else "")
            + ": a small gain to go by. Check it on pictures it never saw: index a folder of them with both weights "
              "and compare (evaluate-index --index-dir A --compare B; docs/fine-tuning.md)")


def _print_summary(s: dict) -> None:
    if s["weights"] is None:
        click.echo("no epoch finished: nothing saved")
        return
    r = s["retrieval"]
    before, after = r["before"], r["after"]
    click.echo(f"{s['stopped'].replace('_', ' ')} after {s['epochs_run']} epoch(s) in {s['seconds']:.1f} s "
               f"({s['cache_seconds']:.1f} s caching), {len(s['classes'])} classes, {s['train_images']} train / "
               f"{s['val_images']} validation images")
    click.echo(f"retrieval of the validation images (fc7, searched among the training images): kNN@{r['k']} "
               f"{before['knn_accuracy']:.3f} -> {after['knn_accuracy']:.3f}, mAP {before['map']:.3f} -> "
               f"{after['map']:.3f} (before training -> epoch {s['best_epoch']}, kept)")
    if r["improved"]:
        click.echo(f"classification layer at that epoch: validation accuracy {s['best_val_accuracy']:.3f} "
                   f"(chance {1 / len(s['classes']):.3f})")
        click.echo(f"weights: {s['weights']}  (index-images DATA --weights {s['weights']} --index-dir NEW_INDEX)")
        if (caution := _small_gain(s)) is not None:
            click.echo(f"note: {caution}")
    elif s["stopped"] == "interrupted":
        click.echo(f"NOT IMPROVED before it was stopped: no epoch so far retrieved better than the starting weights, "
                   f"which {s['weights']} holds; run it again with --overwrite to train longer.")
    else:
        click.echo(f"NOT IMPROVED: no epoch retrieved better than the starting weights (kNN@{r['k']} "
                   f"{before['knn_accuracy']:.3f}, mAP {before['map']:.3f}), so {s['weights']} holds the starting "
                   "weights unchanged: an index built with it is the same as one built from them. "
                   + ("--train head trains only the classification layer, which the index does not use: train fc."
                      if s["train"] == "head" else
                      "The starting weights already find the right class for every validation image: these classes "
                      "need no fine-tuning (a harder collection may)." if before["knn_accuracy"] >= 1.0 else
                      _few_steps(s) or "Try more images per class, more --epochs or another --lr."))
    click.echo(f"history: {s['history']}")
    if s["plots"]:
        click.echo(f"charts: {', '.join(s['plots'])}  (and /training in serve-images)")
    if s["unlabelled"]:
        click.echo(f"{s['unlabelled']} unlabelled image(s) left out (outside the class folders)")
    if s["skipped"]:
        click.echo(f"skipped {len(s['skipped'])} file(s):")
        for item in s["skipped"]:
            click.echo(f"  {terminal_name(item['path'])}: {item['reason']}")


fine_tune_entry = exit_without_teardown(main)

if __name__ == "__main__":   # (main, not the entry: a test kills this run with an unhandled hang-up)
    main()
