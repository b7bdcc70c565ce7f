"""Command line: `model-info alexnet|vgg16` prints the per-layer table (shapes, activations, memory, weights)."""
from __future__ import annotations

import json

import click

from retrieval.names import MODEL_NAMES

from commands.options import Command, UserError, command_settings, exit_without_teardown, setup_logging

# retrieval.features.model_info (torch, torchvision) is imported after the arguments are parsed.


@click.command(cls=Command, context_settings=command_settings("model-info"))
@click.argument("model", type=click.Choice(MODEL_NAMES))
@click.option("--input-size", type=click.IntRange(min=1), default=224, show_default=True,
              help="Side of the square input image, in pixels.")
@click.option("--json", "as_json", is_flag=True, help="Print the table and its totals as one JSON object on stdout.")
def main(model: str, input_size: int, as_json: bool) -> None:
    """Print MODEL's layers: output shape, activations and their fp32 memory, weights and biases per layer.

    Computed from torchvision's own module (forward hooks on a meta-device copy: no weights are
    loaded or downloaded), per image. ReLU and dropout are folded into the layer before them, as in
    the classic CS231n table; memory is activations x 4 bytes (MB = 10^6 bytes). Options can also be
    set by environment variables (MODEL_INFO_INPUT_SIZE, ...).

    Exit status: 0 done, 2 usage error (a model name other than alexnet or vgg16, an input too small for the
    network), 130 interrupted.
    """
    setup_logging(False)
    from retrieval.features.model_info import layer_table

    try:
        table = layer_table(model, input_size)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(table.to_json()))
    else:
        click.echo(format_table(table))


def human_bytes(n: int) -> str:
    """Decimal units, as the classic table: 602112 -> '602.1 KB'."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def format_table(t) -> str:  # noqa: ANN001 - retrieval.features.model_info.LayerTable
    """The layer table as aligned text, then the totals."""
    from retrieval.features.model_info import BYTES_PER_VALUE

    head = f"{'layer':<8} {'type':<10} {'module':<13} {'output':<14} {'activations':>12} {'memory':>9} " \
           f"{'weights':>12} {'biases':>7}"
    lines = [f"{t.model} at {t.input_size}x{t.input_size}, per image (memory = activations x {BYTES_PER_VALUE} bytes, "
             "fp32; ReLU and dropout folded into their layer)", head, "-" * len(head)]
    for r in t.rows:
        lines.append(f"{r.name:<8} {r.kind:<10} {r.module or '-':<13} {r.shape_text:<14} {r.activations:>12,} "
                     f"{human_bytes(r.memory_bytes):>9} {r.weights:>12,} {r.biases:>7,}")
    lines.append("-" * len(head))
    lines.append(f"{'total':<8} {'':<10} {'':<13} {'':<14} {t.activations:>12,} {human_bytes(t.forward_bytes):>9} "
                 f"{t.weights:>12,} {t.biases:>7,}")
    lines += ["",
              f"parameters: {t.params:,} ({t.weights:,} weights + {t.biases:,} biases), "
              f"{human_bytes(t.param_bytes)} at fp32",
              f"activations: {t.activations:,} values per image, the input included",
              f"forward memory per image: {human_bytes(t.forward_bytes)} at fp32; "
              f"about twice that, {human_bytes(t.backward_bytes)}, with a backward pass (gradients)"]
    return "\n".join(lines)


model_info_entry = exit_without_teardown(main)

if __name__ == "__main__":   # python -m commands.model_info ...: as the console script (it did nothing, exit 0)
    model_info_entry()
