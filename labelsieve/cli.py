"""Command line: a thin layer over :mod:`labelsieve.api` (``main(argv)`` is callable from tests).

    labelsieve audit ROOT [LABELS.csv] [--method NAME] [--model NAME_OR_PATH] [--pretrained TAG_OR_PATH] -o OUT
    labelsieve audit 'shards/{000000..000099}.tar' | data.parquet | hf_saved_folder/ [LABELS.csv] -o OUT
    labelsieve audit --pred-probs PROBS.npy LABELS.csv [IMAGES] -o OUT
    labelsieve apply OUT/audit.csv -o labels.clean.csv [--reviews reviews.csv] [--from-labelstudio EXPORT.json]
    labelsieve export OUT/audit.csv --to labelstudio|fiftyone
    labelsieve train --clean OUT/audit.csv --backbone NAME [-o MODEL_DIR]
    labelsieve predict MODEL_DIR IMAGES -o OUT_DIR
    labelsieve noise LABELS.csv --kind symmetric --rate 0.2 -o noisy.csv
    labelsieve evaluate OUT/audit.csv --truth noisy.csv
    labelsieve demo

Every command imports :mod:`labelsieve.api` (and with it torch, open_clip and timm) only when it runs,
through :func:`_api`: that import takes several seconds, and ``labelsieve --help`` or a typo in an
option should not wait for it (docs/architecture.md gives the measured times).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from labelsieve import __version__
from labelsieve.core.defaults import (
    DEFAULT_BACKBONE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_CHECK_SIZE,
    DEFAULT_DUPLICATE_THRESHOLD,
    DEFAULT_ENSEMBLE_SUMMARY,
    DEFAULT_METHOD,
    DEFAULT_MODEL,
)
from labelsieve.core.errors import NO_SPACE, LabelsieveError, no_space_error
from labelsieve.core.methodspec import METHOD_SYNTAX

#: What Ctrl-C prints: what is kept, and how to go on.
INTERRUPTED = ("interrupted: finished work is kept (extracted features in the cache, training checkpoints after "
               "each epoch; an audit's files are replaced only when all are written); run the same command again "
               "to resume.")


def _api() -> Any:
    """:mod:`labelsieve.api`, imported on first use (see the module docstring)."""
    import labelsieve.api

    return labelsieve.api


def _parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as JSON when they can be (numbers, true/false, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--param")
        k, v = item.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip().replace("-", "_")] = v
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="labelsieve")
def cli() -> None:
    """Find wrong labels in image classification datasets."""


@cli.command()
@click.argument("root", type=click.Path(path_type=Path))
@click.argument("labels", required=False, type=click.Path(path_type=Path))
@click.option("--method", "-m", default=DEFAULT_METHOD, show_default=True,
              help=f"Detector: {METHOD_SYNTAX}, e.g. 'turn(finetune=false),knn(k=10)' (see `labelsieve detectors`). "
                   f"The default, '{DEFAULT_METHOD}', stacks {DEFAULT_ENSEMBLE_SUMMARY}; `labelsieve detectors --show "
                   f"{DEFAULT_METHOD}` prints its members' settings.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="open_clip architecture, local open_clip model folder, or timm model name.")
@click.option("--pretrained", default=None,
              help="Weights: a tag (open_clip 'openai', timm 'a1_in1k') or a local file; default the model's own "
                   "default weights (openai for ViT-B-16); 'none' for random initialisation.")
@click.option("--out", "-o", "out_dir", default="audit", show_default=True, type=click.Path(path_type=Path))
@click.option("--classnames", type=click.Path(path_type=Path), help="CSV 'label,text': what the model reads.")
@click.option("--path-column", default="path", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE",
              help="Detector parameter (repeatable); for an ensemble its own (combine, weights, trusted_weight): a "
                   "member's go in --method, NAME(KEY=VALUE, ...).")
@click.option("--peft", help="deft: image-tower tuning (auto, vpt_deep, vpt_shallow, lora, adaptformer, bitfit, "
                             "none, feature_adapter).")
@click.option("--epochs", type=int, help="Detector training epochs (deft, turn, codivide).")
@click.option("--consistency", is_flag=True,
              help="deft: the authors' real-world-noise variant (given label must also be the class of highest "
                   "p_clean; SCE warm-up of 5 epochs).")
@click.option("--frozen/--no-frozen", default=None,
              help="codivide: --frozen for text-side prompts on cached image features, --no-frozen for image-level "
                   "MaPLe prompts through a ViT image tower (AVL-Prompter's path); default: image-level on a ViT with "
                   "a GPU, else frozen.")
@click.option("--no-finetune", is_flag=True, help="turn: linear probe and one selection only.")
@click.option("--threshold", type=float, help="Override the decision threshold on p_clean.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", help="cpu, cuda, cuda:1 … (default: CUDA if available).")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Feature cache (default ~/.cache/labelsieve).")
@click.option("--batch-size", default=DEFAULT_BATCH_SIZE, show_default=True, help="Feature-extraction batch size.")
@click.option("--workers", type=int, help="Image-decoding worker processes.")
@click.option("--no-html", is_flag=True, help="Do not write audit.html.")
@click.option("--xlsx", is_flag=True, help="Also write audit.xlsx for Excel/LibreOffice: header frozen, filters on, "
                                          "flagged rows first; 'labelsieve apply' reads it back.")
@click.option("--duplicate-threshold", type=click.FloatRange(0.0, 1.0, min_open=True),
              default=DEFAULT_DUPLICATE_THRESHOLD, show_default=True,
              help="Near-duplicates: thumbnail correlation at which two images count as the same picture.")
@click.option("--no-near-duplicates", is_flag=True, help="Skip the near-duplicate search.")
@click.option("--reviewed", multiple=True, type=click.Path(path_type=Path),
              help="A reviewed audit.csv or a reviews CSV from audit.html (repeatable): its decisions are trusted "
                   "labels for the detector and are kept in the new audit's review column.")
@click.option("--check-size", type=click.IntRange(min=0), default=DEFAULT_CHECK_SIZE, show_default=True,
              help="Rows in the check sample (column 'check', offered first on the page): review them to get the "
                   "share of wrong labels with an interval that holds whatever the model; 0 for none.")
@click.option("--features", "features", type=click.Path(path_type=Path),
              help="Audit features computed elsewhere: a .npy array (n, d), row i = line i of the labels CSV, "
                   "given as ROOT (e.g. 'labelsieve audit --features feats.npy labels.csv'). No image is read; "
                   "default method turn (its probe), or the default ensemble with --model.")
@click.option("--pred-probs", "pred_probs", type=click.Path(path_type=Path),
              help="Audit your own model's out-of-sample predicted probabilities: a .npy array (n, C), row i = data "
                   "row i of the labels CSV given as ROOT, columns the classes in sorted order, rows summing to 1 "
                   "(e.g. 'labelsieve audit --pred-probs probs.npy labels.csv [IMAGES]'). Confident learning decides; "
                   "thumbnails when IMAGES is given.")
@click.option("--image-column", default="image", show_default=True,
              help="Parquet / Hugging Face datasets: the column of image bytes (--label-column names the labels).")
@click.option("--normalize-labels", is_flag=True,
              help="Merge labels that differ only by Unicode form (NFC/NFD), case or surrounding spaces into their "
                   "most frequent spelling (without it they are separate classes, with a warning).")
@click.option("--no-progress", is_flag=True)
@click.option("--force", is_flag=True,
              help="Replace an OUT/audit.csv that holds review decisions (a timestamped copy is kept beside it).")
@click.pass_context
def audit(cctx: click.Context, root: Path, labels: Path | None, method: str, model: str, pretrained: str, out_dir: Path,
          classnames: Path | None, path_column: str, label_column: str, params: tuple[str, ...], peft: str | None,
          epochs: int | None, consistency: bool, frozen: bool | None, no_finetune: bool, threshold: float | None,
          seed: int, device: str | None, cache_dir: Path | None, batch_size: int, workers: int | None,
          no_html: bool, xlsx: bool, duplicate_threshold: float, no_near_duplicates: bool,
          reviewed: tuple[Path, ...], check_size: int, features: Path | None, pred_probs: Path | None,
          image_column: str, normalize_labels: bool, no_progress: bool, force: bool) -> None:
    """Audit the labels of the images under ROOT: an ImageFolder tree, or a folder with a LABELS csv, or images in
    WebDataset shards (a .tar, a folder of them, 'shards/{000000..000099}.tar'), Parquet files or a Hugging Face
    save_to_disk folder (labels from them, or from LABELS keyed by sample name or KEY). With --features or
    --pred-probs, of the rows of the labels CSV given as ROOT."""
    p = _parse_params(params)
    shortcuts = {"peft": peft, "epochs": epochs, "consistency": consistency or None, "frozen": frozen,
                 "finetune": False if no_finetune else None}
    p.update({k: v for k, v in shortcuts.items() if v is not None})
    if pred_probs is not None:
        if features is not None or reviewed:
            raise click.UsageError("--pred-probs takes the labels CSV and, optionally, the images: labelsieve audit "
                                   "--pred-probs PROBS.npy LABELS.csv [IMAGES]; not with --features or --reviewed")
        _api().audit_pred_probs(pred_probs, root, labels, out_dir=out_dir, classnames=classnames,
                                path_column=path_column, label_column=label_column, image_column=image_column,
                                threshold=threshold, cache_dir=cache_dir, html=not no_html, xlsx=xlsx,
                                progress=not no_progress, force=force)
        return
    if features is not None:
        if labels is not None or reviewed:
            raise click.UsageError("with --features give one labels CSV (labelsieve audit --features FEATS.npy "
                                   "LABELS.csv); --reviewed needs images")
        given = {name: cctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT
                 for name in ("method", "model")}
        _api().audit_features(features, root, method=method if given["method"] else None, params=p,
                              model=model if given["model"] else None, pretrained=pretrained, out_dir=out_dir,
                              classnames=classnames, path_column=path_column, label_column=label_column,
                              threshold=threshold, seed=seed, device=device, html=not no_html, xlsx=xlsx,
                              progress=not no_progress, force=force, check_size=check_size,
                              normalize_labels=normalize_labels)
        return
    _api().audit(root, labels, method=method, model=model, pretrained=pretrained, out_dir=out_dir, params=p,
              classnames=classnames, path_column=path_column, label_column=label_column, threshold=threshold,
              seed=seed, device=device, cache_dir=cache_dir, batch_size=batch_size, num_workers=workers,
              html=not no_html, xlsx=xlsx, duplicate_threshold=None if no_near_duplicates else duplicate_threshold,
              progress=not no_progress, force=force, reviewed=reviewed, check_size=check_size,
              normalize_labels=normalize_labels, image_column=image_column)


@cli.command("detectors")
@click.option("--show", "show", metavar="METHOD",
              help="Print one detector's parameters: value, 'paper' or 'labelsieve', and where each comes from; for "
                   "an ensemble ('ensemble', or members as in --method) its members and their settings that are not "
                   "their paper's recipe.")
def detectors_cmd(show: str | None) -> None:
    """List the registered detectors (or, with --show METHOD, one detector's recipe or an ensemble's members)."""
    if show:
        click.echo(_api().describe_detector(show))
        return
    for name, summary in _api().describe_detectors().items():
        click.echo(f"{name:20s} {summary}")


@cli.command()
@click.argument("audit_csv", type=click.Path(path_type=Path))
@click.option("--out", "-o", "out_csv", required=True, type=click.Path(path_type=Path))
@click.option("--drop-unreviewed", is_flag=True, help="Drop flagged rows with an empty review.")
@click.option("--accept-suggestions", is_flag=True, help="Relabel flagged rows with an empty review to the suggestion.")
@click.option("--reviews", multiple=True, type=click.Path(path_type=Path),
              help="A reviews CSV downloaded from audit.html (repeatable), merged onto the review column.")
@click.option("--from-labelstudio", type=click.Path(path_type=Path),
              help="A Label Studio JSON export of the tasks 'labelsieve export --to labelstudio' wrote.")
@click.option("--from-fiftyone", metavar="DATASET", help="The FiftyOne dataset 'labelsieve export --to fiftyone' made.")
@click.option("--write-shards", type=click.Path(path_type=Path),
              help="Audits of WebDataset shards: also write a cleaned copy of the shards into this folder (same shard "
                   "names; dropped samples left out, relabels applied).")
@click.option("--write-parquet", type=click.Path(path_type=Path),
              help="Audits of Parquet / Hugging Face datasets: also write a cleaned copy as Parquet into this folder.")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Where container indexes are memoised.")
def apply(audit_csv: Path, out_csv: Path, drop_unreviewed: bool, accept_suggestions: bool, reviews: tuple[Path, ...],
          from_labelstudio: Path | None, from_fiftyone: str | None, write_shards: Path | None,
          write_parquet: Path | None, cache_dir: Path | None) -> None:
    """Turn a reviewed audit.csv (or audit.xlsx) into corrected labels (path,label).

    Decisions come from the audit's review column and, merged onto it (a conflicting decision is an error,
    never overwritten), from --reviews files, a Label Studio export or a FiftyOne dataset.
    """
    if write_shards is not None and write_parquet is not None:
        raise click.UsageError("Give --write-shards or --write-parquet, not both.")
    counts = _api().apply_review(audit_csv, out_csv=out_csv, drop_unreviewed_flagged=drop_unreviewed,
                          accept_suggestions=accept_suggestions, reviews=reviews, from_labelstudio=from_labelstudio,
                          from_fiftyone=from_fiftyone, write_shards=write_shards, write_parquet=write_parquet,
                          cache_dir=cache_dir)
    click.echo(", ".join(f"{k}: {v}" for k, v in counts.items()) + f" -> {out_csv}")


@cli.command()
@click.option("--clean", "audit_csv", required=True, type=click.Path(path_type=Path), help="audit.csv to train from.")
@click.option("--images", "images_root", type=click.Path(path_type=Path),
              help="Image root, or the shards / Parquet files of an audit of those (default: as recorded in the "
                   "audit.json beside the audit).")
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True,
              help="timm name or alias, an open_clip model or folder (its image tower), or 'clip' for the audit's "
                   "CLIP model.")
@click.option("--pretrained", help="Weights: a local file, a tag, or 'none' for random init (default: the backbone's "
                                   "default weights).")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--lr", type=float)
@click.option("--val", "val_csv", type=click.Path(path_type=Path), help="Validation CSV (path,label).")
@click.option("--val-fraction", default=0.1, show_default=True)
@click.option("--balanced", is_flag=True, help="Class-balanced sampling.")
@click.option("--freeze-bn", is_flag=True, help="Keep BatchNorm statistics at their pretrained values.")
@click.option("--keep-flagged", is_flag=True,
              help="Train on flagged rows nobody reviewed too, with their given label (default: drop them).")
@click.option("--accept-suggestions", is_flag=True,
              help="Train on flagged rows nobody reviewed with their suggested label (default: drop them).")
@click.option("--reviews", multiple=True, type=click.Path(path_type=Path),
              help="A reviews CSV downloaded from audit.html (repeatable), merged onto the review column.")
@click.option("--image-size", type=int)
@click.option("--clip-head", type=click.Choice(["linear", "zero_shot"]), default="linear", show_default=True,
              help="CLIP backbones: a fresh head on the pre-projection features, blocks + head trained (DEFT's phase "
                   "2), or a head initialised from the zero-shot text embeddings, whole tower trained: much better "
                   "with few images or epochs (500 Imagenette images, 3 epochs: 85 % vs 12 %; docs/methods.md).")
@click.option("--seed", default=0, show_default=True)
@click.option("--device")
@click.option("--workers", type=int)
@click.option("--out", "-o", "out_dir", default="model", show_default=True, type=click.Path(path_type=Path))
def train(audit_csv: Path, images_root: Path | None, backbone: str, pretrained: str | None, epochs: int | None,
          batch_size: int | None, lr: float | None, val_csv: Path | None, val_fraction: float, balanced: bool,
          freeze_bn: bool, keep_flagged: bool, accept_suggestions: bool, reviews: tuple[Path, ...],
          image_size: int | None, clip_head: str, seed: int, device: str | None, workers: int | None,
          out_dir: Path) -> None:
    """Fine-tune a classifier on the images an audit kept, and export it.

    Rows a reviewer decided on follow the review column; flagged rows nobody reviewed are dropped
    unless --keep-flagged or --accept-suggestions says otherwise.
    """
    if keep_flagged and accept_suggestions:
        raise click.UsageError("Give --keep-flagged or --accept-suggestions, not both.")
    rep = _api().train_from_audit(audit_csv, images_root=images_root, backbone=backbone, out_dir=out_dir,
                           pretrained=pretrained, epochs=epochs, batch_size=batch_size, lr=lr, val_csv=val_csv,
                           val_fraction=val_fraction, balanced=balanced, seed=seed, device=device,
                           image_size=image_size, num_workers=workers, freeze_bn=freeze_bn,
                           drop_unreviewed_flagged=not (keep_flagged or accept_suggestions),
                           accept_suggestions=accept_suggestions, reviews=reviews, clip_head=clip_head)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return
    acc = ("no validation set" if rep.best_val_acc is None or rep.last_val_acc is None
           else f"best val acc {rep.best_val_acc:.4f}, last {rep.last_val_acc:.4f}")
    click.echo(f"trained on {rep.n_train} images, validated on {rep.n_val}: {acc} -> {out_dir}")


@cli.command()
@click.argument("audit_csv", type=click.Path(path_type=Path))
@click.option("--to", "target", required=True, type=click.Choice(["labelstudio", "fiftyone"]))
@click.option("--out", "-o", "out_dir", type=click.Path(path_type=Path),
              help="labelstudio: folder for tasks.json and labeling_config.xml (default: AUDIT_DIR/labelstudio), or a "
                   "FILE.json for the tasks (labeling_config.xml beside it).")
@click.option("--name", help="fiftyone: dataset name (default: labelsieve-<audit folder name>).")
@click.option("--images", "images_root", type=click.Path(path_type=Path),
              help="Image root (default: the one recorded in the audit.json beside the audit).")
@click.option("--all-rows", is_flag=True, help="Every readable row, not only the flagged ones.")
@click.option("--overwrite", is_flag=True, help="fiftyone: replace a dataset of that name that holds no decisions.")
@click.option("--document-root", type=click.Path(path_type=Path),
              help="labelstudio: LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, if not the image root.")
@click.option("--url-prefix", help="labelstudio: image URL = prefix + path (images served over HTTP or a bucket).")
def export(audit_csv: Path, target: str, out_dir: Path | None, name: str | None, images_root: Path | None,
           all_rows: bool, overwrite: bool, document_root: Path | None, url_prefix: str | None) -> None:
    """Hand an audit to Label Studio (a tasks file + labeling config) or FiftyOne (a dataset) for review.

    Read the decisions back with `labelsieve apply AUDIT_CSV --from-labelstudio EXPORT.json` or
    `--from-fiftyone DATASET`.
    """
    res = _api().export_audit(audit_csv, to=target, out_dir=out_dir, name=name, images_root=images_root,
                              all_rows=all_rows, overwrite=overwrite, document_root=document_root,
                              url_prefix=url_prefix)
    if target == "fiftyone":
        click.echo(f"FiftyOne dataset {res['name']!r}: {res['n_samples']} samples. Tag samples keep / drop / relabel / "
                   f"relabel:<class> in the App, then: labelsieve apply {audit_csv} --from-fiftyone {res['name']} "
                   "-o labels.clean.csv")
        return
    checked = (f"checked with label-studio-sdk {res['validated']}" if res["validated"]
               else "not checked: pip install 'labelsieve[labelstudio]' to check them with Label Studio's validator")
    serve = ("" if res["document_root"] is None else
             f"Start Label Studio with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and "
             f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={res['document_root']}, and add a Local Storage on that folder "
             "to the project.\n")
    click.echo(f"{res['n_tasks']} tasks ({res['n_predictions']} pre-annotated; {checked}) -> {res['tasks']}\n"
               f"labeling config -> {res['config']}\n{serve}Create a project with the config, import the tasks; "
               f"after review export it as JSON, then: labelsieve apply {audit_csv} --from-labelstudio EXPORT.json "
               "-o labels.clean.csv")


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("images", type=click.Path(path_type=Path))
@click.option("--root", type=click.Path(path_type=Path), help="Image root when IMAGES is a CSV (default: its folder).")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--batch-size", default=DEFAULT_BATCH_SIZE, show_default=True)
@click.option("--path-column", default="path", show_default=True, help="IMAGES as a CSV: its path column.")
@click.option("--label-column", default="label", show_default=True,
              help="IMAGES as a CSV: a label column to score against, if present.")
@click.option("--image-column", default="image", show_default=True, help="Parquet: the column of image bytes.")
@click.option("--device")
def predict(model_dir: Path, images: Path, root: Path | None, out_dir: Path, batch_size: int, path_column: str,
            label_column: str, image_column: str, device: str | None) -> None:
    """Predict labels for IMAGES (a folder, a CSV with a path column, or WebDataset shards / Parquet files) with a
    trained model."""
    kw = {"out_dir": out_dir, "batch_size": batch_size, "device": device, "path_column": path_column,
          "label_column": label_column, "image_column": image_column}
    if images.suffix.lower() in (".csv", ".tsv", ".txt") and images.is_file():
        path = _api().predict(model_dir, root or images.parent, labels_csv=images, **kw)
    else:
        path = _api().predict(model_dir, images, **kw)
    click.echo(f"predictions: {path}")


@cli.command()
@click.argument("labels_csv", type=click.Path(path_type=Path))
@click.option("--root", type=click.Path(path_type=Path), help="Image root (default: the CSV's folder).")
@click.option("--kind", type=click.Choice(["symmetric", "pair", "instance"]), default="symmetric", show_default=True)
@click.option("--rate", type=float, required=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--mapping", help="pair noise: 'a:b,c:d' or a CSV from,to (default: class i -> i+1).")
@click.option("--out", "-o", "out_csv", required=True, type=click.Path(path_type=Path))
def noise(labels_csv: Path, root: Path | None, kind: str, rate: float, seed: int, mapping: str | None,
          out_csv: Path) -> None:
    """Write a copy of LABELS_CSV with synthetic label noise (original label kept in true_label)."""
    changed, n = _api().add_noise(labels_csv, out_csv, kind=kind, rate=rate, seed=seed, root=root, mapping=mapping)
    click.echo(f"{changed} of {n} labels changed ({kind}) -> {out_csv}")


@cli.command()
@click.argument("audit_csv", type=click.Path(path_type=Path))
@click.option("--truth", required=True, type=click.Path(path_type=Path), help="CSV with path and true_label.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def evaluate(audit_csv: Path, truth: Path, as_json: bool) -> None:
    """Score an audit against known true labels."""
    m = _api().evaluate_audit(audit_csv, truth)
    click.echo(json.dumps(m, indent=2) if as_json else _api().format_metrics(m))


@cli.command()
@click.option("--out", "-o", "out_dir", default="labelsieve-demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--method", "-m", default=None, help="Detector (default: the demo's recommended one).")
@click.option("--no-progress", is_flag=True)
def demo(out_dir: Path, method: str | None, no_progress: bool) -> None:
    """Audit the bundled EuroSAT sample offline with the bundled mini CLIP."""
    from labelsieve.demo import run_demo  # imports the API: see _api

    run_demo(out_dir, method=method, progress=not no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 for a problem the user can fix)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="labelsieve", standalone_mode=False)
    except LabelsieveError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        return 2
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C (KeyboardInterrupt) into Abort; an Abort of its own (EOF at a prompt) is just that
        click.echo(INTERRUPTED if isinstance(exc.__cause__, KeyboardInterrupt) else "aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo(INTERRUPTED, err=True)
        return 130
    except OSError as exc:
        if exc.errno not in NO_SPACE:
            raise
        click.secho(f"error: {no_space_error(exc)}", fg="red", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
